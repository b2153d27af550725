"""Data: formats, shard creation and the loaders (``build_loader("dali" | "torch", ...)``)."""

from pipeline.loading import build_loader

__all__ = ["build_loader"]
