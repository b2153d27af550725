"""Reporting: the machine and run (``environment``), the markdown table, the PNG plot, and the
three files a run leaves in ``--out``: throughput.json, throughput.md, throughput.png.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks.figures import figure, plural
from benchmarks.measure import MIN_CPU_WINDOW_S, MODES
from core.errors import RunError
from pipeline.shards.manifest import Manifest


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except Exception:  # absent or broken: report as unknown
        return None


def environment(args, m: Manifest, device: torch.device, seq_mb_s: float) -> dict:
    """The machine, versions, dataset and settings of a run, recorded with its results."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    import nvidia.dali

    train_shards = m.split_shards("train")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(["benchmarks/throughput.py", *args.argv]),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        # the train mode's model: --mel compares audio and log-mel on the sequence model
        "train_model": "SequenceModel" if getattr(args, "mel", False) else "SimplifiedModel",
        "load_average_start": list(os.getloadavg()),
        "versions": {
            "python": platform.python_version(),
            "torch": version("torch"),
            "dali": nvidia.dali.__version__,
            "numpy": version("numpy"),
            "webdataset": version("webdataset"),
            "spdl": version("spdl"),
        },
        "dataset": {
            "dir": str(m.root.resolve() if isinstance(m.root, Path) else m.root),
            "train_samples": m.num_samples("train"),
            "train_shards": len(train_shards),
            "train_bytes": sum(s.bytes for s in train_shards),
            "sample_bytes": m.layout("train").sample_bytes,
            "hours": m.hours,
            "sequential_read_mb_per_s": seq_mb_s,  # unrounded: a slow read is not 0
        },
        "config": {k: v for k, v in vars(args).items() if k not in ("argv",)},
    }


def _ratios_said(rows: list[dict]) -> str:
    """The end of a mode's heading: what × limit and × torch are taken against, or that the
    run has no such row (the column is then '–')."""
    limit = rows[0]["limit"]
    said = [f"× limit is to `{limit}`" if limit else "no limit row in this run, so no × limit"]
    if not any(r["name"] == "torch" for r in rows):
        said.append("no torch row in this run, so no × torch")
    return "; ".join(said)


