"""Throughput: DALI, the DataLoader baseline, webdataset and the physical limits, side by side.

    python benchmarks/throughput.py               # builds data/bench (2048 windows) if absent
    python benchmarks/throughput.py --quick       # seconds: 48 windows, 1 repeat, few batches
    python benchmarks/throughput.py --data DIR --modes loader --rows torch,dali-cpu,read-only

Every row reads the same shards in the same run and is measured the same way: a fresh epoch per
repeat, ``--warmup`` batches untimed (pipeline build, worker start, shuffle-buffer fill), then
``--batches`` timed batches; the median over ``--repeats`` is reported with min and max.
Repeats are interleaved across rows so that a noisy neighbour hurts every row alike.

Rows (``--rows``; the default is every row this machine can run):
  torch          the seed's DataLoader (4 workers, pin_memory, batch 16) over the shards
  webdataset     the webdataset library's own loader (WebLoader, 4 workers), our parsers
  dali-cpu       DALI, decode="cpu" (fn.decoders.audio / fn.decoders.numpy)
  dali-cpu-copy  the same with dont_use_mmap=True: the reader copies from the tars (no mmap)
  dali-gpu       DALI, decode="gpu": raw bytes to the GPU, headers sliced off there (CUDA only)
  dali-raw       the same raw-bytes graph on DALI's CPU operators (device_id=None)
  read-only      limit: the member bytes read from the page cache (os.preadv), nothing else
  h2d-pinned     limit: pinned host->device copies of the bytes a batch needs (CUDA only)
  synthetic-gpu  limit for ``train``: the batch already on the GPU (synthetic-cpu without CUDA)

Modes (``--modes``): ``loader`` iterates batches only; ``train`` also runs a SimplifiedModel
forward/backward/AdamW step on each batch and reports the share of time spent waiting in
``next()`` for data. Results go to ``--out`` (default results/): throughput.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import build_loader  # noqa: E402
from pipeline.loading import resolve_device  # noqa: E402
from pipeline.shard_format import (  # noqa: E402
    NPY_EXT,
    WAV_EXT,
    Manifest,
    decode_sample,
    load_manifest,
    read_split_index,
)
from pipeline.sharding import epoch_order, rank_plan  # noqa: E402

# the seed's 4 workers on a 2-CPU machine is the point of the baseline, not a mistake to warn about
warnings.filterwarnings("ignore", message="This DataLoader will create")
ROOT = Path(__file__).resolve().parent.parent
MODES = ("loader", "train")
ROW_ORDER = (
    "torch",
    "webdataset",
    "dali-cpu",
    "dali-cpu-copy",
    "dali-gpu",
    "dali-raw",
    "read-only",
    "h2d-pinned",
    "synthetic-gpu",
    "synthetic-cpu",
)

# ---------------------------------------------------------------- defaults (one block)
DEFAULTS = dict(
    # 2048 windows (1843 train): DALI fills its 1024-sample shuffle buffer before the first
    # batch, so the timed batches only read fresh bytes if the train split holds more than
    # buffer + (warmup + batches + prefetch) * batch samples. Building it takes 4-6 min on 2
    # CPUs (once: later runs reuse it); the timed run after that takes about a minute.
    data="data/bench",
    windows=2048,
    out="results",
    batch_size=16,  # the seed's batch
    warmup=5,  # untimed batches per repeat: build, worker start, shuffle-buffer fill
    batches=40,  # timed batches per repeat
    repeats=3,
    workers=4,  # torch and webdataset workers, as the seed's DataLoader
    wds_shuffle=128,  # webdataset's sample buffer; the shards are pre-shuffled on disk
    dali_threads=None,  # None: the loader's default, min(4, CPUs)
    dali_prefetch=2,
    reader_prefetch=2,
    shuffle_buffer=1024,  # DaliLoader's initial_fill default
)
QUICK = dict(data="data/bench-quick", windows=48, batch_size=4, warmup=1, batches=4, repeats=1)


# ---------------------------------------------------------------- dataset


def ensure_dataset(path: Path, windows: int, samples_per_shard: int | None = None) -> Manifest:
    """Use the dataset at ``path``; build the synthetic one there if nothing is there yet."""
    if (path / "manifest.json").is_file():
        return load_manifest(path)
    if path.exists() and any(path.iterdir()):
        raise SystemExit(
            f"error: {path} exists but has no manifest.json (an interrupted build?): delete it "
            f"to let the benchmark rebuild it, or pass --data with a complete dataset"
        )
    from pipeline import make_shards

    print(
        f"building a synthetic dataset of {windows} windows in {path} (once; reused later)",
        flush=True,
    )
    args = ["--synthetic", str(windows), "--out", str(path), "--quiet"]
    if samples_per_shard:
        args += ["--samples-per-shard", str(samples_per_shard)]
    t0 = time.perf_counter()
    if make_shards.main(args) != 0:
        raise SystemExit(f"error: building {path} failed")
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    return load_manifest(path)


def sample_bytes(m: Manifest) -> int:
    """Bytes of one sample's wav + npy members (what every loader must read)."""
    return m.wav_header_bytes + 2 * m.clip_samples + m.npy_header_bytes + 4 * m.frames * 52


