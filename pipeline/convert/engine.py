"""Which engine runs make_shards' parallel stages (``--engine``), and stage 2 driven by it.

``local``: a process pool on this machine (``pipeline.convert.takestore``, shards written one
after the other); ``ray``: tasks on a Ray cluster (``pipeline.convert.rayengine``, Ray imported
only then). Both run the same functions over the same take store, and every decision about
order is made here, on the driver, so both write the same bytes.
"""

from __future__ import annotations

from pipeline.convert.inputs import Recording, Reject, Rejected, Settings
from pipeline.convert.takestore import StoredTake, TakeStore, convert_takes


def make_engine(name: str, address: str | None = None):
    """The Ray engine, connected, for ``ray``; None for the local process pool."""
    if name != "ray":
        return None
    from pipeline.convert.rayengine import RayEngine

    return RayEngine(address)


def convert_all(
    recordings: list[Recording],
    settings: Settings,
    store: TakeStore,
    workers: int,
    engine=None,
    quiet: bool = False,
) -> tuple[list[StoredTake], list[Reject]]:
    """Stage 2 with a progress bar (takes, hours, rejects): the stored takes and the rejects,
    both in input order, whatever finished first."""
    from tqdm import tqdm

    takes: list[StoredTake] = []
    failed: list[Rejected] = []
    hours = 0.0
    bar = tqdm(total=len(recordings), unit="take", desc="converting", disable=quiet)

    def progress(result: StoredTake | Rejected) -> None:
        nonlocal hours
        bar.update(1)
        if isinstance(result, Rejected):
            failed.append(result)
        else:
            takes.append(result)
            hours += result.seconds / 3600
        bar.set_postfix(hours=f"{hours:.2f}", rejects=len(failed))

    run = engine.convert if engine is not None else None
    try:
        for _ in convert_takes(recordings, settings, store, workers, progress, run):
            pass
    finally:
        bar.close()
    takes.sort(key=lambda t: t.recording.order)
    failed.sort(key=lambda r: r.recording.order)
    return takes, [Reject(r.recording.source, r.reason) for r in failed]
