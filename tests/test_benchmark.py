"""benchmarks/throughput.py end to end with --quick on the tiny dataset: files and schema only.

Benchmarks measure; this test never asserts a timing, only that every row ran, the numbers are
positive and finite, and the derived columns agree with samples_per_s.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"


def load_benchmark():
    """The script as a module (benchmarks/ is a folder of scripts, not a package)."""
    if "benchmarks_throughput" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmarks_throughput", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules["benchmarks_throughput"]


@pytest.fixture(scope="module")
def quick_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench = load_benchmark()
    assert (
        bench.main(["--quick", "--data", str(tiny_dataset), "--out", str(out), "--workers", "2"])
        == 0
    )
    return out, json.loads((out / "throughput.json").read_text())


def test_quick_run_writes_json_markdown_and_png(quick_run):
    out, _ = quick_run
    for name in ("throughput.json", "throughput.md", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "throughput.md").read_text()
    assert "| `torch` |" in md and "| `dali-cpu` |" in md and "benchmarks/throughput.py" in md


def test_every_row_ran_in_both_modes_with_positive_numbers(quick_run):
    _, result = quick_run
    rows = {(r["name"], r["mode"]): r for r in result["rows"]}
    cuda = result["env"]["gpu"] is not None
    loaders = ["torch", "webdataset", "dali-cpu", "dali-gpu" if cuda else "dali-raw"]
    for name in loaders:
        assert (name, "loader") in rows and (name, "train") in rows, name
    assert ("read-only", "loader") in rows
    assert ("synthetic-gpu" if cuda else "synthetic-cpu", "train") in rows
    for r in result["rows"]:
        for key in (
            "samples_per_s",
            "samples_per_s_min",
            "samples_per_s_max",
            "mb_per_s",
            "median_s_per_batch",
            "min_s_per_batch",
            "max_s_per_batch",
        ):
            assert math.isfinite(r[key]) and r[key] > 0, (r["name"], r["mode"], key)
        assert r["min_s_per_batch"] <= r["median_s_per_batch"] <= r["max_s_per_batch"]
        assert r["samples_per_s_min"] <= r["samples_per_s"] <= r["samples_per_s_max"]
        if r["mode"] == "train":
            assert 0 <= r["wait_share"] <= 1
            assert r["steps_per_s"] == pytest.approx(1 / r["median_s_per_batch"])


def test_derived_columns_agree_with_samples_per_s(quick_run):
    _, result = quick_run
    batch = result["env"]["config"]["batch_size"]
    sample_bytes = result["env"]["dataset"]["sample_bytes"]
    assert sample_bytes == 320044 + 62528  # canonical wav + npy members
    for mode in ("loader", "train"):
        rows = {r["name"]: r for r in result["rows"] if r["mode"] == mode}
        limit = rows[next(iter(rows))]["limit"]
        assert limit in rows and rows[limit]["kind"] == "limit"
        for r in rows.values():
            sps = r["samples_per_s"]
            assert sps == pytest.approx(batch / r["median_s_per_batch"])
            assert r["mb_per_s"] == pytest.approx(sps * sample_bytes / 1e6)
            assert r["ratio_to_torch"] == pytest.approx(sps / rows["torch"]["samples_per_s"])
            assert r["ratio_to_limit"] == pytest.approx(sps / rows[limit]["samples_per_s"])
        assert rows["torch"]["ratio_to_torch"] == pytest.approx(1.0)


def test_environment_records_machine_versions_dataset_and_command(quick_run, tiny_dataset):
    _, result = quick_run
    env = result["env"]
    assert env["cpu_count"] >= 1 and env["cpu_model"]
    assert set(env["versions"]) >= {"python", "torch", "dali", "numpy", "webdataset"}
    assert all(env["versions"].values())
    assert Path(env["dataset"]["dir"]) == Path(tiny_dataset).resolve()
    assert env["dataset"]["train_samples"] == 36
    assert "--quick" in env["command"] and env["date"]


def test_unknown_row_and_cuda_only_rows_are_refused_with_a_message(tiny_dataset, tmp_path):
    bench = load_benchmark()
    with pytest.raises(SystemExit, match="unknown row"):
        bench.main(
            ["--quick", "--data", str(tiny_dataset), "--out", str(tmp_path), "--rows", "nope"]
        )
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs CUDA"):
            bench.main(
                [
                    "--quick",
                    "--data",
                    str(tiny_dataset),
                    "--out",
                    str(tmp_path),
                    "--rows",
                    "dali-gpu",
                ]
            )
