"""The benchmark's rows: a registry of name -> ``RowSpec``, the factories that build each row,
and the dataset they all read.

A row is an endless stream of batches opened at an epoch: a loader (the DataLoader baseline,
webdataset, DALI in its decode modes) or a limit (the cheapest possible data for a mode: the
bytes read from the page cache, copied to the device, or a batch already in place). The
registry is the one list of rows: ``--help``'s table, the default rows and the checks come
from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from benchmarks import spdl_loader, threads_loader, webdataset_loader
from benchmarks.figures import plural
from benchmarks.measure import MODES, Row
from core.errors import ConfigError
from pipeline import build_loader
from pipeline.loaders.plan import epoch_batches
from pipeline.shards.index import sample_refs
from pipeline.shards.manifest import Manifest

Factory = Callable[["RowSpec", argparse.Namespace, Manifest, torch.device], Row]


@dataclass(frozen=True)
class RowSpec:
    name: str
    factory: Factory  # (spec, args, manifest, device) -> Row
    description: str  # one line, for --help
    needs_cuda: bool = False
    modes: tuple[str, ...] = MODES
    kind: str = "loader"  # or "limit"
    cpu_stand_in: bool = False  # a CUDA row's CPU stand-in: a default row only where it can't run
    without_cuda: str = ""  # the end of "row X needs CUDA...": what to run instead
    augmented: bool = False  # the same loader with crops and augmentation (--augment)
    mel: bool = False  # the same loader yielding log-mel, data.features: mel (--mel)
    # an optional package's check: None when the row can run, else why not (named in --rows,
    # the reason is the error)
    missing: Callable[[], str | None] | None = None
    local_only: bool = False  # reads the tars as local files: not a row for s3:// data

    def row(
        self, what: str, stream: Callable[[int], Iterator], close: Callable[[], None] | None = None
    ) -> Row:
        row = Row(self.name, what, self.kind, self.modes, stream)
        if close is not None:
            row.close = close
        return row


# ---------------------------------------------------------------- loader rows


def loader_stream(loader, epoch: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from ``epoch`` on, continuing into later epochs if the timed run is longer."""
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            if batch["arkit"].device != device:  # only dali-raw on a CUDA machine
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            yield batch
        epoch += 1


def loader_row(
    spec: RowSpec,
    what: str,
    args,
    device: torch.device,
    backend: str,
    loader_device: torch.device | None = None,
    **options,
) -> Row:
    if spec.augmented:
        options["augment"] = args.augment_config
        what += ", augmented: " + ", ".join(f"{k} {v}" for k, v in args.augment_config.items())
    if spec.mel:  # the model's default log-mel settings, at the dataset's rate
        options.update(features="mel", mel=args.mel_config)
        what += ", log-mel in the loader"
    loader = build_loader(
        backend, args.data, batch_size=args.batch_size, device=loader_device or device, **options
    )
    if len(loader) < args.warmup + args.batches:
        print(
            f"note: {spec.name}: the timed run is longer than an epoch "
            f"({plural(len(loader), 'batch', 'batches')}); "
            "it continues into the next one",
            flush=True,
        )
    return spec.row(what, lambda epoch: loader_stream(loader, epoch, device))


def torch_row(spec: RowSpec, args, m: Manifest, device: torch.device) -> Row:
    what = f"DataLoader, {plural(args.workers, 'worker')}, pin_memory"
    return loader_row(spec, what, args, device, "torch", num_workers=args.workers, pin_memory=True)


def dali_row(decode: str, what: str, on_cpu: bool = False, **options) -> Factory:
    """A DALI row's factory: ``decode`` mode, the graph on CPU operators if ``on_cpu``."""

    def factory(spec: RowSpec, args, m: Manifest, device: torch.device) -> Row:
        from pipeline.loaders.dali_graph import default_threads

        threads = plural(args.dali_threads or default_threads(), "thread")
        return loader_row(
            spec,
            f"{what}, {'' if args.dali_threads else 'default '}{threads}, "
            f"prefetch {args.dali_prefetch}",
            args,
            device,
            "dali",
            loader_device=torch.device("cpu") if on_cpu else None,
            decode=decode,
            dali_threads=args.dali_threads,
            dali_prefetch=args.dali_prefetch,
            reader_prefetch=args.reader_prefetch,
            **options,
        )

    return factory


# ---------------------------------------------------------------- limit rows


