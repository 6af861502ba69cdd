"""Which few items of a list were replaced in place.

Most writes change one service of many (a drain, a weight, one backend), and
everything downstream of the control core (overlay, plan, datapath, VIPs)
gets the whole new list: the same objects as last time but for those few. A
pass of identity comparisons finds them at C-loop speed; each consumer then
does its work for them alone instead of walking 1,000 services in Python. A
consumer must still check what it relies on for the others (same names, same
keys) in the items found, and fall back to its full pass when told None.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import is_not
from typing import Any

MOST = 8  # more replaced items than this: the full pass is as good


def replaced_at(old: Sequence[Any], new: Sequence[Any], most: int = MOST) -> list[int] | None:
    """Indices at which ``new`` holds another object than ``old``, if both have the
    same length and at most ``most`` differ; None otherwise."""
    if len(old) != len(new):
        return None
    differ = list(map(is_not, old, new))
    n = differ.count(True)
    if n > most:
        return None
    at: list[int] = []
    for _ in range(n):
        at.append(differ.index(True, at[-1] + 1 if at else 0))
    return at
