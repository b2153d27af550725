"""train.report: the groups, the pure helpers and the files write_report renders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.arkit import ARKIT_NAMES
from train.report import GROUPS, group_mae, most_active, write_report

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_rec(baseline: bool = True) -> dict:
    """A record like the evaluator's: per-blendshape MAE = 0.001 * (ARKit index + 1), except
    jawOpen, the worst at 0.09; the mean predictor doubles every error (or is None)."""
    per = {}
    for i, name in enumerate(ARKIT_NAMES):
        mae = 0.09 if name == "jawOpen" else 0.001 * (i + 1)
        per[name] = {
            "mse": mae * mae * 1.5,
            "mae": mae,
            "baseline_mse": mae * mae * 6.0 if baseline else None,
            "baseline_mae": mae * 2.0 if baseline else None,
        }
    return {
        "checkpoint": "runs/demo/best.pt",
        "dataset": "data/demo",
        "split": "val",
        "samples": 24,
        "frames": 7200,
        "fps": 30.0,
        "mse": 0.00084,
        "mae": 0.012,
        "baseline_mse": 0.0031 if baseline else None,
        "baseline_mae": 0.03 if baseline else None,
        "mse_ratio": 0.00084 / 0.0031 if baseline else None,
        "per_blendshape": per,
        "groups": group_mae({n: m["mae"] for n, m in per.items()}),
        "jaw_open_pearson": 0.93 if baseline else None,
        "step": 240,
    }


def make_example(frames: int = 150) -> dict:
    """A 5 s window: sines in [0, 1] on a few channels, the prediction a damped, lagged copy."""
    t = np.arange(frames, dtype=np.float32) / 30.0
    true = np.zeros((frames, len(ARKIT_NAMES)), np.float32)
    for k, name in enumerate(["jawOpen", "mouthClose", "eyeBlinkLeft", "browInnerUp", "cheekPuff"]):
        true[:, ARKIT_NAMES.index(name)] = 0.5 + 0.4 * np.sin(2 * np.pi * (0.5 + 0.3 * k) * t)
    pred = (0.8 * np.roll(true, 3, axis=0) + 0.05).astype(np.float32)
    return {"pred": pred, "true": true, "fps": 30.0, "label": "val window 3 (shard-000002 s17)"}


def assert_png(path: Path, wide: bool) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert 10_000 < len(data) < 300_000, len(data)
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    h, w = img.shape[:2]
    assert min(h, w) >= 400
    assert (w > h) == wide, img.shape


def test_groups_cover_all_52_names_exactly_once():
    flat = [n for names in GROUPS.values() for n in names]
    assert len(flat) == 52 and sorted(flat) == sorted(ARKIT_NAMES)
    assert set(GROUPS) == {"jaw", "mouth", "eyes", "brows", "cheeks/nose"}
    assert "tongueOut" in GROUPS["mouth"] and "jawOpen" in GROUPS["jaw"]
    assert set(GROUPS["cheeks/nose"]) == {
        "cheekPuff",
        "cheekSquintLeft",
        "cheekSquintRight",
        "noseSneerLeft",
        "noseSneerRight",
    }
    assert len(GROUPS["eyes"]) == 14 and len(GROUPS["brows"]) == 5


def test_group_mae_against_hand_computed_means():
    # MAE = ARKit index + 1: eyes 1..14, jaw 15..18, mouth 19..41 and tongueOut 52,
    # brows 42..46, cheeks/nose 47..51
    got = group_mae({n: float(i + 1) for i, n in enumerate(ARKIT_NAMES)})
    assert got == pytest.approx(
        {"eyes": 7.5, "jaw": 16.5, "mouth": (690 + 52) / 24, "brows": 44.0, "cheeks/nose": 49.0}
    )


def test_group_mae_refuses_missing_names():
    with pytest.raises(ValueError, match="jawOpen"):
        group_mae({n: 0.1 for n in ARKIT_NAMES if n != "jawOpen"})


def test_most_active_orders_by_std_over_time():
    true = np.zeros((200, 52), np.float32)
    square = np.where(np.arange(200) % 2 == 0, 1.0, -1.0)  # std 1 exactly
    amplitudes = {17: 0.4, 3: 0.3, 40: 0.25, 51: 0.2, 0: 0.1, 10: 0.1, 30: 0.05}
    for i, a in amplitudes.items():
        true[:, i] = 0.5 + a * square
    true[:, 20] = 0.9  # high but constant: std 0, never active
    assert most_active(true) == [17, 3, 40, 51, 0, 10]  # 0 and 10 tie: ARKit order
    assert most_active(true, k=2) == [17, 3]
    assert most_active(true, k=7)[-1] == 30
    with pytest.raises(ValueError):
        most_active(np.zeros((10, 51)))


def test_write_report_files(tmp_path):
    rec, example = make_rec(), make_example()
    out = tmp_path / "new" / "report"  # created, parents too
    paths = write_report(out, rec, example)
    names = ["report.json", "report.md", "mae_by_blendshape.png", "curves.png"]
    assert sorted(p.name for p in paths) == sorted(names)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)

    assert json.loads((out / "report.json").read_text()) == rec

    md = (out / "report.md").read_text()
    title = md.splitlines()[0]
    assert title.startswith("# ") and "runs/demo/best.pt" in title and "data/demo" in title
    assert "val" in title
    assert "| MSE | 0.00084 |" in md
    assert "| jawOpen Pearson r | 0.93 |" in md
    assert "n/a" not in md
    for name in ARKIT_NAMES:
        assert f"| {name} |" in md, name
    # worst first: jawOpen (0.09), then tongueOut (0.052), ..., eyeBlinkLeft (0.001) last
    assert md.index("| jawOpen |") < md.index("| tongueOut |") < md.index("| eyeBlinkLeft |")
    assert "| 1 | jawOpen |" in md and "| 52 | eyeBlinkLeft |" in md
    assert "](curves.png)" in md and "](mae_by_blendshape.png)" in md
    assert example["label"] in md

    assert_png(out / "mae_by_blendshape.png", wide=False)  # tall: 52 readable names
    assert_png(out / "curves.png", wide=True)


def test_write_report_without_example_skips_curves(tmp_path):
    paths = write_report(tmp_path, make_rec(), None)
    assert not (tmp_path / "curves.png").exists()
    assert "curves.png" not in [p.name for p in paths]
    md = (tmp_path / "report.md").read_text()
    assert "curves.png" not in md and "](mae_by_blendshape.png)" in md
    assert_png(tmp_path / "mae_by_blendshape.png", wide=False)


def test_write_report_without_baseline_says_na(tmp_path):
    rec = make_rec(baseline=False)
    write_report(tmp_path, rec, make_example())
    assert json.loads((tmp_path / "report.json").read_text()) == rec
    md = (tmp_path / "report.md").read_text()
    assert "| mean-predictor MSE | n/a |" in md
    assert "| mean-predictor MAE | n/a |" in md
    assert "| jawOpen Pearson r | n/a |" in md
    assert "| 1 | jawOpen | jaw | 0.01215 | 0.09 | n/a |" in md
    assert_png(tmp_path / "mae_by_blendshape.png", wide=False)


@pytest.mark.slow
def test_import_is_cheap():
    """Importing train.report must not pull in matplotlib (only write_report does)."""
    code = "import sys, train.report; print('matplotlib' in sys.modules)"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert res.stdout.strip() == "False"


def test_without_matplotlib_the_numbers_are_still_written(tmp_path, monkeypatch, capsys):
    """A machine without matplotlib (a bare GPU image) gets report.md and report.json, and is
    told why there are no figures, instead of losing the report at the end of a run."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    rec = make_rec()
    paths = write_report(tmp_path / "r", rec, make_example())
    assert [p.name for p in paths] == ["report.json", "report.md"]
    assert json.loads((tmp_path / "r" / "report.json").read_text()) == rec
    md = (tmp_path / "r" / "report.md").read_text()
    assert "matplotlib is not installed" in md and ".png" not in md
    assert not list((tmp_path / "r").glob("*.png"))
    assert "matplotlib is not installed" in capsys.readouterr().err
