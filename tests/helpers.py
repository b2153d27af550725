"""What several test modules share, written once: test modules import these from here (or take
the fixtures of ``conftest.py``), never from one another.

- the trainer's small-run overrides and the synthetic dataset builder;
- make_shards' input writers (PCM16 takes, Live Link CSVs) and its output read back;
- Live Link timecode labels derived from the SMPTE rule (non-drop and drop-frame);
- the loaders by backend name, a split as make_shards wrote it, epochs and batches;
- a DALI graph's definition read from its public serialization;
- the DDP ranks of a real trainer run, spawned on CPU;
- a ``moto_server`` (a real S3-compatible server process) on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from core.arkit import INDEX, LIVE_LINK_EXTRA, LIVE_LINK_NAMES
from pipeline import build_loader, make_shards
from pipeline.loaders.spec import LoaderSpec
from pipeline.shards import members as fmt
from pipeline.shards.manifest import load_manifest
from pipeline.shards.members import parse_canonical_wav
from pipeline.shards.tars import read_index

# --set overrides for a trainer run that takes seconds: a tiny model, small batches, no workers
# (a later --set wins, so a test adds its own after these)
SMALL_RUN = [
    "model.hidden=16",
    "model.n_mels=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "run.progress=false",
    "train.log_every=1",
]


def build_synthetic(out: Path, n: int, *extra: str) -> Path:
    """Run make_shards on ``n`` synthetic takes into ``out`` (raises on failure)."""
    args = ["--synthetic", str(n), "--out", str(out), "--quiet", "--workers", "2", *extra]
    assert make_shards.main(args) == 0
    return out


# ---------------------------------------------------------------- make_shards: inputs, output


EXTS = (fmt.WAV_EXT, fmt.NPY_EXT, fmt.JSON_EXT)


def write_live_link_csv(
    path: Path,
    values: np.ndarray,
    frame_pos=None,
    *,
    names=LIVE_LINK_NAMES,
    start_frame: int = (10 * 3600 + 11 * 60 + 12) * 60 + 13,
    head: str = "0.75",
    newline: str = "\n",
    bom: bool = False,
) -> np.ndarray:
    """A Live Link Face CSV (``Timecode,BlendshapeCount,<names>,<9 head/eye>``) of ``values``
    ``[T, 52]`` given in the canonical order; each column is filled by its name, the head/eye
    columns with ``head``. ``frame_pos`` is each row's position in 60 fps frames (default
    0..T-1; 1/1000 frame resolution), written as ``HH:MM:SS:FF.fff``. Lines end in ``newline``,
    with a UTF-8 BOM first if ``bom``. Returns the rows' times in seconds from the first row."""
    pos = np.arange(len(values)) if frame_pos is None else np.asarray(frame_pos, np.float64)
    milli = start_frame * 1000 + np.round(pos * 1000).astype(np.int64)
    cols = [INDEX[n.lower()] for n in names]
    extra = ",".join([head] * len(LIVE_LINK_EXTRA))
    lines = ["Timecode,BlendshapeCount," + ",".join(list(names) + list(LIVE_LINK_EXTRA))]
    for m, row in zip(milli.tolist(), values[:, cols].tolist(), strict=True):
        f, sub = divmod(m, 1000)
        s, ff = divmod(f, 60)
        tc = f"{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}:{ff:02d}.{sub:03d}"
        lines.append(f"{tc},61," + ",".join(f"{v:.9g}" for v in row) + "," + extra)
    text = newline.join(lines) + newline
    Path(path).write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return (milli - milli[0]) / 60000.0


