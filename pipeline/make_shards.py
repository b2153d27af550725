"""Turn recordings (or the synthetic corpus) into validated WebDataset shards, once.

    python pipeline/make_shards.py --synthetic 400 --out data/synth
    python pipeline/make_shards.py --input takes/ --out data/mine --val-fraction 0.1
    python pipeline/make_shards.py --verify data/mine

Inputs are paired by file stem: audio (.wav/.flac, any rate, channels, sample format) with a
Live Link Face CSV or a ``[T, 52]`` .npy. Every input that cannot be used becomes a line in
``rejects.jsonl``; the rest are still converted. Windows are pre-shuffled across each split,
shards and their DALI indexes are written under temporary names and renamed, and
``manifest.json`` is written last, so an interrupted run never looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import arkit, audio, synthetic  # noqa: E402
from pipeline import shard_format as fmt
from pipeline.windows import TakeError, cut_take  # noqa: E402

AUDIO_EXTS = (".wav", ".flac")
ANIM_EXTS = (".csv", ".npy")


# ---------------------------------------------------------------- jobs (one per recording)


@dataclass(frozen=True)
class Job:
    order: int  # position in the sorted input list: makes the output independent of timing
    source: str  # file path, or "synthetic:<i>"
    audio: str | None = None
    anim: str | None = None


@dataclass(frozen=True)
class Settings:
    seed: int
    window_seconds: float
    stride_seconds: float | None
    tolerance_seconds: float
    csv_fps: float
    npy_fps: float
    npy_order: str


def load_take(job: Job, s: Settings):
    """(audio16k, times, values) of one recording; raises a ValueError subclass on bad input."""
    if job.source.startswith("synthetic:"):
        a, times, values = synthetic.make_take(s.seed, job.order, s.window_seconds)
        return a, times, values
    a = audio.read_audio(job.audio)
    if job.anim.lower().endswith(".csv"):
        times, values = arkit.read_live_link_csv(job.anim, fps=s.csv_fps)
    else:
        try:
            raw = np.load(job.anim, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise arkit.AnimationError(f"unreadable npy: {exc}") from None
        if raw.ndim != 2 or raw.shape[1] != arkit.NUM_BLENDSHAPES:
            raise arkit.AnimationError(f"npy has shape {raw.shape}, expected [T, 52]")
        if not np.isfinite(raw).all():
            raise arkit.AnimationError("npy contains NaN or inf")
        values = arkit.to_canonical(raw.astype(np.float32), s.npy_order)
        times = np.arange(len(values)) / s.npy_fps
    return a, times, values


def process(args: tuple[Job, Settings]):
    """Worker: one recording -> ("ok", job, windows, seconds) or ("reject", job, reason)."""
    job, s = args
    try:
        a, times, values = load_take(job, s)
        windows = cut_take(
            a,
            audio.SAMPLE_RATE,
            times,
            values,
            fps=fmt.FPS,
            window_seconds=s.window_seconds,
            stride_seconds=s.stride_seconds,
            tolerance_seconds=s.tolerance_seconds,
        )
    except (audio.AudioError, arkit.AnimationError, TakeError) as exc:
        return "reject", job, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file never stops the rest
        return "reject", job, f"{type(exc).__name__}: {exc}"
    out = [
        (
            w.index,
            w.start_sample,
            audio.canonical_wav_bytes(audio.to_pcm16(w.audio)),
            fmt.npy_bytes(w.arkit),
        )
        for w in windows
    ]
    return "ok", job, out, len(a) / audio.SAMPLE_RATE


def find_inputs(root: Path) -> tuple[list[Job], list[dict]]:
    """Pair audio and animation files by stem (same folder). Unpaired files are rejects."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    by_stem: dict[Path, dict[str, Path]] = {}
    for p in files:
        ext = p.suffix.lower()
        kind = "audio" if ext in AUDIO_EXTS else "anim" if ext in ANIM_EXTS else None
        if kind is None:
            continue
        slot = by_stem.setdefault(p.with_suffix(""), {})
        if kind in slot:
            slot.setdefault("dup", []).append(p)  # type: ignore[union-attr]
        else:
            slot[kind] = p
    jobs, rejects = [], []
    for _stem, slot in sorted(by_stem.items()):
        for extra in slot.get("dup", []):  # type: ignore[union-attr]
            rejects.append({"file": str(extra), "reason": "second file with the same stem"})
        if "audio" in slot and "anim" in slot:
            jobs.append(Job(len(jobs), str(slot["audio"]), str(slot["audio"]), str(slot["anim"])))
        elif "audio" in slot:
            rejects.append(
                {
                    "file": str(slot["audio"]),
                    "reason": "audio has no animation file (.csv or .npy with the same stem)",
                }
            )
        else:
            rejects.append(
                {
                    "file": str(slot["anim"]),
                    "reason": "animation has no audio file (.wav or .flac with the same stem)",
                }
            )
    return jobs, rejects


