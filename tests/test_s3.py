"""Datasets in ``s3://bucket/prefix``, against a real S3-compatible server (``moto_server``, the
test extra) on 127.0.0.1: make_shards uploads, both loaders read, verify names damage, training
runs, and failures of the store are one ``error:`` line in bounded time, without credentials."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from core.errors import DatasetError
from pipeline import build_loader, make_shards
from pipeline.convert.s3out import UPLOAD_MARK
from pipeline.shards import s3 as s3_client_module
from pipeline.shards import storage
from pipeline.shards.manifest import load_manifest
from tests.helpers import SMALL_RUN, moto_process, moto_server

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "arkit-test"
# credentials that must never appear in any output
KEY_ID, SECRET = "AKIAARKITTESTKEY0001", "arkit-test-secret-never-printed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aws_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
    }


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a session-wide moto_server holding the bucket ``BUCKET``."""
    with moto_server() as url, pytest.MonkeyPatch.context() as mp:
        for k, v in aws_env(url).items():
            mp.setenv(k, v)
        boto3.session.Session().client("s3").create_bucket(Bucket=BUCKET)
        yield url


@pytest.fixture(autouse=True)
def s3_env(s3_server, monkeypatch, tmp_path):
    for k, v in aws_env(s3_server).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))  # the shard cache's
    return s3_server


@pytest.fixture(scope="session")
def s3_dataset(s3_server, tiny_dataset) -> str:
    """The tiny dataset, made by make_shards --out s3:// with the same arguments."""
    url = f"s3://{BUCKET}/tiny"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in aws_env(s3_server).items():
            mp.setenv(k, v)
        args = ["--synthetic", "40", "--samples-per-shard", "16", "--workers", "2", "--quiet"]
        assert make_shards.main([*args, "--out", url]) == 0
    return url


def s3():
    """A boto3 client for the test's own setup: storage's (made once, like every client)."""
    return storage.client()


def keys(prefix: str) -> list[str]:
    page = s3().list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return sorted(o["Key"][len(prefix) + 1 :] for o in page.get("Contents", []))


def copy_prefix(src: str, dst: str) -> str:
    for name in keys(src):
        s3().copy_object(
            Bucket=BUCKET,
            Key=f"{dst}/{name}",
            CopySource={"Bucket": BUCKET, "Key": f"{src}/{name}"},
        )
    return f"s3://{BUCKET}/{dst}"


def copy_to_server(endpoint: str, prefix: str = "tiny") -> str:
    """The objects under ``prefix`` copied into the bucket of another server."""
    dst = boto3.session.Session().client("s3", endpoint_url=endpoint)
    dst.create_bucket(Bucket=BUCKET)
    for name in keys(prefix):
        body = s3().get_object(Bucket=BUCKET, Key=f"{prefix}/{name}")["Body"].read()
        dst.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=body)
    return f"s3://{BUCKET}/{prefix}"


class SlowLink:
    """A TCP proxy on 127.0.0.1 in front of ``endpoint``, with the uplink of a slow line: what
    clients send reaches the server at ``rate`` bytes/s (all connections together), queued
    without bound meanwhile, as a congested link buffers it; answers come back at full speed.
    A connection its client closes is dropped with what it still had queued."""

    def __init__(self, endpoint: str, rate: int) -> None:
        target = urlsplit(endpoint)
        self.target, self.rate = (target.hostname, target.port), rate
        self.free_at = time.monotonic()  # when the line is free for the next chunk
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            queue: deque[bytes] = deque()
            more = threading.Condition()
            for run in (self._queue_up, self._send_up, self._send_down):
                threading.Thread(
                    target=run, args=(client, server, queue, more), daemon=True
                ).start()

    def _queue_up(self, client, server, queue, more) -> None:
        while True:
            try:
                data = client.recv(1 << 16)
            except OSError:
                data = b""
            with more:
                queue.append(data)  # b"": the client is gone
                more.notify()
            if not data:
                return

    def _send_up(self, client, server, queue, more) -> None:
        while True:
            with more:
                more.wait_for(lambda: queue)
                data = queue.popleft()
            if not data:
                break
            for i in range(0, len(data), 1 << 14):
                chunk = data[i : i + (1 << 14)]
                with self.lock:
                    self.free_at = max(self.free_at, time.monotonic()) + len(chunk) / self.rate
                    wait = self.free_at - time.monotonic()
                time.sleep(max(0.0, wait))
                if queue and not queue[-1]:  # the client left: drop the rest
                    break
                try:
                    server.sendall(chunk)
                except OSError:
                    break
        server.close()

    def _send_down(self, client, server, queue, more) -> None:
        while True:
            try:
                data = server.recv(1 << 16)
                client.sendall(data)
            except OSError:
                data = b""
            if not data:
                client.close()
                return

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def no_secret(*texts: str) -> None:
    for text in texts:
        assert KEY_ID not in text and SECRET not in text


# ---------------------------------------------------------------- reading


def test_s3_urls_join_and_name_like_paths_and_bad_ones_are_refused():
    from pipeline.shards.tars import idx_path

    root = storage.location("s3://my-bucket/some/prefix/")
    assert root == storage.S3Url("my-bucket", "some/prefix") and str(root) == (
        "s3://my-bucket/some/prefix"
    )
    tar = root / "train-000001.tar"
    assert (str(tar), tar.name) == (
        "s3://my-bucket/some/prefix/train-000001.tar",
        "train-000001.tar",
    )
    assert str(idx_path(str(tar))) == "s3://my-bucket/some/prefix/train-000001.idx"
    assert (
        str(storage.location("s3://my-bucket") / "manifest.json") == "s3://my-bucket/manifest.json"
    )
    assert storage.location("data/s3:x") == Path("data/s3:x")  # a local path stays a Path
    for bad in ("s3://", "s3://B/x", "s3://ab/x", "s3://bucket/a//b"):
        with pytest.raises(DatasetError, match="is not an S3 URL of the form s3://bucket/prefix"):
            storage.location(bad)


