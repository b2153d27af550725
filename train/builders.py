"""What a run is made of, built from its config: the loaders, the model, its optimizer and train
step. The trainer takes them ready-made, so a test can hand it small ones."""

from __future__ import annotations

import os
from dataclasses import fields

import torch
from torch import nn

from core.constants import SAMPLE_RATE
from model import build_model
from model.features import Mel
from pipeline.loaders.augment import Augment
from pipeline.loaders.backends import build_loader
from pipeline.loaders.base import EpochLoader
from pipeline.loaders.spec import DaliOptions, LoaderSpec, TorchOptions, options_of
from pipeline.shards.manifest import Manifest
from train.config import Config
from train.distributed import Dist
from train.step import TrainStep, make_optimizer


def val_batch_size(n_val: int, world_size: int, at_most: int) -> int:
    """The largest batch <= ``at_most`` that divides each rank's share of the val split, so
    validation covers every sample (up to ``world_size - 1`` when the split does not divide)."""
    share = max(1, n_val // world_size)
    return max(b for b in range(1, min(at_most, share) + 1) if share % b == 0)


def usable_cpus() -> int:
    """The CPUs this process may run on (what torch's DataLoader compares its workers with)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_options(cfg: Config, loader: str) -> DaliOptions | TorchOptions:
    """The backend's knobs from ``data:``, under their config names; ``data.num_workers`` at
    most the CPUs this process may use (``worker_cap_line`` says so)."""
    options_cls = options_of(loader)
    values = {f.name: getattr(cfg.data, f.name) for f in fields(options_cls)}
    if "num_workers" in values:
        values["num_workers"] = min(values["num_workers"], usable_cpus())
    return options_cls(**values)


def worker_cap_line(cfg: Config) -> str | None:
    """The line a run says once when the torch loader starts fewer workers than
    ``data.num_workers`` asks for: more processes than CPUs only compete for them."""
    cpus, asked = usable_cpus(), cfg.data.num_workers
    if cfg.data.loader != "torch" or asked <= cpus:
        return None
    whose = " (the baseline's)" if asked == TorchOptions.num_workers else ""
    return (
        f"data.num_workers={asked}{whose} is more than the {cpus} CPUs this process may use: "
        f"the torch loader starts {cpus} workers"
    )


def loader_spec(
    cfg: Config, loader: str, split: str, device: torch.device, d: Dist, n_val: int = 0
) -> LoaderSpec:
    """What the ``split`` loader of a run is made from, read from the config once."""
    data = cfg.data
    batch = data.batch_size
    if split == "val":
        batch = val_batch_size(n_val, d.world_size, data.val_batch_size or batch)
    expect = {
        k: getattr(data, k) for k in ("sample_rate", "clip_samples", "frames", "num_blendshapes")
    }
    return LoaderSpec(
        loader,
        data.dir,
        split=split,
        batch_size=batch,
        device=device,
        shuffle=data.shuffle and split == "train",
        seed=cfg.train.seed,
        rank=d.rank,
        world_size=d.world_size,
        expect=expect,
        augment=Augment.from_dict(cfg.augment.model_dump()) if split == "train" else Augment(),
        with_params=cfg.run.sample_log and split == "train",  # the batches carry their keys
        features=data.features,
        mel=mel_settings(cfg, m=None),
        cache_dir=data.cache_dir,
        cache_limit=data.cache_limit,
        cache_prefetch=data.cache_prefetch,
        options=loader_options(cfg, loader),
    )


def build_loaders(
    cfg: Config, loader: str, device: torch.device, d: Dist
) -> tuple[EpochLoader, EpochLoader | None]:
    """The train loader, and the val loader unless the dataset has no val split (one made with
    --val-fraction 0, or fewer val samples than ranks): then training runs without validation
    rather than refusing to start."""
    train = build_loader(loader_spec(cfg, loader, "train", device, d))
    n_val = train.manifest.num_samples("val")
    val = None
    if n_val >= d.world_size:
        val = build_loader(loader_spec(cfg, loader, "val", device, d, n_val))
    return train, val


def mel_settings(cfg: Config, m: Manifest | None) -> Mel:
    """The log-mel settings of the ``model:`` section, at the dataset's rate (or the config's
    check value, else the format's): what the model's front end and the loader both use."""
    mc = cfg.model
    rate = m.sample_rate if m is not None else cfg.data.sample_rate or SAMPLE_RATE
    return Mel(rate, mc.n_fft, mc.win_length, mc.hop_length, mc.n_mels, mc.fmin, mc.fmax)


def build_model_for(cfg: Config, m: Manifest) -> nn.Module:
    """The configured model for the dataset's sizes and rates, taking ``data.features``."""
    mc = cfg.model
    mel = mel_settings(cfg, m).to_dict()
    return build_model(
        mc.name,
        cfg.train.target,
        hidden=mc.hidden,
        frames=m.frames,
        fps=m.fps,
        num_blendshapes=m.num_blendshapes,
        context_seconds=mc.context_seconds,
        lookahead_seconds=mc.lookahead_seconds,
        features=cfg.data.features,
        **mel,
    )


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The trainer's AdamW (``train.lr``, ``train.weight_decay``) over ``model``'s parameters,
    which are on ``device`` already (fused AdamW is chosen for where they are)."""
    t = cfg.train
    return make_optimizer(model.parameters(), t.lr, t.weight_decay, device)


def build_step(
    cfg: Config,
    model: nn.Module,
    device: torch.device,
    d: Dist | None = None,
    opt: torch.optim.Optimizer | None = None,
) -> TrainStep:
    """The train step of ``model``, moved to ``device``: under DDP (``d.enabled``) it steps the
    model wrapped in DistributedDataParallel (its ``net``), with ``opt`` or
    ``build_optimizer``'s, and ``train.target``, ``train.grad_clip``, ``train.amp``."""
    model = model.to(device)
    net = model
    if d is not None and d.enabled:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if opt is None:
        opt = build_optimizer(cfg, model, device)
    t = cfg.train
    return TrainStep(net, opt, device, t.target, t.grad_clip, t.amp)
