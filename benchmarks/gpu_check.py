"""``make gpu-check``: one command that turns a lent GPU machine into figures, inside one call.

On a CUDA machine with DALI it runs these steps, most valuable first, each one's stdout+stderr
into ``<out>/<step>.log``: ``pytest-gpu`` (``pytest -m gpu`` over the test modules that hold a
``gpu`` mark, so a module importing a package the image lacks cannot stop collection);
``bench-plain`` (``benchmarks/throughput.py --device cuda --repeats 3``, every row);
``train-dali`` (300 steps of ``python -m train --loader dali``); ``bench-augment`` (the
augmented rows against plain DALI); ``bench-mel`` (train mode with the log-mel in the graph and
without); ``train-torch``. A ``data`` step builds the synthetic dataset (``--data``, default
data/bench: 2048 windows) before the first step that reads it, unless its manifest.json is
there, so any step runs alone on a machine that holds only the repository. ``--steps`` takes
step names or the groups ``pytest``, ``bench`` and ``train``.

The steps share one clock, ``--budget`` (420 s): a step gets at most its own timeout and what
is left of the budget less 10 s for stopping it; once under 30 s are left no step starts, and
the summary names each one skipped. A step whose package is missing (``import soxr`` for the
augmented torch row, ``webdataset`` for its row, ``pytest``) is skipped, the package named.
``<out>/summary.md`` and ``summary.json`` hold the device, the CUDA/torch/DALI versions, each
step's status and wall time, the benchmark's headline ratios (DALI against torch, the limit
and, augmented, plain DALI) and each train run's final loss, samples/s and last val mse; they
are written before the first step and after every step, and with ``--copy-to DIR`` into DIR
too, with ``results.tgz`` (``<out>`` without checkpoints), so a kill at any moment leaves every
figure made so far. Exit 0 when no step failed or was cut by the budget, 1 otherwise, 2 without
CUDA or DALI (before any work). Children run with ``sys.executable`` and inherit PYTHONPATH.

    make gpu-check PYTHON=python3                        # on the GPU machine: no venv, no index
    python3 benchmarks/gpu_check.py --dry-run            # the commands, one a line (any machine)
    python benchmarks/gpu_check.py --allow-cpu --quick --out /tmp/gpu   # the plumbing on CPU
    make gpu-check PYTHON=python3 GPU_CHECK_ARGS="--steps train --budget 300"

On the device tool's machine: ``bash ../shared/tools/gpu-pack.sh`` (about 4 minutes, by its
note) packs DALI and the small wheels (soundfile, cffi, soxr, webdataset, DALI's Python-side
needs) into .gpu/ in parts of 48 MiB; then three calls back to back (a machine goes back after
30 s idle; the parts wait in /tmp/gpu-parts). The third unpacks DALI (about 620 MB) and runs
the check with its summary going to $OUT after every step, so the 600 s call returns what was
made even if it is killed (3 files: summary.md, summary.json, results.tgz):

    run(carry=[".gpu/install.sh", ".gpu/PARTS", ".gpu/part-aa"], command="bash .gpu/install.sh")
    run(carry=[".gpu/install.sh", ".gpu/PARTS", ".gpu/part-ab"], command="bash .gpu/install.sh")
    run(carry=[".gpu/install.sh", ".gpu/PARTS", ".gpu/part-ac", ".gpu/wheels"], timeout_s=600,
        command="bash .gpu/install.sh && export PYTHONPATH=/tmp/site:$PWD && "
        "make gpu-check PYTHON=python3 GPU_CHECK_ARGS=--copy-to=$OUT")

(Where the image has no make, ``python3 benchmarks/gpu_check.py --copy-to=$OUT`` is the same.)

The plumbing rehearsed on CPU (``make gpu-check GPU_CHECK_ARGS="--allow-cpu --quick --data
/tmp/fresh --copy-to=/tmp/OUT"``, boto3, spdl, moto and ray hidden as on the packed image, 2
shared cores of the project's VM): 154 s in all; pytest-gpu 12 s (the GPU tests collected and
skipped), data 15 s (48 windows), bench-plain 39 s, train-dali 25 s, bench-augment 18 s,
bench-mel 16 s, train-torch 24 s. The default run's times on a GPU are not measured yet.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.gpu_summary import write_summary
from core.errors import ArkitError, RunError

ROOT = Path(__file__).resolve().parent.parent
# every step, in the order they run: most valuable first, as a kill may come at any moment
ORDER = ("pytest-gpu", "bench-plain", "train-dali", "bench-augment", "bench-mel", "train-torch")
GROUPS = {
    "pytest": ("pytest-gpu",),
    "bench": ("bench-plain", "bench-augment", "bench-mel"),
    "train": ("train-dali", "train-torch"),
}
NOT_HERE = (
    "error: make gpu-check is for a GPU machine with DALI (how: benchmarks/gpu_check.py's "
    "docstring); on CPU, --dry-run prints its commands and --allow-cpu --quick runs them"
)
GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)", re.M)

DEFAULTS = dict(
    out="results/gpu",
    data="data/bench",  # throughput.py's own dataset
    windows=2048,  # throughput.py's, so either builds the same data/bench
    repeats=3,  # benchmark repeats per row and mode
    train_steps=300,
    # seconds per step, each also held to what is left of the budget
    pytest_timeout=120,
    data_timeout=150,  # building data/bench: 4-6 min on 2 CPUs, in parallel over every core
    bench_timeout=150,
    train_timeout=120,
    # seconds for all steps: the device tool's 600 s call less DALI's install and a margin
    budget=420,
)
QUICK = dict(data="data/bench-quick", windows=48, train_steps=5)  # the benchmark's --quick data
GRACE = 10  # seconds between a step's SIGTERM and its SIGKILL, kept out of its timeout
MIN_START = 30  # seconds of budget a step needs to be started at all


@dataclass
class Step:
    name: str  # also its log, <out>/<name>.log
    argv: list[str]
    timeout: float
    needs: tuple[str, ...] = ()  # modules the step imports that the device image may lack
    reads_data: bool = False  # reads --data, which the data step builds when absent
    status: str = "not run"
    exit_code: int | None = None
    wall_s: float | None = None

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")

    @property
    def fine(self) -> bool:
        """Passed, or skipped for a reason that fails nothing: a missing package, the data there."""
        return self.status == "ok" or self.status.startswith(("skipped: needs", "skipped: found"))


def here(path: str) -> str:
    """A path in the repository as the commands show it: relative to the working directory."""
    return os.path.relpath(ROOT / path)


def step_names(text: str) -> list[str] | None:
    """The steps a --steps comma list names (steps or groups), in run order; None if unknown."""
    named = set()
    for x in (x.strip() for x in text.split(",") if x.strip()):
        if x not in (*ORDER, *GROUPS):
            return None
        named.update(GROUPS.get(x, (x,)))
    return [s for s in ORDER if s in named] or None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", "--plan", action="store_true", help="print the commands; run none")
    p.add_argument("--out", help=f"where the results go (default {DEFAULTS['out']})")
    p.add_argument(
        "--copy-to",
        help="a folder that also gets summary.md, summary.json and results.tgz after every step "
        "(the device tool's $OUT)",
    )
    p.add_argument("--data", help=f"dataset (default {DEFAULTS['data']}, --quick {QUICK['data']})")
    p.add_argument("--allow-cpu", action="store_true", help="run every step on CPU (for tests)")
    p.add_argument("--quick", action="store_true", help="benchmark --quick, 5 train steps")
    every = ", ".join([*ORDER, *GROUPS])
    p.add_argument("--steps", default=",".join(ORDER), help="comma list of: " + every)
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="benchmark repeats")
    p.add_argument("--train-steps", type=int, help="default 300 (--quick: 5)")
    p.add_argument("--budget", type=float, default=DEFAULTS["budget"], help="seconds for all steps")
    p.add_argument("--train-set", action="append", default=[], help="one more --set for training")
    p.add_argument("--bench-rows", help="bench-plain's --rows (default: every row)")
    for step in ("pytest", "data", "bench", "train"):
        s = DEFAULTS[f"{step}_timeout"]
        p.add_argument(f"--{step}-timeout", type=float, default=s, help=f"seconds (default {s:g})")
    args = p.parse_args(argv)
    steps = step_names(args.steps)
    if steps is None:
        p.error(f"--steps: a comma list of {every}")
    args.steps = steps
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    args.out, args.data = args.out or here(preset["out"]), args.data or here(preset["data"])
    args.windows = preset["windows"]
    args.train_steps = preset["train_steps"] if args.train_steps is None else args.train_steps
    if args.repeats < 1 or args.train_steps < 1:
        p.error("--repeats and --train-steps must be >= 1")
    return args


def gpu_test_modules() -> list[str]:
    """The test modules that hold a ``gpu`` mark: pytest collects only these, so another
    module's import of a package the device lacks (soundfile, boto3, ...) stops nothing."""
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    return [here(f"tests/{t.name}") for t in tests if GPU_MARK.search(t.read_text())]


