"""benchmarks/throughput.py end to end with --quick on the tiny dataset: files and schema only;
and the row registry: default rows, --help, refused rows and datasets.

Benchmarks measure; this test never asserts a timing, only that every row ran, the numbers are
positive and finite, and the derived columns agree with samples_per_s. The measurement itself
is tested in test_measure.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import throughput
from benchmarks.dataset import ensure_dataset
from benchmarks.figures import figure, plural
from benchmarks.rows import (
    ROW_ORDER,
    ROWS,
    available_rows,
    make_row,
    select_rows,
    skipped_rows,
)
from core.errors import ConfigError, DatasetError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture(scope="module")
def quick_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert (
        throughput.main(
            ["--quick", "--data", str(tiny_dataset), "--out", str(out), "--workers", "2"]
        )
        == 0
    )
    return out, json.loads((out / "throughput.json").read_text())


@pytest.mark.slow
def test_quick_run_writes_json_markdown_and_png(quick_run):
    out, _ = quick_run
    for name in ("throughput.json", "throughput.md", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "throughput.md").read_text()
    assert "| `torch` |" in md and "| `dali-cpu` |" in md and "benchmarks/throughput.py" in md


@pytest.mark.slow
def test_every_row_ran_in_both_modes_with_positive_numbers(quick_run):
    _, result = quick_run
    rows = {(r["name"], r["mode"]): r for r in result["rows"]}
    cuda = result["env"]["gpu"] is not None
    loaders = [
        "torch",
        "webdataset",
        "spdl",
        "threads",
        "dali-cpu",
        "dali-gpu" if cuda else "dali-raw",
    ]
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    with pytest.raises(ConfigError, match="unknown row 'nope'; rows: torch, webdataset"):
        select_rows("torch,nope", CPU)
    with pytest.raises(ConfigError, match="unknown row"):
        make_row("nope", None, None, CPU)
    for name in ("dali-gpu", "h2d-pinned", "synthetic-gpu"):
        with pytest.raises(ConfigError, match=f"row {name} needs CUDA"):
            select_rows(name, CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs CUDA; dali-raw runs its graph on CPU"):
            make_row("dali-gpu", None, None, CPU)


@pytest.mark.parametrize(
    ("rows", "message"),
    [("nope", "error: unknown row 'nope'"), ("dali-gpu", "error: row dali-gpu needs CUDA")],
)
def test_main_prints_a_refused_row_and_exits_1(tiny_dataset, tmp_path, capsys, rows, message):
    if rows == "dali-gpu" and torch.cuda.is_available():
        pytest.skip("dali-gpu runs here")
    argv = ["--quick", "--data", str(tiny_dataset), "--out", str(tmp_path), "--rows", rows]
    assert throughput.main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "throughput.json").exists()


def test_a_directory_without_manifest_is_refused_not_rebuilt(tmp_path, capsys):
    data = tmp_path / "half"
    data.mkdir()
    (data / "train-000000.tar").write_bytes(b"")
    with pytest.raises(DatasetError, match="has no manifest.json"):
        ensure_dataset(data, 8)
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--rows", "read-only"]
    assert throughput.main(argv) == 1
    assert "error: " in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == ["train-000000.tar"]


def test_registry_drives_the_default_rows_and_the_help(capsys):
    assert ROW_ORDER == tuple(ROWS)
    spdl = [] if ROWS["spdl"].missing() else ["spdl"]  # an optional package (the bench extra)
    assert available_rows(CPU) == [
        "torch",
        "webdataset",
        *spdl,
        "threads",
        "dali-cpu",
        "dali-cpu-mmap",
        "dali-raw",
        "read-only",
        "synthetic-cpu",
    ]
    assert available_rows(CUDA) == [
        "torch",
        "webdataset",
        *spdl,
        "threads",
        "dali-cpu",
        "dali-cpu-mmap",
        "dali-gpu",
        "read-only",
        "h2d-pinned",
        "synthetic-gpu",
    ]
    # --augment adds each loader again with crops and augmentation
    aug = ["torch-aug", "dali-cpu-aug", "dali-raw-aug"]
    assert available_rows(CPU, augment=True) == available_rows(CPU) + aug
    assert ROWS["dali-gpu-aug"].needs_cuda and all(ROWS[n].augmented for n in aug)
    # --mel adds each loader again yielding log-mel
    mel = ["torch-mel", "dali-cpu-mel", "dali-raw-mel"]
    assert available_rows(CPU, mel=True) == available_rows(CPU) + mel
    assert "dali-gpu-mel" in available_rows(CUDA, mel=True) and ROWS["dali-gpu-mel"].needs_cuda
    # each row once, in registry order, whatever order --rows names them in
    assert select_rows("read-only, torch,torch", CPU) == ["torch", "read-only"]
    assert select_rows(None, CPU) == available_rows(CPU)
    limits = {n: s.modes for n, s in ROWS.items() if s.kind == "limit"}
    assert limits == {
        "read-only": ("loader",),
        "h2d-pinned": ("loader",),
        "synthetic-gpu": ("train",),
        "synthetic-cpu": ("train",),
    }
    assert all(s.modes == ("loader", "train") for s in ROWS.values() if s.kind == "loader")
    with pytest.raises(SystemExit):
        throughput.parse_args(["--help"])
    out = capsys.readouterr().out
    for spec in ROWS.values():
        if not spec.augmented and not spec.mel:  # those are said once, in the heading
            assert f"  {spec.name:14s} {spec.description}" in out
    assert "-aug with --augment" in out and "-mel with --mel" in out
    assert "python benchmarks/throughput.py --quick" in out


@pytest.mark.slow
def test_mel_rows_train_the_same_sequence_model_on_log_mel(tiny_dataset, tmp_path):
    rows = "torch,torch-mel,dali-cpu,dali-cpu-mel"
    args = ["--quick", "--data", str(tiny_dataset), "--out", str(tmp_path), "--workers", "1"]
    assert throughput.main([*args, "--mel", "--rows", rows, "--modes", "train"]) == 0
    result = json.loads((tmp_path / "throughput.json").read_text())
    got = {r["name"]: r for r in result["rows"]}
    assert sorted(got) == sorted(rows.split(","))
    for name, r in got.items():
        assert r["mode"] == "train" and r["samples_per_s"] > 0
        assert ("log-mel in the loader" in r["what"]) == name.endswith("-mel")
        assert 0 <= r["wait_share"] <= 1
    assert "(SequenceModel step per batch;" in (tmp_path / "throughput.md").read_text()


def test_threads_row_gives_the_torch_loaders_tensors_across_epochs(tiny_dataset):
    """The reference loader reads the torch baseline's order: the same tensors, bit for bit,
    into the next epoch (36 samples, batch 4: 9 batches an epoch)."""
    from benchmarks.threads_loader import ThreadBatches
    from pipeline import build_loader
    from pipeline.shards.manifest import load_manifest

    rows = ThreadBatches(load_manifest(tiny_dataset), 4, CPU, threads=2)
    try:
        stream = rows.stream(0)
        got = [{k: v.clone() for k, v in next(stream).items()} for _ in range(12)]
    finally:
        rows.close()
    torch_loader = build_loader(
        "torch", tiny_dataset, batch_size=4, shuffle=True, seed=0, num_workers=0, device="cpu"
    )
    want = list(torch_loader)  # epoch 0, then epoch 1
    want += list(torch_loader)
    assert len(want) == 18
    for a, b in zip(got, want, strict=False):
        assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"])


def test_dali_rows_get_the_threads_rows_thread_count_and_say_so(tiny_dataset):
    """DALI's CPU threads follow --threads (default one per CPU), both stated in the rows."""
    from pipeline.shards.manifest import load_manifest

    default = throughput.parse_args([])
    assert default.dali_threads == default.threads == throughput.DEFAULTS["threads"]
    assert throughput.parse_args(["--threads", "3", "--dali-threads", "1"]).dali_threads == 1
    args = throughput.parse_args(["--quick", "--data", str(tiny_dataset), "--threads", "3"])
    m = load_manifest(tiny_dataset)
    dali, pool = make_row("dali-raw", args, m, CPU), make_row("threads", args, m, CPU)
    try:
        assert ", 3 threads, prefetch" in dali.what and "thread pool of 3," in pool.what
    finally:
        dali.close()
        pool.close()


