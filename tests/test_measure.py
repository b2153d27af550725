"""benchmarks/measure.py on fake rows: what a repeat times, how repeats are summarised and
compared, and the CPU time of the process tree.

The fake rows move a fake clock by known amounts, so the tests check exact times and shares,
never how fast this machine is; the real clocks are checked by lower bounds on CPU time.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import pytest
import torch

from benchmarks.measure import (
    MIN_CPU_WINDOW_S,
    Row,
    add_ratios,
    limit_for,
    measure,
    process_tree_cpu_s,
    run_repeats,
    summarize,
    trainer_step,
)
from pipeline.shards.manifest import Manifest

CPU = torch.device("cpu")


def spin(seconds: float) -> None:
    """Busy work: ``seconds`` of this thread's CPU time."""
    t = time.thread_time()
    while time.thread_time() - t < seconds:
        pass


class FakeClock:
    """Wall and CPU seconds that move only when told: ``sleep`` moves the wall clock, ``spin``
    both. Steps of binary fractions (1/8, 1/4, ...) keep every sum exact."""

    def __init__(self) -> None:
        self.now, self.cpu_s = 100.0, 7.0

    def __call__(self) -> float:
        return self.now

    def cpu(self) -> float:
        return self.cpu_s

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def spin(self, seconds: float) -> None:
        self.now += seconds
        self.cpu_s += seconds


class FakeRow:
    """A row whose ``next()`` runs ``work(delays[i])`` first (the last delay repeats) and that
    records the epochs it was opened at, the batches drawn and how often it was closed."""

    def __init__(self, name="fake", delays=(0.0,), modes=("loader", "train"), work=time.sleep):
        self.delays, self.work = delays, work
        self.opened: list[int] = []
        self.drawn = 0
        self.closed = 0
        self.row = Row(name, "a fake", "loader", modes, self.open)

    def open(self, epoch: int):
        self.opened.append(epoch)
        try:
            while True:
                self.work(self.delays[min(self.drawn, len(self.delays) - 1)])
                self.drawn += 1
                yield {"epoch": epoch}
        finally:
            self.closed += 1


def timed(fake: FakeRow, clock: FakeClock, epoch=0, warmup=1, batches=4, step=None) -> dict:
    return measure(fake.row, epoch, warmup, batches, step, CPU, clock=clock, cpu_clock=clock.cpu)


# ---------------------------------------------------------------- measure


def test_loader_mode_spends_its_time_waiting_for_data():
    clock = FakeClock()
    fake = FakeRow(delays=(0.125,), work=clock.sleep)
    r = timed(fake, clock, epoch=3, warmup=1, batches=5)
    assert r["wait_share"] == 1.0  # nothing but next() happens in the timed part
    assert r["s_per_batch"] == 0.125 and r["first_batch_s"] == 0.125
    assert r["cpu_s_per_batch"] == 0.0 and r["cores_busy"] == 0.0  # sleeping costs no CPU
    assert fake.opened == [3] and fake.drawn == 6 and fake.closed == 1


def test_train_mode_wait_share_is_the_data_share_of_each_step():
    clock = FakeClock()
    fake = FakeRow(delays=(0.125,), work=clock.sleep)
    batches_stepped = []

    def step(batch):
        batches_stepped.append(batch["epoch"])
        clock.spin(0.375)  # three times the data's time: a quarter of each step is waiting

    r = timed(fake, clock, epoch=7, warmup=2, batches=6, step=step)
    assert r["wait_share"] == 0.25
    assert r["s_per_batch"] == 0.5
    assert r["cpu_s_per_batch"] == 0.375 and r["cores_busy"] == 0.75
    assert batches_stepped == [7] * 8  # warm-up batches are stepped too, untimed


def test_only_the_timed_batches_count():
    # two slow warm-up batches (a pipeline build, a buffer fill), then four quick ones
    clock = FakeClock()
    fake = FakeRow(delays=(2.0, 1.0, 0.0625), work=clock.spin)
    r = timed(fake, clock, warmup=2, batches=4)
    assert r["first_batch_s"] == 2.0  # the first batch alone
    assert r["s_per_batch"] == 0.0625 and r["cpu_s_per_batch"] == 0.0625
    assert r["cores_busy"] == 1.0
    assert fake.drawn == 6 and fake.closed == 1


def test_too_short_a_window_has_no_cpu_figures():
    clock = FakeClock()
    fake = FakeRow(delays=(MIN_CPU_WINDOW_S / 4,), work=clock.spin)
    r = timed(fake, clock, warmup=1, batches=3)  # 3/4 of the window
    assert r["s_per_batch"] == pytest.approx(MIN_CPU_WINDOW_S / 4)
    assert r["cpu_s_per_batch"] is None and r["cores_busy"] is None


