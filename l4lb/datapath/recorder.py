"""The recorder's half of the datapath: filter maps, mask slots, early-reject bitmaps.

bpf_src/lib/recorder.h describes the BPF side. Here:

* :func:`build_bits` computes ``rec_bits`` (per field value, which mask slots could match) and
  :func:`build_filters` the ``rec_filters`` contents (masked key -> recordings bitmap, capture
  length) from the active filters;
* :class:`RecorderMaps` writes them, with the masks' slots in ``rec_masks``, into the loaded
  program's maps in an order that is safe for packets in flight (a new mask's slot, then new
  filter entries, then the bits that lead to them; bits cleared before the entries and slots
  they led to go);
* :class:`RecorderDatapath` keeps them in step with the active filters. Any filter, whatever
  its mask, is armed by these map writes: no compile, no program swap.

The recorder maps are pinned with the program (loader.pin_program), so a daemon that adopts
the pinned program reaches them by path; :class:`RecorderMaps` clears whatever an earlier
daemon left in them before it writes the first filter.
"""

from __future__ import annotations

import ctypes as ct
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from l4lb.datapath import libbpf
from l4lb.recfilter import Filter, Mask, assign_mask_slots
from l4lb.recorder.perfring import PerfRings

log = logging.getLogger(__name__)

MAX_SLOTS = 64                 # recordings at once: bits of rec_value.recordings
CAP_WHOLE = 0xFFFF             # REC_CAP_WHOLE: "the whole packet" (capture_length 0)
MAX_CAPLEN = 16384             # REC_MAX_CAP
MASK_SLOTS = 64                # REC_MASK_SLOTS: IPv4 masks 0-31, IPv6 32-63
#: The recorder's maps, pinned with the program (loader.py) and adopted with it.
RECORDER_MAPS = ("rec_filters", "rec_bits", "rec_wild", "rec_masks", "rec_lost_cnt", "rec_events")
# rec_bits layout (REC_BM_* in recorder.h): one u64 per value of each field.
BM_SRC4, BM_DST4, BM_SRC6, BM_DST6, BM_DPORT, BM_SPORT = (i * 65536 for i in range(6))
BM_PROTO = 6 * 65536
BM_SIZE = BM_PROTO + 256
# rec_wild (struct rec_wild: one u64 per table above, in that order) follows rec_bits in the
# arrays computed here: index BM_WILD + table.
BM_WILD = BM_SIZE
WILD_PROTO = 6
WILD_USED = 7                  # rec_wild.used: the slots in use (0: the program skips the recorder)
WILD_WORDS = 8
V4_WILD_BELOW = 8              # an IPv4 prefix shorter than this admits every bucket (it is cheaper
                               # to over-admit: the hash look-up decides) than writing > 256 entries
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True, slots=True)
class FilterEntry:
    """One filter of one recording (slot 0-63), with that recording's capture length."""

    filter: Filter
    slot: int
    caplen: int = 0            # 0 = whole packet

    def __post_init__(self) -> None:
        if not 0 <= self.slot < MAX_SLOTS:
            raise ValueError(f"slot {self.slot} out of range 0-{MAX_SLOTS - 1}")


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
        if net.prefixlen < V4_WILD_BELOW:
            return None
        start = n >> 16
        return slice(start, start + (1 << (16 - net.prefixlen)))
    if net.prefixlen >= 32:
        return bucket6(n >> 96)
    return None


