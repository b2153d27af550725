"""What bounding the sequence model's lookahead (``model.lookahead_seconds``) costs in quality,
on ``make demo``'s corpus and configuration.

    python benchmarks/lookahead.py                         # data/demo (built if missing), 1 seed
    python benchmarks/lookahead.py --repeats 4 --out benchmarks/lookahead-cost   # its README
    python benchmarks/lookahead.py --data DIR --lookaheads 0.1,none

For each lookahead asked (default 0.05, 0.1, 0.2 s and ``none``, unbounded) it trains
``python -m train --loader dali --config configs/demo.yaml`` (the sequence model, 12 epochs on
random 10 s crops) with ``--set model.lookahead_seconds=X`` (left unset for ``none``) and the
same ``train.seed``, each run in ``--runs``/<lookahead>-seed<seed>, and reads the evaluation
report the trainer writes on best.pt over the val split (``report/report.json``): the val MSE,
the mean predictor's MSE and jawOpen's Pearson r. The real lookahead is the built model's
(``model.reach``), at most the one asked. The MSE ratio to unbounded compares runs of the same
seed. Training time is the wall time of the whole ``python -m train`` process (start, 12
epochs, validations, the end report), with its CPU time (user and system, its workers
included): on a machine others use too, the wall time grows with their load, the CPU time much
less. ``--repeats N`` trains every lookahead with seeds ``--seed`` .. ``--seed``+N-1 (each
seed's lookaheads one after another) and gives each figure as the mean with the range over
seeds. Without ``--data`` it uses the repository's ``data/demo`` (``make demo``'s:
``pipeline/make_shards.py --synthetic 360 --segment-seconds 12``), built there on first use; a
``--data`` given must hold a dataset. Results go to ``--out``/lookahead.json; the markdown table
is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.dataset import not_a_dataset
from benchmarks.figures import figure, plural
from benchmarks.report import check_out, cpu_model
from core.errors import DatasetError, RunError, exit_code
from pipeline.shards.manifest import load_manifest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "data" / "demo"  # make demo's folder (git-ignored /data/)
DEMO_CORPUS = ["--synthetic", "360", "--segment-seconds", "12"]  # the Makefile's `make demo`


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        help="a dataset folder made by make_shards (default: the repository's data/demo, "
        "built on first use)",
    )
    p.add_argument(
        "--lookaheads",
        default="0.05,0.1,0.2,none",
        help="comma list of model.lookahead_seconds values; none: unbounded",
    )
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--loader", default="dali", choices=("dali", "torch"))
    p.add_argument("--seed", type=int, default=0, help="train.seed of the first repeat")
    p.add_argument("--repeats", type=int, default=1, help="seeds per lookahead")
    p.add_argument("--runs", default=str(ROOT / "runs" / "lookahead"), help="run.dir parent")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further config override for every run (e.g. train.epochs=1 for a quick try)",
    )
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: must be at least 1")
    raw, args.lookaheads = args.lookaheads, []
    for x in (x.strip() for x in raw.split(",") if x.strip()):
        try:
            value = None if x.lower() == "none" else float(x)
        except ValueError:
            p.error(f"--lookaheads {raw!r}: a comma list of seconds or none, as 0.05,0.1,none")
        if value is not None and value <= 0:
            p.error(f"--lookaheads {raw!r}: each lookahead is above 0 s (or none)")
        args.lookaheads.append(value)
    if not args.lookaheads:
        p.error("--lookaheads: give at least one value")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.config = str(Path(args.config).resolve())  # the runs start in the repository root
    return args


def label(lookahead: float | None) -> str:
    return "none" if lookahead is None else f"{lookahead:g}"


def demo_data(given: str | None) -> Path:
    """The dataset to train on: ``given`` as it is, else data/demo, built there if absent."""
    if given is not None:
        path = Path(given)
        if not (path / "manifest.json").is_file():
            raise DatasetError(not_a_dataset(path))
        return path.resolve()
    if (DEFAULT_DATA / "manifest.json").is_file():
        return DEFAULT_DATA
    if DEFAULT_DATA.exists() and any(DEFAULT_DATA.iterdir()):
        raise DatasetError(
            f"{DEFAULT_DATA} exists but has no manifest.json (an interrupted build?): rebuild it "
            f"with `make demo` or pass --data with a complete dataset"
        )
    from pipeline import make_shards

    print(f"building make demo's corpus in {DEFAULT_DATA} (once; reused later)", flush=True)
    t0 = time.perf_counter()
    if make_shards.main([*DEMO_CORPUS, "--out", str(DEFAULT_DATA), "--quiet"]) != 0:
        raise DatasetError(f"building {DEFAULT_DATA} failed")
    print(f"built in {figure(time.perf_counter() - t0)} s", flush=True)
    return DEFAULT_DATA


def overrides(args, data: Path, lookahead: float | None, seed: int, run_dir: Path) -> list[str]:
    sets = [*args.set, f"data.dir={data}", f"train.seed={seed}", f"run.dir={run_dir}"]
    sets.append("run.overwrite=true")
    if lookahead is not None:
        sets.append(f"model.lookahead_seconds={lookahead!r}")
    return sets


def real_lookahead(config: str, sets: list[str], data: Path) -> float:
    """The lookahead (s) of the model the trainer builds for this config and dataset."""
    from train.builders import build_model_for
    from train.config import load_config

    return build_model_for(load_config(config, sets), load_manifest(data)).reach.lookahead_seconds


def cpu_seconds() -> float:
    """User and system CPU time of this process's waited-for children so far."""
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def train_once(args, data: Path, lookahead: float | None, seed: int) -> dict:
    """One ``python -m train`` run; its report's figures, the real lookahead and the wall time."""
    name = f"{label(lookahead)}-seed{seed}"
    run_dir = Path(args.runs).resolve() / name
    sets = overrides(args, data, lookahead, seed, run_dir)
    real = real_lookahead(args.config, sets, data)
    cmd = [sys.executable, "-m", "train", "--loader", args.loader, "--config", args.config]
    for s in sets:
        cmd += ["--set", s]
    log = Path(args.runs).resolve() / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    if rc != 0:
        raise RunError(f"training {name} exited with {rc}: see {log}")
    try:
        rec = json.loads((run_dir / "report" / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"no readable report of {name} in {run_dir / 'report'}: {exc}") from None
    return {
        "lookahead_asked": lookahead,
        "lookahead_s": real,
        "seed": seed,
        "val_mse": rec["mse"],
        "mean_predictor_mse": rec["baseline_mse"],
        "mse_ratio_mean_predictor": rec["mse_ratio"],
        "jaw_open_pearson": rec["jaw_open_pearson"],
        "best_step": rec.get("step"),
        "train_seconds": seconds,
        "train_cpu_seconds": cpu,
        "run_dir": str(run_dir),
        "command": shlex.join(["python", *cmd[1:]]),
    }


def add_unbounded_ratios(runs: list[dict]) -> None:
    """Each run's val MSE over the unbounded run's of the same seed (None without one)."""
    free = {r["seed"]: r["val_mse"] for r in runs if r["lookahead_asked"] is None}
    for r in runs:
        base = free.get(r["seed"])
        r["mse_ratio_unbounded"] = r["val_mse"] / base if base else None


KEYS = (
    "val_mse",
    "mse_ratio_unbounded",
    "mse_ratio_mean_predictor",
    "jaw_open_pearson",
    "train_seconds",
    "train_cpu_seconds",
)


def summarize(runs: list[dict], lookaheads: list) -> list[dict]:
    """Per lookahead: each figure's mean, min and max over the seeds."""
    rows = []
    for la in lookaheads:
        mine = [r for r in runs if r["lookahead_asked"] == la]
        row = {"lookahead_asked": la, "lookahead_s": mine[0]["lookahead_s"], "seeds": len(mine)}
        for key in KEYS:
            values = [r[key] for r in mine if r[key] is not None]
            row[key] = (
                {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
                if values
                else None
            )
        rows.append(row)
    return rows


def cell(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "–"
    text = figure(stat["mean"], digits)
    if stat["min"] != stat["max"]:
        text += f" ({figure(stat['min'], digits)}–{figure(stat['max'], digits)})"
    return text


def markdown(rows: list[dict]) -> str:
    lines = [
        "| lookahead asked | real lookahead (s) | val MSE | × unbounded | × mean predictor "
        "| jawOpen r | training time (s) | its CPU time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        asked = "unbounded" if r["lookahead_asked"] is None else f"{r['lookahead_asked']:g} s"
        lines.append(
            f"| {asked} | {r['lookahead_s']:.4g} | {cell(r['val_mse'])} "
            f"| {cell(r['mse_ratio_unbounded'])} | {cell(r['mse_ratio_mean_predictor'])} "
            f"| {cell(r['jaw_open_pearson'])} | {cell(r['train_seconds'])} "
            f"| {cell(r['train_cpu_seconds'])} |"
        )
    return "\n".join(lines)


def environment(args, data: Path) -> dict:
    import torch

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(["benchmarks/lookahead.py", *args.argv]),
        "host": platform.node(),
        "cpu_model": cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "data": str(data),
        "config": args.config,
        "loader": args.loader,
        "load_average_start": list(os.getloadavg()),
    }


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_out(out)
    data = demo_data(args.data)
    for la in args.lookaheads:  # a lookahead the model cannot have is refused before training
        real_lookahead(args.config, overrides(args, data, la, args.seed, Path(args.runs)), data)
    env = environment(args, data)
    t0 = time.perf_counter()
    runs = []
    for seed in range(args.seed, args.seed + args.repeats):
        for la in args.lookaheads:
            r = train_once(args, data, la, seed)
            runs.append(r)
            print(
                f"lookahead {label(la)} (real {r['lookahead_s']:.4g} s), seed {seed}: val mse "
                f"{figure(r['val_mse'])} ({figure(r['mse_ratio_mean_predictor'])}x the mean "
                f"predictor's), jawOpen r {figure(r['jaw_open_pearson'], 4)}, "
                f"{figure(r['train_seconds'])} s ({figure(r['train_cpu_seconds'])} s CPU)",
                flush=True,
            )
    add_unbounded_ratios(runs)
    rows = summarize(runs, args.lookaheads)
    env.update(wall_seconds=time.perf_counter() - t0, load_average_end=list(os.getloadavg()))
    path = out / "lookahead.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"environment": env, "rows": rows, "runs": runs}, indent=1))
    except OSError as exc:
        raise RunError(
            f"cannot write {path}: {exc.strerror or exc}; give --out a folder you can write"
        ) from None
    seeds = plural(args.repeats, "seed")
    print(f"\n{seeds} per lookahead; mean (min–max over seeds) where more than one\n")
    print(markdown(rows))
    print(f"\nwrote {path} ({figure(env['wall_seconds'])} s in all)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 1 with ``error: ...`` on stderr for a bad dataset, config or --out."""
    args = parse_args(argv)
    return exit_code(lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
