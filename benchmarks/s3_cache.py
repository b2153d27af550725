"""Training from S3: both loaders over the same dataset on local disk, in ``s3://`` read directly
(``cache_limit: 0``) and streamed into the shard cache, on a local ``moto_server`` as it is and
behind a proxy that waits 30 ms before each answer (as real S3 does before its first byte);
the shard cache's prefetch depth swept behind that proxy. Loader only (no train step).

    python benchmarks/s3_cache.py                       # data/s3bench: 1000 windows, shards of 64
    python benchmarks/s3_cache.py --quick               # seconds: 48 windows, few batches

It starts its own ``moto_server`` and proxies (``benchmarks/s3_proxy.py``) on 127.0.0.1,
uploads the dataset, and measures each row as whole epochs after one untimed epoch. The
"s3 cached" rows run with ``--cache-limit`` (default: half the split's bytes, or 4 shards where
that is more, always less than the split), so that every
epoch streams every shard again, as a dataset larger than its cache does; the "split kept" rows
with the default limit, which holds the whole split, so the timed epochs read the copies the
untimed one kept (no download, as from the second epoch of a run whose split fits its cache).
The cache is emptied between rows. The direct rows, two orders of
magnitude slower, over ``--direct-batches`` batches instead (the torch loader's through the
proxy over whole epochs, for its request count; DALI's own S3 client, with
``cache_limit: 0``, keeps the endpoint it reads first, the server's, so its requests are not
counted). Rows are interleaved over ``--repeats`` (the median is reported). Requests per
epoch are counted by the proxy; cache bytes are the most the cache held at once in the last
epoch (``ShardCache.peak``) and the most found on disk by a thread that looks every 20 ms.
Results: ``--out``/s3_cache.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.dataset import ensure_dataset
from benchmarks.report import cpu_model
from pipeline import build_loader
from pipeline.loaders.spec import CACHE_LIMIT, CACHE_PREFETCH
from pipeline.shards import storage

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "arkit-bench"
DEFAULTS = dict(data="data/s3bench", windows=1000, shard=64, epochs=2, direct_batches=6)
QUICK = dict(data="data/s3bench-quick", windows=48, shard=8, epochs=1, direct_batches=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answering(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nothing answers at {url}") from None
            time.sleep(0.1)


PIDS: dict[str, int] = {}  # endpoint URL -> the process serving it (the server, a proxy)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def process(cmd: list[str], url: str):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    PIDS[url] = proc.pid
    try:
        wait_answering(url, proc)
        yield url
    finally:
        proc.kill()
        proc.wait()


def moto(port: int):
    url = f"http://127.0.0.1:{port}"
    return process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], url)


def proxy(target: str, port_hint: int, delay_ms: float):
    """A proxy process (benchmarks/s3_proxy.py) in front of ``target`` on a free port."""
    cmd = [sys.executable, "-m", "benchmarks.s3_proxy", target, "--delay-ms", str(delay_ms)]
    cmd += ["--port", str(port_hint)]
    return process(cmd, f"http://127.0.0.1:{port_hint}")


def requests_of(proxy_url: str) -> int:
    with urllib.request.urlopen(f"{proxy_url}/__proxy_stats__", timeout=5) as r:
        return int(json.loads(r.read())["requests"])


def upload(local: Path, url: str) -> None:
    with contextlib.suppress(Exception):
        storage.client().create_bucket(Bucket=BUCKET)
    for f in sorted(local.iterdir()):
        storage.upload(f, storage.location(f"{url}/{f.name}"))


class DiskPeak:
    """The most bytes found in a folder (and below it) while it runs, looked at every ms."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            total = 0
            for p in self.folder.rglob("*"):
                with contextlib.suppress(OSError):
                    total += p.stat().st_size if p.is_file() else 0
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def timed(
    loader, batches: int | None, endpoint: str | None, cache_dir: Path, servers: list[str]
) -> dict:
    """One measurement: ``batches`` batches (None: ``ARGS.epochs`` whole epochs) after an
    untimed epoch start (or epoch), with the requests sent meanwhile, the cache's bytes, and
    the CPU seconds per epoch of this process (DALI's threads, the cache's downloads; not the
    DataLoader's workers) and of the processes in ``servers`` (moto_server, the proxy)."""
    loader.set_epoch(loader.epoch + 1, restart=True)
    if batches is None:
        for _ in loader:  # the untimed epoch: workers, DALI, page cache
            pass
    before = requests_of(endpoint) if endpoint else 0
    disk = DiskPeak(cache_dir)
    cpu0, serving0 = time.process_time(), sum(cpu_s(PIDS[u]) for u in servers)
    n, t0 = 0, time.perf_counter()
    if batches is None:
        epoch_batches = len(loader)
        for _ in range(ARGS.epochs):
            loader.set_epoch(loader.epoch + 1, restart=True)
            for _ in loader:
                n += 1
    else:
        epoch_batches = len(loader)
        it = iter(loader)
        next(it)  # untimed: the start of the epoch
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
            n += 1
        it.close()
    took = time.perf_counter() - t0
    epochs = n / epoch_batches
    cpu = (time.process_time() - cpu0) / epochs
    serving = (sum(cpu_s(PIDS[u]) for u in servers) - serving0) / epochs
    peak_disk = disk.stop()
    sent = (requests_of(endpoint) - before) if endpoint else None
    cache = loader.last_cache
    return {
        "samples_per_s": n * loader.batch_size / took,
        "batches": n,
        "requests_per_epoch": None if sent is None else round(sent * epoch_batches / n),
        "cache_peak_bytes": cache.peak if cache and loader.cached else 0,  # the last epoch's
        "disk_peak_bytes": peak_disk,
        "cpu_s_per_epoch": round(cpu, 3),
        "server_cpu_s_per_epoch": round(serving, 3),
    }


