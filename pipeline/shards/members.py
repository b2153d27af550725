"""The members of a sample, as bytes: the canonical PCM16 WAV and the float32 npy.

The canonical WAV has a fixed 44-byte header (RIFF, one ``fmt `` chunk of 16 bytes, ``data``)
and the npy a header fixed per dataset, so the GPU path slices headers off raw bytes and
reinterprets the rest without any CPU decoding. The checks here are the single statement of
that promise; ``decode_sample`` is the Python readers' decode, with DALI's arithmetic.
"""

from __future__ import annotations

import io
import struct
from typing import Protocol

import numpy as np

from core.constants import SAMPLE_RATE
from core.errors import MemberError

WAV_HEADER_BYTES = 44
PCM16_SCALE = 32768.0  # int16 -> float: x / 32768, exact in float32 (a power of two)
WAV_EXT, NPY_EXT, JSON_EXT = "wav", "arkit.npy", "json"  # member extensions (after the key)
_WAV_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")


class SampleLayout(Protocol):
    """What decoding a sample needs to know (a Manifest has it)."""

    sample_rate: int
    clip_samples: int
    frames: int
    num_blendshapes: int


# ---------------------------------------------------------------- WAV


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] to int16 (clipped, rounded)."""
    return np.clip(np.round(np.asarray(x, np.float64) * PCM16_SCALE), -32768, 32767).astype("<i2")


def wav_header(num_samples: int, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The 44-byte header of a mono PCM16 WAV with ``num_samples`` samples."""
    data_bytes = 2 * num_samples
    return _WAV_HEADER.pack(
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


def wav_bytes(num_samples: int) -> int:
    """Size of a canonical WAV member of ``num_samples`` samples."""
    return WAV_HEADER_BYTES + 2 * num_samples


def canonical_wav_bytes(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Encode int16 samples as the canonical WAV (44-byte header + little-endian PCM16)."""
    pcm = np.asarray(pcm)
    if pcm.dtype != np.dtype("<i2") or pcm.ndim != 1:
        raise ValueError(f"canonical WAV needs 1-D int16 samples, got {pcm.dtype} {pcm.shape}")
    return wav_header(len(pcm), sample_rate) + pcm.tobytes()


def check_wav_header(head: bytes, num_samples: int, sample_rate: int = SAMPLE_RATE) -> None:
    """Raise MemberError naming the first field of a 44-byte header that is not canonical."""
    if head == wav_header(num_samples, sample_rate):
        return
    if len(head) < WAV_HEADER_BYTES:
        raise MemberError(
            f"not a canonical WAV: header is {len(head)} bytes, expected {WAV_HEADER_BYTES}"
        )
    riff, _, wave, fmt, fmt_len, tag, ch, rate, _, _, bits, data, data_len = _WAV_HEADER.unpack(
        head[:WAV_HEADER_BYTES]
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
    raise MemberError(f"not a canonical WAV: {reason}")


def parse_canonical_wav(
    blob: bytes, num_samples: int, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Check that ``blob`` is exactly the canonical WAV and return its int16 samples.

    Raises MemberError naming the first field that differs (size, magic, format, rate,
    channels, bits, data size).
    """
    if len(blob) != wav_bytes(num_samples):
        raise MemberError(
            f"WAV is {len(blob)} bytes, expected {wav_bytes(num_samples)} "
            f"(44-byte header + {num_samples} PCM16 samples)"
        )
    check_wav_header(blob[:WAV_HEADER_BYTES], num_samples, sample_rate)
    return np.frombuffer(blob, dtype="<i2", offset=WAV_HEADER_BYTES)


# ---------------------------------------------------------------- npy


def npy_member(arr: np.ndarray) -> bytes:
    """A float32 C-order array as npy bytes (never pickled)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr, dtype="<f4"), allow_pickle=False)
    return buf.getvalue()


def canonical_npy_header(frames: int, width: int) -> bytes:
    """The npy header of a float32 [frames, width] C-order array (fixed per dataset)."""
    return npy_member(np.zeros((frames, width), np.float32))[: -4 * frames * width]


def npy_bytes(frames: int, width: int) -> int:
    """Size of a float32 [frames, width] npy member, header included."""
    return len(canonical_npy_header(frames, width)) + 4 * frames * width


def parse_arkit_npy(blob: bytes, frames: int, width: int) -> np.ndarray:
    """Check that ``blob`` is a float32 [frames, width] C-order npy and return the array.

    Never unpickles. Raises MemberError naming what differs.
    """
    head = canonical_npy_header(frames, width)
    if len(blob) == len(head) + 4 * frames * width and blob.startswith(head):
        return np.frombuffer(blob, dtype="<f4", offset=len(head)).reshape(frames, width)
    try:
        arr = np.lib.format.read_array(io.BytesIO(blob), allow_pickle=False)
    except Exception as exc:  # numpy raises many types for bytes that are not npy
        raise MemberError(f"not a readable npy array ({exc})") from None
    raise MemberError(
        f"npy holds {arr.dtype} {tuple(arr.shape)}, expected float32 ({frames}, {width})"
    )


def check_blendshape_values(arkit: np.ndarray) -> None:
    """Raise MemberError unless every value is finite and in [0, 1]."""
    if not np.isfinite(arkit).all():
        raise MemberError("arkit has NaN or inf")
    if arkit.size and (arkit.min() < 0 or arkit.max() > 1):
        raise MemberError("arkit outside [0, 1]")


# ---------------------------------------------------------------- a whole sample


def decode_sample(wav: bytes, npy: bytes, layout: SampleLayout) -> tuple[np.ndarray, np.ndarray]:
    """Raw member bytes -> (audio float32 [clip_samples], arkit float32 [frames, 52]), checked.

    The Python readers' decode (the torch baseline, the webdataset row): int16 / 32768, the
    same arithmetic as DALI's. Raises MemberError naming what is wrong.
    """
    pcm = parse_canonical_wav(wav, layout.clip_samples, layout.sample_rate)
    arkit = parse_arkit_npy(npy, layout.frames, layout.num_blendshapes)
    check_blendshape_values(arkit)
    return pcm.astype(np.float32) * np.float32(1 / PCM16_SCALE), arkit.copy()
