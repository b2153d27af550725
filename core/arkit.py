"""ARKit's 52 blendshapes: their names and the orders they circulate in.

The canonical order is Apple's ``ARFaceAnchor.BlendShapeLocation`` order. Every array this
project writes or reads uses it. Other tools ship the same 52 names in other orders (Live Link
Face's CSV swaps JawLeft/JawRight and MouthLeft/MouthRight; some exporters sort them), so
columns are always mapped by name, never by position.
"""

from __future__ import annotations

import numpy as np

from core.errors import AnimationError

ARKIT_NAMES: tuple[str, ...] = (
    "eyeBlinkLeft",
    "eyeLookDownLeft",
    "eyeLookInLeft",
    "eyeLookOutLeft",
    "eyeLookUpLeft",
    "eyeSquintLeft",
    "eyeWideLeft",
    "eyeBlinkRight",
    "eyeLookDownRight",
    "eyeLookInRight",
    "eyeLookOutRight",
    "eyeLookUpRight",
    "eyeSquintRight",
    "eyeWideRight",
    "jawForward",
    "jawLeft",
    "jawRight",
    "jawOpen",
    "mouthClose",
    "mouthFunnel",
    "mouthPucker",
    "mouthLeft",
    "mouthRight",
    "mouthSmileLeft",
    "mouthSmileRight",
    "mouthFrownLeft",
    "mouthFrownRight",
    "mouthDimpleLeft",
    "mouthDimpleRight",
    "mouthStretchLeft",
    "mouthStretchRight",
    "mouthRollLower",
    "mouthRollUpper",
    "mouthShrugLower",
    "mouthShrugUpper",
    "mouthPressLeft",
    "mouthPressRight",
    "mouthLowerDownLeft",
    "mouthLowerDownRight",
    "mouthUpperUpLeft",
    "mouthUpperUpRight",
    "browDownLeft",
    "browDownRight",
    "browInnerUp",
    "browOuterUpLeft",
    "browOuterUpRight",
    "cheekPuff",
    "cheekSquintLeft",
    "cheekSquintRight",
    "noseSneerLeft",
    "noseSneerRight",
    "tongueOut",
)
NUM_BLENDSHAPES = len(ARKIT_NAMES)
INDEX = {name.lower(): i for i, name in enumerate(ARKIT_NAMES)}


def _swap(names: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out = list(names)
    i, j = out.index(a), out.index(b)
    out[i], out[j] = out[j], out[i]
    return tuple(out)


# Live Link Face writes capitalised names and swaps two pairs relative to Apple's order.
LIVE_LINK_NAMES: tuple[str, ...] = tuple(
    n[0].upper() + n[1:]
    for n in _swap(_swap(ARKIT_NAMES, "jawLeft", "jawRight"), "mouthLeft", "mouthRight")
)
LIVE_LINK_EXTRA = (
    "HeadYaw",
    "HeadPitch",
    "HeadRoll",
    "LeftEyeYaw",
    "LeftEyePitch",
    "LeftEyeRoll",
    "RightEyeYaw",
    "RightEyePitch",
    "RightEyeRoll",
)
ALPHABETICAL_NAMES: tuple[str, ...] = tuple(sorted(ARKIT_NAMES, key=str.lower))
ORDERS = {"arkit": ARKIT_NAMES, "livelink": LIVE_LINK_NAMES, "alphabetical": ALPHABETICAL_NAMES}


def canonical_columns(names: list[str] | tuple[str, ...]) -> np.ndarray:
    """For each canonical blendshape, the position of its column in ``names``.

    Matching is by name, case-insensitive (``JawOpen`` == ``jawOpen``). Names that are not
    blendshapes (timecode, head pose) are ignored; a missing blendshape is an error naming it.
    """
    where: dict[str, int] = {}
    for pos, name in enumerate(names):
        key = name.strip().lower()
        if key in INDEX:
            if key in where:
                raise AnimationError(f"column {name!r} appears twice")
            where[key] = pos
    missing = [n for n in ARKIT_NAMES if n.lower() not in where]
    if missing:
        raise AnimationError(
            f"missing {len(missing)} of the 52 ARKit columns: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    return np.array([where[n.lower()] for n in ARKIT_NAMES], dtype=np.int64)


def to_canonical(values: np.ndarray, order: str | tuple[str, ...]) -> np.ndarray:
    """Reorder ``[T, 52]`` columns given in ``order`` (a name in ORDERS or a tuple of names)."""
    names = ORDERS[order] if isinstance(order, str) else order
    return np.ascontiguousarray(values[:, canonical_columns(names)])
