"""``python -m infer.export`` and ``python -m infer --onnx``: exported graphs of wav and log-mel
models, sequence and first_frame, equal to the checkpoints' models in ONNX Runtime on short and
long speech-like audio at batch 2; their metadata; the ``--input mel`` graph; ``--onnx``
outputs and reports equal to ``--checkpoint``'s; bad files as one error line; no overwrite.

Each model is trained once (a few steps on the tiny dataset) and exported once per module."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import soundfile as sf
import torch

from core.arkit import ARKIT_NAMES
from infer.cli import main as infer
from infer.export import main as export
from model.onnx_model import OnnxModel
from pipeline.convert.synthetic import make_take
from tests.helpers import SMALL_RUN
from train.cli import main as train
from train.predict import Predictor, load_model

CPU = torch.device("cpu")
MODELS = {  # checkpoint: (train.target, data.features)
    "seq-wav": ("sequence", "wav"),
    "seq-mel": ("sequence", "mel"),
    "ff-wav": ("first_frame", "wav"),
    "ff-mel": ("first_frame", "mel"),
}
EXPORTS = {  # file: (checkpoint, --input)
    "seq-wav": ("seq-wav", "wav"),
    "seq-mel": ("seq-mel", "wav"),
    "ff-wav": ("ff-wav", "wav"),
    "ff-mel": ("ff-mel", "wav"),
    "seq-wav-melin": ("seq-wav", "mel"),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    """Each of MODELS trained for 3 steps on the tiny dataset: its best.pt."""
    out = {}
    for name, (target, features) in MODELS.items():
        run = tmp_path_factory.mktemp(f"export-{name}")
        sets = [*SMALL_RUN, f"data.dir={tiny_dataset}", f"run.dir={run}", "train.max_steps=3"]
        sets += [f"train.target={target}", f"data.features={features}", "train.report=false"]
        with contextlib.redirect_stdout(io.StringIO()):
            assert train(["--loader", "torch", *(a for s in sets for a in ("--set", s))]) == 0
        out[name] = run / "best.pt"
    return out


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Each of EXPORTS written by the command: the file and what the command printed."""
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, (ck, kind) in EXPORTS.items():
        path = folder / f"{name}.onnx"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            args = ["--checkpoint", str(checkpoints[ck]), "--out", str(path), "--input", kind]
            assert export(args) == 0
        out[name] = path, printed.getvalue()
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.onnx" for n in EXPORTS)
    return out


@pytest.fixture(scope="module")
def audio() -> dict[str, np.ndarray]:
    """Speech-like audio: 0.5 s and 60 s, two different takes of each."""
    return {
        "short": np.stack([make_take(77, i, seconds=0.5)[0] for i in (1, 2)]),
        "long": np.stack([make_take(77, i, seconds=60.0)[0] for i in (3, 4)]),
    }


def reference(model, wav: torch.Tensor) -> np.ndarray:
    """The torch model on raw audio, through its own log-mel when it takes log-mel."""
    with torch.inference_mode():
        x = model.mel(wav) if model.features == "mel" else wav
        return model(x).numpy()


