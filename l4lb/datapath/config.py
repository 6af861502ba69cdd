"""Compile-time and run-time knobs of the datapath (pure data)."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from l4lb.models import DEFAULT_MAGLEV_M, MAGLEV_SIZES


class DatapathError(RuntimeError):
    """The kernel refused something (compile, load, attach, map write)."""


class DatapathFull(DatapathError):
    """A change cannot be put into the maps (capacity); nothing was changed."""


@dataclass(frozen=True)
class DatapathConfig:
    bpffs: Path                                   # pin directory on a bpffs
    maglev_m: int = DEFAULT_MAGLEV_M
    maglev_seed: bytes = b"l4lb-default"          # 12 bytes; same seed => same tables on every box
    max_services: int = 1024
    max_backends: int = 65536                     # (service, backend) pairs
    flow_table_size: int = 1 << 20                # flow table entries, a power of two (8-way buckets)
    outer_src_v4: ipaddress.IPv4Network | None = None   # prefix + flow-hash bits as outer source
    outer_src_v6: ipaddress.IPv6Network | None = None
    icmp_rate: int = 1000                         # generated replies per second per CPU, per kind
    forward_icmp_errors: bool = True              # ICMP errors about VIP flows go to the flow's backend
    nexthop_cache: bool = True                    # next hops from the daemon-kept map, FIB as fallback
    extra_cflags: tuple[str, ...] = field(default_factory=tuple)  # e.g. recorder masks, bench switches

    def __post_init__(self) -> None:
        if self.maglev_m not in MAGLEV_SIZES:
            raise ValueError(f"maglev_m must be one of {MAGLEV_SIZES}, not {self.maglev_m}")
        if len(self.maglev_seed) != 12:
            raise ValueError("maglev_seed must be 12 bytes")


def seed_digest(seed: bytes) -> str:
    """Names a Maglev seed in records without revealing it (the converged record)."""
    return hashlib.blake2b(seed, digest_size=8, person=b"l4lb-seed").hexdigest()
