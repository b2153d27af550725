"""Validation: MSE and MAE over the whole val split, per blendshape, beside the train-set mean
predictor's MSE; reduced over ranks under DDP."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.arkit import ARKIT_NAMES
from pipeline.loading import EpochLoader
from train.distributed import Dist, all_reduce_sum
from train.step import autocast, targets


@torch.no_grad()
def validate(
    net: nn.Module,
    loader: EpochLoader,
    *,
    target: str,
    device: torch.device,
    mean_predictor: torch.Tensor | None,
    amp: bool,
    dist: Dist,
    max_batches: int | None = None,
) -> dict:
    """One unshuffled pass over ``loader`` (the same every time); the metrics as a record."""
    net.eval()
    nb = loader.manifest.num_blendshapes
    sq = torch.zeros(nb, dtype=torch.float64, device=device)
    ab = torch.zeros_like(sq)
    base = torch.zeros_like(sq)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    loader.set_epoch(0, restart=True)
    for batch_idx, batch in enumerate(loader):
        if max_batches is not None and batch_idx >= max_batches:
            break
        wav = batch["wav"].to(device, non_blocking=True)
        y = targets(batch["arkit"].to(device, non_blocking=True), target).float()
        with autocast(device, amp):
            pred = net(wav)
        err = pred.float() - y
        dims = tuple(range(err.dim() - 1))
        sq += err.square().sum(dims).double()
        ab += err.abs().sum(dims).double()
        if mean_predictor is not None:
            base += (mean_predictor - y).square().sum(dims).double()
        count += math.prod(err.shape[:-1])
    for t in (sq, ab, base, count):
        all_reduce_sum(t, dist)
    net.train()
    n = max(count.item(), 1)
    mse = (sq.sum() / (n * nb)).item()
    frames = 1 if target == "first_frame" else loader.manifest.frames
    per_mae = (ab / n).cpu().numpy()
    return {
        "split": "val",
        "loss": mse,
        "mse": mse,
        "mae": (ab.sum() / (n * nb)).item(),
        "baseline_mse": (base.sum() / (n * nb)).item() if mean_predictor is not None else None,
        "samples": int(count.item()) // frames,
        "per_blendshape_mae": {
            name: round(float(v), 6) for name, v in zip(ARKIT_NAMES, per_mae, strict=True)
        },
    }


def summary_lines(rec: dict) -> list[str]:
    """What a person reads after each validation: the MSE against the mean predictor's, and the
    ten blendshapes the model gets most wrong."""
    base = rec["baseline_mse"]
    ratio = f" ({rec['mse'] / base:.2f}x the mean predictor's {base:.5f})" if base else ""
    worst = sorted(rec["per_blendshape_mae"].items(), key=lambda kv: -kv[1])[:10]
    return [
        f"epoch {rec['epoch']} step {rec['step']}: val mse {rec['mse']:.5f}{ratio}, "
        f"mae {rec['mae']:.4f} over {rec['samples']} samples",
        "  worst MAE: " + ", ".join(f"{k} {v:.3f}" for k, v in worst),
    ]
