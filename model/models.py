"""Audio -> ARKit blendshape models, ending in a sigmoid ([0, 1]). Each takes what its
``features`` says: ``wav [B, N]`` (its own log-mel front end runs) or the loader's log-mel
``[B, n_mels, T]`` (``data.features: mel``; the front end is skipped). A model refuses the other
kind of input, so a checkpoint cannot silently be fed what it was not trained on."""

from __future__ import annotations

import torch
from torch import nn

from core.arkit import NUM_BLENDSHAPES
from core.constants import FPS, WINDOW_FRAMES
from core.errors import ConfigError
from model.features import FEATURES, LogMel
from model.reach import fit


class FrontEnd(nn.Module):
    """The log-mel of ``wav`` for a ``features="wav"`` model, the given log-mel for "mel"."""

    def __init__(self, features: str, n_mels: int, **mel) -> None:
        super().__init__()
        if features not in FEATURES:
            raise ConfigError(f"unknown features {features!r}: choose {' or '.join(FEATURES)}")
        self.features = features
        self.mel = LogMel(n_mels=n_mels, **mel)
        self.n_mels = n_mels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features == "wav":
            if x.dim() != 2:
                raise ValueError(
                    f"this model was trained on raw audio [B, samples]; got {tuple(x.shape)} "
                    "(log-mel? set data.features: wav)"
                )
            return self.mel(x)
        if x.dim() != 3 or x.shape[1] != self.n_mels:
            raise ValueError(
                f"this model was trained on log-mel [B, {self.n_mels}, frames]; got "
                f"{tuple(x.shape)} (raw audio? set data.features: mel)"
            )
        return x


class Conv(nn.Conv1d):
    """A ``Conv1d`` whose output at step i sees its input up to step i + ``right`` (zero padding
    ``span - right`` on the left, ``right`` on the right; ``span = dilation * (kernel - 1)``).
    ``right = span // 2`` is the symmetric, "same" convolution; 0 is causal. Its parameters are
    ``Conv1d``'s, so a checkpoint of either loads into the other."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1, right=None) -> None:
        super().__init__(cin, cout, kernel, dilation=dilation)
        self.span = dilation * (kernel - 1)
        self.right = self.span // 2 if right is None else right
        if not 0 <= self.right <= self.span:
            raise ValueError(f"right context {self.right} is outside 0..{self.span}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (self.span - self.right, self.right)))


def conv_block(
    cin: int, cout: int, kernel: int = 5, dilation: int = 1, right: int | None = None
) -> nn.Sequential:
    return nn.Sequential(Conv(cin, cout, kernel, dilation, right), nn.BatchNorm1d(cout), nn.GELU())


class SimplifiedModel(nn.Module):
    """One frame of 52 blendshapes: the first frame's, from the start of the clip.

    Frame 0 of a window sits at t = 0, so only the first ``context_seconds`` of audio are
    looked at (the rest of the clip says nothing about it).
    """

    def __init__(
        self,
        n_mels: int = 64,
        hidden: int = 128,
        context_seconds: float = 0.3,
        num_blendshapes: int = NUM_BLENDSHAPES,
        features: str = "wav",
        **mel,
    ) -> None:
        super().__init__()
        self.num_blendshapes = num_blendshapes
        self.front = FrontEnd(features, n_mels, **mel)
        self.mel = self.front.mel
        # the log-mel frames whose whole FFT window lies in the first context_seconds: they are
        # the same computed from the clip alone or from the whole window (the loader's log-mel)
        seen = int(round(context_seconds * self.mel.sample_rate))
        self.context = max(1, (seen - self.mel.n_fft // 2) // self.mel.hop_length + 1)
        self.norm = nn.BatchNorm1d(n_mels)
        self.body = nn.Sequential(conv_block(n_mels, hidden, 3), conv_block(hidden, hidden, 3))
        self.head = nn.Linear(2 * hidden, num_blendshapes)

    @property
    def features(self) -> str:
        return self.front.features

    @property
    def clip_samples(self) -> int:
        """The audio the ``context`` log-mel frames see: up to the last frame's centre plus
        half an FFT (within ``context_seconds``), so they equal the whole clip's log-mel."""
        return (self.context - 1) * self.mel.hop_length + self.mel.n_fft // 2 + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features == "wav":  # only the audio the first frames look at
            x = x[:, : self.clip_samples]
        x = self.norm(self.front(x)[:, :, : self.context])  # [B, n_mels, context]
        h = self.body(x)
        # the first frames matter most: their own features plus the context's average
        feat = torch.cat([h[:, :, :3].mean(-1), h.mean(-1)], dim=1)
        return torch.sigmoid(self.head(feat))


