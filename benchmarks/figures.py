"""Figures as the benchmarks print and write them: significant digits, never a measured value
rounded to zero, and counts with their noun in the right number."""

from __future__ import annotations

import math


def figure(x: float | None, digits: int = 3, missing: str = "–") -> str:
    """``x`` to ``digits`` significant digits (all of its integer digits when it has more, with
    thousands separators), never rounded to zero: 0.004 is "0.00400", 0.05 "0.0500", 1839.4
    "1,839"; ``missing`` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    rounded = round(x, decimals)
    if rounded and math.floor(math.log10(abs(rounded))) > math.floor(math.log10(abs(x))):
        decimals = max(0, decimals - 1)  # 9.996 rounds up to 10.0, not 10.00
    return f"{x:,.{decimals}f}"


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 repeat``, ``3 repeats``; ``words`` where the plural is not ``word + "s"``."""
    return f"{n:,} {word if n == 1 else words or word + 's'}"
