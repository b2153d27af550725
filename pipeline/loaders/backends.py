"""The loader backends by name, as classes (``LOADERS``), and ``build_loader``.

Each backend's module is imported when it is asked for: DALI is heavy and optional.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.loaders.base import EpochLoader
from pipeline.loaders.spec import LoaderSpec


def dali_loader() -> type[EpochLoader]:
    from pipeline.loaders.dali_loader import DaliLoader

    return DaliLoader


def torch_loader() -> type[EpochLoader]:
    from pipeline.loaders.torch_loader import TorchLoader

    return TorchLoader


# name -> the function that imports and returns its loader class (the names of
# ``pipeline.loaders.spec.OPTIONS``, which holds their knobs)
LOADERS: dict[str, Callable[[], type[EpochLoader]]] = {"dali": dali_loader, "torch": torch_loader}


def build_loader(
    loader: str | LoaderSpec, data_dir: str | Path | None = None, **settings
) -> EpochLoader:
    """The loader of a spec: ``build_loader(spec)``, or ``build_loader(name, data_dir,
    **settings)`` with ``name`` a key of ``LOADERS`` and ``settings`` the spec's fields and the
    backend's options by name (``LoaderSpec.make``)."""
    if isinstance(loader, LoaderSpec):
        if data_dir is not None or settings:
            raise TypeError("build_loader(spec) takes nothing else: the spec holds it all")
        spec = loader
    else:
        spec = LoaderSpec.make(loader, data_dir, **settings)
    return LOADERS[spec.loader]()(spec)
