"""One recording: what it asked for (:class:`RecordingSpec`) and its files (:class:`Recording`).

A Recording owns its :class:`~l4lb.recorder.limits.Limiter` and the current capture file. The
drain calls :meth:`Recording.write` for every sample that belongs to it and
:meth:`Recording.tick` from its timer; the API thread reads :meth:`Recording.to_dict` and calls
:meth:`Recording.stop`. One lock per recording keeps those apart.

Files: ``<id>_<index:06d>.<fmt>`` (pcapfile.safe_name) in the recorder directory, 0600, plus
``<id>.json`` with the metadata, so stopped recordings (and their files) stay listable after a
daemon restart. A recording that was still running when the daemon died without closing it
is listed as stopped with reason ``daemon_restart`` (its last file may lack the pcapng
statistics block, and records after the last flush are lost).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l4lb.recfilter import Filter
from l4lb.recorder.limits import Action, Limiter, RotationPolicy, StopConditions
from l4lb.recorder.pcapfile import FORMATS, PcapngWriter, PcapWriter, open_writer, safe_join, safe_name

log = logging.getLogger(__name__)

MAX_CAPTURE_LENGTH = 16384    # REC_MAX_CAP in recorder.h: longer captures are cut there
SNAPLEN_WHOLE = 65535


@dataclass(frozen=True)
class RecordingSpec:
    filters: tuple[Filter, ...]
    capture_length: int = 0                 # 0 = whole packet
    fmt: str = "pcapng"
    stop: StopConditions = field(default_factory=StopConditions)
    rotation: RotationPolicy = field(default_factory=RotationPolicy)
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.filters:
            raise ValueError("filters: at least one filter is required")
        c = self.capture_length
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= MAX_CAPTURE_LENGTH:
            raise ValueError(f"capture_length: {c!r} must be 0 (whole packet) to {MAX_CAPTURE_LENGTH}")
        if self.fmt not in FORMATS:
            raise ValueError(f"format: {self.fmt!r} is not one of {', '.join(FORMATS)}")

    @property
    def snaplen(self) -> int:
        return self.capture_length or SNAPLEN_WHOLE


@dataclass
class FileInfo:
    index: int
    name: str


class Recording:
    def __init__(self, rid: str, spec: RecordingSpec, directory: Path, slot: int, *,
                 started_ns: int | None = None) -> None:
        self.id = rid
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
        self._sizes: dict[int, int] = {}
        self._dirty = False
        self._saved: dict[str, Any] = {}      # counts of a recording loaded from disk

    # -- lifecycle --------------------------------------------------------------------
    def open(self, mono_start_ns: int) -> None:
        """Create file 0; the limiter counts time on the datapath's (monotonic) clock."""
        self._limiter = Limiter(self.spec.stop, self.spec.rotation, start_ns=mono_start_ns)
        self._open_file(0)
        self.save_meta()

    def mark_live(self, mono_ns: int) -> None:
        """The datapath matches our filters from now on: time limits count from here (a
        program swap may have taken seconds)."""
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
        self._writer = open_writer(path, self.spec.fmt, **kwargs)
        self.files[index] = FileInfo(index, name)
        self._sizes[index] = self._writer.bytes_written

    def section_comment(self) -> str:
        label = f" name={self.spec.name}" if self.spec.name else ""
        return f"l4lb recording {self.id}{label}; filters: " + "; ".join(str(f) for f in self.spec.filters)

    # -- drain side ------------------------------------------------------------------
    def write(self, data: bytes, mono_ns: int, wall_ns: int, orig_len: int, direction: int,
              verdict: int | None, comment: str | None) -> None:
        """One sample (already cut to this recording's capture length)."""
        self.write_many(((data, mono_ns, wall_ns, orig_len, direction, verdict, comment),))

    def write_many(self, samples: Iterable[tuple[bytes, int, int, int, int, int | None, str | None]]) -> None:
        """Samples ``(data, mono_ns, wall_ns, orig_len, direction, verdict, comment)`` as for
        :meth:`write`, under one lock acquisition (the drain's batches)."""
        with self.lock:
            for data, mono_ns, wall_ns, orig_len, direction, verdict, comment in samples:
                w, lim = self._writer, self._limiter
                if self.state != "running" or w is None or lim is None:
                    return
                d = lim.offer(len(data), mono_ns, file_bytes=w.bytes_written)
                if d.action is Action.STOP:
                    self._finish(d.reason.value if d.reason else "stopped")
                    return
                if d.action is Action.ROTATE:
                    w.close()
                    self._sizes[self._index_of(w)] = w.bytes_written
                    if d.overwrite:
                        old = self.files.pop(d.index, None)
                        if old is not None:
                            os.unlink(safe_join(self.directory, old.name))
                    self._open_file(d.index)
                    w = self._writer
                    assert w is not None
                w.write_sample(data, wall_ns, orig_len, direction, verdict, comment)
                self._dirty = True
                if d.final:
                    self._finish(d.reason.value if d.reason else "stopped")

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
                self._writer.flush()
                self._dirty = False

    # -- API side ----------------------------------------------------------------------
    def stop(self, reason: str = "stopped") -> None:
        with self.lock:
            if self.state == "running":
                self._finish(reason)

    def _finish(self, reason: str) -> None:
        self.state = "stopped"
        self.stop_reason = reason
        self.stopped_ns = time.time_ns()
        if self._writer is not None:
            self._writer.close()
            self._sizes[self._index_of(self._writer)] = self._writer.bytes_written
        self.save_meta()

    @property
    def packets(self) -> int:
        return self._limiter.packets if self._limiter is not None else self._saved.get("packets", 0)

    @property
    def bytes(self) -> int:
        return self._limiter.bytes if self._limiter is not None else self._saved.get("bytes", 0)

    def file_list(self) -> list[dict[str, Any]]:
        out = []
        for idx in sorted(self.files):
            info = self.files[idx]
            try:
                size = os.stat(safe_join(self.directory, info.name)).st_size
            except OSError:
                size = 0
            if self._writer is not None and not self._writer.closed and self._writer.path.name == info.name:
                size = self._writer.bytes_written   # buffered records count: they are on their way
            out.append({"index": idx, "name": info.name, "size": size, "path": str(self.directory / info.name)})
        return out

    def to_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "id": self.id,
                "name": self.spec.name,
                "state": self.state,
                "stop_reason": self.stop_reason,
                "packets": self.packets,
                "bytes": self.bytes,
                "lost": self.lost,
                "files": self.file_list(),
                "filters": [str(f) for f in self.spec.filters],
                "capture_length": self.spec.capture_length,
                "format": self.spec.fmt,
                "stop": _stop_dict(self.spec.stop),
                "rotate": _rotate_dict(self.spec.rotation),
                "started": self.started_ns / 1e9,
                "stopped": self.stopped_ns / 1e9 if self.stopped_ns is not None else None,
            }

    def file_path(self, index: int) -> Path:
        with self.lock:
            info = self.files.get(index)
            if info is None:
                raise KeyError(index)
            if self._writer is not None and not self._writer.closed and self._writer.path.name == info.name:
                self._writer.flush()
            return safe_join(self.directory, info.name)

    def remove_files(self) -> None:
        with self.lock:
            for info in self.files.values():
                try:
                    os.unlink(safe_join(self.directory, info.name))
                except FileNotFoundError:
                    pass
            try:
                os.unlink(self.meta_path())
            except FileNotFoundError:
                pass

    # -- metadata on disk --------------------------------------------------------------------
    def meta_path(self) -> Path:
        return safe_join(self.directory, f"{self.id}.json")

    def save_meta(self) -> None:
        d = {
            "id": self.id, "name": self.spec.name, "state": self.state, "stop_reason": self.stop_reason,
            "packets": self.packets, "bytes": self.bytes, "lost": self.lost,
            "files": [{"index": f.index, "name": f.name} for f in self.files.values()],
            "filters": [f.to_dict() for f in self.spec.filters],
            "capture_length": self.spec.capture_length, "format": self.spec.fmt,
            "stop": _stop_dict(self.spec.stop), "rotate": _rotate_dict(self.spec.rotation),
            "started_ns": self.started_ns, "stopped_ns": self.stopped_ns,
        }
        path = self.meta_path()
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(d, f)
        os.replace(tmp, path)

    @classmethod
    def load_meta(cls, path: Path) -> Recording:
        """A recording of an earlier daemon run: stopped, files as they are on disk."""
        d = json.loads(path.read_text())
        spec = RecordingSpec(
            filters=tuple(Filter.from_dict(f) for f in d["filters"]),
            capture_length=d["capture_length"], fmt=d["format"],
            stop=StopConditions(**_stop_args(d.get("stop") or {})),
            rotation=RotationPolicy(**_rotate_args(d.get("rotate") or {})),
            name=d.get("name"),
        )
        rec = cls(d["id"], spec, path.parent, -1, started_ns=d["started_ns"])
        rec.state = "stopped"
        rec.stop_reason = d["stop_reason"] if d["state"] == "stopped" else "daemon_restart"
        rec.stopped_ns = d.get("stopped_ns") or int(path.stat().st_mtime_ns)
        rec.lost = d.get("lost", 0)
        rec.files = {f["index"]: FileInfo(f["index"], f["name"]) for f in d["files"]}
        rec._saved = {"packets": d.get("packets", 0), "bytes": d.get("bytes", 0)}
        if d["state"] != "stopped":
            rec.save_meta()
        return rec


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


__all__ = ["FileInfo", "MAX_CAPTURE_LENGTH", "Recording", "RecordingSpec"]