def random_pcm(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    pcm = np.random.default_rng(seed).integers(-32768, 32768, int(round(seconds * rate)))
    pcm[:2] = [-32768, 32767]  # the extremes survive too
    return pcm.astype("<i2")


def random_anim(seconds: float, seed: int, fps: int = 60) -> np.ndarray:
    return (
        np.random.default_rng([seed, 9]).random((int(round(seconds * fps)), 52)).astype(np.float32)
    )


def pcm16_take(
    folder: Path,
    stem: str,
    seconds: float,
    seed: int,
    anim: str = "csv",
    anim_seconds: float | None = None,
):
    """A 16 kHz mono PCM16 WAV (canonical already) with 60 fps animation as CSV or npy."""
    import soundfile as sf  # here, not above: the GPU image collects the tests without it

    folder.mkdir(parents=True, exist_ok=True)
    pcm = random_pcm(seconds, seed)
    sf.write(str(folder / f"{stem}.wav"), pcm, 16000, subtype="PCM_16")
    values = random_anim(seconds if anim_seconds is None else anim_seconds, seed)
    if anim == "csv":
        write_live_link_csv(folder / f"{stem}.csv", values)
    elif anim == "npy":
        np.save(folder / f"{stem}.npy", values)
    return pcm, values


def run_make_shards(*args: str) -> int:
    return make_shards.main([*map(str, args), "--quiet", "--workers", "2"])


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def read_shards(root: Path) -> list[dict]:
    """Every sample of every shard, in manifest then tar order, read with tarfile."""
    out: list[dict] = []
    for sh in manifest(root)["shards"]:
        with tarfile.open(root / sh["name"], "r:") as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                if not out or out[-1]["key"] != key or out[-1]["shard"] != sh["name"]:
                    out.append({"key": key, "shard": sh["name"], "split": sh["split"]})
                out[-1][ext] = tf.extractfile(m).read()
    return out


def parsed(root: Path) -> list[dict]:
    """read_shards plus the parsed members: int16 samples, the arkit array and the json."""
    man = manifest(root)
    out = read_shards(root)
    for s in out:
        assert sorted(k for k in s if k in EXTS) == sorted(EXTS), s["key"]
        s["pcm"] = parse_canonical_wav(s["wav"], man["clip_samples"])
        s["arkit"] = fmt.parse_arkit_npy(s["arkit.npy"], man["frames"], 52)
        s["meta"] = json.loads(s["json"])
        assert s["meta"]["split"] == s["split"]
    return out


def by_source(samples: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in samples:
        out.setdefault(Path(s["meta"]["source"]).name, []).append(s)
    for v in out.values():
        v.sort(key=lambda s: s["meta"]["window"])
    return out


# ---------------------------------------------------------------- Live Link timecode labels


DROPPED_LABELS = {30: 2, 60: 4}  # SMPTE 12M: frame numbers skipped at a dropping minute


def nd_label(count: float, nominal: int) -> str:
    """Non-drop ``HH:MM:SS:FF.fff`` of ``count`` frames since midnight at ``nominal`` frames
    per timecode second (``.fff``: the fraction of a frame, to 1/1000); wraps at midnight."""
    milli = int(round(count * 1000))
    f, sub = divmod(milli, 1000)
    s, ff = divmod(f, nominal)
    return f"{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}:{ff:02d}.{sub:03d}"


def nd_labels(start: tuple[int, int, int, int], positions, nominal: int) -> list[str]:
    """Labels of rows at ``positions`` (in timecode frames, may be fractional) after the
    label ``start`` = (h, m, s, ff)."""
    h, m, s, f = start
    first = ((h * 60 + m) * 60 + s) * nominal + f
    return [nd_label(first + p, nominal) for p in np.asarray(positions, np.float64).tolist()]


def df_label_tuples(nominal: int, start=(0, 0, 0, 0)) -> Iterator[tuple[int, int, int, int]]:
    """Every drop-frame label (h, m, s, ff) from ``start`` on, in order, by the SMPTE rule:
    count the labels of a clock at ``nominal`` frames a second and skip those that do not exist
    (frames below 2 at 30, below 4 at 60, at second 0 of each minute not divisible by 10)."""
    skip = DROPPED_LABELS[nominal]
    h, m, s, f = start
    while True:
        if not (s == 0 and f < skip and m % 10 != 0):
            yield h, m, s, f
        f += 1
        if f == nominal:
            f, s = 0, s + 1
        if s == 60:
            s, m = 0, m + 1
        if m == 60:
            m, h = 0, h + 1
        if h == 24:
            h = 0


def df_labels(start: tuple[int, int, int, int], n: int, nominal: int = 30) -> list[str]:
    """``n`` consecutive drop-frame labels ``HH:MM:SS;FF.000`` from ``start``."""
    return [
        f"{h:02d}:{m:02d}:{s:02d};{f:02d}.000"
        for h, m, s, f in itertools.islice(df_label_tuples(nominal, start), n)
    ]


def csv_text(labels: list[str], values: np.ndarray, names=LIVE_LINK_NAMES) -> str:
    """A Live Link Face CSV: ``Timecode,BlendshapeCount,<names>,<9 head/eye>``, one row per
    label, ``values`` [T, 52] given in the canonical order and written column by name."""
    cols = [INDEX[n.lower()] for n in names]
    extra = "," + ",".join(["0.25"] * len(LIVE_LINK_EXTRA))
    lines = ["Timecode,BlendshapeCount," + ",".join(list(names) + list(LIVE_LINK_EXTRA))]
    for tc, row in zip(labels, np.asarray(values)[:, cols].tolist(), strict=True):
        lines.append(f"{tc},61," + ",".join(f"{v:.9g}" for v in row) + extra)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- loaders and what was written


CLIP, FRAMES = 160000, 300

# name -> (backend, options). Torch without workers unless a test is about them: fast and the
# same data path (the workers run the same Dataset.__getitem__).
BACKENDS = {
    "dali-gpu": ("dali", {"decode": "gpu"}),  # the raw-bytes graph, here on CPU operators
    "dali-cpu": ("dali", {"decode": "cpu"}),
    "torch": ("torch", {"num_workers": 0}),
}


def make(backend: str, data: Path, **kw):
    name, opts = BACKENDS[backend]
    return build_loader(name, data, **{"device": "cpu", **opts, **kw})


def wav_key(row: torch.Tensor) -> str:
    return hashlib.blake2b(
        row.detach().cpu().contiguous().numpy().tobytes(), digest_size=16
    ).hexdigest()


def tar_members(tar_path) -> dict[str, dict[str, bytes]]:
    """A shard's members in tar order: key -> {extension: bytes}."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tf:
        for info in tf.getmembers():
            key, _, ext = info.name.partition(".")
            members.setdefault(key, {})[ext] = tf.extractfile(info).read()
    return members


class Written:
    """One split as make_shards wrote it, in manifest/tar order (the unshuffled order)."""

    def __init__(self, data: Path, split: str) -> None:
        wavs, arkits, keys = [], [], []
        m = load_manifest(data)
        for tar_path, idx_path in zip(m.tar_paths(split), m.idx_paths(split), strict=True):
            members = tar_members(tar_path)
            order = [sample[0].key for sample in read_index(idx_path)]
            assert order == list(members)  # the index lists samples in tar order
            for key in order:
                wav, npy = members[key]["wav"], members[key]["arkit.npy"]
                assert wav[:4] == b"RIFF" and wav[36:40] == b"data" and len(wav) == 44 + 2 * CLIP
                wavs.append(np.frombuffer(wav[44:], "<i2").astype(np.float32) / 32768)
                arkits.append(np.load(io.BytesIO(npy), allow_pickle=False))
                keys.append(key)
        self.wav = torch.from_numpy(np.stack(wavs))
        self.arkit = torch.from_numpy(np.stack(arkits))
        self.keys = keys
        self.index = {wav_key(w): i for i, w in enumerate(self.wav)}
        assert len(self.index) == len(keys)  # every window's audio is distinct: a fingerprint

    def ids(self, batches) -> list[int]:
        """Sample indices of ``batches``, after checking each sample equals what was written."""
        out = []
        for b in batches:
            for wav, arkit in zip(b["wav"], b["arkit"], strict=True):
                i = self.index[wav_key(wav)]  # KeyError: audio that was never written
                assert torch.equal(arkit.cpu(), self.arkit[i])
                out.append(i)
        return out


def run_epoch(loader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def take(loader, count: int) -> list[dict[str, torch.Tensor]]:
    """Consume ``count`` batches across epochs, the way a training loop does, then stop."""
    out = []
    while len(out) < count:
        for batch in loader:
            out.append(batch)
            if len(out) == count:
                break
    return out


# ---------------------------------------------------------------- a DALI graph's definition


def dali_graph(data, decode: str, device_id: int | None = 0, split: str = "train", **kw):
    """The DALI graph of a ``dali`` loader's spec over ``data`` (batches of 4, the split in
    manifest order, epoch seed 0), defined on CUDA device ``device_id`` (None: CPU operators),
    not built: a CUDA graph is defined without a GPU. ``kw``: more of the spec's settings."""
    from pipeline.loaders.dali_graph import Draws, GpuNoise, build_pipeline

    m = load_manifest(data)
    kw = dict(split=split, batch_size=4, device="cpu", decode=decode, **kw)
    spec = LoaderSpec.make("dali", data, **kw)
    noise = GpuNoise(device_id) if device_id is not None and spec.augment.snr_db else None
    draws = Draws(np.arange(m.num_samples(split)), 0, spec.augment, m, split, 4, noise)
    files = (m.tar_paths(split), m.idx_paths(split))
    return build_pipeline(spec, m, device_id=device_id, files=files, draws=draws, seed=0)


def serialized_graph(data, decode: str, device_id: int | None = 0, **kw) -> bytes:
    """``dali_graph``'s definition as DALI's public ``Pipeline.serialize()`` writes it, on any
    machine. ``build_pipeline`` places the operators by ``device_id`` (GPU operators for a CUDA
    device); DALI 2.4 opens the pipeline's own device to serialize (``cuInit``), so while the
    graph is defined here the ``Pipeline`` is constructed without one: the operators keep the
    placement ``build_pipeline`` gave them, and no DALI attribute is touched."""
    from nvidia.dali.pipeline import Pipeline

    construct = Pipeline.__init__

    def without_a_device(self, *args, **options):
        construct(self, *args, **{**options, "device_id": None})

    Pipeline.__init__ = without_a_device
    try:
        return dali_graph(data, decode, device_id, **kw).serialize()
    finally:
        Pipeline.__init__ = construct


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message, in order, from the wire format: varints as
    ints, length-delimited fields as bytes (fixed-width ones as their bytes)."""

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[i]
            value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
            if byte < 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, i = varint(i)
        elif kind == 2:
            size, i = varint(i)
            value, i = buf[i : i + size], i + size
        else:
            size = {1: 8, 5: 4}[kind]
            value, i = buf[i : i + size], i + size
        yield number, value


def graph_of(blob: bytes) -> tuple[list[tuple[str, str]], list[str]]:
    """The (operator, device) list of a serialized DALI graph, in definition order, and its
    outputs' devices. The fields, by their numbers in DALI's ``dali.proto``: ``PipelineDef``'s
    ``op`` (5) and ``pipe_outputs`` (7); ``OpDef``'s ``name`` (1) and ``args`` (4), among them
    the ``Argument`` named (1) ``device`` with its value in ``strings`` (5); ``InputOutput``'s
    ``device`` (2)."""
    ops, outputs = [], []
    for number, value in _proto_fields(blob):
        if number == 5:
            op = list(_proto_fields(value))
            name = next(v.decode() for n, v in op if n == 1)
            args = [dict(_proto_fields(v)) for n, v in op if n == 4]
            device = next(a[5].decode() for a in args if a.get(1) == b"device")
            ops.append((name, device))
        elif number == 7:
            outputs.append(dict(_proto_fields(value))[2].decode())
    return ops, outputs


# ---------------------------------------------------------------- DDP ranks on CPU


SMALL_DDP = [*SMALL_RUN, "data.num_workers=1"]  # a later --set wins


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def become_rank(rank: int, world: int, port: int) -> None:
    """This process's environment as rank ``rank`` of ``world`` (torchrun's variables), with
    one intra-op thread."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        TQDM_DISABLE="1",
    )
    torch.set_num_threads(1)


