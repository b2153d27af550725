"""make_shards' stages on plain lists (pipeline.convert.stages): split by recording, shuffle,
chunks, train statistics, the take store and its fingerprints. No worker pool, no tars."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.convert import takestore
from pipeline.convert.inputs import (
    Converted,
    Recording,
    Rejected,
    Settings,
    convert,
    synthetic_recordings,
)
from pipeline.convert.stages import (
    Cutting,
    StoredPiece,
    TrainStats,
    assign_splits,
    chunks,
    safe_key,
    shuffle_split,
    split_pieces,
)
from pipeline.convert.takestore import StoredTake, TakeStore, fingerprint
from pipeline.convert.windows import Piece, PreparedTake
from pipeline.shards.members import npy_member


def recordings(n: int) -> list[Recording]:
    return [
        Recording(i, f"/takes/t{i}.wav", f"/takes/t{i}.wav", f"/takes/t{i}.csv") for i in range(n)
    ]


def stored(tmp_path, rec: Recording, seconds: float, gaps=()) -> StoredTake:
    """A take of ``seconds`` in a store: audio sample i holds i % 30000, frame k holds k / 1e4."""
    n, frames = int(seconds * 16000), int(seconds * 30)
    audio = ((np.arange(n) % 30000) / 32768).astype(np.float32)
    values = np.tile((np.arange(frames, dtype=np.float32) / 1e4)[:, None], (1, 52))
    take = PreparedTake(audio, values, 16000, 30, list(gaps), 0.1)
    store = TakeStore(tmp_path / "store")
    return store.put(rec, f"d{rec.order}", Converted(rec, take, seconds))


def pieces(take: StoredTake, windows: int) -> list[StoredPiece]:
    return [
        StoredPiece(take, Piece(w, 300 * w, 300, 160000 * w, 160000), "window")
        for w in range(windows)
    ]


@pytest.mark.parametrize(
    "n, fraction, n_val", [(10, 0.1, 1), (10, 0.25, 2), (2, 0.01, 1), (1, 0.5, 0), (7, 0.0, 0)]
)
def test_assign_splits_by_whole_recording(n, fraction, n_val):
    recs = recordings(n)
    split = assign_splits(recs, fraction, seed=3)
    assert sorted(split) == [r.order for r in recs]
    assert sum(s == "val" for s in split.values()) == n_val
    assert split == assign_splits(recs, fraction, seed=3)  # seeded
    if n >= 4 and n_val:
        others = [assign_splits(recs, fraction, seed=s) for s in range(8)]
        assert len({tuple(sorted(o.items())) for o in others}) > 1  # the seed chooses


def test_shuffle_split_does_not_depend_on_arrival_order(tmp_path):
    recs = recordings(4)
    windows = [w for r in recs for w in pieces(stored(tmp_path, r, 30.0), 3)]
    a = shuffle_split(windows, seed=1, split="train")
    b = shuffle_split(list(reversed(windows)), seed=1, split="train")
    assert [(w.recording.order, w.index) for w in a] == [(w.recording.order, w.index) for w in b]
    assert sorted(a, key=lambda w: (w.recording.order, w.index)) == sorted(
        windows, key=lambda w: (w.recording.order, w.index)
    )
    c = shuffle_split(windows, seed=1, split="val")
    assert [w.index for w in a] != [w.index for w in c] or [w.recording for w in a] != [
        w.recording for w in c
    ]


def test_split_pieces_keeps_each_recordings_pieces_together_and_skips_empty_takes(tmp_path):
    recs = recordings(6)
    # take 2 is shorter than a window: it gives nothing and is not chosen for val
    takes = [stored(tmp_path, r, 5.0 if r.order == 2 else 20.0) for r in recs]
    ordered, rejects = split_pieces(takes, Cutting(10.0), val_fraction=0.4, seed=0)
    assert rejects == [] and sum(len(v) for v in ordered.values()) == 10
    for split, ps in ordered.items():
        for p in ps:  # both windows of a recording are in the split of its first
            assert sum(q.recording == p.recording for q in ps) == 2, split
    assert len({p.recording.order for p in ordered["val"]}) == 2
    assert 2 not in {p.recording.order for ps in ordered.values() for p in ps}


def test_segments_for_training_windows_for_validation(tmp_path):
    """With --segment-seconds, train takes are cut into segments overlapping by one window (the
    last one ending with the take) and val takes into windows; the members hold exactly the
    take's audio and frames at the piece's place."""
    recs = recordings(4)
    takes = [stored(tmp_path, r, 57.0) for r in recs]
    ordered, rejects = split_pieces(takes, Cutting(10.0, None, 25.0), val_fraction=0.25, seed=1)
    assert rejects == []
    train, val = ordered["train"], ordered["val"]
    assert {p.kind for p in train} == {"segment"} and {p.kind for p in val} == {"window"}
    first = train[0].recording
    # 57 s = 1710 frames; segments of 750 every 450; the last one ends with the take
    assert sorted(p.piece.start_frame for p in train if p.recording == first) == [0, 450, 900, 960]
    assert sorted(p.piece.start_frame for p in val) == [0, 300, 600, 900, 1200]
    for p in train[:3] + val[:2]:
        wav, npy = p.read()
        n, f = p.piece.samples, p.piece.frames
        assert n == (400000 if p.kind == "segment" else 160000) and f == n * 30 // 16000
        pcm = np.frombuffer(wav, "<i2", offset=44)
        want = (np.arange(p.piece.start_sample, p.piece.start_sample + n) % 30000).astype("<i2")
        np.testing.assert_array_equal(pcm, want)
        arkit = np.load(io.BytesIO(npy))
        np.testing.assert_allclose(arkit[:, 7], (p.piece.start_frame + np.arange(f)) / 1e4)


def test_a_take_shorter_than_a_segment_is_reported_when_it_would_train(tmp_path):
    recs = recordings(2)
    takes = [stored(tmp_path, r, 15.0) for r in recs]
    ordered, rejects = split_pieces(takes, Cutting(10.0, None, 25.0), val_fraction=0.5, seed=0)
    assert len(ordered["val"]) == 1 and ordered["train"] == []
    assert len(rejects) == 1 and "shorter than one 25 s segment" in rejects[0].reason


def test_pieces_overlapping_a_gap_are_left_out_and_reported(tmp_path):
    (rec,) = recordings(1)
    take = stored(tmp_path, rec, 40.0, gaps=[(12.0, 15.0)])
    ordered, rejects = split_pieces([take], Cutting(10.0), val_fraction=0.0, seed=0)
    assert sorted(p.piece.start_frame for p in ordered["train"]) == [0, 600, 900]
    assert len(rejects) == 1 and "window 1 (10.00-20.00 s) left out" in rejects[0].reason


def test_chunks_and_safe_keys():
    assert [c for c in chunks(list(range(7)), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks([], 3)) == []
    assert safe_key("take.b c/d") == "take-b-c-d" and "." not in safe_key("a.b.c")
    assert safe_key("...") == "x"


def test_train_stats_are_the_mean_frame_and_mean_first_frame():
    rng = np.random.default_rng(0)
    arrays = [rng.random((30, 52)).astype(np.float32) for _ in range(5)]
    for crops in (1, 11):  # windows; segments of 30 frames cropped to windows of 20
        stats = TrainStats(frames=30, crops=crops)
        for a in arrays:
            stats.add(npy_member(a))
        got = stats.to_dict()
        np.testing.assert_allclose(got["frame_mean"], np.concatenate(arrays).mean(0), atol=1e-6)
        firsts = np.stack([a[:crops].mean(0) for a in arrays]).mean(0)
        np.testing.assert_allclose(got["first_frame_mean"], firsts, atol=1e-6)


def test_take_store_round_trip_and_rejects(tmp_path):
    (rec,) = recordings(1)
    take = stored(tmp_path, rec, 12.0, gaps=[(3.0, 3.5)])
    again = TakeStore(tmp_path / "store").get(rec, "d0")
    for got in (take, again):
        p = got.prepared()
        assert (got.samples, got.total_frames, got.seconds) == (192000, 360, 12.0)
        assert got.gaps == [(3.0, 3.5)] and p.max_gap_seconds == 0.1
        np.testing.assert_array_equal(p.audio[:5], np.arange(5))  # stored as PCM16
        np.testing.assert_allclose(p.frames[359], 359 / 1e4)
    assert not take.reused and again.reused
    store = TakeStore(tmp_path / "store")
    store.put(rec, "bad", Rejected(rec, "too short"))
    assert store.get(rec, "bad") == Rejected(rec, "too short")
    assert store.get(rec, "nothing") is None
    (tmp_path / "store" / "half.json.tmp").write_text("{")  # an interrupted write ...
    TakeStore(tmp_path / "store", clean=False)
    assert list((tmp_path / "store").glob("*.tmp"))  # ... a worker leaves alone ...
    TakeStore(tmp_path / "store")
    assert not list((tmp_path / "store").glob("*.tmp"))  # ... and the next run clears


def _write_half_then_hang(job):
    """A worker caught mid-write: synthetic take 0 never finishes its .bin."""
    rec, settings, root, digest = job
    if rec.order == 0:
        (Path(root) / f"{digest}.bin.tmp").write_bytes(b"half")
        time.sleep(120)
    return takestore.TakeStore(Path(root), clean=False).put(rec, digest, convert((rec, settings)))


@pytest.mark.parametrize("sigterm", ["default", "handled"])
def test_an_interrupted_conversion_leaves_no_half_written_take(tmp_path, monkeypatch, sigterm):
    """The workers are forked with the hanging one in place; closing the generator is what
    Ctrl-C does to it: the pool is terminated with take 0 mid-write. ``handled``: forked from
    a process that handles SIGTERM in Python (as Ray's driver does), the workers still stop."""
    monkeypatch.setattr(takestore, "convert_and_store", _write_half_then_hang)
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if sigterm == "handled" else None
    store = TakeStore(tmp_path / "store")
    results = takestore.convert_takes(synthetic_recordings(3), Settings(), store, workers=2)
    first = next(results)
    assert first.recording.order in (1, 2)
    deadline = time.monotonic() + 60
    while not list(store.root.glob("*.bin.tmp")):  # take 0 is being written ...
        assert time.monotonic() < deadline, "take 0 never started"
        time.sleep(0.01)
    closing = threading.Thread(target=results.close)
    try:
        closing.start()
        closing.join(60)  # the hanging worker sleeps 120 s unless SIGTERM stops it
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    assert not closing.is_alive(), "the pool waited for a worker that SIGTERM did not stop"
    assert not list(store.root.glob("*.tmp"))  # ... and what it left is gone
    assert len(list(store.root.glob("*.json"))) >= 1  # the finished takes stay


def test_fingerprint_follows_the_files_and_every_setting(tmp_path):
    wav, csv = tmp_path / "a.wav", tmp_path / "a.csv"
    wav.write_bytes(b"x" * 10)
    csv.write_text("y")
    rec = Recording(0, str(wav), str(wav), str(csv))
    base = fingerprint(rec, Settings())
    assert fingerprint(Recording(5, str(wav), str(wav), str(csv)), Settings()) == base
    assert fingerprint(rec, Settings(max_gap_seconds=0.2)) != base
    assert fingerprint(rec, Settings(csv_fps=59.94)) != base
    assert fingerprint(rec, Settings(fix_sync=True)) != base
    assert fingerprint(rec, Settings(audio_offset=0.1)) != base
    os.utime(csv, ns=(1, 1))
    assert fingerprint(rec, Settings()) != base
    synth = fingerprint(Recording(1, "synthetic:1"), Settings())
    assert synth != fingerprint(Recording(2, "synthetic:2"), Settings())
