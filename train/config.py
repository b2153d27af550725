"""Configuration: YAML (``yaml.safe_load``) validated once by pydantic into typed sections.

Every knob is a field below with its default, its range and its one-line description (the
log-mel defaults come from ``model.features.Mel``; the loader backends' own knobs,
``pipeline.loaders.spec``'s ``DaliOptions`` and ``TorchOptions``, are ``data.*`` keys under the
same names, with their defaults from there). ``configs/default.yaml`` holds the baseline's values.
``--set section.key=value`` overrides one key (the value is parsed as YAML, so
``--set train.lr=3e-4`` is a float, ``null`` is None). Layers merge as plain mappings (defaults
<- a checkpoint's config <- ``--config`` <- ``--set``) and the result is validated once: an
unknown key is rejected with the list of valid ones, a value of the wrong type or out of range
with its key path and what it must be, each as one ``ConfigError`` line naming the layer that
set it.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import annotated_types
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from core.errors import ConfigError
from model.features import FEATURES, Mel
from pipeline.loaders.augment import Augment
from pipeline.loaders.backends import LOADERS
from pipeline.loaders.spec import CACHE_LIMIT, CACHE_PREFETCH, DaliOptions, TorchOptions


def _yaml_float(value):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string: such a string is the float it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _matching(pattern: str, words: str) -> AfterValidator:
    def check(value: str) -> str:
        if re.fullmatch(pattern, value) is None:
            raise ValueError(words)
        return value

    return AfterValidator(check)


# a float, from an int or a numeric string too, never a bool, inf or nan
Number = Annotated[float, BeforeValidator(_yaml_float), Field(allow_inf_nan=False)]
Folder = Annotated[str, _matching(r"(?s).*\S.*", "a folder")]
Device = Annotated[str, _matching(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:<index>")]
Range = Annotated[list[Number], Field(min_length=2, max_length=2)]  # [low, high]


class Section(BaseModel):
    """A config section: every key known, every value of its own type (no silent conversion
    but int -> float), assignable as an attribute."""

    model_config = ConfigDict(extra="forbid", strict=True)


class DataConfig(Section):
    loader: Literal[tuple(LOADERS)] = Field("dali", description="the loader backend (--loader)")
    dir: Folder = Field("data/synthetic", description="dataset folder made by make_shards.py")
    batch_size: int = Field(16, ge=1, description="samples per batch per rank")
    val_batch_size: int = Field(
        0, ge=0, description="0: same as batch_size (clamped to what each rank's part holds)"
    )
    shuffle: bool = Field(True, description="seeded shuffle of the train split (never val)")
    features: Literal[FEATURES] = Field(
        "wav",
        description="wav: raw audio, the model's front end runs in the step; mel: the loader "
        "computes the log-mel (model.n_mels, n_fft, win_length, hop_length, fmin, fmax)",
    )
    # checks against the dataset's manifest (null: take the dataset's value)
    sample_rate: int | None = Field(None, ge=1)
    clip_samples: int | None = Field(None, ge=1)
    frames: int | None = Field(None, ge=1)
    num_blendshapes: int | None = Field(None, ge=1)
    # an s3:// dataset's shards are streamed whole into a local cache (docs/s3.md)
    cache_dir: str | None = Field(
        None, description="null: $XDG_CACHE_HOME/arkit-dali, else ~/.cache/arkit-dali"
    )
    cache_limit: int = Field(
        CACHE_LIMIT, ge=0, description="bytes of shards cached at once per process; 0: no cache"
    )
    cache_prefetch: int = Field(CACHE_PREFETCH, ge=1, description="shard downloads at once")
    # the backends' own knobs: their defaults and meanings are DaliOptions' and TorchOptions'
    decode: Literal["auto", "gpu", "cpu"] = DaliOptions.decode
    dali_threads: int = Field(
        DaliOptions.dali_threads, ge=0, description="0: one per CPU, at most 4"
    )
    dali_prefetch: int = Field(DaliOptions.dali_prefetch, ge=1)
    reader_prefetch: int = Field(DaliOptions.reader_prefetch, ge=1)
    dont_use_mmap: bool = DaliOptions.dont_use_mmap
    check_values: bool = DaliOptions.check_values
    num_workers: int = Field(TorchOptions.num_workers, ge=0)
    pin_memory: bool = TorchOptions.pin_memory
    prefetch_factor: int | None = Field(TorchOptions.prefetch_factor, ge=1)


class AugmentConfig(Section):
    """Train-split augmentation (``pipeline.loaders.augment``, which checks each range's
    bounds); each ``[low, high]`` or null (off)."""

    gain_db: Range | None = Field(None, description="audio gain, uniform in dB")
    snr_db: Range | None = Field(None, description="Gaussian noise at a uniform SNR in dB")
    speed: Range | None = Field(
        None, description="audio and animation sped up alike by a uniform factor"
    )


class ModelConfig(Section):
    name: Literal["auto", "simplified", "sequence"] = Field(
        "auto", description="auto picks by train.target"
    )
    # the log-mel front end (model.features.Mel holds the defaults)
    n_mels: int = Field(Mel.n_mels, ge=1)
    n_fft: int = Field(Mel.n_fft, ge=1)
    win_length: int = Field(Mel.win_length, ge=1, description="samples (400: 25 ms)")
    hop_length: int = Field(Mel.hop_length, ge=1, description="samples (160: 100 frames/s)")
    fmin: Number = Field(Mel.fmin, ge=0, description="the mel filters' lowest frequency (Hz)")
    fmax: Number = Field(Mel.fmax, gt=0, description="the mel filters' highest frequency (Hz)")
    hidden: int = Field(128, ge=1)
    context_seconds: Number = Field(
        0.3, gt=0, description="simplified model: audio it looks at from the clip's start"
    )
    lookahead_seconds: Number | None = Field(
        None,
        gt=0,
        description="sequence model: how far past its own time a frame reads the audio "
        "(null: unbounded, 0.29 s); a stream's delay is this plus its chunk",
    )


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    max_steps: int = Field(
        0, ge=0, description="stop after this many optimizer steps in total (0: no limit)"
    )
    lr: Number = Field(1e-3, gt=0)
    weight_decay: Number = Field(0.0, ge=0)
    grad_clip: Number | None = Field(1.0, gt=0, description="max gradient norm (null: none)")
    target: Literal["first_frame", "sequence"] = Field(
        "first_frame", description="first_frame: arkit[:, 0, :] (the baseline's); sequence: all"
    )
    seed: int = 0
    debug: bool = Field(False, description="stop each epoch after 3 batches")
    log_every: int = Field(10, ge=1, description="steps between train lines in metrics.jsonl")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    allow_new_data: bool = Field(
        False, description="let --resume continue on a dataset other than the checkpoint's"
    )
    report: bool = Field(
        True, description="at the end, best.pt's evaluation report in run.dir/report"
    )


class RunConfig(Section):
    dir: Folder = Field(
        "runs/default", description="metrics.jsonl, TensorBoard event files, last.pt, best.pt"
    )
    overwrite: bool = Field(
        False,
        description="a fresh run replaces the run already in run.dir (removes its "
        "metrics.jsonl, checkpoints, report, event files); off: such a run.dir is refused",
    )
    device: Device = Field(
        "auto", description="auto: CUDA when available; cpu, cuda (GPU LOCAL_RANK), cuda:<index>"
    )
    checkpoint_every: int = Field(
        0, ge=0, description="steps between checkpoints (0: at the end of each epoch)"
    )
    progress: bool = Field(True, description="progress bar on rank 0")
    tensorboard: bool = Field(
        True, description="TensorBoard event files in run.dir (needs the tensorboard extra)"
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads for torch ops (0: torch's default); on a small CPU machine 1 "
        "leaves the other cores to the loader, which the step would otherwise fight",
    )
    sample_log: bool = Field(
        False,
        description="each rank appends the keys of every batch it trains on to "
        "run.dir/samples-rank<R>.jsonl: an audit of what a run (and its resumes) consumed",
    )


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        """Plain types only (a checkpoint loads with ``torch.load(weights_only=True)``)."""
        return self.model_dump()


SECTIONS: dict[str, type[Section]] = {
    name: info.annotation for name, info in Config.model_fields.items()
}


def valid_keys() -> list[str]:
    return [f"{s}.{name}" for s, t in SECTIONS.items() for name in t.model_fields]


def _unknown(key: str) -> str:
    return f"unknown config key {key!r}; valid keys: {', '.join(valid_keys())}"


def _rule(info: FieldInfo) -> tuple[str, str]:
    """A field's type and range in words: ("int >= 1", ">= 1"), ("float > 0 or null", "> 0 or
    null"), ...; for a choice of values both are the choices ("auto, gpu or cpu")."""
    options = (info.annotation,)
    if typing.get_origin(info.annotation) in (typing.Union, types.UnionType):
        options = typing.get_args(info.annotation)
    null = " or null" if type(None) in options else ""
    (hint,) = [o for o in options if o is not type(None)]
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is Literal:
        *most, last = typing.get_args(hint)
        choices = f"{', '.join(most)} or {last}" if most else last
        return choices + null, choices + null
    if typing.get_origin(hint) is list:
        return f"[low, high]{null}", f"[low, high]{null}"
    limits = []
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            limits.append(f">= {m.ge}")
        elif isinstance(m, annotated_types.Gt):
            limits.append(f"> {m.gt}")
    rng = " and ".join(limits)
    return f"{hint.__name__}{' ' + rng if rng else ''}{null}", f"{rng}{null}"


