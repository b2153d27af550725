"""``python -m train`` (or ``arkit-train``): train an audio -> ARKit blendshape model on shards.

    python -m train --loader dali                                  # configs/default.yaml
    python -m train --loader torch --config configs/demo.yaml --set run.dir=runs/demo-torch
    python -m train --loader dali --resume runs/default/last.pt    # continue where it stopped
    torchrun --nproc_per_node=8 -m train --loader dali             # DDP on every GPU

``--resume PATH`` continues in PATH's folder (``--set run.dir=...`` chooses another) with the
checkpoint's config, then ``--config``, then ``--set`` on top.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
from pathlib import Path

import torch

from core.errors import ArkitError
from pipeline.loaders.backends import LOADERS
from train.builders import build_loaders, build_model_for, build_step, worker_cap_line
from train.checkpoint import load_checkpoint
from train.config import Config, load_config
from train.distributed import init_distributed, shutdown
from train.signals import Interrupted
from train.trainer import Trainer, seed_everything

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--loader",
        choices=sorted(LOADERS),
        default=None,
        help="data loader backend: a shortcut for --set data.loader=NAME (default: the "
        "config's data.loader, or the checkpoint's with --resume)",
    )
    p.add_argument("--config", default=None, help=f"YAML config (default {DEFAULT_CONFIG.name})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.lr=3e-4 (repeatable)",
    )
    p.add_argument("--debug", action="store_true", help="stop each epoch after 3 batches")
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint (last.pt)")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Config, dict | None]:
    """The run's config and the checkpoint to resume (or None)."""
    overrides = [f"data.loader={args.loader}"] if args.loader else []
    overrides += list(args.overrides) + (["train.debug=true"] if args.debug else [])
    if not args.resume:
        return load_config(args.config or DEFAULT_CONFIG, overrides), None
    state = load_checkpoint(args.resume)
    if not any(o.split("=", 1)[0].strip() == "run.dir" for o in overrides):
        # a resumed run writes beside its checkpoint, never into the folder the checkpoint
        # recorded (a copied checkpoint would append to and overwrite another run)
        overrides.append(f"run.dir={Path(args.resume).resolve().parent}")
    config = state.get("config") if isinstance(state, dict) else None
    base = dict(config) if isinstance(config, dict) else {}
    if isinstance(base.get("run"), dict):
        # run.overwrite is this command's own (--set), never inherited from the checkpoint
        base["run"] = {k: v for k, v in base["run"].items() if k != "overwrite"}
    backend = (state.get("loader") or {}).get("backend")
    if backend is not None and isinstance(base.get("data", {}), dict):
        # the backend the checkpoint's loader state is from, unless --loader or --set says
        base["data"] = {**base.get("data", {}), "loader": backend}
    return load_config(args.config, overrides, base=base), state


def run(cfg: Config, state: dict | None, resume: str | None) -> None:
    d, device = init_distributed(cfg.run.device)
    trainer = step = None
    try:
        if cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)
        seed_everything(cfg.train.seed)
        train_loader, val_loader = build_loaders(cfg, cfg.data.loader, device, d)
        model = build_model_for(cfg, train_loader.manifest)
        step = build_step(cfg, model, device, d)
        # a resume into the checkpoint's own folder continues that run; anywhere else, the
        # folder must hold no other run
        resuming = (
            state is not None and Path(cfg.run.dir).resolve() == Path(resume).resolve().parent
        )
        trainer = Trainer(
            cfg, model, train_loader, val_loader, device, d, step=step, resuming=resuming
        )
        if state is not None:
            trainer.load_state_dict(state, source=str(resume))
            if done := trainer.finished():
                trainer.say(done)
                return
            trainer.say(f"resumed from {resume} at step {trainer.step} into {trainer.run_dir}")
        if line := worker_cap_line(cfg):
            trainer.say(line)
        try:
            trainer.fit()
        except Interrupted as stop:
            if d.is_main:
                trainer.say(
                    f"{stop} at step {trainer.step}; continue with --resume {stop.checkpoint}"
                )
            else:  # one line per rank, as torchrun shows every rank's output
                name = signal.Signals(stop.signum).name
                print(
                    f"rank {d.rank}: stopped by {name} at step {trainer.step} with every rank; "
                    f"rank 0 saves {stop.checkpoint}",
                    flush=True,
                )
            raise
    finally:
        if trainer is not None:
            trainer.release()
            trainer.close()
        del trainer, step  # step.net: the DDP wrapper, also where no trainer was made
        gc.collect()  # the DDP reducer's cycles go before the group does, not at exit
        shutdown(d)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, state = resolve(args)
        run(cfg, state, args.resume)
    except Interrupted as stop:
        return 128 + stop.signum
    except ArkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
