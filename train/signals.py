"""SIGTERM and SIGINT during ``fit``: the handler sets a flag, the loop reads it after each step,
saves ``last.pt`` and raises ``Interrupted``; the CLI exits with 128 + signal.

Under DDP every rank must stop at the same step (a rank that stopped alone would hang the
others). A rank's signal rides in the next step's one all_reduce (``TrainStep.stop``, beside the
bad-batch flag), and every rank reads the agreed value one step later: no collective of its own,
no host sync beyond the one the step already makes.
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import torch

from train.distributed import Dist
from train.step import TrainStep


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: ``last.pt`` was saved; the CLI exits with 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name}: saved {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class StopSignals:
    """The stop flag of one rank, and its agreement with the other ranks through ``step``."""

    def __init__(self, step: TrainStep, dist: Dist, device: torch.device) -> None:
        self.step, self.dist, self.device = step, dist, device
        self.signum: int | None = None  # this rank's signal (or, once agreed, any rank's)
        self._sent: int | None = None  # the signal put into TrainStep.stop

    @contextlib.contextmanager
    def installed(self):
        """SIGTERM/SIGINT set the flag while the block runs; the previous handlers after it."""

        def on_signal(signum, frame) -> None:
            self.signum = signum

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def send(self) -> None:
        """Before a step. Under DDP, this rank's signal goes into the step's all_reduce
        (``TrainStep.stop``, with the bad-batch flag), set once on the device: no host sync, no
        collective."""
        if self.dist.enabled and self.signum not in (None, self._sent):
            self.step.stop.fill_(self.signum)
            self._sent = self.signum

    def requested(self) -> bool:
        """After a step: whether to save and stop. Alone, whether a signal came. Under DDP,
        whether any rank had one by the all_reduce of the step before: every rank reads that
        same value after the same step, so all stop at the same step, one step after the
        signal's, without a collective of its own or waiting for the device to finish the last
        step."""
        if not self.dist.enabled:
            return self.signum is not None
        agreed = self.step.previous_stop()
        if agreed:
            self.signum = agreed
        return bool(agreed)

    def requested_now(self) -> bool:
        """Whether any rank had a signal by now (its own all_reduce: for the end of the run)."""
        if not self.dist.enabled:
            return self.signum is not None
        flag = torch.tensor([float(self.signum or 0)], device=self.device)
        flag = torch.maximum(flag, self.step.stop.reshape(1))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(flag.item()) or None
        return self.signum is not None

    def interrupted(self, checkpoint: Path) -> Interrupted:
        return Interrupted(self.signum, checkpoint)
