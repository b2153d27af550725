"""A model exported to ONNX (``python -m infer.export``), run by ONNX Runtime on the CPU.

An exported file is a graph and what a player needs to know about it, in the model's
``metadata_props`` under ``arkit.`` keys (``OnnxInfo``: written by the export, read here):

    arkit.format             1: the layout of these keys
    arkit.target             sequence ([batch, frames, 52] out) or first_frame ([batch, 52])
    arkit.input              wav (float32 [batch, samples] at sample_rate) or mel (log-mel
                             [batch, n_mels, mel_frames], ``model.features.LogMel`` of arkit.mel)
    arkit.sample_rate        the audio's rate (Hz)
    arkit.fps                the output frames' rate; frame k sits at sample round(k * rate / fps)
    arkit.blendshapes        JSON list: the output's 52 names, in Apple's order
    arkit.mel                JSON: the log-mel settings (``model.features.Mel``)
    arkit.lookahead_seconds  how far past its own time a frame reads the audio, at most
    arkit.reach              JSON (sequence): which samples each frame reads (``model.reach``)
    arkit.clip_samples       (first_frame) the audio a frame reads, from its own sample on
    arkit.window_frames      the frames of the window the model was trained on
    arkit.checkpoint         the checkpoint's file name ...
    arkit.checkpoint_sha256  ... and the SHA-256 of its bytes

``OnnxModel`` behaves like the torch model where ``train.predict.Predictor`` and a stream call
it. onnxruntime is imported only when a file is opened: the export extra
(``pip install 'arkit-dali[export]'``) is needed for it, not for the rest of the project.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from core.arkit import ARKIT_NAMES
from core.errors import ConfigError
from model.features import LogMel, Mel
from model.reach import Reach

PREFIX = "arkit."
FORMAT = 1
TARGETS = ("sequence", "first_frame")
INPUTS = ("wav", "mel")
INSTALL = "pip install 'arkit-dali[export]'"


@dataclass(frozen=True)
class OnnxInfo:
    """What an exported graph takes and gives: its ``arkit.*`` metadata, typed."""

    target: str
    input: str
    sample_rate: int
    fps: float
    blendshapes: tuple[str, ...]
    mel: Mel
    lookahead_seconds: float
    window_frames: int
    checkpoint: str
    checkpoint_sha256: str
    reach: Reach | None = None  # sequence
    clip_samples: int | None = None  # first_frame

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries, keys prefixed ``arkit.``."""
        props = {
            "format": str(FORMAT),
            "target": self.target,
            "input": self.input,
            "sample_rate": str(self.sample_rate),
            "fps": repr(float(self.fps)),
            "blendshapes": json.dumps(list(self.blendshapes)),
            "mel": json.dumps(self.mel.to_dict()),
            "lookahead_seconds": repr(float(self.lookahead_seconds)),
            "window_frames": str(self.window_frames),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
        }
        if self.reach is not None:
            props["reach"] = json.dumps(self.reach.to_dict())
        if self.clip_samples is not None:
            props["clip_samples"] = str(self.clip_samples)
        return {PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str | Path) -> OnnxInfo:
        """The info of a file whose metadata is ``props``; a ConfigError naming ``source`` and
        the key when the file was not written by ``python -m infer.export`` or is damaged."""
        ours = {k[len(PREFIX) :]: v for k, v in props.items() if k.startswith(PREFIX)}
        if not ours:
            raise ConfigError(
                f"{source} is an ONNX model without the arkit.* metadata that python -m "
                "infer.export writes (its rates, target and input): export the checkpoint "
                "with python -m infer.export --checkpoint BEST.pt --out FILE.onnx"
            )
        if ours.get("format") != str(FORMAT):
            raise ConfigError(
                f"{source} has arkit.format {ours.get('format')!r}; this code reads format "
                f"{FORMAT}: export the checkpoint again with this version"
            )
        return cls(**{name: _field(ours, name, source) for name in _FIELDS})

    @property
    def num_blendshapes(self) -> int:
        return len(self.blendshapes)


