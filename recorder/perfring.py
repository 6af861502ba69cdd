"""Per-CPU perf rings of a BPF_PERF_OUTPUT map, read in batches straight from their mmap.

Why not BCC's ``open_perf_buffer`` + ``perf_buffer_poll``: it calls a Python function through
ctypes for every sample. Measured by bench/recorder.py on the real program's samples, that
callback (with the ``ct.string_at`` copy each one needs and the header unpack) costs ~0.6 us
of CPU per sample, against ~0.3 us here for the batch copy, header walk and unpack; and as
every callback re-takes the GIL, BCC's reading falls to ~0.5M samples/s as soon as another
thread of the daemon is busy (~2.4M/s here). Above all, a read here yields a whole ring of
samples at once, which is what lets the drain hand each recording one batch
(recorder/drain.py) instead of paying a chain of Python calls per sample.

The perf ABI (perf_event_open(2), "mmap layout"), as used here:

* one event per online CPU: ``PERF_TYPE_SOFTWARE``/``PERF_COUNT_SW_BPF_OUTPUT``,
  ``sample_type = PERF_SAMPLE_RAW``, ``sample_period = 1``; its fd goes into the
  BPF_PERF_OUTPUT map at the CPU's index, where ``bpf_perf_event_output`` finds it;
* the mapping is 1 + 2^n pages, read-write (a read-only mapping would be an overwrite ring):
  the first page holds ``data_head`` (the kernel's write position) and ``data_tail`` (ours),
  both free-running byte counts; the data area follows;
* reading: load ``data_head`` with acquire semantics (the kernel's smp_rmb() pairing), copy
  ``[data_tail, data_head)`` out, then store ``data_tail`` with release semantics (the copy is
  complete before the kernel may reuse the space). libatomic's ``__atomic_load_8`` /
  ``__atomic_store_8`` give exactly that on every architecture; without libatomic, plain
  loads and stores are used on x86 only, whose memory model (TSO) orders them the same way;
* records are 8-byte aligned: ``struct perf_event_header {u32 type; u16 misc; u16 size}``;
  ``PERF_RECORD_SAMPLE`` then carries ``u32 raw_size`` and the raw bytes (what the BPF program
  submitted, zero-padded to alignment); ``PERF_RECORD_LOST`` carries ``u64 id, u64 lost``:
  samples the kernel refused while the ring was full, counted here per CPU;
* wake-ups: ``watermark`` bytes (default a quarter of the ring), not one per sample, so a busy
  producer rarely pays for waking the reader; the reader's poll timeout picks up the rest.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import mmap
import os
import platform
import struct
from dataclasses import dataclass, field
from functools import cache

from l4lb.datapath import libbpf

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
ATTR_FLAG_WATERMARK = 1 << 14
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9

PAGE = mmap.PAGESIZE
DATA_HEAD, DATA_TAIL = 1024, 1032      # offsets in struct perf_event_mmap_page
HEADER = struct.Struct("<IxxH")         # perf_event_header: type, (misc), size
SAMPLE_PAYLOAD = 12                     # header + u32 raw_size: where the raw bytes start
LOST = struct.Struct("<8xQQ")           # header, id, lost
_ATOMIC_ACQUIRE, _ATOMIC_RELEASE = 2, 3

# perf_event_open(2) has no libc wrapper: syscall numbers per machine.
_PERF_EVENT_OPEN_NR = {"x86_64": 298, "i686": 336, "aarch64": 241, "riscv64": 241, "loongarch64": 241,
                       "ppc64le": 319, "s390x": 331, "armv7l": 364}
_TSO = {"x86_64", "i686", "i386", "AMD64"}


class PerfRingError(OSError):
    pass


class PerfEventAttr(ct.Structure):
    """struct perf_event_attr up to PERF_ATTR_SIZE_VER5 (112 bytes): all this reader sets."""

    _fields_ = [
        ("type", ct.c_uint32), ("size", ct.c_uint32), ("config", ct.c_uint64),
        ("sample_period", ct.c_uint64), ("sample_type", ct.c_uint64), ("read_format", ct.c_uint64),
        ("flags", ct.c_uint64), ("wakeup", ct.c_uint32), ("bp_type", ct.c_uint32),
        ("config1", ct.c_uint64), ("config2", ct.c_uint64), ("branch_sample_type", ct.c_uint64),
        ("sample_regs_user", ct.c_uint64), ("sample_stack_user", ct.c_uint32), ("clockid", ct.c_int32),
        ("sample_regs_intr", ct.c_uint64), ("aux_watermark", ct.c_uint32), ("sample_max_stack", ct.c_uint16),
        ("reserved_2", ct.c_uint16),
    ]


@cache
def _libc() -> ct.CDLL:
    lib = ct.CDLL(None, use_errno=True)
    lib.syscall.restype = ct.c_long
    return lib


@cache
def _atomics() -> tuple[object, object] | None:
    """libatomic's (load, store) of a u64, or None where plain ones do (x86)."""
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ct.CDLL(name)
    except OSError:
        if platform.machine() in _TSO:
            return None
        raise PerfRingError(0, f"perf ring reader: needs libatomic (package libatomic1) on {platform.machine()}: "
                               "data_head/data_tail need acquire/release ordering") from None
    load, store = lib.__atomic_load_8, lib.__atomic_store_8
    load.argtypes, load.restype = [ct.c_void_p, ct.c_int], ct.c_uint64
    store.argtypes, store.restype = [ct.c_void_p, ct.c_uint64, ct.c_int], None
    return load, store