def run_graph(path: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the file, directly (not through this project's classes)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


# ------------------------------------------------------------------ the graphs
@pytest.mark.parametrize("name", list(EXPORTS))
def test_the_graph_equals_the_model_on_short_and_long_audio_at_batch_2(
    name, exported, checkpoints, audio
):
    ck, kind = EXPORTS[name]
    path = exported[name][0]
    model, state = load_model(checkpoints[ck], CPU)
    target = state["model_args"]["target"]
    for length, wav in audio.items():
        if target == "first_frame" and length == "long":  # clips from all over 60 s
            need = model.clip_samples
            wav = np.stack(
                [wav[i % 2, s : s + need] for i, s in enumerate(range(0, 950_000, 25_000))]
            )
        x = torch.from_numpy(wav)
        want = reference(model, x)
        # the --input mel graph takes the log-mel of the file's own settings; its reference
        # is the wav model on the audio, front end included
        fed = OnnxModel(path).mel(x).numpy() if kind == "mel" else wav
        got = run_graph(path, fed)
        assert got.shape == want.shape
        assert len(want) >= 2
        if target == "sequence":
            assert want.shape[1] == (15 if length == "short" else 1800)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert np.abs(want[0] - want[1]).max() > 1e-3  # two inputs, two outputs: a real batch


@pytest.mark.parametrize("name", list(EXPORTS))
def test_predictor_from_onnx_equals_the_checkpoints(name, exported, checkpoints, audio):
    ck, kind = EXPORTS[name]
    onnx_p = Predictor.from_onnx(exported[name][0])
    torch_p = Predictor.from_checkpoint(checkpoints[ck], "cpu")
    same = ("target", "sample_rate", "fps", "window_frames")
    assert [getattr(onnx_p, a) for a in same] == [getattr(torch_p, a) for a in same]
    assert onnx_p.model.features == kind
    for wav in (audio["short"][0], audio["long"][0][: 16000 * 20]):  # 1 window, 3 windows
        got, want = onnx_p.predict(wav), torch_p.predict(wav)
        assert got.shape == want.shape == (torch_p.frames_for(len(wav)), 52)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["seq-wav", "seq-mel", "ff-wav"])
def test_a_stream_on_the_file_gives_the_checkpoints_offline_frames(name, exported, checkpoints):
    """``Stream`` runs ONNX Runtime as it runs PyTorch: pieces of 1 to 16,000 samples."""
    from infer.stream import Stream

    wav = make_take(77, 6, seconds=3.0)[0]
    want = Predictor.from_checkpoint(checkpoints[EXPORTS[name][0]], "cpu").predict(wav)
    stream = Stream(Predictor.from_onnx(exported[name][0], threads=1))
    assert stream.lookahead_seconds == pytest.approx(
        float(props(exported[name][0])["arkit.lookahead_seconds"]), abs=1e-3
    )
    got, at = [], 0
    for n in [1, 7, 160, 533, 1234, 16000] * 4:
        got.append(stream.push(wav[at : at + n]))
        at += n
    got.append(stream.push(wav[at:]))
    got.append(stream.flush())
    np.testing.assert_allclose(np.concatenate(got), want, rtol=0, atol=1e-4)


def test_metadata_says_what_the_graph_takes_and_gives(exported, checkpoints):
    sha = hashlib.sha256(checkpoints["seq-wav"].read_bytes()).hexdigest()
    model, _ = load_model(checkpoints["seq-wav"], CPU)
    meta = props(exported["seq-wav"][0])
    assert {k for k in meta if k.startswith("arkit.")} == {
        f"arkit.{k}"
        for k in "format target input sample_rate fps blendshapes mel lookahead_seconds reach "
        "window_frames checkpoint checkpoint_sha256".split()
    }
    assert meta["arkit.target"] == "sequence" and meta["arkit.input"] == "wav"
    assert int(meta["arkit.sample_rate"]) == 16000 and float(meta["arkit.fps"]) == 30.0
    assert json.loads(meta["arkit.blendshapes"]) == list(ARKIT_NAMES)
    assert json.loads(meta["arkit.mel"]) == model.mel.settings.to_dict()
    assert json.loads(meta["arkit.mel"])["n_mels"] == 32
    assert json.loads(meta["arkit.reach"]) == model.reach.to_dict()
    assert float(meta["arkit.lookahead_seconds"]) == model.reach.lookahead_seconds
    assert 0.2 < model.reach.lookahead_seconds < 0.4
    assert int(meta["arkit.window_frames"]) == 300
    assert meta["arkit.checkpoint"] == "best.pt" and meta["arkit.checkpoint_sha256"] == sha
    graph = onnx.load(str(exported["seq-wav"][0])).graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input]
    assert dims == [["batch", "samples"]]
    out = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert out == ["batch", "frames", 52]
    # a first_frame model: its clip instead of a reach, its lookahead the clip
    ff, _ = load_model(checkpoints["ff-mel"], CPU)
    meta = props(exported["ff-mel"][0])
    assert "arkit.reach" not in meta and int(meta["arkit.clip_samples"]) == ff.clip_samples
    assert float(meta["arkit.lookahead_seconds"]) == ff.clip_samples / 16000
    assert meta["arkit.target"] == "first_frame" and meta["arkit.input"] == "wav"
    # the --input mel graph
    meta = props(exported["seq-wav-melin"][0])
    assert meta["arkit.input"] == "mel"
    graph = onnx.load(str(exported["seq-wav-melin"][0])).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 32, "mel_frames"]
    # as the runtime model reads it
    m = OnnxModel(exported["seq-wav"][0])
    assert (m.features, m.target, m.num_blendshapes) == ("wav", "sequence", 52)
    assert (m.sample_rate, m.fps, m.frames) == (16000, 30.0, 300)
    assert m.reach == model.reach and m.clip_samples is None
    assert m.mel.settings == model.mel.settings


