"""benchmarks/gpu_check.py on CPU: the exit without a GPU, the plan it prints, and the real
orchestration (``--allow-cpu --quick``) writing its results and summary, passing and failing,
with the packages the device image lacks hidden from every interpreter it starts."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

# what the device machine lacks once ../shared/tools/gpu-pack.sh's wheels are installed, and
# what its image lacks without them (soundfile and its cffi backend, soxr, webdataset too)
LACKS_PACKED = ("boto3", "botocore", "s3transfer", "spdl", "moto", "ray")
LACKS_BARE = (*LACKS_PACKED, "soundfile", "cffi", "soxr", "webdataset")
BLOCKER = """import sys

HIDDEN = {hidden!r}


class Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden)", name=name)
        return None


sys.meta_path.insert(0, Hidden())
"""


def hiding(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    """An environment in which no Python process imports ``names``: a sitecustomize ahead of
    everything on PYTHONPATH puts a finder refusing them first on the meta path; the children
    gpu_check starts inherit it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(hidden=set(names)))
    path = os.pathsep.join([str(folder), str(gpu_check.ROOT)])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_without_cuda_it_says_so_and_exits_2_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "error: no CUDA" in err and "GPU machine" in err and "--dry-run" in err
    assert gpu_check.main(["--out", str(tmp_path / "gpu")]) == 2
    assert not (tmp_path / "gpu").exists()


def test_without_dali_it_says_so_and_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import nvidia.dali now fails
    assert gpu_check.main(["--allow-cpu", "--out", str(tmp_path / "gpu")]) == 2
    assert "error: no DALI: import nvidia.dali failed" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()


def test_dry_run_prints_the_seven_commands_in_order_even_without_cuda(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out, data = tmp_path / "gpu", os.path.relpath(gpu_check.ROOT / "data" / "bench")
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 7 and all(argv[0] == sys.executable for argv in lines)
    tests, build, plain, dali, aug, mel, torch_ = lines
    # only the modules that hold gpu tests: another module's imports cannot stop collection
    assert tests[1:6] == ["-m", "pytest", "-m", "gpu", "-q"]
    modules = {os.path.basename(x) for x in tests[6:]}
    assert {"test_loaders.py", "test_augment.py", "test_step.py"} <= modules
    assert not modules & {"test_make_shards.py", "test_audio.py", "test_infer.py"}
    # the benchmark's dataset, built before the first step that reads it
    assert build[1] == os.path.relpath(gpu_check.ROOT / "pipeline" / "make_shards.py")
    assert flag(build, "--synthetic") == "2048" and flag(build, "--out") == data
    # every row, augmentation off
    assert plain[1] == os.path.relpath(gpu_check.ROOT / "benchmarks" / "throughput.py")
    assert flag(plain, "--device") == "cuda" and flag(plain, "--repeats") == "3"
    assert flag(plain, "--data") == data and flag(plain, "--out") == str(out / "bench-plain")
    assert "--quick" not in plain and "--rows" not in plain and "--augment" not in plain
    # augmented DALI against plain DALI and augmented torch, with the limits
    assert aug[: len(plain) - 2] == plain[:-2] and "--augment" in aug
    assert flag(aug, "--rows") == "torch-aug,dali-gpu,dali-gpu-aug,read-only,synthetic-gpu"
    # train mode with the log-mel in the loader and without, same rows otherwise
    assert mel[: len(plain) - 2] == plain[:-2] and "--mel" in mel
    assert flag(mel, "--rows") == "torch,torch-mel,dali-gpu,dali-gpu-mel"
    assert flag(mel, "--modes") == "train" and flag(mel, "--out") == str(out / "bench-mel")
    for argv, loader in ((dali, "dali"), (torch_, "torch")):
        assert argv[1:5] == ["-m", "train", "--loader", loader]
        run_dir = f"run.dir={out / f'train-{loader}'}"
        assert sets(argv) == [
            f"data.dir={data}",
            "train.max_steps=300",
            run_dir,
            "run.overwrite=true",
            "run.progress=false",
        ]
    assert not out.exists()


def test_plan_on_cpu_quick(tmp_path, capsys):
    argv = [
        "--plan",
        "--allow-cpu",
        "--quick",
        "--data",
        "D",
        "--out",
        "O",
        "--steps",
        "train,bench",
    ]
    assert gpu_check.main(argv) == 0
    lines = [shlex.split(x) for x in capsys.readouterr().out.splitlines()]
    build, plain, dali, aug, mel, torch_ = lines
    assert flag(build, "--synthetic") == "48" and flag(build, "--samples-per-shard") == "16"
    assert "--quick" in plain and flag(plain, "--device") == "cpu" and "--repeats" not in plain
    assert flag(aug, "--rows") == "torch-aug,dali-raw,dali-raw-aug,read-only,synthetic-cpu"
    assert flag(mel, "--rows") == "torch,torch-mel,dali-raw,dali-raw-mel"
    for train in (dali, torch_):
        assert {"data.dir=D", "train.max_steps=5", "run.device=cpu"} <= set(sets(train))


def test_steps_by_name_or_group_run_in_value_order(capsys):
    assert gpu_check.main(["--plan", "--steps", "train-torch,pytest,bench-mel"]) == 0
    argvs = [shlex.split(x) for x in capsys.readouterr().out.splitlines()]
    assert [a[1:3] for a in argvs][0] == ["-m", "pytest"]
    assert "--mel" in argvs[2] and flag(argvs[3], "--loader") == "torch"
    assert argvs[1][1].endswith("make_shards.py")  # before the first step reading the data
    with pytest.raises(SystemExit):
        gpu_check.main(["--plan", "--steps", "bench,nope"])
    assert "--steps: a comma list of pytest-gpu" in capsys.readouterr().err


@pytest.mark.slow
def test_a_step_that_exits_non_zero_fails(tmp_path):
    parse = [sys.executable, "-c", "import argparse; argparse.ArgumentParser().parse_args()"]
    step = gpu_check.Step("bench", [*parse, "--augment"], 60)
    gpu_check.run_step(step, tmp_path / "b.log")
    assert (step.status, step.exit_code, step.failed) == ("failed: exit 2", 2, True)
    assert "unrecognized arguments: --augment" in (tmp_path / "b.log").read_text()


@pytest.mark.slow
def test_a_step_past_its_timeout_is_stopped_and_fails(tmp_path):
    step = gpu_check.Step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 0.5)
    clock = iter([1000.0, 1000.5625]).__next__  # read at the start and once it is stopped
    gpu_check.run_step(step, tmp_path / "slow.log", clock=clock)
    assert step.exit_code == 124 and step.status == "failed: timeout after 0.5 s"
    assert step.wall_s == 0.6


