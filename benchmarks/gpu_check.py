"""``make gpu-check``: one command that turns a lent GPU machine into figures in results/gpu/.

On a CUDA machine with DALI it runs, in order, each step's stdout+stderr into ``<out>/<step>.log``:
``pytest-gpu`` (``pytest -m gpu``); ``bench`` (``benchmarks/throughput.py --device cuda
--repeats 3 --augment``: every row with augmentation off and on, in one run, read as
``bench-plain`` and ``bench-augment``); ``train-dali`` and ``train-torch`` (300 steps of
``python -m train`` with each loader on data/bench, which the benchmark builds on first use);
``bench-mel`` (train mode, ``--mel``: the loaders with and without the log-mel in the graph).
``<out>/summary.md`` and ``summary.json``, rewritten after every step, hold the device, the
CUDA/torch/DALI versions, each step's exit code and wall time, the benchmark's headline ratios
(DALI against torch, the limit and, augmented, plain DALI) and each train run's final loss,
samples/s and last val mse. Exit 0 when every step passed, 1 when one failed, 2 without CUDA
or DALI (before any work). Children run with ``sys.executable`` and inherit PYTHONPATH.

    make gpu-check PYTHON=python3                        # on the GPU machine: no venv, no index
    python3 benchmarks/gpu_check.py --dry-run            # the commands, one a line (any machine)
    python benchmarks/gpu_check.py --allow-cpu --quick --out /tmp/gpu   # the plumbing on CPU
    make gpu-check PYTHON=python3 GPU_CHECK_ARGS="--steps train --train-timeout 300"

On the device tool's machine: ``bash ../shared/tools/gpu-pack.sh pyyaml tqdm psutil hypothesis
attrs sortedcontainers`` packs DALI and small wheels into .gpu/ (64 MiB a call), then three calls
back to back (a machine goes back after 30 s idle; the parts wait in /tmp/gpu-parts):

    run(carry=[".gpu/install.sh", ".gpu/PARTS", ".gpu/part-aa"], command="bash .gpu/install.sh")
    run(carry=[".gpu/install.sh", ".gpu/PARTS", ".gpu/part-ab"], command="bash .gpu/install.sh")
    run(carry=[".gpu/install.sh", ".gpu/PARTS", ".gpu/part-ac", ".gpu/wheels"], timeout_s=600,
        command="bash .gpu/install.sh && export PYTHONPATH=/tmp/site:$PWD && "
        "make gpu-check PYTHON=python3; rc=$?; cp results/gpu/summary.* $OUT/; "
        "tar czf $OUT/gpu.tgz --exclude='*.pt' results/gpu; exit $rc")   # 8 files come back at most
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import ArkitError, RunError

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("pytest", "bench", "train")
MODES = ("loader", "train")  # the benchmark's, in its JSON rows
NOT_HERE = (
    "error: make gpu-check is for a GPU machine with DALI (how: benchmarks/gpu_check.py's "
    "docstring); on CPU, --dry-run prints its commands and --allow-cpu --quick runs them"
)

# ---------------------------------------------------------------- defaults (one block)
DEFAULTS = dict(
    out="results/gpu",
    data="data/bench",  # throughput.py's own dataset: 2048 windows, built on first use
    repeats=3,  # benchmark repeats per row and mode (default rows): ~1-2 min a run on an H100
    train_steps=300,
    pytest_timeout=240,  # seconds per step; a step past it is stopped and counts as failed
    bench_timeout=420,  # the first run also builds data/bench (about a minute on 16 cores)
    train_timeout=240,
    budget=540,  # seconds for all steps: the device tool's 600 s call less the DALI install
)
QUICK = dict(data="data/bench-quick", train_steps=5)  # the benchmark's 48 windows, not data/bench


@dataclass
class Step:
    name: str  # also its log, <out>/<name>.log
    argv: list[str]
    timeout: float
    status: str = "not run"
    exit_code: int | None = None
    wall_s: float | None = None

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")


def here(path: str) -> str:
    """A path in the repository as the commands show it: relative to the working directory."""
    return os.path.relpath(ROOT / path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", "--plan", action="store_true", help="print the commands; run none")
    p.add_argument("--out", help=f"where the results go (default {DEFAULTS['out']})")
    p.add_argument("--data", help=f"dataset (default {DEFAULTS['data']}, --quick {QUICK['data']})")
    p.add_argument("--allow-cpu", action="store_true", help="run every step on CPU (for tests)")
    p.add_argument("--quick", action="store_true", help="benchmark --quick, 5 train steps")
    p.add_argument("--steps", default=",".join(STEPS), help="comma list of: " + ", ".join(STEPS))
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="benchmark repeats")
    p.add_argument("--train-steps", type=int, help="default 300 (--quick: 5)")
    p.add_argument("--budget", type=float, default=DEFAULTS["budget"], help="seconds for all steps")
    p.add_argument("--train-set", action="append", default=[], help="one more --set for training")
    p.add_argument("--bench-rows", help="the benchmark's --rows (default: every row)")
    for step in STEPS:
        s = DEFAULTS[f"{step}_timeout"]
        p.add_argument(f"--{step}-timeout", type=float, default=s, help=f"seconds (default {s:g})")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not args.steps or any(s not in STEPS for s in args.steps):
        p.error(f"--steps: a comma list of {', '.join(STEPS)}")
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    args.out, args.data = args.out or here(preset["out"]), args.data or here(preset["data"])
    args.train_steps = preset["train_steps"] if args.train_steps is None else args.train_steps
    if args.repeats < 1 or args.train_steps < 1:
        p.error("--repeats and --train-steps must be >= 1")
    return args


def plan(args: argparse.Namespace) -> list[Step]:
    """The steps ``args`` asks for, in order, with their exact commands."""
    py, out, device = sys.executable, Path(args.out), "cpu" if args.allow_cpu else "cuda"
    steps = []
    if "pytest" in args.steps:
        argv = [py, "-m", "pytest", "-m", "gpu", "-q", here("tests")]
        steps.append(Step("pytest-gpu", argv, args.pytest_timeout))
    if "bench" in args.steps:
        bench = [py, here("benchmarks/throughput.py"), "--device", device]
        bench += ["--data", args.data, *(["--quick"] if args.quick else [])]
        bench += [] if args.quick else ["--repeats", str(args.repeats)]
        bench += ["--rows", args.bench_rows] if args.bench_rows else []
        argv = [*bench, "--augment", "--out", str(out / "bench")]
        steps.append(Step("bench", argv, args.bench_timeout))
        dali = "dali-raw" if args.allow_cpu else "dali-gpu"  # the log-mel in the loader, or not
        mel = [*bench, "--mel", "--modes", "train", "--rows", f"torch,torch-mel,{dali},{dali}-mel"]
        steps.append(Step("bench-mel", [*mel, "--out", str(out / "bench-mel")], args.bench_timeout))
    if "train" in args.steps:
        for loader in ("dali", "torch"):
            sets = [f"data.dir={args.data}", f"train.max_steps={args.train_steps}"]
            sets += [f"run.dir={out / f'train-{loader}'}", "run.progress=false"]
            sets += (["run.device=cpu"] if args.allow_cpu else []) + args.train_set
            argv = [py, "-m", "train", "--loader", loader]
            argv += [x for s in sets for x in ("--set", s)]
            steps.append(Step(f"train-{loader}", argv, args.train_timeout))
    return steps


def missing(allow_cpu: bool) -> list[str]:
    """What this interpreter and machine lack for a GPU check (empty: nothing)."""
    lacks = []
    for what, module in (("torch", "torch"), ("DALI", "nvidia.dali")):
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install raises more than ImportError
            lacks.append(f"{what}: import {module} failed in {sys.executable} ({exc})")
    torch = sys.modules.get("torch")
    if torch and not allow_cpu and not torch.cuda.is_available():
        lacks.append(f"CUDA: torch {torch.__version__} sees no GPU (torch.cuda.is_available())")
    return lacks


def environment(allow_cpu: bool) -> dict:
    import nvidia.dali
    import torch

    cuda = torch.cuda.is_available() and not allow_cpu
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "dali": nvidia.dali.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def child_env() -> dict[str, str]:
    """The environment of every child: ours, PYTHONPATH kept (with the repo root appended so
    ``benchmarks`` and ``train`` import without an install), output unbuffered for the logs."""
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group (loader workers too; the trainer saves and stops),
    SIGKILL if it is still there 15 s later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_step(step: Step, log: Path) -> None:
    """Run ``step`` with its output in ``log``; sets its status, exit code and wall time."""
    t0 = time.perf_counter()
    if step.timeout <= 0:
        step.status, step.wall_s = "failed: no time left (--budget)", 0.0
        return
    with open(log, "w") as f:
        print(f"$ {shlex.join(step.argv)}", file=f, flush=True)
        proc = subprocess.Popen(
            step.argv, stdout=f, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True
        )
        try:
            code = proc.wait(timeout=step.timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            code = None
        except BaseException:  # Ctrl-C: take the step's processes down too
            stop(proc)
            raise
    step.wall_s = round(time.perf_counter() - t0, 1)
    step.exit_code = 124 if code is None else code
    if code is None:
        step.status = f"failed: timeout after {round(step.timeout, 1):g} s"
    elif code == 0:
        step.status = "ok"
    else:
        step.status = f"failed: exit {code}"


def bench_figures(folder: Path, aug: str = "") -> dict:
    """Headline figures of one benchmark run, read from its throughput.json rows: per mode the
    DALI row (dali-gpu; dali-raw, its CPU stand-in, without CUDA) against torch and the limit;
    with ``aug="-aug"`` the augmented rows, and augmented DALI against plain DALI."""
    rows = json.loads((folder / "throughput.json").read_text())["rows"]
    at = {(r["name"], r["mode"]): r for r in rows}
    names = (f"dali-gpu{aug}", f"dali-raw{aug}")
    dali = next((n for n in names for m in MODES if (n, m) in at), None)
    if dali is None:
        raise ValueError(f"{folder / 'throughput.json'} has neither a {' nor a '.join(names)} row")
    figures: dict = {"dali_row": dali}
    for mode in (m for m in MODES if (dali, m) in at):
        d, t = at[dali, mode], at.get((f"torch{aug}", mode))
        plain = at.get((dali.removesuffix(aug), mode)) if aug else None
        fig = {"dali_samples_per_s": d["samples_per_s"]}
        if t:
            fig["torch_samples_per_s"] = t["samples_per_s"]
            fig["dali_vs_torch"] = d["samples_per_s"] / t["samples_per_s"]
        if limit := at.get((d.get("limit"), mode)):
            fig["limit"] = limit["name"]
            fig["dali_vs_limit"] = d["samples_per_s"] / limit["samples_per_s"]
        if plain:
            fig["dali_vs_plain_dali"] = d["samples_per_s"] / plain["samples_per_s"]
        if mode == "train":  # the share of the time spent waiting for data
            fig.update(dali_wait_share=d["wait_share"], torch_wait_share=t and t["wait_share"])
        figures[mode] = fig
    return figures


def train_figures(folder: Path) -> dict:
    """The last train and val records of a run's metrics.jsonl (samples/s: the rate over the
    last record's epoch so far)."""
    recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x]
    train = [r for r in recs if r.get("split") == "train"]
    val = [r for r in recs if r.get("split") == "val"]
    if not train:
        raise ValueError(f"{folder / 'metrics.jsonl'} has no train record")
    fig = {k: train[-1][k] for k in ("step", "loss", "samples_per_s")}
    if val:
        fig.update(val_mse=val[-1]["mse"], val_baseline_mse=val[-1].get("baseline_mse"))
    return fig