def test_spdl_row_gives_the_torch_loaders_tensors_and_stops_its_threads(tiny_dataset):
    """SPDL's pipeline, in the torch baseline's order: the same tensors into the next epoch;
    closing the stream leaves no SPDL thread behind."""
    pytest.importorskip("spdl.pipeline")
    import threading

    from benchmarks.spdl_loader import spdl_batches
    from pipeline import build_loader
    from pipeline.shards.manifest import load_manifest

    torch_loader = build_loader(
        "torch", tiny_dataset, batch_size=4, shuffle=True, seed=0, num_workers=0, device="cpu"
    )
    want = list(torch_loader) + list(torch_loader)[:2]  # epoch 0 (9 batches), 2 of epoch 1
    for threads in (1, 2):
        stream = spdl_batches(load_manifest(tiny_dataset), 4, CPU, 0, threads)
        got = [next(stream) for _ in range(len(want))]
        stream.close()
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"])
    alive = [t.name for t in threading.enumerate() if "spdl" in t.name.lower()]
    assert not alive, alive


def test_a_missing_package_leaves_its_row_out_with_a_note(monkeypatch):
    for name in ("spdl", "spdl.io", "spdl.pipeline"):  # import spdl now fails, even if loaded
        monkeypatch.setitem(sys.modules, name, None)
    assert "spdl" not in available_rows(CPU)
    assert any(n.startswith("spdl skipped: spdl is not installed") for n in skipped_rows())
    with pytest.raises(ConfigError, match="row spdl cannot run: spdl is not installed"):
        select_rows("spdl", CPU)


