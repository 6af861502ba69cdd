"""Flag bits of the datapath's map entries, read from ``bpf_src/lib/maps.h``
(``#define SVC_F_DNAT (1U << 0)`` ...), so that the C header stays their one
definition; and the service flags a service's options ask for."""

from __future__ import annotations

import re
import zlib
from functools import cache

from l4lb.datapath.source import bpf_src_dir
from l4lb.models import Service

_DEFINE = re.compile(r"^#define\s+((?:SVC|BE|CFG|VIP|IF)_F_\w+)\s+\(1U\s*<<\s*(\d+)\)", re.M)


@cache
def flag_bits() -> dict[str, int]:
    """Every ``*_F_*`` bit defined in maps.h, by name."""
    text = (bpf_src_dir() / "lib" / "maps.h").read_text()
    return {name: 1 << int(shift) for name, shift in _DEFINE.findall(text)}


def bit(name: str) -> int:
    return flag_bits()[name]


def service_flags(svc: Service) -> int:
    """``svc_info.flags`` for a service: DNAT, client-IP affinity (by network), the no-backend policy,
    ping, source ranges."""
    o = svc.options
    return ((bit("SVC_F_DNAT") if o.l4_dnat else 0) | (0 if o.hash_src_port else bit("SVC_F_NO_SPORT"))
            | (bit("SVC_F_NO_BACKEND_DROP") if o.no_backend == "drop" else 0)
            | (bit("SVC_F_PING") if o.answer_ping else 0)
            | (bit("SVC_F_SRC_RANGES") if svc.source_ranges else 0)
            | (bit("SVC_F_AFFINITY_PREFIX") if affinity_prefix(svc) is not None else 0))


def affinity_prefix(svc: Service) -> int | None:
    """The prefix length the datapath cuts client addresses to, None for the
    whole address (no affinity_prefix, or one as long as the address)."""
    plen = svc.options.affinity_prefix
    return plen if plen is not None and plen < svc.vip.max_prefixlen else None


def ranges_gen(svc: Service) -> int:
    """``svc_info.gen``: 0 without source ranges, else a digest of them (never
    0). Flow entries hold their backend's gen plus this one (lib/lookup.h): a
    change of the ranges has every flow of the service checked again, and a
    digest rather than a counter is the same after a restart and on every box."""
    if not svc.source_ranges:
        return 0
    return zlib.crc32(",".join(sorted(str(n) for n in svc.source_ranges)).encode()) or 1
