"""Compile the XDP program (source.compile_bpf) and pin/reuse its maps on a bpffs."""

from __future__ import annotations

import ctypes as ct
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l4lb.datapath.config import DatapathConfig, DatapathError
from l4lb.datapath.source import assemble, compile_bpf, enum_names, layout_digest

log = logging.getLogger(__name__)

BPF_FS_MAGIC = 0xCAFE4A11
ENTRY = "l4lb.c"
FUNC = "l4lb_xdp"
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


@dataclass
class Program:
    bpf: Any            # bcc.BPF
    fd: int
    pin_dir: Path
    reasons: list[str]  # REASON_* names in enum order
    source: str


@dataclass(frozen=True)
class ProgramKind:
    """What distinguishes the project's programs: their pinned maps' header and
    directory prefix, the program type, and the reasons enum counters are named by."""

    maps_header: str = "lib/maps.h"
    pin_prefix: str = "maps"
    prog_type: str = "xdp"           # "xdp" | "sched_cls"
    reasons: tuple[str, str] = ("l4lb_reason", "REASON_")


XDP_KIND = ProgramKind()


def compile_program(cfg: DatapathConfig, *, entry: str = ENTRY, func: str = FUNC, kind: ProgramKind = XDP_KIND,
                    cflags: list[str] | None = None) -> Program:
    """Compile ``entry`` with its maps pinned under ``cfg.bpffs``. The XDP
    program takes its layout and feature switches from ``cfg``; another kind
    passes its own ``cflags`` (those that change map layouts)."""
    from bcc import BPF  # imported here: only the datapath needs libbcc

    if not cfg.bpffs.exists():
        raise DatapathError(f"bpffs directory {cfg.bpffs} does not exist (mount -t bpf bpf DIR)")
    if not is_bpffs(cfg.bpffs):
        raise DatapathError(f"{cfg.bpffs} is not on a bpf filesystem (mount -t bpf bpf {cfg.bpffs})")
    text = assemble(entry)
    layout = layout_cflags(cfg) if cflags is None else cflags
    pin_dir = cfg.bpffs / f"{kind.pin_prefix}-{layout_digest(text, layout, kind.maps_header)}"
    pin_dir.mkdir(mode=0o700, exist_ok=True)
    features = [*feature_cflags(cfg), *cfg.extra_cflags] if cflags is None else []
    bpf = compile_bpf(entry, [*layout, f'-DPIN_DIR="{pin_dir}"', *features])
    try:
        fn = bpf.load_func(func.encode(), BPF.XDP if kind.prog_type == "xdp" else BPF.SCHED_CLS)
    except Exception as e:  # BCC raises bare Exception with the verifier log on stderr
        raise DatapathError(f"BPF load of {entry}:{func} failed: {e}") from e
    reasons = [n for n in enum_names(text, *kind.reasons) if n != "max"]
    return Program(bpf, fn.fd, pin_dir, reasons, text)


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
    from l4lb.datapath.libbpf import obj_pin

    path = prog.pin_dir / "prog"
    if path.exists():
        os.unlink(path)
    obj_pin(prog.fd, str(path))