# ---------------------------------------------------------------- the user's paths and flags

ROOT = Path(__file__).resolve().parent.parent


def one_error_line(err: str, *parts: str) -> str:
    """The last line of stderr: one ``error:`` line naming each of ``parts``, no traceback."""
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert "error: " in line, err
    for part in parts:
        assert part in line, (part, line)
    return line


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_a_data_path_that_holds_no_dataset_is_refused_never_built(tmp_path, capsys, kind):
    """Only the benchmark's own data/bench folders are built into: a --data typo gets an error
    naming it and the ways out, and nothing is written there."""
    data = tmp_path / "typo"
    if kind == "empty":
        data.mkdir()
    elif kind == "file":
        data.write_text("mine\n")
    out = tmp_path / "out"
    argv = ["--quick", "--windows", "8", "--data", str(data), "--out", str(out)]
    assert throughput.main([*argv, "--rows", "read-only", "--modes", "loader"]) == 1
    said = {"missing": "does not exist", "empty": "is an empty folder", "file": "is a file"}
    line = one_error_line(capsys.readouterr().err, f"--data {data} {said[kind]}")
    assert "make_shards.py --out" in line and "leave --data out" in line
    if kind == "missing":
        assert not data.exists()
    elif kind == "empty":
        assert list(data.iterdir()) == []
    else:
        assert data.read_text() == "mine\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--repeats", "0"], "--repeats 0: must be at least 1"),
        (["--warmup", "0"], "--warmup 0: must be at least 1"),
        (["--threads", "0"], "--threads 0: must be at least 1"),
        (["--spdl-threads", "0"], "--spdl-threads 0: must be at least 1"),
        (["--workers", "-1"], "--workers -1: must be at least 0"),
        (["--dali-threads", "-1"], "--dali-threads -1: must be at least 0"),
        (["--dali-prefetch", "0"], "--dali-prefetch 0: must be at least 1"),
        (["--reader-prefetch", "0"], "--reader-prefetch 0: must be at least 1"),
        (["--torch-threads", "0"], "--torch-threads 0: must be at least 1"),
        (["--modes", ""], "--modes names no mode: choose from loader, train"),
    ],
)
def test_a_flag_out_of_range_is_a_usage_error_before_any_work(
    tiny_dataset, tmp_path, capsys, flags, message
):
    argv = ["--quick", "--data", str(tiny_dataset), "--out", str(tmp_path / "out")]
    rows = ["--rows", "torch,threads,spdl,dali-cpu,synthetic-cpu"]
    with pytest.raises(SystemExit) as exc:
        throughput.main([*argv, *rows, *flags])
    assert exc.value.code == 2
    one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "nonsense"], "error: device 'nonsense' is not a device"),
        (["--out", "FILE"], "--out FILE is a file: give a folder for the results"),
        (["--out", "FILE/sub"], "--out FILE/sub: FILE is a file, not a folder"),
    ],
)
def test_a_bad_device_or_out_is_refused_before_the_run(
    tiny_dataset, tmp_path, capsys, flags, message
):
    file = tmp_path / "results.txt"
    file.write_text("mine\n")
    flags = [f.replace("FILE", str(file)) for f in flags]
    argv = ["--quick", "--data", str(tiny_dataset), "--out", str(tmp_path / "out")]
    assert throughput.main([*argv, "--rows", "read-only", "--modes", "loader", *flags]) == 1
    out = capsys.readouterr()
    one_error_line(out.err, message.replace("FILE", str(file)))
    assert "repeat 1/1" not in out.out  # refused before anything was measured
    assert file.read_text() == "mine\n"


