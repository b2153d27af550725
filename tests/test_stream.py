"""Streaming inference (``infer.stream``, ``python -m infer --stream``): any chunking gives the
offline frames, each frame comes out at the first push that completes its audio, the tail on
flush, silence and NaN, and the command on stdin and in real time."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infer.cli import main as infer
from infer.stream import Stream
from model import build_model
from pipeline.convert.synthetic import make_take
from train.predict import Predictor

RATE, FPS = 16000, 30.0
KINDS = {
    "sequence": ("sequence", "sequence", {}),
    "sequence-50ms": ("sequence", "sequence", {"lookahead_seconds": 0.05}),
    "sequence-mel": ("sequence", "sequence", {"features": "mel", "lookahead_seconds": 0.1}),
    "first_frame": ("simplified", "first_frame", {}),
}


def speech(seconds: float, seed: int = 5) -> np.ndarray:
    return make_take(77, seed, seconds=seconds)[0].astype(np.float32)


def predictor(kind: str) -> Predictor:
    name, target, kw = KINDS[kind]
    torch.manual_seed(0)
    model = build_model(name, target, n_mels=32, hidden=16, **kw).eval()
    return Predictor(model, target, RATE, FPS, 300, torch.device("cpu"))


def streamed(p: Predictor, audio: np.ndarray, sizes: list[int]) -> np.ndarray:
    """``audio`` pushed in pieces of ``sizes`` (cycled), then flushed."""
    stream, out, at, i = Stream(p), [], 0, 0
    while at < len(audio):
        n = sizes[i % len(sizes)]
        out.append(stream.push(audio[at : at + n]))
        at, i = at + n, i + 1
    out.append(stream.flush())
    return np.concatenate(out)


AUDIO = speech(2.5)
PREDICTORS = {kind: predictor(kind) for kind in KINDS}
OFFLINE = {kind: p.predict(AUDIO, progress=False) for kind, p in PREDICTORS.items()}


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=6, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(st.integers(40, 600), st.integers(600, 16000), st.integers(16000, 160000)),
        min_size=1,
        max_size=12,
    )
)
def test_any_chunking_gives_the_offline_frames(kind, sizes):
    got = streamed(PREDICTORS[kind], AUDIO, sizes)
    assert got.shape == OFFLINE[kind].shape == (75, 52)
    np.testing.assert_allclose(got, OFFLINE[kind], rtol=0, atol=1e-4)


def test_long_audio_streams_as_the_whole_file_followed_by_silence():
    """25 s: the predictor's three overlapping windows, the model on the whole file with
    silence after it, and a stream of 10 s pieces give the same frames."""
    p = PREDICTORS["sequence"]
    audio = speech(25.0, seed=9)
    offline = p.predict(audio, progress=False)
    with torch.no_grad():
        silence = torch.zeros(RATE)
        whole = p.model(torch.cat([torch.from_numpy(audio), silence])[None])[0].numpy()
    assert offline.shape == (750, 52)
    np.testing.assert_allclose(offline, whole[:750], rtol=0, atol=1e-5)
    np.testing.assert_allclose(streamed(p, audio, [160000]), offline, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["sequence", "sequence-50ms", "first_frame"])
def test_a_frame_comes_out_at_the_first_push_that_completes_its_audio(kind):
    """One sample at a time (the offline frames still): frame k comes out of push number
    needs(k), never later, and that is within the model's lookahead of the frame's time."""
    p = PREDICTORS[kind]
    stream = Stream(p)
    audio = AUDIO[:12000]
    came, frames = [], []  # the samples in when each frame came out
    for n in range(1, len(audio) + 1):
        frames.append(stream.push(audio[n - 1 : n]))
        came += [n] * len(frames[-1])
    assert len(came) >= 10
    got = np.concatenate(frames)
    np.testing.assert_allclose(got, OFFLINE[kind][: len(got)], rtol=0, atol=1e-4)
    look = stream.lookahead_seconds * RATE
    for k, n in enumerate(came):
        assert n == stream.needs(k)
        assert n - k * RATE / FPS <= look + 1e-6
    want = {"sequence": 0.2925, "sequence-50ms": 0.0492, "first_frame": 0.2961}[kind]
    assert stream.lookahead_seconds == pytest.approx(want, abs=1e-4)
    if kind == "sequence-50ms":  # 50 ms: frame k is out by sample k / fps + 800
        assert all(n <= k * RATE / FPS + 0.05 * RATE for k, n in enumerate(came))


def test_flush_gives_the_tail_once():
    p = PREDICTORS["sequence"]
    stream = Stream(p)
    early = stream.push(AUDIO)
    assert 0 < len(early) < 75  # the last lookahead's frames wait for what follows
    tail = stream.flush()
    assert len(early) + len(tail) == 75 == p.frames_for(len(AUDIO))
    np.testing.assert_allclose(np.concatenate([early, tail]), OFFLINE["sequence"], atol=1e-4)
    with pytest.raises(RuntimeError, match="flushed"):
        stream.push(AUDIO[:10])
    with pytest.raises(RuntimeError, match="flushed"):
        stream.flush()
    empty = Stream(p).flush()  # no audio: the one frame offline gives for none
    np.testing.assert_allclose(empty, p.predict(np.zeros(0, np.float32)), atol=1e-4)


def test_silence_nan_and_int16():
    p = PREDICTORS["sequence-50ms"]
    quiet = streamed(p, np.zeros(RATE, np.float32), [533])
    assert quiet.shape == (30, 52) and np.isfinite(quiet).all()
    np.testing.assert_allclose(quiet, p.predict(np.zeros(RATE, np.float32)), atol=1e-4)

    stream = Stream(p)
    first = stream.push(AUDIO[:8000])
    bad = AUDIO[8000:9000].copy()
    bad[17] = np.nan
    with pytest.raises(
        ValueError, match=r"the first at sample 8017 of the stream\); it was not taken"
    ):
        stream.push(bad)
    with pytest.raises(ValueError, match="mono"):
        stream.push(np.zeros((2, 100), np.float32))
    got = np.concatenate([first, stream.push(AUDIO[8000:]), stream.flush()])
    np.testing.assert_allclose(got, OFFLINE["sequence-50ms"], atol=1e-4)  # as if never sent

    pcm = np.round(AUDIO * 20000).astype(np.int16)
    as_int = streamed(p, pcm, [4000])
    np.testing.assert_allclose(as_int, p.predict(pcm.astype(np.float32) / 32768), atol=1e-4)


@pytest.mark.parametrize(
    ("frames", "fps", "lookahead"),
    [(200, 30.0, None), (250, 30.0, None), (200, 24.0, None), (60, 30.0, 0.05)],
)
def test_windows_of_any_length_start_on_the_grid_and_give_the_whole_files_frames(
    frames, fps, lookahead
):
    """Windows of 200 or 250 frames, at 24 fps, or of 2 s with a 0.05 s model (whose history
    is 0.57 s): each window starts on the reach's grid, the margins cover the reach, and the
    frames of 13 s are the whole file's, followed by silence, and a stream's."""
    torch.manual_seed(1)
    model = build_model(
        "sequence",
        "sequence",
        n_mels=32,
        hidden=16,
        frames=frames,
        fps=fps,
        lookahead_seconds=lookahead,
    ).eval()
    p = Predictor(model, "sequence", RATE, fps, frames, torch.device("cpu"))
    audio = speech(13.0, seed=2)
    offline = p.predict(audio)
    with torch.no_grad():
        whole = model(torch.cat([torch.from_numpy(audio), torch.zeros(RATE)])[None])[0].numpy()
    assert offline.shape == (p.frames_for(len(audio)), 52)
    np.testing.assert_allclose(offline, whole[: len(offline)], rtol=0, atol=1e-5)
    np.testing.assert_allclose(streamed(p, audio, [5000]), offline, rtol=0, atol=1e-4)
    short = speech(1.0, seed=3)  # less than a window, whatever the margins
    np.testing.assert_allclose(streamed(p, short, [700]), p.predict(short), rtol=0, atol=1e-4)


def test_bad_pieces_and_options_are_refused():
    stream = Stream(PREDICTORS["sequence"])
    for piece in (np.zeros(10, np.int32), [1, 2, 3], np.zeros(10, np.uint8)):
        with pytest.raises(ValueError, match="int16 PCM or float audio"):
            stream.push(piece)
    assert stream.samples == 0
    for bad in ("nan", "inf", "0", "20000"):
        with pytest.raises(SystemExit):
            infer(["--checkpoint", "x.pt", "--stream", "--chunk-ms", bad])
    with pytest.raises(SystemExit):
        infer(["--checkpoint", "x.pt", "--stream", "--batch-size", "0"])


# ------------------------------------------------------------------ the command
def test_stream_command_reads_pcm_on_stdin_and_writes_a_csv_line_per_frame(checkpoint):
    pcm = np.round(speech(1.5, seed=3) * 20000).astype(np.int16)
    run = subprocess.run(
        [sys.executable, "-m", "infer", "--checkpoint", str(checkpoint), "--stream"],
        input=pcm.astype("<i2").tobytes(),
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode()
    lines = run.stdout.decode().splitlines()
    assert lines[0].split(",")[:4] == ["frame", "seconds", "eyeBlinkLeft", "eyeLookDownLeft"]
    rows = np.array([[float(x) for x in line.split(",")] for line in lines[1:]])
    want = Predictor.from_checkpoint(checkpoint, "cpu").predict(pcm.astype(np.float32) / 32768)
    assert rows.shape == (45, 54)
    assert rows[:, 0].tolist() == list(range(45))
    np.testing.assert_allclose(rows[:, 1], np.arange(45) / FPS, atol=1e-4)
    np.testing.assert_allclose(rows[:, 2:], want, atol=1e-5)  # printed to 5 decimals
    assert "lookahead 292.5 ms + chunk 33.3 ms + compute" in run.stderr.decode()


def test_realtime_plays_a_file_and_no_frame_precedes_its_audio(checkpoint, tmp_path, capsys):
    audio = speech(1.2, seed=4)
    sf.write(tmp_path / "speech.wav", audio, RATE, subtype="FLOAT")
    args = ["--checkpoint", str(checkpoint), "--stream", "--realtime", str(tmp_path / "speech.wav")]
    assert infer([*args, "--format", "json", "--chunk-ms", "20"]) == 0
    out, err = capsys.readouterr()
    docs = [json.loads(line) for line in out.splitlines()]
    p = Predictor.from_checkpoint(checkpoint, "cpu")
    want = p.predict(audio)
    assert [d["frame"] for d in docs] == list(range(36))
    got = np.array([list(d["blendshapes"].values()) for d in docs])
    np.testing.assert_allclose(got, want, atol=1e-5)
    stream = Stream(p)
    live = [d for d in docs if "delay_ms" in d]
    assert len(live) >= 20  # the rest came with the flush at the end of the file
    for d in live:  # a frame is written only after the audio it reads was played
        k = d["frame"]
        assert d["delay_ms"] >= (stream.needs(k) / RATE - k / FPS) * 1000 - 0.01
    assert "frames live: delay median" in err and "lookahead 292.5 ms + chunk 20.0 ms" in err
