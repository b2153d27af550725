"""model/: the log-mel front end against a numpy reference, SequenceModel's mel -> blendshape frame
timing, SimplifiedModel's context, and build_model's choices and build_args."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import ConfigError
from model.features import LogMel, hz_to_mel, mel_filterbank
from model.models import SequenceModel, SimplifiedModel, build_model

SR, N_FFT, WIN, HOP, N_MELS, FMIN, FMAX = 16000, 512, 400, 160, 64, 40.0, 7600.0


# ---------------------------------------------------------------- numpy reference (no torch.stft)


def np_hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def np_mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def np_filterbank(n_fft=N_FFT, n_mels=N_MELS, sr=SR, fmin=FMIN, fmax=FMAX):
    """Triangles on the rfft bin frequencies, HTK mel, each scaled by 2 / (upper - lower)."""
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    hz = np_mel_to_hz(np.linspace(np_hz_to_mel(fmin), np_hz_to_mel(fmax), n_mels + 2))
    fb = np.zeros((n_mels, freqs.size))
    for m in range(n_mels):
        lower, centre, upper = hz[m], hz[m + 1], hz[m + 2]
        rising = (freqs - lower) / (centre - lower)
        falling = (upper - freqs) / (upper - centre)
        fb[m] = np.clip(np.minimum(rising, falling), 0.0, None) * 2.0 / (upper - lower)
    return fb, hz


def np_log_mel(x, n_fft=N_FFT, win=WIN, hop=HOP):
    """Frame i = n_fft samples centred at i * hop of the reflect-padded signal, periodic Hann of
    ``win`` zero-padded (centred) to n_fft, power rfft, mel filter bank, log10(. + 1e-6)."""
    x = np.asarray(x, dtype=np.float64)
    padded = np.pad(x, n_fft // 2, mode="reflect")
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left : left + win] = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(win) / win)
    n_frames = x.size // hop + 1
    frames = np.stack([padded[i * hop : i * hop + n_fft] * window for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [frames, bins]
    fb, _ = np_filterbank(n_fft=n_fft)
    return np.log10(fb @ power.T + 1e-6)  # [n_mels, frames]


def speechy(seconds=1.0, seed=0):
    """Sines across the speech band plus white noise, peak ~0.7: a normal recording level."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    parts = [(0.3, 220.0, 0.0), (0.2, 1250.0, 1.0), (0.1, 3100.0, 2.0), (0.05, 6000.0, 0.5)]
    x = sum(a * np.sin(2 * np.pi * f * t + p) for a, f, p in parts)
    return x + 0.01 * rng.standard_normal(t.size)


# ------------------------------------------------------------------------------------ LogMel


