"""The run's records on disk: every record as one JSON line in ``run.dir/metrics.jsonl``, and,
where the ``tensorboard`` package is installed, a few of their numbers as TensorBoard scalars in
event files beside it (``tensorboard --logdir runs`` plots every run side by side).

TensorBoard is an optional extra (``pip install 'arkit-dali[tensorboard]'``): without it the run
says so once and writes ``metrics.jsonl`` alone. Only rank 0 makes a ``RunLog``.

With ``run.sample_log``, every rank also appends the keys of each step's batch to
``run.dir/samples-rank<R>.jsonl`` (``log_samples``): the audit of what each rank trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import RunError
from train.distributed import Dist

# record["split"] -> {record key: TensorBoard tag}; the global step is record["step"]
SCALARS = {
    "train": {
        "loss": "train/loss",
        "lr": "train/lr",
        "samples_per_s": "train/samples_per_s",
        "data_wait_share": "train/data_wait_share",
    },
    "val": {"mse": "val/mse", "mae": "val/mae"},
}
RATIO_TAG = "val/mse_ratio_to_mean_predictor"  # mse / baseline_mse: below 1 beats the mean
SKIP_LINE = (
    "tensorboard is not installed: skipping its event files (pip install 'arkit-dali[tensorboard]')"
)


def _summary_writer_class():
    """torch's SummaryWriter, or None where the ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # missing (ImportError) or broken (protobuf: TypeError...)
        return None
    return SummaryWriter


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard tags and values of one record (none for splits it does not plot)."""
    out = {}
    for key, tag in SCALARS.get(record.get("split"), {}).items():
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    base = record.get("baseline_mse")
    if record.get("split") == "val" and base and "val/mse" in out:
        out[RATIO_TAG] = out["val/mse"] / base
    return out


class RunLog:
    """Appends records to ``metrics.jsonl`` and mirrors their numbers to TensorBoard.

    The event writer opens on the first record (a run that fails before training leaves no
    empty event file) and ``close`` flushes it; a record after ``close`` opens a new one.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._writer_class = _summary_writer_class() if tensorboard else None
        self._writer = None
        if tensorboard and self._writer_class is None:
            print(SKIP_LINE, flush=True)

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise RunError(f"could not append to {self.path} ({exc.strerror or exc})") from None
        if self._writer_class is None or "step" not in record:
            return
        values = scalars(record)
        if not values:
            return
        writer = self._open()
        for tag, value in values.items():
            writer.add_scalar(tag, value, int(record["step"]))

    def close(self) -> None:
        """Flush and close the event file (the end of ``fit``, also when it raises)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _open(self):
        if self._writer is None:
            try:
                self._writer = self._writer_class(log_dir=str(self.run_dir))
            except OSError as exc:
                raise RunError(
                    f"could not write TensorBoard event files in {self.run_dir} "
                    f"({exc.strerror or exc}); --set run.tensorboard=false skips them"
                ) from None
        return self._writer


def log_samples(run_dir: Path, dist: Dist, epoch: int, step: int, keys: list[str]) -> None:
    """One line per step and rank: the keys it trained on (``run.sample_log``)."""
    path = run_dir / f"samples-rank{dist.rank}.jsonl"
    if not dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    record = {"epoch": epoch, "step": step, "rank": dist.rank, "keys": list(keys)}
    record["world_size"] = dist.world_size
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
