"""Measuring rows: one repeat (``measure``), the median over repeats (``summarize``) and the
ratios between rows (``add_ratios``). Pure functions of a ``Row`` and the clock, so they are
tested on fake rows without a dataset.

A repeat starts a fresh epoch, takes ``warmup`` batches untimed (pipeline build, worker start,
webdataset's shuffle-buffer fill), then ``batches`` timed ones. Besides wall time it records
the time spent blocked in ``next()`` and the CPU time of this process and its live
descendants (the loader workers), which is steadier than wall time on a shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import torch

from benchmarks.figures import figure
from pipeline.shards.manifest import Manifest

MODES = ("loader", "train")
# workers' CPU comes in clock ticks (10 ms) and other threads wind down after the previous row:
# below a tenth of a second of timed batches the CPU figures would be noise
MIN_CPU_WINDOW_S = 0.1


def _nothing() -> None:
    pass


@dataclass
class Row:
    name: str
    what: str
    kind: str  # "loader" or "limit"
    modes: tuple[str, ...]
    open: Callable[[int], Iterator]  # epoch -> endless iterator of batches
    close: Callable[[], None] = _nothing


def process_tree_cpu_s() -> float | None:
    """CPU seconds (user + system) used so far by this process, all its threads, and its live
    descendants; None where the platform will not say. Descendants that exit between listing
    and reading are skipped, and exited ones no longer count: only differences taken while the
    same workers live mean anything."""
    # process_time is exact for this process; psutil only gives the others in clock ticks
    total = time.process_time()
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return None
    for child in children:
        try:
            t = child.cpu_times()
        except psutil.NoSuchProcess:  # a worker that just exited (zombies included)
            continue
        except psutil.AccessDenied:
            return None
        total += t.user + t.system
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    row: Row,
    epoch: int,
    warmup: int,
    batches: int,
    step: Callable[[dict], object] | None,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float | None] = process_tree_cpu_s,
) -> dict:
    """One repeat: a fresh epoch, ``warmup`` untimed batches, ``batches`` timed ones, each
    followed by ``step(batch)`` when there is a step (train mode). ``clock`` reads wall seconds
    and ``cpu_clock`` the process tree's CPU seconds (None: unknown)."""
    it = row.open(epoch)
    try:
        t0 = clock()
        for i in range(warmup):
            batch = next(it)
            if i == 0:
                first = clock() - t0
            if step:
                step(batch)
        sync(device)  # the timed part starts with an idle device
        cpu0 = cpu_clock()
        wait, start = 0.0, clock()
        for _ in range(batches):
            t = clock()
            batch = next(it)
            wait += clock() - t
            if step:
                step(batch)
        sync(device)  # CUDA work is asynchronous: count it before reading the clock
        elapsed = clock() - start
        cpu1 = cpu_clock()
    finally:
        it.close()  # a DALI epoch frees its pipeline here
    cpu = None if cpu0 is None or cpu1 is None or elapsed < MIN_CPU_WINDOW_S else cpu1 - cpu0
    return {
        "s_per_batch": elapsed / batches,
        "wait_share": wait / elapsed,
        "first_batch_s": first,
        "cpu_s_per_batch": None if cpu is None else cpu / batches,
        "cores_busy": None if cpu is None else cpu / elapsed,
    }


def run_repeats(
    rows: list[Row],
    modes: list[str],
    repeats: int,
    warmup: int,
    batches: int,
    steps: dict[str, Callable],
    device: torch.device,
    batch_size: int,
) -> dict[tuple[str, str], list[dict]]:
    """Every row in every mode ``repeats`` times, as ``{(row, mode): [repeat, ...]}``.

    Repeats are interleaved across rows so that a noisy neighbour hurts every row alike; each
    (repeat, mode) pass reads a fresh epoch, from epoch 1 (epoch 0 is the untimed warm pass).
    """
    reps: dict[tuple[str, str], list[dict]] = {}
    epoch = 1
    for rep in range(repeats):
        for mode in modes:
            for row in rows:
                if mode not in row.modes:
                    continue
                r = measure(row, epoch, warmup, batches, steps.get(mode), device)
                reps.setdefault((row.name, mode), []).append(r)
                print(
                    f"repeat {rep + 1}/{repeats} {mode:6s} {row.name:13s} "
                    f"{figure(batch_size / r['s_per_batch']):>9} samples/s",
                    flush=True,
                )
            epoch += 1
    return reps


