"""``make_shards --out s3://bucket/prefix``: the local writer into a staging folder, then an
upload that never leaves a half-written dataset looking complete.

The rules are the local ones (``pipeline.outdir``): the prefix must be empty, hold one of our
datasets (replaced only with ``--overwrite``; other objects stay), or hold what an interrupted
upload of ours left. The dataset is made by ``OutDir`` in a staging folder on this machine
(``$TMPDIR/make_shards-s3/<digest of the URL>``: a rerun reuses the takes a failed one
converted; the folder's lock makes a second conversion to the same URL here refuse). Then:

1. ``.make_shards-upload.json`` goes up, listing every name the upload writes or deletes: a
   rerun knows those objects are ours;
2. the old ``manifest.json`` is deleted: from here the prefix holds no complete dataset;
3. shards, indexes and ``rejects.jsonl`` go up, the old dataset's leftover shards are deleted;
4. ``manifest.json`` goes up last, then the marker is deleted and the staging folder removed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from pipeline import storage
from pipeline.errors import ArkitError, DatasetError
from pipeline.manifest import MANIFEST_NAME, Manifest, load_manifest
from pipeline.outdir import REJECTS_NAME, OutDir
from pipeline.storage import S3Url
from pipeline.tars import idx_path

UPLOAD_MARK = ".make_shards-upload.json"


def staging_dir(url: S3Url) -> Path:
    """Where the dataset for ``url`` is written before it goes up: the same folder for the
    same URL, so a rerun finds what the previous run converted."""
    digest = hashlib.sha256(str(url).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "make_shards-s3" / digest


def _dataset_names(m: Manifest) -> set[str]:
    return {REJECTS_NAME} | {n for s in m.shards for n in (s.name, idx_path(s.name).name)}


class S3OutDir:
    """``OutDir``'s interface (``path``, ``work``, ``commit``) for an ``s3://`` ``--out``."""

    def __init__(self, url: str | S3Url, overwrite: bool) -> None:
        self.path: S3Url = storage.location(url)  # type: ignore[assignment]
        self.overwrite = overwrite
        self.staging = staging_dir(self.path)
        # the staging folder is ours alone: whatever a failed run left there may be replaced
        self.local = OutDir(self.staging, overwrite=True)
        self.work = self.local.work
        self.old: Manifest | None = None  # our dataset already under the prefix
        self.interrupted: set[str] = set()  # what an interrupted upload of ours left
        self.uploaded: list[str] = []
        self._staged = False  # the staging folder holds the finished dataset

    def __enter__(self) -> S3OutDir:
        self._check_contents()  # before any work: a refusal costs nothing
        self.local.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.local.__exit__(*exc)
        if self._staged:  # uploaded, or a rerun makes it again: no use keeping it
            shutil.rmtree(self.staging, ignore_errors=True)

    def _check_contents(self) -> None:
        names = storage.list_names(self.path)
        if not names:
            return
        if UPLOAD_MARK in names:
            try:
                mark = json.loads(storage.read_text(self.path / UPLOAD_MARK))
                self.interrupted = {UPLOAD_MARK, *mark["new"], *mark["stale"]}
            except (ValueError, KeyError, TypeError):
                self.interrupted = {UPLOAD_MARK}
        if MANIFEST_NAME in names:
            try:
                self.old = load_manifest(self.path)
            except ArkitError:
                self.old = None
        ours = self.interrupted | (
            {MANIFEST_NAME} | _dataset_names(self.old) if self.old else set()
        )
        others = sorted(n for n in names if n not in ours)
        if self.old is None and others:
            listed = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
            raise DatasetError(
                f"--out {self.path} holds objects that are not one of our datasets ({listed}); "
                "make_shards writes only into an empty prefix or over a dataset of its own: "
                "choose another --out"
            )
        if self.old is not None and not self.overwrite:
            raise DatasetError(
                f"--out {self.path} already holds a dataset; pass --overwrite to replace it"
            )

    def commit(self, manifest: Manifest, rejects_text: str) -> None:
        """Write the dataset into the staging folder, then upload it, manifest last."""
        self.local.commit(manifest, rejects_text)
        self._staged = True
        new = [REJECTS_NAME] + [n for s in manifest.shards for n in (s.name, idx_path(s.name).name)]
        stale = set(self.interrupted) - {UPLOAD_MARK, MANIFEST_NAME}
        if self.old is not None:
            stale |= _dataset_names(self.old)
        stale -= set(new)
        mark = json.dumps({"new": new, "stale": sorted(stale)})
        done = 0
        try:
            storage.put_text(self.path / UPLOAD_MARK, mark)
            storage.delete(self.path / MANIFEST_NAME)
            for name in new:
                storage.upload(self.staging / name, self.path / name)
                done += 1
            for name in sorted(stale):
                storage.delete(self.path / name)
            storage.upload(self.staging / MANIFEST_NAME, self.path / MANIFEST_NAME)
        except DatasetError as exc:
            raise DatasetError(
                f"uploading the dataset to {self.path} failed after {done} of {len(new) + 1} "
                f"files ({exc}): it holds no complete dataset now (no manifest.json); rerun "
                "the same command to finish"
            ) from None
        self.uploaded = [*new, MANIFEST_NAME]
        try:
            storage.delete(self.path / UPLOAD_MARK)
        except DatasetError:
            pass  # the dataset is complete; the next run recognises the marker as ours