def online_cpus(text: str | None = None) -> list[int]:
    """CPUs in /sys/devices/system/cpu/online ("0-3,5")."""
    if text is None:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read()
    out: list[int] = []
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int, group_fd: int = -1,
                    flags: int = PERF_FLAG_FD_CLOEXEC) -> int:
    nr = _PERF_EVENT_OPEN_NR.get(platform.machine())
    if nr is None:
        raise PerfRingError(0, f"perf_event_open: syscall number unknown on {platform.machine()}")
    fd = _libc().syscall(nr, ct.byref(attr), pid, cpu, group_fd, flags)
    if fd < 0:
        err = ct.get_errno()
        raise PerfRingError(err, f"perf_event_open(cpu {cpu}): {os.strerror(err)}")
    return int(fd)


def split(buf: bytes) -> tuple[list[int], int]:
    """Offsets of the raw payloads of the PERF_RECORD_SAMPLEs in ``buf`` (whole records, as
    read from a ring) and the sum of its PERF_RECORD_LOST counts."""
    offsets: list[int] = []
    append = offsets.append
    unpack = HEADER.unpack_from
    lost = 0
    off, end = 0, len(buf)
    while off < end:
        typ, size = unpack(buf, off)
        if typ == PERF_RECORD_SAMPLE:
            append(off + SAMPLE_PAYLOAD)
        elif typ == PERF_RECORD_LOST:
            lost += LOST.unpack_from(buf, off)[1]
        if size < 8:
            raise PerfRingError(0, f"perf ring: record of size {size} at offset {off}: ring corrupt")
        off += size
    return offsets, lost


@dataclass
class Chunk:
    """What one read of one CPU's ring returned: whole records, in the order written."""

    cpu: int
    buf: bytes
    samples: list[int]                  # offsets of raw payloads in buf
    lost: int                           # PERF_RECORD_LOST counts among them
    wrapped: bool = False               # the records ran past the end of the ring


