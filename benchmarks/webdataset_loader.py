"""The ``webdataset`` row: the webdataset library's own loader (``WebDataset`` with a shard
shuffle and a sample buffer, ``WebLoader`` workers) over the same shards, decoding the members
with our own parser (no pickle, no autodecode)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from benchmarks.figures import plural
from core.errors import DatasetError, MemberError
from pipeline.shards.index import sample_refs
from pipeline.shards.manifest import Manifest, verify_hint
from pipeline.shards.members import NPY_EXT, WAV_EXT, decode_sample


def _wds_decoder(m: Manifest):
    def decode(sample: dict) -> tuple[np.ndarray, np.ndarray] | str:
        # our own parser on the raw member bytes (as the torch row): no pickle, no autodecode
        try:
            return decode_sample(sample[WAV_EXT], sample[NPY_EXT], m)
        except MemberError as exc:
            # said in the main process: an error raised in a worker reaches it with the
            # worker's traceback inside its message
            where = f"{sample.get('__url__', m.root)}: sample {sample.get('__key__')}"
            return f"{where}: {exc}; {verify_hint(m.root)}"

    return decode


def _wds_collate(samples: list) -> dict[str, torch.Tensor] | dict[str, str]:
    bad = next((s for s in samples if isinstance(s, str)), None)
    if bad is not None:
        return {"error": bad}
    return {
        "wav": torch.from_numpy(np.stack([s[0] for s in samples])),
        "arkit": torch.from_numpy(np.stack([s[1] for s in samples])),
    }


def webdataset_row(spec, args, m: Manifest, device: torch.device):
    """The benchmark's ``webdataset`` row (``benchmarks.rows``)."""
    import webdataset as wds

    sample_refs(m, "train")  # the other rows' start-up check: each entry where its index says
    tars = m.tar_paths("train")
    dataset = (
        # shard shuffle over all shards: fewer shards than workers leaves some idle
        wds.WebDataset(tars, shardshuffle=len(tars), seed=0, empty_check=False)
        .shuffle(args.wds_shuffle, seed=0)
        .map(_wds_decoder(m))
        .batched(args.batch_size, collation_fn=_wds_collate, partial=False)
    )
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )

    def stream(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # one pass of WebLoader is one epoch
            for batch in loader:
                if "error" in batch:
                    raise DatasetError(batch["error"])
                yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    workers = plural(args.workers, "worker")
    what = f"webdataset WebLoader, {workers}, our parsers, shuffle {args.wds_shuffle}"
    return spec.row(what, stream)
