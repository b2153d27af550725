"""A fresh run never writes into another run's files: a ``run.dir`` that holds a run (its
``metrics.jsonl``, checkpoints, report, TensorBoard event files or sample logs) is refused,
naming what is there and the ways out, unless ``run.overwrite`` asks to replace it, which
removes those files (and nothing else) first. ``--resume`` into the checkpoint's own folder
continues that run and is not checked. Called by rank 0 with ``run.dir`` locked
(``train.runlock``), so no other trainer writes it meanwhile."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.errors import RunError

RUN_FILES = ("metrics.jsonl", "last.pt", "best.pt", "report")
RUN_PATTERNS = ("events.out.tfevents.*", "samples-rank*.jsonl")


def run_files(run_dir: Path) -> list[Path]:
    """The files (and the report folder) a run leaves in ``run_dir``, sorted."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    for pattern in RUN_PATTERNS:
        found += sorted(run_dir.glob(pattern))
    return found


def claim_fresh(run_dir: Path, overwrite: bool) -> str | None:
    """Make sure a fresh run starts in an empty ``run_dir``: RunError when it holds a run and
    ``overwrite`` is off; with ``overwrite``, remove the run's files and return the line that
    says so (None when there was nothing to remove)."""
    found = run_files(run_dir)
    if not found:
        return None
    names = [p.name + ("/" if p.is_dir() else "") for p in found]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    if not overwrite:
        resume = (
            f", continue it with --resume {run_dir / 'last.pt'}"
            if (run_dir / "last.pt").is_file()
            else ""
        )
        raise RunError(
            f"run.dir {run_dir} holds another run ({shown}): a fresh run would replace and "
            f"append to its files; pass another folder with --set run.dir=...{resume}, or "
            "replace it with --set run.overwrite=true"
        )
    for path in found:
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            raise RunError(
                f"run.overwrite: cannot remove {path} ({exc.strerror or exc}); remove it "
                "yourself or pass another folder with --set run.dir=..."
            ) from None
    return f"run.overwrite: removed the previous run's files from {run_dir} ({shown})"
