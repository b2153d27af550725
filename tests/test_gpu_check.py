"""benchmarks/gpu_check.py on CPU: the exit without a GPU, the plan it prints, and the real
orchestration (``--allow-cpu --quick``) writing its results and summary, passing and failing."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys

import pytest
import torch

from benchmarks import gpu_check


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


def test_dry_run_prints_the_five_commands_even_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out, data = tmp_path / "gpu", os.path.relpath(gpu_check.ROOT / "data" / "bench")
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 5 and all(argv[0] == sys.executable for argv in lines)
    tests, bench, mel, dali, torch_ = lines
    assert tests[1:] == [
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        os.path.relpath(gpu_check.ROOT / "tests"),
    ]
    # every row, augmentation off and on, in one run
    assert bench[1] == os.path.relpath(gpu_check.ROOT / "benchmarks" / "throughput.py")
    assert flag(bench, "--device") == "cuda" and flag(bench, "--repeats") == "3"
    assert flag(bench, "--data") == data and flag(bench, "--out") == str(out / "bench")
    assert "--quick" not in bench and "--rows" not in bench and "--augment" in bench
    # train mode with the log-mel in the loader and without, same rows otherwise
    assert mel[: len(bench) - 3] == bench[: len(bench) - 3] and "--mel" in mel
    assert flag(mel, "--rows") == "torch,torch-mel,dali-gpu,dali-gpu-mel"
    assert flag(mel, "--modes") == "train" and flag(mel, "--out") == str(out / "bench-mel")
    for argv, loader in ((dali, "dali"), (torch_, "torch")):
        assert argv[1:5] == ["-m", "train", "--loader", loader]
        run_dir = f"run.dir={out / f'train-{loader}'}"
        assert sets(argv) == [
            f"data.dir={data}",
            "train.max_steps=300",
            run_dir,
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
        "bench,train",
    ]
    assert gpu_check.main(argv) == 0
    bench, mel, dali, torch_ = (shlex.split(x) for x in capsys.readouterr().out.splitlines())
    assert "--quick" in bench and flag(bench, "--device") == "cpu" and "--repeats" not in bench
    assert flag(mel, "--rows") == "torch,torch-mel,dali-raw,dali-raw-mel"
    for train in (dali, torch_):
        assert {"data.dir=D", "train.max_steps=5", "run.device=cpu"} <= set(sets(train))


def test_a_step_that_exits_non_zero_fails(tmp_path):
    parse = [sys.executable, "-c", "import argparse; argparse.ArgumentParser().parse_args()"]
    step = gpu_check.Step("bench", [*parse, "--augment"], 60)
    gpu_check.run_step(step, tmp_path / "b.log")
    assert (step.status, step.exit_code, step.failed) == ("failed: exit 2", 2, True)
    assert "unrecognized arguments: --augment" in (tmp_path / "b.log").read_text()


def test_a_step_past_its_timeout_is_stopped_and_fails(tmp_path):
    step = gpu_check.Step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 0.5)
    gpu_check.run_step(step, tmp_path / "slow.log")
    assert step.exit_code == 124 and step.status == "failed: timeout after 0.5 s"
    assert step.wall_s < 30


def test_steps_past_the_budget_are_not_started(tmp_path, capsys):
    out = tmp_path / "gpu"
    argv = ["--allow-cpu", "--steps", "train", "--budget", "0", "--out", str(out)]
    assert gpu_check.main([*argv, "--data", str(tmp_path / "none")]) == 1
    doc = json.loads((out / "summary.json").read_text())
    assert {s["status"] for s in doc["steps"]} == {"failed: no time left (--budget)"}
    assert not (out / "train-dali.log").exists()


@pytest.mark.slow
def test_quick_cpu_run_writes_results_and_a_summary(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "gpu"
    argv = ["--allow-cpu", "--quick", "--data", str(tiny_dataset), "--out", str(out)]
    argv += ["--steps", "bench,train"]  # pytest -m gpu's command: the dry-run test
    # the quick plumbing run: one loader in each mode, augmented and not (every row: minutes)
    rows = "torch,torch-aug,dali-raw,dali-raw-aug,read-only,synthetic-cpu"
    assert gpu_check.main([*argv, "--bench-rows", rows, "--train-steps", "3"]) == 0
    doc = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert doc["ok"] and list(steps) == ["bench", "bench-mel", "train-dali", "train-torch"]
    for name, s in steps.items():
        assert s["exit_code"] == 0, s
        assert finite(s["wall_s"]) and (out / f"{name}.log").is_file()
    assert {"device", "torch", "dali", "cuda"} <= set(doc["env"])
    for ext in ("json", "md", "png"):
        assert (out / "bench" / f"throughput.{ext}").is_file()
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
    assert "summary.md" in capsys.readouterr().out


@pytest.mark.slow
def test_a_failing_step_fails_the_run_and_shows_in_the_summary(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "gpu"
    argv = ["--allow-cpu", "--quick", "--steps", "train", "--data", str(tiny_dataset)]
    argv += ["--out", str(out), "--train-set", "train.lr=oops"]  # a config error: exit 1
    assert gpu_check.main(argv) == 1
    assert "error: 2 of 2 steps failed: train-dali, train-torch" in capsys.readouterr().err
    doc = json.loads((out / "summary.json").read_text())
    assert not doc["ok"] and doc["figures"] == {}
    assert [(s["name"], s["exit_code"], s["status"]) for s in doc["steps"]] == [
        ("train-dali", 1, "failed: exit 1"),
        ("train-torch", 1, "failed: exit 1"),
    ]
    md = (out / "summary.md").read_text()
    assert "**failed: train-dali, train-torch**" in md
    assert "error: train.lr must be float" in md  # the end of the step's log