def _or_column(arr: np.ndarray, filters: Iterable[Filter], bit: int) -> None:
    """OR ``1 << bit`` into every rec_bits value that one of ``filters`` (of one mask) admits
    (``arr``: rec_bits, then rec_wild at BM_WILD): a field that admits every value sets its
    wild word, a short IPv4 prefix its range, explicit values in one vectorised step."""
    b = np.uint64(1 << bit)
    ranges: set[tuple[int, int]] = set()
    points: list[int] = []
    for f in filters:
        src_base, dst_base = (BM_SRC4, BM_DST4) if f.family == 4 else (BM_SRC6, BM_DST6)
        for base, net in ((src_base, f.src), (dst_base, f.dst)):
            r = _addr_range(net, f.family)
            if r is None:
                points.append(BM_WILD + base // 65536)
            elif isinstance(r, slice):
                ranges.add((base + r.start, base + r.stop))
            else:
                points.append(base + r)
        for base, port in ((BM_DPORT, f.dport), (BM_SPORT, f.sport)):
            points.append(BM_WILD + base // 65536 if port == 0 else base + port)
        points.append(BM_WILD + WILD_PROTO if f.proto == 0 else BM_PROTO + f.proto)
    for start, stop in ranges:
        arr[start:stop] |= b
    if points:
        arr[np.asarray(points, dtype=np.int64)] |= b


def build_bits(entries: Iterable[FilterEntry], bits: dict[Mask, int]) -> np.ndarray:
    """rec_bits contents (for each field value, the mask slots, ``bits``: mask -> slot, with
    a filter admitting it), then rec_wild's words (per field, slots admitting every value;
    the slots in use)."""
    arr = np.zeros(BM_WILD + WILD_WORDS, dtype=np.uint64)
    groups: dict[Mask, set[Filter]] = {}
    for e in entries:
        groups.setdefault(e.filter.mask(), set()).add(e.filter)
    for m, fs in groups.items():
        _or_column(arr, fs, bits[m])
    arr[BM_WILD + WILD_USED] = np.uint64(sum(1 << bits[m] for m in groups))
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
    """The recorder maps of one loaded program: a bcc.BPF it was compiled as, or the
    PinnedObjects it was adopted as. Opening them clears them (what a dead daemon armed)."""

    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self.filters = bpf[b"rec_filters"]
        self.bits = bpf[b"rec_bits"]
        self.wild = bpf[b"rec_wild"]
        self.masks = bpf[b"rec_masks"]
        self.lost = bpf[b"rec_lost_cnt"]
        if ct.sizeof(self.filters.Key) != 44:
            raise RuntimeError(f"struct rec_key is {ct.sizeof(self.filters.Key)} bytes, recfilter.KEY_STRUCT 44")
        self.slots: dict[Mask, int] = {}
        self._keys: dict[bytes, tuple[int, int]] = {}      # rec_filters as written
        self._bits = np.zeros(BM_WILD + WILD_WORDS, dtype=np.uint64)    # rec_bits + rec_wild as written
        self._by_slot: dict[int, tuple[tuple[Filter, ...], int]] = {}  # recording -> filters, capture length
        self._key_slots: dict[bytes, dict[int, int]] = {}  # key -> {recording: capture length}
        self._mask_filters: dict[Mask, dict[Filter, int]] = {}  # mask -> its filters (how many recordings)
        self._packed: dict[Filter, bytes] = {}
        self._clear()

    def _clear(self) -> None:
        """Empty the maps whatever they hold, in the packet-safe order."""
        # A bit leads to a mask slot in use (bpf_src/lib/recorder.h: a slot is written
        # before the bits that lead to it and freed after they are cleared, here too):
        # with every slot free no bit is set, and the bitmaps (3 MB, ~0.1 s of batch
        # read at every start) need no reading.
        masks = libbpf.array_lookup_all(self.masks.map_fd, MASK_SLOTS, ct.sizeof(self.masks.Leaf))
        if masks.view(np.dtype(self.masks.Leaf))["family"].any():
            bits = libbpf.array_lookup_all(self.bits.map_fd, BM_SIZE, 8).view(np.uint64).reshape(-1)
        else:
            bits = np.zeros(0, dtype=np.uint64)
        nz = np.flatnonzero(bits)
        if len(nz):
            _update_batch(self.bits.map_fd, nz, np.zeros(len(nz), dtype=np.uint64))
        stale = list(self.filters.keys())
        for k in stale:
            try:
                del self.filters[k]
            except KeyError:
                pass
        self._write_wild(np.zeros(WILD_WORDS, dtype=np.uint64))
        for slot in range(MASK_SLOTS):
            self.masks[ct.c_uint32(slot)] = self.masks.Leaf()
        if len(nz) or stale:
            log.info("recorder: cleared %d filters an earlier daemon left armed", len(stale))

    def _write_wild(self, words: np.ndarray) -> None:
        v = self.wild.Leaf()
        if ct.sizeof(v) != WILD_WORDS * 8:
            raise RuntimeError(f"struct rec_wild is {ct.sizeof(v)} bytes, not {WILD_WORDS} u64")
        ct.memmove(ct.addressof(v), np.ascontiguousarray(words, dtype=np.uint64).tobytes(), WILD_WORDS * 8)
        self.wild[ct.c_uint32(0)] = v

    def _key(self, packed: bytes) -> Any:
        k = self.filters.Key()
        ct.memmove(ct.addressof(k), packed, len(packed))  # KEY_STRUCT is the C layout, byte for byte
        return k

    def _set_slot(self, slot: int, mask: Mask | None) -> None:
        v = self.masks.Leaf()               # all zero: a free slot (family 0)
        if mask is not None:
            packed = mask.template().pack()
            ct.memmove(ct.addressof(v), packed, len(packed))
        self.masks[ct.c_uint32(slot)] = v

    def write(self, entries: Sequence[FilterEntry]) -> None:
        """Make the maps match exactly ``entries``. Raises MaskLimitError (nothing written)
        past 32 masks a family.

        Incremental: only the recordings (slots) whose filters or capture length changed
        cost work, so arming a small recording beside 16k loaded filters writes a few map
        entries and the bitmap columns of the masks it touches."""
        by_slot: dict[int, tuple[list[Filter], int]] = {}
        for e in entries:
            cap = CAP_WHOLE if e.caplen == 0 else min(e.caplen, CAP_WHOLE)
            fs, _ = by_slot.setdefault(e.slot, ([], cap))
            if by_slot[e.slot][1] != cap:
                raise ValueError(f"slot {e.slot}: one capture length per recording")
            fs.append(e.filter)
        new = {slot: (tuple(fs), cap) for slot, (fs, cap) in by_slot.items()}
        changed = [s for s in set(new) | set(self._by_slot) if new.get(s) != self._by_slot.get(s)]
        if not changed:
            return
        # Stage (nothing written, nothing of self changed until the limit is checked).
        staged: dict[Mask, dict[Filter, int]] = {}
        touched: set[Filter] = set()
        for s, sign in ((s, sign) for s in changed for sign in (-1, 1)):
            fs = (self._by_slot if sign < 0 else new).get(s, ((), 0))[0]
            for f in dict.fromkeys(fs):
                m = f.mask()
                counts = staged.get(m)
                if counts is None:
                    counts = staged[m] = dict(self._mask_filters.get(m, {}))
                n = counts.get(f, 0) + sign
                if n:
                    counts[f] = n
                else:
                    del counts[f]
                touched.add(f)
        needed = [m for m in self._mask_filters if m not in staged] + [m for m, c in staged.items() if c]
        slots = assign_mask_slots(self.slots, needed)
        # Keys the changed slots touch: their new values (or none).
        values: dict[bytes, tuple[int, int] | None] = {}
        key_slots: dict[bytes, dict[int, int]] = {}
        for f in touched:
            packed = self._packed.get(f) or f.masked_key().pack()
            self._packed[f] = packed
            held = dict(self._key_slots.get(packed, {}))
            for s in changed:
                held.pop(s, None)
            key_slots[packed] = held
        for s in changed:
            if s in new:
                fs, cap = new[s]
                for f in fs:
                    key_slots[self._packed[f]][s] = cap
        for packed, held in key_slots.items():
            values[packed] = (sum(1 << s for s in held), max(held.values())) if held else None
        masks_changed = [m for m, c in staged.items() if c.keys() != self._mask_filters.get(m, {}).keys()]
        bits = self._bits.copy()
        clear = sum(1 << self.slots[m] for m in masks_changed if m in self.slots)
        if clear:
            bits &= np.uint64(~clear & 0xFFFFFFFFFFFFFFFF)
        for m in masks_changed:
            if staged[m]:
                _or_column(bits, staged[m], slots[m])
        bits[BM_WILD + WILD_USED] = np.uint64(sum(1 << slot for slot in slots.values()))

        # 1. slots of new masks (no bit leads to them yet)
        for m, slot in slots.items():
            if self.slots.get(m) != slot:
                self._set_slot(slot, m)
        # 2. new and changed filter entries (nothing leads to a new one yet)
        for packed, value in values.items():
            if value is not None and self._keys.get(packed) != value:
                v = self.filters.Leaf()
                v.recordings, v.caplen = value
                self.filters[self._key(packed)] = v
                self._keys[packed] = value
        # 3. the early-reject bitmaps
        diff = np.flatnonzero(bits[:BM_WILD] != self._bits[:BM_WILD])
        if len(diff):
            _update_batch(self.bits.map_fd, diff, bits[diff])
        if not np.array_equal(bits[BM_WILD:], self._bits[BM_WILD:]):
            self._write_wild(bits[BM_WILD:])
        self._bits = bits
        # 4. entries no bit leads to any more, then their masks' slots
        for packed, value in values.items():
            if value is None and packed in self._keys:
                try:
                    del self.filters[self._key(packed)]
                except KeyError:
                    pass
                del self._keys[packed]
        used = set(slots.values())
        freed = [slot for slot in self.slots.values() if slot not in used]
        for slot in freed:
            self._set_slot(slot, None)
        # the new state
        self.slots = slots
        self._by_slot = new
        for packed, held in key_slots.items():
            if held:
                self._key_slots[packed] = held
            else:
                self._key_slots.pop(packed, None)
        for m, counts in staged.items():
            if counts:
                self._mask_filters[m] = counts
            else:
                self._mask_filters.pop(m, None)
        for f in touched:
            if f not in self._mask_filters.get(f.mask(), {}):
                self._packed.pop(f, None)
        if freed:
            # A packet that read a bit cleared above may still be about to read the slot:
            # once every run that started before now has ended, the slot is free to reuse
            # (a free slot is always clean when the next write starts).
            libbpf.synchronize_rcu()

    def open_rings(self, page_cnt: int) -> PerfRings:
        """The perf rings of ``rec_events``, one per online CPU (read by the drain)."""
        return PerfRings(self.bpf[b"rec_events"].map_fd, page_cnt=page_cnt)

    def lost_per_slot(self) -> list[int]:
        vals = self.lost[ct.c_uint32(0)]
        return [sum(int(v.lost[i]) for v in vals) for i in range(MAX_SLOTS)]

    def entry_count(self) -> int:
        return len(self._keys)


class RecorderDatapath:
    """Keeps the datapath's recorder in step with the active filters: map writes only.

    The maps are those of the program the datapath runs (``dp.prog``). ``on_program(maps)``
    runs when they are first opened (e.g. to open the perf rings); if the datapath runs
    another program since (a compiled one let go for the pinned one, a reload), the maps are
    opened again, ``on_retire(old_program)`` runs for the one left behind and the filters
    are written again.
    """

    def __init__(self, dp: Any, *, on_program: Callable[[RecorderMaps], None] | None = None,
                 on_retire: Callable[[Any], None] | None = None) -> None:
        self.dp = dp
        self.on_program = on_program
        self.on_retire = on_retire
        self.maps: RecorderMaps | None = None
        self._prog: Any = None
        self._entries: list[FilterEntry] = []

    def _current(self) -> RecorderMaps:
        prog = self.dp.prog
        if self.maps is not None and self._prog is prog:
            return self.maps
        old, self.maps, self._prog = self._prog, None, None
        if old is not None and self.on_retire is not None:
            self.on_retire(old)             # first: the same pinned ring may be reopened below
        maps = RecorderMaps(prog.bpf)
        if self.on_program is not None:
            self.on_program(maps)
        self.maps, self._prog = maps, prog
        if self._entries:
            maps.write(self._entries)
        return maps

    def open(self) -> None:
        """Open the maps now (clearing what an earlier daemon left armed: a dead daemon's
        filters would go on sampling into a ring nobody reads)."""
        self._current()

    def set_filters(self, entries: Sequence[FilterEntry]) -> None:
        """Make the datapath match exactly ``entries``. Raises
        :class:`l4lb.recfilter.MaskLimitError` (nothing changed) past 32 masks a family."""
        if not entries and self.maps is None:
            return                                  # never armed: nothing to do
        self._current().write(entries)
        self._entries = list(entries)

    @property
    def slots(self) -> dict[Mask, int]:
        """Mask -> slot in force."""
        return dict(self.maps.slots) if self.maps is not None else {}

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
    "RECORDER_MAPS",
]
