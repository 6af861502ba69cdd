"""ctypes bindings to the few libbpf calls BCC's Python API lacks.

BCC (0.26) has no pin/get, no map creation outside a program, no batch
update for our inner maps and no BPF_PROG_TEST_RUN; libbpf.so.1 (installed
with libbcc) exports all of them, so we bind those symbols and nothing more.
"""

from __future__ import annotations

import ctypes as ct
import errno
import mmap
import os
import time
from collections.abc import Iterator
from functools import cache

import numpy as np

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12


class DatapathOSError(OSError):
    pass


class BpfTestRunOpts(ct.Structure):
    # libbpf's struct bpf_test_run_opts (libbpf >= 0.7, stable since 1.0).
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


class XdpMd(ct.Structure):
    # UAPI struct xdp_md, used as ctx_in for test runs.
    _fields_ = [
        ("data", ct.c_uint32),
        ("data_end", ct.c_uint32),
        ("data_meta", ct.c_uint32),
        ("ingress_ifindex", ct.c_uint32),
        ("rx_queue_index", ct.c_uint32),
        ("egress_ifindex", ct.c_uint32),
    ]


class BpfProgInfo(ct.Structure):
    # Leading part of UAPI struct bpf_prog_info (the kernel fills what fits).
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
        ("ifindex", ct.c_uint32),
        ("gpl_compatible", ct.c_uint32),  # a 1-bit field in the UAPI, then padding
        ("netns_dev", ct.c_uint64),
        ("netns_ino", ct.c_uint64),
        ("nr_jited_ksyms", ct.c_uint32),
        ("nr_jited_func_lens", ct.c_uint32),
        ("jited_ksyms", ct.c_uint64),
        ("jited_func_lens", ct.c_uint64),
        ("btf_id", ct.c_uint32),
        ("func_info_rec_size", ct.c_uint32),
        ("func_info", ct.c_uint64),
        ("nr_func_info", ct.c_uint32),
        ("nr_line_info", ct.c_uint32),
        ("line_info", ct.c_uint64),
        ("jited_line_info", ct.c_uint64),
        ("nr_jited_line_info", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32),
        ("jited_line_info_rec_size", ct.c_uint32),
        ("nr_prog_tags", ct.c_uint32),
        ("prog_tags", ct.c_uint64),
        ("run_time_ns", ct.c_uint64),     # while run-time stats are on (enable_run_stats)
        ("run_cnt", ct.c_uint64),
    ]


class BpfMapInfo(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * 16),
    ]


@cache
def _lib() -> ct.CDLL:
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    lib.bpf_obj_get.argtypes = [ct.c_char_p]
    lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.c_void_p]
    lib.bpf_map_update_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
    lib.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                         ct.POINTER(ct.c_uint32), ct.c_void_p]
    lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
    lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
    lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_map_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(BpfTestRunOpts)]
    lib.bpf_enable_stats.argtypes = [ct.c_int]
    lib.bpf_prog_load.argtypes = [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_void_p, ct.c_size_t, ct.c_void_p]
    return lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ct.get_errno() or -rc
        raise DatapathOSError(err, f"{what}: {os.strerror(err)}")
    return rc


def obj_pin(fd: int, path: str) -> None:
    _check(_lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def obj_get(path: str) -> int:
    return _check(_lib().bpf_obj_get(path.encode()), f"open pinned {path}")


def prog_fd_by_id(prog_id: int) -> int:
    return _check(_lib().bpf_prog_get_fd_by_id(prog_id), f"program id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    return _check(_lib().bpf_map_get_fd_by_id(map_id), f"map id {map_id}")


def prog_info(fd: int) -> BpfProgInfo:
    info = BpfProgInfo()
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "program info")
    return info


BPF_STATS_RUN_TIME = 0


def enable_run_stats() -> int:
    """Turn on the kernel's per-program run-time stats (run_time_ns, run_cnt in
    prog_info) until the returned fd is closed. Kernel-wide: while on, every
    BPF program on the machine pays two clock reads per run (what
    sysctl kernel.bpf_stats_enabled does, but ended by the fd's close even if
    the process dies)."""
    return _check(_lib().bpf_enable_stats(BPF_STATS_RUN_TIME), "enable BPF run-time stats")


def prog_map_ids(fd: int) -> list[int]:
    """Ids of the maps a program refers to."""
    n = prog_info(fd).nr_map_ids
    ids = (ct.c_uint32 * max(n, 1))()
    info = BpfProgInfo(nr_map_ids=n, map_ids=ct.addressof(ids))
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "program map ids")
    return list(ids[:min(n, info.nr_map_ids)])