def read_only_row(spec: RowSpec, args, m: Manifest, device: torch.device) -> Row:
    """The member bytes of each batch, read from the page cache into one reused buffer."""
    fds = {tar: os.open(tar, os.O_RDONLY) for tar in m.tar_paths("train")}
    items = [(fds[r.tar], *r.wav, *r.npy) for r in sample_refs(m, "train")]
    sizes = [s.samples for s in m.split_shards("train")]
    buf = memoryview(bytearray(args.batch_size * m.layout("train").sample_bytes))
    B = args.batch_size

    def stream(epoch: int) -> Iterator[int]:
        while True:  # the torch baseline's sample order: random access, like every loader
            for batch in epoch_batches(0, epoch, sizes, B):
                pos = 0
                for i in batch:
                    fd, w_off, w_size, n_off, n_size = items[i]
                    pos += os.preadv(fd, [buf[pos : pos + w_size]], w_off)
                    pos += os.preadv(fd, [buf[pos : pos + n_size]], n_off)
                yield pos
            epoch += 1

    def close() -> None:
        for fd in fds.values():
            os.close(fd)

    return spec.row("limit: member bytes preadv'd from the page cache, no decode", stream, close)


def h2d_row(spec: RowSpec, args, m: Manifest, device: torch.device) -> Row:
    n = args.batch_size * m.layout("train").sample_bytes
    host = torch.empty(n, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n, dtype=torch.uint8, device=device)

    def stream(epoch: int) -> Iterator[torch.Tensor]:
        while True:
            yield dev.copy_(host, non_blocking=True)

    return spec.row(f"limit: pinned host->device copy of a batch's {n / 1e6:.1f} MB", stream)