def test_the_uploaded_dataset_is_the_local_one_at_s3_paths(s3_dataset, tiny_dataset):
    m, local = load_manifest(s3_dataset), load_manifest(tiny_dataset)
    assert m.identity == local.identity and m.shards == local.shards
    assert str(m.root) == s3_dataset
    assert m.tar_paths("train")[0] == f"{s3_dataset}/train-000000.tar"
    assert m.idx_paths("val") == [f"{s3_dataset}/val-000000.idx"]
    files = {"manifest.json", "rejects.jsonl", "sync.jsonl", "sync.svg"} | {
        n for s in local.shards for n in (s.name, s.name.replace(".tar", ".idx"))
    }
    assert keys("tiny") == sorted(files)  # no upload marker left
    assert storage.stat(m.tar_paths("train")[1]).size == m.shards[1].bytes


@pytest.mark.parametrize(
    "backend,options",
    [
        ("dali", {}),
        ("torch", {"num_workers": 0}),
        # S3 read directly, without the shard cache: DALI's own S3 client, a GET per sample
        ("dali", {"cache_limit": 0}),
        ("torch", {"num_workers": 0, "cache_limit": 0}),
        # worker processes: the slow suite
        pytest.param("torch", {"num_workers": 2}, marks=pytest.mark.slow),
    ],
)
def test_loaders_read_s3_bit_for_bit_like_the_local_copy(
    s3_dataset, tiny_dataset, backend, options
):
    kw = dict(batch_size=4, device="cpu", shuffle=True, seed=3, **options)
    remote = build_loader(backend, s3_dataset, **kw)
    kw.pop("cache_limit", None)
    local = build_loader(backend, str(tiny_dataset), **kw)
    got, want = list(remote), list(local)
    assert len(got) == len(want) == len(local) == 9  # 36 train samples, the whole epoch
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"])
    assert not torch.equal(got[0]["wav"], got[1]["wav"])


