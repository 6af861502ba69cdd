"""l4lb/memory.py: the collector held off around whole-document requests."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from l4lb.memory import collections_paused


@pytest.fixture(autouse=True)
def _collector_back_on() -> Iterator[None]:
    yield
    gc.enable()


def test_paused_inside_back_on_after_even_on_error() -> None:
    gc.enable()
    with pytest.raises(RuntimeError):
        with collections_paused():
            assert not gc.isenabled()
            raise RuntimeError("refused")
    assert gc.isenabled()


def test_nested_and_overlapping_blocks_keep_it_off_until_the_last_ends() -> None:
    gc.enable()
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with collections_paused():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    with collections_paused():
        t.start()
        assert inside.wait(10)
        with collections_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert not gc.isenabled(), "the other thread's block is still running"
    leave.set()
    t.join(10)
    assert gc.isenabled()


def test_a_collector_switched_off_before_stays_off() -> None:
    gc.disable()
    with collections_paused():
        pass
    assert not gc.isenabled()