RANGE_ERRORS = ("greater_than", "greater_than_equal", "too_short", "too_long")


def _message(error: dict, d: dict) -> str:
    """One line for pydantic's first error: the key path, what it must be, what it is."""
    section, *rest = error["loc"]
    if section not in SECTIONS:
        names = d.get(section) if isinstance(d.get(section), dict) else {}
        return _unknown(", ".join(f"{section}.{n}" for n in names) or str(section))
    if not rest:
        return f"section {section!r} must be a mapping"
    name = rest[0]
    key = f"{section}.{name}"
    info = SECTIONS[section].model_fields.get(name)
    if info is None:
        return _unknown(key)
    value = d[section][name]
    kind, rng = _rule(info)
    hint = f": {info.description}" if info.description else ""
    if error["type"] in RANGE_ERRORS:
        return f"{key} must be {rng} (got {value!r}){hint}"
    if error["type"] == "finite_number":
        return f"{key} must be a finite number, got {value!r}"
    if error["type"] == "value_error":  # a str field's own rule (a folder, a device)
        return f"{key} must be {error['ctx']['error']}, got {value!r}"
    return f"{key} must be {kind}, got {value!r}"


def _merge(into: dict, origin: dict, layer, where: str) -> None:
    """``layer`` (a mapping of sections) over ``into``; ``origin`` records where each key was
    set (for the error message)."""
    if not isinstance(layer, dict):
        raise ConfigError(f"{where} must be a mapping of sections, got {type(layer).__name__}")
    for section, values in layer.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping")
        into.setdefault(section, {}).update(values)
        origin[section] = where
        origin.update({f"{section}.{name}": where for name in values})


