"""How well make_shards measures each take's audio-to-mouth lag, and what measuring costs.

    python benchmarks/sync.py --takes 60 --seconds 60 --out benchmarks/conversion-speed

1. The estimate (``pipeline.convert.sync.estimate_lag``) on synthetic takes shifted by known
   offsets (0, +-33, +-67, +-100, +-200, +-300 ms, the audio padded back to its length): its
   error, max and median.
2. A corpus of Live Link takes as a user has them (44.1 kHz stereo WAV + 60 fps CSV): two
   thirds clean, a third shifted by one of those offsets (but +-33 ms, under the threshold);
   make_shards with its defaults: clean takes rejected (false rejects), shifted takes caught.
3. Conversion speed on that corpus with the estimate and with it replaced by "unknown" (the
   same run otherwise), alternating, ``--repeats`` each: hours of audio per minute of the
   fastest run of each (the machine may be shared).

Writes ``<out>/sync.json`` (every figure, with the command and the machine) and
``<out>/sync.svg`` (the histogram make_shards wrote for the corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from pipeline import make_shards
from pipeline.convert import inputs, synthetic
from pipeline.convert.livelink import write_live_link_csv
from pipeline.convert.sync import Lag, estimate_lag
from pipeline.convert.windows import resample_frames

RATE, FPS = 16000, 30
OFFSETS = (0.033, -0.033, 0.067, -0.067, 0.1, -0.1, 0.2, -0.2, 0.3, -0.3)
CAUGHT = tuple(s for s in OFFSETS if abs(s) > 0.05)  # the shifts of the corpus' bad takes


def shifted(audio: np.ndarray, seconds: float, seed: int) -> np.ndarray:
    """``audio`` moved ``seconds`` later (earlier if negative), padded with room noise."""
    k = int(round(seconds * RATE))
    pad = (0.003 * np.random.default_rng([seed, 5]).standard_normal(abs(k))).astype(np.float32)
    if k >= 0:
        return np.concatenate([pad, audio[: len(audio) - k]])
    return np.concatenate([audio[-k:], pad])


def estimate_errors(takes: int, seconds: float) -> dict:
    errors, unknown, spent = [], 0, 0.0
    for i in range(takes):
        audio, times, values = synthetic.make_take(1, i, seconds)
        frames = resample_frames(times, values, FPS, int(seconds * FPS))
        for s in (0.0, *OFFSETS):
            a = shifted(audio, s, i)
            t0 = time.process_time()
            lag = estimate_lag(a, RATE, frames, FPS)
            spent += time.process_time() - t0
            if lag.lag is None:
                unknown += 1
            else:
                errors.append(abs(lag.lag - s))
    e = np.array(errors) * 1000
    return {
        "estimates": len(errors) + unknown,
        "unknown": unknown,
        "max_abs_error_ms": round(float(e.max()), 2),
        "median_abs_error_ms": round(float(np.median(e)), 2),
        "p95_abs_error_ms": round(float(np.percentile(e, 95)), 2),
        # CPU time of the estimate alone, per hour of audio measured
        "cpu_seconds_per_hour": round(spent / (takes * (1 + len(OFFSETS)) * seconds / 3600), 2),
    }


def corpus_shift(i: int) -> float:
    """Take ``i``'s shift: every third take is shifted by one of ``CAUGHT``."""
    return CAUGHT[(i // 3) % len(CAUGHT)] if i % 3 == 2 else 0.0


def write_take(job: tuple[Path, int, float]) -> None:
    import soundfile as sf
    import soxr

    folder, i, seconds = job
    audio, times, values = synthetic.make_take(2, i, seconds)
    a = soxr.resample(shifted(audio, corpus_shift(i), i), RATE, 44100)
    sf.write(str(folder / f"take{i:03d}.wav"), np.stack([a, a], 1), 44100, subtype="PCM_16")
    write_live_link_csv(folder / f"take{i:03d}.csv", values, 60)


def convert(src: Path, out: Path, estimate: bool) -> float:
    """Seconds make_shards takes on ``src`` (its defaults), with the estimate or without."""
    real = inputs.estimate_lag
    if not estimate:
        inputs.estimate_lag = lambda *a, **k: Lag(None, unknown="not measured")
    try:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        assert make_shards.main(["--input", str(src), "--out", str(out), "--quiet"]) == 0
        return time.perf_counter() - t0
    finally:
        inputs.estimate_lag = real


def catches(out: Path, takes: int) -> dict:
    lines = [json.loads(x) for x in (out / "sync.jsonl").read_text().splitlines()]
    by = {Path(d["file"]).stem: d for d in lines}
    clean = [by[f"take{i:03d}"] for i in range(takes) if corpus_shift(i) == 0]
    bad = [(by[f"take{i:03d}"], corpus_shift(i)) for i in range(takes) if corpus_shift(i)]
    errs = [abs(d["lag"] - s) * 1000 for d, s in [(d, 0.0) for d in clean] + bad if d["lag"]]
    return {
        "clean_takes": len(clean),
        "clean_rejected": sum(d["action"] == "rejected" for d in clean),
        "clean_unknown": sum(d["action"] == "unknown" for d in clean),
        "shifted_takes": len(bad),
        "shifted_rejected": sum(d["action"] == "rejected" for d, _ in bad),
        "max_abs_error_ms": round(max(errs), 2),
        "median_abs_error_ms": round(float(np.median(errs)), 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--takes", type=int, default=60, help="takes in the corpus")
    p.add_argument("--seconds", type=float, default=60.0, help="each take's length")
    p.add_argument("--grid-takes", type=int, default=40, help="takes of the estimate's grid")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/conversion-speed")
    args = p.parse_args(argv)
    result = {
        "command": "python benchmarks/sync.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"no GPU, Python {platform.python_version()}",
        "estimate": estimate_errors(args.grid_takes, 10.0),
    }
    print(json.dumps(result["estimate"]))
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in", Path(tmp) / "out"
        src.mkdir()
        with Pool(os.cpu_count()) as pool:
            pool.map(write_take, [(src, i, args.seconds) for i in range(args.takes)])
        hours = args.takes * args.seconds / 3600
        times = {"with": [], "without": []}
        for r in range(args.repeats):  # alternating which goes first
            for key in ("with", "without") if r % 2 == 0 else ("without", "with"):
                times[key].append(convert(src, out, key == "with"))
        convert(src, out, True)
        result["corpus"] = {"takes": args.takes, "seconds": args.seconds, "hours": hours}
        result["corpus"].update(catches(out, args.takes))
        shutil.copy(out / "sync.svg", Path(args.out) / "sync.svg")
    result["speed"] = {
        key: {
            "seconds": [round(t, 2) for t in ts],
            "hours_per_minute": round(hours / (min(ts) / 60), 2),
        }
        for key, ts in times.items()
    }
    text = json.dumps(result, indent=1)
    print(text)
    (Path(args.out) / "sync.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
