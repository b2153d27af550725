"""A bad batch never reaches the optimizer: ``TrainStep`` skips its update on a device-side flag,
with no host sync (CPU here; the CUDA variant runs where CUDA is)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from train.step import TrainStep, is_fused, make_optimizer

B, FRAMES, SHAPES, CHUNK = 3, 6, 52, 8
CPU = torch.device("cpu")


class Tiny(nn.Module):
    """wav [B, FRAMES * CHUNK] -> one frame [B, 52] or the sequence [B, FRAMES, 52]."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.proj = nn.Linear(CHUNK, 16)
        self.head = nn.Linear(16, SHAPES)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.proj(wav.reshape(wav.shape[0], FRAMES, CHUNK)))
        y = torch.sigmoid(self.head(x))
        return y[:, 0, :] if self.target == "first_frame" else y


def batch(seed: int, device: torch.device = CPU) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "wav": (torch.rand(B, FRAMES * CHUNK, generator=g) * 2 - 1).to(device),
        "arkit": torch.rand(B, FRAMES, SHAPES, generator=g).to(device),
    }


def spoiled(kind: str, seed: int = 99, device: torch.device = CPU) -> dict[str, torch.Tensor]:
    """One bad value; in arkit it sits past frame 0, where target first_frame's loss never
    looks (only the whole-array check can catch it), except for kind nan_frame0."""
    b = batch(seed, device)
    if kind == "nan_wav":
        b["wav"][1, 5] = float("nan")
    elif kind == "nan_frame0":
        b["arkit"][1, 0, 7] = float("nan")
    else:
        b["arkit"][1, 3, 7] = {"nan": float("nan"), "inf": float("inf"), "1.5": 1.5, "-0.2": -0.2}[
            kind
        ]
    return b


def make(
    target: str,
    grad_clip: float | None = 1.0,
    device: torch.device = CPU,
    opt=None,
    weight_decay: float = 0.01,
) -> TrainStep:
    torch.manual_seed(0)
    net = Tiny(target).to(device)
    if opt is None:
        opt = make_optimizer(net.parameters(), 1e-2, weight_decay, device)
    else:
        opt = opt(net.parameters())
    return TrainStep(net, opt, device, target, grad_clip, amp=False)


def snapshot(step: TrainStep) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    params = [p.detach().clone() for p in step.params]
    state = [
        {k: v.clone() for k, v in step.opt.state.get(p, {}).items() if torch.is_tensor(v)}
        for p in step.params
    ]
    return params, state


def assert_same(a, b) -> None:
    """Bit-identical; state ``a`` holds and ``b`` lacks must be fresh (zeros: an Adam's first
    step makes its state, and a skipped first step leaves it as made)."""
    (pa, sa), (pb, sb) = a, b
    assert len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb, strict=True):
        assert set(y) <= set(x)
        for k in x:
            assert torch.equal(x[k], y[k] if k in y else torch.zeros_like(x[k])), k


KINDS = ["nan", "inf", "1.5", "-0.2", "nan_wav", "nan_frame0"]


# ---------------------------------------------------------------- the optimizer


def test_the_trainers_optimizer_is_fused_adamw_with_its_settings():
    net = nn.Linear(3, 2)
    opt = make_optimizer(net.parameters(), 3e-3, 0.05, CPU)
    assert type(opt) is torch.optim.AdamW and is_fused(opt)
    g = opt.param_groups[0]
    assert g["lr"] == 3e-3 and g["weight_decay"] == 0.05 and len(g["params"]) == 2


