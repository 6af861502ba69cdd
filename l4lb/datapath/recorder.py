"""The recorder's half of the datapath: filter maps, early-reject bitmaps, program swaps.

bpf_src/lib/recorder.h describes the BPF side. Here:

* :func:`build_bits` computes ``rec_bits`` (per field value, which masks could match) and
  :func:`build_filters` the ``rec_filters`` contents (masked key -> recordings bitmap, capture
  length) from the active filters;
* :class:`RecorderMaps` writes them into a loaded program in an order that is safe for packets
  in flight (new filter entries before the bits that lead to them; bits cleared before the
  entries they led to are deleted);
* :class:`RecorderDatapath` decides between a map update (every mask already compiled in) and
  a recompile with a new mask set, swapped in atomically by
  :meth:`l4lb.datapath.engine.Datapath.replace_program`.

The recorder maps are not pinned: they are refilled after every (re)load, and their layout
stays out of the pinned maps' digest (a new mask never drops the flow table).
"""

from __future__ import annotations

import ctypes as ct
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from l4lb.datapath import libbpf
from l4lb.recfilter import Filter, Mask, compile_masks, render_mask_cflags
from l4lb.recorder.perfring import PerfRings

log = logging.getLogger(__name__)

MAX_SLOTS = 64                 # recordings at once: bits of rec_value.recordings
CAP_WHOLE = 0xFFFF             # REC_CAP_WHOLE: "the whole packet" (capture_length 0)
MAX_CAPLEN = 16384             # REC_MAX_CAP
REC_FLAG = "-DRECORDER"
# rec_bits layout (REC_BM_* in recorder.h): one u64 per value of each field.
BM_SRC4, BM_DST4, BM_SRC6, BM_DST6, BM_DPORT, BM_SPORT = (i * 65536 for i in range(6))
BM_PROTO = 6 * 65536
BM_SIZE = BM_PROTO + 256
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


def is_recorder_flag(flag: str) -> bool:
    return flag == REC_FLAG or flag.startswith("-DREC_")


def recorder_cflags(masks: Sequence[Mask]) -> list[str]:
    return [REC_FLAG, *render_mask_cflags(masks)]


@dataclass(frozen=True, slots=True)
class FilterEntry:
    """One filter of one recording (slot 0-63), with that recording's capture length."""

    filter: Filter
    slot: int
    caplen: int = 0            # 0 = whole packet

    def __post_init__(self) -> None:
        if not 0 <= self.slot < MAX_SLOTS:
            raise ValueError(f"slot {self.slot} out of range 0-{MAX_SLOTS - 1}")


def mask_bits(masks: Sequence[Mask]) -> dict[Mask, int]:
    """Bit of each compiled mask: IPv4 mask i -> i, IPv6 mask i -> 32 + i (the order of
    REC_MASKS_V4/V6, i.e. of ``masks``)."""
    out: dict[Mask, int] = {}
    n = {4: 0, 6: 0}
    for m in masks:
        out[m] = n[m.family] + (0 if m.family == 4 else 32)
        n[m.family] += 1
    return out


def bucket6(top32: int) -> int:
    """rec_bucket6(): fold the top 32 bits of an IPv6 address to 16."""
    return (top32 >> 16) ^ (top32 & 0xFFFF)


def _addr_range(net: Any, family: int) -> slice | int | None:
    """rec_bits indices (relative to the family's table) an address prefix admits;
    None = every bucket."""
    n = int(net.network_address)
    if family == 4:
        if net.prefixlen >= 16:
            return n >> 16
        if net.prefixlen == 0:
            return None
        start = n >> 16
        return slice(start, start + (1 << (16 - net.prefixlen)))
    if net.prefixlen >= 32:
        return bucket6(n >> 96)
    return None


def build_bits(entries: Iterable[FilterEntry], bits: dict[Mask, int]) -> np.ndarray:
    """rec_bits contents: for each field value, the masks with a filter admitting it."""
    arr = np.zeros(BM_SIZE, dtype=np.uint64)
    for e in entries:
        f = e.filter
        b = np.uint64(1 << bits[f.mask()])
        src_base, dst_base = (BM_SRC4, BM_DST4) if f.family == 4 else (BM_SRC6, BM_DST6)
        for base, net in ((src_base, f.src), (dst_base, f.dst)):
            r = _addr_range(net, f.family)
            if r is None:
                arr[base:base + 65536] |= b
            elif isinstance(r, slice):
                arr[base + r.start:base + r.stop] |= b
            else:
                arr[base + r] |= b
        for base, port in ((BM_DPORT, f.dport), (BM_SPORT, f.sport)):
            if port == 0:
                arr[base:base + 65536] |= b
            else:
                arr[base + port] |= b
        if f.proto == 0:
            arr[BM_PROTO:BM_PROTO + 256] |= b
        else:
            arr[BM_PROTO + f.proto] |= b
    return arr


def build_filters(entries: Iterable[FilterEntry]) -> dict[bytes, tuple[int, int]]:
    """rec_filters contents: packed masked key -> (recordings bitmap, capture length).
    The same filter in two recordings is one entry with both bits."""
    out: dict[bytes, tuple[int, int]] = {}
    for e in entries:
        key = e.filter.masked_key().pack()
        cap = CAP_WHOLE if e.caplen == 0 else min(e.caplen, CAP_WHOLE)
        recs, old_cap = out.get(key, (0, 0))
        out[key] = (recs | (1 << e.slot), max(cap, old_cap))
    return out


