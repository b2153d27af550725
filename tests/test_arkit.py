"""core.arkit: the 52 names and their orders, name-based column mapping, the Live Link Face
CSV reader and time-based fps resampling."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from core import arkit
from core.arkit import (
    ALPHABETICAL_NAMES,
    ARKIT_NAMES,
    INDEX,
    LIVE_LINK_EXTRA,
    LIVE_LINK_NAMES,
)
from core.errors import AnimationError
from pipeline.convert import livelink, windows
from tests import helpers

# the capture's CSV as in the make_shards tests, from another start time and head pose
write_live_link_csv = partial(
    helpers.write_live_link_csv, start_frame=(1 * 3600 + 23 * 60 + 45) * 60 + 7, head="-0.25"
)


def distinct_values(frames: int) -> np.ndarray:
    """[frames, 52] canonical order, column j constant (j + 1) / 64 (exact in float32)."""
    return np.tile((np.arange(52, dtype=np.float32) + 1) / 64, (frames, 1))


# ---------------------------------------------------------------- names and orders


def test_name_tables():
    assert len(ARKIT_NAMES) == len(set(ARKIT_NAMES)) == arkit.NUM_BLENDSHAPES == 52
    assert ARKIT_NAMES[:2] == ("eyeBlinkLeft", "eyeLookDownLeft")
    assert ARKIT_NAMES[14:18] == ("jawForward", "jawLeft", "jawRight", "jawOpen")
    assert ARKIT_NAMES[21:23] == ("mouthLeft", "mouthRight")
    assert ARKIT_NAMES[-1] == "tongueOut"
    for order in (LIVE_LINK_NAMES, ALPHABETICAL_NAMES):
        assert sorted(n.lower() for n in order) == sorted(n.lower() for n in ARKIT_NAMES)
    assert list(ALPHABETICAL_NAMES) == sorted(ARKIT_NAMES, key=str.lower)
    assert len(LIVE_LINK_EXTRA) == 9


def test_live_link_order_differs_only_by_the_two_swaps():
    diff = [
        i
        for i, (a, b) in enumerate(zip(ARKIT_NAMES, LIVE_LINK_NAMES, strict=True))
        if a.lower() != b.lower()
    ]
    assert diff == [15, 16, 21, 22]
    assert LIVE_LINK_NAMES[15:17] == ("JawRight", "JawLeft")
    assert LIVE_LINK_NAMES[21:23] == ("MouthRight", "MouthLeft")
    assert all(n[0].isupper() for n in LIVE_LINK_NAMES)


def test_canonical_columns_by_name_ignoring_case_and_other_columns():
    rng = np.random.default_rng(1)
    perm = rng.permutation(52)
    names = [ARKIT_NAMES[i] for i in perm]
    names = [
        n.upper() if k % 3 == 0 else n.lower() if k % 3 == 1 else n for k, n in enumerate(names)
    ]
    names = ["Timecode", "BlendshapeCount"] + names[:30] + ["HeadYaw"] + names[30:] + [" x "]
    cols = arkit.canonical_columns(names)
    for j, name in enumerate(ARKIT_NAMES):
        assert names[cols[j]].strip().lower() == name.lower()
    assert cols.dtype == np.int64 and len(set(cols.tolist())) == 52


def test_canonical_columns_names_missing_and_duplicate():
    names = [n for n in LIVE_LINK_NAMES if n != "MouthLeft"]
    with pytest.raises(AnimationError, match=r"missing 1 of the 52 ARKit columns: mouthLeft$"):
        arkit.canonical_columns(names)
    with pytest.raises(AnimationError, match="missing 52"):
        arkit.canonical_columns(["Timecode"])
    with pytest.raises(AnimationError, match="appears twice"):
        arkit.canonical_columns(list(LIVE_LINK_NAMES) + ["jawopen"])


@pytest.mark.parametrize("order", ["arkit", "livelink", "alphabetical"])
def test_to_canonical_each_order(order):
    names = arkit.ORDERS[order]
    canon = np.random.default_rng(2).random((7, 52)).astype(np.float32)
    given = canon[:, [INDEX[n.lower()] for n in names]]  # the same data stored in `order`
    out = arkit.to_canonical(given, order)
    np.testing.assert_array_equal(out, canon)
    assert out.flags.c_contiguous
    # and with the names spelled out instead of an order name
    np.testing.assert_array_equal(arkit.to_canonical(given, tuple(names)), canon)


def test_livelink_traps_by_name():
    # a row in Live Link order whose value names its column
    row = np.array([[float(i) for i in range(52)]], np.float32)
    out = arkit.to_canonical(row, "livelink")[0]
    assert out[INDEX["jawleft"]] == LIVE_LINK_NAMES.index("JawLeft") == 16
    assert out[INDEX["jawright"]] == LIVE_LINK_NAMES.index("JawRight") == 15
    assert out[INDEX["mouthleft"]] == LIVE_LINK_NAMES.index("MouthLeft") == 22
    assert out[INDEX["mouthright"]] == LIVE_LINK_NAMES.index("MouthRight") == 21
    assert out[INDEX["jawopen"]] == 17


# ---------------------------------------------------------------- Live Link CSV


def test_parse_timecode():
    assert livelink.parse_timecode("00:00:00:00.000", 60) == 0.0
    assert livelink.parse_timecode("01:02:03:30.500", 60) == pytest.approx(
        3723 + 30.5 / 60, abs=1e-12
    )
    assert livelink.parse_timecode(" 00:00:01:15.000 ", 30) == pytest.approx(1.5, abs=1e-12)


def test_csv_columns_land_by_name(tmp_path):
    values = distinct_values(20)
    write_live_link_csv(tmp_path / "t.csv", values)
    header = (tmp_path / "t.csv").read_text().splitlines()[0].split(",")
    assert header[:2] == ["Timecode", "BlendshapeCount"] and len(header) == 2 + 52 + 9
    anim = livelink.read_live_link_csv(tmp_path / "t.csv")
    times, out = anim.times, anim.values
    assert out.dtype == np.float32 and out.shape == (20, 52)
    np.testing.assert_array_equal(out, values)
    for name in ("jawLeft", "jawRight", "mouthLeft", "mouthRight", "eyeBlinkLeft", "tongueOut"):
        assert out[0, INDEX[name.lower()]] == np.float32((ARKIT_NAMES.index(name) + 1) / 64)
    np.testing.assert_allclose(times, np.arange(20) / 60, atol=1e-9)


def test_csv_case_insensitive_shuffled_header_crlf_bom(tmp_path):
    rng = np.random.default_rng(3)
    names = [n.lower() if i % 2 else n.upper() for i, n in enumerate(LIVE_LINK_NAMES)]
    names = [names[i] for i in rng.permutation(52)]
    values = rng.random((30, 52)).astype(np.float32)
    write_live_link_csv(tmp_path / "t.csv", values, names=names, newline="\r\n", bom=True)
    anim = livelink.read_live_link_csv(tmp_path / "t.csv")
    times, out = anim.times, anim.values
    np.testing.assert_array_equal(out, values)
    np.testing.assert_allclose(times, np.arange(30) / 60, atol=1e-9)


def test_csv_times_follow_timecodes_with_dropped_frames(tmp_path):
    pos = np.array([0, 1, 2, 5, 6, 7.5, 9])  # frames 3-4 dropped, one late frame
    enc = write_live_link_csv(tmp_path / "t.csv", distinct_values(len(pos)), pos)
    times = livelink.read_live_link_csv(tmp_path / "t.csv", fps=60).times
    np.testing.assert_allclose(times, pos / 60, atol=1e-9)
    np.testing.assert_allclose(times, enc, atol=1e-9)


def test_csv_repeated_timecode_drops_the_row_and_keeps_the_times(tmp_path):
    pos = np.array([0, 1, 1, 2, 3])  # a repeated timecode: the second row goes, times stay
    values = distinct_values(5) * np.arange(1, 6, dtype=np.float32)[:, None] / 5
    write_live_link_csv(tmp_path / "t.csv", values, pos)
    anim = livelink.read_live_link_csv(tmp_path / "t.csv", fps=60)
    np.testing.assert_allclose(anim.times, np.arange(4) / 60)
    np.testing.assert_array_equal(anim.values, values[[0, 1, 3, 4]])
    assert anim.duplicates == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_csv_nan_inf_rejected_naming_the_row(tmp_path, bad):
    values = distinct_values(10)
    values[6, INDEX["jawopen"]] = bad
    write_live_link_csv(tmp_path / "t.csv", values)
    with pytest.raises(AnimationError, match="NaN or inf in data row 7"):
        livelink.read_live_link_csv(tmp_path / "t.csv")


def test_csv_missing_column_and_no_rows(tmp_path):
    names = [n for n in LIVE_LINK_NAMES if n != "JawLeft"]
    write_live_link_csv(tmp_path / "t.csv", distinct_values(5), names=names)
    with pytest.raises(AnimationError, match="missing 1 of the 52 ARKit columns: jawLeft"):
        livelink.read_live_link_csv(tmp_path / "t.csv")
    header = "Timecode,BlendshapeCount," + ",".join(LIVE_LINK_NAMES + LIVE_LINK_EXTRA)
    (tmp_path / "e.csv").write_text(header + "\n")
    with pytest.raises(AnimationError, match="no data rows"):
        livelink.read_live_link_csv(tmp_path / "e.csv")


def test_csv_unreadable_value(tmp_path):
    write_live_link_csv(tmp_path / "t.csv", distinct_values(4))
    text = (tmp_path / "t.csv").read_text().replace("0.015625", "zero", 1)
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(AnimationError, match="unreadable value"):
        livelink.read_live_link_csv(tmp_path / "t.csv")


# ---------------------------------------------------------------- fps resampling


def ramp(t: np.ndarray) -> np.ndarray:
    """[len(t), 52]: column j is 0.02 + j * 0.001 + (0.005 + j * 0.0005) * t (in [0, 1], t < 20)."""
    j = np.arange(52)
    return 0.02 + j * 0.001 + (0.005 + j * 0.0005) * np.asarray(t, np.float64)[:, None]


def test_resample_60_to_30_on_a_ramp_is_exact():
    t60 = np.arange(600) / 60
    out = windows.resample_frames(t60, ramp(t60), 30, 300)
    assert out.shape == (300, 52) and out.dtype == np.float32
    np.testing.assert_allclose(out, ramp(np.arange(300) / 30), rtol=0, atol=1e-6)


def test_resample_irregular_timestamps_is_time_based_not_every_other_row():
    rng = np.random.default_rng(4)
    # 60 fps capture with jitter of up to 0.45 frame and two dropped runs of frames
    pos = np.arange(900) + rng.uniform(-0.45, 0.45, 900)
    pos[0] = 0
    pos = np.delete(pos, list(range(100, 104)) + list(range(500, 509)))
    t = pos / 60
    out = windows.resample_frames(t, ramp(t), 30, 440)
    want = ramp(np.arange(440) / 30)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
    naive = ramp(t)[::2][:440]  # what [::2] would give: wrong after jitter and drops
    assert np.abs(naive - want).max() > 1e-3


def test_resample_other_rates_and_non_linear_signal():
    t24 = np.arange(240) / 24  # 24 fps -> 30 fps
    out = windows.resample_frames(t24, ramp(t24), 30, 298)
    np.testing.assert_allclose(out, ramp(np.arange(298) / 30), rtol=0, atol=1e-6)
    # regular 60 fps of any signal: 30 fps frame k is rows (2k-1, 2k, 2k+1) weighed
    # (1/4, 1/2, 1/4), the anti-aliasing low-pass; frame 0 is row 0 (a line through rows 0, 1)
    v = np.random.default_rng(5).random((120, 52)).astype(np.float32)
    out = windows.resample_frames(np.arange(120) / 60, v, 30, 60)
    want = 0.25 * v[1:-1:2] + 0.5 * v[2::2] + 0.25 * v[3::2]
    np.testing.assert_allclose(out[1:], want[:59], atol=1e-6, rtol=0)
    np.testing.assert_allclose(out[0], v[0], atol=1e-6, rtol=0)
    # the same rate in and out is the input itself
    np.testing.assert_array_equal(
        windows.resample_frames(np.arange(60) / 30, v[:60], 30, 60), v[:60]
    )
    # halfway between two rows is their mean (linear interpolation in time)
    out = windows.resample_frames(np.array([0.0, 0.1]), np.array([[0.0] * 52, [1.0] * 52]), 20, 2)
    np.testing.assert_allclose(out[1], 0.5)
