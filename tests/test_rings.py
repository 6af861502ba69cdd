"""Maglev table buffers (l4lb/datapath/rings.py) on real kernel maps: which
buffer a change may write, when, and that going back costs no write."""

from __future__ import annotations

import ctypes as ct
import os
from collections.abc import Iterator

import numpy as np
import pytest

from l4lb.datapath import libbpf
from l4lb.datapath.config import DatapathError
from l4lb.datapath.rings import Rings

pytestmark = [pytest.mark.bpf]

M = 251


@pytest.fixture
def outer() -> Iterator[int]:
    template = libbpf.array_create("rt_tmpl", 4, M, libbpf.BPF_F_MMAPABLE)
    fd = libbpf.map_create(libbpf.BPF_MAP_TYPE_ARRAY_OF_MAPS, "rt_outer", 4, 4, 4, inner_map_fd=template)
    yield fd
    os.close(fd)
    os.close(template)


def inner_ids(fd: int) -> dict[int, int]:
    """Outer index -> inner map id, read through the syscall."""
    out = {}
    for i in range(4):
        v = ct.c_uint32()
        if libbpf.map_lookup(fd, ct.c_int(i), v) and v.value:
            out[i] = v.value
    return out


def kernel_table(fd: int, idx: int) -> list[int]:
    """Buffer ``idx`` as the kernel holds it (element lookups, not the mapping)."""
    ifd = libbpf.map_fd_by_id(inner_ids(fd)[idx])
    try:
        v = ct.c_uint32()
        out = []
        for i in range(M):
            libbpf.map_lookup(ifd, ct.c_uint32(i), v)
            out.append(v.value)
        return out
    finally:
        os.close(ifd)


def table(n: int) -> np.ndarray:
    return np.full(M, n, dtype=np.uint32)


def test_written_table_is_what_the_kernel_holds(outer):
    r = Rings(M, 4, spares=0)
    [(idx, must)] = r.reserve(outer, ["a"])
    assert must and list(inner_ids(outer)) == [idx]  # created on demand
    r.write(idx, np.arange(M, dtype=np.uint32), "a")
    assert kernel_table(outer, idx) == list(range(M))
    r.close()


def test_a_retired_buffer_is_written_again_only_after_a_grace_period(outer):
    r = Rings(M, 2, spares=0)
    [(a, _)] = r.reserve(outer, ["a"])
    r.write(a, table(1), "a")
    r.use(a, None)
    [(b, _)] = r.reserve(outer, ["b"])
    r.write(b, table(2), "b")
    r.use(b, a)  # the service now points at b: a may still be read by packets in flight
    assert not r.writable(a) and r.pending()
    with pytest.raises(DatapathError, match="may still read it"):
        r.write(a, table(3), "c")
    assert kernel_table(outer, a) == [1] * M  # refused before touching it
    # Capacity 2 is exhausted: the next change waits for the grace period, then takes a.
    [(c, must)] = r.reserve(outer, ["c"])
    assert (c, must) == (a, True) and r.writable(a) and not r.pending()
    r.close()


def test_going_back_reuses_the_buffer_that_holds_the_table(outer):
    r = Rings(M, 4, spares=0)
    [(a, _)] = r.reserve(outer, ["old"])
    r.write(a, table(1), "old")
    r.use(a, None)
    [(b, must)] = r.reserve(outer, ["new"])
    assert b != a and must
    r.write(b, table(2), "new")
    r.use(b, a)
    assert r.reserve(outer, ["old"]) == [(a, False)]  # the undo: no write, no wait
    r.use(a, b)
    # A busy buffer is never handed out, even if it holds the wanted table.
    [(c, must)] = r.reserve(outer, ["old"])
    assert c != a and must
    r.close()


def test_missing_buffers_are_created_in_one_batch_and_capacity_is_a_clear_error(outer):
    r = Rings(M, 3, spares=0)
    places = r.reserve(outer, ["x", "y", "z"])
    assert sorted(i for i, _ in places) == [0, 1, 2] and all(w for _, w in places)
    assert sorted(inner_ids(outer)) == [0, 1, 2]
    for i, _ in places:
        r.use(i, None)
    with pytest.raises(DatapathError, match="no Maglev table buffer free"):
        r.reserve(outer, ["w"])
    r.close()


def test_recover_maps_existing_buffers_and_waits_before_writing_them(outer):
    first = Rings(M, 4, spares=0)
    places = first.reserve(outer, ["a", "b"])
    for (i, _), n in zip(places, (1, 2)):
        first.write(i, table(n), "ab"[n - 1])
    first.close()
    # A restarted daemon: the entry points at buffer places[0]; the other one
    # may have been in force a moment ago, so it is not writable before a grace period.
    again = Rings(M, 4, spares=0)
    again.recover(outer, [places[0][0]])
    assert again.busy == {places[0][0]}
    assert not again.writable(places[1][0])
    assert list(again.read(places[1][0])) == [2] * M
    again.grace()
    assert again.writable(places[1][0])
    again.close()


def test_spares_are_created_with_the_first_buffers_so_changes_need_no_outer_write(outer):
    r = Rings(M, 4, spares=2)
    [(a, _)] = r.reserve(outer, ["a"])
    assert len(inner_ids(outer)) == 3  # the one needed and two spares, in one batch
    r.write(a, table(1), "a")
    r.use(a, None)
    ids = inner_ids(outer)
    for name in ("b", "c"):  # two changes within one grace period: no wait, no new buffer
        [(b, must)] = r.reserve(outer, [name])
        assert must and r.writable(b)
        r.write(b, table(2), name)
        r.use(b, a)
        a = b
    assert inner_ids(outer) == ids
    r.close()
