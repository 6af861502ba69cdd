"""Compile the XDP program (source.compile_bpf) and pin/reuse its maps on a bpffs; or,
when the pinned program was built from the same source and flags, adopt it
and its maps without compiling (BCC takes seconds; a restart should not).

Pins, under ``<bpffs>/maps-<layout digest>/``: every map maps.h declares with
BPF_TABLE_PINNED, by its name; ``maglev/<index>`` the Maglev table buffers
(rings.py); and with the attached program: ``prog``, its devmap ``tx_ports``,
its tail-call array ``slow_paths``, its recorder maps ``rec_*`` (a recording
is armed by writing them, so an adopted program records too; a compiled one
brings fresh ones) and ``prog_types`` (the program's digest
and BCC's type descriptions of its maps, so an adopting daemon rebuilds the
same ctypes without compiling).

BCC reuses pinned maps by reopening them *by id* (BPF_MAP_GET_FD_BY_ID), which
the kernel allows only with CAP_SYS_ADMIN. So BCC compiles against an empty
scratch pin directory, and each map it made is then either swapped for the
real pinned one (dup2 onto BCC's fd before the program is loaded: the program
then refers to the pinned map, as libbpf's bpf_map__reuse_fd does) or pinned
as the first of its name. Opening a pin (BPF_OBJ_GET) needs only access to
the bpffs file.
"""

from __future__ import annotations

import ctypes as ct
import errno
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l4lb.datapath import libbpf
from l4lb.datapath.config import DatapathConfig, DatapathError
from l4lb.datapath.pinned import MapHandle, PinnedObjects, Record, decode_type
from l4lb.datapath.recorder import RECORDER_MAPS
from l4lb.datapath.source import assemble, compile_bpf, enum_names, layout_digest
from l4lb.datapath.tables import MAPS

log = logging.getLogger(__name__)

BPF_FS_MAGIC = 0xCAFE4A11
ENTRY = "l4lb.c"
FUNC = "l4lb_xdp"
# Tail-call targets of the entry, in the order of enum l4lb_slow (maps.h):
# the rare paths, each a program of its own (bpf_src/lib/slow.h).
SLOW_FUNCS = ("l4lb_icmp", "l4lb_fragment", "l4lb_reply")
FLOW_WAYS = 8  # ways per flow-table bucket (bpf_src/lib/flowcache.h)


class _Statfs(ct.Structure):
    _fields_ = [("f_type", ct.c_long), ("_rest", ct.c_byte * 120)]


