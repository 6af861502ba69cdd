"""l4lb/inplace.py: which few items of a list were replaced."""

from __future__ import annotations

from l4lb.inplace import MOST, replaced_at


def test_replaced_at() -> None:
    old = [object() for _ in range(1000)]
    new = list(old)
    assert replaced_at(old, new) == []
    new[0], new[500], new[999] = object(), object(), object()
    assert replaced_at(old, new) == [0, 500, 999]
    assert replaced_at(old, new[:-1]) is None  # another length: not in place
    assert replaced_at(old, [object() for _ in old]) is None and replaced_at(old, new, most=2) is None
    assert replaced_at(old[:MOST], [object() for _ in range(MOST)]) == list(range(MOST))
    assert replaced_at([], []) == []
