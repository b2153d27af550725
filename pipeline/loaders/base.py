"""One loader interface, two backends (``dali`` and ``torch``), chosen by name.

Iterating yields ``{"wav": float32 [B, clip_samples], "arkit": float32 [B, frames, 52]}`` on
the loader's device; with ``features="mel"``, ``"mel": float32 [B, n_mels, clip_samples // hop
+ 1]`` (``model.features``: the log-mel of the same audio, after crops and augmentation)
instead of ``"wav"``. ``len()`` is batches per epoch; iterating again starts the next epoch
(after an iteration stopped early it continues that epoch, unless ``set_epoch`` says otherwise);
``state_dict()`` / ``load_state_dict()`` resume mid-epoch with the same next batches, also at
another world size: the state is the epoch and the global position in its order. Which samples
a rank reads comes from ``pipeline.loaders.plan`` so both backends obey the same rules; a resumed
backend starts reading at the first unconsumed sample (nothing is replayed).

Each backend's knobs are a dataclass below; their field names are the ``data.*`` config keys,
the keyword arguments of ``build_loader`` and the names the backend uses, and their defaults
are stated here only.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import ConfigError, DatasetError, ResumeError
from model.features import FEATURES, Mel
from pipeline.loaders.augment import Augment
from pipeline.loaders.plan import epoch_order, epoch_seed, position_after, rank_batches, steps_left
from pipeline.shards.index import changed_shards, shard_stamps
from pipeline.shards.manifest import Manifest, load_manifest


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


@dataclass
class TorchOptions:
    num_workers: int = 4  # DataLoader worker processes (the baseline's 4)
    pin_memory: bool = True  # pinned host batches (on CUDA)
    prefetch_factor: int | None = None  # batches per worker ahead (None: torch's default)


# name -> (module, class, options)
LOADERS = {
    "dali": ("pipeline.loaders.dali_loader", "DaliLoader", DaliOptions),
    "torch": ("pipeline.loaders.torch_loader", "TorchLoader", TorchOptions),
}


@dataclass(frozen=True)
class Leg:
    """What one rank reads from a position to the end of an epoch."""

    epoch: int
    batches: np.ndarray  # [steps, batch_size] sample indices of the split, in order
    # seeds each sample's crop and augmentation (pipeline.loaders.augment.sample_rng)
    epoch_seed: int

    @property
    def steps(self) -> int:
        return len(self.batches)


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


class EpochLoader:
    """Epoch and resume bookkeeping shared by the backends; they implement ``_batches``."""

    name = "base"

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        batch_size: int = 16,
        device: str | torch.device = "auto",
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        expect: dict | None = None,
        augment: Augment | dict | None = None,
        with_params: bool = False,
        features: str = "wav",
        mel: Mel | dict | None = None,
        crop: bool | None = None,
    ) -> None:
        if features not in FEATURES:
            raise ConfigError(f"features must be {' or '.join(FEATURES)}, not {features!r}")
        self.manifest: Manifest = load_manifest(data_dir)
        self.manifest.check(**(expect or {}))
        self.split = split
        self.num_samples = self.manifest.num_samples(split)
        if self.num_samples == 0:
            raise DatasetError(f"{data_dir} has no {split!r} samples")
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.augment = augment if isinstance(augment, Augment) else Augment.from_dict(augment)
        self.with_params = with_params
        self.features = features
        self.mel = mel if isinstance(mel, Mel) else Mel(**(mel or {}))
        if features == "mel" and self.mel.sample_rate != self.manifest.sample_rate:
            raise ConfigError(
                f"log-mel settings are for {self.mel.sample_rate} Hz; {data_dir} is at "
                f"{self.manifest.sample_rate} Hz"
            )
        # train members longer than the window, or augmentation: a random crop per sample
        self.crops = split == "train" and (self.manifest.segmented or bool(self.augment.enabled))
        if crop is False:  # whole members, as stored (an evaluation of the train split)
            if self.augment.enabled:
                raise ConfigError("augmentation needs crops: crop=False takes no augment")
            self.crops = False
        if self.crops:
            self.augment.check_fits(self.manifest.segment_frames, self.manifest.frames)
        if len(self) == 0:
            raise DatasetError(
                f"{data_dir}: {self.num_samples} {split} samples over {world_size} rank(s) make "
                f"no whole batch of {batch_size}; use a smaller batch or more data"
            )
        self.shard_sizes = [s.samples for s in self.manifest.split_shards(split)]
        self._epoch = 0  # position: epoch in progress (or next) ...
        self._pos = 0  # ... and samples of its global order already consumed (all ranks)
        # what the shards looked like when the run started: checked again at every epoch
        self._stamps = shard_stamps(self.manifest, split)

    def leg(self, epoch: int, position: int = 0) -> Leg:
        """This rank's batches of ``epoch`` from the global ``position`` on."""
        order = epoch_order(self.seed, epoch, self.shard_sizes, self.shuffle)
        batches = rank_batches(order, position, self.rank, self.world_size, self.batch_size)
        return Leg(epoch, batches, epoch_seed(self.seed, epoch))

    def _steps_left(self, position: int) -> int:
        return steps_left(self.num_samples, position, self.world_size, self.batch_size)

    def __len__(self) -> int:
        return self._steps_left(0)

    def _position(self) -> tuple[int, int]:
        """(epoch, global position) of the next batch; an epoch with no whole global batch
        left is over."""
        if self._steps_left(min(self._pos, self.num_samples)) == 0:
            return self._epoch + 1, 0
        return self._epoch, self._pos

    @property
    def epoch(self) -> int:
        return self._position()[0]

    @property
    def position(self) -> int:
        """Samples of the current epoch's global order already consumed, over all ranks."""
        return self._position()[1]

    @property
    def batches_done(self) -> int:
        """Batches of the current epoch this rank would have yielded by now at this world size
        (after a resume at another world size: the batches not left to yield)."""
        return len(self) - self._steps_left(self.position)

    def set_epoch(self, epoch: int, restart: bool = False) -> None:
        """Start ``epoch`` from its first batch, unless the position is already inside it
        (a resumed run) and ``restart`` is false. Like DistributedSampler.set_epoch, for loops
        that stop an epoch early.
        """
        if restart or self._position()[0] != epoch:
            self._epoch, self._pos = epoch, 0

    def check_unchanged(self) -> None:
        """DatasetError if a shard was rewritten or truncated since the loader was made."""
        problem = changed_shards(self._stamps)
        if problem is not None:
            raise DatasetError(str(problem))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Continue from the position: the rest of an epoch, or the next whole epoch."""
        self.check_unchanged()
        epoch, start = self._position()
        leg = self.leg(epoch, start)
        for i, batch in enumerate(self._batches(leg)):
            self._epoch = epoch
            self._pos = position_after(start, i + 1, self.world_size, self.batch_size)
            yield batch

    def _batches(self, leg: Leg) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``leg``, in order, starting with its first (no replay)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Where the next batch comes from: the epoch and the global position in its order
        (``batch``, this rank's batches done, is for people). Plain ints, safe for
        ``weights_only`` loading; ``world_size`` is recorded, not required on resume."""
        epoch, position = self._position()
        return {
            "backend": self.name,
            "epoch": epoch,
            "position": position,
            "batch": self.batches_done,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` stopped, at this loader's world size (any)."""
        mine = self.state_dict()
        for key in ("backend", "seed", "batch_size", "num_samples", "shuffle"):
            if key in state and state[key] != mine[key]:
                raise ResumeError(
                    f"cannot resume: the checkpoint's loader had {key}={state[key]}, this one "
                    f"has {key}={mine[key]}; resume with the same loader, data and settings"
                )
        if "position" in state:
            position = int(state["position"])
        else:  # before global positions: per-rank batches done at the recorded world size
            world = int(state.get("world_size", self.world_size))
            position = int(state["batch"]) * world * int(state.get("batch_size", self.batch_size))
            if position:
                warnings.warn(
                    f"this loader state predates global positions: the run had consumed "
                    f"{position} samples of epoch {state['epoch']} in an order this version no "
                    "longer makes, so the rest of that epoch is the same number of samples but "
                    "not exactly the ones it had not seen (later epochs are exact)",
                    stacklevel=2,
                )
        if not 0 <= position <= self.num_samples:
            raise ResumeError(
                f"cannot resume: the checkpoint's loader position {position} is outside an "
                f"epoch of {self.num_samples} samples"
            )
        self._epoch, self._pos = int(state["epoch"]), position


def build_loader(
    name: str,
    data_dir: str | Path,
    split: str = "train",
    batch_size: int = 16,
    device: str | torch.device = "auto",
    shuffle: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    expect: dict | None = None,
    augment: Augment | dict | None = None,
    with_params: bool = False,
    features: str = "wav",
    mel: Mel | dict | None = None,
    crop: bool | None = None,
    **options,
) -> EpochLoader:
    """Make a loader by backend name (a key of ``LOADERS``) with that backend's ``options``.

    ``augment``: the config's ``augment:`` section (see ``pipeline.loaders.augment``; the train
    split only); ``with_params``: each batch also carries ``"key"`` (the samples' keys) and
    ``"offset"`` (crop offsets in frames), and each enabled augmentation's drawn values;
    ``features``: "wav" or "mel" (log-mel with the ``mel`` settings, ``model.features.Mel``);
    ``crop=False``: a segmented train split's whole segments, uncropped (for evaluation)."""
    if name not in LOADERS:
        raise ConfigError(f"unknown loader {name!r}: choose from {', '.join(LOADERS)}")
    module, cls_name, options_cls = LOADERS[name]
    known = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"loader {name!r} has no option {', '.join(unknown)}; its options: "
            f"{', '.join(sorted(known))}"
        )
    cls = getattr(importlib.import_module(module), cls_name)
    return cls(
        data_dir,
        split=split,
        batch_size=batch_size,
        device=device,
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        expect=expect,
        augment=augment,
        with_params=with_params,
        features=features,
        mel=mel,
        crop=crop,
        options=options_cls(**options),
    )
