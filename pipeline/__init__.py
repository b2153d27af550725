"""Data: formats, shard creation and the loaders (``build_loader("dali" | "torch", ...)``)."""


def __getattr__(name: str):
    # lazy, so `python pipeline/make_shards.py` does not pay for importing torch
    if name == "build_loader":
        from pipeline.loaders.backends import build_loader

        return build_loader
    raise AttributeError(name)


__all__ = ["build_loader"]