def test_log_mel_matches_numpy_reference():
    x = speechy()
    got = LogMel()(torch.tensor(x, dtype=torch.float32)[None])[0].double().numpy()
    want = np_log_mel(x)
    assert got.shape == want.shape == (N_MELS, x.size // HOP + 1)
    # LogMel runs in float32 (input rounded to float32, float32 FFT and matmul), the reference in
    # float64. At this level every mel energy is >= ~1e-5 (noise floor), far above the 1e-6
    # floor, so the float32 relative error (~1e-6, i.e. ~5e-7 in log10) is what remains;
    # measured max |diff| is ~1.2e-5 in log10 power. 1e-4 (a 0.02 % power error) leaves ~8x
    # margin yet is orders of magnitude below anything a wrong window/padding/filter gives.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert want.min() > -5.5  # the floor (-6) is not what is being compared


@pytest.mark.parametrize("n", [4000, 4159, 4160, 4161, 16000])
def test_log_mel_frame_count(n):
    wav = torch.zeros(2, n)
    assert LogMel()(wav).shape == (2, N_MELS, n // HOP + 1)


@pytest.mark.parametrize("i", [0, 1, 2, 7, 50, 97, 99, 100])
def test_log_mel_frame_i_is_centred_at_i_hop(i):
    wav = torch.zeros(1, SR + 1)  # 101 frames, the last centred on the last sample
    wav[0, i * HOP] = 1.0
    energy = (10.0 ** LogMel()(wav)[0].double()).sum(0)  # broadband energy per frame
    assert int(energy.argmax()) == i
    # the window is symmetric about the frame centre: equal leakage into both neighbours (away
    # from the ends, where the reflect padding mirrors the click into frame 0 / the last frame)
    if 2 <= i <= energy.numel() - 3:
        assert energy[i - 1] == pytest.approx(float(energy[i + 1]), rel=1e-4)
        assert energy[i - 1] < 0.02 * energy[i]  # hann at +-160 of a 400 window: ~0.009
        # a click just short of half a hop later still belongs to frame i, just past it to i + 1
        for offset, frame in ((HOP // 2 - 10, i), (HOP // 2 + 10, i + 1)):
            wav = torch.zeros(1, SR + 1)
            wav[0, i * HOP + offset] = 1.0
            assert int((10.0 ** LogMel()(wav)[0].double()).sum(0).argmax()) == frame


def test_mel_filterbank_shape_and_values_match_formula():
    fb = mel_filterbank(N_FFT, N_MELS, SR, FMIN, FMAX)
    want, _ = np_filterbank()
    assert fb.shape == (N_MELS, N_FFT // 2 + 1)
    assert fb.dtype == torch.float32
    np.testing.assert_allclose(fb.double().numpy(), want, rtol=1e-6, atol=1e-12)
    assert float(hz_to_mel(1000.0)) == pytest.approx(1000.0, abs=0.1)  # HTK: 1 kHz ~ 1000 mel


def test_mel_filterbank_nonnegative_unit_area_and_peaks_at_centre():
    fb = mel_filterbank(N_FFT, N_MELS, SR, FMIN, FMAX).double().numpy()
    _, hz = np_filterbank()
    bin_hz = SR / N_FFT
    assert (fb >= 0).all()
    assert (fb.sum(1) > 0).all()  # no empty filter
    for m in range(N_MELS):
        lower, centre, upper = hz[m], hz[m + 1], hz[m + 2]
        width = (upper - lower) / bin_hz  # in bins
        nz = np.nonzero(fb[m])[0]
        assert lower < nz[0] * bin_hz and nz[-1] * bin_hz < upper  # zero outside its triangle
        peak = int(fb[m].argmax())
        assert abs(peak * bin_hz - centre) <= bin_hz  # one of the two bins around the centre
        if width >= 4:
            # sum * bin width is the integral of the sampled triangle; each of the 3 kinks costs
            # at most |slope change| * bin^2 / 8, i.e. <= 2 * (bin / width)^2 of the unit area
            area = fb[m].sum() * bin_hz
            assert abs(area - 1.0) <= 2.0 * (1.0 / width) ** 2, (m, width, area)
    # and for the wide (upper) filters that bound is tight: within 1 %
    wide = (hz[2:] - hz[:-2]) / bin_hz >= 10
    assert wide.sum() >= 15
    np.testing.assert_allclose(fb[wide].sum(1) * bin_hz, 1.0, atol=0.01)


# ------------------------------------------------------------------------ SequenceModel timing


class MelEnergy(nn.Module):
    """A per-time-step encoder: every hidden channel = 0.1 * mean log-mel over bins at that step."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.1 * x.mean(1, keepdim=True).expand(-1, self.hidden, -1)


class Zeros(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def timing_probe(frames: int, fps: float, hidden: int = 4) -> SequenceModel:
    """A SequenceModel whose output frame k depends only on the encoder features interpolated at
    k / fps s: per-step encoder, context branch -> 0, head = mean of hidden channels."""
    model = SequenceModel(n_mels=N_MELS, hidden=hidden, frames=frames, fps=fps).eval()
    model.norm = nn.Identity()
    model.encoder = MelEnergy(hidden)
    model.context = Zeros()
    with torch.no_grad():
        model.head.weight.fill_(1.0 / hidden)
        model.head.bias.zero_()
    return model


@pytest.mark.parametrize(
    ("fps", "frames", "ks"),
    [
        (30, 300, [0, 1, 2, 7, 100, 149, 298, 299]),  # k * 100 / 30 mostly not an integer
        (25, 250, [0, 1, 7, 100, 248, 249]),  # a hard-coded 30 would miss every k > 0
        (24, 240, [1, 5, 7, 121, 239]),  # k * 100 / 24 not an integer either
    ],
)
def test_sequence_click_at_frame_k_time_drives_frame_k(fps, frames, ks):
    model = timing_probe(frames, fps)
    n = int(round(frames / fps * SR))  # 10 s
    wav = torch.zeros(len(ks), n)
    for b, k in enumerate(ks):
        s = int(round(k * SR / fps))
        wav[b, s : s + 3] = torch.tensor([0.5, 1.0, 0.5])  # a 3-sample burst centred at s
    with torch.no_grad():
        out = model(wav)  # [B, frames, 52]
    assert out.shape == (len(ks), frames, 52)
    assert torch.equal(out, out[:, :, :1].expand_as(out))  # every blendshape gets the same input
    response = out[:, :, 0]
    assert response.argmax(1).tolist() == ks
    for b, k in enumerate(ks):
        # a real peak, not a tie with the neighbours
        neighbours = [j for j in (k - 1, k + 1) if 0 <= j < frames]
        assert all(response[b, k] > response[b, j] + 1e-3 for j in neighbours)


@pytest.mark.parametrize(("fps", "frames"), [(30, 300), (25, 250), (24, 240)])
def test_sequence_output_is_encoder_interpolated_at_k_over_fps(fps, frames):
    """Frame k = the mel-rate features linearly interpolated at mel frame k * 100 / fps."""
    model = timing_probe(frames, fps)
    wav = torch.tensor(speechy(seconds=frames / fps, seed=1), dtype=torch.float32)[None]
    with torch.no_grad():
        out = model(wav)[0, :, 0].double().numpy()
        feat = 0.1 * model.mel(wav)[0].double().mean(0).numpy()  # per mel frame, 100 per s
    t_mel = np.arange(feat.size) / 100.0  # mel frame j is centred at j / 100 s
    t_bs = np.arange(frames) / fps  # blendshape frame k is at k / fps s
    want = 1.0 / (1.0 + np.exp(-np.interp(t_bs, t_mel, feat)))
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def test_sequence_model_unmodified_shape_range_and_batch_independence():
    torch.manual_seed(0)
    model = SequenceModel(hidden=16, frames=60, fps=30).eval()
    wav = torch.tensor(np.stack([speechy(2.0, 2), speechy(2.0, 3)]), dtype=torch.float32)
    with torch.no_grad():
        out = model(wav)
        one = model(wav[1:])
    assert out.shape == (2, 60, 52)
    assert ((out > 0) & (out < 1)).all()
    torch.testing.assert_close(out[1:], one, rtol=0, atol=1e-6)
    assert not torch.allclose(out[0], out[1])


# ---------------------------------------------------------------------- SimplifiedModel context


@pytest.mark.parametrize("context_seconds", [0.3, 0.5])
def test_simplified_model_only_sees_its_context(context_seconds):
    torch.manual_seed(0)
    model = SimplifiedModel(hidden=16, context_seconds=context_seconds).eval()
    ctx = int(round(context_seconds * SR))
    # the frames whose whole FFT window (512) lies in the context: the same from the clip as
    # from the whole window, so a model trained on the loader's log-mel sees what one on audio sees
    assert model.context == (ctx - 256) // HOP + 1 and model.clip_samples <= ctx
    base = torch.tensor(np.stack([speechy(1.0, 4), speechy(1.0, 5)]), dtype=torch.float32)

    def run(wav):
        with torch.no_grad():
            return model(wav)

    ref = run(base)
    assert ref.shape == (2, 52)
    assert ((ref > 0) & (ref < 1)).all()

    after = base.clone()
    after[:, ctx:] = torch.randn(2, base.shape[1] - ctx)  # everything after the context
    assert torch.equal(run(after), ref)
    for start in (ctx, ctx + 1, base.shape[1] - 100):
        loud = base.clone()
        loud[:, start:] *= 100.0
        assert torch.equal(run(loud), ref)

    for s in (0, ctx // 2, ctx - 2 * HOP):  # inside the context: a burst changes the output
        inside = base.clone()
        inside[:, s : s + 40] += 0.5
        changed = run(inside)
        assert (changed - ref).abs().max() > 1e-5, s


# ------------------------------------------------------------------------------ build_model


def test_build_model_auto_picks_by_target():
    assert isinstance(build_model("auto", "first_frame", hidden=8), SimplifiedModel)
    assert isinstance(build_model("auto", "sequence", hidden=8), SequenceModel)
    assert isinstance(build_model("simplified", "first_frame", hidden=8), SimplifiedModel)
    assert isinstance(build_model("sequence", "sequence", hidden=8), SequenceModel)


@pytest.mark.parametrize(
    ("name", "target"),
    [("sequence", "first_frame"), ("simplified", "sequence"), ("transformer", "sequence")],
)
def test_build_model_rejects_mismatch(name, target):
    with pytest.raises(ConfigError):
        build_model(name, target, hidden=8)


@pytest.mark.parametrize(
    ("name", "target", "kw"),
    [
        ("auto", "sequence", dict(hidden=8, n_mels=32, frames=50, fps=25, context_seconds=0.5)),
        ("auto", "first_frame", dict(hidden=8, n_mels=32, frames=50, fps=25, context_seconds=0.5)),
        ("sequence", "sequence", dict(hidden=12, hop_length=200, n_fft=400, win_length=400)),
        ("simplified", "first_frame", dict(hidden=12, context_seconds=0.2, hop_length=200)),
    ],
)
def test_build_args_rebuild_identical_model(name, target, kw):
    torch.manual_seed(0)
    model = build_model(name, target, **kw).eval()
    args = model.build_args
    assert args["target"] == target and args["name"] in ("simplified", "sequence")
    again = build_model(**args).eval()
    assert type(again) is type(model)
    assert again.build_args == args
    sd, sd2 = model.state_dict(), again.state_dict()
    assert list(sd) == list(sd2)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in sd2.items()}
    # non-persistent state (mel config, frames/fps/context) must match too: same weights must
    # give the same output
    again.load_state_dict(sd)
    wav = torch.tensor(speechy(2.0, 6), dtype=torch.float32)[None]
    with torch.no_grad():
        assert torch.equal(model(wav), again(wav))
    assert model.mel.hop_length == again.mel.hop_length == kw.get("hop_length", HOP)
    assert torch.equal(model.mel.fb, again.mel.fb)
    if isinstance(model, SequenceModel):
        assert (again.frames, again.fps) == (kw.get("frames", 300), kw.get("fps", 30))
        # every frame time inside the 2 s of audio it is given, whatever its training window
        assert model(wav).shape == (1, round(2.0 * again.fps), 52)
    else:
        # the frames whose whole FFT window lies in the context (see the context test above)
        seen, hop = int(round(kw.get("context_seconds", 0.3) * SR)), kw.get("hop_length", HOP)
        assert again.context == model.context == (seen - kw.get("n_fft", 512) // 2) // hop + 1


# ---------------------------------------------------------------------- reach and lookahead


@pytest.mark.parametrize("lookahead", [None, 0.05, 0.1, 0.2])
def test_reach_names_exactly_the_samples_each_frame_depends_on(lookahead):
    """In float64 (no rounding hides a far tap): a change at ``needs(k) - 1`` or ``first(k)``
    moves frame k, one at ``needs(k)`` or ``first(k) - 1`` leaves it bit for bit."""
    torch.manual_seed(0)
    model = build_model("sequence", "sequence", hidden=8, n_mels=16, lookahead_seconds=lookahead)
    model = model.eval().double()
    r = model.reach
    wav = torch.tensor(speechy(3.0, 8), dtype=torch.float64)[None]
    with torch.no_grad():
        base = model(wav)[0]
        for k in (30, 31, 32, 44):
            for pos, moves in ((r.needs(k) - 1, True), (r.needs(k), False)):
                for at, want in ((pos, moves), (r.first(k) if moves else r.first(k) - 1, moves)):
                    bumped = wav.clone()
                    bumped[0, at] += 10.0
                    changed = not torch.equal(model(bumped)[0, k], base[k])
                    assert changed == want, (k, at, r.needs(k), r.first(k))
    if lookahead is not None:
        assert r.lookahead_seconds <= lookahead
        assert max(r.needs(k) - k * SR / 30 for k in range(30)) == pytest.approx(
            r.lookahead_samples
        )


def test_lookahead_bounds_the_right_reach_and_keeps_the_kernels():
    full = build_model("sequence", "sequence", hidden=8).reach
    assert (full.encoder_right, full.context_right) == ((2, 2), (1, 2, 4))
    assert full.lookahead_seconds == pytest.approx(0.2925)  # about 0.3 s
    seen = []
    for limit in (0.02, 0.05, 0.1, 0.2, 0.3):
        r = build_model("sequence", "sequence", hidden=8, lookahead_seconds=limit).reach
        assert r.lookahead_seconds <= limit
        # what a layer does not look ahead it looks back: the same kernels, the same weights
        spans = [
            a + b
            for a, b in zip(
                r.encoder_left + r.context_left, r.encoder_right + r.context_right, strict=True
            )
        ]
        assert spans == [4, 4, 2, 4, 8]
        seen.append(r.lookahead_seconds)
    assert seen == sorted(seen) and seen[-1] == full.lookahead_seconds
    with pytest.raises(ConfigError, match=r"lookahead_seconds 0.01 is less than .* at least 20 ms"):
        build_model("sequence", "sequence", lookahead_seconds=0.01)
    with pytest.raises(ConfigError, match="context_seconds"):
        build_model("simplified", "first_frame", lookahead_seconds=0.1)


@pytest.mark.parametrize("lookahead", [None, 0.05])
@pytest.mark.parametrize("fps", [30, 25, 24])
def test_the_reach_formulas_in_docs_deploy_md_are_the_code(lookahead, fps):
    """docs/deploy.md gives a player the reach in closed form from ``arkit.reach``."""
    import math

    model = build_model("sequence", "sequence", hidden=8, fps=fps, lookahead_seconds=lookahead)
    d = model.reach.to_dict()
    a, b = d["sample_rate"] * d["fps_den"], d["hop"] * d["fps_num"]
    r, e = sum(d["context_right"]), sum(d["encoder_right"])
    left, f = sum(d["context_left"]), sum(d["encoder_left"])
    period = b // math.gcd(a, b)
    assert period * a / d["fps_num"] == model.reach.grid and period == model.reach.period
    for k in range(200):
        needs = (-(-(k + r) * a // b) + e) * d["hop"] + d["window_end"]
        first = ((k - left) * a // b - f) * d["hop"] + d["window_first"]
        assert (needs, first) == (model.reach.needs(k), model.reach.first(k))
