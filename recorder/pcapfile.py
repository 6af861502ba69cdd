"""Capture-file writers for one recording: pcapng (default) and classic nanosecond pcap.

Written by hand with :mod:`struct` on purpose: scapy's pcapng writer keeps only microseconds,
and dpkt's writers always write caplen == origlen (and microseconds). The recorder needs
nanosecond timestamps, truthful caplen < origlen for truncated samples, and per-packet
direction, XDP verdict and comments, which only pcapng can carry.

pcapng layout (little-endian, one section):

* SHB with ``shb_userappl`` ("l4lb <version>"), ``shb_os`` (kernel name and release) and an
  optional section comment;
* IDBs: linktype 1 (Ethernet), snaplen, ``if_name``, ``if_description``, ``if_tsresol`` = 9
  (ns). With ``interfaces=`` (the recorder's way) one per NIC, written before the first packet
  that NIC saw (a packet names its NIC by ifindex; ``interfaces(ifindex)`` gives the name and
  description), so a redirected packet's inbound and outbound copies show their own NICs;
  without it, one IDB named ``if_name`` in the header, which every packet uses;
* one EPB per packet, pointing at its NIC's IDB: ns timestamp, caplen <= origlen, options
  ``opt_comment``, ``epb_flags`` (bits 0-1 direction: 1 inbound, 2 outbound), ``epb_dropcount``
  (samples lost since the previous packet, when non-zero) and, unless ``verdicts=False``,
  ``epb_verdict`` (type 2 = eBPF XDP, 8-byte verdict);
* at close, an ISB per IDB: ``isb_starttime``, ``isb_endtime``, ``isb_usrdeliv`` (packets of
  that NIC), ``isb_ifrecv`` (those + lost) and ``isb_ifdrop`` (lost samples, as dumpcap
  reports libpcap's drops). A lost sample's NIC is unknown: every loss is counted on the
  first IDB's ISB.

Classic pcap: magic 0xA1B23C4D (ns), version 2.4, linktype 1, truthful caplen/origlen. It has no
place for direction, verdict, comments or drops: those arguments are accepted and dropped, so
the drain can treat both writers alike.

Records are collected in memory and handed to the file in one write per :data:`STAGE_PIECES`
pieces (and at :meth:`~_Writer.flush` and close): the drain writes hundreds of thousands of
small records a second, and a ``write`` call per record was a large share of its time.
The drain has two unchecked entries: :meth:`~_Writer.write_batch`, a run of samples in one
loop (per record: one ``struct`` call for the fixed fields, option bytes cached per
:class:`RecordKind`, three list items), and :meth:`~_Writer.write_sample`, one sample, for
what the batch leaves to it (a NIC new to the file, a drop count to report, a size bound).

Files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600: a writer never follows a
symlink or truncates an existing file. :func:`safe_name` and :func:`safe_join` build the paths.

Full disks: a file always ends on a whole record. The header is written when the file is
created (if that fails, the file is removed). Staged records go to the file with plain
``os.write`` calls; if one fails (``ENOSPC``, ``EDQUOT``, ...), the file is cut back to the
end of the last complete hand-over, those records are dropped and counted, and
:class:`WriteFailed` (an ``OSError``) tells the caller. ``limit`` caps the file's size
(with room kept for the closing block): a record that would pass it is not written and
:class:`LimitReached` is raised, so a caller can stop before the disk is full.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import islice
from pathlib import Path

from l4lb import __version__

LINKTYPE_ETHERNET = 1
DEFAULT_SNAPLEN = 262144
FORMATS = ("pcapng", "pcap")
FILE_MODE = 0o600
STAGE_PIECES = 8192           # pieces (a record is one to four) collected before one write

PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_BOM = 0x1A2B3C4D

# pcapng block types
BT_SHB = 0x0A0D0D0A
BT_IDB = 0x00000001
BT_ISB = 0x00000005
BT_EPB = 0x00000006

# option codes
OPT_ENDOFOPT = 0
OPT_COMMENT = 1
SHB_OS = 3
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9
EPB_FLAGS = 2
EPB_DROPCOUNT = 4
EPB_VERDICT = 7
VERDICT_TYPE_XDP = 2
ISB_STARTTIME = 2
ISB_ENDTIME = 3
ISB_IFRECV = 4
ISB_IFDROP = 5
ISB_USRDELIV = 8

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
# EPB fixed fields: block type, total length, interface, timestamp high/low, caplen, origlen
_EPB_HEAD = struct.Struct("<IIIIIII").pack
_PCAP_HEAD = struct.Struct("<IIII").pack     # classic record: seconds, nanoseconds, caplen, origlen
_NS = 1_000_000_000
_KINDS_CACHED = 1024        # a writer's cache of encoded kinds (a file rarely sees more than a few)
_LENGTHS_CACHED = 2048      # record ends cached per kind, by data length
USERAPPL = f"l4lb {__version__}"


def os_text() -> str:
    """``shb_os``: the kernel the capture was taken on, e.g. "Linux 6.1.0-18-amd64"."""
    u = os.uname()
    return f"{u.sysname} {u.release}"


class LimitReached(Exception):
    """The record would take the file past its ``limit``; nothing was written."""


class WriteFailed(OSError):
    """Handing records to the file failed; the file was cut back to its last whole record.
    ``dropped_packets`` / ``dropped_bytes`` (captured bytes) are what was lost."""

    def __init__(self, cause: OSError, path: Path, dropped_packets: int, dropped_bytes: int) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = path
        self.dropped_packets = dropped_packets
        self.dropped_bytes = dropped_bytes


class Direction(IntEnum):
    """pcapng ``epb_flags`` bits 0-1; the recorder's two observation points."""

    INBOUND = 1   # before the load balancer touches the packet
    OUTBOUND = 2  # the encapsulated packet, or a reply the LB generated (ICMP error, RST, echo reply)


