#!/usr/bin/env python3
"""Datapath benchmark (not a test): ns/packet of the real XDP program.

Method A: one BPF_PROG_TEST_RUN with repeat=N on a bench-only build that
undoes its own encapsulation after XDP_TX, so every pass forwards (NOTES.md:
the repeat trap). Method B: N calls with repeat=1 on the production build,
mean of the kernel-reported durations (includes timer overhead).
Floor programs (XDP_TX, bare IPIP, bare IP6IP6, one FIB lookup, one write of
l4lb's flow cache, one kernel LRU-hash write for comparison) are measured in
the same run, and so is the build that asks the FIB for every packet instead
of the daemon-kept next-hop cache.
Run as root: `make bench` or `.venv/bin/python bench/datapath.py`; `--quick`
(2,000 repeats/calls, a 64k-entry flow table) runs every step in seconds, for
tests/test_bench.py: its figures are not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import maglev_build  # noqa: E402
from scapy.all import IP, TCP, Ether, IPv6, Raw, raw  # noqa: E402

from l4lb.datapath import Datapath  # noqa: E402
from l4lb.datapath.libbpf import test_run  # noqa: E402
from l4lb.lab.bpffs import private_bpffs  # noqa: E402
from l4lb.lab.pktenv import PacketEnv, edge_backends_v4, edge_backends_v6  # noqa: E402
from l4lb.models import Service  # noqa: E402

VIP4, VIP6 = "198.51.100.1", "2001:db8:100::1"
REPEAT_A, CALLS_B = 200_000, 20_000        # --quick: QUICK_RUNS each
QUICK_RUNS = 2_000
QUICK_FLOW_TABLE = 1 << 16
FLOORS = ("floor_tx", "floor_ipip", "floor_ip6ip6", "floor_fib", "floor_flow", "floor_flow_new",
          "floor_lru", "floor_lru_new")


def packets() -> dict[str, bytes]:
    pad = Raw(b"x" * 18)
    e = Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22")
    return {
        "v4 SYN": raw(e / IP(src="203.0.113.7", dst=VIP4) / TCP(sport=33333, dport=80, flags="S") / pad),
        "v4 non-SYN": raw(e / IP(src="203.0.113.7", dst=VIP4) / TCP(sport=33334, dport=80, flags="A") / pad),
        "v6 SYN": raw(e / IPv6(src="2001:db8:77::7", dst=VIP6) / TCP(sport=33333, dport=80, flags="S") / pad),
        "v6 non-SYN": raw(e / IPv6(src="2001:db8:77::7", dst=VIP6) / TCP(sport=33334, dport=80, flags="A") / pad),
    }


def method_a(env: PacketEnv, fd: int, pkt: bytes, repeat: int) -> float:
    runs = [env.call(test_run, fd, pkt, ingress_ifindex=env.edge_ifindex, repeat=repeat)[2] for _ in range(3)]
    return float(min(runs))


def method_b(env: PacketEnv, fd: int, pkt: bytes, calls: int) -> float:
    def loop() -> list[int]:
        return [test_run(fd, pkt, ingress_ifindex=env.edge_ifindex)[2] for _ in range(calls)]
    return statistics.mean(env.call(loop))


def floors(env: PacketEnv, undo: bool) -> tuple[dict[str, int], object]:
    from bcc import BPF

    b = env.compile_floors(undo=undo)
    return {name: b.load_func(name.encode(), BPF.XDP).fd for name in FLOORS}, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: every step, few iterations, small state")
    quick = ap.parse_args().quick
    repeat, calls = (QUICK_RUNS, QUICK_RUNS) if quick else (REPEAT_A, CALLS_B)
    env_cfg = {"flow_table_size": QUICK_FLOW_TABLE} if quick else {}

    with private_bpffs("l4lb-bench-") as bpffs:
        with PacketEnv(bpffs, n_backends=100, prefix="l4bench", **env_cfg) as env:
            s4 = Service(name="bench4", vip=VIP4, port=80, backends=[{"address": a} for a in edge_backends_v4(100)])
            s6 = Service(name="bench6", vip=VIP6, port=80, backends=[{"address": a} for a in edge_backends_v6(100)])
            env.apply([s4, s6])
            # The bench-only build shares the pinned maps (same layout).
            undo = Datapath(dataclasses.replace(env.dp.cfg, extra_cflags=("-DBENCH_UNDO",)))
            env.call(undo.load)
            # The same program asking bpf_fib_lookup for every packet (nexthop = "fib").
            fib_undo = Datapath(dataclasses.replace(undo.cfg, nexthop_cache=False))
            fib_prod = Datapath(dataclasses.replace(env.dp.cfg, nexthop_cache=False))
            env.call(fib_undo.load)
            env.call(fib_prod.load)
            pk = packets()
            for p in pk.values():  # warm the flow table for the non-SYN rows
                env.run(p)
            rows = []
            for name, p in pk.items():
                v, _, _ = env.run(p)
                assert v == 3, f"{name}: expected XDP_TX, got {v}"
                rows.append((f"l4lb {name}", method_a(env, undo.prog_fd, p, repeat),
                             method_b(env, env.dp.prog_fd, p, calls)))
            for name, p in pk.items():
                rows.append((f"  fib build {name}", method_a(env, fib_undo.prog_fd, p, repeat),
                             method_b(env, fib_prod.prog_fd, p, calls)))
            fa, ba = floors(env, undo=True)
            fb, bb = floors(env, undo=False)
            v4 = pk["v4 SYN"]
            v6 = pk["v6 SYN"]
            for name, p in (("floor_tx", v4), ("floor_ipip", v4), ("floor_ip6ip6", v6), ("floor_fib", v4),
                            ("floor_flow", v4), ("floor_flow_new", v4), ("floor_lru", v4), ("floor_lru_new", v4)):
                rows.append((f"floor {name[6:]}", method_a(env, fa[name], p, repeat),
                             method_b(env, fb[name], p, calls)))
            ipip_a = next(r[1] for r in rows if r[0] == "floor ipip")
            print(f"\nDatapath: ns/packet, 100-backend service, M={env.dp.cfg.maglev_m}, "
                  f"flow table {env.dp.cfg.flow_table_size}, A = repeat {repeat} (undo build, best of 3), "
                  f"B = mean of {calls} single runs{' (--quick: not a measurement)' if quick else ''}")
            print(f"{'program / packet':<26}{'method A':>10}{'method B':>10}{'A - bare IPIP':>15}")
            for name, a, b in rows:
                print(f"{name:<26}{a:>10.0f}{b:>10.0f}{a - ipip_a:>15.0f}")
            for dp in (undo, fib_undo, fib_prod):
                env.call(dp.close)
    print("\nMaglev table build (pure Python + numpy)")
    maglev_build.print_table(maglev_build.measure(**(maglev_build.QUICK if quick else {})))


if __name__ == "__main__":
    main()