def plan(args: argparse.Namespace) -> list[Step]:
    """The steps ``args`` asks for, in order, with their exact commands; the data step goes
    before the first step that reads the dataset."""
    py, out, device = sys.executable, Path(args.out), "cpu" if args.allow_cpu else "cuda"
    cpu = args.allow_cpu  # the CPU stand-ins of the CUDA rows
    dali, limit = ("dali-raw", "synthetic-cpu") if cpu else ("dali-gpu", "synthetic-gpu")
    bench = [py, here("benchmarks/throughput.py"), "--device", device, "--data", args.data]
    bench += ["--quick"] if args.quick else ["--repeats", str(args.repeats)]
    steps = []
    for name in args.steps:
        if name == "pytest-gpu":
            argv = [py, "-m", "pytest", "-m", "gpu", "-q", *gpu_test_modules()]
            steps.append(Step(name, argv, args.pytest_timeout, needs=("pytest",)))
        elif name == "bench-plain":
            rows = ["--rows", args.bench_rows] if args.bench_rows else []
            argv = [*bench, *rows, "--out", str(out / name)]
            needs = () if args.bench_rows else ("webdataset",)  # its row
            steps.append(Step(name, argv, args.bench_timeout, needs, reads_data=True))
        elif name == "bench-augment":  # against plain DALI and augmented torch, with the limits
            rows = f"torch-aug,{dali},{dali}-aug,read-only,{limit}"
            argv = [*bench, "--augment", "--rows", rows, "--out", str(out / name)]
            needs = ("soxr",)  # torch-aug's speed change
            steps.append(Step(name, argv, args.bench_timeout, needs, reads_data=True))
        elif name == "bench-mel":  # train mode, the log-mel in the loader or not
            rows = f"torch,torch-mel,{dali},{dali}-mel"
            argv = [*bench, "--mel", "--modes", "train", "--rows", rows, "--out", str(out / name)]
            steps.append(Step(name, argv, args.bench_timeout, reads_data=True))
        else:
            loader = name.removeprefix("train-")
            sets = [f"data.dir={args.data}", f"train.max_steps={args.train_steps}"]
            sets += [f"run.dir={out / name}", "run.overwrite=true", "run.progress=false"]
            sets += (["run.device=cpu"] if cpu else []) + args.train_set
            argv = [py, "-m", "train", "--loader", loader]
            argv += [x for s in sets for x in ("--set", s)]
            steps.append(Step(name, argv, args.train_timeout, reads_data=True))
    first = next((i for i, s in enumerate(steps) if s.reads_data), None)
    if first is not None and not args.data.startswith("s3://"):
        argv = [py, here("pipeline/make_shards.py"), "--synthetic", str(args.windows)]
        argv += ["--out", args.data, "--quiet"]
        argv += ["--samples-per-shard", "16"] if args.quick else []  # as throughput.py --quick
        steps.insert(first, Step("data", argv, args.data_timeout))
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
    SIGKILL if it is still there ``GRACE`` s later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_step(step: Step, log: Path, clock=time.perf_counter) -> None:
    """Run ``step`` with its output in ``log``; sets its status, exit code and wall time."""
    t0 = clock()
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
    step.wall_s = round(clock() - t0, 1)
    step.exit_code = 124 if code is None else code
    if code is None:
        step.status = f"failed: timeout after {round(step.timeout, 1):g} s"
    elif code == 0:
        step.status = "ok"
    else:
        step.status = f"failed: exit {code}"