class XdpVerdict(IntEnum):
    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _option(code: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"pcapng option {code}: value of {len(value)} bytes exceeds 65535")
    return struct.pack("<HH", code, len(value)) + value + bytes(_pad4(len(value)))


def _options(opts: list[bytes]) -> bytes:
    if not opts:
        return b""
    return b"".join(opts) + struct.pack("<HH", OPT_ENDOFOPT, 0)


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def _ts_parts(ts_ns: int) -> tuple[int, int]:
    return (ts_ns >> 32) & _U32, ts_ns & _U32


def _comment_bytes(comment: str) -> bytes:
    if not isinstance(comment, str):
        raise ValueError(f"comment: expected a string, got {type(comment).__name__}")
    raw = comment.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError(f"comment: {len(raw)} bytes, pcapng allows at most 65535")
    return raw


def _check_ts(ts_ns: int) -> int:
    if isinstance(ts_ns, bool) or not isinstance(ts_ns, int):
        raise ValueError(f"ts_ns: expected an int of nanoseconds since the epoch, got {ts_ns!r}")
    if not 0 <= ts_ns <= _U64:
        raise ValueError(f"ts_ns: {ts_ns} out of range")
    return ts_ns


@dataclass(frozen=True, eq=False, slots=True)
class RecordKind:
    """What the records of one (sample header, recording) share: comment, direction, XDP
    verdict (None: not stored) and NIC. The drain makes one per plan and reuses it, so a
    writer caches the encoded option bytes per kind; ``eq=False`` keeps the identity hash,
    a dict lookup that hashes nothing."""

    comment: str | None
    direction: int | None
    verdict: int | None
    ifindex: int | None = None


# A pcapng record's tails: "padding + options" for data lengths 0..3 mod 4, and the fixed overhead.
_Tails = tuple[bytes, bytes, bytes, bytes, int]
# write_batch's code for a kind in one file: IDB number, tails, data length -> (record length,
# "padding + options + record length").
_KindCode = tuple[int, _Tails, dict[int, tuple[int, bytes]]]

#: A sample as the drain hands it over: (data cut to the capture length, CLOCK_MONOTONIC ns,
#: original length, kind). The wall clock is ``mono + offset_ns`` of the batch.
Sample = tuple[bytes, int, int, RecordKind]