def test_verify_names_a_truncated_and_a_missing_object(s3_dataset, capsys):
    assert make_shards.main(["--verify", s3_dataset]) == 0
    assert capsys.readouterr().out.strip() == f"{s3_dataset}: OK"
    url = copy_prefix("tiny", "damaged")
    tar = s3().get_object(Bucket=BUCKET, Key="damaged/train-000001.tar")["Body"].read()
    s3().put_object(Bucket=BUCKET, Key="damaged/train-000001.tar", Body=tar[: len(tar) // 2])
    s3().delete_object(Bucket=BUCKET, Key="damaged/train-000002.tar")
    assert make_shards.main(["--verify", url]) == 1
    out = capsys.readouterr().out
    assert f"{url}/train-000001.tar: {len(tar) // 2} bytes, manifest says {len(tar)}" in out
    assert f"{url}/train-000002.tar: listed in the manifest but missing" in out
    assert out.splitlines()[-1].startswith(f"{url}: ") and "problems" in out
    no_secret(out)
    with pytest.raises(DatasetError, match="train-000001.tar: .* bytes, manifest says"):
        build_loader("torch", url, batch_size=4, device="cpu", num_workers=0)


def test_a_shard_changed_on_s3_is_named_at_the_next_epoch(s3_dataset):
    url = copy_prefix("tiny", "changing")
    loader = build_loader("torch", url, split="val", batch_size=4, device="cpu", num_workers=0)
    assert len(list(loader)) == 1
    tar = s3().get_object(Bucket=BUCKET, Key="changing/val-000000.tar")["Body"].read()
    s3().put_object(Bucket=BUCKET, Key="changing/val-000000.tar", Body=tar[:-1024])
    with pytest.raises(DatasetError, match="val-000000.tar: changed while the run was reading"):
        next(iter(loader))


# a trainer run per loader: the DALI one in the slow suite (DALI reads s3 in the test above)
@pytest.mark.parametrize("loader", [pytest.param("dali", marks=pytest.mark.slow), "torch"])
def test_training_from_s3_writes_its_checkpoint(s3_dataset, tmp_path, capsys, loader):
    from train.cli import main

    args = ["--loader", loader, "--debug"]
    for s in (*SMALL_RUN, f"data.dir={s3_dataset}", f"run.dir={tmp_path}", "train.epochs=1"):
        args += ["--set", s]
    assert main(args) == 0
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["config"]["data"]["dir"] == s3_dataset
    no_secret(*capsys.readouterr())


@pytest.mark.slow  # a benchmark run of two loader rows (the loaders' s3 reads: tests above)
def test_the_benchmark_runs_the_loader_rows_over_s3(s3_dataset, tmp_path, capsys):
    from benchmarks import throughput
    from benchmarks.rows import select_rows

    args = ["--quick", "--data", s3_dataset, "--out", str(tmp_path), "--workers", "2"]
    assert throughput.main([*args, "--rows", "read-only"]) == 1
    assert "row read-only reads local files, not s3:// data" in capsys.readouterr().err
    local, remote = (
        select_rows(None, torch.device("cpu")),
        select_rows(None, torch.device("cpu"), remote=True),
    )
    assert set(local) - set(remote) == {"webdataset", "threads", "dali-cpu-mmap", "read-only"} | (
        {"spdl"} & set(local)
    )
    assert throughput.main([*args, "--modes", "loader", "--rows", "torch,dali-cpu"]) == 0
    result = json.loads((tmp_path / "throughput.json").read_text())
    assert result["env"]["dataset"]["dir"] == s3_dataset
    assert sorted(r["name"] for r in result["rows"]) == ["dali-cpu", "torch"]
    assert all(r["samples_per_s"] > 0 for r in result["rows"])
    assert "read once from S3" in capsys.readouterr().out


# ---------------------------------------------------------------- writing


def upload_failing_after(monkeypatch, n: int) -> list[str]:
    """``storage.upload`` that sends ``n`` files, then fails as a reset connection would; returns
    the list of the names it sent (appended as they go)."""
    real, sent = storage.upload, []

    def failing(src, dst):
        if len(sent) == n:
            raise storage.StorageError(f"{dst}: connection reset (injected)")
        real(src, dst)
        sent.append(dst.name)

    monkeypatch.setattr(storage, "upload", failing)
    return sent


def test_upload_puts_the_manifest_last_and_a_rerun_finishes_a_broken_one(
    monkeypatch, capsys, s3_dataset
):
    url, real = f"s3://{BUCKET}/half", storage.upload
    args = ["--synthetic", "8", "--samples-per-shard", "4", "--workers", "2", "--quiet"]
    sent = upload_failing_after(monkeypatch, 3)
    assert make_shards.main([*args, "--out", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: uploading the dataset to {url} failed after 3 of ")
    no_secret(err)
    assert "manifest.json" not in keys("half") and UPLOAD_MARK in keys("half")
    assert set(sent) < set(keys("half"))
    with pytest.raises(DatasetError, match="has no manifest.json, so it is not a complete"):
        load_manifest(url)

    def recording(src, dst):
        real(src, dst)
        sent.append(dst.name)

    sent.clear()
    monkeypatch.setattr(storage, "upload", recording)
    assert make_shards.main([*args, "--out", url]) == 0  # ours, unfinished: no --overwrite
    assert sent[-1] == "manifest.json" and len(sent) == len(set(sent))
    assert sorted(sent) == keys("half")  # the marker is gone, nothing else is there
    assert load_manifest(url).num_samples("train") + load_manifest(url).num_samples("val") == 8


def test_out_refuses_foreign_objects_and_replaces_our_dataset_only_with_overwrite(capsys):
    url, args = f"s3://{BUCKET}/mixed", ["--samples-per-shard", "2", "--workers", "2", "--quiet"]
    s3().put_object(Bucket=BUCKET, Key="mixed/notes.txt", Body=b"not ours")
    assert make_shards.main(["--synthetic", "4", "--out", url, *args]) == 1
    err = capsys.readouterr().err
    assert "holds objects that are not one of our datasets (notes.txt)" in err
    s3().delete_object(Bucket=BUCKET, Key="mixed/notes.txt")

    assert make_shards.main(["--synthetic", "8", "--out", url, *args]) == 0
    first = keys("mixed")
    assert make_shards.main(["--synthetic", "4", "--out", url, *args]) == 1
    assert "already holds a dataset; pass --overwrite" in capsys.readouterr().err
    s3().put_object(Bucket=BUCKET, Key="mixed/notes.txt", Body=b"not ours")
    assert make_shards.main(["--synthetic", "4", "--out", url, *args, "--overwrite"]) == 0
    m = load_manifest(url)
    ours = {"manifest.json", "rejects.jsonl", "sync.jsonl", "sync.svg"} | {
        n for s in m.shards for n in (s.name, s.name.replace(".tar", ".idx"))
    }
    assert set(keys("mixed")) == ours | {"notes.txt"}  # the old dataset's extra shards gone
    assert len(first) > len(ours)
    assert make_shards.main(["--verify", url]) == 0


def dataset_keys(m) -> set[str]:
    return {"manifest.json", "rejects.jsonl", "sync.jsonl", "sync.svg"} | {
        n for s in m.shards for n in (s.name, s.name.replace(".tar", ".idx"))
    }


def assert_whole(url: str, m, capsys) -> None:
    """``url`` holds the dataset ``m``: its manifest, verified in full, read by a loader."""
    assert load_manifest(url).identity == m.identity
    capsys.readouterr()
    assert make_shards.main(["--verify", url]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.strip() == f"{url}: OK"
    loader = build_loader("torch", url, batch_size=2, device="cpu", num_workers=0)
    assert sum(len(b["wav"]) for b in loader) == m.num_samples("train")


@pytest.mark.slow
def test_a_failed_or_killed_overwrite_keeps_the_old_dataset_and_the_rerun_finishes(
    monkeypatch, capsys
):
    """The new dataset goes up beside the old one under names the old manifest does not list,
    manifest last: an upload that fails, or a process killed in the middle of it, leaves the old
    dataset whole, and the rerun the error recommends succeeds beside a user's README."""
    prefix = "regen"
    url, real = f"s3://{BUCKET}/{prefix}", storage.upload
    args = ["--samples-per-shard", "2", "--val-fraction", "0", "--workers", "2", "--quiet"]
    assert make_shards.main(["--synthetic", "6", "--out", url, *args]) == 0
    old = load_manifest(url)
    assert [s.name for s in old.shards] == [f"train-00000{k}.tar" for k in range(3)]
    s3().put_object(Bucket=BUCKET, Key=f"{prefix}/README.md", Body=b"the user's")
    new = ["--synthetic", "4", "--seed", "1", "--out", url, *args, "--overwrite"]

    sent = upload_failing_after(monkeypatch, 3)
    assert make_shards.main(new) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: uploading the dataset to {url} failed after 3 of 8 files (")
    assert err.strip().endswith(
        "it still holds its previous dataset, whole (its manifest.json lists only the previous "
        "shards); rerun the same command to finish"
    ), err
    monkeypatch.setattr(storage, "upload", real)
    assert sent == ["train-b-000000.tar", "train-b-000000.idx", "train-b-000001.tar"]
    assert UPLOAD_MARK in keys(prefix)
    assert_whole(url, old, capsys)

    # killed in the middle of the upload (SIGKILL: no handler runs)
    kill = (
        "import os, signal, sys\n"
        "from pipeline import make_shards\n"
        "from pipeline.shards import storage\n"
        "real, sent = storage.upload, []\n"
        "def upload(src, dst):\n"
        "    if len(sent) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(src, dst)\n"
        "    sent.append(dst)\n"
        "storage.upload = upload\n"
        "sys.exit(make_shards.main(sys.argv[1:]))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", kill, *new], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == -9, res.stderr
    assert_whole(url, old, capsys)

    # the rerun the error recommends: the new dataset, the old one's objects gone, README kept
    assert make_shards.main(new) == 0
    m = load_manifest(url)
    assert [s.name for s in m.shards] == ["train-b-000000.tar", "train-b-000001.tar"]
    assert set(keys(prefix)) == dataset_keys(m) | {"README.md"}
    assert_whole(url, m, capsys)
    # the next replacement goes up under the first names again
    assert make_shards.main(["--synthetic", "2", *new[2:]]) == 0
    m = load_manifest(url)
    assert [s.name for s in m.shards] == ["train-000000.tar"]
    assert set(keys(prefix)) == dataset_keys(m) | {"README.md"}
    assert s3().get_object(Bucket=BUCKET, Key=f"{prefix}/README.md")["Body"].read() == (
        b"the user's"
    )


def test_old_objects_left_after_the_switch_are_warned_and_deleted_by_the_next_run(
    monkeypatch, capsys
):
    """Deleting the old dataset's objects fails after the new manifest is in: the new dataset
    is complete (exit 0), a warning says what is left, and the next --overwrite deletes it."""
    prefix = "leftover"
    url, real = f"s3://{BUCKET}/{prefix}", storage.delete
    args = ["--samples-per-shard", "4", "--val-fraction", "0", "--workers", "2", "--quiet"]
    assert make_shards.main(["--synthetic", "4", "--out", url, *args]) == 0
    old = dataset_keys(load_manifest(url)) - {"manifest.json", "rejects.jsonl", "sync.jsonl"}
    old -= {"sync.svg"}  # uploaded over in place, as rejects.jsonl

    def failing(dst):
        if dst.name in old:
            raise storage.StorageError(f"{dst}: connection reset (injected)")
        real(dst)

    monkeypatch.setattr(storage, "delete", failing)
    capsys.readouterr()
    assert make_shards.main(["--synthetic", "2", "--out", url, *args, "--overwrite"]) == 0
    monkeypatch.setattr(storage, "delete", real)
    err = capsys.readouterr().err
    assert err.startswith(
        f"warning: the new dataset in {url} is complete, but deleting the previous one's "
        f"objects failed ({url}/train-000000.idx: connection reset (injected)); they are "
        f"listed in {UPLOAD_MARK} there, and the next make_shards --overwrite into {url} "
        "deletes them"
    ), err
    m = load_manifest(url)
    assert set(keys(prefix)) == dataset_keys(m) | old | {UPLOAD_MARK}
    assert_whole(url, m, capsys)
    assert make_shards.main(["--synthetic", "2", "--out", url, *args, "--overwrite"]) == 0
    assert set(keys(prefix)) == dataset_keys(load_manifest(url))


def test_overwrite_refuses_a_users_object_named_like_a_shard(capsys):
    prefix = "named"
    url = f"s3://{BUCKET}/{prefix}"
    args = ["--samples-per-shard", "4", "--val-fraction", "0", "--workers", "2", "--quiet"]
    assert make_shards.main(["--synthetic", "4", "--out", url, *args]) == 0
    for name in ("train-000001.tar", "train-b-000000.idx"):
        s3().put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=b"the user's")
    before = keys(prefix)
    capsys.readouterr()
    assert make_shards.main(["--synthetic", "8", "--out", url, *args, "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: --out {url} holds objects named like our shards that its dataset's manifest "
        "does not list (train-000001.tar, train-b-000000.idx): the new dataset could need "
        "those names and would replace them. Move or rename them"
    ), err
    assert keys(prefix) == before
    for name in ("train-000001.tar", "train-b-000000.idx"):
        body = s3().get_object(Bucket=BUCKET, Key=f"{prefix}/{name}")["Body"].read()
        assert body == b"the user's"


def test_out_reports_where_it_uploaded(capsys):
    url = f"s3://{BUCKET}/report"
    assert make_shards.main(["--synthetic", "4", "--out", url, "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    assert f"uploaded {len(keys('report'))} objects to {url}/ (endpoint http://127.0.0.1:" in out
    no_secret(out, err)


# ---------------------------------------------------------------- failures of the store


def closed_port_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize("case", ["unreachable", "no bucket"])
@pytest.mark.parametrize("command", ["verify", "out", "train"])
def test_an_unreachable_endpoint_or_missing_bucket_is_one_error_line(
    monkeypatch, capsys, tmp_path, case, command
):
    from train.cli import main as train_main

    url = "s3://no-such-bucket/data" if case == "no bucket" else f"s3://{BUCKET}/tiny"
    if case == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", closed_port_endpoint())
    t0 = time.monotonic()
    if command == "verify":
        rc = make_shards.main(["--verify", url])
    elif command == "out":
        rc = make_shards.main(["--synthetic", "4", "--out", url, "--quiet"])
    else:
        rc = train_main(["--set", f"data.dir={url}", "--set", f"run.dir={tmp_path}"])
    assert rc == 1 and time.monotonic() - t0 < 30
    out, err = capsys.readouterr()
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and url in line
    assert ("cannot reach the endpoint" if case == "unreachable" else "does not exist") in line
    no_secret(out, err)


@pytest.mark.slow
def test_access_denied_names_the_url_never_the_key(tiny_dataset):
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as endpoint:
        env = {**os.environ, **aws_env(endpoint)}
        cmd = [sys.executable, "pipeline/make_shards.py", "--verify", f"s3://{BUCKET}/tiny"]
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith(f"error: s3://{BUCKET}/tiny/manifest.json (endpoint {endpoint})")
    assert "access denied (InvalidAccessKeyId)" in res.stderr
    no_secret(res.stdout, res.stderr)


@pytest.mark.parametrize("case", ["endpoint without scheme", "unknown profile"])
@pytest.mark.parametrize("command", ["verify", "out", "train"])
def test_bad_aws_settings_are_one_error_line_naming_the_variable(
    monkeypatch, capsys, tmp_path, s3_env, case, command
):
    from train.cli import main as train_main

    url = f"s3://{BUCKET}/tiny"
    if case == "endpoint without scheme":
        value = s3_env.removeprefix("http://")  # 127.0.0.1:<port>
        monkeypatch.setenv("AWS_ENDPOINT_URL", value)
        want = f"AWS_ENDPOINT_URL={value} is not an endpoint URL: give it as scheme://host[:port]"
        fix = f"e.g. http://{value}"
    else:
        (tmp_path / "config").write_text("[profile other]\nregion = us-east-1\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
        monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
        want = f"AWS_PROFILE=no-such-profile: no such profile in {tmp_path / 'config'}"
        fix = "unset AWS_PROFILE"
    if command == "verify":
        rc = make_shards.main(["--verify", url])
    elif command == "out":
        rc = make_shards.main(["--synthetic", "4", "--out", f"{url}-out", "--quiet"])
    else:
        run_dir = tmp_path / "run"
        rc = train_main(["--set", f"data.dir={url}", "--set", f"run.dir={run_dir}"])
    out, err = capsys.readouterr()
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {want}") and fix in err
    no_secret(out, err)


def read_until_error(loader, at_first_batch) -> tuple[int, DatasetError]:
    """Iterate ``loader``, calling ``at_first_batch`` after its first batch, until it raises:
    (batches read, the error)."""
    got = 0
    with pytest.raises(DatasetError) as info:
        for _ in loader:
            if got == 0:
                at_first_batch()
            got += 1
    return got, info.value


@pytest.mark.parametrize("workers", [0, 2])
def test_an_object_vanishing_mid_epoch_is_one_error_line(s3_dataset, s3_env, workers):
    prefix = f"vanish-{workers}"
    url = copy_prefix("tiny", prefix)
    # read directly (the shard cache would have fetched every shard before the first batch)
    kw = dict(batch_size=4, device="cpu", shuffle=False, num_workers=workers, cache_limit=0)
    loader = build_loader("torch", url, **kw)
    gone = f"{url}/train-000002.tar"  # the last 4 samples: read well after the first batch
    keys_gone = {r.key for r in loader.dataset.items if r.tar == gone}

    def delete():
        s3().delete_object(Bucket=BUCKET, Key=f"{prefix}/train-000002.tar")

    got, exc = read_until_error(loader, delete)
    text = str(exc)
    assert 1 <= got < len(loader) and "\n" not in text and "Traceback" not in text
    head = f"{gone} (endpoint {s3_env}): sample "
    assert text.startswith(head) and text[len(head) :].partition(":")[0] in keys_gone
    assert "vanished while the run was reading it (no such object)" in text
    assert f"make_shards.py --verify {url}`, and resume from the last checkpoint" in text
    no_secret(text)


@pytest.mark.slow  # a server of its own (3 s), a timeout, torch's workers stopping
@pytest.mark.parametrize("workers", [0, 2])
def test_an_endpoint_going_silent_mid_epoch_is_one_error_line(s3_dataset, monkeypatch, workers):
    with moto_process() as (endpoint, proc):
        url = copy_to_server(endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        # a second without a byte is silence here (4 s by default), and 2 tries (3)
        monkeypatch.setattr(s3_client_module, "READ_TIMEOUT_S", 1)
        monkeypatch.setattr(s3_client_module, "ATTEMPTS", 2)
        kw = dict(batch_size=4, device="cpu", shuffle=False, num_workers=workers, cache_limit=0)
        loader = build_loader("torch", url, **kw)
        try:
            got, exc = read_until_error(loader, lambda: proc.send_signal(signal.SIGSTOP))
        finally:
            proc.send_signal(signal.SIGCONT)
    text = str(exc)
    assert 1 <= got < len(loader) and "\n" not in text and "Traceback" not in text
    assert text.startswith(f"{url}/train-00000") and f".tar (endpoint {endpoint}): " in text
    assert "the endpoint stopped answering (no reply within 1 s, 2 tries)" in text
    assert text.endswith("; resume from the last checkpoint once it answers")
    assert "(reading sample " in text
    no_secret(text)


def host_name_only_boto3_resolves() -> tuple[str, str]:
    """(name, address): this machine's host name, which resolves to one of its addresses, while
    ``<bucket>.<name>`` (how DALI's S3 client addresses a bucket at a named endpoint) does not."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        pytest.skip(f"this machine's host name {name} does not resolve")
    try:
        socket.gethostbyname(f"{BUCKET}.{name}")
        pytest.skip(f"{BUCKET}.{name} resolves here")
    except OSError:
        pass
    return name, address


@pytest.mark.slow  # a server of its own, a training run in a subprocess
def test_dali_failing_to_reach_s3_names_the_cause_and_not_verify(s3_dataset, tmp_path):
    name, address = host_name_only_boto3_resolves()
    with moto_process(host=address, name=name) as (endpoint, _):
        url = copy_to_server(endpoint)
        env = {**os.environ, **aws_env(endpoint)}
        verify = [sys.executable, "pipeline/make_shards.py", "--verify", url]
        res = subprocess.run(verify, env=env, cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0 and res.stdout.strip() == f"{url}: OK"  # boto3 reaches it
        cmd = [sys.executable, "-m", "train", "--loader", "dali", "--debug"]
        # DALI's own S3 client reads the shards only without the shard cache
        for s in (*SMALL_RUN, f"data.dir={url}", f"run.dir={tmp_path}", "data.cache_limit=0"):
            cmd += ["--set", s]
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert res.returncode == 1 and "Traceback" not in res.stderr and len(lines) == 1
    line = lines[0]
    assert line.startswith(f"error: {url}: DALI could not build the train pipeline: ")
    assert f"Could not resolve host: {BUCKET}.{name}" in line and "C++" not in line
    assert f"addresses the bucket as the host {BUCKET}.{name}" in line
    assert "give AWS_ENDPOINT_URL as an IP address, or use the torch loader" in line
    assert "--verify" not in line
    no_secret(res.stdout, res.stderr)


@contextlib.contextmanager
def slow_link(monkeypatch, s3_env: str, rate: int):
    """The S3 endpoint behind a ``SlowLink`` of ``rate`` bytes/s, for this process's clients.
    Reads call an endpoint silent after 1 s here (4 s by default): a test's slow link need
    carry only a few seconds' worth to be slower than that."""
    link = SlowLink(s3_env, rate)
    monkeypatch.setenv("AWS_ENDPOINT_URL", link.url)
    monkeypatch.setattr(s3_client_module, "READ_TIMEOUT_S", 1)
    monkeypatch.setattr(s3_client_module, "ATTEMPTS", 2)
    try:
        yield link
    finally:
        link.close()


@pytest.mark.slow
def test_an_upload_over_a_link_slower_than_the_read_timeout_arrives(monkeypatch, s3_env, tmp_path):
    src = tmp_path / "part.bin"
    src.write_bytes(os.urandom(1 << 20))
    url = storage.location(f"s3://{BUCKET}/slow/part.bin")
    with slow_link(monkeypatch, s3_env, rate=400_000):  # 1 MB: 2.6 s after it is sent
        storage.upload(src, url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    assert s3().get_object(Bucket=BUCKET, Key="slow/part.bin")["Body"].read() == src.read_bytes()


@pytest.mark.slow  # a throttled link carrying a dataset until the upload gives up
def test_an_upload_too_slow_for_its_link_says_so_with_bytes_and_rate(monkeypatch, s3_env, capsys):
    url = f"s3://{BUCKET}/too-slow"
    args = ["--synthetic", "4", "--samples-per-shard", "4", "--workers", "2", "--quiet"]
    with slow_link(monkeypatch, s3_env, rate=250_000):
        # 60 s by default (raising=False: where uploads have no timeout of their own, the
        # read timeout of 1 s applies, and the error is to say the same)
        monkeypatch.setattr(s3_client_module, "UPLOAD_READ_TIMEOUT_S", 1)
        assert make_shards.main([*args, "--out", url]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: uploading the dataset to {url} failed after 0 of ")
    assert f"{url}/train-000000.tar (endpoint http://127.0.0.1:" in err
    assert "the upload was too slow: " in err and "stopped answering" not in err
    sent = re.search(
        r"too slow: ([\d.]+) MB sent in (\d+) s \(([\d.]+) [kM]B/s\) for a file of ([\d.]+) MB", err
    )
    assert sent is not None, err
    size = float(sent[4]) * 1e6
    assert float(sent[1]) * 1e6 >= size  # the part went out, each try, with no answer in time
    assert "no answer came within 1 s of a part of up to 8 MB sent (2 tries)" in err
    no_secret(out, err)


# ---------------------------------------------------------------- the shard cache


def upload_folder(local: Path, prefix: str) -> str:
    for f in sorted(local.iterdir()):
        storage.upload(f, storage.location(f"s3://{BUCKET}/{prefix}/{f.name}"))
    return f"s3://{BUCKET}/{prefix}"


class DiskBytes:
    """The most bytes of files found under ``folder`` while it runs (a thread looking at it
    without pause), and the names it saw."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.most, self.names = folder, 0, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._look, daemon=True)
        self._thread.start()

    def _look(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in list(self.folder.rglob("*")):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    if stat.S_ISREG(st.st_mode):
                        total += st.st_size
                        self.names.add(p.name)
            self.most = max(self.most, total)
            time.sleep(0.0005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.most


@pytest.mark.parametrize(
    "backend,options",
    [
        ("dali", {}),
        ("torch", {"num_workers": 0}),
        pytest.param("torch", {"num_workers": 2}, marks=pytest.mark.slow),
    ],
)
def test_the_shard_cache_stays_within_its_limit_and_batches_equal_the_local_ones(
    segments_dataset, tmp_path, backend, options
):
    """Crops and augmentation over 5 shards through a cache that holds 2 of them: every batch
    (values, keys, drawn parameters) equals the local one, one GET per shard, and the bytes
    on disk never pass the limit."""
    url = upload_folder(segments_dataset, f"segments-{backend}-{options.get('num_workers')}")
    shards = load_manifest(segments_dataset).split_shards("train")
    limit = 2 * max(s.bytes for s in shards)  # DALI: a piece of one shard, and the next one
    assert sum(s.bytes for s in shards) > 2 * limit  # consumed shards must go
    aug = {"gain_db": [-6.0, 6.0], "snr_db": [10.0, 30.0]}
    kw = dict(batch_size=2, device="cpu", seed=5, augment=aug, with_params=True, **options)
    cache_dir = tmp_path / "cache"
    remote = build_loader(backend, url, cache_dir=str(cache_dir), cache_limit=limit, **kw)
    local = build_loader(backend, str(segments_dataset), **kw)
    disk = DiskBytes(cache_dir)
    try:
        got = list(remote)
    finally:
        most = disk.stop()
    want = list(local)
    assert len(got) == len(want) == 18
    for a, b in zip(got, want, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["offset"], b["offset"])
        for name in ("wav", "arkit", "gain_db", "snr_db"):
            assert torch.equal(a[name], b[name]), name
    cache = remote.last_cache
    assert 0 < most <= limit and 0 < cache.peak <= limit
    assert cache.requests == len(shards)  # one whole-object GET each
    assert any(".part-" in n for n in disk.names)  # downloads went through parts
    (folder,) = cache_dir.iterdir()
    assert folder.name.endswith(load_manifest(url).identity) and list(folder.iterdir()) == []


def counted(fn, calls: list):
    """``fn``, appending to ``calls`` at each call."""

    def call(*args, **kw):
        calls.append(1)
        return fn(*args, **kw)

    return call


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_split_that_fits_the_cache_is_downloaded_once_and_deleted_with_its_loader(
    s3_dataset, tiny_dataset, tmp_path, backend
):
    """Three shards under the default 8 GiB: the first epoch fetches each once, the next
    epochs read the kept copies (no request; DALI in one pipeline, as from a local folder)
    and equal the local ones; a torch loader whose
    limit is a byte short of the split deletes each shard once consumed and fetches it again
    every epoch."""
    kw = dict(batch_size=4, device="cpu", seed=3)
    kw.update(num_workers=0) if backend == "torch" else None
    cache_dir = tmp_path / "cache"
    remote = build_loader(backend, s3_dataset, cache_dir=str(cache_dir), **kw)
    local = build_loader(backend, str(tiny_dataset), **kw)
    shards = load_manifest(s3_dataset).split_shards("train")
    builds = []  # DALI: pipelines built per epoch (one per piece)
    if backend == "dali":
        remote._open = counted(remote._open, builds)
    for epoch in range(3):
        builds.clear()
        got, want = list(remote), list(local)
        assert len(got) == len(want) == 9
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"])
        assert remote.last_cache.requests == (len(shards) if epoch == 0 else 0), epoch
        if backend == "dali":  # pieces while downloading, one pipeline over the kept split
            assert len(builds) > 1 if epoch == 0 else builds == [1], (epoch, builds)
    (folder,) = cache_dir.iterdir()
    names = sorted(p.name.partition(".")[2] for p in folder.iterdir())
    assert names == sorted(s.name for s in shards)  # kept between the epochs
    vars(remote).pop("_open", None)
    del remote
    gc.collect()
    assert list(folder.iterdir()) == []  # ... and deleted with the loader
    if backend == "dali":  # its least limit, two pieces of a batch's two shards, fits them all
        return
    small = sum(s.bytes for s in shards) - 1  # one byte short of the split
    tight = build_loader(backend, s3_dataset, cache_dir=str(cache_dir), cache_limit=small, **kw)
    for _ in range(2):
        assert len(list(tight)) == 9
        assert tight.last_cache.requests == len(shards) and list(folder.iterdir()) == []


def test_through_the_cache_each_shard_is_checked_once_downloaded_not_per_sample(
    tiny_dataset, s3_env, tmp_path, monkeypatch
):
    """An index whose first sample points at the second sample's audio (sizes and places
    plausible: only reading the tar header before it tells) is what the start-up check names
    in a local folder. Through the cache the loader is made with a few requests per shard (no
    ranged GET per sample), reads the shards before it, and stops at that shard's download
    with the same words; read directly, the start-up check names it when the loader is made."""
    from benchmarks.s3_cache import requests_of

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dataset, bad)
    idx = bad / "train-000001.idx"
    lines = idx.read_text().splitlines()
    first, second = lines[1].split(), lines[2].split()
    first[1] = second[1]  # the first sample's wav offset: the second's
    idx.write_text("\n".join([lines[0], " ".join(first), *lines[2:]]) + "\n")
    kw = dict(batch_size=4, device="cpu", shuffle=False, num_workers=0)
    with pytest.raises(DatasetError) as local:
        build_loader("torch", str(bad), **kw)
    words = str(local.value).partition(": ")[2].partition("; ")[0]
    assert words.startswith("sample ") and "the tar header before byte" in words
    url = upload_folder(bad, "stale-index")
    with pytest.raises(DatasetError) as direct:
        build_loader("torch", url, cache_limit=0, **kw)
    assert str(direct.value).startswith(f"{url}/train-000001.tar: {words}; ")
    shards = load_manifest(url).split_shards("train")
    with proxy_process(s3_env) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
        loader = build_loader("torch", url, cache_dir=str(tmp_path / "cache"), **kw)
        made = requests_of(proxy)
        # the manifest, and per shard its index (read twice) and two HEADs: none per sample
        assert made <= 1 + 4 * len(shards) < sum(s.samples for s in shards)
        got = []
        with pytest.raises(DatasetError) as cached:
            for batch in loader:
                got.append(batch)
    assert str(cached.value) == str(direct.value)
    assert len(got) == shards[0].samples // 4  # the first shard's whole batches


def test_a_cache_limit_too_small_for_a_batch_names_both_figures(s3_dataset):
    from core.errors import ConfigError

    m = load_manifest(s3_dataset)
    big = max(s.bytes for s in m.split_shards("train"))
    with pytest.raises(ConfigError) as info:
        build_loader("torch", s3_dataset, batch_size=4, device="cpu", cache_limit=big // 2)
    text = str(info.value)
    assert text.startswith(f"data.cache_limit={big // 2} bytes is too small for {s3_dataset}: ")
    assert re.search(r"reads the shards train-00000\d\.tar.* \((\d+) bytes\): raise it to at", text)
    with pytest.raises(ConfigError, match="the dali loader holds 2 such sets: raise it to at"):
        build_loader("dali", s3_dataset, batch_size=4, device="cpu", cache_limit=big + 1)


@contextlib.contextmanager
def proxy_process(endpoint: str, *faults: str):
    """``benchmarks/s3_proxy.py`` in a process of its own in front of ``endpoint``, with
    ``faults`` (its flags): its URL."""
    cmd = [sys.executable, "-m", "benchmarks.s3_proxy", endpoint, *faults]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:"), line
        yield line.removeprefix("listening on ")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_corrupt_or_truncated_download_is_fetched_again(
    s3_dataset, tiny_dataset, monkeypatch, s3_env, backend
):
    kw = dict(batch_size=4, device="cpu", seed=3)
    kw.update(num_workers=0) if backend == "torch" else None
    faults = ["--corrupt", "train-000001.tar:1", "--truncate", "train-000002.tar:1"]
    with proxy_process(s3_env, *faults) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
        remote = build_loader(backend, s3_dataset, **kw)
        got = list(remote)
    want = list(build_loader(backend, str(tiny_dataset), **kw))
    assert len(got) == len(want) == 9
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"])
    assert remote.last_cache.requests == 3 + 2  # each shard once, the two damaged twice


def test_a_shard_damaged_twice_is_one_error_naming_it_and_its_url(s3_dataset, monkeypatch, s3_env):
    with proxy_process(s3_env, "--corrupt", "train-000001.tar:2") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
        loader = build_loader("torch", s3_dataset, batch_size=4, device="cpu", num_workers=0)
        with pytest.raises(DatasetError) as info:
            list(loader)
    text = str(info.value)
    assert text.startswith(
        f"{s3_dataset}/train-000001.tar: shard train-000001.tar failed its check twice when "
        "fetched into the cache "
    )
    assert text.endswith(
        "(its sha256 differs from the manifest's; then its sha256 differs from the "
        f"manifest's); check the dataset with `python pipeline/make_shards.py --verify "
        f"{s3_dataset}`"
    )
    no_secret(text)


KILLED_MID_DOWNLOAD = """
import json, sys
from pathlib import Path
from pipeline import build_loader
url, cache_dir, state = sys.argv[1:4]
kw = dict(batch_size=4, device="cpu", shuffle=False, num_workers=0)
loader = build_loader("torch", url, cache_dir=cache_dir, **kw)
for batch in loader:
    Path(state).write_text(json.dumps(loader.state_dict()))
"""


@pytest.mark.slow  # a training process killed mid-download
def test_a_run_killed_mid_download_resumes_without_reading_its_part(
    s3_dataset, tiny_dataset, s3_env, tmp_path
):
    """The second shard's download hangs half way; the run is killed after the first shard's
    4 batches. The resumed run removes the dead run's part file, fetches from the first
    unconsumed shard on, and reads what the local copy holds."""
    cache_dir, state = tmp_path / "cache", tmp_path / "state.json"
    tar = load_manifest(s3_dataset).split_shards("train")[1]
    with proxy_process(s3_env, "--stall", f"{tar.name}:99") as proxy:
        cmd = [sys.executable, "-c", KILLED_MID_DOWNLOAD, s3_dataset, str(cache_dir), str(state)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "AWS_ENDPOINT_URL": proxy})
        try:
            deadline = time.monotonic() + 120
            while True:
                parts = list(cache_dir.rglob(f"{proc.pid}.{tar.name}.part-*"))
                sizes = [p.stat().st_size for p in parts if p.exists()]
                done = state.exists() and json.loads(state.read_text() or "{}").get("position")
                if done == 16 and sizes and sizes[0] > 0:
                    break
                assert proc.poll() is None and time.monotonic() < deadline, "no stalled part"
                time.sleep(0.02)
        finally:
            proc.kill()
            proc.wait()
    (part,) = parts
    assert 0 < part.stat().st_size < tar.bytes  # the partial download, left behind
    saved = json.loads(state.read_text())
    kw = dict(batch_size=4, device="cpu", shuffle=False, num_workers=0)
    remote = build_loader("torch", s3_dataset, cache_dir=str(cache_dir), **kw)
    local = build_loader("torch", str(tiny_dataset), **kw)
    remote.load_state_dict(saved)
    local.load_state_dict(saved)
    got, want = list(remote), list(local)
    assert len(got) == len(want) == 5
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["wav"], b["wav"]) and torch.equal(a["arkit"], b["arkit"])
    assert remote.last_cache.requests == 2  # the second and third shards, once each
    assert not part.exists()
    del remote  # the split fits the cache: its copies stay as long as the loader does
    gc.collect()
    assert list(part.parent.iterdir()) == []


@pytest.mark.slow  # worker processes
def test_a_loader_stopped_while_its_workers_wait_for_a_shard_leaves_nothing_behind(
    s3_dataset, tmp_path
):
    """A cache of one shard: the DataLoader's workers, reading ahead, wait for the second shard,
    which comes only once the first is consumed. Stopping after the first batch stops them (none
    is left waiting) and empties the cache."""
    import multiprocessing

    shards = load_manifest(s3_dataset).split_shards("train")
    kw = dict(batch_size=4, device="cpu", shuffle=False, num_workers=2)
    cache_dir = tmp_path / "cache"
    limit = max(s.bytes for s in shards)
    loader = build_loader("torch", s3_dataset, cache_dir=str(cache_dir), cache_limit=limit, **kw)
    batches = iter(loader)
    next(batches)
    assert len(multiprocessing.active_children()) == 2
    batches.close()
    assert multiprocessing.active_children() == []
    (folder,) = cache_dir.iterdir()
    assert list(folder.iterdir()) == []