class SequenceModel(nn.Module):
    """All frames: ``[B, frames, 52]`` at ``fps`` from the whole clip; frame k at k / fps s, for
    every frame time before the clip's last mel frame (``frames`` for a training window).

    ``lookahead_seconds`` (None: unbounded, about 0.3 s) bounds how far past its own time a
    frame reads the audio: the convolutions then look back what they do not look ahead
    (``model.reach``), so frames can be streamed with that delay.
    """

    ENCODER = ((5, 1), (5, 1))  # (kernel, dilation) of the mel-rate convolutions
    CONTEXT = ((3, 1), (3, 2), (3, 4))  # ... and of the frame-rate ones

    def __init__(
        self,
        n_mels: int = 64,
        hidden: int = 128,
        frames: int = WINDOW_FRAMES,
        fps: float = FPS,
        num_blendshapes: int = NUM_BLENDSHAPES,
        features: str = "wav",
        lookahead_seconds: float | None = None,
        **mel,
    ) -> None:
        super().__init__()
        self.frames, self.fps = frames, fps
        self.num_blendshapes = num_blendshapes
        self.front = FrontEnd(features, n_mels, **mel)
        self.mel = self.front.mel
        self.reach = fit(
            lookahead_seconds,
            self.mel.sample_rate,
            self.mel.hop_length,
            self.mel.n_fft,
            self.mel.win_length,
            fps,
            tuple(d * (k // 2) for k, d in self.ENCODER),
            tuple(d * (k // 2) for k, d in self.CONTEXT),
        )
        self.norm = nn.BatchNorm1d(n_mels)
        enc, ctx, r = self.ENCODER, self.CONTEXT, self.reach
        self.encoder = nn.Sequential(
            *(
                conv_block(n_mels if i == 0 else hidden, hidden, k, d, right)
                for i, ((k, d), right) in enumerate(zip(enc, r.encoder_right, strict=True))
            )
        )
        self.context = nn.Sequential(
            *(
                conv_block(hidden, hidden, k, d, right)
                for (k, d), right in zip(ctx, r.context_right, strict=True)
            )
        )
        self.head = nn.Conv1d(hidden, num_blendshapes, 1)

    @property
    def features(self) -> str:
        return self.front.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.front(x))  # [B, n_mels, T] at 100 fps
        h = self.encoder(x)
        # frame k sits at mel position k * a / b (mel frame j is centred at j * hop samples):
        # sample h there, between the mel frames at or before and at or after it; integers,
        # so the frames on a mel frame read only that one (``model.reach`` counts on it)
        r = self.reach
        a, b = r.sample_rate * r.fps_den, r.hop * r.fps_num
        frames = ((h.shape[-1] - 1) * b + a - 1) // a  # the frame times before the last mel frame
        pos = torch.arange(frames, device=h.device) * a
        lo, rem = pos // b, pos % b
        hi = lo + (rem > 0).long()
        w = rem.to(h.dtype) / b
        h = h[:, :, lo] * (1 - w) + h[:, :, hi] * w  # [B, hidden, frames]
        h = h + self.context(h)
        return torch.sigmoid(self.head(h)).transpose(1, 2)  # [B, frames, 52]


MODELS = {"simplified": SimplifiedModel, "sequence": SequenceModel}


def build_model(name: str, target: str, **kw) -> nn.Module:
    """``name`` in MODELS, or "auto": simplified for target first_frame, sequence otherwise.

    The model remembers how it was built (``model.build_args``), which checkpoints record.
    """
    if target not in ("first_frame", "sequence"):
        raise ConfigError(f"unknown target {target!r}: choose first_frame or sequence")
    if name == "auto":
        name = "simplified" if target == "first_frame" else "sequence"
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: choose from auto, {', '.join(MODELS)}")
    if target == "first_frame" and name != "simplified":
        raise ConfigError("target first_frame needs model simplified (or auto)")
    if target == "sequence" and name != "sequence":
        raise ConfigError("target sequence needs model sequence (or auto)")
    if name == "simplified":
        kw.pop("frames", None)
        kw.pop("fps", None)
        if kw.pop("lookahead_seconds", None) is not None:
            raise ConfigError(
                "model.lookahead_seconds bounds the sequence model; the simplified model "
                "looks model.context_seconds ahead of its frame"
            )
    else:
        kw.pop("context_seconds", None)
    model = MODELS[name](**kw)
    model.build_args = {"name": name, "target": target, **kw}
    return model