class _Writer:
    """Common file handling: exclusive 0600 creation, byte accounting, flush, idempotent close."""

    fmt = ""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        linktype: int = LINKTYPE_ETHERNET,
        autoflush: bool = False,
    ) -> None:
        if isinstance(snaplen, bool) or not isinstance(snaplen, int) or not 1 <= snaplen <= _U32:
            raise ValueError(f"snaplen: {snaplen!r} must be 1..{_U32}")
        if not 0 <= linktype <= 0xFFFF:
            raise ValueError(f"linktype: {linktype!r} out of range")
        self.path = Path(path)
        self.snaplen = snaplen
        self.linktype = linktype
        self.autoflush = autoflush
        self._bytes = 0
        self._packets = 0
        self._data = 0               # captured bytes staged (the records' packet data)
        self._lost = 0
        self._closed = False
        self._staged: list[bytes] = []
        self._limit: int | None = None
        self._max_end = 1 << 63      # _limit less room for the closing block
        self._durable = (0, 0, 0)    # bytes, packets, captured bytes in the file: its last whole record
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags, FILE_MODE)
        try:
            os.fchmod(self._fd, FILE_MODE)  # whatever the umask
            self._write(self._header())
            self._commit()               # a file on disk always has its header
            self._closing = len(self._trailer(0))   # the closing block's size (fixed per format)
        except BaseException:
            self._closed = True
            os.close(self._fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            raise

    # -- accounting --------------------------------------------------------------------
    @property
    def bytes_written(self) -> int:
        """Bytes handed to the file so far (headers included); the file's size once flushed."""
        return self._bytes

    @property
    def packets_written(self) -> int:
        return self._packets

    @property
    def data_written(self) -> int:
        """Captured bytes of the records handed over so far (their packet data only)."""
        return self._data

    @property
    def lost(self) -> int:
        """Samples reported lost with :meth:`note_lost` over this file's lifetime."""
        return self._lost

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def closing_bytes(self) -> int:
        """What close() will still add (the pcapng statistics block); 0 once closed."""
        return 0 if self._closed else self._closing

    @property
    def limit(self) -> int | None:
        return self._limit

    @limit.setter
    def limit(self, size: int | None) -> None:
        """The most bytes the file may reach, closing block included (None: no limit)."""
        self._limit = size
        self._max_end = (1 << 63) if size is None else size - self._closing

    def note_lost(self, count: int) -> None:
        """Record ``count`` samples lost (e.g. a perf ring ``lost_cb``) since the last packet."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"lost count: expected an int >= 0, got {count!r}")
        self._lost += count
        self._pending_lost(count)

    def _pending_lost(self, count: int) -> None:
        pass

    # -- writing -----------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        self._staged.append(data)
        self._bytes += len(data)
        if len(self._staged) >= STAGE_PIECES:
            self._commit()

    def _room_for(self, size: int) -> None:
        if self._bytes + size > self._max_end:
            raise LimitReached(f"{self.path.name}: {size} more bytes would pass the limit of {self._limit}")

    def _commit(self) -> None:
        """Hand the staged records to the file, in as few writes as the kernel takes."""
        if not self._staged:
            return
        data = memoryview(b"".join(self._staged))
        self._staged.clear()
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as e:
            end, packets, captured = self._durable
            dropped = (self._packets - packets, self._data - captured)
            with contextlib.suppress(OSError):  # cutting back frees space: it works on a full disk
                os.ftruncate(self._fd, end)
                os.lseek(self._fd, end, os.SEEK_SET)
            self._bytes, self._packets, self._data = end, packets, captured
            raise WriteFailed(e, self.path, *dropped) from e
        self._durable = (self._bytes, self._packets, self._data)

    def flush_if_full(self) -> None:
        """Hand the staged records over if there are enough of them for one large write
        (:meth:`write_batch` leaves that to its caller, who counts the packets first)."""
        if len(self._staged) >= STAGE_PIECES:
            self._commit()

    def write_batch(self, samples: Sequence[Sample], start: int, stop: int, offset_ns: int,
                    until: int | None = None) -> int:
        """Stage ``samples[start:stop]`` as records, timestamps ``mono + offset_ns``, as
        :meth:`write_sample` would, in one loop; nothing is handed to the file (see
        :meth:`flush_if_full`). Stops before a sample when the file already has more than
        ``until`` bytes (a size rotation is due), when its record would pass :attr:`limit`
        (write_sample raises LimitReached for it), or when the sample needs write_sample's
        slower path. Returns the index of the first sample not staged (``stop``: all were)."""
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.fmt} writer for {self.path} is closed")

    def _lengths(self, data: bytes, orig_len: int | None) -> tuple[bytes, int]:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"data: expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if orig_len is None:
            orig_len = len(data)
        if isinstance(orig_len, bool) or not isinstance(orig_len, int) or orig_len > _U32:
            raise ValueError(f"orig_len: {orig_len!r} must be an int <= {_U32}")
        if orig_len < len(data):
            raise ValueError(f"orig_len {orig_len} is less than the {len(data)} captured bytes")
        if len(data) > self.snaplen:
            data = data[: self.snaplen]
        return data, orig_len

    def write_packet(
        self,
        data: bytes,
        ts_ns: int,
        *,
        orig_len: int | None = None,
        direction: Direction | int | None = None,
        verdict: int | None = None,
        comment: str | None = None,
    ) -> int:
        """Append one packet; ``data`` is the captured bytes (cut to snaplen), ``orig_len``
        its length on the wire (default ``len(data)``). Returns the bytes this record took."""
        self._check_open()
        data, orig_len = self._lengths(data, orig_len)
        record = self._record(data, _check_ts(ts_ns), orig_len, direction, verdict, comment)
        self._room_for(len(record))
        self._accepted()
        self._packets += 1               # counted before _write: a failed hand-over drops it too
        self._data += len(data)
        self._write(record)
        if self.autoflush:
            self._commit()
        return len(record)

    def write_sample(self, data: bytes, ts_ns: int, orig_len: int, direction: int | None,
                     verdict: int | None, comment: str | None, ifindex: int | None = None) -> None:
        """:meth:`write_packet` without the argument checks, for the recorder's drain, whose
        values come from the kernel: ``data`` is bytes no longer than snaplen, ``len(data) <=
        orig_len < 2**32``, ``ts_ns`` a u64, ``ifindex`` the NIC (pcapng only)."""
        if self._closed:
            raise ValueError(f"{self.fmt} writer for {self.path} is closed")
        record = self._record(data, ts_ns, orig_len, direction, verdict, comment)
        self._room_for(len(record))
        self._accepted()
        self._packets += 1
        self._data += len(data)
        self._write(record)

    def flush(self, *, fsync: bool = False) -> None:
        """Push buffered records to the file (and to disk with ``fsync=True``)."""
        self._check_open()
        self._commit()
        if fsync:
            os.fsync(self._fd)

    def close(self, *, ts_ns: int | None = None) -> None:
        """Finish the file (pcapng: interface statistics with the drop count). Idempotent.
        On a failed write the file is still closed, cut back to its last whole record
        (without the closing block), and WriteFailed raised."""
        if self._closed:
            return
        end_ns = _check_ts(time.time_ns() if ts_ns is None else ts_ns)
        self._closed = True
        try:
            trailer = self._trailer(end_ns)
            if trailer:
                self._write(trailer)
            self._commit()
        finally:
            os.close(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- format hooks --------------------------------------------------------------------
    def _accepted(self) -> None:
        """The record just made by _record fits: count it (a refused one is not in the file)."""

    def _header(self) -> bytes:
        raise NotImplementedError

    def _record(self, data: bytes, ts_ns: int, orig_len: int, direction, verdict, comment) -> bytes:
        raise NotImplementedError

    def _trailer(self, ts_ns: int) -> bytes:
        return b""


class PcapngWriter(_Writer):
    """pcapng with ns timestamps, an IDB per NIC, direction, XDP verdict, comments and drops."""

    fmt = "pcapng"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        linktype: int = LINKTYPE_ETHERNET,
        autoflush: bool = False,
        if_name: str = "xdp",
        interfaces: Callable[[int], tuple[str, str]] | None = None,
        section_comment: str | None = None,
        userappl: str = USERAPPL,
        shb_os: str | None = None,
        verdicts: bool = True,
        start_ns: int | None = None,
    ) -> None:
        self._if_name = _comment_bytes(if_name)
        self._resolve = interfaces
        self._section_comment = None if section_comment is None else _comment_bytes(section_comment)
        self._userappl = _comment_bytes(userappl)
        self._os = _comment_bytes(os_text() if shb_os is None else shb_os)
        self._verdicts = verdicts
        self._start_ns = _check_ts(time.time_ns() if start_ns is None else start_ns)
        self._unreported_lost = 0
        self._tails: dict[tuple, _Tails] = {}
        self._kinds: dict[RecordKind, _KindCode] = {}     # write_batch's cache, per file
        # ifindex -> IDB number; the IDBs' packet counts (for their ISBs)
        self._iface_ids: dict[int | None, int] = {} if interfaces is not None else {None: 0}
        self._if_packets: list[int] = [] if interfaces is not None else [0]
        self._isb_size = len(self._isb(0, 0, False))   # every ISB has this size
        super().__init__(path, snaplen=snaplen, linktype=linktype, autoflush=autoflush)

    @property
    def interfaces(self) -> dict[int | None, int]:
        """ifindex (None: the one header IDB) -> IDB number, as written so far."""
        return dict(self._iface_ids)

    def _header(self) -> bytes:
        shb_opts = [_option(SHB_OS, self._os), _option(SHB_USERAPPL, self._userappl)]
        if self._section_comment is not None:
            shb_opts.insert(0, _option(OPT_COMMENT, self._section_comment))
        shb = _block(BT_SHB, struct.pack("<IHHq", PCAPNG_BOM, 1, 0, -1) + _options(shb_opts))
        if self._resolve is not None:
            return shb
        return shb + self._idb(self._if_name, None)

    def _idb(self, name: bytes, description: bytes | None) -> bytes:
        opts = [_option(IF_NAME, name)]
        if description is not None:
            opts.append(_option(IF_DESCRIPTION, description))
        opts.append(_option(IF_TSRESOL, bytes([9])))
        return _block(BT_IDB, struct.pack("<HHI", self.linktype, 0, self.snaplen) + _options(opts))

    def _interface(self, ifindex: int | None) -> int:
        """The IDB number of ``ifindex``, its IDB staged first if it is new."""
        iid = self._iface_ids.get(ifindex)
        if iid is not None:
            return iid
        if ifindex is None:                       # a caller that names no NIC: the first one
            if self._iface_ids:
                return 0
            name, desc = "xdp", "packets the l4lb XDP program saw"
        else:
            assert self._resolve is not None
            try:
                name, desc = self._resolve(ifindex)
            except Exception:  # noqa: BLE001 - a name is not worth a packet
                name, desc = f"ifindex{ifindex}", f"interface index {ifindex} (its name was not found)"
        idb = self._idb(_comment_bytes(name), _comment_bytes(desc))
        self._room_for(len(idb) + self._isb_size)
        self._write(idb)
        iid = self._iface_ids[ifindex] = len(self._if_packets)
        self._if_packets.append(0)
        self._closing += self._isb_size            # its ISB at close
        self._max_end -= self._isb_size
        return iid

    def _pending_lost(self, count: int) -> None:
        self._unreported_lost += count
        self._tails = {}            # the next record carries the drop count: write_sample's slow path

    def close(self, *, ts_ns: int | None = None) -> None:
        self._tails = {}
        super().close(ts_ns=ts_ns)

    def _encode_options(self, comment, direction, dropcount: int, verdict) -> bytes:
        opts = []
        if comment is not None:
            opts.append(_option(OPT_COMMENT, _comment_bytes(comment)))
        if direction is not None:
            d = Direction(direction)  # ValueError for anything but 1/2
            opts.append(_option(EPB_FLAGS, struct.pack("<I", int(d))))
        if dropcount:
            opts.append(_option(EPB_DROPCOUNT, struct.pack("<Q", min(dropcount, _U64))))
        if verdict is not None and self._verdicts:
            if isinstance(verdict, bool) or not isinstance(verdict, int) or not -(1 << 63) <= verdict < (1 << 63):
                raise ValueError(f"verdict: expected an int, got {verdict!r}")
            opts.append(_option(EPB_VERDICT, bytes([VERDICT_TYPE_XDP]) + struct.pack("<q", verdict)))
        return _options(opts)

    def write_packet(self, data: bytes, ts_ns: int, *, orig_len: int | None = None,
                     direction: Direction | int | None = None, verdict: int | None = None,
                     comment: str | None = None, ifindex: int | None = None) -> int:
        """As :meth:`_Writer.write_packet`; ``ifindex`` names the NIC (with ``interfaces=``)."""
        self._check_open()
        if ifindex is not None and (isinstance(ifindex, bool) or not isinstance(ifindex, int) or ifindex < 0):
            raise ValueError(f"ifindex: expected an int >= 0, got {ifindex!r}")
        self._next_iface = self._interface(ifindex if self._resolve is not None else None)
        return super().write_packet(data, ts_ns, orig_len=orig_len, direction=direction, verdict=verdict,
                                    comment=comment)

    def _record(self, data, ts_ns, orig_len, direction, verdict, comment) -> bytes:
        encoded = self._encode_options(comment, direction, self._unreported_lost, verdict)
        hi, lo = _ts_parts(ts_ns)
        iid = self._next_iface
        body = (
            struct.pack("<IIIII", iid, hi, lo, len(data), orig_len)
            + data
            + bytes(_pad4(len(data)))
            + encoded
        )
        return _block(BT_EPB, body)

    def _accepted(self) -> None:
        self._unreported_lost = 0                   # reported in that record
        self._if_packets[self._next_iface] += 1

    def write_sample(self, data: bytes, ts_ns: int, orig_len: int, direction: int | None,
                     verdict: int | None, comment: str | None, ifindex: int | None = None) -> None:
        # The drain's path. The options of a (comment, direction, verdict) are encoded once,
        # as four "padding + options" strings (one per data length mod 4) and the record's
        # fixed overhead; a pending drop count makes a record's options unique (_record).
        # A record is staged as four pieces: fixed fields, data, padding + options, length.
        # (note_lost and close empty the cache, so a hit needs no further checks.) A NIC
        # not seen yet in this file gets its IDB first.
        iid = self._iface_ids.get(ifindex if self._resolve is not None else None)
        if iid is None:
            if self._closed:
                raise ValueError(f"{self.fmt} writer for {self.path} is closed")
            iid = self._interface(ifindex if self._resolve is not None else None)
        tails = self._tails.get((comment, direction, verdict))
        if tails is None:
            self._next_iface = iid
            super().write_sample(data, ts_ns, orig_len, direction, verdict, comment)
            if len(self._tails) < _KINDS_CACHED:
                self._tails[(comment, direction, verdict)] = self._encode_tails(comment, direction, verdict)
            return
        n = len(data)
        pad = -n & 3
        total = tails[4] + n + pad
        if self._bytes + total > self._max_end:
            raise LimitReached(f"{self.path.name}: {total} more bytes would pass the limit of {self._limit}")
        staged = self._staged
        staged += (_EPB_HEAD(BT_EPB, total, iid, (ts_ns >> 32) & _U32, ts_ns & _U32, n, orig_len),
                   data, tails[pad], total.to_bytes(4, "little"))
        self._bytes += total
        self._packets += 1
        self._if_packets[iid] += 1
        self._data += n
        if len(staged) >= STAGE_PIECES:
            self._commit()

    def _encode_tails(self, comment: str | None, direction: int | None, verdict: int | None) -> _Tails:
        """A record's options after its data: four "padding + options" strings (one per data
        length mod 4) and the record's fixed overhead (block header, fields, length)."""
        opts = self._encode_options(comment, direction, 0, verdict)
        return opts, b"\0" + opts, b"\0\0" + opts, b"\0\0\0" + opts, 32 + len(opts)

    def _kind(self, kind: RecordKind) -> _KindCode | None:
        """A kind's IDB number, tails and (empty) per-length cache, for this file; None while
        its NIC has no IDB in this file yet (write_sample writes that first)."""
        iid = self._iface_ids.get(kind.ifindex if self._resolve is not None else None)
        if iid is None:
            return None
        if len(self._kinds) >= _KINDS_CACHED:
            self._kinds.clear()
        code = self._kinds[kind] = (iid, self._encode_tails(kind.comment, kind.direction, kind.verdict), {})
        return code

    def write_batch(self, samples: Sequence[Sample], start: int, stop: int, offset_ns: int,
                    until: int | None = None) -> int:
        # As write_sample's cached path, for a run of samples, with everything the loop
        # touches in locals. A record is three pieces: its fixed fields (one struct call), the
        # data, and "padding + options + total length", cached per (kind, data length) with
        # the total: traffic has few distinct lengths. Counters are added up once; the pieces
        # go to a local list that joins the staged ones at the end (an exception leaves the
        # writer as it was).
        if self._closed:
            raise ValueError(f"{self.fmt} writer for {self.path} is closed")
        if self._unreported_lost:
            return start            # the next record carries a drop count: write_sample's path
        kinds, kind_of = self._kinds, self._kind
        per_iface = [0] * len(self._if_packets)
        size, max_end = self._bytes, self._max_end
        bound = (1 << 64) if until is None else until
        pieces: list[bytes] = []
        add = pieces.extend
        head, epb, u32 = _EPB_HEAD, BT_EPB, _U32
        data_bytes = 0
        for data, mono, orig, kind in islice(samples, start, stop):
            code = kinds.get(kind)
            if code is None:
                code = kind_of(kind)
                if code is None:
                    break
            iid, tails, by_len = code
            n = len(data)
            end = by_len.get(n)
            if end is None:
                if len(by_len) >= _LENGTHS_CACHED:
                    by_len.clear()
                pad = -n & 3
                total = tails[4] + n + pad
                end = by_len[n] = (total, tails[pad] + total.to_bytes(4, "little"))
            total = end[0]
            if size > bound or size + total > max_end:
                break
            ts = mono + offset_ns
            add((head(epb, total, iid, (ts >> 32) & u32, ts & u32, n, orig), data, end[1]))
            size += total
            data_bytes += n
            per_iface[iid] += 1
        written = len(pieces) // 3
        self._staged += pieces
        self._if_packets = [a + b for a, b in zip(self._if_packets, per_iface)]
        self._packets += written
        self._bytes = size
        self._data += data_bytes
        return start + written

    def _isb(self, iid: int, ts_ns: int, first: bool) -> bytes:
        hi, lo = _ts_parts(ts_ns)
        s_hi, s_lo = _ts_parts(self._start_ns)
        packets = self._if_packets[iid] if iid < len(self._if_packets) else 0
        lost = self._lost if first else 0
        opts = [
            _option(ISB_STARTTIME, struct.pack("<II", s_hi, s_lo)),
            _option(ISB_ENDTIME, struct.pack("<II", hi, lo)),
            _option(ISB_IFRECV, struct.pack("<Q", min(packets + lost, _U64))),
            _option(ISB_IFDROP, struct.pack("<Q", min(lost, _U64))),
            _option(ISB_USRDELIV, struct.pack("<Q", packets)),
        ]
        return _block(BT_ISB, struct.pack("<III", iid, hi, lo) + _options(opts))

    def _trailer(self, ts_ns: int) -> bytes:
        return b"".join(self._isb(i, ts_ns, i == 0) for i in range(len(self._if_packets)))


