"""pipeline.convert.livelink: the Live Link Face CSV reader (timecodes, their rate, drop-frame,
duplicates, rows out of order, midnight).

Drop-frame numbering is derived here from the SMPTE 12M rule itself, by enumerating the labels
that exist (``df_labels``), never from the code under test: at 29.97 fps the frame numbers 0
and 1 of every minute do not exist, except in minutes divisible by ten (at 59.94, 0-3).
The label helpers and the CSV writer live in tests/helpers.py (test_alignment.py uses them too).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from core.arkit import INDEX
from core.errors import AnimationError
from pipeline.convert.livelink import (
    Animation,
    Timecode,
    nominal_rate,
    parse_timecode,
    parse_timecode_fields,
    read_live_link_csv,
)
from tests.helpers import DROPPED_LABELS, csv_text, df_label_tuples, df_labels, nd_labels

JAW = INDEX["jawopen"]
# ---------------------------------------------------------------- label and CSV writers


def write_csv(path: Path, labels: list[str], values: np.ndarray | None = None) -> Path:
    """Write ``labels`` with ``values`` (default: row i's jawOpen is i / 10000, so a test can
    tell which rows were kept; the other columns 0.1)."""
    if values is None:
        values = np.full((len(labels), 52), 0.1)
        values[:, JAW] = np.arange(len(labels)) / 10000
    Path(path).write_text(csv_text(labels, values))
    return Path(path)


def read(tmp_path: Path, labels: list[str], fps: float | None = None, values=None) -> Animation:
    return read_live_link_csv(write_csv(tmp_path / "take.csv", labels, values), fps=fps)


def kept_rows(anim: Animation) -> np.ndarray:
    """The original row numbers of the rows read (from the default jawOpen i / 10000)."""
    return np.round(anim.values[:, JAW].astype(np.float64) * 10000).astype(int)


# ---------------------------------------------------------------- the label writers themselves


def test_writers_follow_smpte_by_hand():
    assert nd_labels((10, 11, 12, 13), [0, 0.5, 47], 60) == [
        "10:11:12:13.000",
        "10:11:12:13.500",
        "10:11:13:00.000",
    ]
    assert nd_labels((23, 59, 59, 58), [0, 1, 2, 3], 60)[1:] == [
        "23:59:59:59.000",
        "00:00:00:00.000",
        "00:00:00:01.000",
    ]
    # the example of SMPTE's rule: the label after 01:04:59;29 is 01:05:00;02
    assert df_labels((1, 4, 59, 28), 3) == ["01:04:59;28.000", "01:04:59;29.000", "01:05:00;02.000"]
    # ... but not in a tenth minute
    assert df_labels((1, 9, 59, 29), 2) == ["01:09:59;29.000", "01:10:00;00.000"]
    assert df_labels((0, 0, 59, 59), 2, 60) == ["00:00:59;59.000", "00:01:00;04.000"]


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, fields",
    [
        ("10:11:12:13.500", (10, 11, 12, 13, 0.5, False)),
        ("00:00:00:00", (0, 0, 0, 0, 0.0, False)),
        ("1:02:03:04", (1, 2, 3, 4, 0.0, False)),
        (" 23:59:59:59.999 ", (23, 59, 59, 59, 0.999, False)),
        ("00:00:00:07.25", (0, 0, 0, 7, 0.25, False)),
        ("01:00:00;02", (1, 0, 0, 2, 0.0, True)),
        ("00:09:59;29.000", (0, 9, 59, 29, 0.0, True)),
    ],
)
def test_parse_timecode_fields(text, fields):
    tc = parse_timecode_fields(text)
    got = (tc.hours, tc.minutes, tc.seconds, tc.frames, tc.fraction, tc.drop_frame)
    assert got == pytest.approx(fields)
    assert isinstance(got[5], bool) and got[5] is fields[5]


@pytest.mark.parametrize(
    "text, why",
    [
        ("24:00:00:00", "out of range"),
        ("00:60:00:00", "out of range"),
        ("00:00:60:00", "out of range"),
        ("12:xx:00:00.000", "is not HH:MM:SS:FF"),
        ("12:00:00", "is not HH:MM:SS:FF"),
        ("", "is not HH:MM:SS:FF"),
        ("12:00:00:00:00", "is not HH:MM:SS:FF"),
        ("12:00:00:00.", "is not HH:MM:SS:FF"),
        ("-1:00:00:00", "is not HH:MM:SS:FF"),
        ("12:00:00:1234", "is not HH:MM:SS:FF"),
    ],
)
def test_bad_timecodes_are_rejected(text, why):
    with pytest.raises(ValueError, match=why):
        parse_timecode_fields(text)


def test_frame_count_non_drop():
    tc = parse_timecode_fields("10:11:12:13.250")
    assert tc.frame_count(60) == (10 * 3600 + 11 * 60 + 12) * 60 + 13.25
    assert tc.frame_count(30) == (10 * 3600 + 11 * 60 + 12) * 30 + 13.25
    assert parse_timecode("00:00:01:00", 60) == 1.0
    assert parse_timecode("00:00:01:00", 59.94) == pytest.approx(60 / 59.94)
    assert parse_timecode("00:00:00:15.500", 30) == pytest.approx(15.5 / 30)


@pytest.mark.parametrize(
    "text, nominal, count",
    [
        ("00:00:59;29", 30, 1799),
        ("00:01:00;02", 30, 1800),  # ;00 and ;01 do not exist
        ("00:09:59;29", 30, 17981),
        ("00:10:00;00", 30, 17982),  # a tenth minute drops nothing
        ("00:10:00;02", 30, 17984),
        ("00:11:00;02", 30, 17982 + 1800),
        ("01:00:00;00", 30, 107892),  # 108 labels fewer than an hour of 30
        ("00:01:00;04", 60, 3600),
        ("00:10:00;00", 60, 35964),
        ("01:00:00;00", 60, 215784),
    ],
)
def test_drop_frame_count_known_values(text, nominal, count):
    assert parse_timecode_fields(text).frame_count(nominal) == count


@pytest.mark.parametrize("nominal, minutes", [(30, 62), (60, 21)])
def test_drop_frame_count_is_the_position_among_existing_labels(nominal, minutes):
    """Label i of the SMPTE enumeration from midnight is frame i, over several minutes, two
    tenth minutes (and at 29.97 the hour)."""
    labels = itertools.takewhile(
        lambda t: t[0] * 60 + t[1] < minutes, df_label_tuples(nominal, (0, 0, 0, 0))
    )
    n = 0
    for i, (h, m, s, f) in enumerate(labels):
        assert Timecode(h, m, s, f, 0.0, True).frame_count(nominal) == i, (h, m, s, f)
        n = i + 1
    expected = minutes * 60 * nominal - DROPPED_LABELS[nominal] * (minutes - (minutes + 9) // 10)
    assert n == expected


# ---------------------------------------------------------------- the rate of the frame field


def codes(nominal: int, seconds: float, start=(1, 2, 3, 0)) -> list[Timecode]:
    n = int(round(seconds * nominal))
    return [parse_timecode_fields(t) for t in nd_labels(start, range(n), nominal)]


@pytest.mark.parametrize("nominal", [24, 25, 30, 48, 50, 60])
def test_nominal_rate_from_whole_seconds(nominal):
    assert nominal_rate(codes(nominal, 3.0)) == (nominal, True)
    # mid-second start: still three distinct seconds, one of them whole
    assert nominal_rate(codes(nominal, 2.5, start=(1, 2, 3, nominal // 2))) == (nominal, True)


def test_nominal_rate_of_a_short_file_is_uncertain():
    assert nominal_rate(codes(30, 1.5)) == (30, False)
    assert nominal_rate(codes(60, 0.5, start=(1, 2, 3, 40))) == (60, False)
    # half a second of 60 fps that never reaches frame 30 looks like 30 fps: hence uncertain
    assert nominal_rate(codes(60, 0.5)) == (30, False)


def test_nominal_rate_beyond_the_standard_rates():
    over = codes(60, 3.0) + [parse_timecode_fields("01:02:06:75")]
    assert nominal_rate(over)[0] is None


# ---------------------------------------------------------------- reading files


@pytest.mark.parametrize("nominal", [30, 60, 25])
def test_rate_is_read_from_the_timecodes(tmp_path, nominal):
    n = 4 * nominal
    anim = read(tmp_path, nd_labels((10, 11, 12, 3), range(n), nominal))
    assert isinstance(anim, Animation)
    assert anim.fps == nominal and anim.duplicates == 0
    assert anim.note == f"timecodes count {nominal} frames per second"
    np.testing.assert_allclose(anim.times, np.arange(n) / nominal, rtol=0, atol=1e-9)
    assert anim.values.dtype == np.float32 and anim.values.shape == (n, 52)
    np.testing.assert_array_equal(kept_rows(anim), np.arange(n))


def test_short_file_assumes_60_fps(tmp_path):
    # 0.75 s of 60 fps whose frame numbers stay below 45: Live Link's usual 60 is assumed
    anim = read(tmp_path, nd_labels((0, 0, 5, 0), range(45), 60))
    assert anim.fps == 60 and anim.note == "a short take: 60 fps assumed"
    np.testing.assert_allclose(anim.times, np.arange(45) / 60, rtol=0, atol=1e-9)
    # so is a short file with 30 fps numbers (0-29, then 0-14 of the next second): its rows are
    # then read at their 60 fps frame numbers, the 30 that second 5 lacks becoming a 0.5 s hole
    # (such a take is shorter than a window, or cut at the gap, downstream)
    anim = read(tmp_path, nd_labels((0, 0, 5, 0), range(45), 30))
    assert anim.fps == 60 and anim.note == "a short take: 60 fps assumed"
    want = np.r_[np.arange(30), 60 + np.arange(15)] / 60
    np.testing.assert_allclose(anim.times, want, rtol=0, atol=1e-9)
    # a short file that is 60 fps by its numbers is 60 fps
    anim = read(tmp_path, nd_labels((0, 0, 5, 10), range(80), 60))
    assert anim.fps == 60
    # --csv-fps decides for a short file it does not contradict
    anim = read(tmp_path, nd_labels((0, 0, 5, 0), range(45), 30), fps=30)
    assert anim.fps == 30 and anim.note == "--csv-fps 30"
    np.testing.assert_allclose(anim.times, np.arange(45) / 30, rtol=0, atol=1e-9)


def test_frame_numbers_beyond_60_are_rejected(tmp_path):
    labels = [f"00:00:{s:02d}:{f:02d}.000" for s in range(3) for f in range(0, 100, 2)]
    with pytest.raises(AnimationError, match="reach 98: no standard frame rate"):
        read(tmp_path, labels)


def test_fps_given_and_agreeing(tmp_path):
    labels = nd_labels((10, 0, 0, 0), range(240), 60)
    anim = read(tmp_path, labels, fps=60)
    assert anim.fps == 60 and anim.note == "--csv-fps 60"
    np.testing.assert_allclose(anim.times, np.arange(240) / 60, rtol=0, atol=1e-9)
    # 59.94 reads the same non-drop numbers as frames at 60000/1001 per second
    anim = read(tmp_path, labels, fps=59.94)
    assert anim.fps == 60000 / 1001
    np.testing.assert_allclose(anim.times, np.arange(240) * 1001 / 60000, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "nominal, fps, message",
    [
        (30, 60, r"timecodes count frames 0-29 \(30 fps\) but --csv-fps is 60"),
        (30, 59.94, r"frames 0-29 \(30 fps\) but --csv-fps is 59.94"),
        (60, 30, r"frames 0-59 \(60 fps\) but --csv-fps is 30"),
        (60, 29.97, r"frames 0-59 \(60 fps\) but --csv-fps is 29.97"),
        (60, 45, "--csv-fps 45 is not a frame rate Live Link writes"),
        (60, 61, "--csv-fps 61 is not a frame rate Live Link writes"),
    ],
)
def test_fps_given_and_contradicted(tmp_path, nominal, fps, message):
    labels = nd_labels((10, 0, 0, 0), range(4 * nominal), nominal)
    with pytest.raises(AnimationError, match=message):
        read(tmp_path, labels, fps=fps)


def test_60_fps_capture_with_30_fps_timecode_and_half_frames(tmp_path):
    # rows at frames 12.0, 12.5, 13.0, ... of a 30 fps timecode: ".500" is half a frame
    labels = nd_labels((8, 30, 0, 12), np.arange(300) / 2, 30)
    assert labels[:3] == ["08:30:00:12.000", "08:30:00:12.500", "08:30:00:13.000"]
    anim = read(tmp_path, labels)
    assert anim.fps == 30
    np.testing.assert_allclose(anim.times, np.arange(300) / 60, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(kept_rows(anim), np.arange(300))


@pytest.mark.parametrize("nominal", [30, 60])
def test_drop_frame_is_read_as_ntsc(tmp_path, nominal):
    # 00:08:58 to past 00:10:02: a dropping minute (9) and a tenth minute (10)
    n = 64 * nominal
    labels = df_labels((0, 8, 58, 0), n, nominal)
    assert f"00:09:00;{DROPPED_LABELS[nominal]:02d}.000" in labels
    assert "00:10:00;00.000" in labels
    real = nominal * 1000 / 1001
    for fps in (None, float(nominal), round(real, 2)):
        anim = read(tmp_path, labels, fps=fps)
        assert anim.fps == pytest.approx(real, rel=1e-4), fps
        # frame i of the capture is at i / 29.97 (59.94) s whatever the labels skip
        np.testing.assert_allclose(anim.times, np.arange(n) / real, rtol=0, atol=2e-5 * n / real)
    assert "drop-frame" in read(tmp_path, labels).note


def test_midnight_wrap(tmp_path):
    labels = nd_labels((23, 59, 59, 0), range(150), 60)
    assert labels[60] == "00:00:00:00.000"
    anim = read(tmp_path, labels)
    assert anim.fps == 60
    np.testing.assert_allclose(anim.times, np.arange(150) / 60, rtol=0, atol=1e-9)


def test_drop_frame_midnight_wrap(tmp_path):
    """29.97 drop-frame across midnight: a day of drop-frame labels holds 2589408 frames, not
    24 * 3600 * 30, so the wrap must add the former."""
    labels = df_labels((23, 59, 58, 0), 150)
    assert "00:00:00;00.000" in labels  # minute 0 is a tenth minute: nothing dropped
    anim = read(tmp_path, labels)
    real = 30000 / 1001
    np.testing.assert_allclose(anim.times, np.arange(150) / real, rtol=0, atol=1e-6)


def test_duplicate_timecodes_are_dropped_and_counted(tmp_path):
    labels = nd_labels((10, 0, 0, 0), range(240), 60)
    # row 10 three times, row 100 twice: 3 rows repeat the previous row's timecode
    dup = labels[:11] + [labels[10]] * 2 + labels[11:101] + [labels[100]] + labels[101:]
    values = np.full((len(dup), 52), 0.1)
    values[:, JAW] = np.arange(len(dup)) / 10000
    anim = read(tmp_path, dup, values=values)
    assert anim.duplicates == 3 and anim.fps == 60
    np.testing.assert_allclose(anim.times, np.arange(240) / 60, rtol=0, atol=1e-9)
    # the first row of each timecode is kept
    keep = np.delete(np.arange(len(dup)), [11, 12, 103])
    np.testing.assert_array_equal(kept_rows(anim), keep)


def test_rows_out_of_order_name_the_row(tmp_path):
    labels = nd_labels((10, 0, 0, 0), range(240), 60)
    labels[5], labels[6] = labels[6], labels[5]  # data rows 6 and 7 swapped
    with pytest.raises(AnimationError) as err:
        read(tmp_path, labels)
    msg = str(err.value)
    assert "data row 7" in msg and "out of order" in msg
    assert "10:00:00:05.000" in msg and "10:00:00:06.000" in msg


def test_unparsable_timecode_names_the_row(tmp_path):
    labels = nd_labels((12, 0, 0, 0), range(240), 60)
    labels[3] = "12:xx:00:00.000"
    with pytest.raises(AnimationError, match=r"data row 4: timecode '12:xx:00:00.000' is not"):
        read(tmp_path, labels)
    labels[3] = "12:00:61:00.000"
    with pytest.raises(AnimationError, match="data row 4: .* out of range"):
        read(tmp_path, labels)


def test_no_timecode_column_reads_at_60_or_the_given_rate(tmp_path):
    text = csv_text(nd_labels((0, 0, 0, 0), range(90), 60), np.full((90, 52), 0.5))
    body = [line.split(",", 1)[1] for line in text.splitlines()]  # drop the Timecode column
    (tmp_path / "t.csv").write_text("\n".join(body) + "\n")
    anim = read_live_link_csv(tmp_path / "t.csv")
    assert anim.fps == 60 and "no timecodes" in anim.note
    np.testing.assert_allclose(anim.times, np.arange(90) / 60)
    anim = read_live_link_csv(tmp_path / "t.csv", fps=30)
    np.testing.assert_allclose(anim.times, np.arange(90) / 30)


def test_bom_crlf_quotes_and_unclipped_values(tmp_path):
    values = np.full((240, 52), 0.1)
    values[:, JAW] = 1.5  # read as in the file: the scale is checked later, by the caller
    text = csv_text(nd_labels((10, 0, 0, 0), range(240), 60), values)
    lines = text.splitlines()
    lines[1] = '"' + lines[1].replace(",", '","') + '"'
    (tmp_path / "t.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    anim = read_live_link_csv(tmp_path / "t.csv")
    assert anim.fps == 60 and anim.values.shape == (240, 52)
    np.testing.assert_allclose(anim.times, np.arange(240) / 60, rtol=0, atol=1e-9)
    assert (anim.values[:, JAW] == np.float32(1.5)).all()


def test_csv_fps_59_94_is_60000_over_1001_exactly(tmp_path):
    from pipeline.convert.livelink import NTSC, _capture_rate, parse_timecode_fields

    codes = [
        parse_timecode_fields(f"00:00:{s:02d}:{f:02d}.000") for s in range(3) for f in range(60)
    ]
    rate, note = _capture_rate(codes, 59.94)
    assert rate == 60 * NTSC and "60000/1001" in note