def test_the_export_prints_the_file_its_size_lookahead_and_difference(exported):
    path, printed = exported["seq-wav"]
    lines = printed.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"wrote {path} (") and " kB, opset " in lines[0]
    kb = float(lines[0].split(" (")[1].split(" kB")[0])
    assert abs(kb - path.stat().st_size / 1000) <= 0.5
    assert "in: wav [batch, samples] at 16000 Hz; out: [batch, frames, 52] at 30 fps" in lines[0]
    lookahead = float(props(path)["arkit.lookahead_seconds"])
    assert lines[1].startswith(f"lookahead {lookahead:.3f} s; ONNX Runtime matches PyTorch within ")
    diff = float(lines[1].split("within ")[1].split(" ")[0])
    assert 0 <= diff <= 1e-4


# ------------------------------------------------------------------ python -m infer --onnx
def read_csv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """The header, the timecodes and the values of a CSV."""
    header, *rows = list(csv.reader(path.open(newline="")))
    return header, [r[0] for r in rows], np.array([[float(x) for x in r[1:]] for r in rows])


def test_infer_onnx_writes_the_checkpoints_csv_and_npy(exported, checkpoints, audio, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "short.wav", audio["short"][0], 16000, subtype="FLOAT")
    sf.write(src / "long.wav", audio["long"][0][: 16000 * 23], 16000, subtype="FLOAT")
    ck, ox = tmp_path / "ck", tmp_path / "ox"
    assert infer(["--checkpoint", str(checkpoints["seq-wav"]), str(src), "--out", str(ck)]) == 0
    assert infer(["--onnx", str(exported["seq-wav"][0]), str(src), "--out", str(ox)]) == 0
    for stem, frames in (("short", 15), ("long", 690)):
        want, got = np.load(ck / f"{stem}.npy"), np.load(ox / f"{stem}.npy")
        assert got.shape == want.shape == (frames, 52)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        header, times, values = read_csv(ck / f"{stem}.csv")
        o_header, o_times, o_values = read_csv(ox / f"{stem}.csv")
        assert o_header == header and o_times == times and len(times) == 2 * frames
        np.testing.assert_allclose(o_values, values, atol=1e-4, rtol=0)


def lags(rec: dict) -> tuple[list[tuple], list[float]]:
    """Each take's source, lag and flag; and its correlation peak (a number also when the lag
    is unknown, as a model trained for 3 steps leaves it)."""
    takes = rec["take_lags"]["takes"]
    return [(t["source"], t["lag"], t["flagged"]) for t in takes], [t["peak"] for t in takes]


