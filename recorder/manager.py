"""Recorder manager: the recordings of one daemon, their datapath filters and the drain.

    mgr = RecorderManager(cfg.recorder_dir, datapath)
    rec = mgr.start(RecordingSpec(filters=(...), capture_length=128))
    mgr.list(); mgr.get(rec.id); mgr.stop(rec.id); mgr.file_path(rec.id, 0); mgr.delete(rec.id)
    mgr.close()        # daemon TERM: every running recording is closed cleanly

Each running recording owns one of 64 slots (a bit in the datapath's filter values). Its
filters go into the datapath when it starts and leave when it stops, whoever stops it (the API,
a limit noticed by the drain, or close()). Slots are reused least-recently-freed first, so
samples still in flight for a stopped recording do not land in a new one.

Shutdown semantics (daemon TERM): recordings are *closed*, not carried over. Each gets
stop_reason ``daemon_shutdown``, its files are completed (pcapng statistics block included)
and the datapath is disarmed (no filter left, so the program that stays attached costs one
array look-up per service packet). The metadata stays on disk: after a restart the recordings
are listed as stopped and their files can be downloaded or deleted.

Disk: every recording writes within a shared :class:`~l4lb.recorder.budget.DiskBudget`
(per-recording and global byte caps, a free-space reserve); one that meets a bound, or a
real ENOSPC, stops with the reason (``max_recording_bytes``, ``max_total_bytes``,
``disk_full``) and its file ends on a whole packet. A start is refused (``NoRoom``) while
the bounds leave no room. Metadata files that are not what the recorder wrote are skipped
at load (logged); files that are not regular files are listed as problems, never served.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from l4lb.datapath.recorder import MAX_SLOTS, FilterEntry, RecorderDatapath
from l4lb.recfilter import MaskLimitError
from l4lb.recorder.budget import DiskBudget, DiskLimits
from l4lb.recorder.drain import DEFAULT_PAGES, Drain
from l4lb.recorder.recording import BadMeta, Recording, RecordingSpec, file_problem

log = logging.getLogger(__name__)


class RecorderError(Exception):
    """Base of the manager's refusals; nothing was changed."""


class NoSuchRecording(RecorderError, KeyError):
    pass


class NoSuchFile(RecorderError, KeyError):
    pass


class RecorderBusy(RecorderError):
    """All slots in use."""


class FilterLimit(RecorderError, ValueError):
    """The filters would need more masks than the datapath has room for."""


class TooBig(RecorderError, ValueError):
    """The recording asks for more disk than one recording may have."""


class NoRoom(RecorderError):
    """The recorder's disk bounds leave no room for a new recording now."""


class Damaged(RecorderError):
    """A recording's file on disk is not what the recorder wrote (a symlink, missing, ...)."""