def warm_page_cache(m: Manifest, chunk: int = 16 << 20) -> float:
    """Read every train shard once in big chunks; returns the sequential MB/s."""
    total, t0 = 0, time.perf_counter()
    for p in m.tar_paths("train"):
        with open(p, "rb", buffering=0) as f:
            while b := f.read(chunk):
                total += len(b)
    return total / (time.perf_counter() - t0) / 1e6


# ---------------------------------------------------------------- rows


@dataclass
class Row:
    name: str
    what: str
    kind: str  # "loader" or "limit"
    modes: tuple[str, ...]
    open: Callable[[int], Iterator]  # epoch -> endless iterator of batches
    close: Callable[[], None] = lambda: None


def loader_stream(loader, epoch: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from ``epoch`` on, continuing into later epochs if the timed run is longer."""
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            if batch["wav"].device != device:  # only dali-raw on a CUDA machine
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            yield batch
        epoch += 1


def loader_row(
    name: str,
    what: str,
    args,
    device: torch.device,
    backend: str,
    loader_device: torch.device | None = None,
    **options,
) -> Row:
    loader = build_loader(
        backend, args.data, batch_size=args.batch_size, device=loader_device or device, **options
    )
    if len(loader) < args.warmup + args.batches:
        print(
            f"note: {name}: the timed run is longer than an epoch ({len(loader)} batches); "
            "it continues into the next one",
            flush=True,
        )
    return Row(name, what, "loader", MODES, lambda epoch: loader_stream(loader, epoch, device))


def _wds_decoder(m: Manifest):
    def decode(sample: dict) -> tuple[np.ndarray, np.ndarray]:
        # our own parser on the raw member bytes (as the torch row): no pickle, no autodecode
        return decode_sample(sample[WAV_EXT], sample[NPY_EXT], m)

    return decode


def _wds_collate(samples: list) -> dict[str, torch.Tensor]:
    return {
        "wav": torch.from_numpy(np.stack([s[0] for s in samples])),
        "arkit": torch.from_numpy(np.stack([s[1] for s in samples])),
    }


def webdataset_row(args, m: Manifest, device: torch.device) -> Row:
    import webdataset as wds

    dataset = (
        wds.WebDataset(
            m.tar_paths("train"), shardshuffle=len(m.tar_paths("train")), seed=0, empty_check=False
        )  # fewer shards than workers leaves some idle
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
                yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    what = f"webdataset WebLoader, {args.workers} workers, our parsers, shuffle {args.wds_shuffle}"
    return Row("webdataset", what, "loader", MODES, stream)


def read_only_row(args, m: Manifest) -> Row:
    """The member bytes of each batch, read from the page cache into one reused buffer."""
    fds = {tar: os.open(tar, os.O_RDONLY) for tar in m.tar_paths("train")}
    items = [(fds[r.tar], *r.wav, *r.npy) for r in read_split_index(m, "train")]
    buf = memoryview(bytearray(args.batch_size * sample_bytes(m)))
    B = args.batch_size

    def stream(epoch: int) -> Iterator[int]:
        while True:  # the torch baseline's sample order: random access, like every loader
            plan = rank_plan(0, epoch, 0, 1, len(items), B)
            order = epoch_order(plan, shuffle=True)
            for start in range(0, plan.steps * B, B):
                pos = 0
                for i in order[start : start + B]:
                    fd, w_off, w_size, n_off, n_size = items[i]
                    pos += os.preadv(fd, [buf[pos : pos + w_size]], w_off)
                    pos += os.preadv(fd, [buf[pos : pos + n_size]], n_off)
                yield pos
            epoch += 1

    def close() -> None:
        for fd in fds.values():
            os.close(fd)

    return Row(
        "read-only",
        "limit: member bytes preadv'd from the page cache, no decode",
        "limit",
        ("loader",),
        stream,
        close,
    )


def h2d_row(args, m: Manifest, device: torch.device) -> Row:
    n = args.batch_size * sample_bytes(m)
    host = torch.empty(n, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n, dtype=torch.uint8, device=device)

    def stream(epoch: int) -> Iterator[torch.Tensor]:
        while True:
            yield dev.copy_(host, non_blocking=True)

    return Row(
        "h2d-pinned",
        f"limit: pinned host->device copy of a batch's {n / 1e6:.1f} MB",
        "limit",
        ("loader",),
        stream,
    )


def synthetic_row(args, m: Manifest, device: torch.device) -> Row:
    g = torch.Generator().manual_seed(0)
    B = args.batch_size
    batch = {
        "wav": (torch.rand(B, m.clip_samples, generator=g) * 2 - 1).to(device),
        "arkit": torch.rand(B, m.frames, 52, generator=g).to(device),
    }

    def stream(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield batch

    name = "synthetic-gpu" if device.type == "cuda" else "synthetic-cpu"
    return Row(
        name,
        f"limit: the batch already on the {device.type} (the step alone)",
        "limit",
        ("train",),
        stream,
    )


def available_rows(device: torch.device) -> list[str]:
    cuda = device.type == "cuda"
    rows = [
        "torch",
        "webdataset",
        "dali-cpu",
        "dali-cpu-copy",
        "dali-gpu" if cuda else "dali-raw",
        "read-only",
    ]
    return rows + (["h2d-pinned", "synthetic-gpu"] if cuda else ["synthetic-cpu"])


def make_row(name: str, args, m: Manifest, device: torch.device) -> Row:
    cuda = device.type == "cuda"
    dali = dict(
        backend="dali",
        num_threads=args.dali_threads,
        prefetch_queue_depth=args.dali_prefetch,
        reader_prefetch=args.reader_prefetch,
        initial_fill=args.shuffle_buffer,
    )
    threads = args.dali_threads or f"default {min(4, os.cpu_count() or 1)}"
    dali_what = f"{threads} threads, prefetch {args.dali_prefetch}"
    if name == "torch":
        return loader_row(
            name,
            f"DataLoader, {args.workers} workers, pin_memory",
            args,
            device,
            backend="torch",
            num_workers=args.workers,
            pin_memory=True,
        )
    if name == "webdataset":
        return webdataset_row(args, m, device)
    if name == "dali-cpu":
        return loader_row(
            name,
            f"DALI decode=cpu (decoders.audio/numpy), {dali_what}",
            args,
            device,
            decode="cpu",
            **dali,
        )
    if name == "dali-cpu-copy":
        # the loader's default maps the tars (safe: every index entry is checked to lie inside
        # its tar first); this row shows what reading through copies costs
        return loader_row(
            name,
            f"DALI decode=cpu, tars read by copy, {dali_what}",
            args,
            device,
            decode="cpu",
            dont_use_mmap=True,
            **dali,
        )
    if name == "dali-gpu":
        if not cuda:
            raise SystemExit("error: row dali-gpu needs CUDA; dali-raw runs its graph on CPU")
        return loader_row(
            name,
            f"DALI decode=gpu (raw bytes to the GPU), {dali_what}",
            args,
            device,
            decode="gpu",
            **dali,
        )
    if name == "dali-raw":
        cpu = torch.device("cpu")
        return loader_row(
            name,
            f"DALI raw-bytes graph on CPU operators, {dali_what}",
            args,
            device,
            decode="gpu",
            loader_device=cpu,
            **dali,
        )
    if name == "read-only":
        return read_only_row(args, m)
    if name in ("h2d-pinned", "synthetic-gpu") and not cuda:
        raise SystemExit(f"error: row {name} needs CUDA (without it: read-only, synthetic-cpu)")
    if name == "h2d-pinned":
        return h2d_row(args, m, device)
    if name in ("synthetic-gpu", "synthetic-cpu"):
        return synthetic_row(args, m, device)
    raise SystemExit(f"error: unknown row {name!r}; rows: {', '.join(ROW_ORDER)}")


# ---------------------------------------------------------------- measuring


def make_step(
    device: torch.device, batch_size: int, clip_samples: int, frames: int
) -> Callable[[dict], None]:
    """One SimplifiedModel forward/backward/AdamW step, as the trainer does it."""
    from model.models import SimplifiedModel

    torch.manual_seed(0)
    model = SimplifiedModel().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = device.type == "cuda"

    def step(batch: dict) -> None:
        target = batch["arkit"][:, 0, :]  # the seed's first_frame rule
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(batch["wav"])
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # the first steps pay one-off costs (kernels, optimizer state): not the first row's fault
    dummy = {
        "wav": torch.zeros(batch_size, clip_samples, device=device),
        "arkit": torch.zeros(batch_size, frames, 52, device=device),
    }
    for _ in range(2):
        step(dummy)
    sync(device)
    return step


def process_tree_cpu_s() -> float | None:
    """CPU seconds used so far by this process (all threads) and its live descendants (the
    loader workers). On a shared machine this is steadier than wall time; None off Linux."""
    total, stack = time.process_time(), [os.getpid()]  # exact for this process's threads
    try:
        while stack:
            pid = stack.pop()
            try:
                if pid != os.getpid():  # descendants in clock ticks (10 ms): workers run long
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime
                for task in os.listdir(f"/proc/{pid}/task"):
                    stack += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
            except (FileNotFoundError, ProcessLookupError):
                continue  # a worker that just exited
    except OSError:
        return None
    return total


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
MIN_CPU_WINDOW_S = 0.1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    row: Row,
    epoch: int,
    mode: str,
    warmup: int,
    batches: int,
    step: Callable | None,
    device: torch.device,
) -> dict:
    """One repeat: a fresh epoch, ``warmup`` untimed batches, ``batches`` timed ones."""
    it = row.open(epoch)
    try:
        t0 = time.perf_counter()
        for i in range(warmup):
            batch = next(it)
            if i == 0:
                first = time.perf_counter() - t0
            if step:
                step(batch)
        sync(device)  # the timed part starts with an idle device
        cpu0 = process_tree_cpu_s()
        wait, start = 0.0, time.perf_counter()
        for _ in range(batches):
            t = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - t
            if step:
                step(batch)
        sync(device)  # CUDA work is asynchronous: count it before reading the clock
        elapsed = time.perf_counter() - start
        cpu1 = process_tree_cpu_s()
    finally:
        it.close()  # a DALI epoch frees its pipeline here
    # workers' CPU comes in 10 ms ticks and other threads wind down after the previous row:
    # below a tenth of a second of timed batches the CPU figures would be noise
    cpu = None if cpu0 is None or cpu1 is None or elapsed < MIN_CPU_WINDOW_S else cpu1 - cpu0
    return {
        "s_per_batch": elapsed / batches,
        "wait_share": wait / elapsed,
        "first_batch_s": first,
        "cpu_s_per_batch": None if cpu is None else cpu / batches,
        "cores_busy": None if cpu is None else cpu / elapsed,
    }


def summarize(row: Row, mode: str, reps: list[dict], args, sample_b: int) -> dict:
    per = [r["s_per_batch"] for r in reps]
    med = statistics.median(per)
    B = args.batch_size
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
        "mb_per_s": B / med * sample_b / 1e6,
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
    for mode in MODES:
        rows = {r["name"]: r for r in results if r["mode"] == mode}
        limit = limit_for(mode, set(rows))
        for r in rows.values():
            base = rows.get("torch")
            r["ratio_to_torch"] = r["samples_per_s"] / base["samples_per_s"] if base else None
            r["limit"] = limit
            top = rows[limit]["samples_per_s"] if limit else None
            r["ratio_to_limit"] = r["samples_per_s"] / top if top else None


# ---------------------------------------------------------------- environment and reports


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except Exception:  # noqa: BLE001 - absent or broken: report as unknown
        return None


def environment(args, m: Manifest, device: torch.device, seq_mb_s: float) -> dict:
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    import nvidia.dali

    train_shards = m.split_shards("train")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(["benchmarks/throughput.py", *args.argv]),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
        "versions": {
            "python": platform.python_version(),
            "torch": version("torch"),
            "dali": nvidia.dali.__version__,
            "numpy": version("numpy"),
            "webdataset": version("webdataset"),
        },
        "dataset": {
            "dir": str(m.root.resolve()),
            "train_samples": m.num_samples("train"),
            "train_shards": len(train_shards),
            "train_bytes": sum(s.bytes for s in train_shards),
            "sample_bytes": sample_bytes(m),
            "hours": m.raw.get("hours"),
            "sequential_read_mb_per_s": round(seq_mb_s, 1),
        },
        "config": {k: v for k, v in vars(args).items() if k not in ("argv",)},
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def markdown(results: list[dict], env: dict, notes: list[str]) -> str:
    d = env["dataset"]
    lines = [
        "# Loader throughput: DALI vs the DataLoader baseline vs the limits",
        "",
        f"- machine: {env['cpu_model']}, {env['cpus_usable']} CPUs usable, "
        f"{env['memory_gib']} GiB, GPU: {env['gpu'] or 'none'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- data: {d['dir']} ({d['train_samples']} train samples in {d['train_shards']} shards, "
        f"{d['train_bytes'] / 1e6:,.0f} MB; {d['sample_bytes']} B of wav+npy per sample; "
        f"sequential read {d['sequential_read_mb_per_s']:,.0f} MB/s)",
        f"- batch {env['config']['batch_size']}, {env['config']['warmup']} warm-up + "
        f"{env['config']['batches']} timed batches per repeat, {env['config']['repeats']} "
        f"repeats (median [min–max]); train step on {env['torch_threads']} torch thread(s)",
        f"- load average (1, 5, 15 min) at start "
        f"{', '.join(f'{x:.1f}' for x in env['load_average_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in env.get('load_average_end', []))}",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        "",
        "samples/s counts 10 s windows; MB/s = samples/s × the wav+npy member bytes "
        "(MB = 10⁶ B); "
        "× torch and × limit are ratios of samples/s within a mode; CPU ms/sample is the CPU "
        "time of this process and its workers per sample, cores busy that CPU time over wall "
        "time; data wait is the share of train time spent blocked in `next()`.",
        "",
    ]
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue
        limit = rows[0]["limit"]
        if mode == "loader":
            lines += [
                f"## loader mode (iterate batches only; ratio to limit = to `{limit}`)",
                "",
                "| row | samples/s (median [min–max]) | MB/s | ms/batch | first batch s "
                "| × torch | × limit | CPU ms/sample | cores busy | what |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
        else:
            lines += [
                f"## train mode (SimplifiedModel step per batch; ratio to limit = to `{limit}`)",
                "",
                "| row | steps/s | samples/s (median [min–max]) | data wait | × torch "
                "| × limit | CPU ms/sample | cores busy | what |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
        for r in rows:
            lo, hi = _fmt(r["samples_per_s_min"]), _fmt(r["samples_per_s_max"])
            sps = f"{_fmt(r['samples_per_s'])} [{lo}–{hi}]"
            if mode == "loader":
                lines.append(
                    f"| `{r['name']}` | {sps} | {_fmt(r['mb_per_s'])} | "
                    f"{_fmt(1000 * r['median_s_per_batch'])} | {_fmt(r['first_batch_s'])} | "
                    f"{_fmt(r['ratio_to_torch'])} | {_fmt(r['ratio_to_limit'])} | "
                    f"{_fmt(r['cpu_ms_per_sample'])} | {_fmt(r['cores_busy'])} | "
                    f"{r['what']} |"
                )
            else:
                lines.append(
                    f"| `{r['name']}` | {_fmt(r['steps_per_s'])} | {sps} | "
                    f"{100 * r['wait_share']:.0f}% | {_fmt(r['ratio_to_torch'])} | "
                    f"{_fmt(r['ratio_to_limit'])} | {_fmt(r['cpu_ms_per_sample'])} | "
                    f"{_fmt(r['cores_busy'])} | {r['what']} |"
                )
        lines.append("")
    if notes:
        lines += ["## notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def plot(results: list[dict], path: Path, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    fig, axes = plt.subplots(len(modes), 1, figsize=(8, 1.2 + 0.45 * len(results)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        rows = [r for r in results if r["mode"] == mode][::-1]
        y = np.arange(len(rows))
        med = np.array([r["samples_per_s"] for r in rows])
        err = np.array(
            [
                [r["samples_per_s"] - r["samples_per_s_min"] for r in rows],
                [r["samples_per_s_max"] - r["samples_per_s"] for r in rows],
            ]
        )
        colors = [
            "#bbbbbb"
            if r["kind"] == "limit"
            else "#76b900"
            if r["name"].startswith("dali")
            else "#4c72b0"
            for r in rows
        ]
        ax.barh(y, med, xerr=err, color=colors, capsize=3)
        ax.set_yticks(y, [r["name"] for r in rows])
        for yi, r in zip(y, rows, strict=True):  # the label starts past the whisker
            ratio = f"  ×{r['ratio_to_torch']:.1f} torch" if r["ratio_to_torch"] else ""
            ax.text(
                r["samples_per_s_max"],
                yi,
                f"  {r['samples_per_s']:,.0f}{ratio}",
                va="center",
                fontsize=8,
            )
        top = max(r["samples_per_s_max"] for r in rows)
        if med.max() / max(med.min(), 1e-9) > 30:
            ax.set_xscale("log")
        ax.set_xlim(right=top * (3 if ax.get_xscale() == "log" else 1.4))
        ax.set_xlabel("samples/s (median, whiskers min–max; grey = limits)")
        ax.set_title(f"{mode} mode", fontsize=10)
    fig.suptitle(
        f"{env['cpu_model']} ×{env['cpus_usable']} CPUs, GPU: {env['gpu'] or 'none'}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help=f"dataset dir; built if absent (default {DEFAULTS['data']})")
    p.add_argument(
        "--windows",
        type=int,
        help="windows to build if --data is absent "
        f"(default {DEFAULTS['windows']}; --quick {QUICK['windows']})",
    )
    p.add_argument("--out", default=DEFAULTS["out"], help="where the results go (default results/)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny run in seconds: 48-window dataset, batch 4, 1 repeat",
    )
    p.add_argument("--modes", default="loader,train", help="comma list of: loader, train")
    p.add_argument(
        "--rows", help="comma list (default: every row this machine runs): " + ", ".join(ROW_ORDER)
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--warmup", type=int, help="untimed batches per repeat")
    p.add_argument("--batches", type=int, help="timed batches per repeat")
    p.add_argument("--repeats", type=int)
    p.add_argument(
        "--workers", type=int, default=DEFAULTS["workers"], help="torch and webdataset workers"
    )
    p.add_argument("--wds-shuffle", type=int, default=DEFAULTS["wds_shuffle"])
    p.add_argument("--dali-threads", type=int, default=DEFAULTS["dali_threads"])
    p.add_argument("--dali-prefetch", type=int, default=DEFAULTS["dali_prefetch"])
    p.add_argument("--reader-prefetch", type=int, default=DEFAULTS["reader_prefetch"])
    p.add_argument(
        "--shuffle-buffer", type=int, default=DEFAULTS["shuffle_buffer"], help="DALI's initial_fill"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--torch-threads",
        type=int,
        help="intra-op threads of the train step (default: 1 on CPU, torch's on CUDA)",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key in ("data", "windows", "batch_size", "warmup", "batches", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if min(args.batch_size, args.batches, args.repeats) < 1 or args.warmup < 1:
        p.error("--batch-size, --warmup, --batches and --repeats must be >= 1")
    args.modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.torch_threads or device.type == "cpu":
        # on a CPU-only machine the loader needs the other cores: with several intra-op threads
        # the step's OpenMP barriers spin against the loader's threads and a step takes 4x longer,
        # with 10x spread (measured on 2 cores)
        torch.set_num_threads(args.torch_threads or 1)
    data = Path(args.data)
    if not data.exists() and args.data in (DEFAULTS["data"], QUICK["data"]):
        data = ROOT / data  # the default location is inside the repository (git-ignored /data/)
    m = ensure_dataset(data, args.windows, 16 if args.quick else None)
    args.data = str(data)
    names = [x.strip() for x in args.rows.split(",")] if args.rows else available_rows(device)
    names = sorted(dict.fromkeys(names), key=lambda n: ROW_ORDER.index(n) if n in ROW_ORDER else -1)

    notes: list[str] = []
    B, n_train = args.batch_size, m.num_samples("train")
    fill = min(args.shuffle_buffer, n_train)
    need = fill + (args.warmup + args.batches + args.dali_prefetch + args.reader_prefetch) * B
    if any(n.startswith("dali") for n in names) and n_train < need:
        notes.append(
            f"DALI rows are not in steady state: the {n_train}-sample train split is smaller than "
            f"the shuffle buffer ({fill}) plus the batches read per repeat ({need - fill}), so "
            "part of the timed batches come from the buffer filled during warm-up"
        )
        print("note: " + notes[-1], flush=True)

    seq = warm_page_cache(m)
    print(
        f"{m.root}: {n_train} train samples; page cache warm ({seq:,.0f} MB/s sequential)",
        flush=True,
    )
    rows = [make_row(n, args, m, device) for n in names]
    env = environment(args, m, device, seq)

    # one untimed pass per row first: starts the workers before the train step creates its
    # thread pool (forking after OpenMP has started is fragile) and warms every code path
    for row in rows:
        measure(row, 0, "loader", args.warmup, 1, None, device)
    steps = {}
    if "train" in args.modes:
        steps["train"] = make_step(device, B, m.clip_samples, m.frames)

    reps: dict[tuple[str, str], list[dict]] = {}
    epoch = 1
    for rep in range(args.repeats):
        for mode in args.modes:
            for row in rows:
                if mode not in row.modes:
                    continue
                r = measure(row, epoch, mode, args.warmup, args.batches, steps.get(mode), device)
                reps.setdefault((row.name, mode), []).append(r)
                print(
                    f"repeat {rep + 1}/{args.repeats} {mode:6s} {row.name:13s} "
                    f"{B / r['s_per_batch']:9,.1f} samples/s",
                    flush=True,
                )
            epoch += 1
    for row in rows:
        row.close()

    sb = sample_bytes(m)
    row_of = {r.name: r for r in rows}
    results = [
        summarize(row_of[name], mode, reps[(name, mode)], args, sb)
        for mode in args.modes
        for name in names
        if (name, mode) in reps
    ]
    add_ratios(results)
    env["load_average_end"] = list(os.getloadavg())
    if device.type != "cuda" and {"dali-raw", "read-only", "synthetic-cpu"} & set(names):
        notes.append(
            'no CUDA: dali-raw is the decode="gpu" graph run on DALI\'s CPU '
            "operators; the limit is read-only for loader mode and synthetic-cpu for "
            "train mode"
        )
    if (os.cpu_count() or 1) < args.workers and {"torch", "webdataset"} & set(names):
        notes.append(
            f"torch and webdataset run {args.workers} workers on {os.cpu_count()} "
            "CPUs (the seed's setting), so they share the cores with the main process"
        )
    if any(r["cpu_ms_per_sample"] is None for r in results):
        notes.append(
            "CPU ms/sample and cores busy are left out ('–') where the timed batches "
            f"took under {MIN_CPU_WINDOW_S} s in every repeat: too short to measure"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(
        json.dumps({"rows": results, "env": env, "notes": notes}, indent=1, default=str) + "\n"
    )
    (out / "throughput.md").write_text(markdown(results, env, notes))
    plot(results, out / "throughput.png", env)
    print("\n" + markdown(results, env, notes))
    print(f"wrote {out / 'throughput.json'}, {out / 'throughput.md'}, {out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