def map_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "map info")
    return info


class BpfMapCreateOpts(ct.Structure):
    # libbpf's struct bpf_map_create_opts as of libbpf 1.0 (sz keeps newer libbpf compatible).
    _fields_ = [
        ("sz", ct.c_size_t),
        ("btf_fd", ct.c_uint32),
        ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32),
        ("inner_map_fd", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("map_extra", ct.c_uint64),
        ("numa_node", ct.c_uint32),
        ("map_ifindex", ct.c_uint32),
    ]


BPF_F_MMAPABLE = 1 << 10


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int, *,
               flags: int = 0, inner_map_fd: int = 0) -> int:
    opts = BpfMapCreateOpts(sz=ct.sizeof(BpfMapCreateOpts), map_flags=flags, inner_map_fd=inner_map_fd)
    return _check(
        _lib().bpf_map_create(map_type, name.encode()[:15], key_size, value_size, max_entries, ct.byref(opts)),
        f"create map {name}",
    )


def array_create(name: str, value_size: int, max_entries: int, flags: int = 0) -> int:
    return map_create(BPF_MAP_TYPE_ARRAY, name, 4, value_size, max_entries, flags=flags)


def array_fill_mmapped(fd: int, values: np.ndarray) -> None:
    """Write every element of a BPF_F_MMAPABLE array of u32 through a shared
    mapping: one memcpy instead of a syscall's per-element copies (~100x
    faster for a Maglev table). The kernel keeps array elements 8 bytes apart."""
    n = len(values)
    size = -(-n * 8 // mmap.PAGESIZE) * mmap.PAGESIZE
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
        view = np.frombuffer(mm, dtype="<u4", count=2 * n)
        view[::2] = values
        del view  # the mapping cannot close while numpy still points into it


def update_batch(fd: int, keys: np.ndarray, values: bytes | np.ndarray, what: str = "batch update") -> None:
    """Write ``len(keys)`` elements in one syscall. ``keys`` are u32 (array maps);
    ``values`` holds one value after the other, in the kernel's layout."""
    keys = np.ascontiguousarray(keys, dtype=np.uint32)
    n = len(keys)
    if n == 0:
        return
    if isinstance(values, (bytes, bytearray)):
        vals = np.frombuffer(values, dtype=np.uint8)
    else:
        vals = np.ascontiguousarray(values)
    if vals.nbytes % n:
        raise ValueError(f"{vals.nbytes} value bytes do not split into {n} elements")
    count = ct.c_uint32(n)
    _check(_lib().bpf_map_update_batch(fd, keys.ctypes.data, vals.ctypes.data, ct.byref(count), None), what)
    if count.value != n:
        raise DatapathOSError(0, f"{what} wrote {count.value} of {n} elements")


def array_lookup_all(fd: int, max_entries: int, value_size: int) -> np.ndarray:
    """Every value of an array map in one batch syscall: ``max_entries`` rows of
    ``value_size`` bytes (per-CPU maps: one value per possible CPU, 8-byte aligned)."""
    keys = np.empty(max_entries, dtype=np.uint32)
    values = np.zeros((max_entries, value_size), dtype=np.uint8)
    token, count = ct.c_uint32(), ct.c_uint32(max_entries)
    rc = _lib().bpf_map_lookup_batch(fd, None, ct.byref(token), keys.ctypes.data, values.ctypes.data,
                                     ct.byref(count), None)
    if rc < 0 and ct.get_errno() != errno.ENOENT:  # ENOENT: the end was reached, as expected
        _check(rc, "batch lookup")
    if count.value != max_entries:
        raise DatapathOSError(0, f"batch lookup read {count.value} of {max_entries} elements")
    return values


def array_lookup_chunks(fd: int, max_entries: int, value_size: int, chunk: int) -> Iterator[np.ndarray]:
    """Every value of an array map, ``chunk`` rows of ``value_size`` bytes per batch
    syscall: a big map is walked without holding it all in memory (or the GIL) at once.
    Every chunk is the same buffer: use one before asking for the next."""
    keys = np.empty(chunk, dtype=np.uint32)
    values = np.zeros((chunk, value_size), dtype=np.uint8)
    token, first, done = ct.c_uint32(), True, 0
    while done < max_entries:
        count = ct.c_uint32(min(chunk, max_entries - done))
        rc = _lib().bpf_map_lookup_batch(fd, None if first else ct.byref(token), ct.byref(token), keys.ctypes.data,
                                         values.ctypes.data, ct.byref(count), None)
        if rc < 0 and ct.get_errno() != errno.ENOENT:  # ENOENT: the end was reached, as expected
            _check(rc, "batch lookup")
        if not count.value:
            break
        first, done = False, done + count.value
        yield values[:count.value]
    if done != max_entries:
        raise DatapathOSError(0, f"batch lookup read {done} of {max_entries} elements")


BPF_PROG_TYPE_XDP = 6


def prog_load_raw(prog_type: int, name: str, insns: bytes) -> int:
    """Load a program given as raw instructions (8 bytes each): for the few
    helpers user space can only reach through a program (bpf_jiffies64)."""
    buf = ct.create_string_buffer(insns, len(insns))
    return _check(_lib().bpf_prog_load(prog_type, name.encode()[:15], b"GPL", buf, len(insns) // 8, None),
                  f"load program {name}")


# membarrier(2) syscall numbers; MEMBARRIER_CMD_GLOBAL runs synchronize_rcu().
_MEMBARRIER_NR = {"x86_64": 324, "aarch64": 283, "riscv64": 283, "ppc64le": 365, "s390x": 356, "armv7l": 389}
_MEMBARRIER_CMD_GLOBAL = 1


def synchronize_rcu() -> None:
    """Return once every XDP program run that started before the call has
    finished (they run under RCU): after it, nothing still holds a map value
    read earlier, so a slot nobody points at any more can be reused. Falls
    back to a sleep far longer than a packet's run where membarrier is missing."""
    nr = _MEMBARRIER_NR.get(os.uname().machine)
    if nr is not None and _libc().syscall(nr, _MEMBARRIER_CMD_GLOBAL, 0, 0) == 0:
        return
    time.sleep(0.05)


@cache
def _libc() -> ct.CDLL:
    return ct.CDLL(None, use_errno=True)


def map_update(fd: int, key: ct._CData, value: ct._CData) -> None:
    _check(_lib().bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), 0), "map update")