def _field(props: dict[str, str], name: str, source):
    """Field ``name`` of ``OnnxInfo`` read from its ``arkit.`` entry (ConfigError if bad)."""
    key = PREFIX + name
    optional = {"reach": "sequence", "clip_samples": "first_frame"}
    if name in optional and props.get("target") != optional[name]:
        return None
    if name not in props:
        raise ConfigError(f"{source} lacks the metadata {key}: export the checkpoint again")
    text = props[name]
    try:
        value = _FIELDS[name](text)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"{source} holds a {key} this code cannot read ({text[:80]!r}: {exc}): export "
            "the checkpoint again"
        ) from None
    allowed = {"target": TARGETS, "input": INPUTS, "blendshapes": (ARKIT_NAMES,)}.get(name)
    if allowed is not None and value not in allowed:
        shown = "ARKit's 52 names in Apple's order" if name == "blendshapes" else allowed
        raise ConfigError(f"{source} has {key} {text[:80]!r}, not one of {shown}")
    return value


_FIELDS = {
    "target": str,
    "input": str,
    "sample_rate": int,
    "fps": float,
    "blendshapes": lambda t: tuple(json.loads(t)),
    "mel": lambda t: Mel(**json.loads(t)),
    "lookahead_seconds": float,
    "window_frames": int,
    "checkpoint": str,
    "checkpoint_sha256": str,
    "reach": lambda t: Reach.from_dict(json.loads(t)),
    "clip_samples": int,
}


def _session(path: Path, threads: int | None):
    """ONNX Runtime's session of ``path`` on the CPU; a ConfigError naming the file when it
    cannot be one, or when onnxruntime is not installed."""
    if path.is_dir():
        raise ConfigError(f"ONNX file {path} is a folder: pass the .onnx file in it")
    if not path.is_file():
        raise ConfigError(f"ONNX file {path} does not exist")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(
            f"running ONNX file {path} needs onnxruntime, which is not installed: {INSTALL}"
        ) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's choice, the cores
    options.log_severity_level = 3  # errors only: its warnings are about graph rewriting
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types, one per status code
        why = str(exc).split("failed:")[-1].strip().splitlines()[0][:200].rstrip(".")
        error = ConfigError(
            f"{path} is not an ONNX model ONNX Runtime can load, or one cut short "
            f"({why or type(exc).__name__}): pass a file python -m infer.export wrote"
        )
        error.reason = why or type(exc).__name__  # ONNX Runtime's words, for the export
        raise error from None


class OnnxModel:
    """An exported model, called like the torch model: a float32 tensor in (``wav [B, N]``;
    log-mel ``[B, n_mels, T]`` for a graph of ``input: mel``, which ``mel`` computes), a CPU
    tensor out (``[B, frames, 52]`` for a sequence model, ``[B, 52]`` for first_frame).

    ``threads``: ONNX Runtime's intra-op threads (None: one per core).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = _session(self.path, threads)
        props = self.session.get_modelmeta().custom_metadata_map
        self.info = info = OnnxInfo.from_props(props, self.path)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        rank = 2 if info.input == "wav" else 3
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != rank:
            raise ConfigError(
                f"{self.path} says arkit.input {info.input} but its graph does not take one "
                f"{rank}-D tensor: export the checkpoint again"
            )
        self._input, self._output = inputs[0].name, outputs[0].name
        self.features = info.input  # what a call takes, as the torch models' ``features``
        self.mel = LogMel(**info.mel.to_dict())
        self.target, self.sample_rate, self.fps = info.target, info.sample_rate, info.fps
        self.frames = info.window_frames  # the training window's, as SequenceModel.frames
        self.reach, self.clip_samples = info.reach, info.clip_samples
        self.num_blendshapes = info.num_blendshapes

    @property
    def lookahead_seconds(self) -> float:
        return self.info.lookahead_seconds

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rank = 2 if self.features == "wav" else 3
        if x.dim() != rank:
            what = "raw audio [B, samples]" if rank == 2 else "log-mel [B, n_mels, frames]"
            raise ValueError(f"{self.path} takes {what}; got {tuple(x.shape)}")
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([self._output], {self._input: arr})
        return torch.from_numpy(out)

    def eval(self) -> OnnxModel:
        return self

    def to(self, device) -> OnnxModel:
        if torch.device(device).type != "cpu":
            raise ConfigError(f"{self.path} runs on the CPU (ONNX Runtime), not on {device}")
        return self
