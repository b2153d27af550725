"""Random crops and paired augmentation (``pipeline.loaders.augment``) in both loaders, on real
shards.

Every check compares what a loader yields with the segments make_shards wrote, read straight
from the tars by key, at the crop and augmentation values the batch says were drawn
(``with_params=True``). Without CUDA both DALI decode modes run on CPU operators.

Datasets (built with the real make_shards; ``segs``, ``short`` and ``windows`` are the
session's ``long_segments``, ``segments_dataset`` and ``noval_dataset`` of conftest.py, the others
this module's own):
- ``segs``: 10 synthetic takes of 14 s; 8 train segments of 420 frames (one per take) and
  2 val windows of 300 frames.
- ``clicks``: 4 takes of silence with short clicks, whose jawOpen is a narrow bump at the
  same instants (a 60 fps .npy, low-passed to 30 fps by make_shards).
- ``short``: 36 synthetic takes cut into segments of 84 frames for windows of 60 (2 s), so
  the distribution test draws many samples quickly.
- ``windows``: 8 synthetic takes as plain 10 s train windows (no segments).
- ``tones``: 4 takes that are sums of sine tones at known frequencies, cut into segments of 96
  frames for windows of 60, so that speeds up to 1.55 fit.
"""

from __future__ import annotations

import io
import re
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from core.arkit import INDEX
from core.errors import ConfigError
from pipeline import build_loader, make_shards
from pipeline.loaders.augment import SPEED_TOLERANCE, Augment, max_offset, start_sample
from pipeline.shards.manifest import load_manifest
from pipeline.shards.tars import read_index
from tests.helpers import take, tar_members

RATE, FPS = 16000, 30
CLIP, FRAMES = 160000, 300
SEGMENT_FRAMES = 420  # 14 s segments
JAW = INDEX["jawopen"]  # canonical column 17
ALL_AUG = {"gain_db": [-12, 12], "snr_db": [5, 30], "speed": [0.85, 1.15]}
SPEED = {"speed": [0.85, 1.15]}

BACKENDS = {
    "dali-gpu": ("dali", {"decode": "gpu"}),  # the raw-bytes graph, here on CPU operators
    "dali-cpu": ("dali", {"decode": "cpu"}),
    "torch": ("torch", {"num_workers": 0}),
}
ALL = list(BACKENDS)


def make(backend: str, data: Path, **kw):
    name, opts = BACKENDS[backend]
    return build_loader(name, data, **{"device": "cpu", "with_params": True, **opts, **kw})


def build(out: Path, *args: str) -> Path:
    base = ["--out", str(out), "--quiet", "--workers", "2", "--samples-per-shard", "4"]
    assert make_shards.main([*base, *args]) == 0
    return out


class Members:
    """One split's samples as make_shards wrote them, by key: (audio float32, arkit)."""

    def __init__(self, data: Path, split: str) -> None:
        m = load_manifest(data)
        lay = m.layout(split)
        self.samples, self.frames = lay.samples, lay.frames
        self.wav: dict[str, np.ndarray] = {}
        self.arkit: dict[str, np.ndarray] = {}
        for tar_path, idx_path in zip(m.tar_paths(split), m.idx_paths(split), strict=True):
            members = tar_members(tar_path)
            assert [s[0].key for s in read_index(idx_path)] == list(members)
            for key, mem in members.items():
                wav = mem["wav"]
                assert wav[:4] == b"RIFF" and len(wav) == 44 + 2 * lay.samples
                self.wav[key] = np.frombuffer(wav[44:], "<i2").astype(np.float32) / 32768
                arkit = np.load(io.BytesIO(mem["arkit.npy"]), allow_pickle=False)
                assert arkit.shape == (lay.frames, 52) and arkit.dtype == np.float32
                self.arkit[key] = arkit

    def crop(self, key: str, offset: int, window: int = CLIP, frames: int = FRAMES):
        """The plain crop (no augmentation) of segment ``key`` at ``offset`` frames."""
        s0 = start_sample(offset, RATE, FPS)
        return self.wav[key][s0 : s0 + window], self.arkit[key][offset : offset + frames]


def samples(batches):
    """(key, wav, arkit, params) per sample, params as Python numbers."""
    for b in batches:
        names = [k for k in b if k not in ("wav", "arkit", "key")]
        for i, key in enumerate(b["key"]):
            params = {n: b[n][i].item() for n in names}
            yield key, b["wav"][i].numpy(), b["arkit"][i].numpy(), params


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def segs(long_segments) -> Path:
    return long_segments


@pytest.fixture(scope="module")
def segs_members(segs) -> dict[str, Members]:
    m = load_manifest(segs)
    assert (m.segment_frames, m.frames, m.segment_samples) == (SEGMENT_FRAMES, FRAMES, 224000)
    assert m.num_samples("train") == 8 and m.num_samples("val") == 2
    return {split: Members(segs, split) for split in ("train", "val")}


# ---------------------------------------------------------------- 1. crops are the source