ARGS = argparse.Namespace(epochs=DEFAULTS["epochs"])
# where each row's requests go: the server itself, or a proxy adding 0 or --delay-ms per answer
ENDPOINTS = ("moto", "proxy +0 ms", "proxy +30 ms")


def rows(args) -> list[dict]:
    """Every row: its loader, data, endpoint and cache settings (None: the loader's default)."""
    out = []
    for backend in ("dali", "torch"):
        row = dict(loader=backend, data="s3", limit=None, prefetch=None)
        out += [
            dict(row, source="local", data="local", endpoint=None),
            dict(row, source="s3 direct (cache_limit 0)", endpoint="moto", limit=0),
        ]
        if backend == "torch":  # DALI's own S3 client keeps the endpoint it read first: moto's
            # a whole epoch, for its requests (DataLoader workers read 8 batches ahead)
            source = "s3 direct, proxy +0 ms"
            out.append(dict(row, source=source, endpoint="proxy +0 ms", limit=0, whole=True))
        out += [
            dict(row, source="s3 cached", endpoint="moto"),
            dict(row, source="s3 cached, proxy +0 ms", endpoint="proxy +0 ms"),
            dict(row, source="s3 cached, proxy +30 ms", endpoint="proxy +30 ms"),
        ]
        for depth in args.sweep:
            source = f"s3 cached, proxy +30 ms, prefetch {depth}"
            out.append(dict(row, source=source, endpoint="proxy +30 ms", prefetch=depth))
        # the default limit holds the whole split: kept after the untimed epoch
        for endpoint in ("moto", "proxy +30 ms"):
            source = "s3 cached, split kept" + ("" if endpoint == "moto" else f", {endpoint}")
            out.append(dict(row, source=source, endpoint=endpoint, limit=CACHE_LIMIT))
    return out


def build(backend: str, data: str, args, cache_dir: Path):
    """One loader per backend and source: its cache settings are set per row (``configure``),
    so the start-up check over S3 (ranged GETs of every sample's headers) runs once."""
    opts = {"num_workers": args.workers} if backend == "torch" else {}
    t0 = time.perf_counter()
    loader = build_loader(
        backend, data, batch_size=args.batch_size, device="cpu", cache_dir=str(cache_dir), **opts
    )
    print(f"built {backend} over {data} in {time.perf_counter() - t0:.1f} s", flush=True)
    return loader


def configure(loader, row: dict, args) -> None:
    limit = args.cache_limit if row["limit"] is None else row["limit"]
    prefetch = CACHE_PREFETCH if row["prefetch"] is None else row["prefetch"]
    loader.spec = dataclasses.replace(loader.spec, cache_limit=limit, cache_prefetch=prefetch)


def measure_all(args, url: str, endpoints: dict[str, str], cache_dir: Path) -> list[dict]:
    todo = [r for r in rows(args) if not args.sources or r["source"] in args.sources]
    os.environ["AWS_ENDPOINT_URL"] = endpoints["moto"]  # DALI's own S3 client reads it once
    loaders = {
        (b, d): build(b, url if d == "s3" else args.data, args, cache_dir)
        for b in ("dali", "torch")
        for d in ("local", "s3")
    }
    reps: dict[int, list[dict]] = {i: [] for i in range(len(todo))}
    for rep in range(args.repeats):
        for i, row in enumerate(todo):
            for other in loaders.values():  # each row starts with an empty cache
                other.drop_kept()
            loader = loaders[(row["loader"], row["data"])]
            configure(loader, row, args)
            endpoint = endpoints.get(row["endpoint"])
            if endpoint:
                os.environ["AWS_ENDPOINT_URL"] = endpoint
            batches = args.direct_batches if row["limit"] == 0 and not row.get("whole") else None
            counted = endpoint if row["endpoint"] and row["endpoint"] != "moto" else None
            servers = [endpoints["moto"]] + ([endpoint] if counted else [])
            got = timed(loader, batches, counted, cache_dir, servers if endpoint else [])
            reps[i].append(got)
            print(f"  {rep} {row['loader']:5} {row['source']:40} {got}", flush=True)
    out = []
    for i, row in enumerate(todo):
        speeds = [r["samples_per_s"] for r in reps[i]]
        last = reps[i][-1]
        out.append(
            {**row, **last, "samples_per_s": statistics.median(speeds)}
            | {"min": min(speeds), "max": max(speeds)}
        )
    return out


