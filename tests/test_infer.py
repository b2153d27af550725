"""``python -m infer``: checkpoints to Live Link CSVs and npys, seams, short inputs, the round
trip through make_shards, the evaluation report's numbers, and bad inputs."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from core.arkit import INDEX, LIVE_LINK_EXTRA, LIVE_LINK_NAMES
from infer.cli import main as infer
from model import build_model
from pipeline import build_loader, make_shards
from pipeline.convert.livelink import read_live_link_csv, write_live_link_csv
from pipeline.convert.synthetic import make_take
from pipeline.shards.manifest import load_manifest
from tests.helpers import SMALL_RUN, read_shards
from train.cli import main as train
from train.predict import Predictor

SMALL = SMALL_RUN


def speech(seconds: float, seed: int = 5) -> np.ndarray:
    return make_take(77, seed, seconds=seconds)[0]


def sequence_predictor(**kw) -> Predictor:
    torch.manual_seed(0)
    m = build_model("sequence", "sequence", n_mels=32, hidden=16, frames=300, fps=30.0)
    return Predictor(m.eval(), "sequence", 16000, 30.0, 300, torch.device("cpu"), **kw)


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(path.open(newline="")))
    return rows[0], rows[1:]


# ------------------------------------------------------------------ the CSV layout
def test_live_link_csv_header_order_timecodes_and_values(tmp_path):
    values = np.tile(np.arange(52, dtype=np.float32) / 100, (130, 1))
    values[0, INDEX["jawopen"]] = 1.7  # out of range: clipped
    write_live_link_csv(tmp_path / "a.csv", values, fps=60)
    header, rows = read_csv(tmp_path / "a.csv")
    assert header == ["Timecode", "BlendShapeCount", *LIVE_LINK_NAMES, *LIVE_LINK_EXTRA]
    # Live Link's own order: JawRight before JawLeft, MouthRight before MouthLeft
    assert header.index("JawRight") < header.index("JawLeft")
    assert header.index("MouthRight") < header.index("MouthLeft")
    assert len(rows) == 130
    assert [r[0] for r in rows[:2]] == ["00:00:00:00.000", "00:00:00:01.000"]
    assert rows[65][0] == "00:00:01:05.000" and rows[129][0] == "00:00:02:09.000"
    assert {r[1] for r in rows} == {"61"}
    for name in ("JawLeft", "MouthRight", "EyeBlinkLeft", "TongueOut"):
        col = header.index(name)
        assert float(rows[5][col]) == pytest.approx(INDEX[name.lower()] / 100, abs=1e-6)
    assert float(rows[0][header.index("JawOpen")]) == 1.0
    assert all(float(x) == 0.0 for x in rows[7][-9:])


# ------------------------------------------------------------------ the command
def test_cli_writes_csv_and_npy_of_the_audio_length(checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    short = speech(2.5)
    stereo = np.stack([short, short], 1)
    # any rate and channel count: 44.1 kHz stereo, resampled as make_shards does
    import soxr

    sf.write(src / "short.wav", soxr.resample(stereo, 16000, 44100), 44100, subtype="FLOAT")
    sf.write(src / "long.flac", speech(23.3, 6), 16000)
    assert infer(["--checkpoint", str(checkpoint), str(src), "--out", str(tmp_path / "out")]) == 0
    for stem, seconds in (("short", 2.5), ("long", 23.3)):
        npy = np.load(tmp_path / "out" / f"{stem}.npy")
        assert npy.dtype == np.float32 and npy.shape[1] == 52
        assert abs(len(npy) - seconds * 30) <= 1
        assert npy.min() >= 0 and npy.max() <= 1
        header, rows = read_csv(tmp_path / "out" / f"{stem}.csv")
        assert abs(len(rows) - seconds * 60) <= 1
        values = np.array([[float(r[header.index(n)]) for n in LIVE_LINK_NAMES] for r in rows])
        # row 2k of the 60 fps CSV is frame k of the 30 fps npy (Live Link order by name)
        apple = np.array([INDEX[n.lower()] for n in LIVE_LINK_NAMES])
        assert np.abs(values[::2][: len(npy)] - npy[: len(values[::2])][:, apple]).max() < 1e-6


def test_no_seam_at_window_joins_for_constant_input():
    p = sequence_predictor()
    t = np.arange(16000 * 30) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 100 * t)).astype(np.float32)  # the same in every frame
    y = p.predict(tone)
    assert y.shape == (900, 52)
    inner = y[30:-30]  # away from the audio's own ends
    assert np.abs(inner - inner.mean(0)).max() < 1e-4
    # without the overlap, windows side by side jump at each join: the test can see a seam
    windows = torch.from_numpy(tone).reshape(3, 160000)
    naive = p.window_batch(windows).reshape(900, 52).numpy()[30:-30]
    assert np.abs(naive - naive.mean(0)).max() > 100 * np.abs(inner - inner.mean(0)).max()


@pytest.mark.parametrize("near_join", [False, True])
def test_a_click_is_predicted_at_its_time_wherever_it_falls(near_join):
    p = sequence_predictor()
    margin, fade, step = p._edges()
    n = 16000 * 25
    at = (step + margin + fade // 2) / 30 if near_join else 3.0  # mid-crossfade, or mid-window
    silence = p.predict(np.zeros(n, np.float32))
    clicked = np.zeros(n, np.float32)
    i = int(round(at * 16000))
    clicked[i : i + 32] = 0.9
    response = np.abs(p.predict(clicked) - silence).sum(1)
    # the response of one window to a click at 3 s, shifted to the click's time
    single = np.zeros(160000, np.float32)
    single[48000 : 48000 + 32] = 0.9
    one = p.window_batch(torch.from_numpy(np.stack([single, np.zeros_like(single)])))
    ref = np.abs((one[0] - one[1]).numpy()).sum(1)
    lag = int(ref.argmax()) - 90
    assert abs(int(response.argmax()) - (round(at * 30) + lag)) <= 1


def test_short_input_is_padded_and_trimmed():
    p = sequence_predictor()
    audio = speech(0.5)
    y = p.predict(audio)
    assert y.shape == (15, 52)
    padded = np.zeros(160000, np.float32)
    padded[: len(audio)] = audio
    full = p.window_batch(torch.from_numpy(padded)[None])[0].numpy()
    np.testing.assert_allclose(y, full[:15], atol=1e-6)
    assert p.predict(audio[:100]).shape == (1, 52)


def test_first_frame_model_slides_its_context_over_the_audio():
    torch.manual_seed(0)
    m = build_model("simplified", "first_frame", n_mels=32, hidden=16).eval()
    p = Predictor(m, "first_frame", 16000, 30.0, 300, torch.device("cpu"), batch_size=4)
    audio = speech(4.0)
    y = p.predict(audio)
    assert y.shape == (120, 52)
    need = m.clip_samples
    for k in (0, 17, 64, 119):
        start = round(k * 16000 / 30)
        clip = np.zeros(need, np.float32)
        part = audio[start : start + need]
        clip[: len(part)] = part
        with torch.no_grad():
            want = m(torch.from_numpy(clip)[None])[0].numpy()
        np.testing.assert_allclose(y[k], want, atol=1e-5)


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize("fps", [30, 60])
def test_round_trip_through_make_shards(checkpoint, tmp_path, fps):
    take = tmp_path / "take"
    take.mkdir()
    sf.write(take / "a.wav", speech(10.5), 16000, subtype="PCM_16")
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), str(take / "a.wav"), "--out", str(out)]
    assert infer([*args, "--fps", str(fps)]) == 0
    shutil.copy(out / "a.csv", take / "a.csv")
    ds = tmp_path / "ds"
    convert = ["--input", str(take), "--out", str(ds), "--val-fraction", "0", "--quiet"]
    assert make_shards.main([*convert, "--workers", "1"]) == 0
    loader = build_loader("torch", ds, batch_size=1, shuffle=False, num_workers=0, device="cpu")
    (batch,) = list(loader)
    got = batch["arkit"][0].numpy()  # [300, 52] at 30 fps, Apple order
    p = np.load(out / "a.npy")[:300].astype(np.float64)
    if fps == 30:  # frame for frame: only the CSV's 6 decimals differ
        np.testing.assert_allclose(got, p, atol=1e-6)
    else:  # 60 fps rows are the frames and their midpoints; make_shards' low-pass (1/4, 1/2,
        # 1/4) brings them back as 3/4 p[k] + 1/8 (p[k-1] + p[k+1])
        want = 0.75 * p[1:-1] + 0.125 * (p[:-2] + p[2:])
        np.testing.assert_allclose(got[1:-1], want, atol=2e-6)
        assert np.abs(got - p).max() < 0.05


# ------------------------------------------------------------------ evaluation report
def independent_scores(checkpoint: Path, dataset: Path) -> dict:
    """The report's numbers, from the tars (tarfile, soundfile, numpy) and the model itself."""
    state = torch.load(checkpoint, weights_only=True)
    args = dict(state["model_args"])
    model = build_model(args.pop("name"), args.pop("target"), **args)
    model.load_state_dict(state["model"])
    model.eval()
    m = load_manifest(dataset)
    preds, trues = [], []
    for tar_path in m.tar_paths("val"):
        with tarfile.open(tar_path) as tar:
            members = {x.name: tar.extractfile(x).read() for x in tar.getmembers() if x.isfile()}
        for name in sorted(k for k in members if k.endswith(".wav")):
            wav, _ = sf.read(io.BytesIO(members[name]), dtype="float32")
            true = np.load(io.BytesIO(members[name[:-4] + ".arkit.npy"]))
            with torch.no_grad():
                preds.append(model(torch.from_numpy(wav)[None])[0].numpy())
            trues.append(true)
    pred, true = np.concatenate(preds).astype(np.float64), np.concatenate(trues)
    mean = np.asarray(m.train_stats["frame_mean"])
    err = pred - true
    return {
        "mse": float((err**2).mean()),
        "mae": float(np.abs(err).mean()),
        "baseline_mse": float(((mean - true) ** 2).mean()),
        "per_mae": np.abs(err).mean(0),
        "jaw_r": float(np.corrcoef(pred[:, INDEX["jawopen"]], true[:, INDEX["jawopen"]])[0, 1]),
        "frames": len(true),
    }


