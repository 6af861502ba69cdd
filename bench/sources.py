#!/usr/bin/env python3
"""Source-address lookups for tunnel health probes (not a test): before and after.

A tunnel probe binds the LB's own address towards its backend. Measured in a
netns of its own (two veths, an IPv4 secondary address, routes with and
without ``src``, a policy rule and the probes' fwmark rule), for N distinct
backend addresses (every IPv4 documentation host first, then IPv6 from
2001:db8:ff01::/112):

* before: one ``ip route get`` per address over pyroute2, one IPRoute socket
  for all (``before()`` below: what the daemon did until it had the batch);
* after: the batch (``l4lb.datapath.sources.sources_towards``): per address a
  UDP connect, getsockname and a disconnect (three syscalls, nothing sent);
* floor: one ``getsockname`` per address on a connected socket (one trivial
  syscall and the Python loop), measured in the same run.

Both methods must give the same answer for every address (checked, printed).
The machine is shared: min/median/max over ``--runs`` and ratios within one run.
Run as root: ``.venv/bin/python bench/sources.py [--quick]``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from pyroute2 import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

from l4lb.datapath.sources import sources_towards  # noqa: E402
from l4lb.lab import netns  # noqa: E402

SETUP4 = """
link add a0 type veth peer name a0p
link add a1 type veth peer name a1p
link set lo up
link set a0 up
link set a0p up
link set a1 up
link set a1p up
addr add 192.0.2.250/24 dev a0
addr add 192.0.2.251/24 dev a0
addr add 203.0.113.250/32 dev a1
route add 203.0.113.0/24 via 192.0.2.254
route add 198.51.100.0/24 via 192.0.2.254 src 192.0.2.251
rule add to 198.51.100.128/25 lookup 100 pref 500
route add 198.51.100.128/25 via 203.0.113.254 dev a1 onlink table 100
rule add fwmark 0x4C480000/0xffff0000 lookup 19528 pref 1000
route add default dev a1 table 19528
"""
SETUP6 = """
addr add 2001:db8:1::1/64 dev a0 nodad
addr add 2001:db8:1::2/64 dev a0 nodad preferred_lft 0
addr add 2001:db8:9::1/64 dev a1 nodad
route add 2001:db8:ff01::/64 via 2001:db8:1::fe
rule add fwmark 0x4C480000/0xffff0000 lookup 19528 pref 1000
route add default dev a1 table 19528
"""


def addresses(n: int) -> list[str]:
    v4 = [str(net.network_address + h) for net in map(ipaddress.ip_network, ("192.0.2.0/24", "198.51.100.0/24",
                                                                              "203.0.113.0/24"))
          for h in range(1, 250)]
    v6 = (str(ipaddress.ip_address("2001:db8:ff01::") + i) for i in range(1, 1 << 16))
    out = v4[: n // 2] if n < 2 * len(v4) else v4
    out += [next(v6) for _ in range(n - len(out))]
    return out


def before(addrs: list[str]) -> dict[str, str | None]:
    """One ``ip route get`` per address over one pyroute2 socket (the daemon's old way)."""
    out: dict[str, str | None] = {}
    with IPRoute() as ipr:
        for a in addrs:
            try:
                routes = ipr.route("get", dst=a)
            except NetlinkError:
                routes = []   # no route
            out[a] = routes[0].get_attr("RTA_PREFSRC") if routes else None
    return out


def after(addrs: list[str]) -> dict[str, str | None]:
    return sources_towards(addrs)


def floor(addrs: list[str]) -> dict[str, str | None]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        return {a: s.getsockname()[0] for a in addrs}


def timed(fn: Callable[[list[str]], dict[str, str | None]], addrs: list[str]) -> tuple[float, dict[str, str | None]]:
    t0 = time.perf_counter()
    out = fn(addrs)
    return time.perf_counter() - t0, out


def fmt_s(x: float) -> str:
    return f"{x * 1000:,.1f} ms" if x < 1 else f"{x:,.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one run: a smoke run (figures judge nothing)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="1000,65535", help="numbers of distinct backend addresses")
    args = ap.parse_args()
    sizes = [100, 400] if args.quick else [int(x) for x in args.sizes.split(",")]
    runs = 1 if args.quick else args.runs
    ns = f"l4src-bench-{os.getpid()}"
    netns.add(ns)
    try:
        netns.run(ns, "ip", "-batch", "-", input=SETUP4)
        netns.run(ns, "ip", "-6", "-batch", "-", input=SETUP6)
        print(f"netns {ns}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {runs} run(s) each")
        rows = []
        for n in sizes:
            addrs = addresses(n)
            v4 = sum(":" not in a for a in addrs)
            times: dict[str, list[float]] = {"before": [], "after": [], "floor": []}
            agree = True
            for _ in range(runs):   # interleaved, so that a busy spell hits all three
                for name, fn in (("floor", floor), ("after", after), ("before", before)):
                    took, out = netns.call_in_netns(ns, timed, fn, addrs)
                    times[name].append(took)
                    if name == "after":
                        got = out
                    elif name == "before":
                        agree = agree and out == got
            routed = sum(s is not None for s in got.values())
            rows.append((n, v4, routed, times, agree))
        print(f"\nSource lookups for N backend addresses (IPv4 + IPv6; wall time of the whole batch, "
              f"min / median / max of {runs})")
        print(f"  {'method':<52}  {'N':>6}  {'min':>10}  {'median':>10}  {'max':>10}  {'per address':>12}  "
              f"{'x floor':>8}")
        for n, v4, routed, times, agree in rows:
            fl = statistics.median(times["floor"])
            for name, label in (("before", "before: ip route get each (pyroute2, netlink)"),
                                ("after", "after: UDP connect + getsockname + disconnect"),
                                ("floor", "floor: getsockname on a connected socket")):
                xs = times[name]
                med = statistics.median(xs)
                print(f"  {label:<52}  {n:>6,}  {fmt_s(min(xs)):>10}  {fmt_s(med):>10}  {fmt_s(max(xs)):>10}  "
                      f"{med / n * 1e6:>9,.1f} µs  {med / fl:>8,.1f}")
            speed = statistics.median(times["before"]) / statistics.median(times["after"])
            print(f"  -> N={n:,} ({v4:,} IPv4, {n - v4:,} IPv6; {routed:,} with a route): after is {speed:,.0f}x "
                  f"faster than before (medians); both methods agree on every address: {'yes' if agree else 'NO'}")
            if not agree:
                sys.exit("the two lookups disagree")
        if args.quick:
            print("quick run: a smoke run at a small scale; its figures are not measurements")
    finally:
        netns.delete(ns)


if __name__ == "__main__":
    main()
