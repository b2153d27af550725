"""Configuration: YAML (``yaml.safe_load``) resolved once into typed dataclasses, then checked.

Every knob has a default and a comment in one place: here, or for a loader's own knobs in
``pipeline.loaders.base`` (``DaliOptions``, ``TorchOptions``, whose fields are ``data.*`` keys under
the same names). ``configs/default.yaml`` holds the baseline's values. ``--set section.key=value``
overrides one key (the value is parsed as YAML, so ``--set train.lr=3e-4`` is a float, ``null``
is None); unknown keys are rejected with the list of valid ones, and every value is checked
against its range before anything runs.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from core.errors import ConfigError
from model.features import FEATURES
from pipeline.loaders.augment import Augment
from pipeline.loaders.base import DaliOptions, TorchOptions

TARGETS = ("first_frame", "sequence")


@dataclass
class DataConfig(DaliOptions, TorchOptions):
    dir: str = "data/synthetic"  # dataset folder made by pipeline/make_shards.py
    batch_size: int = 16  # samples per batch per rank
    val_batch_size: int = 0  # 0: same as batch_size (clamped to what each rank's part holds)
    shuffle: bool = True  # seeded shuffle of the training split (val is never shuffled)
    features: str = "wav"  # wav: raw audio, the model's front end runs in the step; mel: the
    # loader computes the log-mel (model.n_mels, n_fft, win_length, hop_length, fmin, fmax)
    # checks against the dataset's manifest (null: take the dataset's value)
    sample_rate: int | None = None
    clip_samples: int | None = None
    frames: int | None = None
    num_blendshapes: int | None = None


@dataclass
class AugmentConfig:
    """Train-split augmentation (``pipeline.loaders.augment``); each ``[low, high]`` or null
    (off)."""

    gain_db: list[float] | None = None  # audio gain, uniform in dB
    snr_db: list[float] | None = None  # Gaussian noise at a uniform SNR in dB
    speed: list[float] | None = None  # audio and animation sped up alike by a uniform factor


@dataclass
class ModelConfig:
    name: str = "auto"  # auto | simplified | sequence (auto picks by train.target)
    n_mels: int = 64
    n_fft: int = 512
    win_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms: 100 mel frames per second
    fmin: float = 40.0  # the mel filters' lowest and highest frequencies (Hz)
    fmax: float = 7600.0
    hidden: int = 128
    context_seconds: float = 0.3  # simplified model: audio it looks at from the clip's start


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps in total (0: no limit)
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max gradient norm (null: no clipping)
    target: str = "first_frame"  # first_frame: arkit[:, 0, :] (the baseline); sequence: all frames
    seed: int = 0
    debug: bool = False  # stop each epoch after 3 batches
    log_every: int = 10  # steps between train lines in metrics.jsonl
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    allow_new_data: bool = False  # let --resume continue on a dataset other than the checkpoint's
    report: bool = True  # at the end, best.pt's evaluation report in run.dir/report (infer --eval)


@dataclass
class RunConfig:
    dir: str = "runs/default"  # metrics.jsonl, TensorBoard event files, last.pt, best.pt
    device: str = "auto"  # auto: CUDA when available; cpu, cuda (GPU LOCAL_RANK), cuda:<index>
    checkpoint_every: int = 0  # steps between checkpoints (0: at the end of each epoch)
    progress: bool = True  # progress bar on rank 0
    tensorboard: bool = True  # TensorBoard event files in run.dir (needs the tensorboard extra)
    torch_threads: int = 0  # CPU threads for torch ops (0: torch's default); on a small CPU
    # machine 1 leaves the other cores to the loader, which the step would otherwise fight
    sample_log: bool = False  # each rank appends the keys of every batch it trains on to
    # run.dir/samples-rank<R>.jsonl: an audit of what a run (and its resumes) consumed


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "run": RunConfig,
}

# every knob's range: key -> (test, what it must be)
_POSITIVE = (lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
RANGES: dict[str, tuple[typing.Callable, str]] = {
    "data.batch_size": _POSITIVE,
    "data.val_batch_size": (_NON_NEGATIVE[0], ">= 0 (0: same as data.batch_size)"),
    "data.decode": (lambda v: v in ("auto", "gpu", "cpu"), "auto, gpu or cpu"),
    "data.dali_threads": (_NON_NEGATIVE[0], ">= 0 (0: one per CPU, at most 4)"),
    "data.dali_prefetch": _POSITIVE,
    "data.reader_prefetch": _POSITIVE,
    "data.num_workers": _NON_NEGATIVE,
    "data.prefetch_factor": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "data.sample_rate": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "data.clip_samples": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "data.frames": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "data.num_blendshapes": (lambda v: v is None or v >= 1, ">= 1 or null"),
    "model.name": (
        lambda v: v in ("auto", "simplified", "sequence"),
        "auto, simplified or sequence",
    ),
    "model.n_mels": _POSITIVE,
    "model.n_fft": _POSITIVE,
    "model.win_length": _POSITIVE,
    "model.hop_length": _POSITIVE,
    "model.hidden": _POSITIVE,
    "model.fmin": _NON_NEGATIVE,
    "model.fmax": (lambda v: v > 0, "> 0"),
    "data.features": (lambda v: v in FEATURES, " or ".join(FEATURES)),
    "model.context_seconds": (lambda v: v > 0, "> 0"),
    "train.epochs": _POSITIVE,
    "train.max_steps": (_NON_NEGATIVE[0], ">= 0 (0: no limit)"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.weight_decay": _NON_NEGATIVE,
    "train.grad_clip": (lambda v: v is None or v > 0, "> 0 or null"),
    "train.target": (lambda v: v in TARGETS, " or ".join(TARGETS)),
    "train.log_every": _POSITIVE,
    "run.dir": (lambda v: bool(v.strip()), "a folder"),
    "run.device": (
        lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
        "auto, cpu, cuda or cuda:<index>",
    ),
    "run.checkpoint_every": (_NON_NEGATIVE[0], ">= 0 (0: every epoch)"),
    "run.torch_threads": (_NON_NEGATIVE[0], ">= 0 (0: torch's default)"),
    "data.dir": (lambda v: bool(v.strip()), "a dataset folder"),
}


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, t in SECTIONS.items() for f in fields(t)]


def _types(section: str) -> dict[str, typing.Any]:
    return typing.get_type_hints(SECTIONS[section])


def _coerce(key: str, value, hint):
    """``value`` as the field's type, or ConfigError naming the key."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,) else ()
    if not allowed and hasattr(hint, "__args__"):  # X | None on Python >= 3.10
        allowed = hint.__args__
    options = allowed or (hint,)
    if value is None and type(None) in options:
        return None
    for want in options:
        if typing.get_origin(want) is list:  # [low, high] ranges; their bounds are checked later
            if isinstance(value, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            ):
                return [float(v) for v in value]
            raise ConfigError(f"{key} must be a list of numbers or null, got {value!r}")
    for want in options:
        if want is type(None):
            continue
        if want is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:  # YAML 1.1 reads "3e-4" (no dot) as a string
                value = float(value)
            except ValueError:
                continue
        if isinstance(value, want) and not (want in (int, float) and isinstance(value, bool)):
            if want is float and not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in options)
    raise ConfigError(f"{key} must be {names}, got {value!r}")


