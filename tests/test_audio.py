"""pipeline.convert.audio: reading any WAV/FLAC to 16 kHz mono, and the canonical 44-byte PCM16
WAV."""

from __future__ import annotations

import io
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.errors import AudioError, MemberError
from pipeline.convert import audio
from pipeline.shards import members


def sine(seconds: float, rate: int, freq: float, amp: float, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return amp * np.sin(2 * np.pi * freq * t + phase)


def write(path: Path, x: np.ndarray, rate: int, subtype: str, fmt: str | None = None) -> Path:
    sf.write(str(path), x, rate, subtype=subtype, format=fmt)
    return path


# ---------------------------------------------------------------- the canonical WAV


def test_to_pcm16_rounds_and_clips():
    x = np.array(
        [0.0, 1 / 32768, 1.4 / 32768, 1.6 / 32768, -1.6 / 32768, 0.5, -1.0, 1.0, 2.0, -3.0]
    )
    got = members.to_pcm16(x)
    assert got.dtype == np.dtype("<i2")
    assert got.tolist() == [0, 1, 1, 2, -2, 16384, -32768, 32767, 32767, -32768]
    ints = np.arange(-32768, 32768, dtype=np.int64)
    np.testing.assert_array_equal(members.to_pcm16(ints / 32768.0), ints)  # exact round trip


def test_wav_header_matches_the_wave_module():
    pcm = np.random.default_rng(0).integers(-32768, 32768, 1234).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    blob = members.canonical_wav_bytes(pcm)
    assert len(members.wav_header(1234)) == members.WAV_HEADER_BYTES == 44
    assert blob == buf.getvalue()
    assert struct.unpack("<I", blob[40:44])[0] == 2 * 1234


def test_canonical_wav_round_trip_bit_for_bit():
    pcm = np.random.default_rng(1).integers(-32768, 32768, 160000).astype("<i2")
    pcm[:2] = [-32768, 32767]
    blob = members.canonical_wav_bytes(pcm)
    assert len(blob) == 44 + 320000
    np.testing.assert_array_equal(members.parse_canonical_wav(blob, 160000), pcm)
    # any other WAV reader sees the same samples
    data, rate = sf.read(io.BytesIO(blob), dtype="int16")
    assert rate == 16000
    np.testing.assert_array_equal(data, pcm)


def test_canonical_wav_bytes_refuses_non_int16():
    with pytest.raises(ValueError, match="1-D int16"):
        members.canonical_wav_bytes(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="1-D int16"):
        members.canonical_wav_bytes(np.zeros((10, 2), "<i2"))


def _sf_wav(n: int, rate: int = 16000, channels: int = 1, subtype: str = "PCM_16") -> bytes:
    """A WAV that libsndfile writes, cut or padded to 244 bytes (the size for 100 samples)."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros((n, channels)), rate, subtype=subtype, format="WAV")
    return buf.getvalue()[:244].ljust(244, b"\0")


@pytest.mark.parametrize(
    "blob_fn, reason",
    [
        (
            lambda: members.canonical_wav_bytes(np.zeros(99, "<i2")),
            "WAV is 242 bytes, expected 244",
        ),
        (
            lambda: b"RIFX" + members.canonical_wav_bytes(np.zeros(100, "<i2"))[4:],
            "not a RIFF/WAVE",
        ),
        (lambda: _sf_wav(50, channels=2), "2 channels, expected mono"),
        (lambda: _sf_wav(100, rate=22050), "sample rate 22050, expected 16000"),
        (lambda: _sf_wav(100, subtype="FLOAT"), "canonical 44-byte layout|format tag 3"),
        (lambda: _sf_wav(100, subtype="PCM_U8"), "format tag 1 with 8 bits"),
        (lambda: members.wav_header(50) + bytes(200), "data chunk of 100 bytes, expected 200"),
    ],
)
def test_parse_canonical_wav_names_what_differs(blob_fn, reason):
    with pytest.raises(MemberError, match=reason):
        members.parse_canonical_wav(blob_fn(), 100)


# ---------------------------------------------------------------- reading any input


def test_read_16k_pcm16_is_exact(tmp_path):
    pcm = np.random.default_rng(2).integers(-32768, 32768, 40000).astype("<i2")
    write(tmp_path / "a.wav", pcm, 16000, "PCM_16")
    x = audio.read_audio(tmp_path / "a.wav")
    assert x.dtype == np.float32 and x.shape == (40000,)
    np.testing.assert_array_equal(members.to_pcm16(x), pcm)
    np.testing.assert_array_equal(x, pcm / np.float32(32768))


@pytest.mark.parametrize(
    "rate, channels, subtype, fmt",
    [
        (22050, 1, "PCM_16", "WAV"),
        (44100, 2, "PCM_16", "WAV"),
        (44100, 2, "PCM_24", "WAV"),
        (48000, 1, "FLOAT", "WAV"),
        (48000, 2, "PCM_32", "WAV"),
        (8000, 1, "PCM_16", "WAV"),
        (44100, 2, "PCM_16", "FLAC"),
        (16000, 3, "PCM_24", "FLAC"),
    ],
)
def test_read_resamples_and_downmixes(tmp_path, rate, channels, subtype, fmt):
    seconds, freq = 2.0, 440.0
    # channel c carries the sine at amplitude 0.3 * (c + 1): the mean is 0.3 * (channels + 1) / 2
    x = np.stack([sine(seconds, rate, freq, 0.3 * (c + 1) / channels) for c in range(channels)], 1)
    path = write(tmp_path / f"a.{fmt.lower()}", x, rate, subtype, fmt)
    got = audio.read_audio(path)
    assert got.dtype == np.float32 and got.ndim == 1
    assert abs(len(got) - seconds * 16000) <= 1
    want = sine(seconds, 16000, freq, 0.3 * (channels + 1) / 2 / channels)[: len(got)]
    mid = slice(800, len(got) - 800)  # away from the resampler's edges
    assert np.abs(got[mid] - want[mid]).max() < 2e-3
    # the level is right too (a wrong downmix or gain would show here)
    assert np.sqrt(np.mean(got[mid] ** 2)) == pytest.approx(
        np.sqrt(np.mean(want[mid] ** 2)), rel=1e-3
    )


def test_read_unreadable_inputs(tmp_path):
    (tmp_path / "garbage.wav").write_bytes(np.random.default_rng(3).bytes(5000))
    (tmp_path / "empty.wav").write_bytes(b"")
    whole = write(tmp_path / "w.wav", sine(1, 16000, 200, 0.5), 16000, "PCM_16").read_bytes()
    (tmp_path / "head.wav").write_bytes(whole[:30])
    for name in ("garbage.wav", "empty.wav", "head.wav", "missing.wav"):
        with pytest.raises(AudioError, match="unreadable audio"):
            audio.read_audio(tmp_path / name)


def test_read_no_samples_and_non_finite(tmp_path):
    write(tmp_path / "zero.wav", np.zeros(0), 16000, "PCM_16")
    with pytest.raises(AudioError, match="no samples"):
        audio.read_audio(tmp_path / "zero.wav")
    x = sine(0.5, 16000, 200, 0.5)
    x[100] = np.nan
    write(tmp_path / "nan.wav", x, 16000, "FLOAT")
    with pytest.raises(AudioError, match="NaN or inf"):
        audio.read_audio(tmp_path / "nan.wav")


def test_wav_cut_short_is_an_error_not_a_shorter_take(tmp_path):
    """libsndfile would read what is there; a truncated file must be rejected, not trimmed."""
    import soundfile as sf

    from pipeline.convert.audio import read_audio

    path = tmp_path / "cut.wav"
    sf.write(path, np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    assert read_audio(path).shape == (16000,)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(AudioError, match="truncated"):
        read_audio(path)
