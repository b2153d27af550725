"""``python -m infer.export``: a checkpoint to an ONNX file, which ONNX Runtime runs without torch.

    python -m infer.export --checkpoint runs/demo/best.pt --out model.onnx
    python -m infer.export --checkpoint runs/demo/best.pt --out model-mel.onnx --input mel

The graph takes raw audio, ``wav [batch, samples]`` float32 at the model's sample rate, for a
model trained on raw audio and for one trained on the loader's log-mel alike (the graph holds
the model's own log-mel front end, which equals the loader's); ``--input mel`` makes a graph
that takes log-mel ``[batch, n_mels, mel_frames]`` instead. Batch and time are dynamic. It
gives ``[batch, frames, 52]`` (sequence) or ``[batch, 52]`` (first_frame) in Apple's order,
and the file records what a player needs under ``arkit.*`` metadata keys (the list:
``model.onnx_model``). Before the file lands, ONNX Runtime runs it on seconds of speech-like
audio and its output must equal what ``python -m infer --checkpoint`` computes within 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.arkit import ARKIT_NAMES
from core.errors import ArkitError, ConfigError, RunError
from infer.outputs import digest
from model.onnx_model import INSTALL, OnnxInfo, OnnxModel
from pipeline.convert.synthetic import make_take
from train.predict import Predictor

TOLERANCE = 1e-4  # ONNX Runtime against PyTorch, max absolute difference in a blendshape
LEAST_OPSET = 18  # the exporter's own floor (it writes 18 when asked for less)
OUTPUT = "blendshapes"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m infer.export",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint of the trainer (best.pt)")
    p.add_argument("--out", required=True, help="the ONNX file to write (model.onnx)")
    p.add_argument(
        "--input",
        choices=("wav", "mel"),
        default="wav",
        help="what the graph takes: raw audio (default) or log-mel",
    )
    p.add_argument(
        "--opset", type=int, help=f"ONNX opset, {LEAST_OPSET} or more (default: torch's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p.parse_args(argv)


class MelInput(nn.Module):
    """A model trained on log-mel, on raw audio: its own front end's log-mel first, as
    ``Predictor`` runs it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model(self.model.mel(wav))


def graph_of(model: nn.Module, target: str, input_kind: str):
    """The module to export for ``input_kind``, an example input (batch 2: a batch of 1 would
    fix the axis) and its dynamic axes, with the least length the model runs on."""
    dim = torch.export.Dim
    mel = model.mel.settings
    if input_kind == "wav":
        # torch.stft's reflect padding needs more than n_fft / 2 samples
        least = model.clip_samples if target == "first_frame" else mel.n_fft // 2 + 1
        graph = MelInput(model) if model.features == "mel" else model
        example = torch.zeros(2, least + 10 * mel.hop_length)
        return graph, example, {0: dim("batch"), 1: dim("samples", min=least)}
    graph = model
    if model.features == "wav":  # a copy whose front end passes the log-mel through
        graph = copy.deepcopy(model)
        graph.front.features = "mel"
    # a sequence model's first frame needs 2 mel frames; a first_frame model reads `context`
    least = model.context if target == "first_frame" else 2
    example = torch.zeros(2, mel.n_mels, least + 10)
    return graph, example, {0: dim("batch"), 2: dim("mel_frames", min=least)}


def to_onnx(graph: nn.Module, example: torch.Tensor, axes: dict, name: str, opset: int | None):
    """The exported ``onnx.ModelProto``; the exporter's log (torchvision absent, an opset it
    could not convert to) and warnings silenced: the written file is checked instead."""
    logs = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph.eval(),
                (example,),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=(axes,),
                input_names=[name],
                output_names=[OUTPUT],
                verbose=False,
            )
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)
    proto = program.model_proto
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 3:  # a sequence: the exporter names the frame axis by its formula
        dims[1].dim_param = "frames"
    return proto


def probes(p: Predictor) -> list[tuple[str, torch.Tensor]]:
    """Speech-like audio to check the file on (a description, ``wav [B, N]``): a batch of two
    4 s takes and a short one (a first_frame model: clips from them, and longer audio)."""
    takes = [make_take(0, i, seconds=4.0)[0] for i in range(2)]
    short = make_take(0, 2, seconds=0.7)[0]
    if p.target == "sequence":
        return [
            ("a batch of two 4 s takes", torch.from_numpy(np.stack(takes))),
            ("a 0.7 s take", torch.from_numpy(short)[None]),
        ]
    need = p.model.clip_samples
    starts = [p.sample(k) for k in range(0, 110, 7)]
    clips = np.stack([takes[0][s : s + need] for s in starts])
    return [
        (f"{len(starts)} clips of a 4 s take", torch.from_numpy(clips)),
        ("a 0.7 s take", torch.from_numpy(short)[None]),
    ]