# keys older configs may hold, and why they went
REMOVED = {
    "data.shuffle_buffer": "DALI's reader no longer shuffles; both loaders follow "
    "pipeline.loaders.plan's order (shards, and samples within each, shuffled every epoch)",
}


def _set(cfg: Config, key: str, value) -> None:
    section, _, name = key.partition(".")
    stype = SECTIONS.get(section)
    names = {f.name for f in fields(stype)} if stype else set()
    if key in REMOVED:
        raise ConfigError(f"{key} is gone: {REMOVED[key]}; remove it from the config")
    if name not in names:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    setattr(getattr(cfg, section), name, _coerce(key, value, _types(section)[name]))


def from_dict(d: dict, cfg: Config | None = None, where: str = "config") -> Config:
    cfg = cfg or Config()
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping of sections, got {type(d).__name__}")
    for section, values in d.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping")
        for name, value in values.items():
            try:
                _set(cfg, f"{section}.{name}", value)
            except ConfigError as exc:
                raise ConfigError(exc if where == "config" else f"{where}: {exc}") from None
    return cfg


def parse_override(text: str) -> tuple[str, object]:
    key, eq, raw = text.partition("=")
    if not eq:
        raise ConfigError(f"--set needs key=value, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: not a YAML value ({_yaml_reason(exc)})") from None


def _yaml_reason(exc: yaml.YAMLError) -> str:
    return " ".join(str(exc).split())


def read_yaml(path: str | Path) -> dict:
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({_yaml_reason(exc)})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"--config {path}: not a YAML text file ({exc.reason} at byte {exc.start})"
        ) from None


def retire(old: dict) -> dict:
    """A config saved by an earlier version (a checkpoint's) in today's keys: ``data.drop_last``
    is gone (always true), so is ``data.shuffle_buffer`` (the reader no longer shuffles), and
    ``train.grad_clip: 0`` meant no clipping, today ``null``. (A YAML file or ``--set`` that
    names a removed key is still told so: only a checkpoint cannot be edited.)"""
    new = {k: dict(v) if isinstance(v, dict) else v for k, v in (old or {}).items()}
    if isinstance(new.get("data"), dict):
        new["data"].pop("drop_last", None)
        new["data"].pop("shuffle_buffer", None)
    if isinstance(new.get("train"), dict) and new["train"].get("grad_clip") == 0:
        new["train"]["grad_clip"] = None
    return new


def load_config(
    path: str | Path | None, overrides: list[str] = (), base: dict | None = None
) -> Config:
    """Defaults <- ``base`` (e.g. a checkpoint's config) <- YAML file <- ``--set`` overrides."""
    cfg = from_dict(retire(base), where="the checkpoint's config")
    if path is not None:
        cfg = from_dict(read_yaml(path), cfg, where=str(path))
    for text in overrides:
        _set(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every knob in its range, named with what it must be and what it is."""
    for key, (ok, must) in RANGES.items():
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{key} must be {must} (got {value!r})")
    Augment.from_dict(asdict(cfg.augment))  # names the key whose range is wrong
    m = cfg.model
    if m.win_length > m.n_fft:
        raise ConfigError(f"model.win_length ({m.win_length}) must be <= model.n_fft ({m.n_fft})")
    if m.fmin >= m.fmax:
        raise ConfigError(f"model.fmin ({m.fmin:g}) must be below model.fmax ({m.fmax:g})")
    if cfg.train.target == "first_frame" and m.name not in ("auto", "simplified"):
        raise ConfigError("train.target first_frame needs model.name simplified (or auto)")
    if cfg.train.target == "sequence" and m.name not in ("auto", "sequence"):
        raise ConfigError("train.target sequence needs model.name sequence (or auto)")
