"""Elastic resume of the loaders: the state is a global position, so a run stopped at one world
size resumes at another with exactly the samples not yet consumed, each as the uninterrupted
run would have yielded it (crops and augmentation included), and a resumed DALI reader starts
at the first of them instead of replaying the consumed ones."""

from __future__ import annotations

import pytest
import torch

from core.errors import ResumeError
from pipeline.loaders import dali_loader
from pipeline.loaders.plan import epoch_batches, epoch_order
from pipeline.shards.manifest import load_manifest
from tests.helpers import Written, make, run_epoch, take

AUG = {"gain_db": [-6, 6], "snr_db": [10, 30], "speed": [0.9, 1.1]}
KW = dict(batch_size=2, shuffle=True, seed=21, augment=AUG, with_params=True)
DRAWN = ("offset", "gain_db", "snr_db", "speed")


@pytest.fixture(scope="module")
def segments(segments_dataset):
    """36 train segments of 2.8 s (84 frames) in 5 shards, cropped to 2 s windows: room for
    crops at every speed in AUG (the session's, conftest.py)."""
    return segments_dataset


def by_key(batches: list[dict]) -> dict[str, tuple]:
    """Each sample of ``batches`` under its key: (wav, arkit, offset, gain, snr, speed)."""
    out = {}
    for b in batches:
        for i, key in enumerate(b["key"]):
            assert key not in out, f"{key} yielded twice"
            drawn = (b[n][i] if n in b else None for n in DRAWN)  # None: not drawn
            out[key] = (b["wav"][i], b["arkit"][i], *drawn)
    return out


def keys_in_order(data) -> list[str]:
    from pipeline.shards.index import sample_refs

    return [r.key for r in sample_refs(load_manifest(data), "train")]


@pytest.mark.parametrize("new_world", [1, 3])
@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_resume_at_another_world_size_yields_exactly_the_rest(segments, backend, new_world):
    sizes = [s.samples for s in load_manifest(segments).split_shards("train")]
    keys = keys_in_order(segments)
    # what one process reads in epochs 0 and 1: every sample of the order, in order
    straight = make(backend, segments, **KW)
    reference = by_key(run_epoch(straight))
    assert len(reference) == 36
    assert len({int(v[2]) for v in reference.values()}) > 3  # real crops, drawn anew
    reference_1 = run_epoch(straight)

    # two ranks consume 3 batches each, then stop: 12 of the epoch's order are done
    ranks = [make(backend, segments, rank=r, world_size=2, **KW) for r in range(2)]
    before = [take(ld, 3) for ld in ranks]
    states = [ld.state_dict() for ld in ranks]
    assert states[0] == {**states[1], "rank": 0}
    assert (states[0]["epoch"], states[0]["position"], states[0]["world_size"]) == (0, 12, 2)
    order = [keys[i] for i in epoch_order(21, 0, sizes, True)]
    seen_before = by_key([b for rank in before for b in rank])
    assert set(seen_before) == set(order[:12])

    resumed = [
        make(backend, segments, rank=r, world_size=new_world, **KW) for r in range(new_world)
    ]
    for ld in resumed:
        ld.load_state_dict(states[0])
    rest = [run_epoch(ld) for ld in resumed]
    steps = (36 - 12) // (new_world * 2)
    assert [len(r) for r in rest] == [steps] * new_world  # equal steps on every new rank
    seen_after = by_key([b for r in rest for b in r])
    assert not set(seen_before) & set(seen_after)  # nothing twice
    assert set(seen_before) | set(seen_after) == set(order[: 12 + steps * new_world * 2])
    assert 36 - len(seen_before) - len(seen_after) <= new_world * 2 - 1
    # every sample is what the uninterrupted single process yielded: audio, animation, crop,
    # gain, noise and speed
    for key, got in {**seen_before, **seen_after}.items():
        want = reference[key]
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), key
    # the next epoch follows the plan for the new world size
    nxt = [run_epoch(ld) for ld in resumed]
    for r, batches in enumerate(nxt):
        planned = epoch_batches(21, 1, sizes, 2, r, new_world)
        assert [b["key"] for b in batches] == [[keys[i] for i in row] for row in planned.tolist()]
    assert by_key([b for r in nxt for b in r]).keys() <= by_key(reference_1).keys()


