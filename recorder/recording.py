"""One recording: what it asked for (:class:`RecordingSpec`) and its files (:class:`Recording`).

A Recording owns its :class:`~l4lb.recorder.limits.Limiter` and the current capture file. The
drain hands it the samples that belong to it with :meth:`Recording.write_many`, a batch at a
time, and calls
:meth:`Recording.tick` from its timer; the API thread reads :meth:`Recording.to_dict` and calls
:meth:`Recording.stop`. One lock per recording keeps those apart.

Files: ``<id>_<index:06d>.<fmt>`` (pcapfile.safe_name) in the recorder directory, 0600, plus
``<id>.json`` with the metadata, so stopped recordings (and their files) stay listable after a
daemon restart. A recording that was still running when the daemon died without closing it
is listed as stopped with reason ``daemon_restart`` (its last file may lack the pcapng
statistics block, and records after the last flush are lost).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l4lb.recfilter import Filter
from l4lb.recorder.budget import DiskBudget
from l4lb.recorder.limits import NO_BOUND, Action, Limiter, RotationPolicy, StopConditions
from l4lb.recorder.meta import BadMeta, read_meta
from l4lb.recorder.pcapfile import (
    FORMATS, LimitReached, PcapngWriter, PcapWriter, RecordKind, Sample, open_writer, plain_join, safe_join,
    safe_name,
)

log = logging.getLogger(__name__)

MAX_CAPTURE_LENGTH = 16384    # REC_MAX_CAP in recorder.h: longer captures are cut there
SNAPLEN_WHOLE = 65535
SECTION_COMMENT_BYTES = 65535  # a pcapng option's length is a u16


#: --direction: the pcapng direction bits each value keeps (1 inbound, 2 outbound).
DIRECTIONS = {"in": 1, "out": 2, "both": 3}


@dataclass(frozen=True)
class RecordingSpec:
    filters: tuple[Filter, ...]
    capture_length: int = 0                 # 0 = whole packet
    fmt: str = "pcapng"
    stop: StopConditions = field(default_factory=StopConditions)
    rotation: RotationPolicy = field(default_factory=RotationPolicy)
    name: str | None = None
    direction: str = "both"                 # in | out | both: which copies the files get
    verdict: bool = True                    # pcapng epb_verdict (False: named in the comment instead)

    def __post_init__(self) -> None:
        if not self.filters:
            raise ValueError("filters: at least one filter is required")
        c = self.capture_length
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= MAX_CAPTURE_LENGTH:
            raise ValueError(f"capture_length: {c!r} must be 0 (whole packet) to {MAX_CAPTURE_LENGTH}")
        if self.fmt not in FORMATS:
            raise ValueError(f"format: {self.fmt!r} is not one of {', '.join(FORMATS)}")
        if not isinstance(self.verdict, bool):
            raise ValueError(f"verdict: expected true or false, got {self.verdict!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction: {self.direction!r} is not one of {', '.join(DIRECTIONS)}")

    @property
    def directions(self) -> int:
        """Bit mask of the sample directions wanted (1 inbound, 2 outbound)."""
        return DIRECTIONS[self.direction]

    @property
    def snaplen(self) -> int:
        return self.capture_length or SNAPLEN_WHOLE


@dataclass
class FileInfo:
    index: int
    name: str


class Recording:
    def __init__(self, rid: str, spec: RecordingSpec, directory: Path, slot: int, *,
                 started_ns: int | None = None, budget: DiskBudget | None = None,
                 interfaces: Callable[[int], tuple[str, str]] | None = None) -> None:
        self.id = rid
        self.interfaces = interfaces          # ifindex -> (name, description), for pcapng IDBs
        self.spec = spec
        self.directory = directory
        self.slot = slot
        self.started_ns = started_ns if started_ns is not None else time.time_ns()
        self.stopped_ns: int | None = None
        self.state = "running"
        self.stop_reason: str | None = None
        self.lost = 0
        self.files: dict[int, FileInfo] = {}
        self.lock = threading.Lock()
        self._writer: PcapngWriter | PcapWriter | None = None
        self._limiter: Limiter | None = None
        self._sizes: dict[int, int] = {}      # file index -> bytes (the open file: its writer knows)
        self._dirty = False
        self._saved: dict[str, Any] = {}      # counts of a recording loaded from disk
        self._budget = budget
        self._dropped = [0, 0]                # packets, captured bytes counted but lost to a write error
        self.meta_failed = False              # the last save_meta failed (a full disk): retried

    # -- lifecycle --------------------------------------------------------------------
    def open(self, mono_start_ns: int) -> None:
        """Create file 0; the limiter counts time on the datapath's (monotonic) clock."""
        self._limiter = Limiter(self.spec.stop, self.spec.rotation, start_ns=mono_start_ns)
        with self._accounted():
            self._open_file(0)
        self.save_meta()

    def mark_live(self, mono_ns: int) -> None:
        """The datapath matches our filters from now on: time limits count from here (the
        map writes that armed them came after the file was opened)."""
        with self.lock:
            self.started_ns = time.time_ns()
            if self._limiter is not None:
                self._limiter.start_ns = mono_ns

    def _open_file(self, index: int) -> None:
        name = safe_name(self.id, index, self.spec.fmt)
        path = safe_join(self.directory, name)
        kwargs: dict[str, Any] = {"snaplen": self.spec.snaplen}
        if self.spec.fmt == "pcapng":
            kwargs["section_comment"] = self.section_comment()
            kwargs["interfaces"] = self.interfaces
            kwargs["verdicts"] = self.spec.verdict
        self._writer = open_writer(path, self.spec.fmt, **kwargs)
        self.files[index] = FileInfo(index, name)
        self._sizes[index] = self._writer.bytes_written

    def section_comment(self) -> str:
        """The pcapng section comment: id, name, filters (as many as fit the 64 KiB an option
        holds: a recording may have 16k filters), direction."""
        label = f" name={self.spec.name}" if self.spec.name else ""
        direction = f"; direction: {self.spec.direction}" if self.spec.direction != "both" else ""
        head = f"l4lb recording {self.id}{label}; filters: "
        longest_tail = f"; ... and {len(self.spec.filters)} more (l4lbctl record show {self.id})"
        room = SECTION_COMMENT_BYTES - len(head.encode()) - len(direction) - len(longest_tail.encode())
        shown: list[str] = []
        for f in self.spec.filters:
            text = str(f)
            room -= len(text) + 2
            if room < 0:
                break
            shown.append(text)
        more = len(self.spec.filters) - len(shown)
        tail = f"; ... and {more} more (l4lbctl record show {self.id})" if more else ""
        return head + "; ".join(shown) + tail + direction

    # -- drain side ------------------------------------------------------------------
    def write(self, data: bytes, mono_ns: int, wall_ns: int, orig_len: int, direction: int,
              verdict: int | None, comment: str | None, ifindex: int | None = None) -> None:
        """One sample (already cut to this recording's capture length); ``ifindex``: its NIC."""
        kind = RecordKind(comment, direction, verdict, ifindex)
        self.write_many([(data, mono_ns, orig_len, kind)], wall_ns - mono_ns)

    def write_many(self, samples: Sequence[Sample], offset_ns: int) -> None:
        """The drain's batch: samples ``(data, mono_ns, orig_len, kind)`` (data already cut to
        this recording's capture length), wall clock = ``mono_ns + offset_ns``, under one lock
        acquisition. The batch may add at most :meth:`_room` bytes to the disk; the record that
        would pass it stops the recording.

        Runs of plain writes (no limit, rotation or new NIC in the way: Limiter.plain) are
        encoded by the writer in one loop (write_batch); the sample that ends a run goes
        through the limiter and write_sample alone, then the next run starts."""
        with self.lock, self._accounted():
            w, lim = self._writer, self._limiter
            if self.state != "running" or w is None or lim is None:
                return
            start = self._footprint()
            room, why = self._room()
            w.limit = w.bytes_written + w.closing_bytes + room
            size_rotation = self.spec.rotation.file_size
            i, end = 0, len(samples)
            while i < end:
                run = self._plain_run(lim, samples, i)
                if run:
                    data_before = w.data_written
                    j = w.write_batch(samples, i, i + run, offset_ns, size_rotation)
                    lim.took(j - i, w.data_written - data_before)    # counted before the hand-over can fail
                    if j > i:
                        self._dirty = True
                        try:
                            w.flush_if_full()
                        except OSError as e:
                            self._failed(e)
                            return
                    i = j
                    if i == end:
                        return
                data, mono_ns, orig_len, kind = samples[i]
                i += 1
                d = lim.offer(len(data), mono_ns, file_bytes=w.bytes_written)
                if d.action is Action.STOP:
                    self._finish(d.reason.value if d.reason else "stopped")
                    return
                if d.action is Action.ROTATE:
                    try:
                        w = self._rotate(w, d.index, d.overwrite)
                    except OSError as e:
                        self._failed(e, unwritten=(1, len(data)))
                        return
                    w.limit = w.bytes_written + w.closing_bytes + room - (self._footprint() - start)
                try:
                    w.write_sample(data, mono_ns + offset_ns, orig_len, kind.direction, kind.verdict, kind.comment,
                                   kind.ifindex)
                except LimitReached:
                    self._dropped[0] += 1
                    self._dropped[1] += len(data)
                    self._finish(why)
                    return
                except OSError as e:
                    self._failed(e)
                    return
                self._dirty = True
                if d.final:
                    self._finish(d.reason.value if d.reason else "stopped")
                    return

    @staticmethod
    def _plain_run(lim: Limiter, samples: Sequence[Sample], i: int) -> int:
        """How many samples from ``i`` on are plain writes as far as the limiter is concerned."""
        plain = lim.plain()
        if plain is None:
            return 0
        stop = min(len(samples), i + plain.packets)
        caplen_below, ts_below = plain.caplen_below, plain.ts_below
        if caplen_below == NO_BOUND and ts_below == NO_BOUND:
            return stop - i
        total = 0
        for j in range(i, stop):
            data, mono_ns = samples[j][:2]
            total += len(data)
            if total >= caplen_below or mono_ns >= ts_below:
                return j - i
        return stop - i

    def _rotate(self, w: PcapngWriter | PcapWriter, index: int, overwrite: bool) -> PcapngWriter | PcapWriter:
        try:
            w.close()
        finally:
            self._sizes[self._index_of(w)] = w.bytes_written
        if overwrite:
            old = self.files.pop(index, None)
            if old is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(plain_join(self.directory, old.name))
                self._sizes.pop(index, None)
        self._open_file(index)
        assert self._writer is not None
        return self._writer

    def _room(self) -> tuple[int, str]:
        """Bytes this recording may still add to the disk, and the bound that sets it."""
        if self._budget is None:
            return 1 << 62, ""
        own = self._budget.limits.max_recording_bytes - self._footprint()
        return min((own, "max_recording_bytes"), self._budget.room())

    def _footprint(self) -> int:
        """Bytes of this recording's files: the open one with what is staged for it and its
        closing block (reserved from the start, so closing never needs room it lacks)."""
        w = self._writer
        if w is None or w.closed:
            return sum(self._sizes.values())
        current = self._index_of(w)
        return sum(n for i, n in self._sizes.items() if i != current) + w.bytes_written + w.closing_bytes

    @contextlib.contextmanager
    def _accounted(self) -> Iterator[None]:
        """Tell the shared budget how much the block changed this recording's files."""
        before = self._footprint()
        try:
            yield
        finally:
            if self._budget is not None:
                self._budget.add(self._footprint() - before)

    def _failed(self, e: OSError, unwritten: tuple[int, int] = (0, 0)) -> None:
        """A write failed (the writer already cut its file back to a whole record): stop."""
        dropped = (getattr(e, "dropped_packets", 0) + unwritten[0], getattr(e, "dropped_bytes", 0) + unwritten[1])
        self._dropped[0] += dropped[0]
        self._dropped[1] += dropped[1]
        reason = _write_reason(e)
        log.warning("recording %s: %s writing its file (%d packets not written): stopped (%s)",
                    self.id, e.strerror or e, dropped[0], reason)
        self._finish(reason)

    def _index_of(self, w: Any) -> int:
        for idx, info in self.files.items():
            if info.name == w.path.name:
                return idx
        return -1

    def note_lost(self, count: int) -> None:
        with self.lock:
            self.lost += count
            if self._writer is not None and not self._writer.closed:
                self._writer.note_lost(count)

    def tick(self, mono_now_ns: int) -> None:
        """Timer: duration limit, and flush so a download sees what was captured."""
        with self.lock:
            if self.state != "running" or self._limiter is None:
                return
            d = self._limiter.poll(mono_now_ns)
            if d is not None:
                self._finish(d.reason.value if d.reason else "stopped")
                return
            if self._dirty and self._writer is not None:
                with self._accounted():
                    try:
                        self._writer.flush()
                    except OSError as e:
                        self._failed(e)
                        return
                self._dirty = False

    # -- API side ----------------------------------------------------------------------
    def stop(self, reason: str = "stopped") -> None:
        with self.lock, self._accounted():
            if self.state == "running":
                self._finish(reason)

    def _finish(self, reason: str) -> None:
        """Stop: close the file (a failed final write makes the reason a disk one), save the metadata."""
        self.state = "stopped"
        self.stop_reason = reason
        self.stopped_ns = time.time_ns()
        w = self._writer
        if w is not None:
            try:
                w.close()
            except OSError as e:
                self._dropped[0] += getattr(e, "dropped_packets", 0)
                self._dropped[1] += getattr(e, "dropped_bytes", 0)
                self.stop_reason = _write_reason(e)
                log.warning("recording %s: %s closing its file: stopped (%s)", self.id, e.strerror or e,
                            self.stop_reason)
            finally:
                self._sizes[self._index_of(w)] = w.bytes_written
        self.save_meta()

    @property
    def packets(self) -> int:
        """Packets in the files (or that were, in a ring's overwritten ones)."""
        if self._limiter is None:
            return self._saved.get("packets", 0)
        return self._limiter.packets - self._dropped[0]

    @property
    def bytes(self) -> int:
        """Captured bytes of those packets (file headers and per-record overhead not counted)."""
        if self._limiter is None:
            return self._saved.get("bytes", 0)
        return self._limiter.bytes - self._dropped[1]

    def file_list(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The files as they are on disk, and what is wrong with any of them (such a file is
        listed without a size or path and is not served)."""
        out, problems = [], []
        for idx in sorted(self.files):
            info = self.files[idx]
            entry: dict[str, Any] = {"index": idx, "name": info.name, "size": None}
            if self._writer is not None and not self._writer.closed and self._writer.path.name == info.name:
                entry["size"] = self._writer.bytes_written   # buffered records count: they are on their way
            else:
                problem = file_problem(self.directory, info.name)
                if problem is not None:
                    problems.append(f"file {idx} {problem}")
                    out.append(entry)
                    continue
                entry["size"] = os.lstat(plain_join(self.directory, info.name)).st_size
            entry["path"] = str(self.directory / info.name)
            out.append(entry)
        return out, problems

    def to_dict(self) -> dict[str, Any]:
        with self.lock:
            files, problems = self.file_list()
            return {
                "id": self.id,
                "name": self.spec.name,
                "state": self.state,
                "stop_reason": self.stop_reason,
                "packets": self.packets,
                "bytes": self.bytes,
                "lost": self.lost,
                "files": files,
                "problems": problems,
                "filters": [str(f) for f in self.spec.filters],
                "capture_length": self.spec.capture_length,
                "format": self.spec.fmt,
                "direction": self.spec.direction,
                "verdict": self.spec.verdict,
                "stop": _stop_dict(self.spec.stop),
                "rotate": _rotate_dict(self.spec.rotation),
                "started": self.started_ns / 1e9,
                "stopped": self.stopped_ns / 1e9 if self.stopped_ns is not None else None,
            }

    def file_path(self, index: int) -> Path:
        with self.lock, self._accounted():
            info = self.files.get(index)
            if info is None:
                raise KeyError(index)
            w = self._writer
            if w is not None and not w.closed and w.path.name == info.name:
                try:
                    w.flush()
                except OSError as e:
                    self._failed(e)
            return plain_join(self.directory, info.name)   # opened with O_NOFOLLOW by the caller

    def remove_files(self) -> None:
        with self.lock:
            for info in self.files.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(plain_join(self.directory, info.name))    # a symlink goes, not its target
            try:
                os.unlink(self.meta_path())
            except FileNotFoundError:
                pass

    # -- metadata on disk --------------------------------------------------------------------
    def meta_path(self) -> Path:
        return plain_join(self.directory, f"{self.id}.json")

    def save_meta(self) -> None:
        d = {
            "id": self.id, "name": self.spec.name, "state": self.state, "stop_reason": self.stop_reason,
            "packets": self.packets, "bytes": self.bytes, "lost": self.lost,
            "files": [{"index": f.index, "name": f.name} for f in self.files.values()],
            "filters": [f.to_dict() for f in self.spec.filters],
            "capture_length": self.spec.capture_length, "format": self.spec.fmt,
            "direction": self.spec.direction, "verdict": self.spec.verdict, "stop": _stop_dict(self.spec.stop), "rotate": _rotate_dict(self.spec.rotation),
            "started_ns": self.started_ns, "stopped_ns": self.stopped_ns,
        }
        path = self.meta_path()
        tmp = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(d, f)
            os.replace(tmp, path)
        except OSError as e:
            # A full disk must not fail the recording's stop: the metadata catches up at the next save.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not self.meta_failed:
                log.warning("recording %s: metadata not saved (%s); kept in memory, retried", self.id,
                            e.strerror or e)
            self.meta_failed = True
            return
        self.meta_failed = False

    @classmethod
    def load_meta(cls, path: Path) -> Recording:
        """A recording of an earlier daemon run: stopped, files as they are on disk. Raises
        BadMeta (saying why, never quoting the file) for a file that is not what save_meta wrote."""
        d, mtime_ns = read_meta(path)
        try:
            spec = RecordingSpec(
                filters=tuple(Filter.from_dict(f) for f in d.filters),
                capture_length=d.capture_length, fmt=d.format, direction=d.direction, verdict=d.verdict,
                stop=StopConditions(**_stop_args(d.stop or {})),
                rotation=RotationPolicy(**_rotate_args(d.rotate or {})),
                name=d.name,
            )
        except (ValueError, TypeError, KeyError) as e:
            raise BadMeta(f"its recording spec is invalid: {type(e).__name__}") from None
        for f in d.files:
            if f.name != safe_name(d.id, f.index, d.format):
                raise BadMeta(f"file {f.index} is not named as this recording's files are")
        rec = cls(d.id, spec, path.parent, -1, started_ns=d.started_ns)
        rec.state = "stopped"
        rec.stop_reason = d.stop_reason if d.state == "stopped" else "daemon_restart"
        rec.stopped_ns = d.stopped_ns or mtime_ns
        rec.lost = d.lost
        rec.files = {f.index: FileInfo(f.index, f.name) for f in d.files}
        rec._saved = {"packets": d.packets, "bytes": d.bytes}
        if d.state != "stopped":
            rec.save_meta()
        return rec


def file_problem(directory: Path, name: str) -> str | None:
    """Why a recording's file cannot be served as it is (None: it can)."""
    try:
        st = os.lstat(plain_join(directory, name))
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a symlink?)"
    return None


def _write_reason(e: OSError) -> str:
    return "disk_full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "write_error"


def _stop_dict(s: StopConditions) -> dict[str, Any]:
    return {"packets": s.max_packets, "bytes": s.max_bytes,
            "duration": s.max_duration_ns / 1e9 if s.max_duration_ns is not None else None}


def _rotate_dict(r: RotationPolicy) -> dict[str, Any]:
    return {"size": r.file_size, "seconds": r.rotate_ns / 1e9 if r.rotate_ns is not None else None,
            "count": r.max_files}


def _stop_args(d: dict[str, Any]) -> dict[str, Any]:
    dur = d.get("duration")
    return {"max_packets": d.get("packets"), "max_bytes": d.get("bytes"),
            "max_duration_ns": round(dur * 1e9) if dur else None}


def _rotate_args(d: dict[str, Any]) -> dict[str, Any]:
    sec = d.get("seconds")
    return {"file_size": d.get("size"), "rotate_ns": round(sec * 1e9) if sec else None,
            "max_files": d.get("count")}


__all__ = ["BadMeta", "FileInfo", "MAX_CAPTURE_LENGTH", "Recording", "RecordingSpec", "file_problem"]
