"""One training step, the same for the trainer and the benchmark's train mode.

The baseline's step: move the batch to the device, keep ``arkit[:, 0, :]`` for target
``first_frame``, forward (bf16 autocast on CUDA), MSE, backward, clip the gradient norm, step.

A bad batch never reaches the optimizer. The CUDA loader checks a batch's blendshape values one
batch late (so that it never waits for the device), so a batch with a NaN, or a value outside
[0, 1], can reach this step before the loader raises. The step therefore computes a device-side
flag ``bad`` (the whole ``arkit`` holds a value outside [0, 1] or non-finite, ``wav`` a
non-finite value, the loss or the clipped gradient norm is non-finite) and skips the update on
it without a host sync: fused AdamW reads ``opt.found_inf`` (GradScaler's hook) on the device
and leaves parameters, moments and step counts untouched where it is 1. Optimizers without a
fused kernel get their parameters and state put back with ``torch.where``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.errors import ConfigError


def targets(arkit: torch.Tensor, target: str) -> torch.Tensor:
    """The baseline's rule: a 3-D ``arkit`` with target first_frame keeps ``arkit[:, 0, :]``."""
    if arkit.dim() == 3 and target == "first_frame":
        return arkit[:, 0, :]
    return arkit


def scored(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The frames of a sequence model's ``pred`` that the window has targets for: the model
    gives every frame time before its audio's last mel frame, which is one more than the window
    holds when the window is not a whole number of frames long (``--window-seconds 2.01``)."""
    if pred.dim() == 3 and y.dim() == 3 and pred.shape[1] != y.shape[1]:
        if pred.shape[1] < y.shape[1]:
            raise ConfigError(
                f"the model gave {pred.shape[1]} frames for a window of {y.shape[1]}: its "
                "log-mel hop is too long for the frame rate"
            )
        return pred[:, : y.shape[1]]
    return pred


def autocast(device: torch.device, amp: bool = True):
    """bf16 autocast on CUDA; nothing on CPU (bf16 matmuls there are slower, not faster)."""
    if device.type != "cuda" or not amp:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def make_optimizer(
    params: Iterable[torch.Tensor], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """The trainer's AdamW, fused where the device has the kernel (CPU, CUDA, MPS, XPU, ...):
    its ``found_inf`` lets ``TrainStep`` skip a bad batch's update without a host sync.
    Elsewhere AdamW with its step counts on the device (``capturable``) where it can, so that
    ``TrainStep``'s ``torch.where`` restore covers them too."""
    params = list(params)
    with contextlib.suppress(RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    capturable = device.type in _capturable_devices()
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, capturable=capturable)


def set_lr_and_weight_decay(
    opt: torch.optim.Optimizer, lr: float, weight_decay: float
) -> list[str]:
    """Put ``lr`` and ``weight_decay`` in every param group; what changed, as
    ``train.lr 0.001 -> 0.0003`` lines. Loading an optimizer's state takes the checkpoint's, and
    a resumed run (``--set train.lr=...``) steps with, and records, the ones its config says.
    AdamW reads both afresh at every step and keeps its moments, so a change applies exactly
    from the next step on."""
    changed = []
    for key, value in (("lr", lr), ("weight_decay", weight_decay)):
        old = opt.param_groups[0][key]
        if float(old) != value:
            changed.append(f"train.{key} {float(old):g} -> {value:g}")
        for group in opt.param_groups:
            group[key] = value
    return changed


def _capturable_devices() -> list[str]:
    from torch.optim import optimizer

    supported = getattr(optimizer, "_get_capturable_supported_devices", None)
    return supported() if supported else ["cuda"]


def _fused_devices() -> list[str]:
    from torch.optim import optimizer

    supported = getattr(optimizer, "_get_fused_kernels_supported_devices", None)
    return supported() if supported else ["cuda"]


def is_fused(opt: torch.optim.Optimizer) -> bool:
    return all(g.get("fused") for g in opt.param_groups)


def fuse(opt: torch.optim.Optimizer) -> bool:
    """Switch an Adam/AdamW to its fused kernel where every parameter's device has one; True if
    ``opt`` is fused afterwards. The state is kept (step counts move to the parameters' device,
    as fused AdamW keeps them). Needed where the optimizer was not built by ``make_optimizer``,
    or lost ``fused`` by loading the state of one that was not (``load_state_dict`` takes the
    saved param groups' settings, ``fused`` included)."""
    if is_fused(opt):
        return True
    if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
        return False
    devices = _fused_devices()
    for g in opt.param_groups:
        if g.get("differentiable") or any(
            p.device.type not in devices or not torch.is_floating_point(p) or p.is_complex()
            for p in g["params"]
        ):
            return False
    for g in opt.param_groups:
        g["fused"], g["foreach"] = True, None
        for p in g["params"]:
            state = opt.state.get(p)
            if state and "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)
    opt.defaults["fused"], opt.defaults["foreach"] = True, None
    opt._step_supports_amp_scaling = True
    return True


def model_input(batch: dict) -> torch.Tensor:
    """What the model takes from a batch: ``mel`` (data.features: mel) or ``wav``."""
    return batch["mel"] if "mel" in batch else batch["wav"]


class TrainStep:
    """``step(batch) -> loss`` (a 0-d tensor, not synchronised: call ``.item()`` to wait).

    A bad batch (see the module's doc) takes no optimizer step; ``last_skipped`` (0-d bool) and
    ``skipped`` (0-d int64, the count since this step was made) say so, on the device: read
    them where the host waits anyway (``loss.item()``). Under DDP the flag is all-reduced, so
    that every rank skips the same steps and the replicas stay equal; the same all_reduce
    carries ``stop`` (the trainer's signal agreement)."""

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
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.last_skipped = torch.zeros((), dtype=torch.bool, device=device)
        # under DDP: a stop request (a signal number, 0: none) the trainer sets on its rank; the
        # step's all_reduce carries it with the bad-batch flag, so that afterwards every rank
        # holds the same value, the largest any rank set (no collective of its own). Each
        # step copies the reduced value to the host (slot = steps % 2) without waiting;
        # ``previous_stop`` reads the one of the step before the last
        self.stop = torch.zeros((), dtype=torch.float32, device=device)
        self.steps = 0
        cuda = torch.device(device).type == "cuda"
        self._stop_host = [torch.zeros((), pin_memory=cuda) for _ in range(2)]
        self._stop_copied = [torch.cuda.Event() for _ in range(2)] if cuda else None

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        wav = model_input(batch).to(self.device, non_blocking=True)
        arkit = batch["arkit"].to(self.device, non_blocking=True)
        y = targets(arkit, self.target)
        with autocast(self.device, self.amp):
            pred = scored(self.net(wav), y)
        loss = F.mse_loss(pred.float(), y.float())
        bad = self._bad_batch(wav, arkit, loss)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(
                self.params, self.grad_clip, error_if_nonfinite=False
            )
            bad = bad | ~torch.isfinite(norm)
        self._step_unless(bad)
        self.skipped += bad
        self.last_skipped = bad
        self.steps += 1
        return loss.detach()

    def previous_stop(self) -> int:
        """Under DDP, the stop request every rank held after the all_reduce of the step before
        the last (0: none). The host waits for that step's all_reduce and copy only, which
        finished while it queued the last step: no wait for the device to drain. Every rank
        reads the same value after the same step, so all stop together."""
        if self.steps < 2:
            return 0
        slot = (self.steps - 2) % 2
        if self._stop_copied is not None:
            self._stop_copied[slot].synchronize()
        return int(self._stop_host[slot].item())

    def _bad_batch(self, wav: torch.Tensor, arkit: torch.Tensor, loss: torch.Tensor):
        """0-d bool on the device; min/max propagate NaN, so two reductions check it all."""
        lo, hi = torch.aminmax(arkit.detach())
        wav_lo, wav_hi = torch.aminmax(wav.detach())
        ok = (lo >= 0) & (hi <= 1) & torch.isfinite(wav_lo) & torch.isfinite(wav_hi)
        bad = ~(ok & torch.isfinite(loss.detach()))
        if isinstance(self.net, DistributedDataParallel):  # one rank's bad batch: all skip
            flags = torch.stack([bad.to(torch.float32), self.stop])
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            bad, self.stop = flags[0] > 0, flags[1]
            slot = self.steps % 2
            self._stop_host[slot].copy_(self.stop, non_blocking=True)
            if self._stop_copied is not None:
                self._stop_copied[slot].record()
        return bad

    def _step_unless(self, bad: torch.Tensor) -> None:
        if fuse(self.opt):
            self.opt.found_inf = bad.to(torch.float32)  # fused AdamW: no update where 1
            try:
                self.opt.step()
            finally:
                del self.opt.found_inf
            return
        self._step_and_restore(bad)

    def _step_and_restore(self, bad: torch.Tensor) -> None:
        """Any other optimizer: step, then put parameters and state back where ``bad``. State
        the step created (the first step's) goes back to zeros, an Adam's fresh state. A step
        count kept on the host (a non-fused, non-capturable Adam on an accelerator) cannot be
        put back without a sync and is left counted."""
        before = {p: p.detach().clone() for p in self.params}
        state = {
            (p, k): v.clone()
            for p in self.params
            for k, v in self.opt.state.get(p, {}).items()
            if isinstance(v, torch.Tensor) and v.device == bad.device
        }
        self.opt.step()
        with torch.no_grad():
            for p, old in before.items():
                p.copy_(torch.where(bad, old, p))
            for p in self.params:
                for k, v in self.opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.device == bad.device:
                        old = state.get((p, k))
                        v.copy_(torch.where(bad, torch.zeros_like(v) if old is None else old, v))
