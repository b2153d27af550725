"""The project's exceptions: one base, so a command line can tell the user's situation from a bug.

Every CLI catches ``ArkitError`` and prints ``error: <message>`` (exit 1); anything else is a bug
and keeps its traceback. Messages say what is wrong, where (file, sample, key) and what to do.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class ArkitError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(ArkitError):
    """A config value, flag or override that is unknown or out of range."""


class DatasetError(ArkitError):
    """A dataset that is missing, incomplete, corrupt, or disagrees with what was asked."""


class RunError(ArkitError):
    """A run folder or checkpoint that cannot be written or read."""


class MemberError(DatasetError):
    """Bytes of a shard member that are not the canonical WAV or npy; the message says which
    field differs."""


class ResumeError(ArkitError):
    """A checkpoint that cannot be resumed here (another model, dataset, loader or file)."""


class InputError(ArkitError):
    """One recording that cannot be converted; make_shards reports it and goes on."""


class AudioError(InputError):
    """Audio that cannot be used; the message says why."""


class AnimationError(InputError):
    """An animation file that cannot be used; the message says why."""


class TakeError(InputError):
    """A take whose audio and animation cannot be cut into aligned windows."""


def exit_code(run: Callable[[], int]) -> int:
    """``run()``'s exit code, or 1 after its ``error: <message>`` line on stderr when it raises
    an ArkitError (anything else keeps its traceback)."""
    try:
        return run()
    except ArkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
