"""The training loop: the seed's loop, with validation, checkpoints, resume and DDP around it.

python -m train --loader dali                      # one GPU (or CPU)
torchrun --nproc_per_node=8 -m train --loader dali # every GPU of a machine
"""

from __future__ import annotations

import json
import math
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import build_model
from pipeline import build_loader
from pipeline.arkit import ARKIT_NAMES
from train.checkpoint import save_checkpoint
from train.config import Config
from train.distributed import Dist, all_reduce_sum


def val_batch_size(n_val: int, world_size: int, at_most: int) -> int:
    """The largest batch <= ``at_most`` that divides each rank's share of the val split, so
    validation covers every sample (up to ``world_size - 1`` when the split does not divide)."""
    share = max(1, n_val // world_size)
    return max(b for b in range(1, min(at_most, share) + 1) if share % b == 0)


def make_loader(
    cfg: Config, loader: str, split: str, device: torch.device, d: Dist, n_val: int = 0
):
    data = cfg.data
    expect = {
        "sample_rate": data.sample_rate,
        "clip_samples": data.clip_samples,
        "frames": data.frames,
        "num_blendshapes": data.num_blendshapes,
    }
    batch = data.batch_size
    options: dict = {"expect": expect}
    if split == "val":
        batch = val_batch_size(n_val, d.world_size, data.val_batch_size or batch)
    if loader == "torch":
        options.update(
            num_workers=data.num_workers, pin_memory=data.pin_memory, drop_last=data.drop_last
        )
    elif loader == "dali":
        options.update(
            decode=None if data.decode == "auto" else data.decode,
            num_threads=data.dali_threads or None,
            prefetch_queue_depth=data.dali_prefetch,
            initial_fill=data.shuffle_buffer,
        )
    return build_loader(
        loader,
        data.dir,
        split=split,
        batch_size=batch,
        device=device,
        shuffle=data.shuffle and split == "train",
        seed=cfg.train.seed,
        rank=d.rank,
        world_size=d.world_size,
        **options,
    )


def targets(arkit: torch.Tensor, target: str) -> torch.Tensor:
    """The seed's rule: a 3-D ``arkit`` with target first_frame keeps ``arkit[:, 0, :]``."""
    if arkit.dim() == 3 and target == "first_frame":
        return arkit[:, 0, :]
    return arkit


class StopRequested(Exception):
    pass


class Trainer:
    def __init__(
        self, cfg: Config, loader: str, device: torch.device, d: Dist | None = None
    ) -> None:
        d = d or Dist()
        self.cfg, self.loader_name, self.device, self.dist = cfg, loader, device, d
        if cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        self.train_loader = make_loader(cfg, loader, "train", device, d)
        n_val = self.train_loader.manifest.num_samples("val")
        # a dataset made with --val-fraction 0 (or fewer val samples than ranks) trains without
        # validation rather than refusing to start
        self.val_loader = (
            make_loader(cfg, loader, "val", device, d, n_val) if n_val >= d.world_size else None
        )
        m = cfg.model
        self.model = build_model(
            m.name,
            cfg.train.target,
            n_mels=m.n_mels,
            hidden=m.hidden,
            n_fft=m.n_fft,
            win_length=m.win_length,
            hop_length=m.hop_length,
            frames=cfg.data.frames,
            num_blendshapes=cfg.data.num_blendshapes,
            **({"context_seconds": m.context_seconds} if cfg.train.target == "first_frame" else {}),
        ).to(device)
        self.net = self.model
        if d.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.step = 0
        self.best_val = math.inf
        self.run_dir = Path(cfg.run.dir)
        mean = self.train_loader.manifest.train_mean(cfg.train.target)
        self.mean_predictor = None if mean is None else torch.as_tensor(mean, device=device)
        self._stop_signal: int | None = None
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "epoch": self.train_loader.state_dict()["epoch"],
            "loader": self.train_loader.state_dict(),
            "best_val_mse": self.best_val,
            "config": self.cfg.to_dict(),
            "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.best_val = float(state.get("best_val_mse", math.inf))
        self.train_loader.load_state_dict(state["loader"])

    def save(self, name: str = "last.pt") -> None:
        if self.dist.is_main:
            save_checkpoint(self.run_dir / name, self.state_dict())

    # ------------------------------------------------------------ logging
    def log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        record = {**record, "world_size": self.dist.world_size, "loader": self.loader_name}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    # ------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, epoch: int) -> dict:
        self.net.eval()
        target = self.cfg.train.target
        nb = self.cfg.data.num_blendshapes
        sq = torch.zeros(nb, dtype=torch.float64, device=self.device)
        ab = torch.zeros_like(sq)
        base = torch.zeros_like(sq)
        count = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.val_loader.set_epoch(0, restart=True)  # the same unshuffled pass every time
        for batch_idx, batch in enumerate(self.val_loader):
            if self.cfg.train.debug and batch_idx >= 3:
                break
            wav = batch["wav"].to(self.device, non_blocking=True)
            y = targets(batch["arkit"].to(self.device, non_blocking=True), target).float()
            with self.autocast():
                pred = self.net(wav)
            err = pred.float() - y
            dims = tuple(range(err.dim() - 1))
            sq += err.square().sum(dims).double()
            ab += err.abs().sum(dims).double()
            if self.mean_predictor is not None:
                base += (self.mean_predictor - y).square().sum(dims).double()
            count += math.prod(err.shape[:-1])
        for t in (sq, ab, base, count):
            all_reduce_sum(t, self.dist)
        self.net.train()
        n = max(count.item(), 1)
        per_mae = (ab / n).cpu().numpy()
        rec = {
            "split": "val",
            "epoch": epoch,
            "step": self.step,
            "loss": (sq.sum() / (n * nb)).item(),
            "mse": (sq.sum() / (n * nb)).item(),
            "mae": (ab.sum() / (n * nb)).item(),
            "baseline_mse": (base.sum() / (n * nb)).item()
            if self.mean_predictor is not None
            else None,
            "samples": int(count.item())
            if target == "first_frame"
            else int(count.item()) // self.cfg.data.frames,
            "per_blendshape_mae": {
                name: round(float(v), 6) for name, v in zip(ARKIT_NAMES, per_mae, strict=True)
            },
        }
        return rec

    def autocast(self):
        on = self.device.type == "cuda" and self.cfg.train.amp
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    # ------------------------------------------------------------ training
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM/SIGINT; under DDP all ranks agree after each step, so
        they stop at the same step (a rank that stopped alone would hang the others)."""
        if not self.dist.enabled:
            return self._stop_signal is not None
        flag = torch.tensor([self._stop_signal or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self._stop_signal = int(flag.item()) or None
        return self._stop_signal is not None

    def fit(self) -> dict | None:
        cfg, t = self.cfg, self.cfg.train
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        last_val = None
        try:
            from tqdm import tqdm

            start_epoch = self.train_loader.state_dict()["epoch"]
            for epoch in range(start_epoch, t.epochs):
                if t.max_steps and self.step >= t.max_steps:
                    break
                self.train_loader.set_epoch(epoch)  # debug may have cut the last one short
                first = self.train_loader.state_dict()["batch"]
                steps_this_epoch = (
                    min(len(self.train_loader), 3) if t.debug else len(self.train_loader)
                )
                bar = tqdm(
                    total=steps_this_epoch,
                    initial=min(first, steps_this_epoch),
                    desc=f"epoch {epoch}",
                    disable=not (cfg.run.progress and self.dist.is_main),
                    dynamic_ncols=True,
                    file=sys.stdout,
                )
                tick, seen = time.perf_counter(), 0
                for batch_idx, batch in enumerate(self.train_loader, start=first):
                    if t.debug and batch_idx >= 3:
                        break
                    wav = batch["wav"].to(self.device, non_blocking=True)
                    arkit = targets(batch["arkit"].to(self.device, non_blocking=True), t.target)
                    with self.autocast():
                        pred = self.net(wav)
                    loss = F.mse_loss(pred.float(), arkit.float())
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if t.grad_clip:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                    self.opt.step()
                    self.step += 1
                    seen += wav.shape[0] * self.dist.world_size
                    if self.step % t.log_every == 0 or batch_idx == 0:
                        value = loss.item()
                        rate = seen / max(time.perf_counter() - tick, 1e-9)
                        bar.set_postfix(loss=f"{value:.4f}", samples_s=f"{rate:.0f}")
                        self.log(
                            {
                                "split": "train",
                                "epoch": epoch,
                                "step": self.step,
                                "loss": value,
                                "lr": self.opt.param_groups[0]["lr"],
                                "samples_per_s": rate,
                            }
                        )
                    bar.update(1)
                    if cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0:
                        self.save()
                    if self._stop_requested():
                        raise StopRequested
                    if t.max_steps and self.step >= t.max_steps:
                        break
                bar.close()
                if not (t.max_steps and self.step >= t.max_steps):
                    self.train_loader.set_epoch(epoch + 1)  # a checkpoint now resumes there
                if self.val_loader is not None:
                    last_val = self.validate(epoch)
                    self.log(last_val)
                    self.report(last_val)
                    if last_val["mse"] < self.best_val:
                        self.best_val = last_val["mse"]
                        self.save("best.pt")
                elif epoch == start_epoch:
                    self.say(f"{cfg.data.dir} has no val split: training without validation")
                self.save()
        except StopRequested:
            self.save()
            name = signal.Signals(self._stop_signal).name
            self.say(
                f"{name}: saved {self.run_dir / 'last.pt'} at step {self.step}; "
                f"continue with --resume {self.run_dir / 'last.pt'}"
            )
            raise SystemExit(128 + self._stop_signal) from None
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return last_val

    def report(self, rec: dict) -> None:
        base = rec["baseline_mse"]
        ratio = f" ({rec['mse'] / base:.2f}x the mean predictor's {base:.5f})" if base else ""
        self.say(
            f"epoch {rec['epoch']} step {rec['step']}: val mse {rec['mse']:.5f}{ratio}, "
            f"mae {rec['mae']:.4f} over {rec['samples']} samples"
        )
        worst = sorted(rec["per_blendshape_mae"].items(), key=lambda kv: -kv[1])[:10]
        self.say("  worst MAE: " + ", ".join(f"{k} {v:.3f}" for k, v in worst))