def markdown(results: list[dict], env: dict, notes: list[str]) -> str:
    """The results as markdown: the setup, then one table per mode."""
    d, c = env["dataset"], env["config"]
    lines = [
        "# Loader throughput: DALI vs the DataLoader baseline vs the limits",
        "",
        f"- machine: {env['cpu_model']}, {plural(env['cpus_usable'], 'CPU')} usable, "
        f"{env['memory_gib']} GiB, GPU: {env['gpu'] or 'none'}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- data: {d['dir']} ({plural(d['train_samples'], 'train sample')} in "
        f"{plural(d['train_shards'], 'shard')}, "
        f"{figure(d['train_bytes'] / 1e6)} MB; {d['sample_bytes']:,} B of wav+npy per sample; "
        f"sequential read {figure(d['sequential_read_mb_per_s'])} MB/s)",
        f"- batch {c['batch_size']}, {c['warmup']} warm-up + "
        f"{plural(c['batches'], 'timed batch', 'timed batches')} per repeat, "
        f"{plural(c['repeats'], 'repeat')} (median [min–max]); train step on "
        f"{plural(env['torch_threads'], 'torch thread')}",
        f"- load average (1, 5, 15 min) at start "
        f"{', '.join(f'{x:.1f}' for x in env['load_average_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in env.get('load_average_end', []))}",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        "",
        "samples/s counts 10 s windows; MB/s = samples/s × the wav+npy member bytes "
        "(MB = 10⁶ B); "
        "× torch and × limit are ratios of samples/s within a mode; CPU ms/sample is the CPU "
        "time of this process and its workers per sample, cores busy that CPU time over wall "
        "time; data wait is the share of train time spent blocked in `next()`.",
        "",
    ]
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue
        if mode == "loader":
            lines += [
                f"## loader mode (iterate batches only; {_ratios_said(rows)})",
                "",
                "| row | samples/s (median [min–max]) | MB/s | ms/batch | first batch s "
                "| × torch | × limit | CPU ms/sample | cores busy | what |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
        else:
            lines += [
                f"## train mode ({env.get('train_model', 'SimplifiedModel')} step per batch; "
                f"{_ratios_said(rows)})",
                "",
                "| row | steps/s | samples/s (median [min–max]) | data wait | × torch "
                "| × limit | CPU ms/sample | cores busy | what |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
        for r in rows:
            lo, hi = figure(r["samples_per_s_min"]), figure(r["samples_per_s_max"])
            sps = f"{figure(r['samples_per_s'])} [{lo}–{hi}]"
            if mode == "loader":
                lines.append(
                    f"| `{r['name']}` | {sps} | {figure(r['mb_per_s'])} | "
                    f"{figure(1000 * r['median_s_per_batch'])} | {figure(r['first_batch_s'])} | "
                    f"{figure(r['ratio_to_torch'])} | {figure(r['ratio_to_limit'])} | "
                    f"{figure(r['cpu_ms_per_sample'])} | {figure(r['cores_busy'])} | "
                    f"{r['what']} |"
                )
            else:
                lines.append(
                    f"| `{r['name']}` | {figure(r['steps_per_s'])} | {sps} | "
                    f"{figure(100 * r['wait_share'], 2)}% | {figure(r['ratio_to_torch'])} | "
                    f"{figure(r['ratio_to_limit'])} | {figure(r['cpu_ms_per_sample'])} | "
                    f"{figure(r['cores_busy'])} | {r['what']} |"
                )
        lines.append("")
    if notes:
        lines += ["## notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def plot(results: list[dict], path: Path, env: dict) -> None:
    """samples/s per row as horizontal bars, one panel per mode, limits in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    fig, axes = plt.subplots(len(modes), 1, figsize=(8, 1.2 + 0.45 * len(results)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        rows = [r for r in results if r["mode"] == mode][::-1]
        y = np.arange(len(rows))
        med = np.array([r["samples_per_s"] for r in rows])
        err = np.array(
            [
                [r["samples_per_s"] - r["samples_per_s_min"] for r in rows],
                [r["samples_per_s_max"] - r["samples_per_s"] for r in rows],
            ]
        )
        colors = [
            "#bbbbbb"
            if r["kind"] == "limit"
            else "#76b900"
            if r["name"].startswith("dali")
            else "#4c72b0"
            for r in rows
        ]
        ax.barh(y, med, xerr=err, color=colors, capsize=3)
        ax.set_yticks(y, [r["name"] for r in rows])
        for yi, r in zip(y, rows, strict=True):  # the label starts past the whisker
            ratio = f"  ×{figure(r['ratio_to_torch'], 2)} torch" if r["ratio_to_torch"] else ""
            ax.text(
                r["samples_per_s_max"],
                yi,
                f"  {figure(r['samples_per_s'])}{ratio}",
                va="center",
                fontsize=8,
            )
        top = max(r["samples_per_s_max"] for r in rows)
        if med.max() / max(med.min(), 1e-9) > 30:
            ax.set_xscale("log")
        ax.set_xlim(right=top * (3 if ax.get_xscale() == "log" else 1.4))
        ax.set_xlabel("samples/s (median, whiskers min–max; grey = limits)")
        ax.set_title(f"{mode} mode", fontsize=10)
    fig.suptitle(
        f"{env['cpu_model']} ×{plural(env['cpus_usable'], 'CPU')}, GPU: {env['gpu'] or 'none'}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- notes and files


def closing_notes(args, names: list[str], results: list[dict], device: torch.device) -> list[str]:
    """What a reader of the tables needs to know about this machine and run."""
    notes = []
    if device.type != "cuda" and {"dali-raw", "read-only", "synthetic-cpu"} & set(names):
        notes.append(
            'no CUDA: dali-raw is the decode="gpu" graph run on DALI\'s CPU '
            "operators; the limit is read-only for loader mode and synthetic-cpu for "
            "train mode"
        )
    if (os.cpu_count() or 1) < args.workers and {"torch", "webdataset"} & set(names):
        notes.append(
            f"torch and webdataset run {args.workers} workers on "
            f"{plural(os.cpu_count() or 1, 'CPU')} (the baseline's setting), so they share the "
            "cores with the main process"
        )
    if any(r["cpu_ms_per_sample"] is None for r in results):
        notes.append(
            "CPU ms/sample and cores busy are left out ('–') where the timed batches "
            f"took under {MIN_CPU_WINDOW_S} s in every repeat: too short to measure"
        )
    return notes


def check_out(out: Path) -> None:
    """Refuse an ``--out`` the results cannot be written to, before a run that would be lost."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file: give a folder for the results")
    base = out.absolute()
    while not base.exists():  # the folder that would hold the new ones
        base = base.parent
    if not base.is_dir():
        raise RunError(f"--out {out}: {base} is a file, not a folder; give a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunError(f"--out {out}: {base} cannot be written; give a folder you can write")


def write_reports(out: Path, results: list[dict], env: dict, notes: list[str]) -> list[Path]:
    """throughput.json, .md and .png in ``out`` (created if absent); returns their paths. Other
    files in ``out`` stay; a folder that cannot be written is a ``RunError``."""
    try:
        return _write_reports(out, results, env, notes)
    except OSError as exc:
        raise RunError(
            f"cannot write the results to {out}: {exc.strerror or exc}"
            f"{f' ({exc.filename})' if exc.filename and str(exc.filename) != str(out) else ''}; "
            "give --out a folder you can write"
        ) from None


def _write_reports(out: Path, results: list[dict], env: dict, notes: list[str]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "throughput.json", out / "throughput.md", out / "throughput.png"]
    doc = {"rows": results, "env": env, "notes": notes}
    paths[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    try:
        import matplotlib  # noqa: F401 - a dependency; a bare GPU image may still lack it
    except ImportError:
        notes = [*notes, "no plot: matplotlib is not installed"]
        paths[1].write_text(markdown(results, env, notes))
        return paths[:2]
    paths[1].write_text(markdown(results, env, notes))
    plot(results, paths[2], env)
    return paths
