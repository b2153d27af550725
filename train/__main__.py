"""``python -m train``: train an audio -> ARKit blendshape model on WebDataset shards.

python -m train --loader dali                                  # configs/default.yaml
python -m train --loader torch --config configs/demo.yaml --set train.epochs=3
python -m train --loader dali --resume runs/default/last.pt    # continue where it stopped
torchrun --nproc_per_node=8 -m train --loader dali             # DDP on every GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.shard_format import DatasetError
from train.checkpoint import load_checkpoint
from train.config import ConfigError, load_config
from train.distributed import init_distributed, shutdown

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--loader",
        choices=("dali", "torch"),
        default=None,
        help="data loader backend (default: dali, or the checkpoint's with --resume)",
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


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + (["train.debug=true"] if args.debug else [])
    try:
        if args.resume:
            state = load_checkpoint(args.resume)
            # the checkpoint's resolved config, then an explicit --config, then --set
            cfg = load_config(args.config, overrides, base=state["config"])
        else:
            state = None
            cfg = load_config(args.config or DEFAULT_CONFIG, overrides)
    except (ConfigError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        d, device = init_distributed(cfg.run.device)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from train.trainer import Trainer

        loader = args.loader or (state or {}).get("loader", {}).get("backend", "dali")
        trainer = Trainer(cfg, loader, device, d)
        if state is not None:
            trainer.load_state_dict(state)
            trainer.say(f"resumed from {args.resume} at step {trainer.step}")
        trainer.fit()
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
