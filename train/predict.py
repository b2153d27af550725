"""From a checkpoint and audio of any length to blendshapes at the model's frame rate.

A sequence model sees one window (10 s) at a time and its frames near a window's edges see
padding instead of audio, so long audio is cut into windows that overlap: each window keeps
only its frames at least ``margin`` frames from its edges (more than the model's reach,
``model.reach``: about 0.3 s each way), and neighbours crossfade over ``fade`` frames. Every
kept frame is then what the model on the whole file, followed by silence, gives (what a
stream gives: ``infer.stream``), and no seam shows. A ``first_frame`` model predicts the
frame at the start of its clip from the next 0.3 s, so it slides: one clip per output frame,
starting at that frame's sample.

Frame k sits at k / fps seconds and its audio at sample round(k * rate / fps): the shard
format's alignment rule, so a prediction lines up with its audio as the training data did.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.constants import FPS, SAMPLE_RATE, WINDOW_FRAMES
from core.errors import ConfigError, ResumeError
from model import build_model
from train.checkpoint import load_checkpoint

DEVICES = "auto, cpu, cuda, cuda:N"


def pick_device(device: str) -> torch.device:
    """``--device``: auto (CUDA when there is one), cpu, cuda or cuda:N; a name torch does not
    run here (mps, a CUDA device this machine lacks, a typo) is a ConfigError naming it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ConfigError(f"--device {device} is not a device infer runs on: choose {DEVICES}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(
            f"--device {device} but CUDA is not available here: use --device cpu (or auto)"
        )
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ConfigError(
            f"--device {device} but this machine has {count} CUDA device"
            f"{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})"
        )
    return torch.device(device)