def summarize(row: Row, mode: str, reps: list[dict], batch_size: int, sample_bytes: int) -> dict:
    """The median over repeats with min and max, per batch and per sample."""
    per = [r["s_per_batch"] for r in reps]
    med = statistics.median(per)
    B = batch_size
    out = {
        "name": row.name,
        "mode": mode,
        "kind": row.kind,
        "what": row.what,
        "samples_per_s": B / med,
        "samples_per_s_min": B / max(per),
        "samples_per_s_max": B / min(per),
        "median_s_per_batch": med,
        "min_s_per_batch": min(per),
        "max_s_per_batch": max(per),
        "mb_per_s": B / med * sample_bytes / 1e6,
        "first_batch_s": statistics.median(r["first_batch_s"] for r in reps),
        "repeats_s_per_batch": per,
        # CPU time of this process and its workers per sample, and cores kept busy: what each
        # row costs, less sensitive than wall time to other work on the machine
        "cpu_ms_per_sample": None,
        "cores_busy": None,
    }
    timed = [r for r in reps if r["cpu_s_per_batch"] is not None]
    if timed:
        out["cpu_ms_per_sample"] = 1000 * statistics.median(r["cpu_s_per_batch"] for r in timed) / B
        out["cores_busy"] = statistics.median(r["cores_busy"] for r in timed)
    if mode == "train":
        out["steps_per_s"] = 1 / med
        waits = [r["wait_share"] for r in reps]
        out.update(
            wait_share=statistics.median(waits),
            wait_share_min=min(waits),
            wait_share_max=max(waits),
        )
    return out


def limit_for(mode: str, names: set[str]) -> str | None:
    """The row each mode's ratios are taken against (the cheapest possible data)."""
    order = {"loader": ("h2d-pinned", "read-only"), "train": ("synthetic-gpu", "synthetic-cpu")}
    return next((cand for cand in order[mode] if cand in names), None)


def add_ratios(results: list[dict]) -> None:
    """Set ``ratio_to_torch``, ``limit`` and ``ratio_to_limit`` on each summary, within its
    mode (None where the mode has no torch row or no limit row)."""
    for mode in MODES:
        rows = {r["name"]: r for r in results if r["mode"] == mode}
        limit = limit_for(mode, set(rows))
        for r in rows.values():
            base = rows.get("torch")
            r["ratio_to_torch"] = r["samples_per_s"] / base["samples_per_s"] if base else None
            r["limit"] = limit
            top = rows[limit]["samples_per_s"] if limit else None
            r["ratio_to_limit"] = r["samples_per_s"] / top if top else None


def trainer_step(
    m: Manifest, batch_size: int, device: torch.device, sequence: bool = False
) -> Callable[[dict], torch.Tensor]:
    """The trainer's own step (``train.step.TrainStep``): a SimplifiedModel on target
    first_frame (the baseline's), or with ``sequence`` a SequenceModel on all frames, which reads
    the whole clip's log-mel: then a batch holding ``mel`` (a -mel row) goes to the same
    network without its front end. The trainer's default AdamW, gradient clipping and AMP;
    warmed up."""
    from model import build_model
    from model.features import Mel
    from train.config import TrainConfig
    from train.step import TrainStep, make_optimizer

    # the trainer's defaults, read rather than copied: a copy drifts (the old one lost clipping)
    t = TrainConfig()
    name, target = ("sequence", "sequence") if sequence else ("simplified", "first_frame")
    mel = Mel(sample_rate=m.sample_rate)
    steps = {}
    for features in ("wav", "mel") if sequence else ("wav",):
        torch.manual_seed(0)
        net = build_model(
            name,
            target,
            frames=m.frames,
            fps=m.fps,
            num_blendshapes=m.num_blendshapes,
            features=features,
            **mel.to_dict(),
        )
        net = net.to(device).train()
        opt = make_optimizer(net.parameters(), t.lr, t.weight_decay, device)
        steps[features] = step = TrainStep(net, opt, device, target, t.grad_clip, t.amp)
        # the first steps pay one-off costs (kernels, optimizer state): not a row's fault
        x = torch.zeros(batch_size, m.clip_samples, device=device)
        dummy = {
            features: x if features == "wav" else net.mel(x),
            "arkit": torch.zeros(batch_size, m.frames, m.num_blendshapes, device=device),
        }
        for _ in range(2):
            step(dummy)
    sync(device)
    if not sequence:
        return steps["wav"]
    return lambda batch: steps["mel" if "mel" in batch else "wav"](batch)
