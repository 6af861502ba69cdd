"""Kernel side of health probes through the tunnel (l4lb/health uses it).

A probe reaches a backend exactly as client traffic does: IPIP / IP6IP6 to
the backend, inner destination VIP:port. On the LB:

* the probe socket carries ``SO_MARK = mark_base | n``; ``n`` names the
  backend in the pinned ``hc_targets`` map (mark -> backend address);
* a policy-routing rule (``fwmark mark_base/mark_mask lookup table``) sends
  marked packets to a default route out of ``device``, a NOARP veth the
  daemon owns (the VIP is not local, and no neighbour is needed for it);
* ``bpf_src/hc_encap.c`` on the device's tc egress encapsulates, looks up
  the backend in the FIB and redirects to the NIC that leads to it;
* the socket is bound to the LB's own address towards the backend, so the
  reply comes straight back from the VIP to it, and the XDP program passes it
  (its destination is no service).

Everything lives on after the daemon exits (pinned maps, the device, the
rule, the filter), like the XDP program: a restart re-reads the marks from
the map and replaces the filter in one step.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from l4lb.datapath import netlink
from l4lb.datapath.config import DatapathConfig, DatapathError
from l4lb.datapath.loader import Program, ProgramKind, compile_program, remove_stale_pins
from l4lb.datapath.sources import sources_towards
from l4lb.datapath.tables import addr_words, words_addr

log = logging.getLogger(__name__)

HC_KIND = ProgramKind(maps_header="lib/hc_maps.h", pin_prefix="hc", prog_type="sched_cls",
                      reasons=("hc_reason", "HC_"))
MAX_TARGETS = 65535  # marks base | 1 .. base | 0xffff


@dataclass(frozen=True)
class TunnelConfig:
    bpffs: Path
    device: str = "l4lbhc"          # the NOARP veth probes leave through (its peer: device + "-p")
    mtu: int = 1400                 # probes are small; room for the outer header on any 1500 path
    mark_base: int = 0x4C480000
    mark_mask: int = 0xFFFF0000
    table: int = 19528
    rule_priority: int = 1000


class ProbeTunnel:
    def __init__(self, cfg: TunnelConfig) -> None:
        self.cfg = cfg
        self.prog: Program | None = None
        self._lock = threading.Lock()
        self._marks: dict[str, int] = {}       # backend address (exploded) -> mark
        self._sources: dict[str, str | None] = {}
        self._ifindex = 0

    def load(self) -> None:
        """Compile, adopt the pinned marks, set up device, routing and filter (idempotent)."""
        cfg = self.cfg
        prog = compile_program(DatapathConfig(bpffs=cfg.bpffs), entry="hc_encap.c", func="hc_encap", kind=HC_KIND,
                               cflags=[f"-DHC_MAX_TARGETS={MAX_TARGETS + 1}"])
        self.prog = prog
        self._targets: Any = prog.bpf[b"hc_targets"]
        self._stats: Any = prog.bpf[b"hc_stats"]
        for k, v in self._targets.items():
            self._marks[words_addr(v.addr, v.family).exploded] = int(k.value)
        try:
            with IPRoute() as ipr:
                self._ifindex = netlink.ensure_veth(ipr, cfg.device, cfg.device + "-p", cfg.mtu)
                netlink.tc_attach_egress(ipr, self._ifindex, prog.fd, "hc_encap")
                netlink.ensure_mark_routing(ipr, cfg.mark_base, cfg.mark_mask, cfg.table, cfg.rule_priority,
                                            self._ifindex)
        except Exception as e:  # noqa: BLE001 - netlink errors come in many types
            raise DatapathError(f"probe tunnel setup on {cfg.device}: {e}") from e
        remove_stale_pins(DatapathConfig(bpffs=cfg.bpffs), prog.pin_dir)
        log.info("probe tunnel ready: marks %#x/%#x -> table %d -> %s (tc hc_encap), %d targets adopted",
                 cfg.mark_base, cfg.mark_mask, cfg.table, cfg.device, len(self._marks))

    def routes(self, addresses: set[str]) -> dict[str, tuple[int, str | None]]:
        """Mark and source address for each backend probed through the tunnel
        (marks are written to the map on first use; sources are the LB's
        addresses towards them, None where there is no route, looked up in one
        batch for the new ones). The marks of backends not named any more are dropped."""
        with self._lock:
            for address in [a for a in self._marks if a not in addresses]:
                try:
                    del self._targets[self._targets.Key(self._marks.pop(address))]
                except KeyError:
                    pass
                self._sources.pop(address, None)
            used = set(self._marks.values())
            free = (self.cfg.mark_base | i for i in range(1, MAX_TARGETS + 1) if self.cfg.mark_base | i not in used)
            for address in sorted(addresses):
                if address not in self._marks:
                    m = next(free, None)
                    if m is None:
                        raise DatapathError(f"more than {MAX_TARGETS} backends are probed through the tunnel")
                    self._write(m, address)
                    self._marks[address] = m
            self._sources.update(sources_towards(a for a in addresses if a not in self._sources))
            return {a: (self._marks[a], self._sources[a]) for a in addresses}

    def _write(self, mark: int, address: str) -> None:
        addr = ipaddress.ip_address(address)
        v = self._targets.Leaf()
        for i, w in enumerate(addr_words(addr)):
            v.addr[i] = w
        v.family = addr.version
        self._targets[self._targets.Key(mark)] = v

    def recheck_sources(self) -> dict[str, tuple[str | None, str | None]]:
        """The box's addresses or routes changed: look every backend's source
        up again (one batch). Returns address -> (old, new) source for those
        that changed (None: no route); the next routes() answers the new ones."""
        with self._lock:
            now = sources_towards(self._sources)
            moved = {a: (self._sources[a], s) for a, s in now.items() if s != self._sources[a]}
            self._sources = now
            return moved

    def counters(self) -> dict[str, int]:
        assert self.prog is not None
        out = {}
        for i, name in enumerate(self.prog.reasons):
            out[name] = int(self._stats.sum(self._stats.Key(i)).value)
        return out