@pytest.mark.parametrize("backend", ALL)
def test_crops_are_the_segments_bit_for_bit(segs, segs_members, backend):
    ref = segs_members["train"]
    loader = make(backend, segs, batch_size=4, shuffle=True, seed=11)
    assert loader.crops and len(loader) == 2
    offsets = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = []
        for key, wav, arkit, params in samples(loader):
            assert set(params) == {"offset"}  # nothing else is drawn without augmentation
            o = params["offset"]
            assert 0 <= o <= SEGMENT_FRAMES - FRAMES
            want_wav, want_arkit = ref.crop(key, o)
            assert wav.dtype == np.float32 and np.array_equal(wav, want_wav), (key, o)
            assert np.array_equal(arkit, want_arkit), (key, o)
            seen.append((key, o))
        assert sorted(k for k, _ in seen) == sorted(ref.wav)  # every segment once an epoch
        offsets.append(dict(seen))
    # offsets vary across samples and across epochs
    assert len(set(offsets[0].values())) >= 5
    assert sum(offsets[0][k] != offsets[1][k] for k in ref.wav) >= 6
    # and repeat for the same seed
    again = make(backend, segs, batch_size=4, shuffle=True, seed=11)
    assert {k: p["offset"] for k, _, _, p in samples(again)} == offsets[0]


# ---------------------------------------------------------------- 2. clicks land on the frame

CLICK_TAKES = 4
CLICK_SIGMA = 0.030  # s: the jawOpen bump's width (0.9 frames at 30 fps)


def click_samples(take: int) -> np.ndarray:
    """Where take ``take``'s clicks are, in samples of the 14 s take (every 1.7 s)."""
    t = np.arange(0.6, 13.5, 1.7) + 0.37 * take + 0.0123 * take  # off the frame grid
    return np.round(t[t < 13.5] * RATE).astype(np.int64)


