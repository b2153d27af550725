"""What ``python -m infer`` wrote in an ``--out`` folder, so that it replaces only its own files.

Each file infer writes is recorded in ``<out>/.arkit-infer.jsonl``, one JSON line per file:
its path inside ``--out`` and the SHA-256 of what infer wrote there. A file already at a target
is infer's own when its content still hashes to the last digest recorded for that path: a rerun
into the same folder replaces it without asking. Anything else at a target (a Live Link capture,
a file edited since, a file of the same name from elsewhere) makes infer refuse before any work,
unless ``--overwrite``. A target that is one of the run's inputs, or a folder, is refused even
with ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from core.errors import ConfigError

RECORD = ".arkit-infer.jsonl"


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links followed)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class Outputs:
    """The record of an ``--out`` folder: read on creation, appended to as files are written."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / RECORD
        self.known: dict[str, str] = {}  # path inside out -> digest infer last wrote there
        # the record holds superseded entries or an append cut short: rewrite it whole once
        self._compact = False
        if not os.path.lexists(self.path):
            return
        way_out = "move it away or choose another --out"
        if not self.path.is_file():
            raise ConfigError(f"{self.path} is not infer's record of what it wrote: {way_out}")
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {self.path} ({exc}): {way_out}") from None
        lines = text.split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = str(entry["path"])
                self._compact = self._compact or key in self.known
                self.known[key] = str(entry["sha256"])
            except (ValueError, KeyError, TypeError):
                if n == len(lines):  # a last line cut short by a full disk or a kill
                    self._compact = True
                    continue
                raise ConfigError(
                    f"{self.path} line {n} is not infer's record of a file it wrote: {way_out}"
                ) from None
        self._compact = self._compact or (text != "" and not text.endswith("\n"))

    def _key(self, target: Path) -> str:
        return Path(os.path.relpath(target, self.out)).as_posix()

    def ours(self, target: Path) -> bool:
        """Whether ``target`` holds what infer last wrote there."""
        want = self.known.get(self._key(target))
        return want is not None and target.is_file() and digest(target) == want

    def check(self, targets: list[Path], inputs: list[Path], overwrite: bool) -> None:
        """Refuse (ConfigError) a target that is an input or a folder, and, without
        ``overwrite``, one that exists and is not infer's own."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file, not a folder: choose a folder")
        foreign = []
        for target in targets:
            if not os.path.lexists(target):
                continue
            for src in inputs:
                if _same(target, src):
                    raise ConfigError(
                        f"{target} would be written over {src}, an input of this run "
                        "(even with --overwrite): choose another --out"
                    )
            if target.is_dir():
                raise ConfigError(f"{target} is a folder where infer writes a file: move it")
            if not overwrite and not self.ours(target):
                foreign.append(target)
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise ConfigError(
                f"{foreign[0]}{more} exists and is not a file python -m infer wrote (a capture "
                "of yours?); nothing was written: choose another --out, or pass --overwrite "
                "to replace it"
            )

    def add(self, written: dict[Path, str]) -> None:
        """Record files written (path -> digest), appended; a record holding superseded entries
        (an earlier rerun's) is rewritten whole the first time. One that cannot be written is
        reported, not fatal: the files stand, and a rerun asks for --overwrite to replace them."""
        new = {self._key(p): d for p, d in written.items()}
        try:
            if self._compact:
                known = {**self.known, **new}
                tmp = self.path.with_name(self.path.name + ".tmp")
                try:
                    tmp.write_text(_lines(known), encoding="utf-8")
                    tmp.replace(self.path)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                self._compact = False
            else:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(_lines(new))
        except OSError as exc:
            self._compact = True  # an append may have been cut short
            names = ", ".join(str(p) for p in written)
            print(
                f"warning: cannot record {names} in {self.path} ({exc.strerror or exc}): a "
                "rerun into this --out needs --overwrite to replace them",
                file=sys.stderr,
            )
            return
        self.known.update(new)


def _lines(entries: dict[str, str]) -> str:
    return "".join(json.dumps({"path": k, "sha256": d}) + "\n" for k, d in entries.items())