def test_steps_past_the_budget_are_skipped_named_and_fail_the_run(tmp_path, capsys):
    out, copy = tmp_path / "gpu", tmp_path / "OUT"
    argv = ["--allow-cpu", "--steps", "train", "--budget", "0", "--out", str(out)]
    argv += ["--copy-to", str(copy)]
    assert gpu_check.main([*argv, "--data", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert (
        "error: 3 of 3 steps failed or were skipped for time: data, train-dali, train-torch" in err
    )
    doc = json.loads((out / "summary.json").read_text())
    assert not doc["ok"] and doc["budget_s"] == 0
    why = "skipped: no time left (0 s of the 0 s --budget; a step starts with 30 s or more)"
    assert [s["status"] for s in doc["steps"]] == [why] * 3
    assert not (out / "train-dali.log").exists() and not (tmp_path / "none").exists()
    md = (out / "summary.md").read_text()
    assert "skipped: data, train-dali, train-torch" in md and why in md
    # the device tool's $OUT gets the same summary, and the results so far
    assert (copy / "summary.json").read_text() == (out / "summary.json").read_text()
    with tarfile.open(copy / "results.tgz") as tar:
        assert {"gpu/summary.json", "gpu/summary.md"} <= set(tar.getnames())


def test_a_step_whose_package_is_missing_is_skipped_named_and_builds_nothing(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setitem(sys.modules, "soxr", None)  # import soxr fails, as without the wheels
    out, data = tmp_path / "gpu", tmp_path / "data"
    argv = ["--allow-cpu", "--quick", "--steps", "bench-augment", "--out", str(out)]
    assert gpu_check.main([*argv, "--data", str(data)]) == 0
    doc = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s["status"] for s in doc["steps"]}
    assert list(steps) == ["data", "bench-augment"] and doc["ok"]
    assert steps["bench-augment"].startswith("skipped: needs soxr: import soxr failed")
    assert "gpu-pack.sh packs it" in steps["bench-augment"]
    assert steps["data"] == "skipped: found no step to run that reads it"
    assert not data.exists() and not (out / "bench-augment.log").exists()
    assert "no step failed; skipped: data, bench-augment" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_the_gpu_step_collects_where_the_image_lacks_soundfile_and_the_rest(tmp_path):
    """Whatever the image holds, the GPU tests are collected and run (skipped without CUDA)."""
    env = hiding(tmp_path / "hide", LACKS_BARE)
    (step,) = gpu_check.plan(gpu_check.parse_args(["--steps", "pytest"]))
    argv = [*step.argv, "-p", "no:cacheprovider"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    n = len(
        re.findall(
            r"^\s*@pytest\.mark\.gpu\b",
            "".join((gpu_check.ROOT / m).read_text() for m in step.argv[6:]),
            re.M,
        )
    )
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|skipped)", done.stdout))
    assert sum(counts.values()) >= n >= 7 and "error" not in done.stdout.lower()
    # and the hiding is real: the same interpreter cannot import soundfile
    probe = [sys.executable, "-c", "import soundfile"]
    assert (
        "No module named 'soundfile' (hidden)"
        in subprocess.run(probe, env=env, capture_output=True, text=True).stderr
    )


@pytest.mark.slow
def test_make_gpu_check_quick_on_cpu_where_the_packed_image_lacks_boto3_and_the_rest(tmp_path):
    """The whole plumbing through ``make gpu-check``, from a machine with only the repository
    (no dataset), in an environment hiding what the device lacks after gpu-pack.sh's wheels."""
    out, copy, data = tmp_path / "gpu", tmp_path / "OUT", tmp_path / "fresh"
    env = hiding(tmp_path / "hide", LACKS_PACKED)
    args = ["--allow-cpu", "--quick", "--data", str(data), "--out", str(out)]
    # bench-plain: one loader of each kind and the limits (every row: minutes)
    args += ["--bench-rows", "torch,dali-raw,read-only,synthetic-cpu", "--train-steps", "3"]
    make = ["make", "-s", "gpu-check", f"PYTHON={sys.executable}"]
    make += [f"GPU_CHECK_ARGS={shlex.join(args)} --copy-to={copy}"]
    done = subprocess.run(
        make, cwd=gpu_check.ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert doc["ok"] and list(steps) == [
        "pytest-gpu",
        "data",
        "bench-plain",
        "train-dali",
        "bench-augment",
        "bench-mel",
        "train-torch",
    ]
    for name, s in steps.items():
        assert (s["status"], s["exit_code"]) == ("ok", 0), s
        assert finite(s["wall_s"]) and (out / f"{name}.log").is_file()
    assert (data / "manifest.json").is_file()  # built by the data step
    assert {"device", "torch", "dali", "cuda"} <= set(doc["env"])
    for ext in ("json", "md", "png"):
        assert (out / "bench-plain" / f"throughput.{ext}").is_file()
    for name, aug in (("bench-plain", ""), ("bench-augment", "-aug")):
        fig = doc["figures"][name]
        assert fig["dali_row"] == f"dali-raw{aug}"  # dali-gpu's stand-in without CUDA
        if aug:
            assert all(finite(fig[mode]["dali_vs_plain_dali"]) for mode in ("loader", "train"))
        for mode, limit in (("loader", "read-only"), ("train", "synthetic-cpu")):
            assert fig[mode]["limit"] == limit
            for key in ("dali_samples_per_s", "torch_samples_per_s", "dali_vs_torch"):
                assert finite(fig[mode][key]), (name, mode, key)
            assert finite(fig[mode]["dali_vs_limit"])
    for loader in ("dali", "torch"):
        fig = doc["figures"][f"train-{loader}"]
        assert (out / f"train-{loader}" / "metrics.jsonl").is_file()
        assert fig["step"] == 3
        assert all(finite(fig[k]) for k in ("loss", "samples_per_s", "val_mse")), fig

    md = (out / "summary.md").read_text()
    assert "every step passed" in md and "| bench-plain | loader | dali-raw |" in md
    assert "| bench-augment | loader | dali-raw-aug |" in md
    mel = doc["figures"]["bench-mel"]  # train mode only: the log-mel in the loader or not
    assert mel["dali_row"] == "dali-raw-mel" and list(mel) == ["dali_row", "train"]
    assert finite(mel["train"]["dali_vs_plain_dali"]) and "| bench-mel | train |" in md
    assert "| train-torch | 3 |" in md and "failed" not in md
    assert "summary.md" in done.stdout
    # the copy for the device tool's $OUT: the same summary, every log and result but no .pt
    assert (copy / "summary.json").read_text() == (out / "summary.json").read_text()
    assert sorted(p.name for p in copy.iterdir()) == ["results.tgz", "summary.json", "summary.md"]
    with tarfile.open(copy / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {f"gpu/{s}.log" for s in steps} <= names and "gpu/bench-mel/throughput.json" in names
    assert "gpu/train-dali/metrics.jsonl" in names and not any(n.endswith(".pt") for n in names)


@pytest.mark.slow
def test_train_alone_on_a_machine_with_only_the_repository(tmp_path, capsys):
    out, data = tmp_path / "gpu", tmp_path / "fresh"
    argv = ["--allow-cpu", "--quick", "--steps", "train-dali", "--train-steps", "3"]
    assert gpu_check.main([*argv, "--data", str(data), "--out", str(out)]) == 0
    doc = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [
        ("data", "ok"),
        ("train-dali", "ok"),
    ]
    assert doc["figures"]["train-dali"]["step"] == 3 and (data / "manifest.json").is_file()
    # run again: the dataset is there, so no step builds it
    assert gpu_check.main([*argv, "--data", str(data), "--out", str(out)]) == 0
    doc = json.loads((out / "summary.json").read_text())
    assert doc["steps"][0]["status"] == f"skipped: found {data / 'manifest.json'}"


@pytest.mark.slow
def test_a_kill_after_a_step_leaves_its_figures_in_the_copy(tmp_path):
    """SIGKILL, as the device tool's limit does, once the first step is done: the copy holds
    that step's status and log, readable."""
    out, copy = tmp_path / "gpu", tmp_path / "OUT"
    argv = [sys.executable, str(gpu_check.ROOT / "benchmarks" / "gpu_check.py"), "--allow-cpu"]
    argv += ["--quick", "--steps", "pytest,train", "--data", str(tmp_path / "fresh")]
    argv += ["--out", str(out), "--copy-to", str(copy)]
    env = hiding(tmp_path / "hide", LACKS_PACKED)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(1200):  # the first step takes seconds; this waits up to 4 minutes
            summary = copy / "summary.json"
            if summary.is_file() and "pytest-gpu" in summary.read_text():
                steps = json.loads(summary.read_text())["steps"]
                if steps[0]["status"] != "not run":
                    break
            assert proc.poll() is None, "gpu_check ended before it could be killed"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    doc = json.loads((copy / "summary.json").read_text())
    assert [s["status"] for s in doc["steps"]][:1] == ["ok"]
    assert doc["steps"][-1]["status"] == "not run" and not doc["ok"]
    assert "not run (yet): " in (copy / "summary.md").read_text()
    with tarfile.open(copy / "results.tgz") as tar:
        log = tar.extractfile("gpu/pytest-gpu.log").read().decode()
    assert "-m gpu" in log and "skipped" in log


@pytest.mark.slow
def test_a_failing_step_fails_the_run_and_shows_in_the_summary(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "gpu"
    argv = ["--allow-cpu", "--quick", "--steps", "train", "--data", str(tiny_dataset)]
    argv += ["--out", str(out), "--train-set", "train.lr=oops"]  # a config error: exit 1
    assert gpu_check.main(argv) == 1
    err = capsys.readouterr().err
    assert "error: 2 of 3 steps failed or were skipped for time: train-dali, train-torch" in err
    doc = json.loads((out / "summary.json").read_text())
    assert not doc["ok"] and doc["figures"] == {}
    found = f"skipped: found {tiny_dataset / 'manifest.json'}"
    assert [(s["name"], s["exit_code"], s["status"]) for s in doc["steps"]] == [
        ("data", None, found),
        ("train-dali", 1, "failed: exit 1"),
        ("train-torch", 1, "failed: exit 1"),
    ]
    md = (out / "summary.md").read_text()
    assert "**failed: train-dali, train-torch**" in md
    assert "error: train.lr must be float" in md  # the end of the step's log