def lacking(modules: tuple[str, ...]) -> str | None:
    """Why a step cannot run here: the first of ``modules`` that does not import (or None)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install raises more than ImportError
            return f"{module}: import {module} failed ({exc}); ../shared/tools/gpu-pack.sh packs it"
    return None


def start(step: Step, steps: list[Step], args, left: float) -> str | None:
    """Why ``step`` is not started (its status), or None to run it with ``left`` s of budget."""
    if step.name == "data":
        if (Path(args.data) / "manifest.json").is_file():
            return f"skipped: found {Path(args.data) / 'manifest.json'}"
        after = steps[steps.index(step) + 1 :]
        if not any(s.reads_data and s.status == "not run" for s in after):
            return "skipped: found no step to run that reads it"
    if left < MIN_START:
        return (
            f"skipped: no time left ({max(left, 0):.0f} s of the {args.budget:g} s --budget; "
            f"a step starts with {MIN_START} s or more)"
        )
    data = next((s for s in steps if s.name == "data"), None)
    if step.reads_data and data is not None and not data.fine:
        return f"skipped: no dataset at {args.data} (data: {data.status})"
    return None


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()  # the budget's clock: from here, the imports of torch and DALI too
    steps = plan(args)
    if args.dry_run:
        print("\n".join(shlex.join(s.argv) for s in steps))
        return 0
    if lacks := missing(args.allow_cpu):
        print(*(f"error: no {what}" for what in lacks), NOT_HERE, sep="\n", file=sys.stderr)
        return 2
    out = Path(args.out)
    for folder, flag in ((out, "--out"), (args.copy_to, "--copy-to")):
        try:
            if folder:
                Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"{flag} {folder} cannot be made ({exc.strerror or exc})") from None
    for s in (s for s in steps if s.name.startswith("train")):  # the trainer appends to it
        (out / s.name / "metrics.jsonl").unlink(missing_ok=True)
    for s in steps:  # a package the image lacks: known before any work
        if why := lacking(s.needs):
            s.status = f"skipped: needs {why}"
    env = environment(args.allow_cpu)
    print(f"gpu-check on {env['device']}: {len(steps)} steps, results in {out}", flush=True)
    doc = write_summary(out, args, env, steps, t0)  # the plan and the machine, before any step
    for i, step in enumerate(steps, 1):
        left = args.budget - (time.perf_counter() - t0)
        if step.status == "not run" and (why := start(step, steps, args, left)):
            step.status = why
        if step.status == "not run":
            print(f"[{i}/{len(steps)}] {step.name}: {shlex.join(step.argv)}", flush=True)
            step.timeout = min(step.timeout, left - GRACE)
            run_step(step, out / f"{step.name}.log")
            doc = write_summary(out, args, env, steps, t0)
            print(
                f"[{i}/{len(steps)}] {step.name}: {step.status} in {step.wall_s:.0f} s", flush=True
            )
        else:
            print(f"[{i}/{len(steps)}] {step.name}: {step.status}", flush=True)
    doc = write_summary(out, args, env, steps, t0)
    print(f"\n{(out / 'summary.md').read_text()}\nwrote {out / 'summary.md'}, summary.json")
    if not doc["ok"]:
        bad = [s.name for s in steps if not s.fine]
        print(
            f"error: {len(bad)} of {len(steps)} steps failed or were skipped for time: "
            f"{', '.join(bad)} (their logs and summary.md say why)",
            file=sys.stderr,
        )
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