def split_of(jobs: list[Job], val_fraction: float, seed: int) -> dict[int, str]:
    """Recording -> split, by whole recordings so no window of a take leaks across splits."""
    n = len(jobs)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng([seed, 1]).permutation(n)
    val = set(perm[:n_val].tolist())
    return {j.order: ("val" if i in val else "train") for i, j in enumerate(jobs)}


# ---------------------------------------------------------------- writing


def safe_key(text: str) -> str:
    """Keys may not contain dots (the extension starts at the first dot) or slashes."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:40] or "x"


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uname = info.gname = ""
    header_at = tf.offset
    tf.addfile(info, io.BytesIO(data))
    return header_at + tarfile.BLOCKSIZE, len(data)


def write_shard(path: Path, samples: list[tuple[str, list[tuple[str, bytes]]]]) -> dict:
    """Write one tar of ``(key, [(ext, bytes), ...])`` samples and its DALI index under
    temporary names, then rename both."""
    tmp_tar, tmp_idx = path.with_suffix(".tar.tmp"), path.with_suffix(".idx.tmp")
    index = []
    with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples:
            comps = []
            for ext, data in members:
                name = f"{key}.{ext}"
                off, size = _add(tf, name, data)
                comps.append((ext, off, size, name))
            index.append(comps)
    tmp_idx.write_text(fmt.index_text(index))
    digest = hashlib.sha256()
    with open(tmp_tar, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    os.replace(tmp_idx, path.with_suffix(".idx"))
    os.replace(tmp_tar, path)
    return {
        "name": path.name,
        "samples": len(samples),
        "bytes": path.stat().st_size,
        "sha256": digest.hexdigest(),
    }


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"error: {out} is not empty; pass --overwrite to replace it")
        # the manifest goes first: from here on the directory no longer looks complete
        (out / "manifest.json").unlink(missing_ok=True)
        for p in out.iterdir():
            if p.is_file() and (
                p.suffix in (".tar", ".idx", ".tmp", ".jsonl") or p.name.startswith(".spool")
            ):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def make_dataset(args: argparse.Namespace) -> int:
    out = Path(args.out)
    prepare_out(out, args.overwrite)
    settings = Settings(
        args.seed,
        args.window_seconds,
        args.stride_seconds,
        args.tolerance_seconds,
        args.csv_fps,
        args.npy_fps,
        args.npy_order,
    )
    if args.synthetic:
        jobs = [Job(i, f"synthetic:{i}") for i in range(args.synthetic)]
        rejects: list[dict] = []
    else:
        jobs, rejects = find_inputs(Path(args.input))

    # Workers return windows; the main process spools their bytes to one temp file so memory
    # stays flat, then writes shards in a seeded global order independent of worker timing.
    spool_path = out / f".spool-{os.getpid()}"
    frames = int(round(args.window_seconds * fmt.FPS))  # frames per window: the npy data size
    entries: list[tuple] = []  # (recording order, window, key, spool offset, sizes...)
    hours_in = 0.0
    from tqdm import tqdm

    t0 = time.perf_counter()
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with open(spool_path, "wb") as spool, ctx.Pool(max(1, args.workers)) as pool:
        bar = tqdm(total=len(jobs), unit="file", desc="converting", disable=args.quiet)
        for res in pool.imap_unordered(process, [(j, settings) for j in jobs], chunksize=1):
            bar.update(1)
            if res[0] == "reject":
                _, job, reason = res
                rejects.append({"file": job.source, "reason": reason})
                continue
            _, job, windows, seconds = res
            hours_in += seconds / 3600
            bar.set_postfix(hours=f"{hours_in:.2f}", rejects=len(rejects))
            stem = safe_key(Path(job.source).stem if job.audio else job.source)
            for w, start, wav, npy in windows:
                meta = json.dumps(
                    {
                        "source": job.source,
                        "animation": job.anim,
                        "window": w,
                        "start_seconds": start / audio.SAMPLE_RATE,
                    }
                ).encode()
                pos = spool.tell()
                spool.write(wav + npy + meta)
                key = f"{job.order:06d}_{stem}_{w:04d}"
                entries.append((job.order, w, key, pos, len(wav), len(npy), len(meta)))
        bar.close()

    # split by whole recording, among those that gave windows (a rejected take is no val set)
    used = {e[0] for e in entries}
    splits = split_of([j for j in jobs if j.order in used], args.val_fraction, args.seed)
    by_split = {s: sorted(e for e in entries if splits[e[0]] == s) for s in fmt.SPLITS}
    stats = {"frame_sum": np.zeros(52), "frames": 0, "first_sum": np.zeros(52), "firsts": 0}
    shards = []
    try:
        data = np.memmap(spool_path, mode="r") if spool_path.stat().st_size else b""
        for split in fmt.SPLITS:
            items = by_split[split]
            order = np.random.default_rng([args.seed, 2, fmt.SPLITS.index(split)]).permutation(
                len(items)
            )
            items = [items[i] for i in order]
            for k in range(0, len(items), args.samples_per_shard):
                chunk = []
                for _, _, key, pos, lw, ln, lm in items[k : k + args.samples_per_shard]:
                    blob = bytes(data[pos : pos + lw + ln + lm])
                    npy = blob[lw : lw + ln]
                    meta = json.dumps({**json.loads(blob[lw + ln :]), "split": split}).encode()
                    chunk.append(
                        (key, [(fmt.WAV_EXT, blob[:lw]), (fmt.NPY_EXT, npy), (fmt.JSON_EXT, meta)])
                    )
                    if split == "train":  # the mean predictor's values, for the trainer
                        a = np.frombuffer(npy, "<f4", offset=ln - 4 * frames * 52).reshape(-1, 52)
                        stats["frame_sum"] += a.sum(0, dtype=np.float64)
                        stats["frames"] += len(a)
                        stats["first_sum"] += a[0]
                        stats["firsts"] += 1
                path = out / f"{split}-{k // args.samples_per_shard:06d}.tar"
                shards.append({"split": split, **write_shard(path, chunk)})
        del data
    finally:
        spool_path.unlink(missing_ok=True)

    atomic_write_text(out / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
    counts = {s: len(by_split[s]) for s in fmt.SPLITS}
    total = counts["train"] + counts["val"]
    if total == 0:
        print(
            f"error: no usable windows ({len(rejects)} rejects, see {out / 'rejects.jsonl'})",
            file=sys.stderr,
        )
        return 1
    if args.strict and rejects:
        print(
            f"error: --strict and {len(rejects)} inputs were rejected "
            f"(see {out / 'rejects.jsonl'}); no manifest written",
            file=sys.stderr,
        )
        return 1
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "sample_rate": audio.SAMPLE_RATE,
        "clip_samples": int(round(args.window_seconds * audio.SAMPLE_RATE)),
        "fps": fmt.FPS,
        "frames": int(round(args.window_seconds * fmt.FPS)),
        "names": list(arkit.ARKIT_NAMES),
        "wav_header_bytes": audio.WAV_HEADER_BYTES,
        "npy_header_bytes": fmt.npy_header_bytes(int(round(args.window_seconds * fmt.FPS))),
        "shards": shards,
        "splits": counts,
        "hours": total * args.window_seconds / 3600,
        "input_hours": hours_in,
        "rejects": len(rejects),
        "train_stats": {
            "frame_mean": (stats["frame_sum"] / max(stats["frames"], 1)).round(6).tolist(),
            "first_frame_mean": (stats["first_sum"] / max(stats["firsts"], 1)).round(6).tolist(),
        },
        "args": {k: v for k, v in vars(args).items() if k not in ("verify", "quiet")},
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    minutes = (time.perf_counter() - t0) / 60
    if not args.quiet:
        print(
            f"{out}: {counts['train']} train + {counts['val']} val windows "
            f"({manifest['hours']:.2f} h of windows from {hours_in:.2f} h of input) in "
            f"{len(shards)} shards; {len(rejects)} rejected"
            + (f" (see {out / 'rejects.jsonl'})" if rejects else "")
            + f"; {hours_in / max(minutes, 1e-9):.1f} h of audio per minute"
        )
        for r in rejects[:20]:
            print(f"  rejected {r['file']}: {r['reason']}")
    return 0


# ---------------------------------------------------------------- verify


def verify_dataset(root: str | Path) -> list[str]:
    """Re-read a dataset end to end; return one line per problem (empty when all is well)."""
    from pipeline.audio import AudioError, parse_canonical_wav

    root = Path(root)
    problems: list[str] = []
    mpath = root / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
        shards = manifest["shards"]
        clip, frames = int(manifest["clip_samples"]), int(manifest["frames"])
        if manifest.get("format_version") != fmt.FORMAT_VERSION:
            problems.append(
                f"{mpath}: format_version {manifest.get('format_version')!r}, "
                f"expected {fmt.FORMAT_VERSION}"
            )
    except (OSError, ValueError, KeyError) as exc:
        return [f"{mpath}: missing or unreadable ({exc}); the dataset is incomplete"]
    for sh in shards:
        tar_path = root / sh["name"]
        idx_path = tar_path.with_suffix(".idx")
        where = str(tar_path)
        if not tar_path.is_file():
            problems.append(f"{where}: missing")
            continue
        size = tar_path.stat().st_size
        if size != sh["bytes"]:
            problems.append(f"{where}: {size} bytes, manifest says {sh['bytes']} (truncated?)")
        digest = hashlib.sha256(tar_path.read_bytes()).hexdigest()
        if digest != sh["sha256"]:
            problems.append(f"{where}: sha256 differs from the manifest (corrupted)")
        members: list[tuple[str, int, int]] = []
        blobs: dict[str, bytes] = {}
        try:
            with tarfile.open(tar_path, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    f = tf.extractfile(m)
                    try:
                        data = f.read() if f else b""
                    except (tarfile.ReadError, EOFError):
                        data = b""
                    if len(data) != m.size:
                        raise tarfile.ReadError(f"member {m.name} is cut short")
                    members.append((m.name, m.offset_data, m.size))
                    blobs[m.name] = data
        except (tarfile.TarError, OSError, EOFError) as exc:
            problems.append(f"{where}: not a readable tar ({exc}) after {len(members)} members")
        # the index must describe exactly the tar's members
        expected_index: list[list[tuple[str, int, int, str]]] = []
        for name, off, size_ in members:
            key, _, ext = name.partition(".")
            if expected_index and expected_index[-1][0][3].partition(".")[0] == key:
                expected_index[-1].append((ext, off, size_, name))
            else:
                expected_index.append([(ext, off, size_, name)])
        try:
            index = fmt.parse_index(idx_path.read_text())
            if index != expected_index:
                pairs = enumerate(zip(index, expected_index, strict=False))
                k = next((i for i, (a, b) in pairs if a != b), min(len(index), len(expected_index)))
                first = (index if k < len(index) else expected_index)[k][0][3].partition(".")[0]
                problems.append(
                    f"{idx_path}: does not match its tar from sample {first} "
                    f"(number {k}) on: truncated shard or stale index"
                )
        except (OSError, ValueError) as exc:
            problems.append(f"{idx_path}: unreadable index ({exc})")
        if len(expected_index) != sh["samples"]:
            problems.append(
                f"{where}: {len(expected_index)} samples, manifest says {sh['samples']}"
            )
        for comps in expected_index:
            exts = {c[0]: c[3] for c in comps}
            key = comps[0][3].partition(".")[0]
            for ext in (fmt.WAV_EXT, fmt.NPY_EXT, fmt.JSON_EXT):
                if ext not in exts:
                    problems.append(f"{where}: sample {key} has no .{ext}")
            if fmt.WAV_EXT in exts:
                try:
                    parse_canonical_wav(blobs[exts[fmt.WAV_EXT]], clip)
                except AudioError as exc:
                    problems.append(f"{where}: sample {key}: {exc}")
            if fmt.NPY_EXT in exts:
                try:
                    a = fmt.parse_arkit_npy(blobs[exts[fmt.NPY_EXT]], frames)
                    if not np.isfinite(a).all():
                        problems.append(f"{where}: sample {key}: arkit has NaN or inf")
                    elif a.min() < 0 or a.max() > 1:
                        problems.append(f"{where}: sample {key}: arkit outside [0, 1]")
                except ValueError as exc:
                    problems.append(f"{where}: sample {key}: {exc}")
    return problems


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic 10 s takes")
    src.add_argument("--input", metavar="DIR", help="folder of recordings (searched recursively)")
    src.add_argument("--verify", metavar="DIR", help="re-read a dataset end to end and report")
    p.add_argument("--out", metavar="DIR", help="output dataset folder")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of recordings for val")
    p.add_argument("--window-seconds", type=float, default=fmt.WINDOW_SECONDS)
    p.add_argument("--stride-seconds", type=float, default=None, help="default: the window")
    p.add_argument(
        "--tolerance-seconds",
        type=float,
        default=0.5,
        help="largest audio/animation duration difference accepted",
    )
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--csv-fps", type=float, default=60.0, help="Live Link CSV frame rate")
    p.add_argument("--npy-fps", type=float, default=60.0, help="frame rate of .npy animation")
    p.add_argument(
        "--npy-order",
        choices=sorted(arkit.ORDERS),
        default="arkit",
        help="column order of .npy animation",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--strict", action="store_true", help="fail if any input is rejected")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.verify and not args.out:
        p.error("--out is required with --synthetic or --input")
    if args.input and not Path(args.input).is_dir():
        p.error(f"--input {args.input} is not a folder")
    if args.synthetic is not None and args.synthetic < 1:
        p.error("--synthetic needs N >= 1")
    if args.samples_per_shard < 1:
        p.error("--samples-per-shard needs N >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify:
        problems = verify_dataset(args.verify)
        for line in problems:
            print(line)
        print(f"{args.verify}: " + (f"{len(problems)} problems" if problems else "OK"))
        return 1 if problems else 0
    return make_dataset(args)


if __name__ == "__main__":
    sys.exit(main())