def from_dict(d: dict, origin: dict | None = None) -> Config:
    """``d`` validated into a Config, or one ConfigError line; ``origin`` (key -> where it was
    set) prefixes the line with where the bad key came from."""
    try:
        return Config.model_validate(d)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = (origin or {}).get(".".join(map(str, error["loc"][:2])))
        where = where or (origin or {}).get(str(error["loc"][0]))
        line = _message(error, d)
        raise ConfigError(f"{where}: {line}" if where else line) from None


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


def load_config(
    path: str | Path | None, overrides: list[str] = (), base: dict | None = None
) -> Config:
    """Defaults <- ``base`` (e.g. a checkpoint's config) <- YAML file <- ``--set`` overrides,
    merged, then validated once."""
    d: dict = {}
    origin: dict = {}
    _merge(d, origin, base or {}, "the checkpoint's config")
    if path is not None:
        _merge(d, origin, read_yaml(path), str(path))
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(_unknown(key))
        d.setdefault(section, {})[name] = value
        origin[section] = origin[key] = None
    cfg = from_dict(d, origin)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """What no single field's range says: the augment ranges' bounds and the keys that must
    agree with each other."""
    Augment.from_dict(cfg.augment.model_dump())  # names the key whose range is wrong
    m = cfg.model
    if m.win_length > m.n_fft:
        raise ConfigError(f"model.win_length ({m.win_length}) must be <= model.n_fft ({m.n_fft})")
    if m.fmin >= m.fmax:
        raise ConfigError(f"model.fmin ({m.fmin:g}) must be below model.fmax ({m.fmax:g})")
    if cfg.train.target == "first_frame" and m.name not in ("auto", "simplified"):
        raise ConfigError("train.target first_frame needs model.name simplified (or auto)")
    if cfg.train.target == "sequence" and m.name not in ("auto", "sequence"):
        raise ConfigError("train.target sequence needs model.name sequence (or auto)")