def test_unknown_cpu_time_has_no_cpu_figures():
    clock = FakeClock()
    fake = FakeRow(delays=(0.5,), work=clock.spin)
    r = measure(fake.row, 0, 1, 2, None, CPU, clock=clock, cpu_clock=lambda: None)
    assert r["s_per_batch"] == 0.5 and r["wait_share"] == 1.0
    assert r["cpu_s_per_batch"] is None and r["cores_busy"] is None


def test_cpu_time_of_busy_batches_is_counted_with_the_real_clocks():
    fake = FakeRow(delays=(0.05,), work=spin)
    r = measure(fake.row, 0, warmup=1, batches=4, step=None, device=CPU)
    assert r["cpu_s_per_batch"] >= 0.05  # process_time is exact for this process


def test_a_failing_batch_still_closes_the_epoch():
    def boom(_):
        raise RuntimeError("bad batch")

    fake = FakeRow(work=boom)
    with pytest.raises(RuntimeError, match="bad batch"):
        measure(fake.row, 0, warmup=1, batches=1, step=None, device=CPU)
    assert fake.closed == 1


def test_repeats_are_interleaved_across_rows_with_a_fresh_epoch_per_pass(capsys):
    a, b = FakeRow("a"), FakeRow("b", modes=("loader",))
    steps = []
    reps = run_repeats(
        [a.row, b.row],
        ["loader", "train"],
        repeats=2,
        warmup=1,
        batches=2,
        steps={"train": lambda batch: steps.append(batch["epoch"])},
        device=CPU,
        batch_size=4,
    )
    # (repeat, mode) passes read epochs 1, 2, 3, 4; b has no train mode
    assert a.opened == [1, 2, 3, 4] and b.opened == [1, 3]
    assert {k: len(v) for k, v in reps.items()} == {
        ("a", "loader"): 2,
        ("b", "loader"): 2,
        ("a", "train"): 2,
    }
    assert steps == [2] * 3 + [4] * 3  # the step runs in train mode only
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in lines] == [
        ["repeat", "1/2", "loader", "a"],
        ["repeat", "1/2", "loader", "b"],
        ["repeat", "1/2", "train", "a"],
        ["repeat", "2/2", "loader", "a"],
        ["repeat", "2/2", "loader", "b"],
        ["repeat", "2/2", "train", "a"],
    ]


# ---------------------------------------------------------------- summarize and ratios


def rep(s_per_batch, first=0.5, cpu=None, cores=None, wait=0.0):
    return {
        "s_per_batch": s_per_batch,
        "first_batch_s": first,
        "cpu_s_per_batch": cpu,
        "cores_busy": cores,
        "wait_share": wait,
    }


def test_summarize_takes_the_median_with_min_and_max():
    row = Row("dali-cpu", "DALI", "loader", ("loader", "train"), lambda e: iter(()))
    reps = [rep(0.2, first=1.0, cpu=0.08, cores=2.0), rep(0.1, first=3.0), rep(0.4, first=2.0)]
    reps[2].update(cpu_s_per_batch=0.04, cores_busy=1.0)
    s = summarize(row, "loader", reps, batch_size=8, sample_bytes=500_000)
    assert (s["name"], s["mode"], s["kind"], s["what"]) == ("dali-cpu", "loader", "loader", "DALI")
    assert s["median_s_per_batch"] == 0.2
    assert (s["min_s_per_batch"], s["max_s_per_batch"]) == (0.1, 0.4)
    assert s["samples_per_s"] == pytest.approx(40.0)
    assert (s["samples_per_s_min"], s["samples_per_s_max"]) == pytest.approx((20.0, 80.0))
    assert s["mb_per_s"] == pytest.approx(40 * 0.5)
    assert s["first_batch_s"] == 2.0
    assert s["repeats_s_per_batch"] == [0.2, 0.1, 0.4]
    # the repeat without CPU figures is left out of their median: (0.08 + 0.04) / 2 per batch
    assert s["cpu_ms_per_sample"] == pytest.approx(1000 * 0.06 / 8)
    assert s["cores_busy"] == pytest.approx(1.5)
    assert "steps_per_s" not in s and "wait_share" not in s


def test_summarize_train_mode_adds_steps_and_wait_share_and_no_cpu_when_unmeasured():
    row = Row("torch", "DataLoader", "loader", ("loader", "train"), lambda e: iter(()))
    reps = [rep(0.25, wait=0.5), rep(0.5, wait=0.1), rep(0.125, wait=0.3)]
    s = summarize(row, "train", reps, batch_size=4, sample_bytes=1)
    assert s["steps_per_s"] == pytest.approx(4.0)
    assert s["samples_per_s"] == pytest.approx(16.0)
    assert (s["wait_share"], s["wait_share_min"], s["wait_share_max"]) == (0.3, 0.1, 0.5)
    assert s["cpu_ms_per_sample"] is None and s["cores_busy"] is None