def map_lookup(fd: int, key: ct._CData, value: ct._CData) -> bool:
    rc = _lib().bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value))
    return rc == 0


def map_delete(fd: int, key: ct._CData) -> bool:
    return _lib().bpf_map_delete_elem(fd, ct.byref(key)) == 0


def map_next_key(fd: int, key: ct._CData | None, next_key: ct._CData) -> bool:
    """The key after ``key`` (None: the first); False at the end."""
    return _lib().bpf_map_get_next_key(fd, None if key is None else ct.byref(key), ct.byref(next_key)) == 0


def test_run(prog_fd: int, packet: bytes, *, ingress_ifindex: int = 0, repeat: int = 1,
             out_size: int = 4096) -> tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN: returns (XDP verdict, output packet, mean ns per run)."""
    data_in = ct.create_string_buffer(packet, len(packet))
    data_out = ct.create_string_buffer(out_size)
    ctx = XdpMd(data=0, data_end=len(packet), data_meta=0, ingress_ifindex=ingress_ifindex)
    opts = BpfTestRunOpts(
        sz=ct.sizeof(BpfTestRunOpts),
        data_in=ct.cast(data_in, ct.c_void_p),
        data_out=ct.cast(data_out, ct.c_void_p),
        data_size_in=len(packet),
        data_size_out=out_size,
        ctx_in=ct.cast(ct.pointer(ctx), ct.c_void_p) if ingress_ifindex else None,
        ctx_size_in=ct.sizeof(ctx) if ingress_ifindex else 0,
        repeat=repeat,
    )
    _check(_lib().bpf_prog_test_run_opts(prog_fd, ct.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, data_out.raw[: opts.data_size_out], opts.duration
