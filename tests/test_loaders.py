"""The two loader backends (``dali`` and ``torch``) behind ``build_loader``, on real shards.

The tiny dataset has 36 train windows (shards of 16, 16, 4) and 4 val windows. Every test that
reads batches identifies each sample by the hash of its audio and checks the whole sample against
what make_shards wrote, read straight from the tar members (int16 / 32768 and the npy). Without
CUDA both DALI decode modes run on CPU operators (``device_id=None``); the ``gpu``-marked tests at
the end repeat the comparisons on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError, DatasetError, ResumeError
from pipeline import build_loader
from pipeline.loaders.plan import epoch_batches
from pipeline.loaders.spec import LoaderSpec
from pipeline.shards.manifest import load_manifest
from pipeline.shards.tars import read_index
from tests.helpers import (
    BACKENDS,
    CLIP,
    FRAMES,
    Written,
    dali_graph,
    graph_of,
    make,
    run_epoch,
    serialized_graph,
    take,
)

N_TRAIN, N_VAL = 36, 4

ALL = list(BACKENDS)


@pytest.fixture(scope="module")
def written(tiny_dataset) -> dict[str, Written]:
    return {split: Written(tiny_dataset, split) for split in ("train", "val")}


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Collating in this process (num_workers=0) with several intra-op threads is 20x slower on a
    busy 2-core machine (threads wait for each other); the workers of the real loader use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- identical tensors


@pytest.mark.parametrize("split,batch,steps", [("train", 8, 4), ("val", 4, 1)])
def test_backends_yield_identical_tensors_equal_to_what_was_written(
    tiny_dataset, written, split, batch, steps
):
    ref = written[split]
    runs = {}
    for backend in ALL:
        kw = {"num_workers": 2} if backend == "torch" else {}
        loader = make(backend, tiny_dataset, split=split, batch_size=batch, shuffle=False, **kw)
        assert len(loader) == steps
        runs[backend] = run_epoch(loader)
        assert len(runs[backend]) == steps
        for b in runs[backend]:
            assert set(b) == {"wav", "arkit"}
            assert b["wav"].shape == (batch, CLIP) and b["arkit"].shape == (batch, FRAMES, 52)
            assert b["wav"].dtype == torch.float32 and b["arkit"].dtype == torch.float32
            assert b["wav"].device.type == "cpu" and b["arkit"].device.type == "cpu"
    for backend, batches in runs.items():
        for i, (a, b) in enumerate(zip(batches, runs["torch"], strict=True)):
            assert torch.equal(a["wav"], b["wav"]), (backend, i)
            assert torch.equal(a["arkit"], b["arkit"]), (backend, i)
        # unshuffled = file order, and bit-exact what make_shards wrote
        wav = torch.cat([b["wav"] for b in batches])
        arkit = torch.cat([b["arkit"] for b in batches])
        assert torch.equal(wav, ref.wav[: steps * batch]), backend
        assert torch.equal(arkit, ref.arkit[: steps * batch]), backend
    # the written data is real: audio in [-1, 1) with signal, blendshapes in [0, 1]
    assert ref.wav.abs().max() > 0.01 and ref.wav.min() >= -1 and ref.wav.max() < 1
    assert ref.arkit.min() >= 0 and ref.arkit.max() <= 1 and ref.arkit.std() > 0.01


@pytest.mark.parametrize(
    "batch,world,steps",
    [(8, 1, 4), (16, 1, 2), (5, 1, 7), (36, 1, 1), (8, 2, 2), (4, 3, 3), (7, 3, 1)],
)
def test_len_is_whole_batches_per_epoch(tiny_dataset, batch, world, steps):
    for backend in ("dali-cpu", "torch"):  # decode modes share the reader
        lens = []
        for rank in range(world):
            loader = make(
                backend,
                tiny_dataset,
                batch_size=batch,
                shuffle=True,
                seed=1,
                rank=rank,
                world_size=world,
            )
            assert len(loader) == steps
            batches = run_epoch(loader)
            lens.append(len(batches))
            assert all(b["wav"].shape[0] == batch for b in batches)  # the tail is dropped
        assert lens == [steps] * world, backend
    assert len(make("dali-gpu", tiny_dataset, batch_size=batch, world_size=world)) == steps


@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
@pytest.mark.parametrize("batch,world", [(37, 1), (13, 3)])
def test_no_whole_batch_is_a_clear_error(tiny_dataset, backend, batch, world):
    with pytest.raises(DatasetError, match=f"no whole batch of {batch}"):
        make(backend, tiny_dataset, batch_size=batch, world_size=world)


# ---------------------------------------------------------------- shuffling and epochs


@pytest.mark.parametrize("backend", ALL)
def test_shuffling_keeps_the_samples_and_is_seeded(tiny_dataset, written, backend):
    ref = written["train"]
    unshuffled = ref.ids(run_epoch(make(backend, tiny_dataset, batch_size=4, shuffle=False)))
    assert unshuffled == list(range(N_TRAIN))

    loader = make(backend, tiny_dataset, batch_size=4, shuffle=True, seed=3)
    first = run_epoch(loader)
    order = ref.ids(first)
    assert sorted(order) == list(range(N_TRAIN))  # batch 4 divides 36: every sample, once
    assert order != unshuffled

    # the same seed in a new loader: the same batches, bit for bit
    again = run_epoch(make(backend, tiny_dataset, batch_size=4, shuffle=True, seed=3))
    assert all(
        torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"])
        for a, b in zip(first, again, strict=True)
    )
    # another seed: the same samples in another order
    other = ref.ids(run_epoch(make(backend, tiny_dataset, batch_size=4, shuffle=True, seed=4)))
    assert sorted(other) == sorted(order) and other != order

    # iterating again is the next epoch: the same samples, a new order; and then another
    second = ref.ids(run_epoch(loader))
    third = ref.ids(run_epoch(loader))
    assert sorted(second) == sorted(third) == list(range(N_TRAIN))
    assert len({tuple(order), tuple(second), tuple(third)}) == 3
    assert loader.epoch == 3


@pytest.mark.parametrize("backend", ALL)
def test_shuffled_epoch_with_a_dropped_tail_leaves_out_fewer_than_a_batch(
    tiny_dataset, written, backend
):
    ref = written["train"]
    loader = make(backend, tiny_dataset, batch_size=8, shuffle=True, seed=2)
    gone = []
    for _ in range(4):
        ids = ref.ids(run_epoch(loader))
        assert len(ids) == len(set(ids)) == 32
        gone.append(frozenset(range(N_TRAIN)) - set(ids))
    assert all(len(g) == 4 for g in gone)
    assert len(set(gone)) > 1  # not always the same four samples


def shard_sizes(data_dir, split: str = "train") -> list[int]:
    return [s.samples for s in load_manifest(data_dir).split_shards(split)]


@pytest.mark.parametrize("backend", ALL)
def test_every_backend_follows_the_planned_order(tiny_dataset, written, backend):
    """Both loaders visit exactly ``epoch_batches`` of ``pipeline.loaders.plan``, batch by batch."""
    loader = make(backend, tiny_dataset, batch_size=4, shuffle=True, seed=5, world_size=2, rank=1)
    for epoch in range(2):
        want = epoch_batches(5, epoch, shard_sizes(tiny_dataset), 4, rank=1, world_size=2)
        got = [written["train"].ids([b]) for b in run_epoch(loader)]
        assert got == want.tolist()


def test_dali_decode_modes_agree_when_shuffled(tiny_dataset):
    """Both decode modes share the reader, so a seed gives the same batches in both."""
    a = make("dali-gpu", tiny_dataset, batch_size=4, shuffle=True, seed=8)
    b = make("dali-cpu", tiny_dataset, batch_size=4, shuffle=True, seed=8)
    for _ in range(2):
        for x, y in zip(run_epoch(a), run_epoch(b), strict=True):
            assert torch.equal(x["wav"], y["wav"]) and torch.equal(x["arkit"], y["arkit"])


# ---------------------------------------------------------------- ranks


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])  # decode modes share the reader
def test_ranks_get_disjoint_parts_with_equal_batch_counts(
    tiny_dataset, written, backend, world, shuffle
):
    ref = written["train"]
    loaders = [
        make(backend, tiny_dataset, batch_size=4, shuffle=shuffle, seed=6, rank=r, world_size=world)
        for r in range(world)
    ]
    steps = (N_TRAIN // world) // 4
    assert [len(ld) for ld in loaders] == [steps] * world
    for epoch in range(2):
        per_rank = []
        for r, ld in enumerate(loaders):
            batches = run_epoch(ld)
            assert len(batches) == steps
            ids = ref.ids(batches)
            planned = epoch_batches(6, epoch, shard_sizes(tiny_dataset), 4, r, world, 0, shuffle)
            assert ids == planned.ravel().tolist()
            per_rank.append(ids)
        everything = [i for ids in per_rank for i in ids]
        assert len(everything) == len(set(everything)) == world * steps * 4  # disjoint
        assert N_TRAIN - len(everything) <= world * 4 - 1


# ---------------------------------------------------------------- resume


# 9 batches an epoch: stop inside epoch 0, at its very end, or inside epoch 1
RESUME_CASES = [
    ("dali-cpu", 3),
    ("dali-cpu", 9),
    ("dali-cpu", 11),
    ("dali-gpu", 11),
    ("torch", 3),
    ("torch", 9),
    ("torch-workers", 11),
]


@pytest.mark.parametrize("backend,stop", RESUME_CASES)
def test_state_dict_resumes_with_the_same_batches(tiny_dataset, tmp_path, backend, stop):
    kw = dict(batch_size=4, shuffle=True, seed=9)
    if backend == "torch-workers":
        backend, kw["num_workers"] = "torch", 2
    reference = make(backend, tiny_dataset, **kw)
    assert len(reference) == 9
    straight = run_epoch(reference) + run_epoch(reference)  # 18 batches

    first = make(backend, tiny_dataset, **kw)
    seen = take(first, stop)
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == divmod(stop, 9)
    torch.save(state, tmp_path / "loader.pt")  # a checkpoint holds plain values only
    state = torch.load(tmp_path / "loader.pt", weights_only=True)
    del first

    resumed = make(backend, tiny_dataset, **kw)
    resumed.load_state_dict(state)
    assert resumed.epoch == stop // 9
    rest = []
    while len(seen) + len(rest) < len(straight):
        rest += run_epoch(resumed)
    assert len(seen) + len(rest) == len(straight)  # the resumed epoch is only its remainder
    for i, (a, b) in enumerate(zip(seen + rest, straight, strict=True)):
        assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"]), i


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_stopping_early_continues_the_epoch_and_set_epoch_moves_on(tiny_dataset, backend):
    """A debug loop stops after 3 batches; 4 torch workers must not leak stale batches."""
    kw = dict(batch_size=4, shuffle=True, seed=10)
    if backend == "torch":  # the baseline's DataLoader: 4 workers, started afresh every epoch
        loader = build_loader("torch", tiny_dataset, device="cpu", **kw)
        assert loader.loader.num_workers == 4 and not loader.loader.persistent_workers
    else:
        loader = make(backend, tiny_dataset, **kw)
    straight = make(backend, tiny_dataset, **kw)
    epoch0, epoch1 = run_epoch(straight), run_epoch(straight)

    def same(a, b):
        return len(a) == len(b) and all(
            torch.equal(x["wav"], y["wav"]) for x, y in zip(a, b, strict=True)
        )

    head = take(loader, 3)
    assert same(head, epoch0[:3])
    assert loader.state_dict()["batch"] == 3
    assert same(run_epoch(loader), epoch0[3:])  # iterating again finishes the stopped epoch
    head = take(loader, 3)
    assert same(head, epoch1[:3])
    loader.set_epoch(2)  # a loop that moves on explicitly skips the rest of epoch 1
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["batch"] == 0
    assert same(run_epoch(loader), run_epoch(straight))
    loader.set_epoch(0)
    assert same(run_epoch(loader), epoch0)


@pytest.mark.parametrize(
    "key,value",
    [("batch_size", 8), ("seed", 1), ("shuffle", False), ("num_samples", 40), ("backend", "dali")],
)
def test_load_state_dict_refuses_other_settings(tiny_dataset, key, value):
    loader = make("torch", tiny_dataset, batch_size=4, shuffle=True, seed=0)
    state = loader.state_dict()
    have = state[key]
    state[key] = value
    with pytest.raises(ResumeError, match="cannot resume") as err:
        loader.load_state_dict(state)
    assert f"{key}={value}" in str(err.value) and f"{key}={have}" in str(err.value)
    assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["batch"] == 0  # unchanged


def test_load_state_dict_refuses_another_batch_size_on_dali(tiny_dataset):
    state = make("dali-cpu", tiny_dataset, batch_size=8).state_dict()
    with pytest.raises(ResumeError, match="batch_size=8.*batch_size=4"):
        make("dali-cpu", tiny_dataset, batch_size=4).load_state_dict(state)


# ---------------------------------------------------------------- refusing bad datasets


@pytest.mark.parametrize("backend", ALL)
def test_manifest_mismatch_names_both_values(tiny_dataset, backend):
    with pytest.raises(DatasetError) as err:
        make(backend, tiny_dataset, batch_size=4, expect={"clip_samples": 8000})
    msg = str(err.value)
    assert "clip_samples=8000" in msg and "clip_samples=160000" in msg
    make(backend, tiny_dataset, batch_size=4, expect={"clip_samples": 160000, "frames": 300})


@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_missing_dataset_dir_says_how_to_make_one(tmp_path, backend):
    with pytest.raises(DatasetError, match="no dataset at .*make_shards"):
        make(backend, tmp_path / "nowhere", batch_size=4)


@pytest.mark.parametrize("backend", ["dali-cpu", "torch"])
def test_dir_without_manifest_is_not_a_dataset(copy_dataset, backend):
    data = copy_dataset()
    (data / "manifest.json").unlink()  # what an interrupted make_shards leaves
    with pytest.raises(DatasetError, match="no manifest.json") as err:
        make(backend, data, batch_size=4)
    assert "make_shards" in str(err.value)


@pytest.mark.parametrize("backend", ALL)
def test_a_damaged_wav_header_names_the_sample(copy_dataset, backend):
    data = copy_dataset()
    comps = read_index(data / "train-000002.idx")[1]
    offset, name = next((c.offset, c.name) for c in comps if c.ext == "wav")
    with open(data / "train-000002.tar", "r+b") as f:  # byte rate field: size stays the same
        f.seek(offset + 28)
        f.write(b"\x7f")
    with pytest.raises(DatasetError, match="--verify") as err:  # at start-up or while loading
        run_epoch(make(backend, data, batch_size=4, shuffle=False))
    assert name.partition(".")[0] in str(err.value) and "train-000002.tar" in str(err.value)


# ---------------------------------------------------------------- DALI specifics


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("backend", ["dali-gpu", "dali-cpu"])
def test_dali_epochs_never_start_with_the_last_epochs_padding(
    tiny_dataset, written, backend, shuffle
):
    """A pitfall of docs/loaders.md: with several shards, DROP + pad_last_batch hands the dropped
    padding out as the next epoch's first batch. 36 samples over 2 ranks of batch 8 leave a tail
    of 4 every epoch: every epoch must still be exactly its planned batches."""
    ref = written["train"]
    loaders = [
        make(backend, tiny_dataset, batch_size=8, shuffle=shuffle, seed=4, rank=r, world_size=2)
        for r in range(2)
    ]
    for epoch in range(5):
        for r, ld in enumerate(loaders):
            batches = run_epoch(ld)
            assert len(batches) == 2
            ids = [ref.ids([b]) for b in batches]
            planned = epoch_batches(4, epoch, shard_sizes(tiny_dataset), 8, r, 2, 0, shuffle)
            flat = ids[0] + ids[1]
            assert len(set(flat)) == 16 and flat == planned.ravel().tolist()


def test_cuda_graph_decodes_on_the_gpu(tiny_dataset):
    """The CUDA variant of the raw-bytes graph (device_id=0) is defined without a GPU: only the
    reader and each sample's source stay on the host; reinterpreting, slicing off the headers,
    scaling and reshaping run on the GPU, and the two big outputs are GPU tensors."""
    from pipeline.loaders.dali_graph import OUTPUTS

    ops, outputs = graph_of(serialized_graph(tiny_dataset, "gpu"))
    host = sorted(kind for kind, dev in ops if dev == "cpu")
    assert host == ["GetProperty", "Pad", "readers__Webdataset"]
    on_gpu = sorted(kind for kind, dev in ops if dev == "gpu")
    assert on_gpu == [
        "Reinterpret",
        "Reinterpret",
        "Reshape",
        "_ArithmeticGenericOp",
        "_TensorSubscript",
        "_TensorSubscript",
    ]
    assert dict(zip(OUTPUTS, outputs, strict=True)) == {
        "wav": "gpu",
        "arkit": "gpu",
        "source": "cpu",
    }

    ops, outputs = graph_of(serialized_graph(tiny_dataset, "cpu"))
    assert {("decoders__Audio", "cpu"), ("decoders__Numpy", "cpu")} <= set(ops)
    assert not any(kind == "Reinterpret" for kind, _ in ops)
    assert outputs[:2] == ["gpu", "gpu"]  # decoded on the host, then copied to the device


def test_unknown_backend_and_decode_are_refused(tiny_dataset):
    with pytest.raises(ConfigError, match="unknown loader"):
        build_loader("jax", tiny_dataset)
    with pytest.raises(ConfigError, match="decode"):
        make("dali-cpu", tiny_dataset, decode="tpu")


def test_a_spec_is_checked_once_and_builds_the_same_loader_as_keywords(tiny_dataset):
    """``build_loader(spec)`` and the keyword form give the same batches; the registry's names
    are the options' names and map to the backends' classes; a spec refuses a bad knob when it
    is made, naming it."""
    from pipeline.loaders.augment import Augment
    from pipeline.loaders.backends import LOADERS
    from pipeline.loaders.dali_loader import DaliLoader
    from pipeline.loaders.spec import OPTIONS, DaliOptions, TorchOptions
    from pipeline.loaders.torch_loader import TorchLoader

    assert LOADERS.keys() == OPTIONS.keys() == {"dali", "torch"}
    assert LOADERS["dali"]() is DaliLoader and LOADERS["torch"]() is TorchLoader
    kw = dict(batch_size=4, device="cpu", shuffle=True, seed=3)
    spec = LoaderSpec("torch", tiny_dataset, **kw, options=TorchOptions(num_workers=0))
    assert spec.device == torch.device("cpu") and spec.augment == Augment()
    by_spec = run_epoch(build_loader(spec))
    by_keywords = run_epoch(build_loader("torch", tiny_dataset, **kw, num_workers=0))
    assert len(by_spec) == len(by_keywords) == N_TRAIN // 4
    for a, b in zip(by_spec, by_keywords, strict=True):
        assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"])
    with pytest.raises(TypeError, match="the spec holds it all"):
        build_loader(spec, batch_size=8)
    assert LoaderSpec("dali", tiny_dataset, device="cpu").options == DaliOptions()
    bad = [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(rank=2, world_size=2), "rank 2 is not one of 2"),
        (dict(features="mfcc"), "features must be wav or mel"),
        (dict(options=TorchOptions()), "loader 'dali' takes DaliOptions, not TorchOptions"),
        (dict(options=DaliOptions(decode="tpu")), "decode must be 'auto', 'gpu' or 'cpu'"),
        (dict(augment=Augment(gain_db=(-3, 3)), crop=False), "crop=False takes no augment"),
        (dict(augment={"gain_db": [-3, 3]}), "takes augment as an Augment"),
    ]
    for settings, message in bad:
        with pytest.raises(ConfigError, match=message):
            LoaderSpec("dali", tiny_dataset, device="cpu", **settings)
    with pytest.raises(ConfigError, match="unknown loader 'jax'"):
        LoaderSpec("jax", tiny_dataset)
    assert Augment(speed=[0.9, 1]).speed == (0.9, 1.0)  # a range, held as floats


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_gpu_loaders_yield_cuda_tensors_that_agree(tiny_dataset, written):
    ref = written["train"]
    runs = {}
    for backend in ALL:
        kw = {"num_workers": 2} if backend == "torch" else {}
        loader = make(backend, tiny_dataset, batch_size=8, shuffle=False, device="cuda", **kw)
        runs[backend] = run_epoch(loader)
        assert len(runs[backend]) == len(loader) == 4
        for b in runs[backend]:
            assert b["wav"].is_cuda and b["arkit"].is_cuda
            assert b["wav"].dtype == b["arkit"].dtype == torch.float32
            assert b["wav"].shape == (8, CLIP) and b["arkit"].shape == (8, FRAMES, 52)
    for backend, batches in runs.items():
        for a, b in zip(batches, runs["torch"], strict=True):
            assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"]), backend
        assert torch.equal(torch.cat([b["wav"] for b in batches]).cpu(), ref.wav[:32])
        assert torch.equal(torch.cat([b["arkit"] for b in batches]).cpu(), ref.arkit[:32])


@pytest.mark.gpu
def test_gpu_dali_default_decode_is_gpu_and_resumes(tiny_dataset):
    kw = dict(batch_size=4, shuffle=True, seed=9, device="cuda")
    loader = build_loader("dali", tiny_dataset, **kw)
    assert loader.decode == "gpu"
    straight = run_epoch(loader) + run_epoch(loader)
    first = build_loader("dali", tiny_dataset, **kw)
    seen = take(first, 11)
    resumed = build_loader("dali", tiny_dataset, **kw)
    resumed.load_state_dict(first.state_dict())
    rest = run_epoch(resumed)
    for a, b in zip(seen + rest, straight, strict=True):
        assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"])


@pytest.mark.gpu
def test_gpu_value_check_waits_on_the_batch_device_not_the_current_one():
    """The pinned min/max of a batch on cuda:1 is read behind an event on cuda:1's stream,
    even while cuda:0 is the current device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs: a batch on cuda:1 while cuda:0 is current")
    from pipeline.loaders.dali_loader import _to_host_behind_event

    torch.cuda.set_device(0)
    with torch.cuda.device(1):
        torch.cuda._sleep(1 << 31)  # a second or so of work queued ahead on cuda:1's stream
        bounds = torch.tensor([0.25, 0.75], device="cuda:1") * 2
    host, ready = _to_host_behind_event(bounds)
    assert not ready.query()  # behind cuda:1's work; on cuda:0's idle stream it would be done
    ready.synchronize()
    assert host.tolist() == [0.5, 1.5] and host.is_pinned()


@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_cuda_graph_serializes_without_a_gpu(tiny_dataset, decode):
    """The CUDA graph, defined with GPU operators, serializes on a CPU machine."""
    blob = serialized_graph(tiny_dataset, decode)
    assert b"readers__Webdataset" in blob and b"gpu" in blob
    if decode == "gpu":
        assert b"Reinterpret" in blob and b"decoders__Audio" not in blob
    else:
        assert b"decoders__Audio" in blob and b"Reinterpret" not in blob
    # the same definition without GPU operators mentions no GPU placement at all
    cpu = dali_graph(tiny_dataset, decode, device_id=None).serialize()
    assert b"gpu" not in cpu
    assert {device for _, device in graph_of(cpu)[0]} == {"cpu"}


@pytest.mark.gpu
def test_gpu_cuda_graph_serializes(tiny_dataset):
    blob = dali_graph(tiny_dataset, "gpu").serialize()
    assert isinstance(blob, bytes) and len(blob) > 0
    assert b"gpu" in blob and b"readers__Webdataset" in blob
