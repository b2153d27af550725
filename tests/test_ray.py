"""make_shards --engine ray against a local Ray on 127.0.0.1 (2 CPUs, no dashboard), started
once for this module: the same bytes as the local engine (synthetic corpus; Live Link takes with
rejects; ``s3://`` in and out through a real moto_server), a worker killed on its first task and
retried, a driver killed mid-run and rerun.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import make_shards
from pipeline.shards import storage
from pipeline.shards.verify import check_dataset
from tests.helpers import moto_server, pcm16_take, random_anim, write_live_link_csv

ray = pytest.importorskip("ray")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "arkit-ray"
SYNTH = ("--synthetic", "24", "--samples-per-shard", "4", "--window-seconds", "4")


@pytest.fixture(scope="module")
def cluster():
    """A moto_server and a local Ray whose workers see it (they inherit this environment):
    Ray's GCS address, for a driver in another process."""
    with moto_server() as url, pytest.MonkeyPatch.context() as mp:
        env = {"AWS_ENDPOINT_URL": url, "AWS_REGION": "us-east-1"}
        env |= {"AWS_ACCESS_KEY_ID": "ray-test-key", "AWS_SECRET_ACCESS_KEY": "ray-test-secret"}
        for k, v in {**env, "PYTHONPATH": str(ROOT)}.items():
            mp.setenv(k, v)
        mp.delenv("RAY_ADDRESS", raising=False)
        boto3.session.Session().client("s3").create_bucket(Bucket=BUCKET)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


def run(out, *args: str, engine: str = "ray") -> int:
    return make_shards.main([*args, "--out", str(out), "--quiet", "--engine", engine])


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))}


def convert_both(out: Path, *args: str) -> tuple[dict, dict]:
    """The dataset from the local engine (2 workers) and from Ray, both written to ``out``
    (the manifest records ``--out``)."""
    assert run(out, *args, "--workers", "2", engine="local") == 0
    local = tree(out)
    shutil.rmtree(out)
    assert run(out, *args) == 0
    return local, tree(out)


@pytest.fixture(scope="module")
def synthetic_local(cluster, tmp_path_factory) -> tuple[Path, dict]:
    """Where the synthetic runs write, and what the local engine wrote there."""
    out = tmp_path_factory.mktemp("ray") / "ds"
    assert run(out, *SYNTH, "--workers", "2", engine="local") == 0
    local = tree(out)
    shutil.rmtree(out)
    return out, local


def live_link_takes(src: Path) -> None:
    """Five good takes and four rejects: no animation, NaN, a take shorter than a window and
    animation 2 s shorter than its audio."""
    for i in range(5):
        pcm16_take(src, f"take{i}", 6.0 + i, seed=i)
    pcm16_take(src, "lonely", 6.0, seed=10, anim=None)
    pcm16_take(src, "nan", 6.0, seed=11, anim=None)
    bad = random_anim(6.0, 11)
    bad[30, 4] = np.nan
    write_live_link_csv(src / "nan.csv", bad)
    pcm16_take(src, "short", 2.0, seed=12)
    pcm16_take(src, "mismatch", 8.0, seed=13, anim_seconds=6.0)


def test_ray_writes_the_local_engines_bytes(cluster, synthetic_local, tmp_path):
    out, local = synthetic_local
    assert run(out, *SYNTH) == 0
    assert tree(out) == local and "train-000004.tar" in local
    shutil.rmtree(out)

    src = tmp_path / "takes"
    live_link_takes(src)
    args = ("--input", str(src), "--window-seconds", "4", "--samples-per-shard", "3")
    local, on_ray = convert_both(tmp_path / "ll", *args)
    assert on_ray == local
    rejected = [line for line in local["rejects.jsonl"].decode().splitlines()]
    assert len(rejected) == 4 and all(str(src) in line for line in rejected)


@pytest.mark.slow
def test_s3_in_and_out_on_both_engines(cluster, tmp_path, capsys):
    src = tmp_path / "takes"
    live_link_takes(src)
    s3 = storage.client()
    for f in sorted(src.iterdir()):
        s3.upload_file(str(f), BUCKET, f"captures/{f.name}")
    args = ("--input", f"s3://{BUCKET}/captures", "--window-seconds", "4")
    datasets = {}
    for engine in ("local", "ray"):
        url = f"s3://{BUCKET}/{engine}"
        assert run(url, *args, "--samples-per-shard", "3", engine=engine) == 0
        assert [str(p) for p in check_dataset(url)] == []
        datasets[engine] = {n: storage.read_bytes(f"{url}/{n}") for n in storage.list_names(url)}
    local, on_ray = datasets["local"], datasets["ray"]
    manifest = {e: d.pop("manifest.json").decode() for e, d in datasets.items()}
    assert on_ray == local and any(n.endswith(".tar") for n in local)
    assert manifest["ray"] == manifest["local"].replace(f"{BUCKET}/local", f"{BUCKET}/ray")
    assert f"s3://{BUCKET}/captures/lonely.wav" in local["rejects.jsonl"].decode()
    assert "ray-test-secret" not in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["take", "shard"])
def test_a_worker_killed_on_its_first_task_is_retried(
    cluster, synthetic_local, tmp_path, monkeypatch, stage
):
    """A worker dies in its first take conversion, or its first shard write: Ray runs the
    task again and the dataset is the local engine's, byte for byte."""
    out, local = synthetic_local
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("ARKIT_RAY_FAULT", f"{stage}:{marker}")
    assert run(out, *SYNTH) == 0
    assert marker.exists()  # a worker did die
    assert tree(out) == local
    shutil.rmtree(out)


# the driver, in its own process, joins the test's cluster and kills itself once two shards
# are written: a driver killed mid-run, at a known point
KILLED_DRIVER = """
import os, signal, sys
from pipeline import make_shards
from pipeline.convert import rayengine

write = rayengine.RayEngine.write

def write_two_then_die(self, jobs):
    for k, result in enumerate(write(self, jobs)):
        if k == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        yield result

rayengine.RayEngine.write = write_two_then_die
sys.exit(make_shards.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_driver_killed_mid_run_is_rerun_reusing_takes_and_shards(
    cluster, synthetic_local, capsys
):
    out, local = synthetic_local
    cmd = [sys.executable, "-c", KILLED_DRIVER, *SYNTH, "--out", str(out), "--quiet"]
    proc = subprocess.run([*cmd, "--engine", "ray", "--ray-address", cluster], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    work = out / "in-progress"
    assert len(list((work / "takes").glob("*.json"))) == 24
    first = os.stat(work / "train-000000.tar").st_ino
    assert run(out, *SYNTH, "--ray-address", cluster) == 0
    assert tree(out) == local
    assert os.stat(out / "train-000000.tar").st_ino == first  # the shard written before
    shutil.rmtree(out)


def test_an_unreachable_cluster_is_one_error_line(tmp_path, capsys):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    assert run(tmp_path / "ds", "--synthetic", "2", "--ray-address", address) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: cannot reach the Ray cluster at {address} (Connection refused): start one "
        "(`ray start --head`) or check --ray-address / RAY_ADDRESS"
    ]
