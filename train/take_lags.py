"""Each take's lag measured with a model: its predicted mouth against the captured one.

A model trained on aligned takes moves the mouth with the sound, so in a take whose audio runs
late against its capture the predicted mouth runs late against the captured mouth by as much.
``take_lags`` reads a split's samples (their json names the take and where the sample starts),
predicts every sample, joins each take's samples in order and measures the lag between the two
mouths the way ``make_shards`` measures audio against mouth (``pipeline.convert.sync``): a take
further than the dataset's ``max_sync_offset`` from the takes' median lag is flagged, one whose
mouths cannot tell (a model that has not learnt the mouth, a still face) is unknown.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.convert.sync import (
    ENVELOPE_RATE,
    MAX_OFFSET_SECONDS,
    SEARCH_SECONDS,
    best_lag,
    mouth_envelope,
)
from pipeline.convert.syncing import reference_lag
from pipeline.shards import storage
from pipeline.shards.manifest import Manifest, load_manifest
from pipeline.shards.members import JSON_EXT, NPY_EXT, WAV_EXT, decode_sample
from pipeline.shards.tars import idx_path, read_index


def read_takes(m: Manifest, split: str) -> dict[str, list[tuple[float, np.ndarray, np.ndarray]]]:
    """The split's samples by take (their json's ``source``): (start seconds, audio float32,
    frames ``[T, 52]``), in order of start."""
    layout = m.layout(split)
    takes: dict[str, list] = {}
    for tar in m.tar_paths(split):
        for sample in read_index(idx_path(tar)):
            by_ext = {c.name.partition(".")[2]: c for c in sample}
            blobs = {
                ext: storage.read_range(tar, by_ext[ext].offset, by_ext[ext].size)
                for ext in (WAV_EXT, NPY_EXT, JSON_EXT)
            }
            meta = json.loads(blobs[JSON_EXT])
            wav, arkit = decode_sample(blobs[WAV_EXT], blobs[NPY_EXT], layout)
            takes.setdefault(meta["source"], []).append((meta["start_seconds"], wav, arkit))
    return {k: sorted(v, key=lambda s: s[0]) for k, v in sorted(takes.items())}


def take_lags(
    data_dir: str | Path,
    split: str,
    predict: Callable[[np.ndarray], np.ndarray],
    search_seconds: float = SEARCH_SECONDS,
    max_offset: float | None = None,
) -> dict:
    """Per take of ``split``: the lag of the mouth ``predict`` (audio -> ``[T, 52]`` at the
    dataset's fps) draws from its audio behind the captured mouth, and whether it is flagged
    (further than ``max_offset`` from the reference: the takes' median, or 0 with fewer than 3
    known; default: the dataset's --max-sync-offset)."""
    m = load_manifest(data_dir)
    limit = max_offset or float(m.sync.get("max_sync_offset", MAX_OFFSET_SECONDS))
    rows = []
    for source, samples in read_takes(m, split).items():
        pred = np.concatenate([predict(wav)[: len(arkit)] for _, wav, arkit in samples])
        true = np.concatenate([arkit for _, _, arkit in samples])
        n = int(len(true) / m.fps * ENVELOPE_RATE) - 1
        lag = best_lag(
            mouth_envelope(pred, m.fps, n), mouth_envelope(true, m.fps, n), search_seconds
        )
        rows.append({"source": source, "samples": len(samples), **lag.to_dict()})
    ref = reference_lag([r["lag"] for r in rows if r["lag"] is not None])
    for r in rows:
        r["flagged"] = r["lag"] is not None and abs(r["lag"] - ref) > limit
    return {"reference_seconds": round(ref, 6), "max_sync_offset": limit, "takes": rows}


def lag_lines(lags: dict) -> list[str]:
    """report.md's table of the takes' lags, flagged ones first."""
    ref, limit = lags["reference_seconds"], lags["max_sync_offset"]
    rows = sorted(lags["takes"], key=lambda r: (not r["flagged"], r["source"]))
    lines = [
        f"The predicted mouth against the captured one, per take: a take more than "
        f"{limit * 1000:.0f} ms from the reference ({ref * 1000:+.0f} ms) is flagged.",
        "",
        "| take | samples | lag (ms) | correlation | flagged |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lag = "unknown" if r["lag"] is None else f"{r['lag'] * 1000:+.0f}"
        flag = "**yes**" if r["flagged"] else ""
        lines.append(f"| {r['source']} | {r['samples']} | {lag} | {r['peak']:.2f} | {flag} |")
    return lines