class RecorderManager:
    def __init__(self, directory: Path, dp: Any, *, run: Callable[..., Any] | None = None,
                 page_cnt: int = DEFAULT_PAGES, limits: DiskLimits = DiskLimits()) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        self.budget = DiskBudget(self.directory, limits)
        self._ticks = 0
        self._run = run or (lambda fn, *a: fn(*a))
        self._lock = threading.RLock()
        self._recs: dict[str, Recording] = {}
        self._active: dict[int, Recording] = {}          # slot -> running recording
        self._freed_at: dict[int, float] = {}
        self.drain = Drain(describe=getattr(dp, "id_names", None), on_idle=self._housekeeping, page_cnt=page_cnt)
        self.datapath = RecorderDatapath(dp, on_program=self.drain.attach, on_retire=self.drain.retire)
        self._run(self.datapath.open)
        self._load()
        self.drain.start()

    def _load(self) -> None:
        for meta in sorted(self.directory.glob("*.json")):
            try:
                rec = Recording.load_meta(meta)
            except BadMeta as e:
                log.warning("recorder: skipping %s: %s", meta, e)
                continue
            except Exception as e:  # noqa: BLE001 - one bad file must not hide the others
                log.warning("recorder: skipping %s: %s: %s", meta, type(e).__name__, e)
                continue
            self._recs[rec.id] = rec

    # -- commands ------------------------------------------------------------------------
    def start(self, spec: RecordingSpec) -> Recording:
        ring = spec.rotation.file_size * spec.rotation.max_files if spec.rotation.ring else None  # type: ignore[operator]
        too_big = self.budget.refuse_spec(spec.stop.max_bytes, ring)
        if too_big is not None:
            raise TooBig(too_big)
        with self._lock:
            slot = self._free_slot()
            no_room = self.budget.refuse_start()
            if no_room is not None:
                raise NoRoom(no_room)
            rid = secrets.token_hex(6)
            rec = Recording(rid, spec, self.directory, slot, budget=self.budget, interfaces=self._nic_names())
            rec.open(time.monotonic_ns())
            self._active[slot] = rec
            self.drain.set_slots(self._active)
            try:
                self._apply()
            except BaseException as e:
                del self._active[slot]
                self.drain.set_slots(self._active)
                rec.stop("failed")
                rec.remove_files()
                if isinstance(e, MaskLimitError):
                    raise FilterLimit(str(e)) from None
                raise
            rec.mark_live(time.monotonic_ns())
            self._recs[rid] = rec
            log.info("recording %s started: %s", rid, "; ".join(str(f) for f in spec.filters))
            return rec

    def stop(self, rid: str, reason: str = "stopped") -> Recording:
        with self._lock:
            rec = self.get(rid)
            self._retire(rec, reason)
            return rec

    def delete(self, rid: str) -> None:
        with self._lock:
            rec = self.get(rid)
            self._retire(rec, "deleted")
            rec.remove_files()
            del self._recs[rid]
        self.budget.rescan()

    def get(self, rid: str) -> Recording:
        rec = self._recs.get(rid)
        if rec is None:
            raise NoSuchRecording(rid)
        return rec

    def list(self) -> list[Recording]:
        with self._lock:
            return sorted(self._recs.values(), key=lambda r: (r.started_ns, r.id))

    def file_path(self, rid: str, index: int) -> tuple[Path, str]:
        rec = self.get(rid)
        try:
            path = rec.file_path(index)
        except KeyError:
            raise NoSuchFile(f"recording {rid} has no file {index}") from None
        problem = file_problem(self.directory, rec.files[index].name)
        if problem is not None:
            log.warning("recorder: recording %s file %d %s; not served", rid, index, problem)
            raise Damaged(f"file {index} of recording {rid} {problem}; it is not served")
        return path, rec.spec.fmt

    def set_limits(self, limits: DiskLimits) -> None:
        """A reload: the new bounds apply from the next batch."""
        self.budget.limits = limits

    def close(self) -> None:
        """Daemon shutdown: close every running recording (files intact), disarm, stop draining."""
        with self._lock:
            running = list(self._active.values())
            self._active.clear()
            try:
                self._apply()
            except Exception as e:  # noqa: BLE001 - the files matter more
                log.warning("recorder: could not disarm the datapath: %s", e)
        self.drain.stop()                 # outside the lock: its timer may be waiting for it
        for rec in running:
            rec.stop("daemon_shutdown")
        self.drain.set_slots({})

    # -- internals ------------------------------------------------------------------------
    def _nic_names(self) -> Callable[[int], tuple[str, str]]:
        """ifindex -> (name, description) for a recording's pcapng IDBs: the namespace's NICs
        as they are now (read here, where the datapath's calls run), else asked again."""
        try:
            known = dict(self._run(socket.if_nameindex))
        except OSError:
            known = {}

        def resolve(ifindex: int) -> tuple[str, str]:
            name = known.get(ifindex) or socket.if_indextoname(ifindex)
            return name, f"{name} (ifindex {ifindex}), as the l4lb XDP program saw it"

        return resolve

    def _free_slot(self) -> int:
        free = [s for s in range(MAX_SLOTS) if s not in self._active]
        if not free:
            raise RecorderBusy(f"{MAX_SLOTS} recordings are running; stop one first")
        return min(free, key=lambda s: (self._freed_at.get(s, 0.0), s))

    def _entries(self) -> list[FilterEntry]:
        out = []
        for slot, rec in sorted(self._active.items()):
            for f in rec.spec.filters:
                out.append(FilterEntry(f, slot, rec.spec.capture_length))
        return out

    def _apply(self) -> None:
        self._run(self.datapath.set_filters, self._entries())

    def _retire(self, rec: Recording, reason: str) -> None:
        if rec.slot in self._active and self._active[rec.slot] is rec:
            del self._active[rec.slot]
            try:
                self._apply()
            finally:
                rec.stop(reason)
                self._freed_at[rec.slot] = time.monotonic()
                self.drain.set_slots(self._active)
        else:
            rec.stop(reason)

    def _housekeeping(self) -> None:
        """Drain timer: free space read again (a full rescan every 25 ticks, ~5 s); recordings
        that ended by a limit give their filters and slot back."""
        self._ticks += 1
        try:
            if self._ticks % 25 == 0:
                self.budget.rescan()
            else:
                self.budget.refresh()
        except OSError as e:
            log.warning("recorder: cannot read the free space of %s: %s", self.directory, e.strerror)
        with self._lock:
            for rec in [r for r in self._recs.values() if r.meta_failed and r.state != "running"]:
                with rec.lock:
                    rec.save_meta()      # room again (a recording deleted, the file cut back)?
            done = [r for r in self._active.values() if r.state != "running"]
            for rec in done:
                log.info("recording %s ended: %s", rec.id, rec.stop_reason)
                self._retire(rec, rec.stop_reason or "stopped")

    @property
    def lost_in_ring(self) -> int:
        return self.drain.ring_lost


__all__ = ["Damaged", "FilterLimit", "NoRoom", "NoSuchFile", "NoSuchRecording", "RecorderBusy", "RecorderError",
           "RecorderManager", "TooBig"]
