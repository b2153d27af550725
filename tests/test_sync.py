"""Audio and animation offset by a constant: each take's lag measured, judged against the
dataset's median, and re-timed on request.

The takes are the synthetic corpus' (its audio's loudness and its mouth come from the same
hidden controls, with no lag between them), written as a 16 kHz WAV and a 60 fps ``.npy``;
a shifted take has its audio moved by a known offset and padded back to its length with room
noise, so both files keep the same length. A window's alignment is measured on the real bytes
the shards hold: its audio is found in the unshifted take's audio (the waveform matched to
the sample) and its frames in the unshifted take's frames (matched exactly); the difference is
how far the window's animation sits from its sound.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.arkit import INDEX
from pipeline import make_shards
from pipeline.convert import synthetic
from pipeline.convert.sync import estimate_lag
from pipeline.convert.windows import PreparedTake, resample_frames, retime
from tests.helpers import parsed
from train.take_lags import take_lags

RATE, FPS = 16000, 30
SHIFTS = (0.033, -0.033, 0.067, -0.067, 0.1, -0.1, 0.2, -0.2, 0.3, -0.3)
TAKE_SECONDS = 4.0
WINDOW = ["--window-seconds", "1", "--val-fraction", "0"]


def shifted(audio: np.ndarray, seconds: float, seed: int) -> np.ndarray:
    """``audio`` moved ``seconds`` later (earlier if negative), padded with room noise to the
    same length."""
    k = int(round(seconds * RATE))
    pad = (0.003 * np.random.default_rng([seed, 5]).standard_normal(abs(k))).astype(np.float32)
    if k >= 0:
        return np.concatenate([pad, audio[: len(audio) - k]])
    return np.concatenate([audio[-k:], pad])


def frames_of(times: np.ndarray, values: np.ndarray, seconds: float) -> np.ndarray:
    return resample_frames(times, values, FPS, int(seconds * FPS))


# ---------------------------------------------------------------- the estimate


def test_each_shift_is_measured_within_10_ms():
    errors = []
    for i in range(3):
        audio, times, values = synthetic.make_take(0, i, 10.0)
        frames = frames_of(times, values, 10.0)
        for s in (0.0, *SHIFTS):
            lag = estimate_lag(shifted(audio, s, i), RATE, frames, FPS)
            assert lag.lag is not None, (i, s, lag)
            assert lag.peak > 0.5 and lag.margin > 0.2, (i, s, lag)
            errors.append(lag.lag - s)
    assert np.abs(errors).max() < 0.010, np.round(np.array(errors) * 1000, 1)


def test_takes_that_cannot_tell_are_unknown_with_the_reason():
    audio, times, values = synthetic.make_take(0, 1, 10.0)
    frames = frames_of(times, values, 10.0)
    t = np.arange(len(audio)) / RATE
    rng = np.random.default_rng(3)
    loud = np.repeat(rng.random(50), len(audio) // 50)  # a beat every 0.2 s
    music = (0.3 * loud * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(
        np.float32
    )
    cases = {
        "silence": (np.zeros_like(audio), frames, "too little sound"),
        "music": (music, frames, "no clear peak"),
        "still mouth": (audio, np.repeat(frames[:1], len(frames), 0), "too little mouth motion"),
        "short": (audio[: RATE * 3 // 2], frames[:45], "too short (1.50 s"),
    }
    for name, (a, f, why) in cases.items():
        lag = estimate_lag(a, RATE, f, FPS)
        assert lag.lag is None and lag.unknown.startswith(why), (name, lag)


def test_retime_cuts_whole_frames_and_samples_to_the_overlap():
    audio = np.arange(48000, dtype=np.float32)  # sample i holds i
    frames = np.repeat(np.arange(90, dtype=np.float32)[:, None], 52, 1)  # frame k holds k
    take = PreparedTake(audio, frames, RATE, FPS, [(1.0, 1.5)], 0.1)
    for shift, k, s in ((0.1, 0, 1600), (-0.1, 3, 0), (-0.05, 2, 267), (0.0, 0, 0)):
        got = retime(take, shift)
        assert got.frames[0, 0] == k and got.audio[0] == s, shift
        # frame j sits on sample round(j * rate / fps), at the same instant of the take
        for j in (0, 10, got.total_frames - 1):
            sample = got.audio[round(j * RATE / FPS)]
            assert abs((sample / RATE - shift) - got.frames[j, 0] / FPS) < 0.5 / RATE + 1e-9
        assert got.total_frames == min(90 - k, int((48000 - s) / RATE * FPS + 1e-6))
        assert got.gaps == [(1.0 - k / FPS, 1.5 - k / FPS)]


# ---------------------------------------------------------------- make_shards on a corpus


def write_take(folder: Path, stem: str, seed: int, seconds: float, **how) -> dict:
    """A synthetic take as a WAV and a 60 fps npy: ``shift`` (audio moved that late),
    ``lead_in`` / ``tail`` (that much room noise before / after the audio), ``audio`` (replace
    it), ``still``
    (a mouth that never moves). Returns the unshifted take (audio, 30 fps frames)."""
    folder.mkdir(parents=True, exist_ok=True)
    audio, times, values = synthetic.make_take(7, seed, seconds)
    frames = frames_of(times, values, seconds)
    a = shifted(audio, how.get("shift", 0.0), seed)
    if "lead_in" in how:
        noise = 0.003 * np.random.default_rng([seed, 6]).standard_normal(int(how["lead_in"] * RATE))
        a = np.concatenate([noise.astype(np.float32), a])
    if "tail" in how:
        noise = 0.003 * np.random.default_rng([seed, 6]).standard_normal(int(how["tail"] * RATE))
        a = np.concatenate([a, noise.astype(np.float32)])
    if "audio" in how:
        a = how["audio"](a)
    if how.get("still"):
        values = np.repeat(values[:1], len(values), 0)
    sf.write(str(folder / f"{stem}.wav"), np.round(a * 32767).astype(np.int16), RATE)
    np.save(folder / f"{stem}.npy", values)
    return {"audio": audio, "frames": frames, "shift": how.get("shift", how.get("lead_in", 0))}


def misalignment(window: dict, take: dict) -> float:
    """Seconds by which the window's animation sits before its sound (0: aligned): its audio
    found in the unshifted take's audio, its frames in the unshifted take's frames."""
    pcm = window["pcm"].astype(np.float64) / 32768
    ref = take["audio"].astype(np.float64)
    probe = pcm[RATE // 10 : RATE // 10 + RATE // 4]  # a quarter second
    size = 1 << int(np.ceil(np.log2(len(ref) + len(probe))))
    dots = np.fft.irfft(np.fft.rfft(ref, size) * np.conj(np.fft.rfft(probe, size)), size)
    dots = dots[: len(ref) - len(probe) + 1]  # dots[j] = sum_i ref[j + i] * probe[i]
    energy = np.concatenate([[0.0], np.cumsum(ref * ref)])
    energy = energy[len(probe) :] - energy[: len(energy) - len(probe)]
    at_audio = (int(np.argmax(dots / np.sqrt(np.maximum(energy, 1e-12)))) - RATE // 10) / RATE
    arkit = window["arkit"]
    starts = range(len(take["frames"]) - len(arkit) + 1)
    diffs = [np.abs(take["frames"][k : k + len(arkit)] - arkit).max() for k in starts]
    k = int(np.argmin(diffs))
    assert diffs[k] < 1e-6, "the window's frames are not the take's frames"
    return at_audio - k / FPS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    """4 clean takes, 4 shifted ones (equal lengths), a 0.5 s lead-in, 0.3 s of extra audio at
    the end, and takes that cannot
    tell a lag (silence, a still mouth, too short), each of 4 s (the short one 1.5 s)."""
    src = tmp_path_factory.mktemp("sync") / "in"
    takes = {f"clean{i}": write_take(src, f"clean{i}", i, TAKE_SECONDS) for i in range(4)}
    for i, s in enumerate((0.067, -0.1, 0.2, -0.3)):
        takes[f"shift{i}"] = write_take(src, f"shift{i}", 10 + i, TAKE_SECONDS, shift=s)
    takes["leadin"] = write_take(src, "leadin", 20, TAKE_SECONDS, lead_in=0.5)
    takes["tail"] = write_take(src, "tail", 24, TAKE_SECONDS, tail=0.3)
    takes["silent"] = write_take(src, "silent", 21, TAKE_SECONDS, audio=np.zeros_like)
    takes["still"] = write_take(src, "still", 22, TAKE_SECONDS, still=True)
    takes["short"] = write_take(src, "short", 23, 1.5)
    return src, takes


def convert(src: Path, out: Path, *flags: str) -> int:
    args = ["--input", str(src), "--out", str(out), "--workers", "2", "--quiet", *WINDOW]
    return make_shards.main([*args, *flags])


def sync_lines(out: Path) -> dict[str, dict]:
    lines = (out / "sync.jsonl").read_text().splitlines()
    return {Path(d["file"]).stem: d for d in map(json.loads, lines)}


def rejected(out: Path) -> dict[str, str]:
    lines = (out / "rejects.jsonl").read_text().splitlines()
    return {Path(d["file"]).stem: d["reason"] for d in map(json.loads, lines)}


def test_offset_takes_are_rejected_with_their_lag_and_clean_ones_kept(corpus, tmp_path):
    src, takes = corpus
    out = tmp_path / "out"
    assert convert(src, out) == 0
    lines, rejects = sync_lines(out), rejected(out)
    assert set(rejects) == {"shift0", "shift1", "shift2", "shift3", "leadin", "tail"}
    for name, line in lines.items():
        if name.startswith(("clean", "shift")):
            assert abs(line["lag"] - takes[name]["shift"]) < 0.010, (name, line)
        if name.startswith("shift"):
            assert line["action"] == "rejected" and line["shift"] is None
            lag, reason = line["lag"], rejects[name]
            way = "late" if lag > 0 else "early"
            assert reason.startswith(f"audio {abs(lag) * 1000:.0f} ms {way} against the "), reason
            assert "from the dataset's median lag " in reason and "--fix-sync" in reason
            assert "more than --max-sync-offset 0.05" in reason
    assert [lines[f"clean{i}"]["action"] for i in range(4)] == ["kept"] * 4
    assert "audio is 4.500 s but animation is 4.000 s" in rejects["leadin"]
    assert "--fix-sync converts it" in rejects["leadin"] and "leadin" not in lines
    assert "audio is 4.300 s but animation is 4.000 s" in rejects["tail"]
    for name, why in (
        ("silent", "too little sound"),
        ("still", "too little mouth"),
        ("short", "too short"),
    ):
        assert lines[name]["action"] == "unknown" and lines[name]["lag"] is None
        assert lines[name]["unknown"].startswith(why), lines[name]
    sync = json.loads((out / "manifest.json").read_text())["sync"]
    assert sync["reference"] == "median" and sync["measured_takes"] == 8
    assert abs(sync["reference_seconds"]) < 0.010 and sync["max_sync_offset"] == 0.05
    assert sync["actions"] == {
        "kept": 4,
        "unknown": 3,
        "re-timed": 0,
        "lead-in": 0,
        "tail": 0,
        "rejected": 4,  # the lead-in is rejected for its lengths, unmeasured
    }
    windows = parsed(out)
    names = {Path(w["meta"]["source"]).stem for w in windows}
    assert names == {"clean0", "clean1", "clean2", "clean3", "silent", "still", "short"}
    for w in windows:
        line = lines[Path(w["meta"]["source"]).stem]
        assert w["meta"]["sync"] == {
            "lag": line["lag"],
            "peak": line["peak"],
            "action": line["action"],
            "shift": 0.0,
        }
    svg = (out / "sync.svg").read_text()
    assert svg.startswith("<svg") and "8 takes, 3 unknown" in svg
    assert svg.count('fill="#4c72b0"') >= 5  # the clean takes' bin and one per shifted take
    assert make_shards.main(["--verify", str(out)]) == 0


def test_fix_sync_re_times_them_within_20_ms_and_converts_a_lead_in_and_a_tail(
    corpus, tmp_path, capsys
):
    src, takes = corpus
    out = tmp_path / "out"
    args = ["--input", str(src), "--out", str(out), "--workers", "2", *WINDOW, "--fix-sync"]
    assert make_shards.main(args) == 0
    summary = capsys.readouterr().out
    assert "lag (audio behind animation): median " in summary and "over 8 takes, spread " in summary
    assert "4 re-timed, 1 lead-in, 1 tail" in summary
    lines = sync_lines(out)
    assert not (out / "rejects.jsonl").read_text()
    worst = {}
    for w in parsed(out):
        name = Path(w["meta"]["source"]).stem
        if name.startswith(("clean", "shift", "leadin", "tail")):
            off = misalignment(w, takes[name])
            worst[name] = max(worst.get(name, 0.0), abs(off))
        assert w["meta"]["sync"]["action"] == lines[name]["action"]
    assert set(worst) == {
        *(f"clean{i}" for i in range(4)),
        *(f"shift{i}" for i in range(4)),
        "leadin",
        "tail",
    }
    assert max(worst.values()) <= 0.020, worst
    assert all(worst[f"clean{i}"] == 0.0 for i in range(4))  # untouched
    assert worst["tail"] == 0.0 and worst["leadin"] == 0.0  # cut by the lengths' difference
    for i in range(4):
        assert lines[f"shift{i}"]["action"] == "re-timed"
        assert abs(lines[f"shift{i}"]["shift"] - takes[f"shift{i}"]["shift"]) < 0.010
    assert lines["leadin"]["action"] == "lead-in" and lines["leadin"]["shift"] == 0.5
    assert lines["tail"]["action"] == "tail" and lines["tail"]["shift"] == 0.0


def test_audio_offset_is_applied_exactly_and_a_median_beyond_speech_is_warned(tmp_path, capsys):
    src = tmp_path / "in"
    takes = {f"late{i}": write_take(src, f"late{i}", 30 + i, 3.0, shift=0.2) for i in range(3)}
    assert convert(src, tmp_path / "plain") == 0
    err = capsys.readouterr().err
    found = re.search(
        r"warning: the takes' median lag is \+(\d+) ms .* --audio-offset ([\d.]+) ", err
    )
    assert found and abs(int(found[1]) - 200) < 10, err
    assert abs(float(found[2]) - 0.2) < 0.010, err
    assert convert(src, tmp_path / "fixed", "--audio-offset", "0.2") == 0
    assert "warning" not in capsys.readouterr().err
    for w in parsed(tmp_path / "fixed"):
        assert misalignment(w, takes[Path(w["meta"]["source"]).stem]) == 0.0  # to the sample
        assert w["meta"]["sync"]["shift"] == 0.2 and w["meta"]["sync"]["action"] == "kept"
    assert (
        json.loads((tmp_path / "fixed" / "manifest.json").read_text())["sync"]["audio_offset"]
        == 0.2
    )


def energy_model(wav: np.ndarray) -> np.ndarray:
    """A model of the mouth from the sound alone: jawOpen follows the loudness (dB over 50 dB
    under the loudest frame, scaled to [0, 1]) of each 30 fps frame's audio."""
    n = len(wav) * FPS // RATE
    power = np.array(
        [np.mean(wav[max(0, k * RATE // FPS - 267) : k * RATE // FPS + 267] ** 2) for k in range(n)]
    )
    db = 10 * np.log10(np.maximum(power, power.max() * 1e-5) / (power.max() * 1e-5))
    out = np.zeros((n, 52), np.float32)
    out[:, INDEX["jawopen"]] = db / 50
    return out


def test_the_model_measures_each_takes_lag_and_flags_the_shifted_one(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_take(src, f"clean{i}", 40 + i, TAKE_SECONDS)
    write_take(src, "late", 43, TAKE_SECONDS, shift=0.2)
    assert convert(src, out, "--max-sync-offset", "1") == 0  # every take kept as it is
    lags = take_lags(out, "train", energy_model)
    rows = {Path(r["source"]).stem: r for r in lags["takes"]}
    assert lags["max_sync_offset"] == 1.0 and set(rows) == {"clean0", "clean1", "clean2", "late"}
    assert all(r["samples"] == 4 for r in rows.values())
    for name, r in rows.items():
        want = 0.2 if name == "late" else 0.0
        assert abs(r["lag"] - want) < 0.02, (name, r)
        assert not r["flagged"]  # within the dataset's 1 s
    flagged = take_lags(out, "train", energy_model, max_offset=0.05)["takes"]
    assert [Path(r["source"]).stem for r in flagged if r["flagged"]] == ["late"]
    lags = take_lags(out, "train", lambda wav: np.zeros((len(wav) * FPS // RATE, 52)))
    assert all(r["lag"] is None and not r["flagged"] for r in lags["takes"])  # a flat mouth