def rank_main(rank: int, world: int, port: int, args: list[str], out: str) -> None:
    become_rank(rank, world, port)
    from train.cli import main
    from train.trainer import Trainer

    seen: list[int] = []
    orig = Trainer.load_state_dict

    def load(self, state, **kw):  # record where each rank's loader resumes
        orig(self, state, **kw)
        seen.append(self.train_loader.state_dict()["batch"])

    Trainer.load_state_dict = load
    trainer_box = {}
    orig_fit = Trainer.fit

    def fit(self):  # keep the rank's trainer to dump its parameters
        trainer_box["t"] = self
        return orig_fit(self)

    Trainer.fit = fit
    rc = main(args)
    t = trainer_box["t"]
    torch.save(
        {
            "rc": rc,
            "step": t.step,
            "resumed_at": seen,
            "params": {k: v.detach().clone() for k, v in t.model.state_dict().items()},
            "loader": t.train_loader.state_dict(),
            # the run let go of its DDP wrapper, so the gloo group is not torn down at exit
            "released": t.net is t.model and t.train_step.net is t.model,
        },
        Path(out) / f"rank{rank}.pt",
    )


def spawn_ranks(args: list[str], out: Path, world: int = 2) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        rank_main,
        args=(world, free_port(), args, str(out)),
        nprocs=world,
        start_method="spawn",
        join=True,
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def ddp_args(run_dir: Path, dataset: Path, loader: str, *sets: str) -> list[str]:
    args = ["--loader", loader]
    for s in (*SMALL_DDP, f"data.dir={dataset}", f"run.dir={run_dir}", *sets):
        args += ["--set", s]
    return args


# ---------------------------------------------------------------- a local S3 server


@contextlib.contextmanager
def moto_server(**env):
    """A moto_server on a free port of 127.0.0.1, answering; killed on exit."""
    with moto_process(**env) as (url, _):
        yield url


@contextlib.contextmanager
def moto_process(host: str = "127.0.0.1", name: str | None = None, **env):
    """``moto_server`` on ``host``, reached as ``name`` (default: ``host``): (URL, process)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{name or host}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                break
            except urllib.error.HTTPError:  # it answers, if only to refuse
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {url}") from None
                time.sleep(0.1)
        yield url, proc
    finally:
        proc.kill()
        proc.wait()