def is_bpffs(path: Path) -> bool:
    libc = ct.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.statfs(str(path).encode(), ct.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def flow_cflags(flow_table_size: int) -> list[str]:
    """The flow table's geometry: buckets of FLOW_WAYS ways, both powers of two."""
    n = flow_table_size
    if n < FLOW_WAYS or n & (n - 1):
        raise DatapathError(f"flow_table_size must be a power of two >= {FLOW_WAYS}, not {n}")
    return [f"-DFLOW_TABLE_SIZE={n}", f"-DFLOW_WAYS={FLOW_WAYS}", f"-DFLOW_BUCKETS={n // FLOW_WAYS}"]


def layout_cflags(cfg: DatapathConfig) -> list[str]:
    """Flags that change map layouts: pins are only reused when they match."""
    return [
        f"-DMAGLEV_M={cfg.maglev_m}",
        f"-DMAX_SERVICES={cfg.max_services}",
        f"-DMAX_BACKENDS={cfg.max_backends}",
        *flow_cflags(cfg.flow_table_size),
    ]


def feature_cflags(cfg: DatapathConfig) -> list[str]:
    """Switches that change code, not map layouts."""
    return ["-DNEXTHOP_CACHE"] if cfg.nexthop_cache else []


PROG_PIN = "prog"
TYPES_PIN = "prog_types"
DEVMAP = "tx_ports"  # the program's devmap: not in maps.h's pinned set, pinned with the program
# Its tail-call array, pinned with it too: the kernel empties a program array
# when no file descriptor or pin refers to it any more (the daemon exiting, or
# BCC let go), and the rare paths would then fall through.
SLOW_PATHS = "slow_paths"
# What an adopted program brings: the maps Tables names, and the recorder's (pinned with the
# program: a recording is armed by writing them, lib/recorder.h).
ADOPTED = (*MAPS, *RECORDER_MAPS)


@dataclass
class Program:
    bpf: Any            # bcc.BPF, or PinnedObjects for an adopted program
    fd: int
    pin_dir: Path
    reasons: list[str]  # REASON_* names in enum order
    source: str
    digest: str = ""    # of source, flags and toolchain: equal digests, same program
    types: dict[str, list[Any]] = field(default_factory=dict)  # map -> BCC's [key, leaf] type descriptions
    adopted: bool = False  # taken over from the pins, not compiled


def _check_bpffs(cfg: DatapathConfig) -> None:
    if not cfg.bpffs.exists():
        raise DatapathError(f"bpffs directory {cfg.bpffs} does not exist (mount -t bpf bpf DIR)")
    if not is_bpffs(cfg.bpffs):
        raise DatapathError(f"{cfg.bpffs} is not on a bpf filesystem (mount -t bpf bpf {cfg.bpffs})")


def pin_dir_of(cfg: DatapathConfig, text: str | None = None) -> Path:
    """Where the XDP program's maps of this config's layout are pinned (the digest of maps.h and the layout flags)."""
    return cfg.bpffs / f"{XDP_KIND.pin_prefix}-{layout_digest(text or assemble(ENTRY), layout_cflags(cfg))}"


def program_digest(text: str, cflags: list[str]) -> str:
    """Same digest, same program: the assembled source, the flags (the pin path
    aside: it changes no instruction), BCC's version and the kernel release
    (the headers BCC compiles against)."""
    import bcc

    h = hashlib.sha256(text.encode())
    for part in (*cflags, f"bcc {getattr(bcc, '__version__', '?')}", f"kernel {os.uname().release}"):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class ProgramKind:
    """What distinguishes the project's programs: their pinned maps' header and
    directory prefix, the program type, and the reasons enum counters are named by."""

    maps_header: str = "lib/maps.h"
    pin_prefix: str = "maps"
    prog_type: str = "xdp"           # "xdp" | "sched_cls"
    reasons: tuple[str, str] = ("l4lb_reason", "REASON_")


XDP_KIND = ProgramKind()


LOAD_ATTEMPTS = 4


def load_func(bpf: Any, name: str, prog_type: int) -> Any:
    """BCC's load_func, tried again when the kernel answers EAGAIN: the verifier gives
    up with EAGAIN whenever a signal is pending, and verifying this program takes a
    second or more on a busy box (libbpf's own retries come back at once, before the
    signal has gone). Other failures raise at once."""
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        try:
            return bpf.load_func(name.encode(), prog_type)
        except Exception as e:  # BCC raises a bare Exception carrying strerror
            if os.strerror(errno.EAGAIN) not in str(e) or attempt == LOAD_ATTEMPTS:
                raise
            log.warning("BPF load of %s: %s; trying again (%d of %d)", name, e, attempt + 1, LOAD_ATTEMPTS)
    raise AssertionError("unreachable")


def compile_program(cfg: DatapathConfig, *, entry: str = ENTRY, func: str = FUNC, kind: ProgramKind = XDP_KIND,
                    cflags: list[str] | None = None) -> Program:
    """Compile ``entry`` with its maps pinned under ``cfg.bpffs``. The XDP
    program takes its layout and feature switches from ``cfg``; another kind
    passes its own ``cflags`` (those that change map layouts)."""
    from bcc import BPF  # imported here: only the datapath needs libbcc

    _check_bpffs(cfg)
    text = assemble(entry)
    layout = layout_cflags(cfg) if cflags is None else cflags
    pin_dir = cfg.bpffs / f"{kind.pin_prefix}-{layout_digest(text, layout, kind.maps_header)}"
    pin_dir.mkdir(mode=0o700, exist_ok=True)
    flags = [*layout, *feature_cflags(cfg), *cfg.extra_cflags] if cflags is None else layout
    _remove_dead_scratch(cfg.bpffs)
    scratch = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=cfg.bpffs))
    try:
        bpf = compile_bpf(entry, [*flags, f'-DPIN_DIR="{scratch}"'])
        try:
            _use_pinned_maps(bpf, scratch, pin_dir)
            fn = load_func(bpf, func, BPF.XDP if kind.prog_type == "xdp" else BPF.SCHED_CLS)
            if entry == ENTRY:
                _fill_slow_paths(bpf, BPF, text)
        except Exception as e:  # BCC raises bare Exception with the verifier log on stderr
            bpf.cleanup()
            if isinstance(e, DatapathError):
                raise
            raise DatapathError(f"BPF load of {entry}:{func} failed: {e}") from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    reasons = [n for n in enum_names(text, *kind.reasons) if n != "max"]
    # (a -DNO_RECORDER bench build has no recorder maps: neither pinned nor adoptable)
    types = {name: t for name in ADOPTED if (t := _bcc_types(bpf, name))} if kind == XDP_KIND else {}
    return Program(bpf, fn.fd, pin_dir, reasons, text, program_digest(text, flags), types)


def _fill_slow_paths(bpf: Any, BPF: Any, text: str) -> None:
    """Load the rare-path programs and put them where the entry tail-calls
    them, before anything is attached."""
    slots = [n for n in enum_names(text, "l4lb_slow", "SLOW_") if n != "max"]
    if slots != [f.removeprefix("l4lb_") for f in SLOW_FUNCS]:
        raise DatapathError(f"enum l4lb_slow {slots} does not match the loader's {SLOW_FUNCS}")
    table = bpf[SLOW_PATHS.encode()]
    for i, name in enumerate(SLOW_FUNCS):
        table[ct.c_int(i)] = ct.c_int(load_func(bpf, name, BPF.XDP).fd)