@dataclass
class CpuRing:
    cpu: int
    fd: int
    mm: mmap.mmap
    data_size: int
    tail: int = 0
    lost: int = 0
    wraps: int = 0
    _head_addr: int = 0
    _anchor: object = field(default=None, repr=False)   # keeps the mmap's address valid

    def head(self) -> int:
        """The kernel's write position (acquire: records before it are complete)."""
        atomics = _atomics()
        if atomics is None:
            return int.from_bytes(self.mm[DATA_HEAD:DATA_HEAD + 8], "little")
        return atomics[0](self._head_addr, _ATOMIC_ACQUIRE)

    def read(self, head: int | None = None) -> Chunk | None:
        """The records up to ``head`` (default: all written so far) that were not read yet
        (None if none), then hand their space back to the kernel."""
        if head is None:
            head = self.head()
        atomics = _atomics()
        tail = self.tail
        if head == tail:
            return None
        size = self.data_size
        start = PAGE + (tail & (size - 1))
        n = head - tail
        wrapped = start + n > PAGE + size
        if wrapped:
            first = PAGE + size - start
            buf = self.mm[start:PAGE + size] + self.mm[PAGE:PAGE + n - first]
            self.wraps += 1
        else:
            buf = self.mm[start:start + n]
        self.tail = head
        if atomics is None:
            self.mm[DATA_TAIL:DATA_TAIL + 8] = head.to_bytes(8, "little")
        else:
            atomics[1](self._head_addr + (DATA_TAIL - DATA_HEAD), head, _ATOMIC_RELEASE)
        samples, lost = split(buf)
        self.lost += lost
        return Chunk(self.cpu, buf, samples, lost, wrapped)

    def close(self) -> None:
        self._anchor = None
        try:
            self.mm.close()
        finally:
            os.close(self.fd)


class PerfRings:
    """The perf rings behind one BPF_PERF_OUTPUT map: one per online CPU, stored in the map.

    ``page_cnt`` data pages per CPU (a power of two); ``watermark`` bytes written before the
    reader's fd polls readable (default: a quarter of the ring)."""

    def __init__(self, map_fd: int, *, page_cnt: int = 256, watermark: int | None = None,
                 cpus: list[int] | None = None) -> None:
        if page_cnt < 1 or page_cnt & (page_cnt - 1):
            raise ValueError(f"page_cnt: {page_cnt} is not a power of two")
        self.map_fd = map_fd
        self.page_cnt = page_cnt
        size = page_cnt * PAGE
        self.watermark = max(1, min(size // 4 if watermark is None else watermark, size - 1))
        self.rings: list[CpuRing] = []
        try:
            for cpu in online_cpus() if cpus is None else cpus:
                self.rings.append(self._open(cpu, size))
        except BaseException:
            self.close()
            raise

    def _open(self, cpu: int, size: int) -> CpuRing:
        attr = PerfEventAttr(type=PERF_TYPE_SOFTWARE, size=ct.sizeof(PerfEventAttr),
                             config=PERF_COUNT_SW_BPF_OUTPUT, sample_period=1, sample_type=PERF_SAMPLE_RAW,
                             flags=ATTR_FLAG_WATERMARK, wakeup=self.watermark)
        fd = perf_event_open(attr, -1, cpu)
        try:
            mm = mmap.mmap(fd, PAGE + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        ring = CpuRing(cpu, fd, mm, size)
        if _atomics() is not None:
            ring._anchor = ct.c_char.from_buffer(mm)
            ring._head_addr = ct.addressof(ring._anchor) + DATA_HEAD
        try:
            libbpf.map_update(self.map_fd, ct.c_int(cpu), ct.c_uint32(fd))
        except BaseException:
            ring.close()
            raise
        return ring

    @property
    def fds(self) -> list[int]:
        return [r.fd for r in self.rings]

    @property
    def lost(self) -> int:
        """PERF_RECORD_LOST counts read so far, all CPUs."""
        return sum(r.lost for r in self.rings)

    def read(self) -> list[Chunk]:
        """One chunk per CPU ring that had records. All write positions are loaded first, so
        the chunks end at nearly the same instant on every CPU."""
        heads = [ring.head() for ring in self.rings]
        return [c for c in (ring.read(h) for ring, h in zip(self.rings, heads)) if c is not None]

    def close(self) -> None:
        """Take the rings out of the map (if it still exists) and release them. Idempotent."""
        rings, self.rings = self.rings, []
        for ring in rings:
            # An error here means the map is gone already (its program was cleaned up).
            libbpf._lib().bpf_map_delete_elem(self.map_fd, ct.byref(ct.c_int(ring.cpu)))
            ring.close()


__all__ = ["Chunk", "CpuRing", "PerfRingError", "PerfRings", "online_cpus", "split"]