def markdown(out: list[dict], env: dict) -> str:
    local = {r["loader"]: r["samples_per_s"] for r in out if r["source"] == "local"}
    lines = [
        f"`{env['command']}` on {env['machine']}",
        "",
        "| loader | source | samples/s (median, min-max) | x local disk | requests/epoch | "
        "cache peak MB (held / on disk) | CPU s/epoch (this process / server + proxy) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out:
        req = r.get("requests_per_epoch")
        peak = f"{r['cache_peak_bytes'] / 1e6:.0f} / {r['disk_peak_bytes'] / 1e6:.0f}"
        lines.append(
            f"| {r['loader']} | {r['source']} | {r['samples_per_s']:,.1f} ({r['min']:,.1f}-"
            f"{r['max']:,.1f}) | {r['samples_per_s'] / local[r['loader']]:.3f} | "
            f"{'' if req is None else f'{req:,}'} | {peak} | {r['cpu_s_per_epoch']:.2f} / "
            f"{r['server_cpu_s_per_epoch']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", help="a local dataset (built with --windows if it is absent)")
    p.add_argument("--windows", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=4, help="the torch loader's")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, help="timed epochs per repeat")
    p.add_argument("--direct-batches", type=int, help="timed batches of the direct rows")
    p.add_argument("--delay-ms", type=float, default=30.0)
    p.add_argument("--sweep", default="1,2,8", help="prefetch depths behind the +30 ms proxy")
    p.add_argument(
        "--cache-limit", type=int, help="bytes, of the streamed rows (default: half the split)"
    )
    p.add_argument("--cache-dir", help="the shard cache's folder (default: OUT/s3-cache-files)")
    p.add_argument("--sources", help="|-separated list: measure only the rows of these sources")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    args.data = args.data or str(ROOT / preset["data"])
    args.windows = args.windows or preset["windows"]
    args.epochs = args.epochs or preset["epochs"]
    args.direct_batches = args.direct_batches or preset["direct_batches"]
    args.shard = preset["shard"]
    args.sweep = [int(x) for x in args.sweep.split(",") if x]
    args.sources = [x.strip() for x in (args.sources or "").split("|") if x.strip()]
    if args.quick:
        args.batch_size, args.repeats = 4, 1
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # stopped (SIGTERM): leave through the context managers, which stop the server and proxies
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    ARGS.epochs = args.epochs
    data = Path(args.data)
    own = data.resolve() in {(ROOT / DEFAULTS["data"]).resolve(), (ROOT / QUICK["data"]).resolve()}
    m = ensure_dataset(data, args.windows, args.shard, build=own)
    if args.cache_limit is None:  # the streamed rows: less than the split, so no epoch keeps it
        sizes = [s.bytes for s in m.split_shards("train")]  # (half, or what DALI needs at least)
        args.cache_limit = min(max(sum(sizes) // 2, 4 * max(sizes)), sum(sizes) - 1)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1"
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out_dir / "s3-cache-files"
    url = f"s3://{BUCKET}/bench"
    port = free_port()
    with moto(port) as fast:
        os.environ["AWS_ENDPOINT_URL"] = fast
        upload(data, url)
        with (
            proxy(fast, free_port(), args.delay_ms) as slow,
            proxy(fast, free_port(), 0) as plain,
        ):
            endpoints = dict(zip(ENDPOINTS, (fast, plain, slow), strict=True))
            out = measure_all(args, url, endpoints, cache_dir)
    env = {
        "command": "python benchmarks/s3_cache.py " + " ".join(args.argv),
        "machine": f"{os.cpu_count()} CPUs ({cpu_model()}), no GPU, Python "
        f"{sys.version.split()[0]}, moto_server on 127.0.0.1",
        "dataset": f"{m.num_samples('train')} train samples in "
        f"{len(m.split_shards('train'))} shards of {m.split_shards('train')[0].bytes / 1e6:.1f} MB",
        "delay_ms": args.delay_ms,
        "cache_limit": args.cache_limit,
    }
    (out_dir / "s3_cache.json").write_text(json.dumps({"env": env, "rows": out}, indent=1))
    text = markdown(out, env)
    (out_dir / "s3_cache.md").write_text(text)
    print("\n" + env["dataset"] + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
