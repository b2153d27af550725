"""make_shards' judgement of the takes' lags, once every take is measured and before any is cut.

Speech has its own lead or lag between sound and jaw, and a recorder its own latency, so a take
is judged against the dataset's median lag (over the takes whose lag is known), not against 0:
a take further from it than ``--max-sync-offset`` is out of sync (audio shifted or trimmed by
hand against its capture). It is rejected, naming its lag, the median and the fix, or with
``--fix-sync`` re-timed to the median: its audio moved by the difference and both streams cut
to their overlap (``pipeline.convert.windows.retime``). Under ``--fix-sync`` a take whose
lengths differ (stored whole) converts when its lag explains the difference: extra audio or
animation at the start (its lag is off by the difference: cut it) or at the end (its lag is
the median's: trim it). ``--audio-offset`` moves every take's audio by the same constant.

With fewer than ``MIN_TAKES`` takes of known lag a median would follow the odd take out, so the
takes are judged against 0 (sound and mouth together).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pipeline.convert.inputs import Reject, Settings
from pipeline.convert.sync import SPEECH_LAG_SECONDS
from pipeline.convert.takestore import StoredTake

MIN_TAKES = 3  # takes of known lag for their median to be the reference
ACTIONS = ("kept", "unknown", "re-timed", "lead-in", "tail", "rejected")


@dataclass(frozen=True)
class SyncReport:
    """What the judgement found, for the manifest, the summary line, sync.jsonl and the plot."""

    reference: float  # the lag takes are judged against (seconds)
    measured: int  # takes whose lag is known and lengths agree: the median's
    spread: float  # interquartile range of their lags (seconds)
    max_offset: float
    audio_offset: float
    fix: bool
    takes: list[dict]  # per take: file, lag, peak, margin, unknown, action, shift

    @property
    def from_median(self) -> bool:
        return self.measured >= MIN_TAKES

    def count(self, action: str) -> int:
        return sum(t["action"] == action for t in self.takes)

    def lags(self) -> list[float]:
        """The known lags of takes whose lengths agree (seconds)."""
        return [t["lag"] for t in self.takes if t["lag"] is not None and not t["mismatch"]]

    def to_dict(self) -> dict:
        """The manifest's ``sync``: the figures, without the per-take lines."""
        return {
            "reference_seconds": round(self.reference, 6),
            "reference": "median" if self.from_median else "zero",
            "measured_takes": self.measured,
            "spread_seconds": round(self.spread, 6),
            "max_sync_offset": self.max_offset,
            "audio_offset": self.audio_offset,
            "fix_sync": self.fix,
            "actions": {a: self.count(a) for a in ACTIONS},
        }

    def lines(self) -> str:
        """sync.jsonl: one JSON line per take."""
        import json

        return "".join(json.dumps(t) + "\n" for t in self.takes)

    def summary(self) -> str:
        """The summary line's part: the median and spread, and what was done."""
        ref = (
            f"median {ms(self.reference)} over {self.measured} takes, spread "
            f"{self.spread * 1000:.0f} ms (interquartile)"
            if self.from_median
            else f"{self.measured} takes of known lag, too few for a median: judged against 0"
        )
        done = [f"{self.count(a)} {a}" for a in ACTIONS[1:] if self.count(a)]
        return f"lag (audio behind animation): {ref}" + (f"; {', '.join(done)}" if done else "")

    def warning(self) -> str | None:
        """A line when the median lag, once --audio-offset is taken off, is beyond what speech
        explains."""
        left = self.reference - self.audio_offset
        if not self.from_median or abs(left) <= SPEECH_LAG_SECONDS:
            return None
        way = "late" if left > 0 else "early"
        offset = f" after --audio-offset {self.audio_offset:g}" if self.audio_offset else ""
        return (
            f"the takes' median lag is {ms(left)}{offset} (audio {way} against the animation "
            f"in most takes), beyond the +-{SPEECH_LAG_SECONDS * 1000:.0f} ms speech explains: "
            f"a recorder's constant latency? pass --audio-offset {self.reference:.3f} to move "
            "every take's audio by it"
        )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:+.0f} ms"


def reference_lag(lags: list[float]) -> float:
    """The median of ``lags`` when there are ``MIN_TAKES`` or more, else 0."""
    return float(np.median(lags)) if len(lags) >= MIN_TAKES else 0.0


def judge(
    takes: list[StoredTake], s: Settings
) -> tuple[list[StoredTake], list[Reject], SyncReport]:
    """The takes that convert (each with its ``shift``, ``retimed`` and ``action``), a reject for
    each one that does not, and the report; in input order."""
    takes = sorted(takes, key=lambda t: t.recording.order)
    known = [t.lag.lag for t in takes if t.lag.lag is not None and t.mismatch is None]
    ref = reference_lag(known)
    kept, rejects, lines = [], [], []
    for t in takes:
        action, correction, reason = _decide(t, ref, s)
        shift = correction + s.audio_offset
        retimed = t.mismatch is not None or shift != 0.0
        lines.append(
            {
                "file": t.recording.source,
                **t.lag.to_dict(),
                "mismatch": t.mismatch is not None,
                "action": action,
                "shift": round(shift, 6) if action != "rejected" else None,
            }
        )
        if reason is not None:
            rejects.append(Reject(t.recording.source, reason, "sync"))
            continue
        kept.append(dataclasses.replace(t, shift=shift, retimed=retimed, action=action))
    q1, q3 = np.percentile(known, [25, 75]) if known else (0.0, 0.0)
    report = SyncReport(
        ref, len(known), float(q3 - q1), s.max_sync_offset, s.audio_offset, s.fix_sync, lines
    )
    return kept, rejects, report


def _decide(t: StoredTake, ref: float, s: Settings) -> tuple[str, float, str | None]:
    """(action, correction of the lag in seconds, reject reason or None) for one take."""
    lag, limit = t.lag.lag, s.max_sync_offset
    against = f"the dataset's median lag {ms(ref)}" if ref else "0"
    if t.mismatch is not None:
        if lag is None:
            return "rejected", 0.0, f"{t.mismatch.reason}; its lag is unknown ({t.lag.unknown})"
        x, d = lag - ref, t.mismatch.seconds
        if min(abs(x - d), abs(x)) > limit:
            return (
                "rejected",
                0.0,
                f"{t.mismatch.reason}; its lag {ms(lag)} against {against} explains neither "
                f"extra time at the start ({ms(d)}) nor at the end",
            )
        if abs(x - d) < abs(x):
            return "lead-in", d, None
        return "tail", 0.0, None
    if lag is None:
        return "unknown", 0.0, None
    x = lag - ref
    if abs(x) <= limit:
        return "kept", 0.0, None
    if s.fix_sync:
        return "re-timed", x, None
    way = "late" if lag > 0 else "early"
    return (
        "rejected",
        0.0,
        f"audio {abs(lag) * 1000:.0f} ms {way} against the animation (correlation "
        f"{t.lag.peak:.2f}), {ms(x)} from {against}: more than --max-sync-offset {limit:g} "
        f"(audio shifted or trimmed against its capture?); --fix-sync re-times it to {against}",
    )