def _update_batch(fd: int, keys: np.ndarray, values: np.ndarray) -> None:
    """bpf_map_update_batch for an array map with arbitrary u32 keys."""
    lib = libbpf._lib()
    k = np.ascontiguousarray(keys, dtype=np.uint32)
    v = np.ascontiguousarray(values, dtype=np.uint64)
    count = ct.c_uint32(len(k))
    rc = lib.bpf_map_update_batch(fd, k.ctypes.data, v.ctypes.data, ct.byref(count), None)
    if rc < 0 or count.value != len(k):
        err = ct.get_errno()
        raise libbpf.DatapathOSError(err, f"rec_bits batch update wrote {count.value} of {len(k)}")


class RecorderMaps:
    """The recorder maps of one loaded program (a BCC object compiled with -DRECORDER)."""

    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self.filters = bpf[b"rec_filters"]
        self.bits = bpf[b"rec_bits"]
        self.lost = bpf[b"rec_lost_cnt"]
        self._keys: dict[bytes, tuple[int, int]] = {}
        self._bits = np.zeros(BM_SIZE, dtype=np.uint64)
        if ct.sizeof(self.filters.Key) != 44:
            raise RuntimeError(f"struct rec_key is {ct.sizeof(self.filters.Key)} bytes, recfilter.KEY_STRUCT 44")

    def _key(self, packed: bytes) -> Any:
        k = self.filters.Key()
        ct.memmove(ct.addressof(k), packed, len(packed))  # KEY_STRUCT is the C layout, byte for byte
        return k

    def write(self, entries: Sequence[FilterEntry], masks: Sequence[Mask]) -> None:
        want = build_filters(entries)
        bits = build_bits(entries, mask_bits(masks))
        # 1. new and changed filter entries (nothing leads to a new one yet)
        for packed, (recs, cap) in want.items():
            if self._keys.get(packed) != (recs, cap):
                v = self.filters.Leaf()
                v.recordings, v.caplen = recs, cap
                self.filters[self._key(packed)] = v
                self._keys[packed] = (recs, cap)
        # 2. the early-reject bitmaps
        changed = np.flatnonzero(bits != self._bits)
        if len(changed):
            _update_batch(self.bits.map_fd, changed, bits[changed])
            self._bits = bits
        # 3. entries no bit leads to any more
        for packed in [k for k in self._keys if k not in want]:
            try:
                del self.filters[self._key(packed)]
            except KeyError:
                pass
            del self._keys[packed]

    def open_rings(self, page_cnt: int) -> PerfRings:
        """The perf rings of ``rec_events``, one per online CPU (read by the drain)."""
        return PerfRings(self.bpf[b"rec_events"].map_fd, page_cnt=page_cnt)

    def lost_per_slot(self) -> list[int]:
        vals = self.lost[ct.c_uint32(0)]
        return [sum(int(v.lost[i]) for v in vals) for i in range(MAX_SLOTS)]

    def entry_count(self) -> int:
        return len(self._keys)


class RecorderDatapath:
    """Keeps the datapath's recorder in step with the active filters.

    ``on_program(new_maps)`` runs before a new program goes live (e.g. to open its perf ring);
    ``on_retire(old_program)`` after it was replaced (drain its ring; then it is closed here).
    """

    def __init__(self, dp: Any, *, on_program: Callable[[RecorderMaps], None] | None = None,
                 on_retire: Callable[[Any], None] | None = None) -> None:
        self.dp = dp
        self.on_program = on_program
        self.on_retire = on_retire
        self.masks: list[Mask] | None = None     # None: the program has no recorder compiled in
        self.maps: RecorderMaps | None = None
        self.recompiles = 0

    def set_filters(self, entries: Sequence[FilterEntry]) -> bool:
        """Make the datapath match exactly ``entries``. Returns True if it took a new program.
        Raises :class:`l4lb.recfilter.MaskLimitError` (nothing changed) past 32 masks a family."""
        needed = compile_masks(e.filter for e in entries)
        if self.masks is not None and self.maps is not None and set(needed) <= set(self.masks):
            self.maps.write(entries, self.masks)
            return False
        if not entries and self.masks is None:
            return False                            # never armed: nothing to do
        self._swap(entries, needed)
        return True

    def _swap(self, entries: Sequence[FilterEntry], masks: list[Mask]) -> None:
        base = [f for f in self.dp.cfg.extra_cflags if not is_recorder_flag(f)]
        new_maps: list[RecorderMaps] = []

        def prepare(prog: Any) -> None:
            maps = RecorderMaps(prog.bpf)
            maps.write(entries, masks)
            if self.on_program is not None:
                self.on_program(maps)
            new_maps.append(maps)

        old = self.dp.replace_program([*base, *recorder_cflags(masks)], prepare)
        self.recompiles += 1
        self.masks, self.maps = masks, new_maps[0]
        log.info("recorder: program with %d IPv4 + %d IPv6 masks swapped in",
                 sum(m.family == 4 for m in masks), sum(m.family == 6 for m in masks))
        if old is not None:
            try:
                if self.on_retire is not None:
                    self.on_retire(old)
            finally:
                old.bpf.cleanup()

    def lost_per_slot(self) -> list[int]:
        return self.maps.lost_per_slot() if self.maps is not None else [0] * MAX_SLOTS


__all__ = [
    "CAP_WHOLE",
    "FilterEntry",
    "MAX_SLOTS",
    "RecorderDatapath",
    "RecorderMaps",
    "build_bits",
    "build_filters",
    "mask_bits",
    "recorder_cflags",
]
