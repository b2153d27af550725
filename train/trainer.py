"""The training loop: the baseline's loop, with validation, checkpoints, resume and DDP around it.

    python -m train --loader dali                      # one GPU (or CPU)
    torchrun --nproc_per_node=8 -m train --loader dali # every GPU of a machine

``Trainer`` takes its model, train step (the optimizer in it) and loaders ready-made
(``train.builders`` makes them from a config), is itself checkpointable
(``state_dict``/``load_state_dict``), and ``fit`` reads top to bottom: for each epoch, train its
steps, then validate and save. Beside it: ``train.signals`` (SIGTERM/SIGINT), ``train.runlog``
(metrics.jsonl, TensorBoard, the per-sample log), ``train.endreport`` (best.pt's report).
"""

from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import ResumeError
from pipeline.loaders.base import EpochLoader
from train.checkpoint import check_resumable, save_checkpoint
from train.config import Config
from train.distributed import Dist
from train.endreport import report_best
from train.runlock import RunLock, open_run_dir
from train.runlog import RunLog, log_samples
from train.signals import StopSignals
from train.step import TrainStep, set_lr_and_weight_decay
from train.validate import summary_lines, validate, verdict_line


class Trainer:
    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        train_loader: EpochLoader,
        val_loader: EpochLoader | None,
        device: torch.device,
        dist: Dist | None = None,
        *,
        step: TrainStep,
        resuming: bool = False,
    ) -> None:
        """``step`` trains ``model`` (``train.builders.build_step``: on ``device``, under DDP
        through its wrapper ``step.net``) with its optimizer ``step.opt``. ``resuming``: the
        run continues the one in run.dir (``--resume`` of a checkpoint there); otherwise run.dir
        must hold no run (or ``run.overwrite`` replaces it)."""
        self.cfg, self.device, self.dist = cfg, device, dist or Dist()
        self.run_dir = Path(cfg.run.dir)
        # rank 0's hold on run.dir (released by close)
        self.lock: RunLock | None
        self.lock, note = open_run_dir(
            self.run_dir, self.dist, device, fresh=not resuming, overwrite=cfg.run.overwrite
        )
        if note:
            self.say(note)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.manifest = train_loader.manifest
        self.model = model.to(device)
        self.train_step, self.net, self.opt = step, step.net, step.opt
        self.step = 0
        self.best_val = math.inf
        self.last_val: dict | None = None
        mean = self.manifest.train_mean(cfg.train.target)
        self.mean_predictor = None if mean is None else torch.as_tensor(mean, device=device)
        self.signals = StopSignals(step, self.dist, device)
        self._unfinished: int | None = None  # a resumed epoch with no whole step left to run
        self.runlog: RunLog | None = None  # rank 0's metrics.jsonl and TensorBoard files
        if self.dist.is_main:
            self.runlog = RunLog(self.run_dir, tensorboard=cfg.run.tensorboard)

    def close(self) -> None:
        """Let go of run.dir (the end of a run, however it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        loader = self.train_loader.state_dict()
        return {
            "model": self.model.state_dict(),
            "model_args": dict(getattr(self.model, "build_args", {})),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "epoch": loader["epoch"],
            "loader": loader,
            "best_val_mse": self.best_val,
            "config": self.cfg.to_dict(),
            "dataset": {"dir": str(self.manifest.root), "identity": self.manifest.identity},
            "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
        }

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        check_resumable(state, source, self.cfg, self.manifest, self.model)
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise ResumeError(
                f"{source} holds a model of another shape than this config builds (model.* "
                f"settings differ?): {first}"
            ) from None
        # the config's, not the checkpoint's, from the next step on
        changed = set_lr_and_weight_decay(self.opt, self.cfg.train.lr, self.cfg.train.weight_decay)
        if changed:
            self.say(f"resumed with {', '.join(changed)} (from the next step on)")
        self.step = int(state["step"])
        self.best_val = float(state.get("best_val_mse", math.inf))
        self.train_loader.load_state_dict(state["loader"])
        # resumed on more ranks, the rest of an epoch can be less than one global batch: the
        # loader moves on to the next epoch, but this one still gets its validation and save
        if self.train_loader.epoch > int(state["loader"]["epoch"]):
            self._unfinished = int(state["loader"]["epoch"])

    def save(self, name: str = "last.pt") -> None:
        if self.dist.is_main:
            save_checkpoint(self.run_dir / name, self.state_dict())

    # ------------------------------------------------------------ output
    def log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        record = {**record, "world_size": self.dist.world_size, "loader": self.train_loader.name}
        self.runlog.write(record)

    def release(self) -> None:
        """Drop the DDP wrapper, so its reference to the process group dies with the run.

        A gloo group still referenced at interpreter exit is torn down during finalization,
        where its worker threads can abort the process (SIGABRT) after a successful run.
        """
        self.net = self.train_step.net = self.model

    def say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    # ------------------------------------------------------------ the loop
    def fit(self) -> dict | None:
        """Train until ``train.epochs`` or ``train.max_steps``; the last validation record."""
        try:
            with self.signals.installed():
                if self._unfinished is not None:
                    self._end_epoch(self._unfinished, first=True)
                    self._unfinished = None
                start = self.train_loader.epoch
                for epoch in range(start, self.cfg.train.epochs):
                    if self._out_of_steps():
                        break
                    self._train_epoch(epoch)
                    if not self._out_of_steps():
                        self.train_loader.set_epoch(epoch + 1)  # a checkpoint now resumes there
                    self._end_epoch(epoch, first=epoch == start)
                if self.signals.requested_now():  # a signal during the last validation or save
                    raise self.signals.interrupted(self.run_dir / "last.pt")
                report_best(
                    self.cfg,
                    self.model,
                    self.train_loader,
                    self.val_loader,
                    self.run_dir,
                    self.device,
                    self.dist,
                    self.say,
                )
                line = verdict_line(self.cfg, self.best_val, self.last_val)
                if line:
                    self.say(line)
            return self.last_val
        finally:
            if self.runlog is not None:
                self.runlog.close()  # flushes the event file, also when the run stops early

    def _train_epoch(self, epoch: int) -> None:
        t = self.cfg.train
        self.train_loader.set_epoch(epoch)  # debug may have cut the last one short
        first = self.train_loader.batches_done
        total = min(len(self.train_loader), 3) if t.debug else len(self.train_loader)
        bar = self._progress(epoch, first, total)
        tick, seen = time.perf_counter(), 0
        since, waited = tick, 0.0  # the last train record; seconds spent waiting for data since
        for batch_idx, (batch, wait) in enumerate(timed(self.train_loader), start=first):
            waited += wait
            if t.debug and batch_idx >= 3:
                break
            self.signals.send()
            loss = self.train_step(batch)
            self.step += 1
            if self.cfg.run.sample_log:
                log_samples(self.run_dir, self.dist, epoch, self.step, batch["key"])
            seen += batch["arkit"].shape[0] * self.dist.world_size
            if self.step % t.log_every == 0 or batch_idx == 0:
                now = time.perf_counter()
                rate = seen / max(now - tick, 1e-9)
                share = min(waited / max(now - since, 1e-9), 1.0)
                since, waited = now, 0.0
                loss_value = loss.item()  # the host waits here anyway: read the skip count too
                skipped = int(self.train_step.skipped.item())
                self._log_train(epoch, loss_value, rate, bar, skipped, share)
            bar.update(1)
            if self.cfg.run.checkpoint_every and self.step % self.cfg.run.checkpoint_every == 0:
                self.save()
            if self.signals.requested():
                self.save()
                raise self.signals.interrupted(self.run_dir / "last.pt")
            if self._out_of_steps():
                break
        bar.close()

    def _end_epoch(self, epoch: int, first: bool) -> None:
        if self.val_loader is not None:
            rec = validate(
                self.net,
                self.val_loader,
                target=self.cfg.train.target,
                device=self.device,
                mean_predictor=self.mean_predictor,
                amp=self.cfg.train.amp,
                dist=self.dist,
                max_batches=3 if self.cfg.train.debug else None,
            )
            self.last_val = {"split": "val", "epoch": epoch, "step": self.step, **rec}
            self.log(self.last_val)
            for line in summary_lines(self.last_val):
                self.say(line)
            if self.last_val["mse"] < self.best_val:
                self.best_val = self.last_val["mse"]
                self.save("best.pt")
        elif first:
            self.say(f"{self.cfg.data.dir} has no val split: training without validation")
        self.save()

    def finished(self) -> str | None:
        """After ``load_state_dict``: the line saying the resumed run has nothing left to do
        (every epoch trained, or ``train.max_steps`` reached) and how to train on; else None."""
        t = self.cfg.train
        if self._unfinished is not None:
            return None
        if self._out_of_steps():
            return (
                f"{self.run_dir} is finished: train.max_steps={t.max_steps} reached at step "
                f"{self.step}; nothing to do (to train on, add --set "
                f"train.max_steps={2 * t.max_steps}, or 0 for no step limit)"
            )
        if self.train_loader.epoch >= t.epochs:
            return (
                f"{self.run_dir} is finished: all {t.epochs} epochs (train.epochs={t.epochs}) "
                f"trained, at step {self.step}; nothing to do (to train on, add --set "
                f"train.epochs={2 * t.epochs}, any number above {t.epochs})"
            )
        return None

    def _out_of_steps(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.step >= self.cfg.train.max_steps

    def _progress(self, epoch: int, first: int, total: int):
        from tqdm import tqdm

        return tqdm(
            total=total,
            initial=min(first, total),
            desc=f"epoch {epoch}",
            disable=not (self.cfg.run.progress and self.dist.is_main),
            dynamic_ncols=True,
            file=sys.stdout,
        )

    def _log_train(
        self, epoch: int, loss: float, rate: float, bar, skipped: int = 0, wait_share: float = 0.0
    ) -> None:
        bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}")
        lr = self.opt.param_groups[0]["lr"]
        self.log(
            {
                "split": "train",
                "epoch": epoch,
                "step": self.step,
                "loss": loss,
                "lr": lr,
                "samples_per_s": rate,
                "skipped_steps": skipped,
                "data_wait_share": wait_share,
            }
        )


def timed(loader):
    """Each batch with the seconds the loop waited for it: the host's time in the loader's
    ``next`` (no CUDA sync, so a step still running on the GPU is not counted as waiting)."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
