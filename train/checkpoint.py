"""Checkpoints: plain tensors and Python values, loadable with ``torch.load(weights_only=True)``,
written atomically (temp file, fsync, rename) so a crash or a full disk while saving never
destroys the last one; and the checks that a checkpoint fits the run that resumes it.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core.errors import ResumeError, RunError

if TYPE_CHECKING:
    from torch import nn

    from pipeline.shards.manifest import Manifest
    from train.config import Config


def save_checkpoint(path: str | Path, state: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunError(
            f"could not write checkpoint {path} ({exc.strerror or exc}); the previous one, if "
            "any, is intact"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


CHECKPOINT_KEYS = ("model", "optimizer", "step", "loader", "config")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint of this trainer, or ResumeError saying why the file is not one."""
    path = Path(path)
    if path.is_dir():
        raise ResumeError(f"checkpoint {path} is a folder: pass the checkpoint in it (last.pt)")
    if not path.is_file():
        raise ResumeError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it will refuse
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # torch raises many types for a file it cannot read
        # torch's own message advises weights_only=False, which would run any code the file
        # holds: say what the file looks like instead
        raise ResumeError(
            f"checkpoint {path} is unreadable or not ours ({_what_it_is(path)}): not a "
            "checkpoint of this trainer; pass a last.pt or best.pt that python -m train wrote"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else []
    if not isinstance(state, dict) or missing:
        lacks = f" (no {', '.join(missing)})" if missing else ""
        raise ResumeError(f"checkpoint {path} is not a checkpoint of this trainer{lacks}")
    return state


def check_resumable(
    state: dict, source: str, cfg: Config, manifest: Manifest, model: nn.Module
) -> None:
    """ResumeError unless ``state`` is a checkpoint of this trainer, of the dataset ``manifest``
    describes (or ``train.allow_new_data``), and of the model this config builds (its
    ``train.target`` and ``data.features``)."""
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ResumeError(f"{source} is not a checkpoint of this trainer (no {', '.join(missing)})")
    _check_dataset(state.get("dataset"), source, cfg, manifest)
    target = (state.get("model_args") or {}).get("target", cfg.train.target)
    if target != cfg.train.target:
        raise ResumeError(
            f"{source} was trained with train.target={target}; this run has "
            f"train.target={cfg.train.target} (another model): resume with --set "
            f"train.target={target}"
        )
    had = (state.get("model_args") or {}).get("features", "wav")
    has = getattr(model, "features", "wav")
    if had != has:
        raise ResumeError(
            f"{source} was trained on data.features={had}; this run has "
            f"data.features={has} (the model takes {had}): resume with --set "
            f"data.features={had}"
        )


def _check_dataset(recorded: dict | None, source: str, cfg: Config, manifest: Manifest) -> None:
    if recorded is None or cfg.train.allow_new_data:
        return
    if recorded.get("identity") != manifest.identity:
        was = f"{recorded.get('dir')} (dataset {recorded.get('identity')})"
        now = f"{manifest.root} (dataset {manifest.identity})"
        raise ResumeError(
            f"{source} was trained on {was}, not on {now}; resume on the same data, or "
            "pass --set train.allow_new_data=true to continue on this one"
        )


def _what_it_is(path: Path) -> str:
    """A few words on what a file torch could not load looks like, from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return "a zip archive cut short or damaged (a torch file truncated by a full disk?)"
        if _torch_zip(path):
            return "a torch file holding objects other than tensors and plain values, or damaged"
        return "a zip archive, not a torch file"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle: a torch file of the legacy format, or no torch file at all"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not only a character cut at the 512th byte
            return "a binary file of another kind"
    return "a text file"


def _torch_zip(path: Path) -> bool:
    """Whether a zip holds torch.save's layout (``<name>/data.pkl``)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
