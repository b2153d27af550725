"""What a loader is asked for, in one typed object: ``LoaderSpec``, built once (from the config
by ``train.builders``, from keywords by ``build_loader``) and taken whole by the base loader,
both backends and the DALI graph. Each knob is checked here, when the spec is made; what needs
the dataset (its rate, its segments, its size) is checked when a loader opens it.

Each backend's knobs are a dataclass below; their field names are the ``data.*`` config keys,
the keyword arguments of ``build_loader`` and the names the backend uses, and their defaults
are stated here only. ``OPTIONS`` maps each backend's name to its knobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core.errors import ConfigError
from model.features import FEATURES, Mel
from pipeline.loaders.augment import Augment

if TYPE_CHECKING:
    from pipeline.shards.manifest import Manifest

DECODES = ("gpu", "cpu")  # what the DALI graph decodes with; "auto" picks one by device
# an s3:// dataset's shards are streamed whole into a local cache (pipeline.shards.cache):
CACHE_LIMIT = 8 << 30  # bytes of shards held at once, per process (0: read S3 directly)
CACHE_PREFETCH = 4  # downloads in flight at once, ahead of use


@dataclass
class DaliOptions:
    decode: str = "auto"  # gpu: raw bytes decoded on the device; cpu: DALI's CPU decoders;
    # auto: gpu on CUDA, cpu without
    dali_threads: int = 0  # DALI CPU threads (0: one per CPU, at most 4)
    dali_prefetch: int = 2  # batches DALI prepares ahead
    reader_prefetch: int = 2  # batches the reader reads ahead
    # read the tars by copy (true) or map them (false: faster on CPU, but a shard truncated
    # while DALI reads it kills the process with SIGBUS instead of a named error)
    dont_use_mmap: bool = True
    check_values: bool = True  # stop on blendshapes that are NaN, inf or outside [0, 1]

    def decode_on(self, cuda: bool) -> str:
        """The decode mode (``DECODES``) for data on CUDA (``cuda``) or on the host."""
        if self.decode == "auto":
            return "gpu" if cuda else "cpu"
        if self.decode not in DECODES:
            raise ConfigError(f"decode must be 'auto', 'gpu' or 'cpu', not {self.decode!r}")
        return self.decode


@dataclass
class TorchOptions:
    num_workers: int = 4  # DataLoader worker processes (the baseline's 4)
    pin_memory: bool = True  # pinned host batches (on CUDA)
    prefetch_factor: int | None = None  # batches per worker ahead (None: torch's default)


# each backend's name and knobs (``pipeline.loaders.backends.LOADERS``: their loader classes)
OPTIONS: dict[str, type[DaliOptions] | type[TorchOptions]] = {
    "dali": DaliOptions,
    "torch": TorchOptions,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device {device!r} is not a device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def options_of(loader: str) -> type[DaliOptions] | type[TorchOptions]:
    """The options class of the backend named ``loader``."""
    if loader not in OPTIONS:
        raise ConfigError(f"unknown loader {loader!r}: choose from {', '.join(OPTIONS)}")
    return OPTIONS[loader]


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a loader is made from.

    ``expect``: manifest values the dataset must have (``Manifest.check``); ``augment``: the
    train split's augmentation (``pipeline.loaders.augment``); ``with_params``: each batch also
    carries ``"key"`` (the samples' keys) and ``"offset"`` (crop offsets in frames), and each
    enabled augmentation's drawn values; ``features``: "wav" or "mel" (log-mel with the ``mel``
    settings, ``model.features.Mel``); ``crop=False``: a segmented train split's whole
    segments, uncropped (for evaluation); ``options``: the backend's knobs (default: its
    defaults). ``cache_dir``, ``cache_limit`` (bytes; 0: no cache) and ``cache_prefetch``: the
    local cache an ``s3://`` dataset's shards stream into (``pipeline.shards.cache``). ``device``
    is resolved when the spec is made ("auto": CUDA when available)."""

    loader: str
    data_dir: str | Path
    split: str = "train"
    batch_size: int = 16
    device: str | torch.device = "auto"
    shuffle: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    expect: Mapping | None = None
    augment: Augment = field(default_factory=Augment)
    with_params: bool = False
    features: str = "wav"
    mel: Mel = field(default_factory=Mel)
    crop: bool | None = None
    cache_dir: str | Path | None = None  # None: pipeline.shards.cache.default_cache_dir()
    cache_limit: int = CACHE_LIMIT
    cache_prefetch: int = CACHE_PREFETCH
    options: DaliOptions | TorchOptions | None = None

    def __post_init__(self) -> None:
        options_cls = options_of(self.loader)
        if self.options is None:
            object.__setattr__(self, "options", options_cls())
        elif type(self.options) is not options_cls:
            raise ConfigError(
                f"loader {self.loader!r} takes {options_cls.__name__}, not "
                f"{type(self.options).__name__}"
            )
        if isinstance(self.options, DaliOptions):
            self.options.decode_on(cuda=False)  # names a decode that is none
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, not {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not one of {self.world_size} rank(s)")
        if self.features not in FEATURES:
            raise ConfigError(f"features must be {' or '.join(FEATURES)}, not {self.features!r}")
        if not isinstance(self.augment, Augment) or not isinstance(self.mel, Mel):
            raise ConfigError("a LoaderSpec takes augment as an Augment and mel as a Mel")
        if self.cache_limit < 0 or self.cache_prefetch < 1:
            raise ConfigError(
                f"cache_limit must be >= 0 (0: no cache) and cache_prefetch >= 1, not "
                f"{self.cache_limit} and {self.cache_prefetch}"
            )
        if self.crop is False and self.augment.enabled:
            raise ConfigError("augmentation needs crops: crop=False takes no augment")
        object.__setattr__(self, "device", resolve_device(self.device))

    @classmethod
    def make(cls, loader: str, data_dir: str | Path, **settings) -> LoaderSpec:
        """The spec from keywords: its own fields, and the backend's options by name;
        ``augment`` may be the config's mapping of ``[low, high]`` ranges."""
        options_cls = options_of(loader)
        known = {f.name for f in dataclasses.fields(options_cls)}
        mine = {f.name for f in dataclasses.fields(cls)} - {"loader", "data_dir", "options"}
        unknown = sorted(set(settings) - known - mine)
        if unknown:
            raise ConfigError(
                f"loader {loader!r} has no option {', '.join(unknown)}; its options: "
                f"{', '.join(sorted(known))}"
            )
        options = options_cls(**{k: v for k, v in settings.items() if k in known})
        own = {k: v for k, v in settings.items() if k in mine}
        if not isinstance(own.get("augment", Augment()), Augment):
            own["augment"] = Augment.from_dict(own["augment"])
        return cls(loader, data_dir, options=options, **own)

    def crops(self, m: Manifest) -> bool:
        """Whether each sample is a random crop of its member: in the train split, when its
        members are longer than the window or augmentation is on, unless ``crop`` is False
        (whole members, as stored: an evaluation of the train split)."""
        wanted = self.split == "train" and (m.segmented or bool(self.augment.enabled))
        return wanted and self.crop is not False