class PcapWriter(_Writer):
    """Classic pcap, nanosecond magic. Direction, verdict, comments and drops are not stored."""

    fmt = "pcap"

    def _header(self) -> bytes:
        return struct.pack("<IHHiIII", PCAP_MAGIC_NS, 2, 4, 0, 0, self.snaplen, self.linktype)

    def _record(self, data, ts_ns, orig_len, direction, verdict, comment) -> bytes:
        if direction is not None:
            Direction(direction)
        sec, nsec = divmod(ts_ns, 1_000_000_000)
        if sec > _U32:
            raise ValueError(f"ts_ns: {ts_ns} is past the classic pcap range (year 2106)")
        return struct.pack("<IIII", sec, nsec, len(data), orig_len) + data

    def write_batch(self, samples: Sequence[Sample], start: int, stop: int, offset_ns: int,
                    until: int | None = None) -> int:
        # As _Writer.write_sample for each sample, in one loop over locals (see PcapngWriter's).
        if self._closed:
            raise ValueError(f"{self.fmt} writer for {self.path} is closed")
        size, max_end = self._bytes, self._max_end
        bound = (1 << 64) if until is None else until
        pieces: list[bytes] = []
        add = pieces.extend
        head, ns, u32 = _PCAP_HEAD, _NS, _U32
        data_bytes = 0
        i = start
        for data, mono, orig, _kind in islice(samples, start, stop):
            n = len(data)
            total = 16 + n
            sec, nsec = divmod(mono + offset_ns, ns)
            if size > bound or size + total > max_end or sec > u32:
                break           # write_sample: LimitReached, or the year 2106's ValueError
            add((head(sec, nsec, n, orig), data))
            size += total
            data_bytes += n
            i += 1
        self._staged += pieces
        self._packets += i - start
        self._bytes = size
        self._data += data_bytes
        return i


