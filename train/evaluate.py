"""Score a checkpoint on a dataset split the way ``python -m infer`` would use it: every frame
of every sample predicted (a first_frame model slides over the sample), against the truth and
the train split's mean frame, with the trainer's own metrics (``train.validate.Scores``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.errors import DatasetError
from pipeline.loaders.backends import build_loader
from pipeline.loaders.spec import DaliOptions, LoaderSpec, TorchOptions
from pipeline.shards.manifest import SPLITS, load_manifest
from train.builders import val_batch_size
from train.distributed import Dist
from train.predict import Predictor
from train.report import group_mae
from train.validate import JAW_OPEN, Scores


def scorable(predictor: Predictor, data_dir: str | Path, split: str, world_size: int):
    """The dataset's manifest, or DatasetError when its ``split`` cannot be scored by the
    ``predictor`` over ``world_size`` ranks."""
    if split not in SPLITS:
        raise DatasetError(f"no split {split!r}: choose from {', '.join(SPLITS)}")
    m = load_manifest(data_dir)
    n = m.num_samples(split)
    if n < world_size:
        raise DatasetError(f"{m.root} has {n} samples in its {split} split: nothing to score")
    if m.sample_rate != predictor.sample_rate or m.fps != predictor.fps:
        raise DatasetError(
            f"{m.root} is at {m.sample_rate} Hz and {m.fps:g} fps; the checkpoint's model at "
            f"{predictor.sample_rate} Hz and {predictor.fps:g} fps"
        )
    return m


def evaluate(
    predictor: Predictor,
    data_dir: str | Path,
    split: str = "val",
    loader: str = "dali",
    batch_size: int = 16,
    dist: Dist | None = None,
    options: DaliOptions | TorchOptions | None = None,
) -> tuple[dict, dict | None]:
    """The evaluation record (see ``train.report``) and the example window worth plotting: the
    one whose true jawOpen moves most. Under DDP (``dist``) each rank scores its share;
    ``options``: the loader backend's knobs."""
    d = dist or Dist()
    dev = predictor.device
    m = scorable(predictor, data_dir, split, d.world_size)
    n = m.num_samples(split)
    lay = m.layout(split)
    spec = LoaderSpec(
        loader,
        data_dir,
        split=split,
        batch_size=val_batch_size(n, d.world_size, batch_size),
        device=dev,
        shuffle=False,
        rank=d.rank,
        world_size=d.world_size,
        crop=False,  # every frame of every sample: segments whole, not cropped
        options=options,
    )
    data = build_loader(spec)
    mean = m.train_mean("sequence")  # every frame is scored: the mean frame is the baseline
    scores = Scores(
        m.num_blendshapes, dev, None if mean is None else torch.as_tensor(mean, device=dev)
    )
    example, best, index = None, -1.0, 0  # index: samples seen
    data.set_epoch(0, restart=True)
    for batch in data:
        wav = batch["wav"]
        y = batch["arkit"].to(dev).float()
        if lay.frames == predictor.window_frames:
            pred = predictor.window_batch(wav)
        else:  # segments longer than the model's window
            rows = [predictor.predict(w.cpu().numpy(), progress=False) for w in wav]
            pred = torch.as_tensor(np.stack(rows), device=dev)[:, : lay.frames]
        scores.add(pred, y)
        spread = y[..., JAW_OPEN].std(dim=1)
        i = int(spread.argmax())
        if float(spread[i]) > best:
            best = float(spread[i])
            example = {
                "pred": pred[i].cpu().numpy(),
                "true": y[i].cpu().numpy(),
                "index": index + i,
            }
        index += len(wav)
    scores.reduce(d)
    rec = scores.record()
    rec["groups"] = group_mae({k: v["mae"] for k, v in rec["per_blendshape"].items()})
    rec.update(
        dataset=str(m.root),
        split=split,
        samples=scores.frames // lay.frames,  # every sample holds lay.frames, uncropped
        frames=scores.frames,
        fps=float(m.fps),
    )
    if example is not None:
        example.update(
            fps=float(m.fps),
            label=f"{split} sample {example.pop('index')}"
            + (f" (rank {d.rank})" if d.enabled else ""),
        )
    return rec, example