@torch.inference_mode()
def difference(p: Predictor, runtime: OnnxModel) -> tuple[float, str]:
    """The largest difference between ONNX Runtime on the file and ``p`` (the checkpoint's
    model, as ``python -m infer`` runs it) over the probes, and where it was."""
    worst, where = 0.0, ""
    for what, wav in probes(p):
        want = p._net(wav)
        if want.shape[-1] != len(ARKIT_NAMES):
            raise ConfigError(
                f"the checkpoint's model gives {want.shape[-1]} values a frame, not ARKit's "
                f"{len(ARKIT_NAMES)} blendshapes: the export names its outputs by ARKit's"
            )
        got = runtime(wav if runtime.features == "wav" else runtime.mel(wav))
        if got.shape != want.shape:
            raise RunError(
                f"the exported graph gives {tuple(got.shape)} for {what}, PyTorch "
                f"{tuple(want.shape)}: nothing was written"
            )
        diff = float((got - want).abs().max())
        if not diff <= worst or not where:  # NaN too
            worst, where = diff, what
    return worst, where


def info_of(p: Predictor, input_kind: str, checkpoint: Path) -> OnnxInfo:
    m, sequence = p.model, p.target == "sequence"
    return OnnxInfo(
        target=p.target,
        input=input_kind,
        sample_rate=p.sample_rate,
        fps=p.fps,
        blendshapes=ARKIT_NAMES,
        mel=m.mel.settings,
        lookahead_seconds=m.reach.lookahead_seconds if sequence else m.clip_samples / p.sample_rate,
        window_frames=p.window_frames,
        checkpoint=checkpoint.name,
        checkpoint_sha256=digest(checkpoint),
        reach=m.reach if sequence else None,
        clip_samples=None if sequence else m.clip_samples,
    )


def check_out(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """ConfigError for an ``--out`` that is the checkpoint, a folder, or (without
    ``overwrite``) an existing file."""
    if out.exists() and checkpoint.exists() and os.path.samefile(out, checkpoint):
        raise ConfigError(f"--out {out} is the checkpoint (even with --overwrite): choose a file")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the file to write (model.onnx)")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists: pass --overwrite to replace it, or choose another --out")


def require(opset: int | None) -> None:
    """ConfigError when a package the export needs is missing, or ``opset`` is out of range."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"the export needs {exc.name or 'onnx'}, which is not installed: {INSTALL}"
        ) from None
    most = onnx.defs.onnx_opset_version()
    if opset is not None and not LEAST_OPSET <= opset <= most:
        raise ConfigError(f"--opset {opset}: choose {LEAST_OPSET} to {most} (this onnx's)")


def export(checkpoint, out, input_kind: str = "wav", opset=None, overwrite=False) -> dict:
    """Write ``out`` from ``checkpoint`` (atomically: it lands only once checked); what was
    written: path, bytes, opset, info (``OnnxInfo``), max_difference and where it was."""
    checkpoint, out = Path(checkpoint), Path(out)
    check_out(out, checkpoint, overwrite)
    require(opset)
    p = Predictor.from_checkpoint(checkpoint, "cpu")
    graph, example, axes = graph_of(p.model, p.target, input_kind)
    proto = to_onnx(graph, example, axes, input_kind, opset)
    info = info_of(p, input_kind, checkpoint)
    for key, value in info.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(proto.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise RunError(
                f"cannot write {out} ({exc.strerror or exc}); nothing was written: free space "
                "there or choose another --out"
            ) from None
        retry = "nothing was written: leave --opset out (torch's default) or choose another"
        try:
            runtime = OnnxModel(tmp, threads=1)
        except ConfigError as exc:  # a graph the exporter could not convert to --opset
            why = getattr(exc, "reason", exc)
            raise RunError(
                f"{out}: ONNX Runtime cannot load the exported graph ({why}); {retry}"
            ) from None
        worst, where = difference(p, runtime)
        if not worst <= TOLERANCE:
            raise RunError(
                f"{out}: ONNX Runtime's output differs from PyTorch's by {worst:.3g} on {where} "
                f"(more than {TOLERANCE:g}); {retry}"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "path": out,
        "bytes": out.stat().st_size,
        "opset": opset,
        "info": info,
        "max_difference": worst,
        "where": where,
    }


def size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        done = export(args.checkpoint, args.out, args.input, args.opset, args.overwrite)
    except ArkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = done["info"]
    if info.input == "wav":
        takes = f"wav [batch, samples] at {info.sample_rate} Hz"
    else:
        rate = info.mel.sample_rate / info.mel.hop_length
        takes = f"log-mel [batch, {info.mel.n_mels}, mel_frames] at {rate:g} per s (arkit.mel)"
    gives = "[batch, frames, 52]" if info.target == "sequence" else "[batch, 52]"
    print(
        f"wrote {done['path']} ({size(done['bytes'])}, opset {done['opset']}): a {info.target} "
        f"model; in: {takes}; out: {gives} at {info.fps:g} fps"
    )
    print(
        f"lookahead {info.lookahead_seconds:.3f} s; ONNX Runtime matches PyTorch within "
        f"{done['max_difference']:.2g} (max difference, on {done['where']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
