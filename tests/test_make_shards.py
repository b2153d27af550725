"""make_shards end to end: real inputs written with numpy + soundfile in temp dirs, the real
converter, and the shards read back by our own parser, the webdataset library, DALI's reader
and DALI's wds2idx."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.arkit import (
    ALPHABETICAL_NAMES,
    ARKIT_NAMES,
    INDEX,
    LIVE_LINK_EXTRA,
    LIVE_LINK_NAMES,
)
from pipeline import make_shards
from pipeline.shards import members as fmt
from pipeline.shards.manifest import SPLITS
from pipeline.shards.members import parse_canonical_wav, wav_header
from pipeline.shards.tars import read_index
from pipeline.shards.verify import check_dataset
from tests.helpers import (
    EXTS,
    build_synthetic,
    by_source,
    manifest,
    parsed,
    pcm16_take,
    random_anim,
    random_pcm,
    read_shards,
    write_live_link_csv,
)
from tests.helpers import run_make_shards as run

# ---------------------------------------------------------------- input writers


# ---------------------------------------------------------------- running and reading back


def rejects(root: Path) -> dict[str, str]:
    lines = (root / "rejects.jsonl").read_text().splitlines()
    out = {}
    for ln in lines:
        r = json.loads(ln)
        assert set(r) == {"file", "reason"}
        out[Path(r["file"]).name] = r["reason"]
    assert len(out) == len(lines)
    return out


def at_30fps(anim60: np.ndarray, f0: int, frames: int) -> np.ndarray:
    """Frames f0..f0+frames-1 at 30 fps of a regular 60 fps capture, as make_shards filters:
    frame k weighs rows (2k-1, 2k, 2k+1) by (1/4, 1/2, 1/4); frame 0 is row 0."""
    a = np.asarray(anim60, np.float64)
    k = np.arange(f0, f0 + frames)
    mid = a[2 * k]
    prev, nxt = a[np.maximum(2 * k - 1, 0)], a[np.minimum(2 * k + 1, len(a) - 1)]
    return np.where((k == 0)[:, None], mid, 0.25 * prev + 0.5 * mid + 0.25 * nxt)


def start_sample(frame: int) -> int:
    """round(frame * 16000 / 30) in integers (frame * 1600 / 3 is never a tie)."""
    return (2 * frame * 1600 + 3) // 6


# ---------------------------------------------------------------- 1. exact round trip


def test_round_trip_is_bit_exact(tmp_path):
    src = tmp_path / "in"
    pcm_a, anim_a = pcm16_take(src, "take_a", 23.3, seed=1, anim="npy")
    pcm_b, anim_b = pcm16_take(src, "take.b", 12.0, seed=2, anim="csv")
    out = tmp_path / "out"
    assert run("--input", src, "--out", out, "--val-fraction", "0.5", "--strict") == 0

    man = manifest(out)
    assert man["splits"] == {"train": 2, "val": 1} or man["splits"] == {"train": 1, "val": 2}
    assert (man["clip_samples"], man["frames"], man["fps"], man["sample_rate"]) == (
        160000,
        300,
        30,
        16000,
    )
    assert man["names"] == list(ARKIT_NAMES) and man["rejects"] == 0
    assert (out / "rejects.jsonl").read_text() == ""
    assert man["input_hours"] == pytest.approx((23.3 + 12.0) / 3600)
    for sh in man["shards"]:
        blob = (out / sh["name"]).read_bytes()
        assert sh["bytes"] == len(blob) and sh["sha256"] == hashlib.sha256(blob).hexdigest()
        assert (out / sh["name"]).with_suffix(".idx").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]

    samples = by_source(parsed(out))
    assert {k: len(v) for k, v in samples.items()} == {"take_a.wav": 2, "take.b.wav": 1}
    for name, pcm, anim in (("take_a.wav", pcm_a, anim_a), ("take.b.wav", pcm_b, anim_b)):
        for w, s in enumerate(samples[name]):
            assert "." not in s["key"] and s["key"].endswith(f"_{w:04d}")
            assert s["wav"][:44] == wav_header(160000) and len(s["wav"]) == 44 + 320000
            assert len(s["arkit.npy"]) - 300 * 52 * 4 == man["npy_header_bytes"]
            f0 = 300 * w
            s0 = start_sample(f0)
            assert s["meta"]["window"] == w and s["meta"]["start_seconds"] == s0 / 16000
            assert s["meta"]["animation"].endswith(".npy" if name == "take_a.wav" else ".csv")
            np.testing.assert_array_equal(s["pcm"], pcm[s0 : s0 + 160000])
            # 30 fps frame k / 30 s is the 60 fps rows around 2k / 60 s, low-passed
            want = at_30fps(anim, f0, 300)
            np.testing.assert_allclose(s["arkit"], want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 2. alignment and strides


@pytest.mark.parametrize(
    "seconds, stride, frames, starts",
    [
        (20.0, "2.5", 75, [0, 40000, 80000, 120000, 160000]),
        (14.0, "0.6666666667", 20, [0, 10667, 21333, 32000, 42667, 53333, 64000]),
    ],
)
def test_stride_windows_start_on_frame_aligned_samples(tmp_path, seconds, stride, frames, starts):
    pcm, anim = pcm16_take(tmp_path / "in", "t", seconds, seed=3, anim="npy")
    out = tmp_path / "out"
    assert (
        run(
            "--input",
            tmp_path / "in",
            "--out",
            out,
            "--stride-seconds",
            stride,
            "--val-fraction",
            "0",
        )
        == 0
    )
    windows = by_source(parsed(out))["t.wav"]
    assert [round(s["meta"]["start_seconds"] * 16000) for s in windows] == starts
    for w, s in enumerate(windows):
        f0 = w * frames
        assert starts[w] == start_sample(f0)
        assert s["meta"]["start_seconds"] == starts[w] / 16000
        np.testing.assert_array_equal(s["pcm"], pcm[starts[w] : starts[w] + 160000])
        np.testing.assert_allclose(s["arkit"], at_30fps(anim, f0, 300), rtol=0, atol=1e-6)


def test_other_window_length_and_train_stats(tmp_path):
    pcm, anim = pcm16_take(tmp_path / "in", "t", 5.0, seed=4, anim="npy")
    out = tmp_path / "out"
    assert (
        run(
            "--input", tmp_path / "in", "--out", out, "--window-seconds", "2", "--val-fraction", "0"
        )
        == 0
    )
    man = manifest(out)
    assert (man["clip_samples"], man["frames"], man["splits"]["train"]) == (32000, 60, 2)
    samples = by_source(parsed(out))["t.wav"]
    for w, s in enumerate(samples):
        np.testing.assert_array_equal(s["pcm"], pcm[32000 * w : 32000 * (w + 1)])
        np.testing.assert_allclose(s["arkit"], at_30fps(anim, 60 * w, 60), rtol=0, atol=1e-6)
    frames = np.concatenate([s["arkit"] for s in samples])
    np.testing.assert_allclose(man["train_stats"]["frame_mean"], frames.mean(0), atol=1e-6)
    firsts = np.stack([s["arkit"][0] for s in samples])
    np.testing.assert_allclose(man["train_stats"]["first_frame_mean"], firsts.mean(0), atol=1e-6)
    assert list(check_dataset(out)) == []


# ---------------------------------------------------------------- 3. 60 -> 30 fps on a ramp


def ramp(t: np.ndarray) -> np.ndarray:
    """Column j: 0.02 + j / 1000 + (0.005 + j / 2000) * t, inside [0, 1] for t < 20 s."""
    j = np.arange(52)
    return 0.02 + j / 1000 + (0.005 + j / 2000) * np.asarray(t, np.float64)[:, None]


def test_csv_ramp_is_resampled_by_time(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(5)
    # regular 60 fps; and jittered by up to 0.4 frame with two runs of dropped frames, short
    # enough (under --max-gap-seconds 0.1) to be bridged
    regular = np.arange(720.0)
    jitter = np.arange(721) + np.round(rng.uniform(-0.4, 0.4, 721), 3)
    jitter[0] = 0
    jitter = np.delete(jitter, list(range(200, 204)) + list(range(450, 453)))
    for stem, pos in (("regular", regular), ("irregular", jitter)):
        sf.write(str(src / f"{stem}.wav"), random_pcm(12.0, 6), 16000, subtype="PCM_16")
        t = pos / 60  # the time each row's timecode encodes, from the first row
        np.testing.assert_allclose(
            write_live_link_csv(src / f"{stem}.csv", ramp(t), pos), t, rtol=0, atol=1e-12
        )
    out = tmp_path / "out"
    assert run("--input", src, "--out", out, "--val-fraction", "0", "--strict") == 0
    samples = by_source(parsed(out))
    want = ramp(np.arange(300) / 30)
    for stem in ("regular", "irregular"):
        (s,) = samples[f"{stem}.wav"]
        np.testing.assert_allclose(s["arkit"], want, rtol=0, atol=1e-6)
    # the jittered take really tells time-based resampling from taking every other row
    every_other = ramp(jitter[::2][:300] / 60)
    assert np.abs(every_other - want).max() > 1e-3


# ---------------------------------------------------------------- 4. column orders by name


def distinct(frames: int, names) -> np.ndarray:
    """[frames, 52] in canonical order where the column of names[i] holds (i + 1) / 64."""
    v = np.zeros((frames, 52), np.float32)
    for i, n in enumerate(names):
        v[:, INDEX[n.lower()]] = (i + 1) / 64
    return v


def test_live_link_and_alphabetical_orders_land_in_arkit_order(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    # 1) Live Link order, as the app writes it: column i of the CSV holds (i + 1) / 64
    sf.write(str(src / "ll.wav"), random_pcm(10.5, 7), 16000, subtype="PCM_16")
    write_live_link_csv(src / "ll.csv", distinct(630, LIVE_LINK_NAMES))
    text = (src / "ll.csv").read_text().splitlines()
    assert text[0] == "Timecode,BlendshapeCount," + ",".join(LIVE_LINK_NAMES + LIVE_LINK_EXTRA)
    assert text[1].startswith("10:11:12:13.000,61,0.015625,0.03125,")
    assert text[1].split(",")[2 + 15 : 2 + 17] == ["0.25", "0.265625"]  # JawRight, JawLeft
    # 2) the same blendshapes with shuffled columns and any capitalisation
    perm = np.random.default_rng(8).permutation(52)
    mixed = [LIVE_LINK_NAMES[i] for i in perm]
    mixed = [
        n.upper() if i % 3 == 0 else n.lower() if i % 3 == 1 else n for i, n in enumerate(mixed)
    ]
    sf.write(str(src / "mixed.wav"), random_pcm(10.5, 8), 16000, subtype="PCM_16")
    write_live_link_csv(src / "mixed.csv", distinct(630, mixed), names=mixed)
    # 3) a .npy with its columns in alphabetical order: column i holds (i + 1) / 64
    sf.write(str(src / "alpha.wav"), random_pcm(10.5, 9), 16000, subtype="PCM_16")
    alpha = np.tile((np.arange(52, dtype=np.float32) + 1) / 64, (630, 1))
    np.save(src / "alpha.npy", alpha)
    out = tmp_path / "out"
    assert run("--input", src, "--out", out, "--npy-order", "alphabetical", "--strict") == 0
    samples = by_source(parsed(out))

    (ll,) = samples["ll.wav"]
    got = {name: set(ll["arkit"][:, j].tolist()) for j, name in enumerate(ARKIT_NAMES)}
    # the traps, by name: Live Link has JawRight before JawLeft and MouthRight before MouthLeft
    assert got["jawLeft"] == {17 / 64} and got["jawRight"] == {16 / 64}
    assert got["mouthLeft"] == {23 / 64} and got["mouthRight"] == {22 / 64}
    assert got["jawOpen"] == {18 / 64} and got["eyeBlinkLeft"] == {1 / 64}
    for name in ARKIT_NAMES:
        ll_pos = [n.lower() for n in LIVE_LINK_NAMES].index(name.lower())
        assert got[name] == {(ll_pos + 1) / 64}, name

    (mx,) = samples["mixed.wav"]
    for j, name in enumerate(ARKIT_NAMES):
        pos = [n.lower() for n in mixed].index(name.lower())
        assert set(mx["arkit"][:, j].tolist()) == {(pos + 1) / 64}, name

    (al,) = samples["alpha.wav"]
    for j, name in enumerate(ARKIT_NAMES):
        assert set(al["arkit"][:, j].tolist()) == {(ALPHABETICAL_NAMES.index(name) + 1) / 64}, name
    assert al["arkit"][0, INDEX["browdownleft"]] == 1 / 64  # first alphabetically
    assert al["arkit"][0, INDEX["tongueout"]] == 52 / 64


# ---------------------------------------------------------------- 5. rejects


def test_every_bad_input_is_a_reject_line_and_the_rest_convert(tmp_path):
    src = tmp_path / "in"
    good_pcm, _ = pcm16_take(src, "good", 12.0, seed=10)
    pcm16_take(src, "nearly", 12.0, seed=11, anim_seconds=12.0 + 1 / 60)  # a frame: accepted
    (src / "garbage.wav").write_bytes(np.random.default_rng(12).bytes(20000))
    write_live_link_csv(src / "garbage.csv", random_anim(12.0, 12))
    pcm16_take(src, "headonly", 12.0, seed=13)
    (src / "headonly.wav").write_bytes((src / "headonly.wav").read_bytes()[:30])
    pcm16_take(src, "truncated", 12.0, seed=14)
    blob = (src / "truncated.wav").read_bytes()
    (src / "truncated.wav").write_bytes(blob[: 44 + int(0.4 * (len(blob) - 44))])
    for stem, bad in (("nan", np.nan), ("inf", np.inf)):
        pcm16_take(src, stem, 12.0, seed=15, anim=None)
        v = random_anim(12.0, 15)
        v[100, INDEX["mouthclose"]] = bad
        write_live_link_csv(src / f"{stem}.csv", v)
    pcm16_take(src, "npynan", 12.0, seed=16, anim=None)
    v = random_anim(12.0, 16)
    v[5, 3] = np.nan
    np.save(src / "npynan.npy", v)
    pcm16_take(src, "npyshape", 12.0, seed=17, anim=None)
    np.save(src / "npyshape.npy", random_anim(12.0, 17)[:, :51])
    pcm16_take(src, "nocol", 12.0, seed=18, anim=None)
    names = [n for n in LIVE_LINK_NAMES if n != "MouthLeft"]
    write_live_link_csv(src / "nocol.csv", random_anim(12.0, 18), names=names)
    pcm16_take(src, "lonely", 12.0, seed=19, anim=None)
    write_live_link_csv(src / "orphan.csv", random_anim(12.0, 20))
    pcm16_take(src, "short", 6.0, seed=21)
    pcm16_take(src, "mismatch", 12.0, seed=22, anim_seconds=13.0)
    # a second audio file with the stem of a good take: reported, the take still converts
    dup_pcm, _ = pcm16_take(src, "dup", 11.0, seed=23)
    sf.write(str(src / "dup.flac"), dup_pcm, 16000, subtype="PCM_16")
    (src / "notes.txt").write_text("not an input")

    out = tmp_path / "out"
    assert run("--input", src, "--out", out, "--val-fraction", "0") == 0
    got = rejects(out)
    expected = {
        "garbage.wav": "unreadable audio",
        "headonly.wav": "unreadable audio",
        "truncated.wav": "WAV is truncated: its header promises 384000 bytes of audio, "
        "the file holds 153600",
        "nan.wav": "NaN or inf in data row 101",
        "inf.wav": "NaN or inf in data row 101",
        "npynan.wav": "npy contains NaN or inf",
        "npyshape.wav": "npy has shape (720, 51), expected [T, 52]",
        "nocol.wav": "missing 1 of the 52 ARKit columns: mouthLeft",
        "lonely.wav": "audio has no animation file",
        "orphan.csv": "animation has no audio file",
        "short.wav": "take is 6.00 s, shorter than one 10 s window",
        "mismatch.wav": "differ by 0.983 s, more than --tolerance-seconds 0.02",
        "dup.wav": "second file with the same stem",
    }
    assert set(got) == set(expected)
    for name, reason in expected.items():
        assert reason in got[name], (name, got[name])
    man = manifest(out)
    assert man["rejects"] == len(expected)
    samples = by_source(parsed(out))
    assert {k: len(v) for k, v in samples.items()} == {
        "good.wav": 1,
        "nearly.wav": 1,
        "dup.flac": 1,
    }
    np.testing.assert_array_equal(samples["good.wav"][0]["pcm"], good_pcm[:160000])
    np.testing.assert_array_equal(samples["dup.flac"][0]["pcm"], dup_pcm[:160000])
    assert man["splits"] == {"train": 3, "val": 0}

    # --strict: the same inputs fail, and the directory does not look complete
    out2 = tmp_path / "strict"
    assert run("--input", src, "--out", out2, "--strict") == 1
    assert not (out2 / "manifest.json").exists()
    assert len(rejects(out2 / "in-progress")) == len(expected)


def test_no_usable_window_fails(tmp_path):
    pcm16_take(tmp_path / "in", "short", 4.0, seed=24)
    assert run("--input", tmp_path / "in", "--out", tmp_path / "out") == 1
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert "shorter than one" in rejects(tmp_path / "out" / "in-progress")["short.wav"]


def test_out_must_be_empty_or_our_dataset_and_overwrite_touches_only_ours(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "train-000099.tar").write_bytes(b"not ours")
    # a folder that is not one of our datasets is never written into, --overwrite or not
    for extra in ((), ("--overwrite",)):
        assert run("--synthetic", "2", "--out", out, *extra) == 1
        err = capsys.readouterr().err
        assert "not one of our datasets" in err and "keep.txt" in err
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "train-000099.tar"]
        assert (out / "train-000099.tar").read_bytes() == b"not ours"
    (out / "train-000099.tar").unlink()
    # our dataset beside a file of the user's: replacing it needs --overwrite ...
    ours = tmp_path / "ours"
    build_synthetic(ours, 40, "--samples-per-shard", "8", "--val-fraction", "0")
    for p in ours.iterdir():
        p.rename(out / p.name)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run("--synthetic", "2", "--out", out) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # ... and then replaces only that dataset's files: its stale shards go, keep.txt stays
    build_synthetic(out, 2, "--overwrite", "--val-fraction", "0")
    assert sorted(p.name for p in out.iterdir()) == [
        "keep.txt",
        "manifest.json",
        "rejects.jsonl",
        "sync.jsonl",
        "sync.svg",
        "train-000000.idx",
        "train-000000.tar",
    ]
    assert (out / "keep.txt").read_text() == "mine"
    assert manifest(out)["splits"] == {"train": 2, "val": 0}


# ---------------------------------------------------------------- 7. --verify


def test_verify_ok(tiny_dataset, capsys):
    assert make_shards.main(["--verify", str(tiny_dataset)]) == 0
    assert capsys.readouterr().out.strip() == f"{tiny_dataset}: OK"


def _component(root: Path, shard: str, sample: int, ext: str) -> tuple[int, int, str]:
    idx = read_index((root / shard).with_suffix(".idx"))
    ((off, size, name),) = [(m.offset, m.size, m.name) for m in idx[sample] if m.ext == ext]
    return off, size, name.partition(".")[0]


def test_verify_names_shard_and_sample_of_flipped_npy_bytes(copy_dataset, capsys):
    root = copy_dataset()
    off, size, key = _component(root, "train-000001.tar", 5, fmt.NPY_EXT)
    hdr = manifest(root)["npy_header_bytes"]
    with open(root / "train-000001.tar", "r+b") as f:
        f.seek(off + hdr + 4 * 52 * 7)  # frame 7
        data = f.read(4 * 52)
        f.seek(off + hdr + 4 * 52 * 7)
        f.write(bytes(b ^ 0xFF for b in data))
    assert make_shards.main(["--verify", str(root)]) == 1
    out = capsys.readouterr().out
    shard = str(root / "train-000001.tar")
    assert f"{shard}: sha256 differs" in out
    assert f"{shard}: sample {key}: arkit has NaN or inf" in out or (
        f"{shard}: sample {key}: arkit outside [0, 1]" in out
    )
    assert "train-000000" not in out and "val-000000" not in out
    assert out.strip().endswith("problems")


@pytest.mark.parametrize("where", ["inside the wav", "inside the npy", "at a header"])
def test_verify_names_shard_and_sample_of_a_truncated_shard(copy_dataset, capsys, where):
    root = copy_dataset()
    ext = fmt.NPY_EXT if where == "inside the npy" else fmt.WAV_EXT
    off, size, key = _component(root, "train-000000.tar", 3, ext)
    cut = off - 512 if where == "at a header" else off + size // 2
    os.truncate(root / "train-000000.tar", cut)
    assert make_shards.main(["--verify", str(root)]) == 1
    out = capsys.readouterr().out
    shard = str(root / "train-000000.tar")
    assert f"{shard}: {cut} bytes, manifest says" in out
    assert f"from sample {key} " in out  # the first sample that is not whole
    assert "train-000001" not in out


def test_verify_incomplete_dataset(tmp_path, capsys):
    assert make_shards.main(["--verify", str(tmp_path)]) == 1
    assert "manifest.json: missing or unreadable" in capsys.readouterr().out


# ---------------------------------------------------------------- 8. many input formats


def test_many_input_formats_in_one_folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    # stem: (rate, channels, subtype, container, seconds, animation, sine Hz)
    takes = {
        "a22k_mono16": (22050, 1, "PCM_16", "wav", 12.0, "csv", 220.0),
        "b44k_stereo16": (44100, 2, "PCM_16", "wav", 25.0, "csv", 330.0),
        "c44k_stereo24": (44100, 2, "PCM_24", "wav", 20.5, "csv", 440.0),
        "d48k_float": (48000, 1, "FLOAT", "wav", 15.0, "npy", 550.0),
        "e_flac": (44100, 2, "PCM_16", "flac", 21.0, "csv", 660.0),
        "f_short": (48000, 1, "FLOAT", "wav", 3.0, "csv", 770.0),
    }
    anims = {}
    for i, (stem, (rate, ch, subtype, ext, seconds, anim, hz)) in enumerate(takes.items()):
        t = np.arange(int(round(seconds * rate))) / rate
        # channel c at amplitude 0.2 * (c + 1): the downmix has amplitude 0.1 * (ch + 1)
        x = np.stack([0.2 * (c + 1) * np.sin(2 * np.pi * hz * t) for c in range(ch)], axis=1)
        sf.write(str(src / f"{stem}.{ext}"), x, rate, subtype=subtype)
        anims[stem] = random_anim(seconds, 30 + i)
        if anim == "csv":
            write_live_link_csv(src / f"{stem}.csv", anims[stem])
        else:
            np.save(src / f"{stem}.npy", anims[stem])
    info = sf.info(str(src / "c44k_stereo24.wav"))
    assert (info.samplerate, info.channels, info.subtype) == (44100, 2, "PCM_24")
    assert sf.info(str(src / "e_flac.flac")).format == "FLAC"

    out = tmp_path / "out"
    assert run("--input", src, "--out", out) == 0
    got = rejects(out)
    assert list(got) == ["f_short.wav"] and "take is 3.00 s, shorter than one" in got["f_short.wav"]
    samples = by_source(parsed(out))
    counts = {Path(k).stem: len(v) for k, v in samples.items()}
    assert counts == {
        "a22k_mono16": 1,
        "b44k_stereo16": 2,
        "c44k_stereo24": 2,
        "d48k_float": 1,
        "e_flac": 2,
    }
    man = manifest(out)
    assert man["splits"]["train"] + man["splits"]["val"] == 8 and man["rejects"] == 1
    assert man["input_hours"] == pytest.approx((12 + 25 + 20.5 + 15 + 21) / 3600, rel=1e-4)
    for name, wins in samples.items():
        stem = Path(name).stem
        rate, ch, _, _, _, anim, hz = takes[stem]
        for w, s in enumerate(wins):
            s0 = start_sample(300 * w)
            n = s0 + np.arange(160000)
            want = 0.1 * (ch + 1) * np.sin(2 * np.pi * hz * n / 16000)
            got_audio = s["pcm"][800:] / 32768.0  # away from the resampler's first samples
            assert np.abs(got_audio - want[800:]).max() < 3e-3, (name, w)
            frames = at_30fps(anims[stem], 300 * w, 300)
            np.testing.assert_allclose(s["arkit"], frames, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 6. real readers


def test_webdataset_library_reads_the_shards(tiny_dataset):
    import webdataset as wds

    man = manifest(tiny_dataset)
    ref = read_shards(tiny_dataset)
    for split in SPLITS:
        tars = [str(tiny_dataset / s["name"]) for s in man["shards"] if s["split"] == split]
        got = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
        want = [s for s in ref if s["split"] == split]
        assert len(got) == man["splits"][split] == len(want) > 0
        for g, w in zip(got, want, strict=True):
            assert g["__key__"] == w["key"]
            assert {k for k in g if not k.startswith("__")} == set(EXTS)
            assert (g["wav"], g["arkit.npy"], g["json"]) == (w["wav"], w["arkit.npy"], w["json"])
            pcm = parse_canonical_wav(g["wav"], 160000)
            arr = np.load(io.BytesIO(g["arkit.npy"]), allow_pickle=False)
            assert pcm.shape == (160000,) and arr.shape == (300, 52) and arr.dtype == np.float32
            assert 0 <= arr.min() and arr.max() <= 1 and np.abs(pcm).max() > 1000
            meta = json.loads(g["json"])
            assert meta["split"] == split and meta["source"].startswith("synthetic:")


def test_dali_reader_reads_the_shards_with_our_index(tiny_dataset):
    from nvidia.dali import Pipeline, fn, types

    man = manifest(tiny_dataset)
    ref = read_shards(tiny_dataset)
    batch = 4
    for split in SPLITS:
        tars = [str(tiny_dataset / s["name"]) for s in man["shards"] if s["split"] == split]
        want = [s for s in ref if s["split"] == split]
        assert len(want) % batch == 0
        pipe = Pipeline(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
        with pipe:
            wav, npy, meta = fn.readers.webdataset(
                paths=tars,
                index_paths=[t[:-4] + ".idx" for t in tars],
                ext=["wav", "arkit.npy", "json"],
                missing_component_behavior="error",
                name="r",
            )
            audio, _ = fn.decoders.audio(wav, dtype=types.INT16, downmix=True)
            arr = fn.decoders.numpy(npy)
            pipe.set_outputs(wav, npy, meta, audio, arr)
        pipe.build()
        assert pipe.epoch_size("r") == len(want)
        for b in range(len(want) // batch):
            outs = pipe.run()
            for i in range(batch):
                w = want[b * batch + i]
                raw = [np.array(o[i]).tobytes() for o in outs[:3]]
                assert raw == [w["wav"], w["arkit.npy"], w["json"]], w["key"]
                np.testing.assert_array_equal(
                    np.array(outs[3][i]).reshape(-1), parse_canonical_wav(w["wav"], 160000)
                )
                np.testing.assert_array_equal(
                    np.array(outs[4][i]), fmt.parse_arkit_npy(w["arkit.npy"], 300, 52)
                )
        del pipe


@pytest.mark.slow
def test_wds2idx_writes_the_same_index(tiny_dataset, tmp_path):
    man = manifest(tiny_dataset)
    assert len(man["shards"]) >= 2
    for sh in man["shards"]:
        tar = tiny_dataset / sh["name"]
        mine = tar.with_suffix(".idx").read_bytes()
        theirs = tmp_path / f"{tar.stem}.idx"
        proc = subprocess.run(
            [sys.executable, "-m", "wds2idx", str(tar), str(theirs)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert theirs.read_bytes() == mine, sh["name"]
        assert mine.startswith(f"v1.2 {sh['samples']}\n".encode())


def test_val_split_is_chosen_among_recordings_that_gave_windows(tmp_path):
    """A rejected take must not be the val split, leaving val empty."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        pcm16_take(src, f"take{i}", 12.0, seed=40 + i)
    pcm16_take(src, "tiny", 3.0, seed=45)
    for seed in range(6):  # whichever recording the seed picks, val holds a real one
        out = tmp_path / f"out{seed}"
        assert run("--input", src, "--out", out, "--val-fraction", "0.1", "--seed", str(seed)) == 0
        m = json.loads((out / "manifest.json").read_text())
        assert m["splits"] == {"train": 2, "val": 1}, (seed, m["splits"])


