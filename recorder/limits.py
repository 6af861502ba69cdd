"""Stop conditions and file rotation of one recording. Pure: no clock, no I/O.

The drain asks a :class:`Limiter` about every sample before writing it::

    d = limiter.offer(caplen, ts_ns, file_bytes=writer.bytes_written)
    STOP   -> do not write; close the recording (d.reason says why)
    ROTATE -> close the current file, open file number d.index (if d.overwrite, that ring
              slot's old file is replaced: unlink it first), then write the packet there
    WRITE  -> write the packet to the current file d.index
    d.final -> after writing, the recording is complete (a limit was reached exactly)

and calls :meth:`Limiter.poll` from a timer so that a recording without traffic still ends
when its time is up. The limiter assumes every WRITE/ROTATE packet is written.

Runs: most packets are plain WRITEs to the current file, and asking for each one is a large
part of the drain's cost. :meth:`Limiter.plain` says how far the next packets are certain to
be plain writes (a packet count, a caplen sum, a timestamp; the file size is left to the
caller, whose writer knows each record's size); :meth:`Limiter.took` counts such a run at once,
exactly as the same ``offer`` calls would have.

File 0 is opened when the recording starts. Indices go into
:func:`l4lb.recorder.pcapfile.safe_name`.

Stop conditions (like ``hubble record``), checked first, in this order:

* ``max_duration_ns``: a packet with ``ts - start_ns >= max_duration_ns`` is not written;
  :meth:`~Limiter.poll` stops on the same condition with the wall clock.
* ``max_packets``: at most this many packets; the packet that reaches it is ``final``.
* ``max_bytes``: the captured bytes (caplen sum, file headers not included) never exceed it: a
  packet that would go past it is not written and the recording stops. Reaching it exactly is
  ``final``.

Rotation (like tcpdump), checked before each packet, only when the current file already holds
at least one packet (so no rotated-away file is ever empty):

* ``rotate_ns`` (tcpdump ``-G``): rotate when ``ts - (first packet time of the current file)
  >= rotate_ns``. tcpdump starts the window when the file is opened; we start it at the file's
  first packet, which is what makes the no-empty-file rule hold.
* ``file_size`` (``-C``, in bytes, not tcpdump's millions): rotate when the current file's size
  is already *greater than* ``file_size`` (tcpdump's test: the packet that crosses the size
  stays in the file, so a file is at most ``file_size`` + one record).
* Time is checked before size, as in tcpdump. One packet causes at most one rotation.
* ``max_files`` (``-W``), tcpdump's semantics:

  - with ``file_size``: a ring of ``max_files`` files; indices go 0, 1, ..., W-1, 0, 1, ...
    and a rotation into an index used before has ``overwrite=True``;
  - with ``rotate_ns`` only: stop (reason ``max_files``) instead of opening file number W;
  - with both: a ring. (tcpdump ignores -W when -C and -G are both given, leaving disk use
    unbounded; we deliberately keep the bound.)
  - alone: an error (it has nothing to count).

Packets whose timestamps go backwards (perf rings are per CPU) never rotate or stop by time:
the differences above are simply negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Action(str, Enum):
    WRITE = "write"
    ROTATE = "rotate"
    STOP = "stop"


class StopReason(str, Enum):
    MAX_PACKETS = "max_packets"
    MAX_BYTES = "max_bytes"
    MAX_DURATION = "max_duration"
    MAX_FILES = "max_files"


def _positive(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int or None, got {value!r}")


@dataclass(frozen=True, slots=True)
class StopConditions:
    max_packets: int | None = None
    max_bytes: int | None = None
    max_duration_ns: int | None = None

    def __post_init__(self) -> None:
        _positive("max_packets", self.max_packets)
        _positive("max_bytes", self.max_bytes)
        _positive("max_duration_ns", self.max_duration_ns)


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    file_size: int | None = None    # tcpdump -C, bytes
    rotate_ns: int | None = None    # tcpdump -G, nanoseconds
    max_files: int | None = None    # tcpdump -W

    def __post_init__(self) -> None:
        _positive("file_size", self.file_size)
        _positive("rotate_ns", self.rotate_ns)
        _positive("max_files", self.max_files)
        if self.max_files is not None and self.file_size is None and self.rotate_ns is None:
            raise ValueError("max_files: needs file_size (ring of files) or rotate_ns (stop after N files)")

    @property
    def ring(self) -> bool:
        """-W makes a ring of files (with -C, and with -C plus -G)."""
        return self.max_files is not None and self.file_size is not None

    @property
    def stops_after_files(self) -> bool:
        """-W with -G only: stop instead of opening file number max_files."""
        return self.max_files is not None and self.file_size is None


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    index: int                     # the file the packet goes to (STOP: the current file)
    overwrite: bool = False        # ROTATE into a ring slot that already has a file
    final: bool = False            # write this packet, then the recording is complete
    reason: StopReason | None = None  # STOP, or final


NO_BOUND = 1 << 80      # past any packet count, byte count or u64 timestamp


@dataclass(frozen=True, slots=True)
class Plain:
    """A run of packets is all plain WRITEs if it has at most ``packets`` packets, its caplens
    add up to less than ``caplen_below`` at every packet, and every timestamp is less than
    ``ts_below`` (:data:`NO_BOUND`: no such limit)."""

    packets: int
    caplen_below: int
    ts_below: int


class Limiter:
    """Decides write / rotate / stop for each packet of one recording (see module doc)."""

    def __init__(
        self,
        stop: StopConditions | None = None,
        rotation: RotationPolicy | None = None,
        *,
        start_ns: int,
    ) -> None:
        if isinstance(start_ns, bool) or not isinstance(start_ns, int):
            raise ValueError(f"start_ns: expected an int, got {start_ns!r}")
        self.stop_conditions = stop or StopConditions()
        self.rotation = rotation or RotationPolicy()
        self.start_ns = start_ns
        self._packets = 0
        self._bytes = 0
        self._files_opened = 1      # file 0 is open from the start
        self._index = 0
        self._file_packets = 0
        self._file_first_ts = 0
        self._reason: StopReason | None = None
        self._writes: dict[int, Decision] = {}

    # -- state -------------------------------------------------------------------------
    @property
    def packets(self) -> int:
        return self._packets

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def index(self) -> int:
        """Index of the current file."""
        return self._index

    @property
    def files_opened(self) -> int:
        """Files opened so far, counting reuse of ring slots."""
        return self._files_opened

    @property
    def stopped(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> StopReason | None:
        return self._reason

    # -- decisions -----------------------------------------------------------------------
    def _stop(self, reason: StopReason) -> Decision:
        self._reason = reason
        return Decision(Action.STOP, self._index, reason=reason)

    def poll(self, now_ns: int) -> Decision | None:
        """Timer check: a STOP decision once the duration is up (or already stopped), else None."""
        if self._reason is not None:
            return Decision(Action.STOP, self._index, reason=self._reason)
        limit = self.stop_conditions.max_duration_ns
        if limit is not None and now_ns - self.start_ns >= limit:
            return self._stop(StopReason.MAX_DURATION)
        return None

    def plain(self) -> Plain | None:
        """The bounds within which the next packets are all plain WRITEs to the current file
        (none STOP, ROTATE by time or is ``final``), or None if the next packet needs
        :meth:`offer`: stopped, or the file is empty (its first packet opens the rotation
        window). With a size rotation, a packet is plain only while the file holds at most
        ``rotation.file_size`` bytes before it: the caller checks that per record."""
        if self._reason is not None or self._file_packets == 0:
            return None
        sc, rot = self.stop_conditions, self.rotation
        packets = NO_BOUND if sc.max_packets is None else sc.max_packets - self._packets - 1  # the last is final
        if packets <= 0:
            return None
        caplen = NO_BOUND if sc.max_bytes is None else sc.max_bytes - self._bytes   # reaching it is final
        ts = NO_BOUND
        if sc.max_duration_ns is not None:
            ts = self.start_ns + sc.max_duration_ns
        if rot.rotate_ns is not None:
            ts = min(ts, self._file_first_ts + rot.rotate_ns)
        return Plain(packets, caplen, ts)

    def took(self, packets: int, caplen: int) -> None:
        """Count ``packets`` plain WRITEs of ``caplen`` captured bytes in all, taken within
        the bounds :meth:`plain` gave (as many ``offer`` calls would have)."""
        self._packets += packets
        self._bytes += caplen
        self._file_packets += packets

    def offer(self, caplen: int, ts_ns: int, *, file_bytes: int | None = None) -> Decision:
        """Decide for a packet of ``caplen`` captured bytes at ``ts_ns``; ``file_bytes`` is the
        current file's size before this packet (needed when rotating by size)."""
        if isinstance(caplen, bool) or not isinstance(caplen, int) or caplen < 0:
            raise ValueError(f"caplen: expected an int >= 0, got {caplen!r}")
        if self._reason is not None:
            return Decision(Action.STOP, self._index, reason=self._reason)
        sc, rot = self.stop_conditions, self.rotation
        if rot.file_size is not None and file_bytes is None:
            raise ValueError("file_bytes: required when rotating by file size")

        if sc.max_duration_ns is not None and ts_ns - self.start_ns >= sc.max_duration_ns:
            return self._stop(StopReason.MAX_DURATION)
        if sc.max_packets is not None and self._packets + 1 > sc.max_packets:
            return self._stop(StopReason.MAX_PACKETS)
        if sc.max_bytes is not None and self._bytes + caplen > sc.max_bytes:
            return self._stop(StopReason.MAX_BYTES)

        action, overwrite = Action.WRITE, False
        if self._file_packets > 0:
            due = (rot.rotate_ns is not None and ts_ns - self._file_first_ts >= rot.rotate_ns) or (
                rot.file_size is not None and file_bytes is not None and file_bytes > rot.file_size
            )
            if due:
                seq = self._files_opened  # sequence number of the file to open
                if rot.max_files is not None and rot.stops_after_files and seq >= rot.max_files:
                    return self._stop(StopReason.MAX_FILES)
                if rot.max_files is not None and rot.ring:
                    self._index = seq % rot.max_files
                    overwrite = seq >= rot.max_files
                else:
                    self._index = seq
                self._files_opened += 1
                self._file_packets = 0
                action = Action.ROTATE

        self._packets += 1
        self._bytes += caplen
        if self._file_packets == 0:
            self._file_first_ts = ts_ns
        self._file_packets += 1

        reason = None
        if sc.max_packets is not None and self._packets >= sc.max_packets:
            reason = StopReason.MAX_PACKETS
        elif sc.max_bytes is not None and self._bytes >= sc.max_bytes:
            reason = StopReason.MAX_BYTES
        if reason is not None:
            self._reason = reason
        elif action is Action.WRITE:
            # The common answer is immutable: reuse it (the drain asks for every packet).
            d = self._writes.get(self._index)
            if d is None:
                d = self._writes[self._index] = Decision(Action.WRITE, self._index)
            return d
        return Decision(action, self._index, overwrite=overwrite, final=reason is not None, reason=reason)


__all__ = ["NO_BOUND", "Action", "Decision", "Limiter", "Plain", "RotationPolicy", "StopConditions", "StopReason"]