def load_model(path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The checkpoint's model, built as it was trained (its ``model_args``), in eval mode."""
    state = load_checkpoint(path)
    args = state.get("model_args")
    if not isinstance(args, dict) or "name" not in args or "target" not in args:
        raise ResumeError(
            f"checkpoint {path} does not record how its model was built (no model_args: "
            "written by an older trainer); resume it once with this one to rewrite it"
        )
    kw = {k: v for k, v in args.items() if k not in ("name", "target")}
    try:
        model = build_model(args["name"], args["target"], **kw)
        model.load_state_dict(state["model"])
    except (ConfigError, TypeError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ResumeError(
            f"checkpoint {path} holds a model this code cannot rebuild ({first})"
        ) from None
    return model.to(device).eval(), state


@dataclass
class Predictor:
    """A model ready to turn audio into ``[T, num_blendshapes]`` at ``fps``: a torch model or
    an exported one (``model.onnx_model.OnnxModel``), called the same way."""

    model: nn.Module
    target: str  # "sequence" or "first_frame"
    sample_rate: int
    fps: float
    window_frames: int  # a sequence model's frames per window
    device: torch.device
    batch_size: int = 16
    margin: int | None = None  # frames dropped at each inner window edge (None: window / 10)
    fade: int | None = None  # frames two windows crossfade over (None: window / 10)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", batch_size: int = 16
    ) -> Predictor:
        dev = pick_device(device)
        model, state = load_model(path, dev)
        a = state["model_args"]
        # a first_frame model has no window of its own: the format's window, for --eval
        frames, fps = int(a.get("frames", WINDOW_FRAMES)), float(a.get("fps", FPS))
        rate = int(a.get("sample_rate", SAMPLE_RATE))
        return cls(model, a["target"], rate, fps, frames, dev, batch_size)

    @classmethod
    def from_onnx(
        cls, path: str | Path, batch_size: int = 16, threads: int | None = None
    ) -> Predictor:
        """A file of ``python -m infer.export``, run by ONNX Runtime on the CPU (``threads``:
        its intra-op threads, None: one per core); onnxruntime is imported here only."""
        from model.onnx_model import OnnxModel

        m = OnnxModel(path, threads)
        return cls(m, m.target, m.sample_rate, m.fps, m.frames, torch.device("cpu"), batch_size)

    # ------------------------------------------------------------ sizes
    @property
    def window_samples(self) -> int:
        return self.sample(self.window_frames)

    def sample(self, frame: int) -> int:
        """The audio sample frame ``frame`` sits on."""
        return int(round(frame * self.sample_rate / self.fps))

    def frames_for(self, num_samples: int) -> int:
        """Output frames for audio of ``num_samples``: every frame time inside the audio."""
        return max(1, math.ceil(num_samples * self.fps / self.sample_rate - 1e-9))

    def _edges(self, n_out: int | None = None) -> tuple[int, int, int]:
        """margin, fade and step of the windows for ``n_out`` frames (None: more than a
        window's). A sequence model's margin covers its reach (``model.reach``: a kept frame
        never reads a window's edge) and its step is whole periods of the reach, so every
        window starts on the reach's grid and computes its frames as the whole file does."""
        w = self.window_frames
        reach = getattr(self.model, "reach", None)
        most, period = 0, 1
        if reach is not None:
            most = math.ceil(max(reach.lookahead_samples, reach.history_samples) / reach.grid)
            most, period = most * reach.period, reach.period
        margin = max(1, w // 10, most) if self.margin is None else self.margin
        fade = max(1, w // 10) if self.fade is None else self.fade
        step = (w - 2 * margin - fade) // period * period
        if step < 1 and (n_out is None or n_out + margin > w):  # more than one window
            raise ConfigError(
                f"window of {w} frames is too short for margin {margin}, fade {fade} (the "
                f"model reads {most} frames around each one)"
            )
        return margin, fade, step

    # ------------------------------------------------------------ prediction
    @torch.inference_mode()
    def window_batch(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav [B, window_samples]`` -> ``[B, window_frames, nb]``: every frame of each window
        (a first_frame model slides over it, its last clips running into zeros)."""
        wav = wav.to(self.device, torch.float32)
        if self.target == "sequence":  # every frame time of the audio: the window's and more
            return self._net(wav)[:, : self.window_frames]
        padded = torch.nn.functional.pad(wav, (0, self.window_samples))
        starts = [self.sample(k) for k in range(self.window_frames)]
        return torch.stack([self._slide(row, starts) for row in padded])

    def _slide(self, audio: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """First-frame predictions for clips of ``audio`` (1-D, on the device) at ``starts``."""
        need = self.model.clip_samples
        out = []
        for i in range(0, len(starts), self.batch_size * 16):
            idx = torch.tensor(starts[i : i + self.batch_size * 16], device=audio.device)
            clips = audio[idx[:, None] + torch.arange(need, device=audio.device)]
            out.append(self._net(clips))
        return torch.cat(out)

    def _net(self, wav: torch.Tensor) -> torch.Tensor:
        """The model on raw audio; a model trained on the loader's log-mel gets its own front
        end's log-mel of it (the loader's equals it: ``model.features``)."""
        if getattr(self.model, "features", "wav") == "mel":
            return self.model(self.model.mel(wav)).float()
        return self.model(wav).float()

    @torch.inference_mode()
    def predict(self, audio: np.ndarray, progress: bool | None = None) -> np.ndarray:
        """Mono float32 audio at ``sample_rate``, any length -> ``[T, nb]`` float32 at ``fps``,
        T = frames_for(len(audio)). ``progress``: a bar (None: only on a terminal, for long
        inputs)."""
        from tqdm import tqdm

        n_out = self.frames_for(len(audio))
        audio_t = torch.as_tensor(np.ascontiguousarray(audio, np.float32))
        if self.target != "sequence":
            need = self.model.clip_samples
            padded = torch.nn.functional.pad(audio_t, (0, need)).to(self.device)
            starts = [self.sample(k) for k in range(n_out)]
            chunks = range(0, n_out, 4096)
            bar = tqdm(chunks, desc="frames", unit="chunk", disable=_quiet(progress, len(chunks)))
            parts = [self._slide(padded, starts[i : i + 4096]) for i in bar]
            return torch.cat(parts).cpu().numpy()[:n_out]
        margin, fade, step = self._edges(n_out)
        w = self.window_frames
        # the last window runs at least a margin past the audio: the end is followed by silence,
        # not by a window's edge (a stream's flush gives the same frames)
        n_win = 1 if n_out + margin <= w else 1 + math.ceil((n_out + margin - w) / step)
        total = (n_win - 1) * step + w
        end = max(self.sample(total), self.sample((n_win - 1) * step) + self.window_samples)
        audio_t = torch.nn.functional.pad(audio_t, (0, end - len(audio_t)))
        acc = torch.zeros(total, 1, dtype=torch.float64)
        out = None
        ramp = (torch.arange(fade, dtype=torch.float64) + 0.5) / fade
        batches = range(0, n_win, self.batch_size)
        for b in tqdm(batches, desc="windows", unit="batch", disable=_quiet(progress, n_win)):
            js = range(b, min(b + self.batch_size, n_win))
            wav = torch.stack([audio_t[self.sample(j * step) :][: self.window_samples] for j in js])
            pred = self.window_batch(wav).double().cpu()
            if out is None:
                out = torch.zeros(total, pred.shape[-1], dtype=torch.float64)
            for row, j in zip(pred, js, strict=True):
                wt = torch.ones(w, dtype=torch.float64)
                if j > 0:  # drop the left margin, fade in
                    wt[:margin] = 0
                    wt[margin : margin + fade] = ramp
                if j < n_win - 1:  # fade out, drop the right margin
                    wt[w - margin - fade : w - margin] = ramp.flip(0)
                    wt[w - margin :] = 0
                s = j * step
                out[s : s + w] += wt[:, None] * row
                acc[s : s + w] += wt[:, None]
        return (out / acc)[:n_out].float().numpy()


def _quiet(progress: bool | None, units: int) -> bool | None:
    """tqdm's ``disable``: off when asked, on when asked, else on a terminal past 8 units."""
    if progress is None:
        return None if units > 8 else True
    return not progress