def test_eval_report_numbers_match_an_independent_computation(checkpoint, tiny_dataset, tmp_path):
    out = tmp_path / "report"
    args = ["--checkpoint", str(checkpoint), "--eval", str(tiny_dataset), "--out", str(out)]
    assert infer([*args, "--loader", "torch"]) == 0
    rec = json.loads((out / "report.json").read_text())
    want = independent_scores(checkpoint, tiny_dataset)
    assert rec["frames"] == want["frames"] and rec["samples"] == want["frames"] // 300
    for key in ("mse", "mae", "baseline_mse"):
        assert rec[key] == pytest.approx(want[key], rel=1e-4), key
    assert rec["mse_ratio"] == pytest.approx(want["mse"] / want["baseline_mse"], rel=1e-4)
    assert rec["jaw_open_pearson"] == pytest.approx(want["jaw_r"], abs=1e-4)
    per = np.array([v["mae"] for v in rec["per_blendshape"].values()])  # Apple's order
    np.testing.assert_allclose(per, want["per_mae"], rtol=1e-4, atol=1e-7)
    jaw = ("jawForward", "jawLeft", "jawRight", "jawOpen")
    jaw_mae = np.mean([rec["per_blendshape"][n]["mae"] for n in jaw])
    assert rec["groups"]["jaw"] == pytest.approx(jaw_mae)
    md = (out / "report.md").read_text()
    assert "jawOpen" in md and "(curves.png)" in md and "(mae_by_blendshape.png)" in md
    # each val take's lag measured with the model: one row per take, flagged or not
    val = {
        json.loads(g["json"])["source"] for g in read_shards(tiny_dataset) if g["split"] == "val"
    }
    lags = rec["take_lags"]
    assert {r["source"] for r in lags["takes"]} == val and lags["max_sync_offset"] == 0.05
    assert all(r["samples"] == 1 and isinstance(r["flagged"], bool) for r in lags["takes"])
    assert "## Lag of each take" in md
    for png in ("curves.png", "mae_by_blendshape.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ bad inputs
def test_bad_checkpoints_are_named(checkpoint, tmp_path, capsys):
    wav = tmp_path / "a.wav"
    sf.write(wav, speech(1.0), 16000)
    missing = tmp_path / "nope.pt"
    assert infer(["--checkpoint", str(missing), str(wav), "--out", str(tmp_path / "o")]) == 1
    assert f"error: checkpoint {missing} does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert infer(["--checkpoint", str(junk), str(wav), "--out", str(tmp_path / "o")]) == 1
    assert f"checkpoint {junk} is unreadable" in capsys.readouterr().err
    state = torch.load(checkpoint, weights_only=True)
    state["model_args"]["hidden"] = 24  # a config that builds another shape
    other = tmp_path / "other.pt"
    torch.save(state, other)
    assert infer(["--checkpoint", str(other), str(wav), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"error: checkpoint {other} holds a model this code cannot rebuild" in err
    assert not (tmp_path / "o").exists()


def test_bad_audio_is_named_and_the_rest_still_convert(checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    sf.write(src / "good.wav", speech(1.5), 16000)
    sf.write(src / "sub" / "also.wav", speech(1.2), 16000)
    (src / "bad.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    out = tmp_path / "out"
    assert infer(["--checkpoint", str(checkpoint), str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"skipped {src / 'bad.wav'}: unreadable audio" in err
    assert (out / "good.csv").is_file() and (out / "sub" / "also.csv").is_file()
    assert not (out / "bad.csv").exists()
    assert infer(["--checkpoint", str(checkpoint), str(src / "bad.wav"), "--out", str(out)]) == 1
    assert infer(["--checkpoint", str(checkpoint), str(tmp_path / "x.wav"), "--out", str(out)]) == 1
    assert f"error: input {tmp_path / 'x.wav'} does not exist" in capsys.readouterr().err


def test_frames_for_durations():
    p = sequence_predictor()
    for seconds in (0.01, 1.0, 9.99, 10.0, 61.7):
        assert p.frames_for(int(round(seconds * 16000))) == max(1, math.ceil(seconds * 30 - 1e-6))


@pytest.mark.slow  # two trainer runs of two epochs, each writing its report
def test_the_trainer_writes_best_pts_report_unless_told_not_to(tiny_dataset, tmp_path):
    sets = [*SMALL, f"data.dir={tiny_dataset}", "train.target=sequence", "train.epochs=2"]
    sets += ["data.num_workers=0"]
    runs = {}
    for name, extra in (("on", []), ("off", ["train.report=false"])):
        args = ["--loader", "torch"]
        for s in (*sets, f"run.dir={tmp_path / name}", *extra):
            args += ["--set", s]
        assert train(args) == 0
        runs[name] = tmp_path / name
    assert not (runs["off"] / "report").exists()
    rec = json.loads((runs["on"] / "report" / "report.json").read_text())
    assert rec["checkpoint"] == str(runs["on"] / "best.pt")
    assert rec["step"] == torch.load(runs["on"] / "best.pt", weights_only=True)["step"]
    out = tmp_path / "eval"
    args = ["--checkpoint", str(runs["on"] / "best.pt"), "--eval", str(tiny_dataset)]
    assert infer([*args, "--out", str(out), "--loader", "torch"]) == 0
    again = json.loads((out / "report.json").read_text())
    for key in ("mse", "mae", "baseline_mse", "jaw_open_pearson", "frames"):
        assert rec[key] == pytest.approx(again[key], rel=1e-6), key
    assert (runs["on"] / "report" / "mae_by_blendshape.png").is_file()


def test_eval_of_a_segmented_train_split_scores_whole_segments(checkpoint, long_segments):
    """Segments longer than the window (14 s, 420 frames, for 10 s windows) are scored whole
    (not the loaders' random crops), the same with both loaders."""
    from pipeline.loaders.spec import TorchOptions
    from train.evaluate import evaluate

    ds = long_segments
    n = load_manifest(ds).num_samples("train")
    assert n == 8
    p = Predictor.from_checkpoint(checkpoint, "cpu", batch_size=4)
    got = {}
    for loader in ("dali", "torch"):
        opts = TorchOptions(num_workers=0) if loader == "torch" else None
        rec, example = evaluate(p, ds, "train", loader, batch_size=2, options=opts)
        assert rec["samples"] == n and rec["frames"] == n * 420
        assert example["pred"].shape == example["true"].shape == (420, 52)
        got[loader] = rec["mse"]
    assert got["dali"] == pytest.approx(got["torch"], rel=1e-6)


# ------------------------------------------------------------------ never overwrite, never lie
def test_infer_never_replaces_a_file_it_did_not_write(checkpoint, tmp_path, capsys):
    take = tmp_path / "take"
    take.mkdir()
    sf.write(take / "a.wav", speech(1.0), 16000)
    write_live_link_csv(take / "a.csv", np.full((60, 52), 0.25, np.float32))  # the capture
    capture = (take / "a.csv").read_bytes()
    run = ["--checkpoint", str(checkpoint), str(take / "a.wav")]
    # --out is the input folder: refused before any work, the capture named, the way out given
    assert infer([*run, "--out", str(take)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {take / 'a.csv'} exists and is not")
    assert "--overwrite" in err and "choose another --out" in err
    assert (take / "a.csv").read_bytes() == capture
    assert sorted(os.listdir(take)) == ["a.csv", "a.wav"]
    # its own outputs infer replaces on a rerun, without asking
    out = tmp_path / "out"
    assert infer([*run, "--out", str(out)]) == 0
    first = (out / "a.npy").read_bytes()
    sf.write(take / "a.wav", speech(1.0, seed=9), 16000)  # other audio: other predictions
    assert infer([*run, "--out", str(out)]) == 0
    assert (out / "a.npy").read_bytes() != first
    # a file the user put in place of infer's output is theirs again
    shutil.copy(take / "a.csv", out / "a.csv")
    capsys.readouterr()
    assert infer([*run, "--out", str(out)]) == 1
    assert f"error: {out / 'a.csv'} exists" in capsys.readouterr().err
    assert (out / "a.csv").read_bytes() == capture
    # --overwrite replaces it, and the result is infer's again
    assert infer([*run, "--out", str(out), "--overwrite"]) == 0
    assert len(read_live_link_csv(out / "a.csv").values) == 60
    assert (out / "a.csv").read_bytes() != capture
    # the record in --out survives an append cut short (a kill, a full disk) and stays small
    record = out / ".arkit-infer.jsonl"
    for _ in range(3):
        with record.open("a") as f:
            f.write('{"path": "a.c')
        assert infer([*run, "--out", str(out)]) == 0
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(entries) <= 4 and {e["path"] for e in entries} == {"a.csv", "a.npy"}
    assert sorted(os.listdir(out)) == [".arkit-infer.jsonl", "a.csv", "a.npy"]


def test_infer_never_writes_over_an_input_or_a_users_report(
    checkpoint, tiny_dataset, tmp_path, capsys
):
    wav = tmp_path / "a.wav"
    sf.write(wav, speech(1.0), 16000)
    odd = tmp_path / "odd"  # a checkpoint named like an output of this run
    odd.mkdir()
    shutil.copy(checkpoint, odd / "a.npy")
    args = ["--checkpoint", str(odd / "a.npy"), str(wav), "--out", str(odd), "--overwrite"]
    assert infer(args) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {odd / 'a.npy'} would be written over {odd / 'a.npy'}, an input of this run "
        "(even with --overwrite): choose another --out\n"
    )
    assert (odd / "a.npy").read_bytes() == checkpoint.read_bytes()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("my own notes\n")
    args = ["--checkpoint", str(checkpoint), "--eval", str(tiny_dataset), "--out", str(notes)]
    assert infer([*args, "--loader", "torch"]) == 1
    assert f"error: {notes / 'report.md'} exists and is not" in capsys.readouterr().err
    assert sorted(os.listdir(notes)) == ["report.md"]
    assert (notes / "report.md").read_text() == "my own notes\n"


def _fsize_limit(limit: int):
    def apply():
        resource.setrlimit(
            resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
        )
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG

    return apply


@pytest.mark.slow
def test_a_full_disk_leaves_nothing_of_the_input_and_the_count_is_true(checkpoint, tmp_path):
    """Files of at most 100 kB (RLIMIT_FSIZE, as a full disk fails a write): a 10 s input's CSV
    (about 330 kB) cannot be written; 1 s inputs' (about 33 kB) can."""
    src = tmp_path / "in"
    src.mkdir()
    for stem, seconds in (("a", 1.0), ("b", 10.0), ("c", 1.0)):
        sf.write(src / f"{stem}.wav", speech(seconds), 16000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "infer", "--checkpoint", str(checkpoint), str(src)]
    res = subprocess.run(
        [*cmd, "--out", str(out), "--device", "cpu"],
        cwd=Path(__file__).resolve().parent.parent,
        preexec_fn=_fsize_limit(100_000),
        capture_output=True,
        text=True,
        timeout=120,
    )
    # no tmp file, no b.npy without its b.csv: the pairs that were written, and infer's record
    assert sorted(os.listdir(out)) == [".arkit-infer.jsonl", "a.csv", "a.npy", "c.csv", "c.npy"]
    for stem in "ac":
        assert len(read_live_link_csv(out / f"{stem}.csv").values) == 60
        assert np.load(out / f"{stem}.npy").shape == (30, 52)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    skipped = f"skipped {src / 'b.wav'}: cannot write {out / 'b'}.csv and .npy (File too large)"
    assert skipped in res.stderr
    assert f"1 of 3 inputs failed; 2 written to {out}" in res.stderr


@pytest.mark.slow
def test_a_full_disk_under_eval_is_one_error_line_and_no_half_report(
    checkpoint, tiny_dataset, tmp_path
):
    """Files of at most 40 kB: the report's figures (tens of kB each) do not all fit."""
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "infer", "--checkpoint", str(checkpoint), "--out", str(out)]
    res = subprocess.run(
        [*cmd, "--eval", str(tiny_dataset), "--device", "cpu", "--loader", "dali"],
        cwd=Path(__file__).resolve().parent.parent,
        preexec_fn=_fsize_limit(40_000),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.endswith(
        f"error: cannot write the report in {out} (File too large); what this run wrote of it "
        "was removed: free space there or choose another --out\n"
    )
    assert not out.exists()


@pytest.mark.parametrize("device", ["nonsense", "mps", "cuda"])
def test_an_unusable_device_is_one_error_line(checkpoint, tmp_path, capsys, device):
    wav = tmp_path / "a.wav"
    sf.write(wav, speech(1.0), 16000)
    if device == "cuda" and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"  # one past the last
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), str(wav), "--out", str(out), "--device", device]
    assert infer(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --device {device}")
    if device.startswith("cuda"):
        assert ("CUDA is not available here: use --device cpu" in err) or "CUDA device" in err
    else:
        assert f"--device {device} is not a device infer runs on: " in err
        assert err.endswith("choose auto, cpu, cuda, cuda:N\n")
    assert not out.exists()


def test_short_inputs_figures_keep_their_digits_and_plurals(checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "a.wav", speech(1.0)[:800], 16000)  # 0.05 s: 3 rows, 2 frames
    sf.write(src / "b.wav", speech(1.0)[:160], 16000)  # 0.01 s: 1 row, 1 frame
    out = tmp_path / "out"
    assert infer(["--checkpoint", str(checkpoint), str(src), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    took = []
    want = (("a", "0.05", "3 rows", "2 frames"), ("b", "0.01", "1 row", "1 frame"))
    for line, (stem, seconds, rows, frames) in zip(lines[:2], want, strict=True):
        csv_part = f"{out / (stem + '.csv')} ({rows} at 60 fps)"
        npy_part = f"{out / (stem + '.npy')} ({frames} at 30 fps)"
        assert line.startswith(
            f"{src / (stem + '.wav')}: {seconds} s -> {csv_part}, {npy_part} in "
        )
        took.append(float(re.fullmatch(r".* in ([0-9.]+) s", line).group(1)))
    speed = re.fullmatch(r"([0-9.]+) s of audio per second on \S+", lines[2]).group(1)
    assert float(speed) == pytest.approx(0.06 / sum(took), rel=0.02)


def test_a_window_of_no_whole_number_of_frames_trains_scores_and_infers(tmp_path):
    """2.01 s windows hold 60 frames and 32,160 samples, whose frame times number 61: the
    trainer and the evaluation score the 60 the window has, and inference gives the audio's."""
    from tests.helpers import build_synthetic

    data = build_synthetic(tmp_path / "ds", 6, "--window-seconds", "2.01", "--val-fraction", "0.34")
    m = load_manifest(data)
    assert (m.frames, m.clip_samples) == (60, 32160)
    with torch.no_grad():
        got = build_model("sequence", "sequence", hidden=8, frames=60)(torch.zeros(1, 32160))
    assert got.shape == (1, 61, 52)  # every frame time of the audio
    run = tmp_path / "run"
    sets = [*SMALL_RUN, f"data.dir={data}", f"run.dir={run}", "train.target=sequence"]
    sets += ["train.max_steps=2", "train.report=false"]
    assert train(["--loader", "torch", *(a for s in sets for a in ("--set", s))]) == 0
    val = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"val"' in line]
    assert val and math.isfinite(val[-1]["mse"])
    p = Predictor.from_checkpoint(run / "best.pt", "cpu")
    assert p.predict(speech(3.0)).shape == (90, 52)
    assert (
        infer(
            [
                "--checkpoint",
                str(run / "best.pt"),
                "--eval",
                str(data),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