@pytest.fixture(scope="module")
def clicks(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("clicks_in")
    pulse = np.hanning(33)[1:-1] * 0.8  # 31 samples, symmetric about its centre
    t60 = np.arange(14 * 60) / 60
    for k in range(CLICK_TAKES):
        audio = np.zeros(14 * RATE)
        anim = np.zeros((len(t60), 52), np.float32)
        for n in click_samples(k):
            audio[n - 15 : n + 16] += pulse
            anim[:, JAW] += 0.9 * np.exp(-0.5 * ((t60 - n / RATE) / CLICK_SIGMA) ** 2)
        with wave.open(str(src / f"take{k}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(np.round(audio * 32767).astype("<i2").tobytes())
        np.save(src / f"take{k}.npy", anim)
    out = tmp_path_factory.mktemp("clicks") / "ds"
    build(
        out,
        "--input",
        str(src),
        "--npy-fps",
        "60",
        "--segment-seconds",
        "14",
        "--window-seconds",
        "10",
        "--val-fraction",
        "0",
    )
    m = load_manifest(out)
    assert m.num_samples("train") == CLICK_TAKES and m.segment_frames == SEGMENT_FRAMES
    return out


def sub_peak(y: np.ndarray, i: int) -> float:
    """The vertex of the parabola through y[i-1], y[i], y[i+1]."""
    a, b, c = float(y[i - 1]), float(y[i]), float(y[i + 1])
    return i + 0.5 * (a - c) / (a - 2 * b + c)


CLICK_TOLERANCE = 0.6  # frames; why in test_a_click_lands_on_its_frame's docstring


@pytest.mark.parametrize("speed", [False, True], ids=["plain", "speed"])
@pytest.mark.parametrize("backend", ALL)
def test_a_click_lands_on_its_frame(clicks, backend, speed, record_property):
    """A click at crop audio time t peaks jawOpen at frame t * 30, within 0.6 frames.

    Tolerance: the estimators err by far less. The click's time is the sub-sample vertex of a
    symmetric 31-sample pulse (the resamplers are linear-phase, so the pulse stays symmetric):
    under 1 sample = 0.002 frames; the crop's first sample is round(offset * 16000 / 30):
    1/1067 frame; the jawOpen peak is the parabola vertex of a bump of sigma 0.9 frames (0.78
    at speed 1.15, linearly interpolated): biased by up to ~0.1 frame (measured <= 0.1). The
    failures this catches are a frame or more: an offset applied to one stream only or off by
    one, audio cropped from the unscaled position (many frames), animation not sped up (drift
    up to 0.15 frames per frame). A one-frame error shows as >= 0.9 > 0.6.
    """
    aug = SPEED if speed else None
    loader = make(backend, clicks, batch_size=CLICK_TAKES, shuffle=True, seed=5, augment=aug)
    errors, per_sample = [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for key, wav, arkit, p in samples(loader):
            take = int(re.fullmatch(r"\d{6}_take(\d)_0000", key).group(1))
            s = p["speed"] if speed else 1.0
            assert (0.85 <= s <= 1.15) if speed else "speed" not in p
            s0 = start_sample(p["offset"], RATE, FPS)
            jaw = arkit[:, JAW]
            expected = click_samples(take) / s - s0  # where they should be in the crop's audio
            # nothing but the clicks: the audio is silent away from where they should be
            away = np.abs(np.arange(CLIP)[:, None] - expected[None, :]).min(1) > 400
            assert np.abs(wav[away]).max() < 0.02, (key, p)
            checked = 0
            for n, at in zip(click_samples(take), expected, strict=True):
                if not 5 <= at * FPS / RATE <= FRAMES - 5:
                    continue
                lo = int(at) - 300
                j = lo + int(np.argmax(wav[lo : lo + 600]))
                assert wav[j] > 0.5, (key, n, "no click where the drawn crop puts it")
                t = sub_peak(wav, j) / RATE
                assert abs(t * RATE - at) < 2, (key, n, t * RATE, at)
                f = int(round(t * FPS))
                k = f - 3 + int(np.argmax(jaw[f - 3 : f + 4]))
                assert jaw[k] > 0.3, (key, n, "no jawOpen bump near the click")
                err = t * FPS - sub_peak(jaw, k)
                assert abs(err) <= CLICK_TOLERANCE, (key, p, t * FPS, err)
                errors.append(err)
                checked += 1
            assert checked >= 4, (key, p)  # a 10 s crop holds 5-6 clicks every 1.7 s
            per_sample.append(s)
    assert len(errors) >= 3 * CLICK_TAKES * 4
    if speed:
        assert max(per_sample) - min(per_sample) > 0.1  # the speeds really varied
    errors = np.array(errors)
    record_property("click_error_frames", [len(errors), errors.min(), errors.max()])


# ---------------------------------------------------------------- 3. sped-up animation


@pytest.mark.parametrize("aug", [SPEED, ALL_AUG], ids=["speed", "all"])
@pytest.mark.parametrize("backend", ALL)
def test_sped_up_animation_is_the_source_at_scaled_times(
    segs, segs_members, backend, aug, record_property
):
    """Frame i of a sped-up crop is the segment linearly interpolated at (offset + i) * speed,
    with the float32 speed the batch reports, within 1e-4 (measured <= 1.2e-5)."""
    ref = segs_members["train"]
    loader = make(backend, segs, batch_size=4, shuffle=True, seed=12, augment=aug)
    grid = np.arange(SEGMENT_FRAMES)
    worst, speeds = 0.0, []
    for key, wav, arkit, p in samples(loader):
        s, o = p["speed"], p["offset"]
        assert 0.85 <= s <= 1.15 and 0 <= o <= max_offset(SEGMENT_FRAMES, FRAMES, s, True)
        t = (o + np.arange(FRAMES)) * np.float64(np.float32(s))
        seg = ref.arkit[key]
        want = np.stack([np.interp(t, grid, seg[:, j]) for j in range(52)], 1)
        assert arkit.shape == (FRAMES, 52) and wav.shape == (CLIP,)
        err = float(np.abs(arkit - want).max())
        worst = max(worst, err)
        assert err <= 1e-4, (key, p, err)
        # and not the unscaled crop: speed moved the animation by frames
        if abs(s - 1) > 0.02 and o + FRAMES <= SEGMENT_FRAMES:
            assert np.abs(arkit - seg[o : o + FRAMES]).max() > 1e-2, (key, p)
        speeds.append(s)
    assert len(speeds) == 8 and max(speeds) - min(speeds) > 0.05
    record_property("max_abs_error", worst)


# ---------------------------------------------------------------- 4. gain and noise


@pytest.mark.parametrize("backend", ALL)
def test_gain_scales_audio_and_leaves_animation(segs, segs_members, backend):
    ref = segs_members["train"]
    loader = make(
        backend, segs, batch_size=4, shuffle=True, seed=13, augment={"gain_db": [-12, 12]}
    )
    gains = []
    for key, wav, arkit, p in samples(loader):
        assert set(p) == {"offset", "gain_db"} and -12 <= p["gain_db"] <= 12
        plain_wav, plain_arkit = ref.crop(key, p["offset"])
        if backend == "torch":
            assert np.array_equal(arkit, plain_arkit)
        else:
            np.testing.assert_allclose(arkit, plain_arkit, rtol=0, atol=1e-6)
        want = plain_wav.astype(np.float64) * 10 ** (p["gain_db"] / 20)
        np.testing.assert_allclose(wav, want, rtol=1e-6, atol=1e-12, err_msg=f"{key} {p}")
        gains.append(p["gain_db"])
    assert max(gains) - min(gains) > 6  # drawn per sample


@pytest.mark.parametrize("backend", ALL)
def test_noise_has_the_drawn_snr_and_leaves_animation(segs, segs_members, backend, record_property):
    """The measured SNR is within 0.3 dB of the drawn one. The noise's RMS over 160000
    Gaussian samples has a relative spread of 1/sqrt(2 * 160000) = 0.18%, 0.015 dB; float32
    rounding of signal + noise adds ~1e-7 of the signal, nothing next to noise at <= 30 dB. So
    0.3 dB is 20 standard deviations, and still catches noise scaled by a wrong RMS (before the
    gain, of the whole segment: dBs), amplitude vs power (a factor 2 in dB) or a wrong sign."""
    ref = segs_members["train"]
    loader = make(backend, segs, batch_size=4, shuffle=True, seed=14, augment={"snr_db": [5, 30]})
    errors, noises = [], []
    for key, wav, arkit, p in samples(loader):
        assert set(p) == {"offset", "snr_db"} and 5 <= p["snr_db"] <= 30
        plain_wav, plain_arkit = ref.crop(key, p["offset"])
        if backend == "torch":
            assert np.array_equal(arkit, plain_arkit)
        else:
            np.testing.assert_allclose(arkit, plain_arkit, rtol=0, atol=1e-6)
        noise = wav.astype(np.float64) - plain_wav
        rms_signal = np.sqrt(np.mean(plain_wav.astype(np.float64) ** 2))
        rms_noise = np.sqrt(np.mean(noise**2))
        snr = 20 * np.log10(rms_signal / rms_noise)
        errors.append(snr - p["snr_db"])
        assert abs(snr - p["snr_db"]) <= 0.3, (key, p, snr)
        # white Gaussian noise: zero mean, kurtosis 3, not the signal
        z = noise / rms_noise
        assert abs(z.mean()) < 0.02 and abs(np.mean(z**4) - 3) < 0.1
        assert abs(np.corrcoef(noise, plain_wav)[0, 1]) < 0.02
        noises.append(noise)
    assert abs(np.corrcoef(noises[0], noises[1])[0, 1]) < 0.02  # fresh noise per sample
    record_property("snr_error_db", [min(errors), max(errors)])


@pytest.fixture(scope="module")
def windows(noval_dataset) -> Path:
    return noval_dataset


@pytest.mark.parametrize("backend", ALL)
def test_gain_on_plain_windows_never_crops(windows, backend):
    """Without segments there is one crop only: offset 0, the whole window, scaled."""
    ref = Members(windows, "train")
    loader = make(backend, windows, batch_size=2, augment={"gain_db": [-6, 6]})
    assert loader.crops
    for key, wav, arkit, p in samples(loader):
        assert p["offset"] == 0
        assert np.array_equal(arkit, ref.arkit[key])
        want = ref.wav[key].astype(np.float64) * 10 ** (p["gain_db"] / 20)
        np.testing.assert_allclose(wav, want, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- 4b. the speed change's audio

TONE_AMPLITUDE = 0.25
TONES = (1000.0, 3000.0, 6500.0, 7000.0)  # Hz, summed in every take
TONE_SEGMENT, TONE_WINDOW = 96, 60  # frames: 3.2 s segments, 2 s windows


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("tones_in")
    t = np.arange(int(3.3 * RATE)) / RATE
    for k in range(4):
        phases = 0.7 * k + np.arange(len(TONES))
        audio = sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(TONES, phases, strict=True))
        with wave.open(str(src / f"take{k}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(np.round(TONE_AMPLITUDE * audio * 32767).astype("<i2").tobytes())
        frames = np.arange(int(3.3 * FPS))
        anim = np.tile((0.5 + 0.4 * np.sin(frames / 7.0 + k))[:, None], (1, 52))
        np.save(src / f"take{k}.npy", anim.astype(np.float32))
    out = tmp_path_factory.mktemp("tones") / "ds"
    build(
        out,
        *("--input", str(src), "--npy-fps", str(FPS), "--val-fraction", "0"),
        *("--segment-seconds", "3.2", "--window-seconds", "2"),
    )
    m = load_manifest(out)
    assert (m.segment_frames, m.frames) == (TONE_SEGMENT, TONE_WINDOW)
    assert m.num_samples("train") >= 4
    return out


def tone_amplitude(y: np.ndarray, f: float) -> float:
    """The amplitude of the sine at ``f`` Hz in ``y`` (least squares on a cosine and a sine)."""
    n = np.arange(len(y))
    basis = np.stack([np.cos(2 * np.pi * f * n / RATE), np.sin(2 * np.pi * f * n / RATE)], 1)
    coef = np.linalg.lstsq(basis, y.astype(np.float64), rcond=None)[0]
    return float(np.hypot(*coef))


@pytest.mark.parametrize("speeds", [(0.85, 0.9), (1.45, 1.55)], ids=["slower", "faster"])
@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_speed_keeps_the_passband_and_removes_the_rest(tones, backend, speeds, record_property):
    """The speed change's audio is band-limited at the lower of the two Nyquists
    (``pipeline.loaders.augment.speed_audio``: kept below 0.92 of it, removed above 0.98), in both
    loaders. Each source tone at f Hz plays at f * speed: a tone below the band limit keeps its
    amplitude within 1% (0.09 dB); one above it (faster: 6.5 and 7 kHz are over 8 kHz / speed)
    must not fold back into the audio at 16 kHz - f * speed, nor may a slowed tone's image at
    (16 kHz - f) * speed appear: what is left of either is under 1% of the tone (-40 dB).
    A resampler that filters at the source's Nyquist only folds the faster tones back at
    nearly their full amplitude."""
    lo, hi = speeds
    loader = make(backend, tones, batch_size=4, shuffle=True, seed=9, augment={"speed": [lo, hi]})
    kept, left = [], []
    for _key, wav, _, p in samples(loader):
        s = p["speed"]
        assert lo <= s <= hi and wav.shape == (2 * RATE,)
        limit = min(1.0, 1.0 / s) * RATE / 2  # the band limit, in source Hz
        for f in TONES:
            if f < 0.92 * limit:
                amp = tone_amplitude(wav, f * s)
                assert abs(amp / TONE_AMPLITUDE - 1) < 0.01, (backend, s, f, amp)
                kept.append(amp / TONE_AMPLITUDE)
            else:
                assert f > 0.98 * limit, (s, f)  # the tones lie clear of the transition band
            # where the tone's fold or image would land, if it is inside the audio's band
            ghost = RATE - f * s if f * s > RATE / 2 else (RATE - f) * s
            if ghost < RATE / 2 - 50:
                amp = tone_amplitude(wav, ghost)
                assert amp < 0.01 * TONE_AMPLITUDE, (backend, s, f, ghost, amp)
                left.append(amp / TONE_AMPLITUDE)
    assert len(kept) >= 8 and len(left) >= 8
    record_property("kept_min_max", [min(kept), max(kept)])
    record_property("left_max", max(left))


@pytest.mark.parametrize("speeds", [(0.85, 1.15), (1.2, 1.37), (1.0, 1.0)])
def test_both_loaders_speed_up_the_audio_alike(short, speeds, record_property):
    """On the same crops at the same speeds, the DALI graph's audio is the torch loader's
    (``pipeline.loaders.augment.speed_audio``, soxr VHQ) within SPEED_TOLERANCE (3%) of its RMS, on
    the synthetic corpus, whose noise reaches the top of the band (measured: at most 2%).
    Speed 1 leaves the audio untouched in both: the plain crop (DALI's resampler at scale 1
    to float rounding)."""
    aug = {"speed": list(speeds)}
    kw = dict(batch_size=N_SHORT, shuffle=True, seed=4, augment=aug)
    dali = {k: (w, p) for k, w, _, p in samples(make("dali-cpu", short, **kw))}
    torch_ = {k: (w, p) for k, w, _, p in samples(make("torch", short, **kw))}
    assert dali.keys() == torch_.keys() and len(dali) == N_SHORT
    ref = Members(short, "train") if speeds == (1.0, 1.0) else None
    distances = []
    for key, (a, pa) in dali.items():
        b, pb = torch_[key]
        assert pa == pb, key  # the same crop and speed
        d = float(np.sqrt(np.mean((a - b) ** 2.0)) / np.sqrt(np.mean(b**2.0)))
        assert d <= SPEED_TOLERANCE, (key, pa, d)
        distances.append(d)
        if ref is not None:
            window = SHORT["window"] * RATE // FPS
            plain, _ = ref.crop(key, pa["offset"], window, SHORT["window"])
            assert np.array_equal(b, plain), key
            np.testing.assert_allclose(a, plain, rtol=0, atol=1e-6, err_msg=key)
    record_property("rms_distance_max", max(distances))


def test_augmented_epochs_raise_no_dali_warning(segs):
    """Every epoch builds a pipeline; none may warn (DALI warns of an external source output
    the graph leaves unused: the draws of augmentations that are off)."""
    import warnings

    loader = make("dali-cpu", segs, batch_size=4, augment={"gain_db": [-6, 6]}, with_params=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert len(list(loader)) == 2
    assert [str(w.message) for w in caught if "external source" in str(w.message)] == []


# ---------------------------------------------------------------- 5. same distributions


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    x = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, x, side="right") / len(a)
    cdf_b = np.searchsorted(b, x, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def test_ks_statistic_on_known_cases():
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0
    assert ks_statistic([0, 0, 0], [1, 1, 1]) == 1
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    assert ks_statistic(np.arange(10), np.arange(10) + 0.5) == pytest.approx(0.1)


SHORT = dict(segment=84, window=60)  # 2.8 s segments, 2 s windows
N_SHORT, EPOCHS_SHORT = 36, 8  # 288 samples per backend
# KS bound for n = m = 288: P(D > d) ~ 2 exp(-2 d^2 n m / (n + m)) = 2 exp(-288 d^2), so
# 0.2 is exceeded by chance with probability ~2e-5 (less still for the discrete offsets).
KS_BOUND = 0.2
PARAMS = ("offset", "gain_db", "snr_db", "speed")


@pytest.fixture(scope="module")
def short(segments_dataset) -> Path:
    m = load_manifest(segments_dataset)
    assert (m.segment_frames, m.frames) == (SHORT["segment"], SHORT["window"])
    assert m.num_samples("train") == N_SHORT
    return segments_dataset


def draws(data: Path, backend: str, aug: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """What ``EPOCHS_SHORT`` epochs drew, per parameter (offset, and those ``aug`` enables)."""
    loader = make(backend, data, batch_size=N_SHORT, shuffle=True, seed=seed, augment=aug)
    out: dict[str, list] = {n: [] for n in ("offset", *aug)}
    for _ in range(EPOCHS_SHORT):
        for b in loader:
            assert set(b) == {"wav", "arkit", "key", *out}
            for n in out:
                out[n] += b[n].tolist()
    return {n: np.array(v) for n, v in out.items()}


@pytest.fixture(scope="module")
def all_draws(short) -> dict[str, dict[str, np.ndarray]]:
    return {b: draws(short, b, ALL_AUG) for b in ("dali-gpu", "torch")}


@pytest.mark.slow
def test_both_backends_draw_from_the_same_distributions(all_draws, record_property):
    """256 draws per backend with everything on: per parameter the two-sample KS statistic
    is below KS_BOUND, every range is spanned, and each offset fits its own speed."""
    d, t = all_draws["dali-gpu"], all_draws["torch"]
    seg, win = SHORT["segment"], SHORT["window"]
    for got in (d, t):
        assert len(got["offset"]) == N_SHORT * EPOCHS_SHORT
        # every range is spanned: nothing clipped or ignored
        for name in ("gain_db", "snr_db", "speed"):
            lo, hi = ALL_AUG[name]
            v = got[name]
            assert lo <= v.min() < lo + 0.05 * (hi - lo) and hi - 0.05 * (hi - lo) < v.max() <= hi
        # each offset fits its own speed, and slower samples reach past speed 1's last crop
        tops = np.floor(seg / got["speed"] + 1e-4) - win - 1
        assert (got["offset"] >= 0).all() and (got["offset"] <= tops).all()
        assert got["offset"].max() > max_offset(seg, win, 1.0, False)
        assert got["offset"].max() <= max_offset(seg, win, 0.85, True)
        assert np.corrcoef(got["offset"], got["speed"])[0, 1] < -0.2  # faster: fewer crops
    stats = {name: ks_statistic(d[name], t[name]) for name in PARAMS}
    record_property("ks", stats)
    assert all(v < KS_BOUND for v in stats.values()), stats


@pytest.mark.slow
def test_the_distribution_check_catches_a_backend_that_ignores_a_setting(
    short, all_draws, record_property
):
    """Torch with half the gain and snr ranges, and without speed: the statistics are large,
    and the offsets stay within speed 1's crops, which the range check above refuses (the
    offsets' KS statistic alone barely moves: uniform crops of a fixed segment and of a
    segment sped up by 0.85-1.15 are both spread over about the same frames)."""
    narrow = {"gain_db": [-12, 0], "snr_db": [5, 17.5]}
    t = draws(short, "torch", narrow)
    d = all_draws["dali-gpu"]
    teeth = {n: ks_statistic(d[n], t[n]) for n in ("gain_db", "snr_db", "offset")}
    assert teeth["gain_db"] > 0.35 and teeth["snr_db"] > 0.35, teeth
    assert t["offset"].max() <= max_offset(SHORT["segment"], SHORT["window"], 1.0, False)
    record_property("ks", teeth)


# ---------------------------------------------------------------- 6. determinism and resume


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert set(x) == set(y), i
        for k in x:
            if k == "key":
                assert x[k] == y[k], i
            else:
                assert torch.equal(x[k], y[k]), (i, k)


# two epochs and two resumes per backend: dali-cpu and torch stay in the quick suite
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("dali-gpu", marks=SLOW),
        "dali-cpu",
        "torch",
        pytest.param("torch-workers", marks=SLOW),
    ],
)
def test_augmented_batches_repeat_and_resume_exactly(segs, backend):
    kw = dict(batch_size=2, shuffle=True, seed=15, augment=ALL_AUG)
    if backend == "torch-workers":
        backend, kw["num_workers"] = "torch", 2
    reference = make(backend, segs, **kw)
    assert len(reference) == 4
    straight = list(reference) + list(reference)  # two epochs
    assert set(straight[0]) == {"wav", "arkit", "key", "offset", "gain_db", "snr_db", "speed"}
    same_batches(list(make(backend, segs, **kw)), straight[:4])  # same seed: same batches
    other = list(make(backend, segs, **{**kw, "seed": 16}))
    assert not torch.equal(other[0]["gain_db"], straight[0]["gain_db"])
    assert not torch.equal(straight[0]["gain_db"], straight[4]["gain_db"])  # epochs differ

    for stop in (2, 5):  # inside epoch 0 and inside epoch 1
        first = make(backend, segs, **kw)
        seen = take(first, stop)
        state = first.state_dict()
        assert (state["epoch"], state["batch"]) == divmod(stop, 4)
        resumed = make(backend, segs, **kw)
        resumed.load_state_dict(state)
        rest = []
        while len(seen) + len(rest) < len(straight):
            rest += list(resumed)
        same_batches(seen + rest, straight)


@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_ranks_stay_disjoint_with_augmentation(segs, backend):
    loaders = [
        make(backend, segs, batch_size=2, seed=17, rank=r, world_size=2, augment=ALL_AUG)
        for r in range(2)
    ]
    assert [len(ld) for ld in loaders] == [2, 2]
    for _ in range(2):
        keys = []
        for ld in loaders:
            batches = list(ld)
            assert len(batches) == 2
            keys.append([k for b in batches for k in b["key"]])
        assert len(keys[0]) == len(keys[1]) == 4
        assert not set(keys[0]) & set(keys[1])


@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_ranks_draw_their_own_augmentation(segs, segs_members, backend):
    """Two ranks read different samples; their crops, gains, speeds and noise must be drawn
    independently too, or every global batch holds pairs augmented identically."""
    ref = segs_members["train"]

    def ranks(aug):
        return [
            list(
                samples(
                    make(backend, segs, batch_size=2, seed=17, rank=r, world_size=2, augment=aug)
                )
            )
            for r in range(2)
        ]

    pairs = list(zip(*ranks(ALL_AUG), strict=True))
    assert len(pairs) == 4 and all(a[0] != b[0] for a, b in pairs)
    same_params = sum(a[3] == b[3] for a, b in pairs)
    # the noise itself (gain and speed off, so it is the batch minus the plain crop)
    corr = []
    for (ka, wa, _, pa), (kb, wb, _, pb) in zip(*ranks({"snr_db": [5, 30]}), strict=True):
        noise_a = wa - ref.crop(ka, pa["offset"])[0]
        noise_b = wb - ref.crop(kb, pb["offset"])[0]
        corr.append(float(np.corrcoef(noise_a, noise_b)[0, 1]))
    assert same_params == 0 and max(np.abs(corr)) < 0.02, (
        f"{same_params} of {len(pairs)} same-step sample pairs of the two ranks drew identical "
        f"parameters; noise correlations {np.round(corr, 6).tolist()}"
    )


# ---------------------------------------------------------------- 7. validation is untouched


@pytest.mark.parametrize("backend", ALL)
def test_validation_is_never_cropped_or_augmented(segs, segs_members, backend):
    ref = segs_members["val"]
    assert ref.frames == FRAMES and len(ref.wav) == 2
    loader = make(backend, segs, split="val", batch_size=2, shuffle=False, augment=ALL_AUG)
    assert not loader.crops
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 1
        b = batches[0]
        assert set(b) == {"wav", "arkit", "key", "offset"}  # nothing drawn
        assert b["offset"].dtype == torch.int64 and b["offset"].tolist() == [0, 0]
        assert b["key"] == list(ref.wav)  # unshuffled: file order
        for key, wav, arkit, _ in samples([b]):
            assert np.array_equal(wav, ref.wav[key]) and np.array_equal(arkit, ref.arkit[key])
        epochs.append(b)
    same_batches(epochs[:1], epochs[1:])


# ---------------------------------------------------------------- 8. bad settings are named


@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_bad_augment_settings_are_named(segs, backend):
    with pytest.raises(ConfigError, match="--segment-seconds") as err:
        make(backend, segs, batch_size=4, augment={"speed": [0.5, 2.0]})
    assert "augment.speed" in str(err.value) and "420" in str(err.value)
    with pytest.raises(ConfigError) as err:
        make(backend, segs, batch_size=4, augment={"pitch": [1, 2]})
    assert all(n in str(err.value) for n in ("pitch", "gain_db", "snr_db", "speed"))
    with pytest.raises(ConfigError, match="gain_db"):
        make(backend, segs, batch_size=4, augment={"gain_db": [3, -3]})
    # the largest speed the segments allow is accepted
    top = SEGMENT_FRAMES / (FRAMES + 1)  # 1.3953...
    loader = make(backend, segs, batch_size=4, augment={"speed": [top - 0.01, top]})
    for _key, wav, arkit, p in samples(loader):  # every crop fits at the edge
        assert 0 <= p["offset"] <= max_offset(SEGMENT_FRAMES, FRAMES, p["speed"], True) <= 2
        assert wav.shape == (CLIP,) and np.abs(wav).max() > 0.01 and arkit.shape == (FRAMES, 52)


@pytest.mark.parametrize("segment_frames", [420, 421, 450, 601, 602])
def test_the_suggested_speed_limit_is_accepted(segment_frames):
    """The error's advice ("lower the speed to at most X") must itself pass the check."""
    with pytest.raises(ConfigError, match=r"at most ([\d.]+)") as err:
        Augment(speed=(1.0, 4.0)).check_fits(segment_frames, FRAMES)
    most = float(re.search(r"at most ([\d.]+)", str(err.value)).group(1))
    assert most <= segment_frames / (FRAMES + 1)
    Augment(speed=(1.0, most)).check_fits(segment_frames, FRAMES)  # no error


# ---------------------------------------------------------------- on CUDA (make gpu-check)


def _cuda_batches(
    data: Path, device: str, aug: dict | None, epochs: int = 2, backend: str = "dali"
) -> list[dict]:
    loader = build_loader(
        backend,
        data,
        batch_size=4,
        shuffle=True,
        seed=7,
        device=device,
        augment=aug,
        with_params=True,
        **({"decode": "gpu"} if backend == "dali" else {"num_workers": 0}),
    )
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out += [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in loader]
    return out


@pytest.mark.gpu
def test_gpu_crops_equal_the_cpu_graphs_bit_for_bit(segs):
    """Without augmentation the GPU graph crops exactly as the CPU graph does: the draws are
    made on the host with the same seeds, and slicing is exact."""
    gpu, cpu = _cuda_batches(segs, "cuda", None), _cuda_batches(segs, "cpu", None)
    assert len(gpu) == len(cpu) > 0
    for a, b in zip(gpu, cpu, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["offset"], b["offset"])
        assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"])


@pytest.mark.gpu
def test_gpu_augmentation_equals_the_cpu_graphs_in_distribution(segs, segs_members):
    """With augmentation the values drawn are the same (host draws, same seeds), the GPU's
    arithmetic matches the CPU operators' to float precision, and the noise (the same table
    window, from the table's copy on the GPU) has the drawn SNR (as in
    test_noise_has_the_drawn_snr_and_leaves_animation)."""
    no_noise = {"gain_db": [-12, 12], "speed": [0.85, 1.15]}
    gpu, cpu = _cuda_batches(segs, "cuda", no_noise), _cuda_batches(segs, "cpu", no_noise)
    for a, b in zip(gpu, cpu, strict=True):
        for name in ("offset", "gain_db", "speed"):
            assert torch.equal(a[name], b[name]), name
        torch.testing.assert_close(a["arkit"], b["arkit"], atol=1e-5, rtol=0)
        torch.testing.assert_close(a["wav"], b["wav"], atol=2e-3, rtol=0)
    ref = segs_members["train"]
    for batch in _cuda_batches(segs, "cuda", {"snr_db": [5, 30]}, epochs=1):
        for i, key in enumerate(batch["key"]):
            clean, arkit = ref.crop(key, int(batch["offset"][i]))
            np.testing.assert_allclose(batch["arkit"][i].numpy(), arkit, rtol=0, atol=1e-6)
            noise = batch["wav"][i].numpy().astype(np.float64) - clean
            snr = 20 * np.log10(np.sqrt(np.mean(clean**2)) / np.sqrt(np.mean(noise**2)))
            assert abs(snr - float(batch["snr_db"][i])) <= 0.3, (key, snr)


@pytest.mark.gpu
def test_gpu_noise_is_the_torch_loaders(segs):
    """On CUDA each sample's noise is a window of the table's copy on the GPU
    (``pipeline.loaders.dali_graph.GpuNoise``): the audio is the torch loader's
    (``pipeline.loaders.augment``: the same draws, the same window of ``noise_table``) within
    the tolerance of test_both_loaders_draw_the_same_values_for_each_sample, over two epochs
    (two pipelines, one upload)."""
    aug = {"gain_db": [-12, 12], "snr_db": [5, 30]}
    gpu = _cuda_batches(segs, "cuda", aug)
    ref = _cuda_batches(segs, "cpu", aug, backend="torch")
    assert len(gpu) == len(ref) > 0
    for a, b in zip(gpu, ref, strict=True):
        assert a["key"] == b["key"]
        for name in ("offset", "gain_db", "snr_db"):
            assert torch.equal(a[name], b[name]), name
        torch.testing.assert_close(a["arkit"], b["arkit"], atol=1e-6, rtol=0)
        torch.testing.assert_close(a["wav"], b["wav"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_a_fixed_value_is_a_range_of_one(segs, segs_members, backend):
    """gain_db [3, 3]: every sample gets exactly +3 dB (DALI's uniform refuses an empty range;
    draws are low + (high - low) * U[0, 1))."""
    ref = segs_members["train"]
    loader = make(backend, segs, batch_size=4, shuffle=True, seed=2, augment={"gain_db": [3, 3]})
    for key, wav, _, p in samples(loader):
        assert p["gain_db"] == pytest.approx(3.0, abs=1e-6)
        plain, _ = ref.crop(key, p["offset"])
        np.testing.assert_allclose(wav, plain * 10 ** (3 / 20), rtol=1e-5, atol=1e-7)


def test_the_cuda_graph_augments_on_the_gpu_with_host_draws(segs):
    """The CUDA graph with every augmentation, defined without a GPU: the reader, the external
    source of draws and the per-sample scalar arithmetic stay on the host; the noise windows
    come from an external source on the GPU (views of the table's copy there, so no noise
    crosses from the host per sample); the speed's low-pass, resampling, the crop, the
    animation's resize and the noise's RMS run on the GPU, and the audio and animation come
    out there. It also serializes."""
    from tests.helpers import graph_of, serialized_graph

    m = load_manifest(segs)
    aug = Augment.from_dict(ALL_AUG)
    kw = dict(augment=aug, with_params=True)
    blob = serialized_graph(segs, "gpu", **kw)
    ops, outputs = graph_of(blob)
    devices = {}
    for kind, dev in ops:
        devices.setdefault(kind, set()).add(dev)
    for kind in ("AudioResample", "Filter", "Resize", "Slice", "reductions__RMS", "Reinterpret"):
        assert devices[kind] == {"gpu"}, kind
    assert devices["readers__Webdataset"] == {"cpu"}
    # the 4 values and the speed's low-pass taps from the host, the noise on the GPU
    sources = sorted(dev for kind, dev in ops if kind == "ExternalSource")
    assert sources == ["cpu"] * 5 + ["gpu"], sources
    assert outputs[:2] == ["gpu", "gpu"] and set(outputs[2:]) == {"cpu"}
    # the host draws hold no noise then (drawing them touches no GPU)
    from pipeline.loaders.dali_graph import Draws, GpuNoise

    draws = Draws(np.arange(8), 0, aug, m, "train", 4, GpuNoise(0))
    assert draws.outputs == ["offset", "gain_db", "snr_db", "speed", "lowpass"]
    assert len(draws(0)) == 5
    assert b"ExternalSource" in blob and b"AudioResample" in blob
