"""Audio in and out: any WAV/FLAC to mono float at 16 kHz; the canonical PCM16 WAV of a shard.

The canonical WAV has a fixed 44-byte header (RIFF, one ``fmt `` chunk of 16 bytes, ``data``),
so the GPU path can slice the header off raw bytes and reinterpret the rest as int16 without
any CPU decoding. ``parse_canonical_wav`` is the single check of that promise.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
WAV_HEADER_BYTES = 44
PCM16_SCALE = 32768.0  # int16 -> float: x / 32768, exact in float32 (a power of two)


class AudioError(ValueError):
    """Audio that cannot be used; the message says why."""


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read WAV (PCM 16/24/32-bit or float, any rate and channel count) or FLAC.

    Returns mono float32 at ``sample_rate``: channels are averaged, then resampled with soxr
    (high quality). Unreadable, truncated or non-finite audio raises AudioError.
    """
    import soundfile as sf
    import soxr

    if str(path).lower().endswith(".wav"):
        try:
            _check_wav_complete(Path(path))
        except OSError as exc:
            raise AudioError(f"unreadable audio: {exc}") from None
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError, TypeError, ValueError) as exc:
        raise AudioError(f"unreadable audio: {exc}") from None
    if data.shape[0] == 0:
        raise AudioError("audio has no samples")
    if not np.isfinite(data).all():
        raise AudioError("audio contains NaN or inf")
    mono = data.mean(axis=1, dtype=np.float32)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32)
    return mono


def _check_wav_complete(path: Path) -> None:
    """libsndfile reads a WAV cut short without complaint; compare the data chunk's declared
    size with the bytes that are really there."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            return  # not RIFF: soundfile will say what it is
        size = path.stat().st_size
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return
            cid, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                have = size - f.tell()
                if length != 0xFFFFFFFF and have < length:
                    raise AudioError(
                        f"WAV is truncated: its header promises {length} bytes of audio, "
                        f"the file holds {have}"
                    )
                return
            f.seek(length + (length & 1), 1)


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] to int16 (clipped, rounded)."""
    return np.clip(np.round(np.asarray(x, np.float64) * PCM16_SCALE), -32768, 32767).astype("<i2")


def wav_header(num_samples: int, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The 44-byte header of a mono PCM16 WAV with ``num_samples`` samples."""
    data_bytes = 2 * num_samples
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,
        1,
        sample_rate,
        2 * sample_rate,
        2,
        16,
        b"data",
        data_bytes,
    )


def canonical_wav_bytes(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Encode int16 samples as the canonical WAV (44-byte header + little-endian PCM16)."""
    pcm = np.asarray(pcm)
    if pcm.dtype != np.dtype("<i2") or pcm.ndim != 1:
        raise AudioError(f"canonical WAV needs 1-D int16 samples, got {pcm.dtype} {pcm.shape}")
    return wav_header(len(pcm), sample_rate) + pcm.tobytes()


def check_wav_header(head: bytes, num_samples: int, sample_rate: int = SAMPLE_RATE) -> None:
    """Raise AudioError naming the first field of a 44-byte header that is not canonical."""
    if head == wav_header(num_samples, sample_rate):
        return
    if len(head) < WAV_HEADER_BYTES:
        raise AudioError(f"not a canonical WAV: header is {len(head)} bytes, expected 44")
    riff, _, wave, fmt, fmt_len, tag, ch, rate, _, _, bits, data, data_len = struct.unpack(
        "<4sI4s4sIHHIIHH4sI", head[:WAV_HEADER_BYTES]
    )
    if riff != b"RIFF" or wave != b"WAVE":
        reason = "not a RIFF/WAVE file"
    elif fmt != b"fmt " or fmt_len != 16 or data != b"data":
        reason = "header is not the canonical 44-byte layout (fmt chunk of 16, then data)"
    elif tag != 1 or bits != 16:
        reason = f"format tag {tag} with {bits} bits, expected PCM (1) 16-bit"
    elif ch != 1:
        reason = f"{ch} channels, expected mono"
    elif rate != sample_rate:
        reason = f"sample rate {rate}, expected {sample_rate}"
    elif data_len != 2 * num_samples:
        reason = f"data chunk of {data_len} bytes, expected {2 * num_samples}"
    else:
        reason = "header fields differ from the canonical header"
    raise AudioError(f"not a canonical WAV: {reason}")


def parse_canonical_wav(
    blob: bytes, num_samples: int, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Check that ``blob`` is exactly the canonical WAV and return its int16 samples.

    Raises AudioError naming the first field that differs (size, magic, format, rate,
    channels, bits, data size).
    """
    expected = WAV_HEADER_BYTES + 2 * num_samples
    if len(blob) != expected:
        raise AudioError(
            f"WAV is {len(blob)} bytes, expected {expected} "
            f"(44-byte header + {num_samples} PCM16 samples)"
        )
    check_wav_header(blob[:WAV_HEADER_BYTES], num_samples, sample_rate)
    return np.frombuffer(blob, dtype="<i2", offset=WAV_HEADER_BYTES)
