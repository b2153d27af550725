"""make_shards' stages on plain lists (pipeline.convert): split by recording, shuffle, chunks,
train statistics, the take store and its fingerprints. No worker pool, no tars."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.convert import (
    StoredTake,
    StoredWindow,
    TakeStore,
    TrainStats,
    assign_splits,
    chunks,
    fingerprint,
    safe_key,
    shuffle_split,
    split_windows,
)
from pipeline.inputs import Converted, EncodedWindow, Recording, Rejected, Settings
from pipeline.members import npy_member


def recordings(n: int) -> list[Recording]:
    return [
        Recording(i, f"/takes/t{i}.wav", f"/takes/t{i}.wav", f"/takes/t{i}.csv") for i in range(n)
    ]


def take(rec: Recording, windows: int) -> StoredTake:
    ws = [StoredWindow(rec, w, 160000 * w, "/store/x.bin", 0, 1, 1) for w in range(windows)]
    return StoredTake(rec, ws, 10.0 * windows)


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


def test_shuffle_split_does_not_depend_on_arrival_order():
    recs = recordings(4)
    windows = [w for r in recs for w in take(r, 3).windows]
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


def test_split_windows_keeps_each_recordings_windows_together_and_skips_empty_takes():
    recs = recordings(6)
    takes = [take(r, 0 if r.order == 2 else 2) for r in recs]  # take 2 gave no window
    ordered = split_windows(takes, val_fraction=0.4, seed=0)
    assert sum(len(v) for v in ordered.values()) == 10
    for split, ws in ordered.items():
        for w in ws:
            assert all(x in ws for x in take(w.recording, 2).windows), split
    # the val recordings are chosen among the five that gave windows
    assert len({w.recording.order for w in ordered["val"]}) == 2
    assert 2 not in {w.recording.order for ws in ordered.values() for w in ws}


def test_chunks_and_safe_keys():
    assert [c for c in chunks(list(range(7)), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks([], 3)) == []
    assert safe_key("take.b c/d") == "take-b-c-d" and "." not in safe_key("a.b.c")
    assert safe_key("...") == "x"


def test_train_stats_are_the_mean_frame_and_mean_first_frame():
    rng = np.random.default_rng(0)
    arrays = [rng.random((30, 52)).astype(np.float32) for _ in range(5)]
    stats = TrainStats(frames=30)
    for a in arrays:
        stats.add(npy_member(a))
    got = stats.to_dict()
    np.testing.assert_allclose(got["frame_mean"], np.concatenate(arrays).mean(0), atol=1e-6)
    np.testing.assert_allclose(
        got["first_frame_mean"], np.stack([a[0] for a in arrays]).mean(0), atol=1e-6
    )


def test_take_store_round_trip_and_rejects(tmp_path):
    store = TakeStore(tmp_path / "takes")
    rec = Recording(0, "synthetic:0")
    windows = [EncodedWindow(w, 100 * w, bytes([w]) * 50, bytes([w + 9]) * 30) for w in range(3)]
    stored = store.put(rec, "abc", Converted(rec, windows, 12.5, ["window 3 left out"], 2))
    again = store.get(rec, "abc")
    for got in (stored, again):
        assert [w.read() for w in got.windows] == [(w.wav, w.npy) for w in windows]
        assert [w.start_sample for w in got.windows] == [0, 100, 200]
        assert (got.seconds, got.dropped, got.duplicates) == (12.5, ["window 3 left out"], 2)
    assert not stored.reused and again.reused
    store.put(rec, "bad", Rejected(rec, "too short"))
    assert store.get(rec, "bad") == Rejected(rec, "too short")
    assert store.get(rec, "nothing") is None
    (tmp_path / "takes" / "half.json.tmp").write_text("{")  # an interrupted write ...
    TakeStore(tmp_path / "takes")
    assert not list((tmp_path / "takes").glob("*.tmp"))  # ... is cleared on the next run


def test_fingerprint_follows_the_files_and_every_setting(tmp_path):
    wav, csv = tmp_path / "a.wav", tmp_path / "a.csv"
    wav.write_bytes(b"x" * 10)
    csv.write_text("y")
    rec = Recording(0, str(wav), str(wav), str(csv))
    base = fingerprint(rec, Settings())
    assert fingerprint(Recording(5, str(wav), str(wav), str(csv)), Settings()) == base
    assert fingerprint(rec, Settings(max_gap_seconds=0.2)) != base
    assert fingerprint(rec, Settings(csv_fps=59.94)) != base
    os.utime(csv, ns=(1, 1))
    assert fingerprint(rec, Settings()) != base
    synth = fingerprint(Recording(1, "synthetic:1"), Settings())
    assert synth != fingerprint(Recording(2, "synthetic:2"), Settings())