def open_writer(path: str | os.PathLike[str], fmt: str = "pcapng", **kwargs) -> PcapngWriter | PcapWriter:
    """A writer of format ``fmt`` ("pcapng" or "pcap"); pcapng-only keyword arguments are
    ignored for pcap."""
    if fmt == "pcapng":
        return PcapngWriter(path, **kwargs)
    if fmt == "pcap":
        common = {k: v for k, v in kwargs.items() if k in ("snaplen", "linktype", "autoflush")}
        return PcapWriter(path, **common)
    raise ValueError(f"fmt: {fmt!r} is not one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- file names

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_.-]")
MAX_ID_CHARS = 64


def safe_name(recording_id: object, index: int, fmt: str = "pcapng") -> str:
    """``<id>_<index:06d>.<fmt>`` using only ``[A-Za-z0-9_.-]``.

    Characters outside the set become ``_``; leading dots and dashes are dropped; the id is cut
    to 64 characters. When any of that changed the id, ``-`` and 8 hex digits of the original's
    SHA-256 are appended, so distinct ids still give distinct names.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: {fmt!r} is not one of {', '.join(FORMATS)}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index: expected an int >= 0, got {index!r}")
    original = str(recording_id)
    cleaned = _UNSAFE_CHAR.sub("_", original).lstrip(".-")[:MAX_ID_CHARS]
    if cleaned != original or not cleaned:
        digest = hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        cleaned = f"{cleaned}-{digest}" if cleaned else f"rec-{digest}"
    return f"{cleaned}_{index:06d}.{fmt}"


def plain_join(directory: str | os.PathLike[str], name: str) -> Path:
    """``directory/name`` for a plain ``[A-Za-z0-9_.-]`` name, nothing resolved: for what acts on
    the name itself and never follows it (unlink, lstat, rename, open with O_NOFOLLOW)."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"file name {name!r} is not a plain [A-Za-z0-9_.-] name")
    return Path(directory) / name


def safe_join(directory: str | os.PathLike[str], name: str) -> Path:
    """``directory/name``, refusing any name that is not a plain ``[A-Za-z0-9_.-]`` file name
    or that would resolve outside ``directory`` (e.g. through a symlinked file name)."""
    plain_join(directory, name)
    base = Path(os.path.realpath(directory))
    target = Path(os.path.realpath(base / name))
    if target.parent != base:
        raise ValueError(f"file name {name!r} escapes {base}")
    return base / name


__all__ = [
    "DEFAULT_SNAPLEN",
    "RecordKind",
    "Sample",
    "Direction",
    "FORMATS",
    "LINKTYPE_ETHERNET",
    "LimitReached",
    "PcapWriter",
    "PcapngWriter",
    "WriteFailed",
    "XdpVerdict",
    "open_writer",
    "plain_join",
    "safe_join",
    "safe_name",
]