def test_without_a_fused_kernel_the_optimizer_falls_back_to_plain_adamw(monkeypatch):
    class NoFused(torch.optim.AdamW):
        def __init__(self, params, fused=None, **kw) -> None:
            if fused:
                raise RuntimeError("`fused=True` requires ... supported devices")
            super().__init__(params, fused=fused, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    opt = make_optimizer(nn.Linear(3, 2).parameters(), 1e-3, 0.1, CPU)
    assert type(opt) is NoFused and not is_fused(opt)
    assert opt.param_groups[0]["capturable"] is False  # CPU: AdamW cannot capture there
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.1


# ---------------------------------------------------------------- good and bad batches


@pytest.mark.parametrize("target", ["first_frame", "sequence"])
def test_a_good_batch_steps(target):
    step = make(target)
    before = snapshot(step)
    loss = step(batch(1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    after = snapshot(step)
    assert all(not torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
    assert all(s["step"].item() == 1 for s in after[1])
    assert not step.last_skipped.item() and step.skipped.item() == 0


@pytest.mark.parametrize("first", [False, True], ids=["after_a_step", "as_first_step"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["first_frame", "sequence"])
def test_a_bad_batch_leaves_params_and_state_bit_identical(target, kind, first):
    step, twin = make(target), make(target)
    if not first:
        step(batch(1))
        twin(batch(1))
    before = snapshot(step)
    step(spoiled(kind))
    assert step.last_skipped.item() and step.skipped.item() == 1
    assert_same(snapshot(step), before)
    if not first:
        assert all(s["step"].item() == 1 for s in before[1])
    # the next good batch steps exactly as if the bad one had never come
    step(batch(2))
    twin(batch(2))
    assert_same(snapshot(step), snapshot(twin))
    assert not step.last_skipped.item() and step.skipped.item() == 1
    assert all(s["step"].item() == (1 if first else 2) for s in snapshot(step)[1])


def test_a_nan_in_wav_is_caught_where_loss_and_clipping_miss_it():
    """Frame 0 reads the wav's first chunk only: a NaN in the third leaves the loss finite,
    yet its gradient (0 * NaN) would poison the weights; no clipping, so no norm to check."""
    step = make("first_frame", grad_clip=None)
    step(batch(1))
    before = snapshot(step)
    b = batch(3)
    b["wav"][1, 2 * CHUNK + 1] = float("nan")
    loss = step(b)
    assert torch.isfinite(loss) and step.skipped.item() == 1
    assert_same(snapshot(step), before)


def test_the_skip_count_adds_up():
    step = make("first_frame")
    for i, kind in enumerate([None, "nan", None, "1.5", "nan_wav", None]):
        step(batch(i) if kind is None else spoiled(kind))
    assert step.skipped.item() == 3
    assert all(s["step"].item() == 3 for s in snapshot(step)[1])


def test_a_non_finite_loss_alone_is_caught():
    class Boom(Tiny):
        def forward(self, wav):
            return super().forward(wav) * float("inf")

    torch.manual_seed(0)
    net = Boom("first_frame")
    step = TrainStep(net, make_optimizer(net.parameters(), 1e-2, 0.0, CPU), CPU, "first_frame")
    before = snapshot(step)
    loss = step(batch(1))
    assert not torch.isfinite(loss) and step.skipped.item() == 1
    assert_same(snapshot(step), before)


def test_gradient_clipping_still_applies_on_good_batches():
    moved = {}
    for clip in (None, 1e-9):
        step = make("first_frame", grad_clip=clip, weight_decay=0.0)
        before = snapshot(step)[0]
        step(batch(1))
        moved[clip] = max(
            (p - b).abs().max().item() for p, b in zip(step.params, before, strict=True)
        )
    assert moved[None] > 1e-3  # Adam's first step: about lr per element
    assert 0 < moved[1e-9] < 0.1 * moved[None]  # a norm of 1e-9: grads far below Adam's eps


def test_the_flag_is_never_read_on_the_host(monkeypatch):
    step, twin = make("sequence"), make("sequence")
    good, bad = batch(1), spoiled("nan")
    twin(batch(1))

    def refuse(*args, **kw):
        raise AssertionError("host sync in the train step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with pytest.raises(AssertionError, match="host sync"):
        bool(torch.tensor(True))  # the trap is armed
    step(good)
    step(bad)
    step(batch(2))
    monkeypatch.undo()
    twin(batch(2))
    assert step.skipped.item() == 1
    assert_same(snapshot(step), snapshot(twin))


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    dev = torch.device("cuda")
    step, twin = make("first_frame", device=dev), make("first_frame", device=dev)
    assert is_fused(step.opt)
    good, bad, good2 = batch(1, dev), spoiled("nan", device=dev), batch(2, dev)
    twin(batch(1, dev))
    twin(batch(2, dev))
    step(good)  # the first step creates the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(bad)
        step(good2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.skipped.item() == 1
    assert_same(snapshot(step), snapshot(twin))


# ---------------------------------------------------------------- optimizers not made here


def test_a_plain_adamw_is_switched_to_fused_and_skips_too():
    step = make("first_frame", opt=lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    twin = make("first_frame", opt=lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True))
    step(batch(1))
    twin(batch(1))
    assert is_fused(step.opt)
    before = snapshot(step)
    step(spoiled("1.5"))
    assert_same(snapshot(step), before)
    step(batch(2))
    twin(batch(2))
    assert_same(snapshot(step), snapshot(twin))


def test_a_state_saved_by_a_plain_adamw_is_resumed_fused():
    """``load_state_dict`` takes the saved groups' ``fused``: an old checkpoint turns it off."""
    torch.manual_seed(0)
    old = Tiny("first_frame")
    old_opt = torch.optim.AdamW(old.parameters(), lr=1e-2, weight_decay=0.01)
    b = batch(1)
    nn.functional.mse_loss(old(b["wav"]), b["arkit"][:, 0]).backward()
    old_opt.step()
    step = make("first_frame")
    step.net.load_state_dict(old.state_dict())
    step.opt.load_state_dict(old_opt.state_dict())
    assert not is_fused(step.opt)
    before = snapshot(step)
    step(spoiled("nan"))
    assert is_fused(step.opt) and step.skipped.item() == 1
    assert_same(snapshot(step), before)
    step(batch(2))
    assert all(s["step"].item() == 2 for s in snapshot(step)[1])


@pytest.mark.parametrize("first", [False, True], ids=["after_a_step", "as_first_step"])
def test_an_optimizer_without_a_fused_kernel_is_restored_on_the_device(monkeypatch, first):
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
    step, twin = make("sequence", opt=sgd), make("sequence", opt=sgd)
    if not first:
        step(batch(1))
        twin(batch(1))
    before = snapshot(step)
    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("host sync"))
    step(spoiled("-0.2"))
    monkeypatch.undo()
    assert step.skipped.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(snapshot(step)[0], before[0], strict=True))
    for s, b in zip(snapshot(step)[1], before[1], strict=True):  # the first step's new state: zeros
        for k, v in s.items():
            assert torch.equal(v, b[k] if k in b else torch.zeros_like(v))
    step(batch(2))
    twin(batch(2))
    assert all(torch.equal(a, b) for a, b in zip(step.params, twin.params, strict=True))


# ---------------------------------------------------------------- DDP: every rank skips


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)
        net = Tiny("first_frame")
        ddp = nn.parallel.DistributedDataParallel(net)
        step = TrainStep(ddp, make_optimizer(net.parameters(), 1e-2, 0.0, CPU), CPU, "first_frame")
        step(batch(1 + rank))
        after_one = [p.detach().clone() for p in net.parameters()]
        # only rank 1 sees the bad value, past frame 0: its loss and the gradients are finite
        step(spoiled("1.5", seed=5) if rank == 1 else batch(5))
        after_two = [p.detach().clone() for p in net.parameters()]
        step(batch(7 + rank))
        torch.save(
            {
                "unchanged": all(
                    torch.equal(a, b) for a, b in zip(after_one, after_two, strict=True)
                ),
                "skipped": step.skipped.item(),
                "params": [p.detach().clone() for p in net.parameters()],
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_one_ranks_bad_batch_is_skipped_by_every_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("TQDM_DISABLE", "1")
    mp.start_processes(
        _ddp_rank, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn", join=True
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["unchanged"] and r1["unchanged"]
    assert r0["skipped"] == r1["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"], strict=True))


# ---------------------------------------------------------------- through the trainer


class LateCheckLoader:
    """The real loader, but the 2nd batch's arkit gets a NaN that nothing raises on (as the
    CUDA loader's one-batch-late check would let through before raising)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for i, b in enumerate(self.inner):
            if i == 1:
                b = {**b, "arkit": b["arkit"].clone()}
                b["arkit"][0, 0, 0] = float("nan")
            yield b


def test_the_trainer_skips_a_nan_batch_the_loader_let_through(tmp_path, tiny_dataset):
    from pipeline import build_loader
    from train.builders import build_step
    from train.config import Config
    from train.trainer import Trainer

    class Mean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(1, 52)

        def forward(self, wav):
            return torch.sigmoid(self.head(wav.abs().mean(1, keepdim=True)))

    cfg = Config()
    cfg.run.dir, cfg.run.progress, cfg.train.epochs, cfg.train.log_every = (
        str(tmp_path),
        False,
        1,
        1,
    )
    inner = build_loader("torch", tiny_dataset, batch_size=6, device="cpu", num_workers=0)
    model = Mean()
    trainer = Trainer(
        cfg, model, LateCheckLoader(inner), None, CPU, step=build_step(cfg, model, CPU)
    )
    trainer.fit()
    assert trainer.step == 6  # 36 samples / 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["skipped_steps"] for r in train] == [0, 1, 1, 1, 1, 1]
    assert train[-1]["skipped_steps"] == 1
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    for s in state["optimizer"]["state"].values():
        assert s["step"].item() == 5  # 6 batches, one skipped
        assert torch.isfinite(s["exp_avg"]).all() and torch.isfinite(s["exp_avg_sq"]).all()
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    assert trainer.train_step.skipped.item() == 1
