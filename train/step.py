"""One training step, the same for the trainer and the benchmark's train mode.

The seed's step: move the batch to the device, keep ``arkit[:, 0, :]`` for target
``first_frame``, forward (bf16 autocast on CUDA), MSE, backward, clip the gradient norm, step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def targets(arkit: torch.Tensor, target: str) -> torch.Tensor:
    """The seed's rule: a 3-D ``arkit`` with target first_frame keeps ``arkit[:, 0, :]``."""
    if arkit.dim() == 3 and target == "first_frame":
        return arkit[:, 0, :]
    return arkit


def autocast(device: torch.device, amp: bool = True):
    """bf16 autocast on CUDA; nothing on CPU (bf16 matmuls there are slower, not faster)."""
    if device.type != "cuda" or not amp:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


class TrainStep:
    """``step(batch) -> loss`` (a 0-d tensor, not synchronised: call ``.item()`` to wait)."""

    def __init__(
        self,
        net: nn.Module,
        opt: torch.optim.Optimizer,
        device: torch.device,
        target: str,
        grad_clip: float | None = None,
        amp: bool = True,
    ) -> None:
        self.net, self.opt, self.device = net, opt, device
        self.target, self.grad_clip, self.amp = target, grad_clip, amp
        self.params = [p for g in opt.param_groups for p in g["params"]]

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        wav = batch["wav"].to(self.device, non_blocking=True)
        y = targets(batch["arkit"].to(self.device, non_blocking=True), self.target)
        with autocast(self.device, self.amp):
            pred = self.net(wav)
        loss = F.mse_loss(pred.float(), y.float())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        return loss.detach()
