"""``make_shards --out s3://bucket/prefix``: the local writer into a staging folder, then an
upload that never leaves a half-written dataset looking complete and never costs the previous
one.

The rules are the local ones (``pipeline.convert.outdir``): the prefix must be empty, hold one of
our datasets (replaced only with ``--overwrite``; other objects stay, and one named like a shard
that the old manifest does not list is refused before any work), or hold what an interrupted
upload of ours left. The dataset is made by ``OutDir`` in a staging folder on this machine
(``$TMPDIR/make_shards-s3/<digest of the URL>``: a rerun reuses the takes a failed one
converted; the folder's lock makes a second conversion to the same URL here refuse). Then:

1. ``.make_shards-upload.json`` goes up, listing every name the upload writes or deletes: a
   rerun knows those objects are ours;
2. shards, indexes and ``rejects.jsonl`` go up beside the old dataset, under names its manifest
   does not list: ``<split>-NNNNNN.tar``, or ``<split>-b-NNNNNN.tar`` when the old dataset has
   the first names (the two alternate). Loaders find shards through the manifest only, so the
   old dataset stays whole and readable;
3. ``manifest.json`` goes up: the switch to the new dataset;
4. the old dataset's shards are deleted, then the marker, and the staging folder is removed.

A failure or a kill before step 3 leaves the old dataset in place; after it, the new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from core.errors import ArkitError, DatasetError
from pipeline.convert.outdir import REJECTS_NAME, OutDir, dataset_names, name_collisions
from pipeline.shards import storage
from pipeline.shards.manifest import MANIFEST_NAME, Manifest, load_manifest
from pipeline.shards.storage import S3Url
from pipeline.shards.tars import idx_path

UPLOAD_MARK = ".make_shards-upload.json"
UPLOAD_MANIFEST = ".manifest-upload.json"  # in the staging folder: the manifest that goes up


def staging_dir(url: S3Url) -> Path:
    """Where the dataset for ``url`` is written before it goes up: the same folder for the
    same URL, so a rerun finds what the previous run converted."""
    digest = hashlib.sha256(str(url).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "make_shards-s3" / digest


def beside(manifest: Manifest, taken: set[str]) -> Manifest:
    """``manifest`` with its shards named so that no shard or index takes a name in ``taken``
    (the old dataset's): as written (``train-000000.tar``), or ``train-b-000000.tar``."""
    for tag in ("", "b-"):
        shards = tuple(
            dataclasses.replace(s, name=s.name.replace(f"{s.split}-", f"{s.split}-{tag}", 1))
            for s in manifest.shards
        )
        names = {n for s in shards for n in (s.name, idx_path(s.name).name)}
        if not names & taken:
            return dataclasses.replace(manifest, shards=shards)
    raise DatasetError(
        f"{manifest.root}: the dataset there lists shards under both of make_shards' name sets "
        "(train-000000.tar and train-b-000000.tar), so the new one cannot go up beside it; "
        "choose another --out"
    )


def _upload_here(files: list[tuple[Path, S3Url]], on_done: Callable[[], None]) -> None:
    for src, url in files:
        storage.upload(src, url)
        on_done()


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
        self.warnings: list[str] = []  # said after the summary
        self._staged = False  # the staging folder holds the finished dataset
        # uploads the shards, indexes and reports: (staged file, URL) pairs, a call after each;
        # the Ray engine's tasks, or one after the other here
        self.upload_files: Callable[[list[tuple[Path, S3Url]], Callable[[], None]], None] = (
            _upload_here
        )

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
        ours = self.interrupted | ({MANIFEST_NAME} | dataset_names(self.old) if self.old else set())
        others = sorted(n for n in names if n not in ours)
        # an interrupted upload of ours marks the prefix as ours, unless an unreadable manifest
        # sits there: that may be anyone's
        if self.old is None and others and (not self.interrupted or MANIFEST_NAME in others):
            listed = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
            raise DatasetError(
                f"--out {self.path} holds objects that are not one of our datasets ({listed}); "
                "make_shards writes only into an empty prefix or over a dataset of its own: "
                "choose another --out"
            )
        clash = name_collisions(self.path, others, ours, "objects")
        if clash:
            raise DatasetError(clash)
        if self.old is not None and not self.overwrite:
            raise DatasetError(
                f"--out {self.path} already holds a dataset; pass --overwrite to replace it"
            )

    def commit(self, manifest: Manifest, rejects_text: str, reports: dict[str, str]) -> None:
        """Write the dataset into the staging folder, then upload it beside the old one and
        switch the manifest last."""
        self.local.commit(manifest, rejects_text, reports)
        self._staged = True
        in_place = {REJECTS_NAME, *reports}  # uploaded over the previous ones
        old = dataset_names(self.old) - in_place if self.old is not None else set()
        remote = beside(manifest, old)
        files = [  # (staged name, name under the prefix)
            (n, r)
            for s, t in zip(manifest.shards, remote.shards, strict=True)
            for n, r in ((s.name, t.name), (idx_path(s.name).name, idx_path(t.name).name))
        ] + [(n, n) for n in (REJECTS_NAME, *reports)]
        new = [r for _, r in files]
        stale = (set(self.interrupted) | old) - {UPLOAD_MARK, MANIFEST_NAME} - set(new)
        try:
            (self.staging / UPLOAD_MANIFEST).write_text(remote.to_json())
        except OSError as exc:
            raise DatasetError(
                f"could not write {self.staging / UPLOAD_MANIFEST} ({exc.strerror or exc}): "
                f"nothing under {self.path} was changed; free space there and rerun the same "
                "command"
            ) from None
        done = 0

        def count() -> None:
            nonlocal done
            done += 1

        try:
            storage.put_text(
                self.path / UPLOAD_MARK, json.dumps({"new": new, "stale": sorted(stale)})
            )
            self.upload_files([(self.staging / s, self.path / n) for s, n in files], count)
            storage.upload(self.staging / UPLOAD_MANIFEST, self.path / MANIFEST_NAME)
        except DatasetError as exc:
            kept = (
                "it still holds its previous dataset, whole (its manifest.json lists only the "
                "previous shards)"
                if self.old is not None
                else "it holds no complete dataset yet (no manifest.json)"
            )
            raise DatasetError(
                f"uploading the dataset to {self.path} failed after {done} of {len(new) + 1} "
                f"files ({exc}): {kept}; rerun the same command to finish"
            ) from None
        self.uploaded = [*new, MANIFEST_NAME]
        try:
            for name in sorted(stale):
                storage.delete(self.path / name)
            storage.delete(self.path / UPLOAD_MARK)
        except DatasetError as exc:
            self.warnings.append(
                f"the new dataset in {self.path} is complete, but deleting the previous one's "
                f"objects failed ({exc}); they are listed in {UPLOAD_MARK} there, and the next "
                f"make_shards --overwrite into {self.path} deletes them"
            )