def figures(steps: list[Step], out: Path) -> dict:
    """Figures of every step that passed; a figure that cannot be read fails its step."""
    found = {}
    for step in steps:
        if step.status == "ok" and step.name != "pytest-gpu":
            try:
                if step.name == "bench":
                    found["bench-plain"] = bench_figures(out / step.name)
                    found["bench-augment"] = bench_figures(out / step.name, "-aug")
                elif step.name == "bench-mel":  # -mel against plain: dali_vs_plain_dali
                    found["bench-mel"] = bench_figures(out / step.name, "-mel")
                else:
                    found[step.name] = train_figures(out / step.name)
            except (OSError, ValueError, KeyError) as exc:
                step.status = f"failed: its figures cannot be read ({type(exc).__name__}: {exc})"
    return found


def num(x, fmt: str = ",.0f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, fmt)


def table(title: str, head: list[str], rows: list[list]) -> list[str]:
    lines = ["", title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]


def markdown(doc: dict, out: Path) -> str:
    env, steps, figs = doc["env"], doc["steps"], doc["figures"]
    bad = [s["name"] for s in steps if s["failed"]]
    left = [s["name"] for s in steps if s["status"] == "not run"]
    verdict = f"**failed: {', '.join(bad)}**" if bad else "every step passed"
    verdict += f"; not run (yet): {', '.join(left)}" if left else ""
    lines = [
        f"# gpu-check on {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), DALI {env['dali']}, Python {env['python']}, "
        f"{env['cpus']} CPUs; {env['started']}, {doc['wall_s']:.0f} s in all; {verdict}",
    ]
    rows = [[s["name"], s["status"], s["exit_code"], num(s["wall_s"], ".1f")] for s in steps]
    lines += table("## Steps (logs: <step>.log)", ["step", "status", "exit code", "wall s"], rows)
    rows = [
        [name, mode, f["dali_row"], num(m.get("dali_samples_per_s"))]
        + [num(m.get("torch_samples_per_s")), num(m.get("dali_vs_torch"), ".2f")]
        + [m.get("limit", "–"), num(m.get("dali_vs_limit"), ".2f")]
        for name, f in figs.items()
        if name.startswith("bench")
        for mode, m in f.items()
        if mode in MODES
    ]
    head = ["run", "mode", "DALI row", "DALI", "torch", "DALI / torch", "limit", "DALI / limit"]
    lines += table("## Benchmark (samples/s, median of repeats)", head, rows) if rows else []
    rows = [
        [name, f["step"], num(f["loss"], ".5f"), num(f["samples_per_s"])]
        + [num(f.get("val_mse"), ".5f"), num(f.get("val_baseline_mse"), ".5f")]
        for name, f in figs.items()
        if name.startswith("train")
    ]
    head = ["run", "steps", "final loss", "samples/s", "val mse", "mean predictor's mse"]
    lines += table("## Training (metrics.jsonl: last records)", head, rows) if rows else []
    for s in steps:
        log = out / f"{s['name']}.log"
        if s["failed"] and log.is_file():
            tail = log.read_text(errors="replace").splitlines()[-15:]
            lines += ["", f"## {s['name']}: {s['status']} (end of {log.name})", ""]
            lines += ["```", *tail, "```"]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, args, env: dict, steps: list[Step], t0: float) -> dict:
    doc = {
        "ok": all(s.status == "ok" for s in steps),
        "wall_s": round(time.perf_counter() - t0, 1),
        "env": env,
        "args": {k: v for k, v in vars(args).items() if k != "dry_run"},
        "figures": figures(steps, out),
        "steps": [{**asdict(s), "failed": s.failed} for s in steps],
    }
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(doc, out))
    return doc


