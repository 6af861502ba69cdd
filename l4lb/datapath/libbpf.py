"""ctypes bindings to the few libbpf calls BCC's Python API lacks.

BCC (0.26) has no pin/get, no map creation outside a program, no batch
update for our inner maps and no BPF_PROG_TEST_RUN; libbpf.so.1 (installed
with libbcc) exports all of them, so we bind those symbols and nothing more.
"""

from __future__ import annotations

import ctypes as ct
import os
from functools import cache

BPF_MAP_TYPE_ARRAY = 2


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
    lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
    lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
    lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_map_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(BpfTestRunOpts)]
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


def map_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "map info")
    return info


def array_create(name: str, value_size: int, max_entries: int) -> int:
    return _check(
        _lib().bpf_map_create(BPF_MAP_TYPE_ARRAY, name.encode()[:15], 4, value_size, max_entries, None),
        f"create map {name}",
    )


def array_update_all(fd: int, values: bytes, value_size: int) -> None:
    """Write every element of an array map in one batch syscall."""
    n = len(values) // value_size
    keys = (ct.c_uint32 * n)(*range(n))
    buf = ct.create_string_buffer(values, len(values))
    count = ct.c_uint32(n)
    _check(_lib().bpf_map_update_batch(fd, keys, buf, ct.byref(count), None), "batch update")
    if count.value != n:
        raise DatapathOSError(0, f"batch update wrote {count.value} of {n} elements")


def map_update(fd: int, key: ct._CData, value: ct._CData) -> None:
    _check(_lib().bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), 0), "map update")


def map_lookup(fd: int, key: ct._CData, value: ct._CData) -> bool:
    rc = _lib().bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value))
    return rc == 0


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