def test_a_segment_must_be_at_least_a_frame_longer_than_the_window(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run("--synthetic", "2", "--out", tmp_path / "o", "--segment-seconds", "10.01")
    assert "--segment-seconds must be at least a frame longer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


FLOAT_FLAGS = {  # every float flag of make_shards: values out of range, the range it names
    "--val-fraction": (["nan", "inf", "1", "-0.1"], "in [0, 1)"),
    "--window-seconds": (
        ["nan", "inf", "0.01", "0", "1e9"],
        "> 0, at least 3 frames (0.1 s at 30 fps) and at most 3600 s (an hour)",
    ),
    "--stride-seconds": (
        ["nan", "-inf", "0.001", "1e9"],
        "> 0, at least a frame (0.03333 s) and at most 3600 s (an hour)",
    ),
    "--segment-seconds": (
        ["nan", "inf", "1e9", "10.01"],
        "at least a frame longer than --window-seconds and at most 3600 s (an hour)",
    ),
    "--tolerance-seconds": (["nan", "inf", "-1", "1e9"], ">= 0 and at most 3600"),
    "--tolerance-ratio": (["nan", "inf", "1", "-0.5"], "in [0, 1)"),
    "--max-gap-seconds": (["nan", "inf", "0", "1e9"], "> 0 and at most 3600"),
    "--csv-fps": (["nan", "inf", "0", "1e308"], "> 0 and at most 1000"),
    "--npy-fps": (["nan", "inf", "-1", "1e9"], "> 0 and at most 1000"),
    "--csv-scale": (["nan", "inf", "0", "1e300"], "> 0 and at most 1000"),
    "--npy-scale": (["nan", "-inf", "-1", "1e300"], "> 0 and at most 1000"),
    "--sync-search-seconds": (["nan", "inf", "0", "6"], "> 0 and at most 5"),
    "--max-sync-offset": (["nan", "inf", "-0.1", "0"], "> 0 and at most 5"),
    "--audio-offset": (["nan", "-inf", "-5.5", "1e9"], "within +-5"),
}


def test_every_float_flag_is_refused_out_of_range_before_any_work(tmp_path, capsys, monkeypatch):
    """NaN, inf, absurd sizes and windows too short to cut end the run at parsing with one line
    naming the flag, the value and the range (no ValueError, OverflowError or huge allocation),
    and nothing is written."""
    assert float_options(monkeypatch) == set(FLOAT_FLAGS)  # no float flag left untested
    out = tmp_path / "o"
    for flag, (values, must) in FLOAT_FLAGS.items():
        for value in values:
            with pytest.raises(SystemExit) as exc:
                run("--synthetic", "2", "--out", out, f"{flag}={value}")
            assert exc.value.code == 2
            line = capsys.readouterr().err.strip().splitlines()[-1]
            assert line.startswith(f"make_shards: error: {flag} must be "), line
            assert must in line and line.endswith(f"(got {float(value)})"), line
    assert not out.exists()


def float_options(monkeypatch) -> set[str]:
    """The options make_shards' parser reads as floats (seen as the parser is built)."""
    import argparse

    seen: set[str] = set()
    real = argparse.ArgumentParser.add_argument

    def noting(self, *names, **kw):
        if kw.get("type") is float:
            seen.add(names[0])
        return real(self, *names, **kw)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "add_argument", noting)
        make_shards.parse_args(["--verify", "x"])
    return seen