def _use_pinned_maps(bpf: Any, scratch: Path, pin_dir: Path) -> None:
    """Every map BCC pinned into ``scratch``: swap the pinned one of the same
    name in (dup2 onto BCC's fd, so the program about to be loaded refers to
    it), or pin BCC's as the first of its name."""
    for made in sorted(scratch.iterdir()):
        table = bpf[made.name.encode()]
        real = pin_dir / made.name
        if not real.exists():
            libbpf.obj_pin(table.map_fd, str(real))
            continue
        fd = libbpf.obj_get(str(real))
        try:
            want, have = libbpf.map_info(table.map_fd), libbpf.map_info(fd)
            shape = ("type", "key_size", "value_size", "max_entries", "map_flags")
            if any(getattr(want, k) != getattr(have, k) for k in shape):
                raise DatapathError(f"pinned map {real} does not have the shape the program declares "
                                    f"({', '.join(f'{k}={getattr(have, k)}/{getattr(want, k)}' for k in shape)})")
            os.dup2(fd, table.map_fd)
        finally:
            os.close(fd)


def _bcc_types(bpf: Any, name: str) -> list[Any] | None:
    """BCC's type descriptions of map ``name`` (key, leaf); None if the program has no such map."""
    import json

    from bcc import libbcc

    key = libbcc.lib.bpf_table_key_desc(bpf.module, name.encode())
    if key is None:
        return None
    return [json.loads(key.decode()), json.loads(libbcc.lib.bpf_table_leaf_desc(bpf.module, name.encode()).decode())]


def _remove_dead_scratch(bpffs: Path) -> None:
    """Scratch pin directories of compiles that died half-way (their pid is gone)."""
    for d in bpffs.glob("build-*"):
        pid = d.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def adopt_program(cfg: DatapathConfig, *, entry: str = ENTRY, func: str = FUNC) -> Program | None:
    """The pinned program and maps, opened by path, if the pinned program has
    this config's digest; None when it must be compiled."""
    _check_bpffs(cfg)
    text = assemble(entry)
    pin_dir = pin_dir_of(cfg, text)
    digest = program_digest(text, [*layout_cflags(cfg), *feature_cflags(cfg), *cfg.extra_cflags])
    if not (pin_dir / PROG_PIN).exists():
        return None
    record = Record(pin_dir / TYPES_PIN).read()
    if record is None or record.get("digest") != digest or set(record.get("types", {})) != set(ADOPTED):
        return None
    maps: dict[str, MapHandle] = {}
    prog_fd = -1
    try:
        prog_fd = libbpf.obj_get(str(pin_dir / PROG_PIN))
        if libbpf.prog_info(prog_fd).name.decode() != func[:15]:
            raise DatapathError(f"{pin_dir / PROG_PIN} is not an {func} program")
        for name, (key, leaf) in record["types"].items():
            fd = libbpf.obj_get(str(pin_dir / name))
            maps[name] = MapHandle(name, fd, decode_type(key), decode_type(leaf), owned=True)
    except (OSError, DatapathError) as e:
        log.warning("pinned program in %s cannot be adopted (%s): compiling", pin_dir, e)
        PinnedObjects(maps, prog_fd).cleanup()
        return None
    reasons = [n for n in enum_names(text, "l4lb_reason", "REASON_") if n != "max"]
    return Program(PinnedObjects(maps, prog_fd), prog_fd, pin_dir, reasons, text, digest, record["types"],
                   adopted=True)


def remove_stale_pins(cfg: DatapathConfig, keep: Path) -> list[Path]:
    """Drop pinned map sets of other layouts once the new program is attached
    (the old program's maps stay alive as long as anything references them)."""
    removed = []
    for d in cfg.bpffs.glob(keep.name.partition("-")[0] + "-*"):
        if d != keep and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def pin_program(prog: Program) -> None:
    """Pin the attached program, its devmap, its tail-call array, its recorder
    maps and what adopting it needs. The record is cleared first and written last: a crash
    half-way leaves pins a restart compiles over, never a digest naming
    another program."""
    types = Record(prog.pin_dir / TYPES_PIN)
    types.write(None)
    for name, fd in ((PROG_PIN, prog.fd), (DEVMAP, prog.bpf[DEVMAP.encode()].map_fd),
                     (SLOW_PATHS, prog.bpf[SLOW_PATHS.encode()].map_fd),
                     *((m, prog.bpf[m.encode()].map_fd) for m in RECORDER_MAPS if m in prog.types)):
        path = prog.pin_dir / name
        if path.exists():
            os.unlink(path)
        libbpf.obj_pin(fd, str(path))
    if prog.types:
        types.write({"digest": prog.digest, "types": prog.types})