def test_infer_onnx_eval_reports_the_checkpoints_numbers(
    exported, checkpoints, tiny_dataset, tmp_path
):
    recs = {}
    for flag, path in (("checkpoint", checkpoints["seq-wav"]), ("onnx", exported["seq-wav"][0])):
        out = tmp_path / flag
        args = [f"--{flag}", str(path), "--eval", str(tiny_dataset), "--out", str(out)]
        assert infer([*args, "--loader", "torch"]) == 0
        recs[flag] = json.loads((out / "report.json").read_text())
        assert recs[flag]["checkpoint"] == str(path)  # the file the numbers are of
    want, got = recs["checkpoint"], recs["onnx"]
    assert got["frames"] == want["frames"] == 4 * 300 and got["samples"] == want["samples"]
    for key in ("mse", "mae", "baseline_mse", "mse_ratio", "jaw_open_pearson"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    for name in ARKIT_NAMES:
        mae = want["per_blendshape"][name]["mae"]
        assert got["per_blendshape"][name]["mae"] == pytest.approx(mae, abs=1e-6), name
    assert got["groups"] == pytest.approx(want["groups"], abs=1e-6)
    (takes, peaks), (o_takes, o_peaks) = lags(want), lags(got)
    assert o_takes == takes and len(takes) == 4
    assert o_peaks == pytest.approx(peaks, abs=1e-4)


# ------------------------------------------------------------------ bad files, one line each
def test_bad_onnx_files_are_one_error_line_naming_the_file(exported, tmp_path, capsys):
    wav = tmp_path / "a.wav"
    sf.write(wav, make_take(77, 1, seconds=1.0)[0], 16000)
    good = exported["seq-wav"][0]
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model\n")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bare = tmp_path / "bare.onnx"  # a real ONNX model, without our metadata
    proto = onnx.load(str(good))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    assert ort.InferenceSession(str(bare)).get_inputs()[0].name == "wav"  # loads, runs
    cases = {
        junk: "is not an ONNX model ONNX Runtime can load, or one cut short",
        cut: "is not an ONNX model ONNX Runtime can load, or one cut short",
        bare: "is an ONNX model without the arkit.* metadata that python -m infer.export writes",
        tmp_path / "none.onnx": "does not exist",
    }
    for path, says in cases.items():
        out = tmp_path / f"out-{path.stem}"
        assert infer(["--onnx", str(path), str(wav), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert f"{path} {says}" in err
        assert not out.exists()
    args = ["--onnx", str(good), str(wav), "--out", str(tmp_path / "o"), "--device", "cuda"]
    assert infer(args) == 1
    assert capsys.readouterr().err.startswith("error: --device cuda with --onnx: ")
    # the file is an input of the run: never written over, even with --overwrite
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy(good, odd / "a.npy")
    assert infer(["--onnx", str(odd / "a.npy"), str(wav), "--out", str(odd), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"would be written over {odd / 'a.npy'}, an input of this run" in err
    assert (odd / "a.npy").read_bytes() == good.read_bytes()


def test_missing_onnx_packages_say_what_to_install(
    exported, checkpoints, tmp_path, capsys, monkeypatch
):
    wav = tmp_path / "a.wav"
    sf.write(wav, make_take(77, 1, seconds=1.0)[0], 16000)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime: ImportError
    assert (
        infer(["--onnx", str(exported["seq-wav"][0]), str(wav), "--out", str(tmp_path / "o")]) == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: running ONNX file ") and err.endswith(
        "needs onnxruntime, which is not installed: pip install 'arkit-dali[export]'\n"
    )
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    args = ["--checkpoint", str(checkpoints["seq-wav"]), "--out", str(tmp_path / "m.onnx")]
    assert export(args) == 1
    assert "which is not installed: pip install 'arkit-dali[export]'" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_to_overwrite_unless_told(checkpoints, tmp_path, capsys, audio):
    """Here the first_frame wav model is exported with --input mel over an existing file."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"someone's file")
    args = ["--checkpoint", str(checkpoints["ff-wav"]), "--out", str(out), "--input", "mel"]
    assert export(args) == 1
    err = capsys.readouterr().err
    assert err == f"error: {out} exists: pass --overwrite to replace it, or choose another --out\n"
    assert out.read_bytes() == b"someone's file"
    same = ["--checkpoint", str(checkpoints["ff-wav"]), "--out", str(checkpoints["ff-wav"])]
    assert export([*same, "--overwrite"]) == 1
    assert "is the checkpoint (even with --overwrite)" in capsys.readouterr().err
    assert export([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no tmp file left
    m = OnnxModel(out)
    assert (m.features, m.target) == ("mel", "first_frame")
    model, _ = load_model(checkpoints["ff-wav"], CPU)
    clips = torch.from_numpy(audio["long"][:, 16000 : 16000 + model.clip_samples])
    np.testing.assert_allclose(m(m.mel(clips)).numpy(), reference(model, clips), atol=1e-4)


def test_the_deploy_pages_python_example_gives_infers_frames(
    exported, checkpoints, audio, tmp_path, monkeypatch
):
    """docs/deploy.md's example, as written, on a model trained on log-mel: its frames are the
    checkpoint's predictor's (what ``python -m infer`` writes) to the last one."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "deploy.md").read_text()
    code = page.split("### Running it from Python")[1].split("```python\n")[1].split("```")[0]
    shutil.copy(exported["seq-mel"][0], tmp_path / "model.onnx")
    wav = audio["long"][1][: 16000 * 12 + 123]
    sf.write(tmp_path / "speech.wav", wav, 16000, subtype="FLOAT")
    monkeypatch.chdir(tmp_path)
    names: dict = {}
    exec(code, names)
    want = Predictor.from_checkpoint(checkpoints["seq-mel"], "cpu").predict(wav)
    assert names["frames"].shape == want.shape == (361, 52)
    np.testing.assert_allclose(names["frames"], want, atol=1e-4, rtol=0)
