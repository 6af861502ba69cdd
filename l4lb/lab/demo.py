"""`make demo`: a working load balancer in network namespaces, step by step.

Builds the lab (2 clients, the LB with two NICs, 3 backends + 1 behind the
second NIC), compiles and attaches the XDP program, creates IPv4 and IPv6
services, sends real curl traffic, prints the per-backend counters, drains a
backend and shows traffic moving. `--keep` leaves it up until Ctrl-C;
`python -m l4lb.lab.demo down` removes leftovers of any earlier run.
"""

from __future__ import annotations

import collections
import ipaddress
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from l4lb.datapath import Datapath, DatapathConfig, DatapathError
from l4lb.lab import netns
from l4lb.lab.topology import Lab
from l4lb.models import Service

PREFIX = "l4demo"


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def table(dp: Datapath, worker: netns.NetnsWorker) -> None:
    st = worker.call(dp.stats)
    print(f"  {'service / backend':<44}{'packets':>10}{'bytes':>12}")
    for (vip, port, proto), c in sorted(st.services.items()):
        vip = ipaddress.ip_address(vip).compressed
        host = f"[{vip}]" if ":" in vip else vip
        print(f"  {proto.upper()} {host}:{port:<30}{c['packets']:>10}{c['bytes']:>12}")
        for (sk, (addr, bport)), bc in sorted(st.backends.items()):
            if sk[1:] == (port, proto) and ipaddress.ip_address(sk[0]) == ipaddress.ip_address(vip):
                addr = ipaddress.ip_address(addr).compressed
                b = f"[{addr}]" if ":" in addr else addr
                print(f"    -> {b}:{bport:<34}{bc['packets']:>10}{bc['bytes']:>12}")


def services(lab: Lab, drained: str | None = None) -> list[Service]:
    seg_a = [n for n, h in lab.backends.items() if h.segment == "a"]
    def bes(i: int) -> list[dict]:
        return [{"address": lab.backend_addrs[n][i], "state": "draining" if n == drained else "active"} for n in seg_a]
    return [
        Service(name="web4", vip=lab.vip4, port=80, backends=bes(0), options={"hash_src_port": False}),
        Service(name="web6", vip=lab.vip6, port=80, backends=bes(1)),
    ]


def traffic(lab: Lab, family: int = 4) -> collections.Counter:
    seen: collections.Counter = collections.Counter()
    vip = lab.vip4 if family == 4 else lab.vip6
    for name, host in lab.clients.items():
        for src in host.addresses():
            if (":" in src) != (family == 6):
                continue
            r = lab.curl(name, lab.url(vip), source=src)
            seen[r.backend if r.ok else f"FAILED ({r.stderr.strip()})"] += 1
    return seen


def up(keep: bool) -> int:
    bpffs = Path(tempfile.mkdtemp(prefix="l4lb-demo-bpffs-"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    try:
        step("building the lab: 2 clients, LB (eth0 + eth1), 3 backends + 1 behind eth1")
        with Lab(clients=2, backends=3, seg_b_backends=1, client_extra_addrs=4, prefix=PREFIX) as lab:
            for n, h in sorted(lab.hosts.items()):
                print(f"  {n:<4} netns {h.ns:<22} {', '.join(h.addresses()[:2])}")
            step("compiling the XDP program with BCC and attaching it to the LB's NICs")
            dp = Datapath(DatapathConfig(bpffs=bpffs, maglev_m=16381))
            with netns.NetnsWorker(lab.lb_ns) as w:
                w.call(dp.load)
                modes = w.call(dp.attach, [lab.lb_if, lab.lb_if2], "auto")
                print(f"  attached: {modes}; maps pinned in {dp.prog.pin_dir if dp.prog else '?'}")
                step(f"services: TCP {lab.vip4}:80 (client-IP affinity) and TCP [{lab.vip6}]:80, 3 backends each")
                w.call(dp.apply, services(lab))
                step("curl from every client address (IPv4, then IPv6)")
                print(f"  IPv4: {dict(traffic(lab, 4))}")
                print(f"  IPv6: {dict(traffic(lab, 6))}")
                table(dp, w)
                victim = sorted(n for n, h in lab.backends.items() if h.segment == "a")[0]
                step(f"draining {victim} (weight 0: no new flows) and curling again")
                w.call(dp.apply, services(lab, drained=victim))
                after = traffic(lab, 4)
                print(f"  IPv4: {dict(after)}  ({victim} gets {after.get(victim, 0)} new connections)")
                table(dp, w)
                step("drop/pass reasons")
                for k, v in w.call(dp.stats).reasons.items():
                    if v["packets"]:
                        print(f"  {k:<24}{v['packets']:>8}")
                if keep:
                    step(f"lab is up. Try: ip netns exec {lab.ns_of('c1')} curl http://{lab.vip4}/ ; Ctrl-C to tear down")
                    try:
                        while True:
                            time.sleep(3600)
                    except KeyboardInterrupt:
                        pass
                w.call(dp.close)
            step("tearing the lab down")
        print("\ndemo OK")
        return 0
    except DatapathError as e:
        print(f"\ndemo FAILED in the datapath: {e}\n  (run `make setup` again; it checks kernel headers and BCC)", file=sys.stderr)
        return 1
    finally:
        subprocess.run(["umount", "-l", str(bpffs)], check=False)


def down() -> int:
    removed = netns.cleanup(PREFIX, force=True)
    print(f"removed {len(removed)} namespaces" if removed else "nothing to remove")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["down"]:
        return down()
    return up(keep="--keep" in args)


if __name__ == "__main__":
    sys.exit(main())
