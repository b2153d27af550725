"""``make_shards --engine ray``: the conversion's parallel stages as Ray tasks on a cluster.

The driver (make_shards) lists the inputs, judges the lags, splits and orders the pieces and
writes the manifest, from metadata only; Ray tasks run the same functions the local engine's
process pool runs: ``convert_and_store`` (load, check and prepare a take, into the take store)
and ``write_one_shard`` (read its pieces from the take store, write a shard and its index); for
an ``s3://`` ``--out`` tasks upload the shards too. Every ordering decision is the driver's, so
the bytes are those of the local engine whatever ran where.

The take store is the spool between the stages: a folder every worker reads and writes (the
work folder of a local ``--out``, or the staging folder of an ``s3://`` one under the driver's
``TMPDIR``), so on a cluster of several nodes it lies on a shared file system (NFS, EFS,
Filestore, a PVC in ReadWriteMany). What crosses Ray's object store is a few numbers per take
and shard, and at most ``IN_FLIGHT_PER_CPU`` tasks per CPU are submitted at once.

Ray is imported only here and only for ``--engine ray``: the rest of the project runs without
it (``pip install 'arkit-dali[ray]'``).
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from core.errors import ArkitError, DatasetError

RETRIES = 3  # a task whose worker dies (killed, out of memory, node lost) runs again
IN_FLIGHT_PER_CPU = 2  # tasks submitted ahead per CPU of the cluster: bounded driver memory
# settings the tasks get from the driver: where S3 is, never a credential (workers take those
# from their own environment: variables set where `ray start` ran, ~/.aws, an instance role)
FORWARDED = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
# fault injection for the tests: "take:PATH" or "shard:PATH"; the first task of that stage
# that finds no file at PATH creates it and kills its worker process, so Ray's retry is what
# completes the run
FAULT_ENV = "ARKIT_RAY_FAULT"


def _fault_for(stage: str) -> str | None:
    kind, _, path = (os.environ.get(FAULT_ENV) or "").partition(":")
    return path if kind == stage and path else None


def _ray():
    try:
        import ray
    except ImportError:
        raise DatasetError(
            "--engine ray needs Ray: pip install 'arkit-dali[ray]' (or pip install ray)"
        ) from None
    return ray


def _maybe_die(fault: str | None) -> None:
    if fault and not os.path.exists(fault):
        Path(fault).touch()
        os._exit(1)


def _convert_task(job, fault: str | None):
    from pipeline.convert.takestore import convert_and_store

    _maybe_die(fault)
    return convert_and_store(job)


def _shard_task(job, fault: str | None):
    from pipeline.convert.stages import write_one_shard

    _maybe_die(fault)
    return write_one_shard(job)


def _upload_task(src: str, url) -> None:
    from pipeline.shards import storage

    storage.upload(Path(src), url)


class RayEngine:
    """A connection to a Ray cluster and the stages' task runners over it."""

    def __init__(self, address: str | None) -> None:
        ray = _ray()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        _check_reachable(self.address)
        if not ray.is_initialized():
            # no address: a local Ray for this run, without its dashboard
            kw = {} if self.address else {"include_dashboard": False}
            try:
                ray.init(address=self.address, logging_level="warning", **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise DatasetError(
                    f"cannot connect to the Ray cluster at {self.address or 'a local Ray'} "
                    f"({str(exc)[:200]}): start one (`ray start --head`) or check "
                    "--ray-address / RAY_ADDRESS"
                ) from None
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        env = {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
        self._options = {"num_cpus": 1, "max_retries": RETRIES}
        if env:
            self._options["runtime_env"] = {"env_vars": env}
        self._faults = {stage: _fault_for(stage) for stage in ("take", "shard")}

    def _remote(self, fn: Callable):
        return _ray().remote(fn).options(**self._options)

    def convert(self, jobs: list) -> Iterator:
        """Stage 2: ``convert_and_store`` on each job, results as they come."""
        ray, task = _ray(), self._remote(_convert_task)
        limit = self.cpus * IN_FLIGHT_PER_CPU
        pending: dict = {}  # ref -> what it converts
        todo = iter(jobs)
        try:
            while True:
                for job in todo:
                    pending[task.remote(job, self._faults["take"])] = f"take {job[0].source}"
                    if len(pending) >= limit:
                        break
                if not pending:
                    return
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                yield self._get(ref, pending.pop(ref))
        finally:
            for ref in pending:
                ray.cancel(ref)

    def write(self, jobs: list) -> Iterator:
        """Stage 4: ``write_one_shard`` on each job, results in the jobs' order."""
        return self._ordered(
            self._remote(_shard_task), [(j, self._faults["shard"]) for j in jobs], _shard
        )

    def upload(self, files: list[tuple[Path, object]], on_done: Callable[[], None]) -> None:
        """Upload each (local file, ``S3Url``) from the workers, ``on_done`` after each."""
        args = [(str(src), url) for src, url in files]
        for _ in self._ordered(self._remote(_upload_task), args, lambda a: str(a[1])):
            on_done()

    def _ordered(self, task, args: list[tuple], name: Callable) -> Iterator:
        ray = _ray()
        pending: deque = deque()
        try:
            for a in args:
                pending.append((task.remote(*a), name(a)))
                if len(pending) >= self.cpus * IN_FLIGHT_PER_CPU:
                    yield self._get(*pending.popleft())
            while pending:
                yield self._get(*pending.popleft())
        finally:
            for ref, _ in pending:
                ray.cancel(ref)

    @staticmethod
    def _get(ref, what: str):
        ray = _ray()
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ArkitError):  # names the take or URL already
                raise DatasetError(str(cause)) from None
            raise DatasetError(f"{what}: a Ray task failed ({_short(cause or exc)})") from None
        except ray.exceptions.RayError as exc:  # retries spent, node lost, cancelled
            raise DatasetError(
                f"{what}: a Ray task failed after {RETRIES} retries ({_short(exc)})"
            ) from None


CONNECT_TIMEOUT_S = 3


def _check_reachable(address: str | None) -> None:
    """A ``host:port`` address that nothing answers on is one error line at once (Ray itself
    retries it for minutes); ``auto`` and ``ray://`` addresses are left to Ray."""
    host, sep, port = (address or "").rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise DatasetError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}): start one "
            "(`ray start --head`) or check --ray-address / RAY_ADDRESS"
        ) from None


def _shard(args: tuple) -> str:
    job = args[0]
    return f"shard {job.path.name} in {job.folder}"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1][:200] if text else ''}"
