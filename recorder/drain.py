"""The drain: one thread that empties the recorder's per-CPU perf rings into the recordings.

Each sample is ``struct rec_sample`` (bpf_src/lib/recorder.h) followed by the first
``cap_len`` bytes of the packet. Its ``recordings`` bitmap names the recording slots it belongs
to; each of those recordings gets the packet cut to its own capture length, with a wall-clock
timestamp (the datapath stamps CLOCK_MONOTONIC), the direction, the XDP verdict (outbound
only: inbound samples are taken before the verdict is known) and a comment naming the
recording, the service and the backend.

Losses: when a ring is full the datapath counts the refused sample for every recording that
wanted it (``rec_lost_cnt``); the drain turns the growth of those counters into
``Recording.note_lost`` (pcapng: ``epb_dropcount`` on the next packet and ``isb_ifdrop``).
The ring's own PERF_RECORD_LOST count is kept as ``ring_lost``.

A program swap (new mask set) opens the new program's rings with :meth:`Drain.attach` before
it goes live and empties the old ones with :meth:`Drain.retire` after it was replaced.
"""

from __future__ import annotations

import ctypes as ct
import logging
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from l4lb.recorder.recording import Recording

log = logging.getLogger(__name__)

#: struct rec_sample: recordings, ts_ns, cap_len, orig_len, svc_id, be_id, direction, verdict, flags
SAMPLE = struct.Struct("<QQIIIIBBB5x")
VERDICT_NONE = 0xFF
F_ICMP = 1
DEFAULT_PAGES = 256          # per CPU: 1 MiB of ring
WAKEUP = 32


class _Ring:
    def __init__(self, maps: Any) -> None:
        self.maps = maps
        self.lost_seen = [0] * 64


class Drain:
    def __init__(self, *, describe: Callable[[], tuple[dict[int, str], dict[int, str]]] | None = None,
                 on_idle: Callable[[], None] | None = None, page_cnt: int = DEFAULT_PAGES,
                 tick_s: float = 0.2) -> None:
        self.describe = describe
        self.on_idle = on_idle
        self.page_cnt = page_cnt
        self.tick_s = tick_s
        self.samples = 0
        self.ring_lost = 0
        self._rings: list[_Ring] = []
        self._ring_lock = threading.Lock()
        self._slots: dict[int, Recording] = {}
        self._route: dict[int, tuple[Recording, ...]] = {}
        self._comments: dict[tuple[Any, ...], str] = {}
        self._svc_names: dict[int, str] = {}
        self._be_names: dict[int, str] = {}
        self._names_at = 0.0
        self._offset = time.time_ns() - time.monotonic_ns()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- wiring -------------------------------------------------------------------------
    def set_slots(self, slots: dict[int, Recording]) -> None:
        """Which recording owns which slot (the manager's view; replaced as a whole)."""
        self._slots = dict(slots)
        self._route = {}

    def attach(self, maps: Any) -> None:
        """Open the perf rings of a (not yet live) program."""
        ring = _Ring(maps)
        # Wake the drain every WAKEUP samples, not for each (a wake-up per sample costs the
        # producing CPU more than the sample); the loop's consume() picks up the remainder.
        maps.bpf[b"rec_events"].open_perf_buffer(self._on_sample, page_cnt=self.page_cnt, lost_cb=self._on_lost,
                                                 wakeup_events=WAKEUP)
        with self._ring_lock:
            self._rings.append(ring)

    def retire(self, program: Any) -> None:
        """Empty and forget the rings of a program that was just replaced."""
        with self._ring_lock:
            for ring in [r for r in self._rings if r.maps.bpf is program.bpf]:
                ring.maps.bpf.perf_buffer_consume()
                self._account_lost(ring)
                self._rings.remove(ring)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rec-drain", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._ring_lock:
            for ring in self._rings:
                ring.maps.bpf.perf_buffer_consume()
                self._account_lost(ring)

    # -- loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            with self._ring_lock:
                rings = list(self._rings)
                timeout = 50 if len(rings) == 1 else 10
                for ring in rings:
                    ring.maps.bpf.perf_buffer_poll(timeout)
                    ring.maps.bpf.perf_buffer_consume()
            if not rings:
                self._stop.wait(0.05)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.tick_s
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - the drain must keep draining
                    log.exception("recorder tick failed")

    def tick(self) -> None:
        """Losses, time limits, flushes; then the manager's housekeeping."""
        self._offset = time.time_ns() - time.monotonic_ns()
        with self._ring_lock:
            for ring in self._rings:
                self._account_lost(ring)
        mono = time.monotonic_ns()
        for rec in list(self._slots.values()):
            rec.tick(mono)
        if self.on_idle is not None:
            self.on_idle()

    def _account_lost(self, ring: _Ring) -> None:
        now = ring.maps.lost_per_slot()
        for slot, (n, seen) in enumerate(zip(now, ring.lost_seen)):
            if n > seen:
                rec = self._slots.get(slot)
                if rec is not None:
                    rec.note_lost(n - seen)
        ring.lost_seen = now

    # -- samples -------------------------------------------------------------------------------
    def _recordings(self, recs: int) -> tuple[Recording, ...]:
        out = self._route.get(recs)
        if out is None:
            found = []
            bits = recs
            while bits:
                low = bits & -bits
                rec = self._slots.get(low.bit_length() - 1)
                if rec is not None:
                    found.append(rec)
                bits ^= low
            out = self._route[recs] = tuple(found)
        return out

    def _on_sample(self, cpu: int, data: Any, size: int) -> None:
        raw = ct.string_at(data, size)
        recs, ts, cap, orig, svc, be, direction, verdict, flags = SAMPLE.unpack_from(raw)
        self.samples += 1
        pkt = raw[SAMPLE.size:SAMPLE.size + cap]
        wall = ts + self._offset
        v = None if verdict == VERDICT_NONE else verdict
        for rec in self._recordings(recs):
            c = rec.spec.capture_length
            rec.write(pkt[:c] if c and c < cap else pkt, ts, wall, orig, direction, v,
                      self._comment(rec.id, svc, be, direction, flags))

    def _on_lost(self, count: int) -> None:
        self.ring_lost += count

    def _comment(self, rid: str, svc: int, be: int, direction: int, flags: int) -> str:
        key = (rid, svc, be, direction, flags)
        text = self._comments.get(key)
        if text is None:
            parts = [f"recording={rid}", "in" if direction == 1 else "out"]
            if flags & F_ICMP:
                parts.append("icmp-too-big")
            else:
                parts.append(f"service={self._name('svc', svc)}")
                if direction == 2:
                    parts.append(f"backend={self._name('be', be)}")
            text = " ".join(parts)
            if len(self._comments) > 4096:
                self._comments.clear()
            self._comments[key] = text
        return text

    def _name(self, kind: str, ident: int) -> str:
        table = self._svc_names if kind == "svc" else self._be_names
        if ident not in table and self.describe is not None and time.monotonic() - self._names_at > 1.0:
            self._names_at = time.monotonic()
            try:
                self._svc_names, self._be_names = self.describe()
            except Exception as e:  # noqa: BLE001 - a comment is not worth a lost packet
                log.debug("recorder: names unavailable: %s", e)
            table = self._svc_names if kind == "svc" else self._be_names
        return table.get(ident, f"#{ident}")


__all__ = ["Drain", "SAMPLE"]