@pytest.mark.slow
def test_a_batch_larger_than_the_dataset_is_refused_not_waited_for(tiny_dataset, tmp_path):
    """36 train samples make no batch of 64: every row would wait forever or fail on its own;
    a real process, stopped at 60 s if it hangs."""
    cmd = [sys.executable, str(ROOT / "benchmarks/throughput.py"), "--quick"]
    cmd += ["--data", str(tiny_dataset), "--out", str(tmp_path), "--batch-size", "64"]
    cmd += ["--rows", "read-only", "--modes", "loader"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1
    one_error_line(done.stderr, "--batch-size 64:", "36 train samples, fewer than one batch")
    assert not (tmp_path / "throughput.json").exists()


# ---------------------------------------------------------------- figures as written


def test_figures_keep_their_significant_digits_and_counts_their_number():
    assert [figure(x) for x in (0.05, 0.004, 0.0266, 10.38, 9.996, 1839.4, 0.0)] == [
        "0.0500",
        "0.00400",
        "0.0266",
        "10.4",
        "10.0",
        "1,839",
        "0",
    ]
    assert figure(0.004, 2) == "0.0040" and figure(None) == "–" and figure(math.nan) == "–"
    assert figure(None, missing="unknown") == "unknown"
    assert plural(1, "repeat") == "1 repeat" and plural(3, "repeat") == "3 repeats"
    assert plural(1, "batch", "batches") == "1 batch" and plural(0, "batch", "batches") == (
        "0 batches"
    )


def test_markdown_says_a_missing_limit_in_words_and_small_figures_in_full(tiny_dataset):
    """A run without limit rows, one repeat, a row 250x slower than torch: the report names what
    is missing and keeps the digits of every small figure."""
    from benchmarks.measure import Row, add_ratios, summarize
    from benchmarks.report import environment, markdown
    from pipeline.shards.manifest import load_manifest

    m = load_manifest(tiny_dataset)
    args = throughput.parse_args(["--quick", "--data", str(tiny_dataset), "--repeats", "1"])
    torch.set_num_threads(1)
    env = environment(args, m, CPU, 0.004)
    env["load_average_end"] = env["load_average_start"]

    def rep(s_per_batch, first, wait):
        return dict(
            s_per_batch=s_per_batch,
            first_batch_s=first,
            cpu_s_per_batch=None,
            cores_busy=None,
            wait_share=wait,
        )

    results = []
    for mode in ("loader", "train"):
        for name, s in (("torch", 0.05), ("slow", 12.5)):
            row = Row(name, f"a {name} row", "loader", ("loader", "train"), lambda e: iter(()))
            results.append(
                summarize(row, mode, [rep(s, 0.05, 0.004)], 4, m.layout("train").sample_bytes)
            )
    add_ratios(results)
    md = markdown(results, env, [])
    assert "None" not in md
    assert "## loader mode (iterate batches only; no limit row in this run, so no × limit)" in md
    assert "step per batch; no limit row in this run, so no × limit)" in md
    assert "1 warm-up + 4 timed batches per repeat, 1 repeat (median" in md
    assert "train step on 1 torch thread\n" in md
    assert "sequential read 0.00400 MB/s" in md
    # torch: 80 samples/s, 50 ms a batch, first batch 0.05 s; slow: 0.32 samples/s, × 0.004
    assert "| `torch` | 80.0 [80.0–80.0] | 30.6 | 50.0 | 0.0500 | 1.00 | – |" in md
    assert "| `slow` | 0.320 [0.320–0.320] | 0.122 | 12,500 | 0.0500 | 0.00400 | – |" in md
    assert "| `slow` | 0.0800 | 0.320 [0.320–0.320] | 0.40% | 0.00400 | – |" in md
    # without a torch row the × torch column is said to be empty too
    md = markdown([r for r in results if r["name"] != "torch"], env, [])
    assert "no limit row in this run, so no × limit; no torch row in this run, so no × torch" in md


# ---------------------------------------------------------------- resume.py


@pytest.mark.parametrize(
    ("flags", "code", "message"),
    [
        (["--data", "TYPO"], 1, "--data TYPO does not exist"),
        (["--loaders", "dali,nope"], 2, "--loaders 'dali,nope': a comma list of dali, torch"),
        (["--at", "0.5,x"], 2, "--at '0.5,x': a comma list of fractions"),
        (["--at", "1"], 2, "--at '1': each point is at least 0 and below 1"),
        (["--repeats", "0"], 2, "--repeats 0: must be at least 1"),
        (["--batch-size", "64"], 1, "36 train samples over 1 rank(s) make no whole batch of 64"),
        (["--out", "FILE"], 1, "--out FILE is a file"),
    ],
)
def test_the_resume_benchmark_refuses_bad_input_in_one_line(
    tiny_dataset, tmp_path, capsys, flags, code, message
):
    from benchmarks import resume

    typo, file = tmp_path / "typo", tmp_path / "results.txt"
    file.write_text("mine\n")
    subst = {"TYPO": str(typo), "FILE": str(file)}
    for k, v in subst.items():
        flags = [f.replace(k, v) for f in flags]
        message = message.replace(k, v)
    argv = ["--data", str(tiny_dataset), "--windows", "8", "--out", str(tmp_path / "out")]
    try:
        got = resume.main([*argv, "--repeats", "1", *flags])  # the last of a flag counts
    except SystemExit as exc:
        got = exc.code
    assert got == code
    one_error_line(capsys.readouterr().err, message)
    assert not typo.exists() and file.read_text() == "mine\n"
    assert not (tmp_path / "out").exists()


def damage(data: Path, how: str) -> list[str]:
    """Damage a copy of the tiny dataset; returns what the error names."""
    from pipeline.shards.index import sample_refs
    from pipeline.shards.manifest import load_manifest

    if how == "manifest":
        (data / "manifest.json").write_text("{not json")
        return [f"{data / 'manifest.json'} is unreadable"]
    if how == "truncated":
        (data / "train-000001.tar").write_bytes(b"")
        return [f"{data / 'train-000001.tar'}: 0 bytes, manifest says"]
    ref = sample_refs(load_manifest(data), "train")[0]
    with open(ref.tar, "r+b") as f:
        if how == "nan":  # the last value of one sample's blendshapes
            f.seek(ref.npy[0] + ref.npy[1] - 4)
            f.write(np.float32(np.nan).tobytes())
            return [str(ref.tar), ref.key, "NaN"]
        f.seek(ref.npy[0])  # "header": the npy magic of one sample overwritten
        f.write(b"\xff" * 8)
        return [str(ref.tar), ref.key, "npy header"]


@pytest.mark.parametrize(
    ("how", "row"),
    [
        ("manifest", "read-only"),
        ("truncated", "read-only"),
        ("nan", "webdataset"),
        ("nan", "spdl"),
        ("nan", "dali-cpu"),
        ("header", "webdataset"),
    ],
)
def test_a_damaged_dataset_is_one_error_line_naming_the_file_and_sample(
    copy_dataset, tmp_path, capsys, how, row
):
    if row == "spdl":
        pytest.importorskip("spdl.pipeline")
    data = copy_dataset()
    names = damage(data, how)  # (the threads row, a reference, checks no values)
    argv = ["--quick", "--data", str(data), "--out", str(tmp_path / "out"), "--workers", "2"]
    assert throughput.main([*argv, "--rows", row, "--modes", "loader"]) == 1
    one_error_line(capsys.readouterr().err, *names)
    assert not (tmp_path / "out" / "throughput.json").exists()


def test_the_resampling_table_never_rounds_a_loss_away(capsys):
    """Heights kept below 1 print below 1, and peak-time errors keep two significant digits."""
    from benchmarks import resampling

    assert resampling.main() == 0
    table = [line.split("|") for line in capsys.readouterr().out.splitlines() if line[:5].strip()]
    rows = [r for r in table if r[0].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [15, 25, 40, 60, 100]
    for _, kept, errors in rows:
        assert all(0 < float(x) < 1 for x in kept.split(" / ")), kept
        for ms in errors.split(" / "):
            digits = ms.strip().replace(".", "").lstrip("0")
            assert float(ms) > 0 and len(digits) >= 2, errors


@pytest.mark.slow
def test_the_resume_benchmark_prints_its_figures_with_their_digits(tiny_dataset, tmp_path, capsys):
    import re

    from benchmarks import resume

    argv = ["--data", str(tiny_dataset), "--out", str(tmp_path), "--loaders", "torch"]
    assert resume.main([*argv, "--at", "0.05,0.5", "--repeats", "1", "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"wrote {tmp_path / 'resume.json'}"
    got = [
        re.search(r"at +([\d.]+) % .* after ([\d.]+) s resumed.*: ([\d.]+) s$", x) for x in lines
    ]
    assert [m.group(1) for m in got[:2]] == ["5.0", "50"]  # not "5%" and "50%" alike
    for m in got[:2]:
        for s in m.group(2, 3):  # three significant digits, however short the time
            assert float(s) > 0 and len(s.replace(".", "").lstrip("0")) == 3, s


def test_without_data_the_benchmarks_own_folder_is_built_whatever_the_cwd(
    tmp_path, monkeypatch, capsys
):
    """The one folder the benchmark builds into: data/bench-quick under its repository (here a
    temp dir standing for it), also when run from elsewhere."""
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    (elsewhere / "data" / "bench-quick").mkdir(parents=True)  # not the benchmark's: left alone
    monkeypatch.setattr(throughput, "ROOT", repo)
    monkeypatch.chdir(elsewhere)
    argv = ["--quick", "--windows", "12", "--out", str(tmp_path / "out")]
    assert throughput.main([*argv, "--rows", "read-only", "--modes", "loader"]) == 0
    assert (repo / "data" / "bench-quick" / "manifest.json").is_file()
    assert list((elsewhere / "data" / "bench-quick").iterdir()) == []
    result = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert Path(result["env"]["dataset"]["dir"]) == repo / "data" / "bench-quick"
