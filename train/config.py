"""Configuration: YAML (``yaml.safe_load``) resolved once into typed dataclasses.

Every knob has a default here and a comment saying what it does; ``configs/default.yaml``
holds the seed's values. ``--set section.key=value`` overrides one key (the value is parsed
as YAML, so ``--set train.lr=3e-4`` is a float); unknown keys are rejected with the list of
valid ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml


@dataclass
class DataConfig:
    dir: str = "data/synthetic"  # dataset folder made by pipeline/make_shards.py
    batch_size: int = 16  # samples per batch per rank
    val_batch_size: int = 0  # 0: same as batch_size (clamped to what each rank's part holds)
    sample_rate: int = 16000  # must match the dataset's manifest
    clip_samples: int = 160000  # 10 s at 16 kHz; must match the manifest
    frames: int = 300  # 10 s at 30 fps; must match the manifest
    num_blendshapes: int = 52
    shuffle: bool = True  # seeded shuffle of the training split (val is never shuffled)
    # torch (DataLoader baseline) backend
    num_workers: int = 4
    pin_memory: bool = True
    drop_last: bool = True
    # dali backend
    decode: str = "auto"  # gpu: raw bytes decoded on the device; cpu: DALI CPU decoders
    dali_threads: int = 0  # 0: min(4, CPU count)
    dali_prefetch: int = 2  # batches DALI prepares ahead
    shuffle_buffer: int = 1024  # DALI reader's shuffle buffer (shards are pre-shuffled too)


@dataclass
class ModelConfig:
    name: str = "auto"  # auto | simplified | sequence (auto picks by train.target)
    n_mels: int = 64
    n_fft: int = 512
    win_length: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms: 100 mel frames per second
    hidden: int = 128
    context_seconds: float = 0.3  # simplified model: audio it looks at from the clip's start


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps in total (0: no limit)
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm (0: off)
    target: str = "first_frame"  # first_frame: arkit[:, 0, :] (the seed's); sequence: all frames
    seed: int = 0
    debug: bool = False  # stop each epoch after 3 batches
    log_every: int = 10  # steps between train lines in metrics.jsonl
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)


@dataclass
class RunConfig:
    dir: str = "runs/default"  # metrics.jsonl, last.pt, best.pt
    device: str = "auto"  # auto: CUDA when available
    checkpoint_every: int = 0  # steps between checkpoints (0: at the end of each epoch)
    progress: bool = True  # progress bar on rank 0
    torch_threads: int = 0  # CPU threads for torch ops (0: torch's default); on a small CPU
    # machine 1 leaves the other cores to the loader, which the step would otherwise fight


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)


class ConfigError(ValueError):
    pass


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "run": RunConfig}


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, t in SECTIONS.items() for f in fields(t)]


def _set(cfg: Config, key: str, value) -> None:
    section, _, name = key.partition(".")
    stype = SECTIONS.get(section)
    names = {f.name for f in fields(stype)} if stype else set()
    if name not in names:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}")
    current = getattr(getattr(cfg, section), name)
    want = type(current)
    if want is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {want.__name__}, got {value!r}")
    setattr(getattr(cfg, section), name, value)


def from_dict(d: dict, cfg: Config | None = None) -> Config:
    cfg = cfg or Config()
    for section, values in (d or {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value)
    return cfg


def parse_override(text: str) -> tuple[str, object]:
    key, eq, raw = text.partition("=")
    if not eq:
        raise ConfigError(f"--set needs key=value, got {text!r}")
    return key.strip(), yaml.safe_load(raw)


def load_config(
    path: str | Path | None, overrides: list[str] = (), base: dict | None = None
) -> Config:
    """Defaults <- ``base`` (e.g. a checkpoint's config) <- YAML file <- ``--set`` overrides."""
    cfg = from_dict(base or {})
    if path is not None:
        with open(path) as f:
            cfg = from_dict(yaml.safe_load(f) or {}, cfg)
    for text in overrides:
        _set(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if cfg.train.target not in ("first_frame", "sequence"):
        raise ConfigError(f"train.target must be first_frame or sequence, not {cfg.train.target!r}")
    if cfg.data.decode not in ("auto", "gpu", "cpu"):
        raise ConfigError(f"data.decode must be auto, gpu or cpu, not {cfg.data.decode!r}")
    if cfg.data.batch_size < 1:
        raise ConfigError("data.batch_size must be >= 1")
