"""The format's rates and sizes that every layer shares: the data's (``pipeline``), the model's
(``model``) and the trainer's. A dataset's own values are in its manifest; these are the
canonical ones ``make_shards`` writes."""

from __future__ import annotations

SAMPLE_RATE = 16_000  # Hz, every shard's audio
FPS = 30  # animation frames per second in every shard
WINDOW_SECONDS = 10.0  # make_shards' default window ...
WINDOW_FRAMES = round(FPS * WINDOW_SECONDS)  # ... and 300 frames
