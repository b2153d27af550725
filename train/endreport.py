"""The end of a run: ``best.pt``'s evaluation report in ``run.dir/report``, as
``python -m infer --eval`` writes it (``train.evaluate``, ``train.predict``, ``train.report``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline.loaders.base import EpochLoader
from train.config import Config
from train.distributed import Dist


def report_best(
    cfg: Config,
    model: nn.Module,
    train_loader: EpochLoader,
    val_loader: EpochLoader | None,
    run_dir: Path,
    device: torch.device,
    dist: Dist,
    say: Callable[[str], None],
) -> None:
    """Evaluate ``run_dir/best.pt`` on the val split with the train loader's backend and write
    the report (not for debug runs, without validation, or for a model ``build_model`` did not
    make: inference needs to know how it reads audio). Every rank takes part; rank 0 writes."""
    if not cfg.train.report or cfg.train.debug or val_loader is None:
        return
    if not hasattr(model, "build_args"):
        say("no evaluation report: the model was not made by model.build_model")
        return
    from train.builders import loader_options
    from train.evaluate import evaluate
    from train.predict import Predictor
    from train.report import write_report

    best = run_dir / "best.pt"
    # every rank goes on only if every rank sees the best.pt rank 0 wrote (the stop check's
    # all_reduce before this waited for rank 0's save); one rank skipping alone would leave
    # the others waiting in evaluate's all_reduce
    seen = torch.tensor([float(best.is_file())], device=device)
    if dist.enabled:
        torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MIN)
    if not seen.item():
        say(f"no evaluation report: {best} was not written (no finite val mse) or not seen")
        return
    state = torch.load(best, map_location=device, weights_only=True)
    model = copy.deepcopy(model)
    model.load_state_dict(state["model"])
    m = train_loader.manifest
    batch = val_loader.batch_size
    predictor = Predictor(
        model.eval(), cfg.train.target, m.sample_rate, m.fps, m.frames, device, batch
    )
    loader = train_loader.name
    rec, example = evaluate(
        predictor, m.root, "val", loader, batch, dist, loader_options(cfg, loader)
    )
    if dist.is_main:
        rec = {"checkpoint": str(best), "step": int(state["step"]), **rec}
        paths = write_report(run_dir / "report", rec, example)
        say(f"report on {best.name} (step {rec['step']}): {paths[0].parent}/report.md")
