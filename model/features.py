"""The log-mel features, defined once and computed two ways: ``LogMel`` in torch (the model's
front end, on whatever device the batch is on) and ``dali_log_mel`` in a DALI graph (the
loader's ``features: mel``). Both: a periodic Hann window of ``win_length`` centred in
``n_fft``, frames centred at ``i * hop`` with reflect padding (``N // hop + 1`` frames), power
spectrum, HTK-mel triangles with Slaney's area normalisation, then ``log10(x + 1e-6)``.
tests/test_features.py holds them equal (about 2e-5 in log10 units, float32 rounding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from core.constants import SAMPLE_RATE

FLOOR = 1e-6  # added to the mel power before the log: silence gives -6, not -inf
FEATURES = ("wav", "mel")  # what a loader yields and a model takes: raw audio or log-mel


@dataclass(frozen=True)
class Mel:
    """The log-mel settings: one source for the model's front end and the loader's graph."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 512
    win_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms: 100 frames per second
    n_mels: int = 64
    fmin: float = 40.0
    fmax: float = 7600.0

    def frames(self, num_samples: int) -> int:
        """Frames of ``num_samples`` of audio: frame i is centred at sample i * hop."""
        return num_samples // self.hop_length + 1

    def to_dict(self) -> dict:
        return asdict(self)


def dali_log_mel(audio, mel: Mel):
    """The DALI graph's log-mel of float32 ``audio`` [N] (a DataNode on the CPU or the GPU):
    ``[n_mels, N // hop + 1]``, equal to ``LogMel``. DALI's own Hann window is shifted by half
    a sample from torch's, so torch's is passed; DALI places the window at the start of the
    ``n_fft`` buffer and torch centres it, which only rotates the buffer (same power)."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    spec = fn.spectrogram(
        audio,
        nfft=mel.n_fft,
        window_length=mel.win_length,
        window_step=mel.hop_length,
        window_fn=torch.hann_window(mel.win_length, dtype=torch.float64).tolist(),
        center_windows=True,
        reflect_padding=True,
        power=2,
        layout="ft",
    )
    bank = fn.mel_filter_bank(
        spec,
        sample_rate=mel.sample_rate,
        nfilter=mel.n_mels,
        freq_low=mel.fmin,
        freq_high=mel.fmax,
        mel_formula="htk",
        normalize=True,
    )
    return dmath.log10(bank + FLOOR)


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_filterbank(
    n_fft: int, n_mels: int, sample_rate: int, fmin: float, fmax: float
) -> torch.Tensor:
    """Triangular HTK-mel filters, ``[n_mels, n_fft // 2 + 1]``, each with unit area in Hz bins."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(
        float(hz_to_mel(fmin)), float(hz_to_mel(fmax)), n_mels + 2, dtype=torch.float64
    )
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    lower, center, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs - lower) / (center - lower)
    down = (upper - freqs) / (upper - center)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)
    fb = fb * (2.0 / (upper - lower))  # Slaney-style area normalisation
    return fb.float()


class LogMel(nn.Module):
    """``wav [B, N]`` -> ``log-mel [B, n_mels, N // hop + 1]`` (frame i centred at i * hop)."""

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = 512,
        win_length: int = 400,
        hop_length: int = 160,
        n_mels: int = 64,
        fmin: float = 40.0,
        fmax: float = 7600.0,
    ) -> None:
        super().__init__()
        self.settings = Mel(sample_rate, n_fft, win_length, hop_length, n_mels, fmin, fmax)
        self.sample_rate = sample_rate
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        self.register_buffer(
            "fb", mel_filterbank(n_fft, n_mels, sample_rate, fmin, fmax), persistent=False
        )

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        # the FFT in the buffers' precision: float32 (float64 for a model made .double())
        with torch.autocast(wav.device.type, enabled=False):
            spec = torch.stft(
                wav.to(self.window.dtype),
                self.n_fft,
                self.hop_length,
                self.win_length,
                self.window,
                center=True,
                return_complex=True,
            )
            power = spec.real.square() + spec.imag.square()
            return torch.log(torch.matmul(self.fb, power) + FLOOR) / math.log(10.0)
