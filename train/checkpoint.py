"""Checkpoints: plain tensors and Python values, loadable with ``torch.load(weights_only=True)``,
written atomically (temp file, fsync, rename) so a crash or a full disk while saving never
destroys the last one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from core.errors import ResumeError, RunError


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
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a file it cannot read
        raise ResumeError(
            f"checkpoint {path} is unreadable or not ours ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else []
    if not isinstance(state, dict) or missing:
        lacks = f" (no {', '.join(missing)})" if missing else ""
        raise ResumeError(f"checkpoint {path} is not a checkpoint of this trainer{lacks}")
    return state
