"""A one-namespace environment for running the real XDP program on crafted
packets (BPF_PROG_TEST_RUN): an 'edge' veth with backends as static
neighbours, a second veth for XDP_REDIRECT, forwarding on so bpf_fib_lookup
works. Used by the packet tests and the benches (with the floor programs of
bpf_src/bench_floor.c, see PacketEnv.compile_floors)."""

from __future__ import annotations

import dataclasses
import secrets
import shutil
from pathlib import Path
from typing import Any

from l4lb.datapath import Datapath, DatapathConfig
from l4lb.datapath.libbpf import test_run
from l4lb.datapath.loader import flow_cflags
from l4lb.datapath.source import bpf_src_dir, compile_bpf
from l4lb.lab import netns

EDGE_IF, EDGE_PEER = "edge0", "edge0p"
OUT_IF, OUT_PEER = "out1", "out1p"
EDGE_V4, EDGE_V6 = "192.0.2.1", "2001:db8:2::1"
OUT_V4, OUT_V6 = "203.0.113.1", "2001:db8:3::1"
NO_NEIGH_V4, NO_NEIGH_V6 = "192.0.2.250", "2001:db8:2::250"


def backend_mac(i: int) -> str:
    return f"02:00:00:00:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"


def edge_backends_v4(n: int) -> list[str]:
    return [f"192.0.2.{10 + i}" for i in range(n)] if n <= 200 else [f"198.51.100.{i}" for i in range(1, n + 1)]


def edge_backends_v6(n: int) -> list[str]:
    return [f"2001:db8:2::{10 + i:x}" for i in range(n)]


class PacketEnv:
    """Namespace + loaded, attached datapath. Every call runs in the netns."""

    def __init__(self, bpffs: Path, *, n_backends: int = 128, prefix: str = "l4pt", **cfg: Any) -> None:
        self.ns = f"{prefix}-{secrets.token_hex(3)}"
        # Pins in a directory of its own: a datapath that attaches drops the pinned map
        # sets of other layouts in its bpffs dir (remove_stale_pins), which would pull
        # the maps from under another PacketEnv of the same test session.
        self.pins = bpffs / self.ns
        self.cfg = DatapathConfig(bpffs=self.pins, **cfg)
        self.n_backends = n_backends
        self.worker: netns.NetnsWorker | None = None
        self.dp: Datapath | None = None

    def __enter__(self) -> "PacketEnv":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _build(self) -> None:
        ns = self.ns
        self.pins.mkdir(mode=0o700, exist_ok=True)
        netns.add(ns)
        netns.ip_batch(ns, [
            f"link add {EDGE_IF} type veth peer name {EDGE_PEER}",
            f"link add {OUT_IF} type veth peer name {OUT_PEER}",
            f"addr add {EDGE_V4}/24 dev {EDGE_IF}",
            f"addr add {EDGE_V6}/64 dev {EDGE_IF} nodad",
            f"addr add {OUT_V4}/24 dev {OUT_IF}",
            f"addr add {OUT_V6}/64 dev {OUT_IF} nodad",
        ])
        # The peers only stand for the wire: without IPv6 they send no router
        # solicitations or MLD reports into our XDP program, which would show
        # up in the counters the tests compare.
        netns.sysctl(ns, {f"net.ipv6.conf.{peer}.disable_ipv6": 1 for peer in (EDGE_PEER, OUT_PEER)})
        netns.ip_batch(ns, [
            f"link set {EDGE_IF} up", f"link set {EDGE_PEER} up",
            f"link set {OUT_IF} up", f"link set {OUT_PEER} up", "link set lo up",
        ])
        lines = []
        v4 = edge_backends_v4(self.n_backends)
        if self.n_backends > 200:
            lines.append(f"route add 198.51.100.0/24 via 192.0.2.9 dev {EDGE_IF}")
            lines.append(f"neigh replace 192.0.2.9 lladdr {backend_mac(9)} dev {EDGE_IF} nud permanent")
        else:
            for i, a in enumerate(v4):
                lines.append(f"neigh replace {a} lladdr {backend_mac(i + 1)} dev {EDGE_IF} nud permanent")
        for i, a in enumerate(edge_backends_v6(min(self.n_backends, 200))):
            lines.append(f"neigh replace {a} lladdr {backend_mac(i + 1)} dev {EDGE_IF} nud permanent")
        lines += [
            f"neigh replace 203.0.113.10 lladdr {backend_mac(0x300)} dev {OUT_IF} nud permanent",
            f"neigh replace 2001:db8:3::10 lladdr {backend_mac(0x300)} dev {OUT_IF} nud permanent",
        ]
        netns.ip_batch(ns, lines)
        netns.sysctl(ns, {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})
        self.worker = netns.NetnsWorker(ns)
        self.dp = Datapath(self.cfg)
        self.call(self.dp.load)
        self.call(self.dp.attach, [EDGE_IF, OUT_IF], "auto")
        self.edge_ifindex = self.call(_ifindex, EDGE_IF)
        self.out_ifindex = self.call(_ifindex, OUT_IF)
        self.edge_mac = netns.link_info(ns, EDGE_IF)["address"]
        self.out_mac = netns.link_info(ns, OUT_IF)["address"]

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        assert self.worker is not None
        return self.worker.call(fn, *args, **kwargs)

    def apply(self, services: list[Any]) -> None:
        assert self.dp is not None
        self.call(self.dp.apply, services)

    def set_runtime(self, **changes: Any) -> None:
        assert self.dp is not None
        self.call(self.dp.update_runtime, dataclasses.replace(self.dp.cfg, **changes))

    def run(self, packet: bytes, *, repeat: int = 1, ingress: int | None = None) -> tuple[int, bytes, int]:
        """(verdict, output frame, mean ns) of the real program on `packet`."""
        assert self.dp is not None
        return self.call(test_run, self.dp.prog_fd, packet, ingress_ifindex=ingress or self.edge_ifindex,
                         repeat=repeat)

    def compile_floors(self, *, undo: bool, extra: str = "") -> Any:
        """bpf_src/bench_floor.c as a ``bcc.BPF``: the floor programs benches measure beside
        l4lb. Its flow-cache floors use the datapath's headers at this env's flow-table size,
        their maps pinned in a directory of their own; ``undo`` builds with -DBENCH_UNDO.
        ``extra``: more C (a bench's own programs) compiled into the same object, since
        a BCC compile costs seconds even for a small file."""
        pin_dir = self.cfg.bpffs / "bench-floor-maps"
        pin_dir.mkdir(exist_ok=True)
        cflags = [f'-DPIN_DIR="{pin_dir}"', *flow_cflags(self.cfg.flow_table_size)]
        text = (bpf_src_dir() / "bench_floor.c").read_text() + "\n" + extra if extra else None
        return compile_bpf("bench_floor.c", cflags + (["-DBENCH_UNDO"] if undo else []), text=text)

    def close(self) -> None:
        try:
            if self.dp is not None and self.worker is not None:
                self.call(self.dp.close)
        finally:
            if self.worker is not None:
                self.worker.close()
            if netns.exists(self.ns):
                netns.delete(self.ns)
            shutil.rmtree(self.pins, ignore_errors=True)


def _ifindex(name: str) -> int:
    import socket

    return socket.if_nametoindex(name)
