"""Evaluation report: turns an evaluation record into files people read (JSON, Markdown, PNGs).

Pure rendering plus a few pure helpers; no model code. ``write_report`` writes ``report.json``
(the record as it is, for tools), ``report.md`` (tables for people) and two figures:
``mae_by_blendshape.png`` (where the error is) and, when an example window is given,
``curves.png`` (what the error looks like over time). matplotlib is imported lazily, so
importing this module stays cheap.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import sys
from pathlib import Path

import numpy as np

from core.arkit import ARKIT_NAMES, NUM_BLENDSHAPES

NO_FIGURES = "Figures skipped: matplotlib is not installed (pip install matplotlib)."

_PREFIXES = {
    "jaw": ("jaw",),
    "mouth": ("mouth", "tongue"),
    "eyes": ("eye",),
    "brows": ("brow",),
    "cheeks/nose": ("cheek", "nose"),
}
GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(n for n in ARKIT_NAMES if n.startswith(prefixes))
    for group, prefixes in _PREFIXES.items()
}
_GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}
_COLORS = {
    "jaw": "#c44e52",
    "mouth": "#dd8452",
    "eyes": "#4c72b0",
    "brows": "#55a868",
    "cheeks/nose": "#8172b3",
}
_DPI = 110


def group_mae(per_blendshape_mae: dict[str, float]) -> dict[str, float]:
    """Mean of the per-blendshape MAE over each group's names.

    Every one of the 52 names must be there: a group mean over a silent subset would mislead.
    """
    missing = [n for n in ARKIT_NAMES if n not in per_blendshape_mae]
    if missing:
        raise ValueError(f"group_mae: no MAE for {len(missing)} blendshape(s): {missing[:5]}")
    return {
        g: float(np.mean([per_blendshape_mae[n] for n in names])) for g, names in GROUPS.items()
    }


def most_active(true: np.ndarray, k: int = 6) -> list[int]:
    """Indexes (ARKit order) of the k blendshapes with the largest standard deviation of `true`
    [T, 52] over time, largest first (ties keep ARKit order): the curves worth plotting."""
    true = np.asarray(true)
    if true.ndim != 2 or true.shape[1] != NUM_BLENDSHAPES:
        raise ValueError(f"most_active: expected [T, {NUM_BLENDSHAPES}], got {true.shape}")
    std = true.astype(np.float64).std(axis=0)
    return [int(i) for i in np.argsort(-std, kind="stable")[:k]]


def _fmt(x) -> str:
    """5 significant digits for floats, ints as they are, None as n/a."""
    if x is None:
        return "n/a"
    if isinstance(x, numbers.Integral):
        return str(x)
    return f"{x:.5g}"


def _summary_lines(rec: dict) -> list[str]:
    fps, frames = rec.get("fps"), rec.get("frames")
    seconds = f" ({frames / fps:.1f} s at {fps:g} fps)" if fps and frames is not None else ""
    rows = [
        ("MSE", _fmt(rec.get("mse"))),
        ("MAE", _fmt(rec.get("mae"))),
        ("mean-predictor MSE", _fmt(rec.get("baseline_mse"))),
        ("mean-predictor MAE", _fmt(rec.get("baseline_mae"))),
        ("MSE ratio (model / mean predictor; < 1 is better)", _fmt(rec.get("mse_ratio"))),
        ("jawOpen Pearson r", _fmt(rec.get("jaw_open_pearson"))),
        ("samples", _fmt(rec.get("samples"))),
        ("frames", _fmt(frames) + seconds),
    ]
    if "step" in rec:
        rows.append(("checkpoint step", _fmt(rec["step"])))
    return ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _group_lines(rec: dict) -> list[str]:
    per = rec["per_blendshape"]
    model = rec.get("groups") or group_mae({n: per[n]["mae"] for n in ARKIT_NAMES})
    base_mae = {n: per[n].get("baseline_mae") for n in ARKIT_NAMES}
    base = group_mae(base_mae) if None not in base_mae.values() else {}
    lines = ["| group | blendshapes | MAE | mean-predictor MAE |", "|---|---|---|---|"]
    for g, names in GROUPS.items():
        lines.append(f"| {g} | {len(names)} | {_fmt(model.get(g))} | {_fmt(base.get(g))} |")
    return lines


def _worst_first(per: dict) -> list[str]:
    """Blendshape names by MAE, worst first (sorted is stable: ties keep ARKit order)."""
    return sorted(per, key=lambda n: -per[n]["mae"])


def _blendshape_lines(rec: dict) -> list[str]:
    per = rec["per_blendshape"]
    lines = [
        "| # | blendshape | group | MSE | MAE | mean-predictor MAE |",
        "|---|---|---|---|---|---|",
    ]
    for i, n in enumerate(_worst_first(per), 1):
        m = per[n]
        lines.append(
            f"| {i} | {n} | {_GROUP_OF.get(n, '?')} | {_fmt(m.get('mse'))} | "
            f"{_fmt(m.get('mae'))} | {_fmt(m.get('baseline_mae'))} |"
        )
    return lines


def _markdown(rec: dict, example: dict | None, figures: bool = True) -> str:
    title = f"# Evaluation of `{rec['checkpoint']}` on `{rec['dataset']}` ({rec['split']} split)"
    lines = [title, "", "## Summary", "", *_summary_lines(rec), ""]
    lines += ["## MAE by group", "", *_group_lines(rec), ""]
    lines += ["## Per blendshape (worst MAE first)", "", *_blendshape_lines(rec), ""]
    if rec.get("take_lags"):
        from train.take_lags import lag_lines

        lines += ["## Lag of each take", "", *lag_lines(rec["take_lags"]), ""]
    if not figures:
        return "\n".join([*lines, NO_FIGURES, ""])
    lines += ["## Figures", "", "![MAE per blendshape](mae_by_blendshape.png)", ""]
    if example is not None:
        lines += [
            f"Example: {example.get('label', '')}, the 6 most active blendshapes.",
            "",
            "![predicted vs true curves](curves.png)",
            "",
        ]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    """Save as a 64-colour palette PNG and close: antialiased lines of dense curves otherwise
    make a figure several hundred KB; the palette keeps it small at no visible cost."""
    import matplotlib.pyplot as plt
    from PIL import Image  # a dependency of matplotlib

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    plt.close(fig)
    Image.open(buf).convert("RGB").quantize(colors=64).save(path, optimize=True)


def _plot_mae(rec: dict, path: Path) -> None:
    """Sorted per-blendshape MAE as horizontal bars coloured by group; mean predictor as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    per = rec["per_blendshape"]
    names = _worst_first(per)[::-1]  # barh draws bottom-up: worst at the top
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 1.6 + 0.2 * len(names)))
    colors = [_COLORS.get(_GROUP_OF.get(n, ""), "#999999") for n in names]
    ax.barh(y, [per[n]["mae"] for n in names], color=colors, height=0.7)
    handles = [Patch(color=c, label=g) for g, c in _COLORS.items()]
    base = [(i, per[n].get("baseline_mae")) for i, n in enumerate(names)]
    base = [(i, b) for i, b in base if b is not None and math.isfinite(b)]
    if base:
        bi, bv = zip(*base, strict=True)
        handles.append(ax.scatter(bv, bi, marker="|", s=90, color="black", label="mean predictor"))
    ax.set_yticks(y, names, fontsize=7)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xlabel("MAE (blendshape weight, 0–1)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_title(f"MAE per blendshape: {rec['checkpoint']} on {rec['split']}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _plot_curves(example: dict, fps: float, path: Path) -> None:
    """Predicted vs true curves of the example's 6 most active blendshapes, 3x2 grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred, true = np.asarray(example["pred"]), np.asarray(example["true"])
    if pred.shape != true.shape:
        raise ValueError(f"example: pred {pred.shape} and true {true.shape} differ")
    t = np.arange(true.shape[0]) / fps
    fig, axes = plt.subplots(3, 2, figsize=(9, 6.3), sharex=True, sharey=True)
    for ax, i in zip(axes.flat, most_active(true, 6), strict=False):
        ax.plot(t, true[:, i], color="black", lw=1.0, label="true")
        ax.plot(t, pred[:, i], color="#dd8452", lw=1.0, label="predicted")
        mae = float(np.abs(pred[:, i] - true[:, i]).mean())
        ax.set_title(f"{ARKIT_NAMES[i]} (MAE {mae:.3f})", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("time (s)")
    for ax in axes[:, 0]:
        ax.set_ylabel("weight")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(example.get("label", "example"), fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save(fig, path)


def write_report(out_dir, rec: dict, example: dict | None) -> list[Path]:
    """Writes out_dir/report.json, out_dir/report.md and the PNGs (curves.png only with an
    example, mae_by_blendshape.png always); returns the paths written. Creates out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "mae_by_blendshape.png"]
    try:
        import matplotlib  # noqa: F401 - a dependency; a bare GPU image may still lack it
    except ImportError:  # the numbers still matter more than the pictures: say so, go on
        print(f"{out}: {NO_FIGURES}", file=sys.stderr)
        paths[1].write_text(_markdown(rec, example, figures=False))
        paths[0].write_text(json.dumps(_finite(rec), indent=2) + "\n")
        return paths[:2]
    _plot_mae(rec, paths[2])
    if example is not None:
        fps = float(example.get("fps") or rec.get("fps") or 30.0)
        _plot_curves(example, fps, out / "curves.png")
        paths.append(out / "curves.png")
    # last, so report.md never links a figure that failed to render; NaN (a diverged model)
    # is written as null, which JSON readers accept
    paths[1].write_text(_markdown(rec, example))
    paths[0].write_text(json.dumps(_finite(rec), indent=2) + "\n")
    return paths


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x
