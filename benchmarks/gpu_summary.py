"""``make gpu-check``'s summary: the figures read from each step's output, summary.json,
summary.md and results.tgz, each written whole (a kill leaves the old file or the new one)."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

MODES = ("loader", "train")  # the benchmark's, in its JSON rows
RESULTS_TGZ = "results.tgz"


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


def figures(steps: list, out: Path) -> dict:
    """Figures of every step (gpu_check's ``Step``) that passed; a figure that cannot be read
    fails its step."""
    found = {}
    for step in steps:
        if step.status == "ok" and step.name not in ("pytest-gpu", "data"):
            try:
                if step.name == "bench-plain":
                    found[step.name] = bench_figures(out / step.name)
                elif step.name == "bench-augment":  # -aug against plain: dali_vs_plain_dali
                    found[step.name] = bench_figures(out / step.name, "-aug")
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
    skipped = [s["name"] for s in steps if s["status"].startswith("skipped")]
    left = [s["name"] for s in steps if s["status"] == "not run"]
    verdict = f"**failed: {', '.join(bad)}**" if bad else "every step passed"
    verdict = "no step failed" if skipped and not bad else verdict
    verdict += f"; skipped: {', '.join(skipped)}" if skipped else ""
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


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path`` by a temp file and a rename: a kill leaves the old file or the
    new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def results_tgz(out: Path) -> bytes:
    """``out`` as a gzipped tar, the checkpoints (*.pt) and the tarball itself left out."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(out.rglob("*")):
            rel = path.relative_to(out)
            if path.is_file() and path.suffix != ".pt" and path.name != RESULTS_TGZ:
                tar.add(path, arcname=str(Path(out.name) / rel))
    return buf.getvalue()


def write_summary(out: Path, args, env: dict, steps: list, t0: float) -> dict:
    """summary.json and summary.md in ``out``; with ``--copy-to``, those and results.tgz there."""
    doc = {
        "ok": all(s.fine for s in steps),
        "wall_s": round(time.perf_counter() - t0, 1),
        "budget_s": args.budget,
        "env": env,
        "args": {k: v for k, v in vars(args).items() if k != "dry_run"},
        "figures": figures(steps, out),
        "steps": [{**asdict(s), "failed": s.failed} for s in steps],
    }
    files = {
        "summary.json": (json.dumps(doc, indent=1) + "\n").encode(),
        "summary.md": markdown(doc, out).encode(),
    }
    for name, data in files.items():
        write_atomic(out / name, data)
    if args.copy_to:  # the results first: a summary there never names a log missing there
        copy = Path(args.copy_to)
        write_atomic(copy / RESULTS_TGZ, results_tgz(out))
        if copy.resolve() != out.resolve():
            for name, data in files.items():
                write_atomic(copy / name, data)
    return doc