def synthetic_row(spec: RowSpec, args, m: Manifest, device: torch.device) -> Row:
    # synthetic-cpu on a CUDA machine keeps its batch in host memory: the step copies it over
    where = device if spec.needs_cuda else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    B = args.batch_size
    batch = {
        "wav": (torch.rand(B, m.clip_samples, generator=g) * 2 - 1).to(where),
        "arkit": torch.rand(B, m.frames, m.num_blendshapes, generator=g).to(where),
    }

    def stream(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield batch

    what = f"limit: the batch already on the {where.type} (the step alone)"
    if where != device:
        what = f"limit: the batch in {where.type} memory (the step and its copy to the device)"
    return spec.row(what, stream)


# ---------------------------------------------------------------- the registry

_NO_CUDA = " (without it: read-only, synthetic-cpu)"
_LOADER_ONLY, _TRAIN_ONLY = ("loader",), ("train",)
ROWS: dict[str, RowSpec] = {
    s.name: s
    for s in (
        RowSpec(
            "torch",
            torch_row,
            "the baseline's DataLoader (4 workers, pin_memory, batch 16) over the shards",
        ),
        RowSpec(
            "webdataset",
            webdataset_loader.webdataset_row,
            "the webdataset library's own loader (WebLoader, 4 workers), our parsers",
            local_only=True,
        ),
        RowSpec(
            "spdl",
            spdl_loader.spdl_row,
            "Meta's SPDL pipeline (threads on an event loop), our parsers (the spdl extra)",
            missing=spdl_loader.available,
            local_only=True,
        ),
        RowSpec(
            "threads",
            threads_loader.threads_row,
            "reference: a thread pool preadv-ing members into a preallocated batch (~80 lines)",
            local_only=True,
        ),
        RowSpec(
            "dali-cpu",
            dali_row("cpu", "DALI decode=cpu (decoders.audio/numpy), tars read by copy"),
            'DALI, decode="cpu" (fn.decoders.audio / fn.decoders.numpy)',
        ),
        RowSpec(
            "dali-cpu-mmap",
            # the loader reads the tars by copy by default, which survives a shard truncated
            # while it is read; this row shows what mapping them instead would gain
            dali_row("cpu", "DALI decode=cpu, tars memory-mapped", dont_use_mmap=False),
            "the same with dont_use_mmap=False: the reader maps the tars",
            local_only=True,
        ),
        RowSpec(
            "dali-gpu",
            dali_row("gpu", "DALI decode=gpu (raw bytes to the GPU)"),
            'DALI, decode="gpu": raw bytes to the GPU, headers sliced off there',
            needs_cuda=True,
            without_cuda="; dali-raw runs its graph on CPU",
        ),
        RowSpec(
            "dali-raw",
            dali_row("gpu", "DALI raw-bytes graph on CPU operators", on_cpu=True),
            "the same raw-bytes graph on DALI's CPU operators (device_id=None)",
            cpu_stand_in=True,
        ),
        RowSpec(
            "read-only",
            read_only_row,
            "limit: the member bytes read from the page cache (os.preadv), nothing else",
            modes=_LOADER_ONLY,
            kind="limit",
            local_only=True,
        ),
        RowSpec(
            "h2d-pinned",
            h2d_row,
            "limit: pinned host->device copies of the bytes a batch needs",
            needs_cuda=True,
            modes=_LOADER_ONLY,
            kind="limit",
            without_cuda=_NO_CUDA,
        ),
        RowSpec(
            "synthetic-gpu",
            synthetic_row,
            "limit for ``train``: the batch already on the GPU",
            needs_cuda=True,
            modes=_TRAIN_ONLY,
            kind="limit",
            without_cuda=_NO_CUDA,
        ),
        RowSpec(
            "synthetic-cpu",
            synthetic_row,
            "limit for ``train``: the batch in host memory (synthetic-gpu's stand-in)",
            modes=_TRAIN_ONLY,
            kind="limit",
            cpu_stand_in=True,
        ),
    )
}
# --augment: the loaders again, each with crops and the same paired augmentation; --mel: again,
# each yielding the model's log-mel instead of the audio
for _suffix, _flag, _what in (("aug", "augmented", "augmented"), ("mel", "mel", "log-mel")):
    for _base in ("torch", "dali-cpu", "dali-gpu", "dali-raw"):
        _s, _name = ROWS[_base], f"{_base}-{_suffix}"
        _d = f"{_s.description}, {_what}"
        ROWS[_name] = dataclasses.replace(_s, name=_name, description=_d, **{_flag: True})
ROW_ORDER = tuple(ROWS)


def augment_for(m: Manifest, speed_up: float = 1.1) -> dict:
    """The augmentation --augment rows use: gain +-6 dB, SNR 15-40 dB, speed 0.9 up to 1.1 or
    as fast as the dataset's train members allow a window to be cropped (1.0 from windows)."""
    top = math.floor(1000 * min(speed_up, m.segment_frames / (m.frames + 1))) / 1000
    return {"gain_db": [-6.0, 6.0], "snr_db": [15.0, 40.0], "speed": [0.9, top]}


def available_rows(
    device: torch.device, augment: bool = False, mel: bool = False, remote: bool = False
) -> list[str]:
    """The default rows: every row this machine can run, CPU stand-ins only without CUDA, the
    augmented ones with ``augment``, the log-mel ones with ``mel``, and for ``remote`` (s3://)
    data only those that read through the loaders."""
    cuda = device.type == "cuda"
    return [
        n
        for n, s in ROWS.items()
        if (not s.cpu_stand_in if cuda else not s.needs_cuda)
        and (augment or not s.augmented)
        and (mel or not s.mel)
        and not (s.missing and s.missing())
        and not (remote and s.local_only)
    ]


def skipped_rows() -> list[str]:
    """Notes for the rows left out because a package is missing."""
    return [f"{s.name} skipped: {why}" for s in ROWS.values() if s.missing and (why := s.missing())]


def spec_for(name: str, device: torch.device, remote: bool = False) -> RowSpec:
    """The row called ``name``; ConfigError if there is none or it cannot run here (or on
    ``remote``, s3://, data)."""
    spec = ROWS.get(name)
    if spec is None:
        raise ConfigError(f"unknown row {name!r}; rows: {', '.join(ROW_ORDER)}")
    if remote and spec.local_only:
        can = ", ".join(n for n, s in ROWS.items() if not s.local_only)
        raise ConfigError(f"row {name} reads local files, not s3:// data; rows that can: {can}")
    if spec.needs_cuda and device.type != "cuda":
        raise ConfigError(f"row {name} needs CUDA{spec.without_cuda}")
    if spec.missing and (why := spec.missing()):
        raise ConfigError(f"row {name} cannot run: {why}")
    return spec


def select_rows(
    rows: str | None,
    device: torch.device,
    augment: bool = False,
    mel: bool = False,
    remote: bool = False,
) -> list[str]:
    """The rows a ``--rows`` comma list names (default: ``available_rows``), checked, each
    once, in registry order."""
    names = [x.strip() for x in rows.split(",") if x.strip()] if rows else None
    names = names or available_rows(device, augment, mel, remote)
    for name in names:
        spec_for(name, device, remote)
    return sorted(dict.fromkeys(names), key=ROW_ORDER.index)


def make_row(name: str, args, m: Manifest, device: torch.device) -> Row:
    spec = spec_for(name, device)
    return spec.factory(spec, args, m, device)


def rows_help() -> str:
    """The table of rows for ``--help``."""
    lines = [
        "rows (--rows; the default is every row this machine can run, -aug with --augment, "
        "-mel with --mel):"
    ]
    for s in ROWS.values():
        if s.augmented or s.mel:
            continue
        cuda = " (CUDA only)" if s.needs_cuda else ""
        lines.append(f"  {s.name:14s} {s.description}{cuda}")
    return "\n".join(lines)