def test_the_summary_counts_short_takes_and_gaps_under_their_own_reasons(tmp_path, capsys):
    """Takes shorter than a segment are counted as such, not as windows at gaps."""
    src, out = tmp_path / "in", tmp_path / "out"
    pcm16_take(src, "long", 40.0, seed=1)
    pcm16_take(src, "short", 15.0, seed=2)  # a window, but no 25 s segment
    pcm16_take(src, "gappy", 40.0, seed=3)
    values, pos = random_anim(40.0, 3), np.arange(2400)
    keep = (pos < 900) | (pos >= 1080)  # no capture rows from 15 to 18 s
    write_live_link_csv(src / "gappy.csv", values[keep], pos[keep])
    args = ["--input", src, "--out", out, "--segment-seconds", "25", "--val-fraction", "0"]
    assert make_shards.main([*map(str, args), "--workers", "2"]) == 0
    summary = capsys.readouterr().out.splitlines()[0]
    lines = (out / "rejects.jsonl").read_text().splitlines()
    assert len(lines) == 3 and manifest(out)["splits"] == {"train": 2, "val": 0}
    assert (
        "; 3 rejected (2 of them windows or segments at capture gaps; 1 of them takes shorter "
        f"than a segment; see {out / 'rejects.jsonl'})" in summary
    ), summary


def test_a_val_split_far_from_val_fraction_is_warned_with_the_fractions(tmp_path, capsys):
    """The split is by whole take: with one long take, --val-fraction 0.1 gives val 1 of 2
    takes and most (or few) of the windows; the run says so on stderr, with the fix."""
    src, out = tmp_path / "in", tmp_path / "out"
    pcm16_take(src, "long", 50.0, seed=1)
    pcm16_take(src, "short", 10.5, seed=2)
    assert run("--input", src, "--out", out, "--val-fraction", "0.1") == 0
    splits = manifest(out)["splits"]
    val, total = splits["val"], splits["train"] + splits["val"]
    assert total == 6 and val in (1, 5)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"warning: --val-fraction 0.1 put 1 of 2 takes (50%) and {val} of 6 windows "
        f"({val / 6:.0%}) in val: the split is by whole take, so few or unequal takes miss the "
        "share; more or shorter takes (cut long recordings), another --seed or another "
        "--val-fraction come closer"
    ]
    # equal takes split as asked: no warning
    build_synthetic(tmp_path / "even", 10, "--val-fraction", "0.1")
    assert manifest(tmp_path / "even")["splits"] == {"train": 9, "val": 1}
    assert capsys.readouterr().err == ""
