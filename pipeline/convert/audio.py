"""Input audio: any WAV (PCM or float, any rate and channel count) or FLAC to mono float32 at
the shards' rate. The shards' own WAV members are ``pipeline.shards.members``' business."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from core.errors import AudioError
from pipeline.shards.members import SAMPLE_RATE


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
