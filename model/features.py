"""Log-mel front end in torch: runs on whatever device the batch is on, nothing downloaded."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.members import SAMPLE_RATE


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
        with torch.autocast(wav.device.type, enabled=False):  # the FFT wants float32
            spec = torch.stft(
                wav.float(),
                self.n_fft,
                self.hop_length,
                self.win_length,
                self.window,
                center=True,
                return_complex=True,
            )
            power = spec.real.square() + spec.imag.square()
            return torch.log(torch.matmul(self.fb, power) + 1e-6) / math.log(10.0)