def summary(name, mode, sps, kind="loader"):
    return {"name": name, "mode": mode, "kind": kind, "samples_per_s": sps}


def test_limit_for_prefers_the_device_limits():
    assert limit_for("loader", {"torch", "read-only", "h2d-pinned"}) == "h2d-pinned"
    assert limit_for("loader", {"torch", "read-only"}) == "read-only"
    assert limit_for("loader", {"torch"}) is None
    assert limit_for("train", {"synthetic-cpu", "synthetic-gpu"}) == "synthetic-gpu"
    assert limit_for("train", {"torch", "synthetic-cpu"}) == "synthetic-cpu"


def test_add_ratios_within_each_mode():
    results = [
        summary("torch", "loader", 100.0),
        summary("dali-gpu", "loader", 800.0),
        summary("read-only", "loader", 4000.0, "limit"),
        summary("h2d-pinned", "loader", 1600.0, "limit"),
        summary("torch", "train", 50.0),
        summary("dali-gpu", "train", 150.0),
        summary("synthetic-cpu", "train", 200.0, "limit"),
    ]
    add_ratios(results)
    by = {(r["name"], r["mode"]): r for r in results}
    assert {r["limit"] for r in results if r["mode"] == "loader"} == {"h2d-pinned"}
    assert {r["limit"] for r in results if r["mode"] == "train"} == {"synthetic-cpu"}
    assert by["dali-gpu", "loader"]["ratio_to_torch"] == pytest.approx(8.0)
    assert by["dali-gpu", "loader"]["ratio_to_limit"] == pytest.approx(0.5)
    assert by["read-only", "loader"]["ratio_to_limit"] == pytest.approx(2.5)
    assert by["torch", "loader"]["ratio_to_torch"] == pytest.approx(1.0)
    assert by["dali-gpu", "train"]["ratio_to_torch"] == pytest.approx(3.0)
    assert by["dali-gpu", "train"]["ratio_to_limit"] == pytest.approx(0.75)
    assert by["synthetic-cpu", "train"]["ratio_to_limit"] == pytest.approx(1.0)


def test_add_ratios_without_torch_or_limit_rows_leaves_none():
    results = [summary("dali-cpu", "loader", 10.0), summary("read-only", "loader", 20.0, "limit")]
    results.append(summary("dali-cpu", "train", 5.0))
    add_ratios(results)
    assert all(r["ratio_to_torch"] is None for r in results)
    assert results[0]["ratio_to_limit"] == pytest.approx(0.5)
    assert results[2]["limit"] is None and results[2]["ratio_to_limit"] is None


# ---------------------------------------------------------------- CPU time of the process tree

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
# the grandchild spins, says so, then waits for its stdin to close; the child just waits for it
GRANDCHILD = BUSY + "print('busy done', flush=True)\nimport sys\nsys.stdin.read()\n"
CHILD = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {GRANDCHILD!r}])\n"


@pytest.mark.slow  # starts a child and a grandchild
def test_process_tree_cpu_counts_live_descendants_and_drops_exited_ones():
    before = process_tree_cpu_s()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "busy done"
        during = process_tree_cpu_s()
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    after = process_tree_cpu_s()
    # the grandchild's 0.5 s of spinning counts while it lives (start-ups add more)
    assert during - before >= 0.45
    # once exited it no longer counts: only differences over live workers mean anything
    assert during - after >= 0.4


def test_process_tree_cpu_counts_this_process_threads():
    before = process_tree_cpu_s()
    worker = threading.Thread(target=spin, args=(0.3,))
    worker.start()
    worker.join()
    assert process_tree_cpu_s() - before >= 0.3


# ---------------------------------------------------------------- the train step


def test_train_mode_runs_the_trainers_step_with_its_defaults(tmp_path):
    from train.config import TrainConfig
    from train.step import TrainStep

    m = Manifest.for_window(tmp_path, window_seconds=1.0)
    step = trainer_step(m, batch_size=2, device=CPU)
    t = TrainConfig()
    assert isinstance(step, TrainStep)
    assert step.target == "first_frame"
    assert step.grad_clip == t.grad_clip == 1.0  # the copy this replaced had no clipping
    assert step.opt.param_groups[0]["lr"] == t.lr == 1e-3
    assert step.opt.param_groups[0]["weight_decay"] == t.weight_decay
    assert type(step.net).__name__ == "SimplifiedModel"
    g = torch.Generator().manual_seed(1)
    batch = {
        "wav": torch.rand(2, m.clip_samples, generator=g) * 2 - 1,
        "arkit": torch.rand(2, m.frames, m.num_blendshapes, generator=g),
    }
    before = [p.detach().clone() for p in step.params]
    loss = step(batch)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    assert any(not torch.equal(a, b) for a, b in zip(before, step.params, strict=True))
