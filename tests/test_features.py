"""``data.features: mel``: the DALI graph's log-mel is the model's own front end (values, frame
count, frame times), both loaders yield it, models take it, and a mismatch is refused.

Tolerance. DALI and torch both compute the spectrum in float32, so each mel band carries
rounding of the order of float32's epsilon times the frame's power, whatever the band's own
power. In the power domain the two agree within 1e-6 of the frame's total mel power (about 8
epsilons; 4.7e-7 measured on the demo data); in log10 units that is under 1e-4 for bands within
30 dB of the frame's strongest, and grows for bands far below it (at most about 2e-4 on
speech). Against a float64 reference torch is within 3e-5 and DALI within 2e-4 (demo data).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import build_model
from model.features import LogMel, Mel
from pipeline import build_loader
from tests.helpers import graph_of, serialized_graph

SYN_MEL = Mel(n_mels=32)


def assert_same_log_mel(dali: torch.Tensor, ref: torch.Tensor) -> None:
    """``dali`` and ``ref`` ``[B, n_mels, T]`` log10 mel power, equal as the module says."""
    assert dali.shape == ref.shape
    p_dali, p_ref = 10.0 ** dali.double(), 10.0 ** ref.double()
    total = p_ref.sum(dim=1, keepdim=True)  # each frame's mel power
    assert ((p_dali - p_ref).abs() <= 1e-6 * total).all()
    peak = p_ref.amax(dim=1, keepdim=True)  # each frame's strongest band
    near = p_ref >= peak * 1e-3  # within 30 dB of the frame's peak
    assert (dali - ref).abs()[near].max() < 1e-4
    assert (dali - ref).abs().max() < 5e-4


def pair(dataset, loader: str, split: str, **kw):
    """The same batches as ``wav`` and as ``mel``."""
    if loader == "torch":
        kw["num_workers"] = 0
    args = dict(split=split, batch_size=4, shuffle=False, device="cpu", seed=3, **kw)
    args["with_params"] = True
    wav = next(iter(build_loader(loader, dataset, **args)))
    mel = next(iter(build_loader(loader, dataset, **args, features="mel", mel=SYN_MEL)))
    return wav, mel


@pytest.mark.parametrize("loader", ["dali", "torch"])
@pytest.mark.parametrize("augment", [None, {"gain_db": [-6, 6], "snr_db": [10, 30]}])
def test_loader_log_mel_equals_the_model_front_end(tiny_dataset, loader, augment):
    split = "train" if augment else "val"
    wav, mel = pair(tiny_dataset, loader, split, augment=augment)
    assert "wav" not in mel and mel["mel"].dtype == torch.float32
    assert mel["mel"].shape == (4, 32, 160000 // 160 + 1)
    assert torch.equal(wav["arkit"], mel["arkit"])
    for name in ("offset", "gain_db", "snr_db") if augment else ():
        assert torch.equal(torch.as_tensor(wav[name]), torch.as_tensor(mel[name]))  # same draws
    ref = LogMel(**SYN_MEL.to_dict())(wav["wav"])
    if loader == "torch":
        assert torch.equal(mel["mel"], ref)  # the same module, in the worker
    else:
        assert_same_log_mel(mel["mel"], ref)


def test_dali_log_mel_frames_are_centred_at_multiples_of_the_hop():
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    from model.features import dali_log_mel

    rng = np.random.default_rng(0)
    clips = []
    for n, at in ((16001, 8000), (1000, 480), (479, 160)):
        a = (0.001 * rng.standard_normal(n)).astype(np.float32)
        a[at] = 0.9  # a click: the frame centred on it is the loudest
        clips.append((a, at))
    pipe = Pipeline(batch_size=3, num_threads=1, device_id=None)
    with pipe:
        pipe.set_outputs(dali_log_mel(fn.external_source(name="a"), SYN_MEL))
    pipe.build()
    pipe.feed_input("a", [c for c, _ in clips])
    (out,) = pipe.run()
    lm = LogMel(**SYN_MEL.to_dict())
    for i, (clip, at) in enumerate(clips):
        got = torch.from_numpy(np.array(out[i]))[None]
        ref = lm(torch.from_numpy(clip)[None])
        assert got.shape[-1] == SYN_MEL.frames(len(clip)) == len(clip) // 160 + 1
        assert_same_log_mel(got, ref)
        assert int(got[0].mean(0).argmax()) == at // 160  # frame i centred at sample i * hop


def test_cuda_graph_computes_the_log_mel_on_the_gpu(tiny_dataset):
    for decode in ("gpu", "cpu"):
        blob = serialized_graph(tiny_dataset, decode, split="val", features="mel")
        ops, outputs = graph_of(blob)
        assert ("Spectrogram", "gpu") in ops and ("MelFilterBank", "gpu") in ops
        assert not any(k in ("Spectrogram", "MelFilterBank") for k, d in ops if d == "cpu")
        assert outputs[0] == "gpu"
    # the wav graph is unchanged by the option
    assert ("Spectrogram", "gpu") not in graph_of(serialized_graph(tiny_dataset, "gpu"))[0]


def test_models_take_mel_and_refuse_the_other_input():
    wav = torch.randn(2, 160000) * 0.1
    feats = LogMel(n_mels=32)(wav)
    for name, target in (("sequence", "sequence"), ("simplified", "first_frame")):
        torch.manual_seed(0)
        on_wav = build_model(name, target, n_mels=32, hidden=8).eval()
        torch.manual_seed(0)
        on_mel = build_model(name, target, n_mels=32, hidden=8, features="mel").eval()
        with torch.no_grad():
            # the same network: the same output on the same features (a first_frame model's
            # wav front end reads enough audio that its first frames equal the whole clip's)
            torch.testing.assert_close(on_mel(feats), on_wav(wav), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="trained on log-mel"):
            on_mel(wav)
        with pytest.raises(ValueError, match="trained on raw audio"):
            on_wav(feats)


# a trainer run per loader: the DALI one in the slow suite (its log-mel is checked above)
@pytest.mark.parametrize("loader", [pytest.param("dali", marks=pytest.mark.slow), "torch"])
def test_training_on_mel_records_it_and_a_mismatch_is_refused(
    tiny_dataset, tmp_path, loader, capsys
):
    from train.cli import main as train
    from train.predict import Predictor

    sets = ["model.hidden=16", "model.n_mels=32", "data.batch_size=4", "run.progress=false"]
    sets += [f"data.dir={tiny_dataset}", f"run.dir={tmp_path / 'run'}", "train.max_steps=3"]
    sets += ["data.features=mel", "train.target=sequence", "data.num_workers=0"]
    args = ["--loader", loader]
    for s in sets:
        args += ["--set", s]
    assert train(args) == 0
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["model_args"]["features"] == "mel"
    assert state["config"]["data"]["features"] == "mel"
    # resuming with raw audio is refused, naming both
    resume = ["--resume", str(tmp_path / "run" / "last.pt"), "--set", "data.features=wav"]
    assert train(resume) == 1
    err = capsys.readouterr().err
    assert "was trained on data.features=mel; this run has data.features=wav" in err
    # inference rebuilds the mel model and feeds it its own front end's log-mel
    p = Predictor.from_checkpoint(tmp_path / "run" / "last.pt", "cpu")
    assert p.model.features == "mel"
    y = p.predict(np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.1)
    assert y.shape == (90, 52) and np.isfinite(y).all()


def test_features_setting_is_checked():
    from core.errors import ConfigError
    from train.config import load_config

    with pytest.raises(ConfigError, match="data.features must be wav or mel"):
        load_config(None, ["data.features=fbank"])
    with pytest.raises(ConfigError, match="model.fmin"):
        load_config(None, ["model.fmin=8000"])


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_gpu_log_mel_equals_the_model_front_end(tiny_dataset, decode):
    """On CUDA the spectrogram and mel filter bank run on GPU operators: same numbers."""
    args = dict(split="val", batch_size=4, shuffle=False, device="cuda", decode=decode)
    wav = next(iter(build_loader("dali", tiny_dataset, **args)))
    mel = next(iter(build_loader("dali", tiny_dataset, **args, features="mel", mel=SYN_MEL)))
    assert mel["mel"].is_cuda and mel["mel"].shape == (4, 32, 1001)
    ref = LogMel(**SYN_MEL.to_dict())(wav["wav"].cpu())
    assert_same_log_mel(mel["mel"].cpu(), ref)
