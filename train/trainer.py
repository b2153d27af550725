"""The training loop: the seed's loop, with validation, checkpoints, resume and DDP around it.

    python -m train --loader dali                      # one GPU (or CPU)
    torchrun --nproc_per_node=8 -m train --loader dali # every GPU of a machine

``Trainer`` takes its model and loaders ready-made (``train.builders`` makes them from a
config), is itself checkpointable (``state_dict``/``load_state_dict``), and ``fit`` reads top
to bottom: for each epoch, train its steps, then validate and save.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import ResumeError, RunError
from pipeline.loaders.base import EpochLoader
from train.checkpoint import CHECKPOINT_KEYS, save_checkpoint
from train.config import Config
from train.distributed import Dist
from train.runlock import RunLock
from train.runlog import RunLog
from train.step import TrainStep, make_optimizer
from train.validate import summary_lines, validate


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: ``last.pt`` was saved; the CLI exits with 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name}: saved {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class Trainer:
    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        train_loader: EpochLoader,
        val_loader: EpochLoader | None,
        device: torch.device,
        dist: Dist | None = None,
    ) -> None:
        self.cfg, self.device, self.dist = cfg, device, dist or Dist()
        self.run_dir = Path(cfg.run.dir)
        self.lock: RunLock | None = None  # rank 0's hold on run.dir (released by close)
        self._open_run_dir()
        self.train_loader, self.val_loader = train_loader, val_loader
        self.manifest = train_loader.manifest
        self.model = model.to(device)
        self.net = self.model
        if self.dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        t = cfg.train
        self.opt = make_optimizer(self.model.parameters(), t.lr, t.weight_decay, device)
        self.train_step = TrainStep(self.net, self.opt, device, t.target, t.grad_clip, t.amp)
        self.step = 0
        self.best_val = math.inf
        self.last_val: dict | None = None
        mean = self.manifest.train_mean(t.target)
        self.mean_predictor = None if mean is None else torch.as_tensor(mean, device=device)
        self._stop_signal: int | None = None  # this rank's signal (or, once agreed, any rank's)
        self._stop_sent: int | None = None  # the signal put into TrainStep.stop
        self._unfinished: int | None = None  # a resumed epoch with no whole step left to run
        self.runlog: RunLog | None = None  # rank 0's metrics.jsonl and TensorBoard files
        if self.dist.is_main:
            self.runlog = RunLog(self.run_dir, tensorboard=cfg.run.tensorboard)

    def _open_run_dir(self) -> None:
        """Rank 0 makes run.dir and locks it (``train.runlock``: one run writes a folder);
        under DDP every rank learns whether it could, so that none waits for the others in
        vain when it could not."""
        problem = None
        if self.dist.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.lock = RunLock(self.run_dir)
                self.lock.acquire()
            except OSError as exc:
                problem = RunError(f"run.dir {self.run_dir} cannot be made ({exc.strerror})")
            except RunError as exc:
                problem = exc
        if self.dist.enabled:
            failed = torch.tensor([float(problem is not None)], device=self.device)
            torch.distributed.broadcast(failed, src=0)
            if failed.item() and problem is None:
                problem = RunError(
                    f"rank {self.dist.rank}: rank 0 could not open run.dir {self.run_dir} "
                    "(its error line says why)"
                )
        if problem is not None:
            self.lock = None
            raise problem

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
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        if missing:
            raise ResumeError(
                f"{source} is not a checkpoint of this trainer (no {', '.join(missing)})"
            )
        self._check_dataset(state.get("dataset"), source)
        target = (state.get("model_args") or {}).get("target", self.cfg.train.target)
        if target != self.cfg.train.target:
            raise ResumeError(
                f"{source} was trained with train.target={target}; this run has "
                f"train.target={self.cfg.train.target} (another model): resume with --set "
                f"train.target={target}"
            )
        had = (state.get("model_args") or {}).get("features", "wav")
        has = getattr(self.model, "features", "wav")
        if had != has:
            raise ResumeError(
                f"{source} was trained on data.features={had}; this run has "
                f"data.features={has} (the model takes {had}): resume with --set "
                f"data.features={had}"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise ResumeError(
                f"{source} holds a model of another shape than this config builds (model.* "
                f"settings differ?): {first}"
            ) from None
        self._apply_optimizer_settings()
        self.step = int(state["step"])
        self.best_val = float(state.get("best_val_mse", math.inf))
        self.train_loader.load_state_dict(state["loader"])
        # resumed on more ranks, the rest of an epoch can be less than one global batch: the
        # loader moves on to the next epoch, but this one still gets its validation and save
        if self.train_loader.epoch > int(state["loader"]["epoch"]):
            self._unfinished = int(state["loader"]["epoch"])

    def _apply_optimizer_settings(self) -> None:
        """The config's ``train.lr`` and ``train.weight_decay`` in every param group: loading an
        optimizer's state takes the checkpoint's, and a resumed run (``--set train.lr=...``)
        steps with, and records, the ones its config says. AdamW reads both afresh at every step
        and keeps its moments, so a change applies exactly from the next step on."""
        t = self.cfg.train
        changed = []
        for key, value in (("lr", t.lr), ("weight_decay", t.weight_decay)):
            old = self.opt.param_groups[0][key]
            if float(old) != value:
                changed.append(f"train.{key} {float(old):g} -> {value:g}")
            for group in self.opt.param_groups:
                group[key] = value
        if changed:
            self.say(f"resumed with {', '.join(changed)} (from the next step on)")

    def _check_dataset(self, recorded: dict | None, source: str) -> None:
        if recorded is None or self.cfg.train.allow_new_data:
            return
        if recorded.get("identity") != self.manifest.identity:
            was = f"{recorded.get('dir')} (dataset {recorded.get('identity')})"
            now = f"{self.manifest.root} (dataset {self.manifest.identity})"
            raise ResumeError(
                f"{source} was trained on {was}, not on {now}; resume on the same data, or "
                "pass --set train.allow_new_data=true to continue on this one"
            )

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
            with self._signals_saved():
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
                if self._stop_requested_now():  # a signal during the last validation or save
                    raise Interrupted(self._stop_signal, self.run_dir / "last.pt")
                self._report()
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
            self._send_stop()
            loss = self.train_step(batch)
            self.step += 1
            if self.cfg.run.sample_log:
                self._log_samples(epoch, batch["key"])
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
            if self._stop_requested():
                self.save()
                raise Interrupted(self._stop_signal, self.run_dir / "last.pt")
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

    def _log_samples(self, epoch: int, keys: list[str]) -> None:
        """One line per step and rank: the keys it trained on (``run.sample_log``)."""
        path = self.run_dir / f"samples-rank{self.dist.rank}.jsonl"
        if not self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"epoch": epoch, "step": self.step, "rank": self.dist.rank, "keys": list(keys)}
        record["world_size"] = self.dist.world_size
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _report(self) -> None:
        """best.pt's evaluation report in run.dir/report, as ``python -m infer --eval`` writes
        it (not for debug runs, without validation, or for a model ``build_model`` did not make:
        inference needs to know how it reads audio)."""
        if not self.cfg.train.report or self.cfg.train.debug or self.val_loader is None:
            return
        if not hasattr(self.model, "build_args"):
            self.say("no evaluation report: the model was not made by model.build_model")
            return
        from train.builders import loader_options
        from train.evaluate import evaluate
        from train.predict import Predictor
        from train.report import write_report

        best = self.run_dir / "best.pt"
        # every rank goes on only if every rank sees the best.pt rank 0 wrote (the stop check's
        # all_reduce before this waited for rank 0's save); one rank skipping alone would leave
        # the others waiting in evaluate's all_reduce
        seen = torch.tensor([float(best.is_file())], device=self.device)
        if self.dist.enabled:
            torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MIN)
        if not seen.item():
            self.say(
                f"no evaluation report: {best} was not written (no finite val mse) or not seen"
            )
            return
        state = torch.load(best, map_location=self.device, weights_only=True)
        model = copy.deepcopy(self.model)
        model.load_state_dict(state["model"])
        m = self.manifest
        predictor = Predictor(
            model.eval(),
            self.cfg.train.target,
            m.sample_rate,
            m.fps,
            m.frames,
            self.device,
            self.val_loader.batch_size,
        )
        loader = self.train_loader.name
        rec, example = evaluate(
            predictor,
            m.root,
            "val",
            loader,
            self.val_loader.batch_size,
            self.dist,
            loader_options(self.cfg, loader),
        )
        if self.dist.is_main:
            rec = {"checkpoint": str(best), "step": int(state["step"]), **rec}
            paths = write_report(self.run_dir / "report", rec, example)
            self.say(f"report on {best.name} (step {rec['step']}): {paths[0].parent}/report.md")

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

    # ------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _signals_saved(self):
        """SIGTERM/SIGINT set a flag the loop reads after each step (then saves and stops)."""

        def on_signal(signum, frame) -> None:
            self._stop_signal = signum

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _send_stop(self) -> None:
        """Under DDP, this rank's signal goes into the next step's all_reduce (``TrainStep.stop``,
        with the bad-batch flag), set once on the device: no host sync, no collective."""
        if self.dist.enabled and self._stop_signal not in (None, self._stop_sent):
            self.train_step.stop.fill_(self._stop_signal)
            self._stop_sent = self._stop_signal

    def _stop_requested(self) -> bool:
        """After a step: whether to save and stop. Alone, whether a signal came. Under DDP,
        whether any rank had one by the all_reduce of the step before: every rank reads that
        same value after the same step, so all stop at the same step (a rank that stopped alone
        would hang the others), one step after the signal's, without a collective of its own
        or waiting for the device to finish the last step."""
        if not self.dist.enabled:
            return self._stop_signal is not None
        agreed = self.train_step.previous_stop()
        if agreed:
            self._stop_signal = agreed
        return bool(agreed)

    def _stop_requested_now(self) -> bool:
        """Whether any rank had a signal by now (its own all_reduce: for the end of the run)."""
        if not self.dist.enabled:
            return self._stop_signal is not None
        flag = torch.tensor([float(self._stop_signal or 0)], device=self.device)
        flag = torch.maximum(flag, self.train_step.stop.reshape(1))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self._stop_signal = int(flag.item()) or None
        return self._stop_signal is not None


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