def run(args: argparse.Namespace) -> int:
    steps = plan(args)
    if args.dry_run:
        print("\n".join(shlex.join(s.argv) for s in steps))
        return 0
    if lacks := missing(args.allow_cpu):
        print(*(f"error: no {what}" for what in lacks), NOT_HERE, sep="\n", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"--out {out} cannot be made ({exc.strerror or exc})") from None
    for s in (s for s in steps if s.name.startswith("train")):  # the trainer appends to it
        (out / s.name / "metrics.jsonl").unlink(missing_ok=True)
    env, t0 = environment(args.allow_cpu), time.perf_counter()
    print(f"gpu-check on {env['device']}: {len(steps)} steps, results in {out}", flush=True)
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {step.name}: {shlex.join(step.argv)}", flush=True)
        step.timeout = min(step.timeout, args.budget - (time.perf_counter() - t0))
        run_step(step, out / f"{step.name}.log")
        doc = write_summary(out, args, env, steps, t0)
        print(f"[{i}/{len(steps)}] {step.name}: {step.status} in {step.wall_s:.0f} s", flush=True)
    print(f"\n{(out / 'summary.md').read_text()}\nwrote {out / 'summary.md'}, summary.json")
    if not doc["ok"]:
        bad = [s.name for s in steps if s.failed]
        print(f"error: {len(bad)} of {len(steps)} steps failed: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the check; 2 without CUDA or DALI, 1 with ``error: ...`` when a step failed."""
    args = parse_args(argv)
    try:
        return run(args)
    except ArkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the summary holds the steps done so far", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