@pytest.mark.parametrize("position_steps", [1, 8])
def test_a_resumed_dali_reader_lists_only_the_unconsumed_samples(
    tiny_dataset, monkeypatch, position_steps
):
    """No replay: the index files the reader gets list the rest of the epoch, nothing before."""
    listed = []
    real = dali_loader.write_indexes

    def spy(refs, folder):
        listed.append([r.key for r in refs])
        return real(refs, folder)

    monkeypatch.setattr(dali_loader, "write_indexes", spy)
    kw = dict(batch_size=2, shuffle=True, seed=3)
    first = make("dali-cpu", tiny_dataset, **kw)
    done = take(first, position_steps)
    state = first.state_dict()
    assert state["position"] == 2 * position_steps
    resumed = make("dali-cpu", tiny_dataset, **kw)
    resumed.load_state_dict(state)
    listed.clear()
    rest = run_epoch(resumed)
    assert len(listed) == 1 and len(listed[0]) == 36 - 2 * position_steps
    assert [k for b in rest for k in _keys(b, tiny_dataset)] == listed[0]
    assert not set(listed[0]) & {k for b in done for k in _keys(b, tiny_dataset)}


def _keys(batch: dict, data) -> list[str]:
    written = _keys.cache.setdefault(str(data), Written(data, "train"))
    return [written.keys[i] for i in written.ids([batch])]


_keys.cache = {}


@pytest.mark.parametrize("speed", [False, True])
def test_both_loaders_draw_the_same_values_for_each_sample(segments, speed):
    """One definition of the draws: the same crop, gain, SNR, noise and speed for a sample in an
    epoch, in both loaders. Without speed the crops are then equal to float rounding; with it,
    the animation is (DALI's linear resize against np.interp) and the audio is not compared:
    DALI's resampler and soxr differ."""
    aug = AUG if speed else {k: v for k, v in AUG.items() if k != "speed"}
    kw = {**KW, "augment": aug}
    dali = by_key(run_epoch(make("dali-cpu", segments, **kw)))
    torch_ = by_key(run_epoch(make("torch", segments, **kw)))
    assert dali.keys() == torch_.keys() and len(dali) == 36
    for key in dali:
        for i, name in enumerate(DRAWN, start=2):
            a, b = dali[key][i], torch_[key][i]
            assert (a is None and b is None and name == "speed") or torch.equal(a, b), (key, name)
        torch.testing.assert_close(dali[key][1], torch_[key][1], atol=1e-5, rtol=0)
        if not speed:
            torch.testing.assert_close(dali[key][0], torch_[key][0], atol=1e-5, rtol=0)


def test_a_state_without_a_position_is_refused_by_name(tiny_dataset):
    """A loader resumes from a global position only: a state holding only per-rank batches
    done (``batch``) is refused, saying so, and the loader is left at its start."""
    kw = dict(batch_size=2, shuffle=True, seed=4)
    state = make("torch", tiny_dataset, **kw).state_dict()
    old = {k: v for k, v in state.items() if k != "position"}
    old.update(batch=3, world_size=2)
    loader = make("torch", tiny_dataset, **kw)
    with pytest.raises(ResumeError, match="loader state has no position .* only per-rank batches"):
        loader.load_state_dict(old)
    assert (loader.epoch, loader.position) == (0, 0)
    assert len(run_epoch(loader)) == 36 // 2
    bad = {**state, "position": 37}
    with pytest.raises(ResumeError, match="position 37 is outside an epoch of 36 samples"):
        make("torch", tiny_dataset, **kw).load_state_dict(bad)


def test_the_resume_benchmark_times_both_loaders_at_each_point(tiny_dataset, tmp_path):
    """benchmarks/resume.py runs as documented and records what it measured (no timing asserted:
    speed is for the benchmark to report)."""
    import json

    from benchmarks import resume

    args = [
        "--data",
        str(tiny_dataset),
        "--at",
        "0.1,0.9",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert resume.main([*args, "--batch-size", "4"]) == 0
    rows = json.loads((tmp_path / "resume.json").read_text())
    assert [(r["loader"], r["at"], r["batches_done"], r["of"]) for r in rows] == [
        ("dali", 0.1, 0, 9),
        ("dali", 0.9, 8, 9),
        ("torch", 0.1, 0, 9),
        ("torch", 0.9, 8, 9),
    ]
    assert all(r["resume_s"] > 0 and r["replay_s"] > 0 for r in rows)
