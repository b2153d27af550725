"""Validation: MSE and MAE over the whole val split, per blendshape, beside the train-set mean
predictor's; reduced over ranks under DDP. ``Scores`` is the one definition of these numbers:
the trainer's validation and ``python -m infer --eval`` both add their batches to it."""

from __future__ import annotations

import math

import torch
from torch import nn

from core.arkit import ARKIT_NAMES
from pipeline.loaders.base import EpochLoader
from train.distributed import Dist, all_reduce_sum
from train.step import autocast, model_input, scored, targets

JAW_OPEN = ARKIT_NAMES.index("jawOpen")


class Scores:
    """Running sums over predicted and true frames ``[..., nb]``: squared and absolute error per
    blendshape, the mean predictor's too, and the sums Pearson's r of jawOpen needs."""

    def __init__(self, nb: int, device: torch.device, mean_predictor: torch.Tensor | None):
        z = torch.zeros(nb, dtype=torch.float64, device=device)
        self.sq, self.ab, self.base_sq, self.base_ab = z, z.clone(), z.clone(), z.clone()
        self.jaw = torch.zeros(6, dtype=torch.float64, device=device)
        self.mean = mean_predictor

    def add(self, pred: torch.Tensor, y: torch.Tensor) -> None:
        err = pred.float() - y
        dims = tuple(range(err.dim() - 1))
        self.sq += err.square().sum(dims).double()
        self.ab += err.abs().sum(dims).double()
        if self.mean is not None:
            base = self.mean - y
            self.base_sq += base.square().sum(dims).double()
            self.base_ab += base.abs().sum(dims).double()
        x, t = pred[..., JAW_OPEN].double().flatten(), y[..., JAW_OPEN].double().flatten()
        self.jaw += torch.stack(
            [
                torch.tensor(float(len(x)), dtype=torch.float64, device=x.device),
                x.sum(),
                t.sum(),
                x.square().sum(),
                t.square().sum(),
                (x * t).sum(),
            ]
        )

    def reduce(self, dist: Dist) -> None:
        for t in (self.sq, self.ab, self.base_sq, self.base_ab, self.jaw):
            all_reduce_sum(t, dist)

    @property
    def frames(self) -> int:
        return int(self.jaw[0].item())

    def record(self) -> dict:
        """The numbers as plain floats: overall, per blendshape, jawOpen's Pearson r."""
        n, nb = max(self.frames, 1), len(self.sq)
        have_base = self.mean is not None
        per = {}
        for i, name in enumerate(ARKIT_NAMES[:nb]):
            per[name] = {
                "mse": float(self.sq[i] / n),
                "mae": float(self.ab[i] / n),
                "baseline_mse": float(self.base_sq[i] / n) if have_base else None,
                "baseline_mae": float(self.base_ab[i] / n) if have_base else None,
            }
        mse = float(self.sq.sum() / (n * nb))
        base = float(self.base_sq.sum() / (n * nb)) if have_base else None
        return {
            "mse": mse,
            "mae": float(self.ab.sum() / (n * nb)),
            "baseline_mse": base,
            "baseline_mae": float(self.base_ab.sum() / (n * nb)) if have_base else None,
            "mse_ratio": mse / base if base else None,
            "jaw_open_pearson": pearson(*self.jaw.tolist()),
            "per_blendshape": per,
        }


def pearson(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float | None:
    """Pearson's r from running sums; None where either side is constant."""
    vx, vy = n * sxx - sx * sx, n * syy - sy * sy
    if n < 2 or vx <= 0 or vy <= 0:
        return None
    return (n * sxy - sx * sy) / math.sqrt(vx * vy)


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
    scores = Scores(loader.manifest.num_blendshapes, device, mean_predictor)
    loader.set_epoch(0, restart=True)
    for batch_idx, batch in enumerate(loader):
        if max_batches is not None and batch_idx >= max_batches:
            break
        wav = model_input(batch).to(device, non_blocking=True)
        y = targets(batch["arkit"].to(device, non_blocking=True), target).float()
        with autocast(device, amp):
            pred = scored(net(wav), y)
        scores.add(pred, y)
    scores.reduce(dist)
    net.train()
    rec = scores.record()
    frames = 1 if target == "first_frame" else loader.manifest.frames
    return {
        "split": "val",
        "loss": rec["mse"],
        "mse": rec["mse"],
        "mae": rec["mae"],
        "baseline_mse": rec["baseline_mse"],
        "samples": scores.frames // frames,
        "per_blendshape_mae": {k: round(v["mae"], 6) for k, v in rec["per_blendshape"].items()},
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


def verdict_line(cfg, best_mse: float, last: dict | None) -> str | None:
    """The run's last line when even its best validation is worse than predicting the train
    split's mean for every frame (ratio above 1): the model learnt nothing usable. None
    otherwise, without validation, or for a debug run."""
    base = (last or {}).get("baseline_mse")
    if cfg.train.debug or not base or not math.isfinite(best_mse) or best_mse <= base:
        return None
    t = cfg.train
    tries = ["--config configs/real.yaml (the sequence model, 40 epochs)"]
    if t.target != "sequence":
        tries.append("--set train.target=sequence")
    tries.append(f"more epochs than train.epochs={t.epochs}")
    return (
        f"this run is worse than the mean predictor: best val mse {best_mse:.5f} is "
        f"{best_mse / base:.2f}x its {base:.5f}; try {', or '.join(tries)} "
        "(docs/training.md#a-first-model-on-your-own-data)"
    )
