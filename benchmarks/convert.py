"""make_shards' two engines on the same machine, and what converting 10,000 hours would cost.

    python benchmarks/convert.py --takes 60 --seconds 60 --out benchmarks/conversion-speed

1. A corpus of Live Link takes as a user has them (44.1 kHz stereo WAV + 60 fps CSV; the one
   ``benchmarks/sync.py`` writes): ``--takes`` of ``--seconds`` each.
2. make_shards on it with ``--engine local`` (a process pool of ``--workers``) and ``--engine
   ray`` (a local Ray of as many CPUs, started once, before the timed runs: its start-up is
   given apart), alternating, ``--repeats`` each: hours of audio per minute of the fastest run,
   per CPU too, and whether the two wrote the same bytes.
3. The CPU one take costs (``convert_and_store`` alone, in this process), the CPU of the whole
   run (CPUs x the local engine's fastest wall, per hour of audio), and the bytes moved per
   hour of audio: inputs read, the take store (the spool) written and read back, shards
   written (and, for an ``s3://`` --out, uploaded).
4. From those, the projection for 10,000 hours on N nodes of C cores reading from and writing
   to S3 (``projection``): the time each resource needs, and which one bounds the run.

Writes ``<out>/convert.json`` (every figure, the command and the machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

from benchmarks.sync import write_take
from pipeline import make_shards
from pipeline.convert.inputs import Settings, find_recordings
from pipeline.convert.takestore import TakeStore, convert_and_store, fingerprint
from pipeline.shards.manifest import FPS
from pipeline.shards.members import SAMPLE_RATE

SPOOL_PER_HOUR = 3600 * (SAMPLE_RATE * 2 + FPS * 52 * 4)  # PCM16 + float32 frames, bytes
# the projection's cluster: S3 in and out, the spool on a shared file system
NIC_GBIT = 10  # per node
FS_GBYTE = 3.0  # the shared file system's aggregate throughput, GB/s (EFS elastic: ~3 write)
S3_GBYTE = 25.0  # S3's aggregate throughput for one bucket, spread over prefixes, GB/s


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def timed_run(src: Path, out: Path, engine: str, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    args = ["--input", str(src), "--out", str(out), "--quiet", "--workers", str(workers)]
    t0 = time.perf_counter()
    assert make_shards.main([*args, "--engine", engine]) == 0
    return time.perf_counter() - t0


def take_cpu(src: Path, n: int) -> float:
    """CPU seconds per hour of audio of ``convert_and_store``, on ``n`` takes, here."""
    recordings, _ = find_recordings(src)
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        store = TakeStore(Path(tmp))
        seconds = 0.0
        t0 = time.process_time()
        for rec in recordings[:n]:
            seconds += convert_and_store((rec, settings, tmp, fingerprint(rec, settings))).seconds
        del store
        return (time.process_time() - t0) / (seconds / 3600)


def projection(cpu_s_per_hour: float, per_hour: dict, nodes: int, cores: int) -> dict:
    """Hours of wall time for 10,000 hours of audio on ``nodes`` x ``cores``, each resource
    alone, and the one that bounds the run. Bytes per hour of audio: inputs read from S3 once;
    the spool (take store) written once and read once, and the shards written to the staging
    folder, read back and uploaded: on one node the spool and staging are its local disk, on
    several a shared file system that every byte of them crosses, over the nodes' network."""
    hours = 10_000
    shared = 2 * per_hour["spool"] + 2 * per_hour["shards"] if nodes > 1 else 0
    node_bytes = (per_hour["input"] + per_hour["shards"] + shared) * hours / nodes
    need = {
        "cpu": hours * cpu_s_per_hour / (nodes * cores),
        "network": node_bytes / (NIC_GBIT / 8 * 1e9),
        "shared_fs": shared * hours / (FS_GBYTE * 1e9),
        "s3": (per_hour["input"] + per_hour["shards"]) * hours / (S3_GBYTE * 1e9),
    }
    bound = max(need, key=need.get)
    row = {"nodes": nodes, "cores": cores}
    row |= {f"{k}_h": round(v / 3600, 2) for k, v in need.items()}
    return row | {"hours": round(need[bound] / 3600, 2), "bottleneck": bound}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--takes", type=int, default=60)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmarks/conversion-speed")
    args = p.parse_args(argv)
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "takes"
        src.mkdir()
        with Pool(args.workers) as pool:
            pool.map(write_take, [(src, i, args.seconds) for i in range(args.takes)])
        input_bytes = sum(f.stat().st_size for f in src.iterdir())
        hours = args.takes * args.seconds / 3600
        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="warning")
        ray_start = time.perf_counter() - t0
        walls: dict[str, list[float]] = {"local": [], "ray": []}
        digests = {}
        for _ in range(args.repeats):
            for engine in walls:
                walls[engine].append(timed_run(src, Path(tmp) / "ds", engine, args.workers))
                digests[engine] = digest(Path(tmp) / "ds")
        shard_bytes = sum(
            s["bytes"] for s in json.loads((Path(tmp) / "ds/manifest.json").read_text())["shards"]
        )
        ray.shutdown()
        cpu = take_cpu(src, min(6, args.takes))
    per_hour = {
        "input": input_bytes / hours,
        "spool": SPOOL_PER_HOUR,
        "shards": shard_bytes / hours,
    }
    speed = {e: hours / (min(w) / 60) for e, w in walls.items()}
    # what the projection scales: the whole run's CPU, stages 1-6, both CPUs counted busy
    run_cpu = args.workers * min(walls["local"]) / hours
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{os.cpu_count()} CPUs, no GPU, Python {platform.python_version()}",
        "audio_hours": round(hours, 3),
        "walls_s": {e: [round(w, 2) for w in ws] for e, ws in walls.items()},
        "hours_per_minute": {e: round(v, 2) for e, v in speed.items()},
        "hours_per_minute_per_cpu": {e: round(v / args.workers, 2) for e, v in speed.items()},
        "ray_start_s": round(ray_start, 2),
        "same_bytes": digests["local"] == digests["ray"],
        "take_cpu_s_per_audio_hour": round(cpu, 1),
        "run_cpu_s_per_audio_hour": round(run_cpu, 1),
        "bytes_per_audio_hour": {k: int(v) for k, v in per_hour.items()},
        "projection_10000_h": [
            projection(run_cpu, per_hour, n, c)
            for n, c in ((1, 2), (1, 64), (4, 64), (16, 64), (64, 64))
        ],
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "convert.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
