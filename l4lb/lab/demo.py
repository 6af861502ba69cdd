"""`make demo`: the appliance as a user meets it, in network namespaces, step by step.

Builds the lab (2 clients, the LB with two NICs, 3 backends + 1 behind the
second NIC), starts the real ``l4lbd`` on the LB with a config file, creates
IPv4 and IPv6 services with ``l4lbctl``, sends real curl traffic, shows the
ipvsadm-like stats table, drains a backend and shows traffic moving, sends
traffic out of the second NIC (XDP_REDIRECT), records a pcap of a few flows
and prints tshark's view of it. Then a tier: two boxes behind a router running
BIRD with ECMP, VIPs over BGP, a box drained and brought back.

    python -m l4lb.lab.demo [up] [--keep]   (make demo [KEEP=1])
    python -m l4lb.lab.demo down            (make demo-down)

``--keep`` leaves the first lab up until Ctrl-C (or SIGTERM) and says how to
poke at it, including how to kill and restart l4lbd in it: the lab belongs to
the demo process, not to the daemon, so it outlives any number of restarts.
``down`` removes namespaces left by demo runs that are gone (a killed demo);
a running demo's, kept or not (or ``make test``'s), are spared: those end with
Ctrl-C in their own shell.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from l4lb.lab import netns
from l4lb.lab.bpffs import private_bpffs
from l4lb.lab.l4lbd import L4lbd, default_config
from l4lb.lab.tier import Tier
from l4lb.lab.topology import Lab

PREFIX = "l4demo"
L4LBCTL = str(Path(sys.executable).with_name("l4lbctl"))


class DemoError(RuntimeError):
    """A step failed; the message says what broke and how to fix it."""


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def show(cmd: list[str]) -> None:
    print("  $ " + " ".join(shlex.quote(c) for c in cmd), flush=True)


class Ctl:
    """Runs l4lbctl against the demo daemon's socket, echoing each command."""

    def __init__(self, socket: Path) -> None:
        self.env = {**os.environ, "L4LBCTL_SOCKET": str(socket)}

    def __call__(self, *args: str, echo: bool = True) -> str:
        cmd = ["l4lbctl", *args]
        if echo:
            show(cmd)
        cp = subprocess.run([L4LBCTL, *args], capture_output=True, text=True, env=self.env, timeout=120)
        if cp.returncode != 0:
            raise DemoError(f"`{' '.join(cmd)}` failed ({cp.returncode}): {cp.stderr.strip()}")
        if echo and cp.stdout.strip():
            print("    " + cp.stdout.rstrip().replace("\n", "\n    "), flush=True)
        return cp.stdout


def traffic(lab: Lab, vip: str, port: int = 80) -> collections.Counter:
    """One curl from every client address of the VIP's family; which backend answered."""
    seen: collections.Counter = collections.Counter()
    for name, host in lab.clients.items():
        for src in host.addresses():
            if (":" in src) != (":" in vip):
                continue
            r = lab.curl(name, lab.url(vip, port), source=src)
            seen[r.backend if r.ok else f"FAILED ({r.stderr.strip()})"] += 1
    if any(k.startswith("FAILED") for k in seen):
        raise DemoError(f"curl through {vip} failed: {dict(seen)} (see the daemon log)")
    return seen


def record(ctl: Ctl, lab: Lab, workdir: Path) -> None:
    """Record a few flows with l4lbctl record while curling, then show tshark's view."""
    out = workdir / "demo.pcapng"
    cmd = [L4LBCTL, "record", f"any any {lab.vip4} 80 tcp", "--packets", "20", "--capture-length", "128",
           "-w", str(out)]
    show(["l4lbctl", *cmd[1:]])
    rec = subprocess.Popen(cmd, env=ctl.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # A new filter mask compiles and swaps in a new program (a few seconds): wait until armed.
    deadline = time.monotonic() + 60
    while not any(r.get("state") == "running"
                  for r in json.loads(ctl("-o", "json", "record", "list", echo=False)).get("recordings", [])):
        if rec.poll() is not None or time.monotonic() > deadline:
            raise DemoError(f"the recording did not start: {rec.communicate()[1].strip()}")
        time.sleep(0.3)
    for _ in range(3):
        traffic(lab, lab.vip4)
        if rec.poll() is not None:
            break
    try:
        stdout, stderr = rec.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        rec.kill()
        raise DemoError("l4lbctl record did not finish after 20 packets")
    if rec.returncode != 0:
        raise DemoError(f"l4lbctl record failed ({rec.returncode}): {stderr.strip()}")
    print("    " + stdout.rstrip().replace("\n", "\n    "))
    if not out.exists():
        raise DemoError(f"the recording was not downloaded to {out}")
    step(f"tshark's view of {out}: direction, XDP verdict, IP src/dst (outer,inner), TCP flags, lengths")
    cmd = ["tshark", "-r", str(out), "-c", "8", "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,",
           "-e", "frame.number", "-e", "frame.packet_flags_direction", "-e", "frame.verdict.ebpf_xdp",
           "-e", "ip.src", "-e", "ip.dst", "-e", "tcp.flags.str", "-e", "frame.len", "-e", "frame.cap_len"]
    show(cmd)
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if cp.returncode != 0:
        raise DemoError(f"tshark could not read {out}: {cp.stderr.strip()} (apt-get install tshark)")
    rows = [["#", "direction", "verdict", "ip.src (outer,inner)", "ip.dst (outer,inner)", "tcp", "len", "cap"]]
    names = {"direction": {"0x00000001": "in", "0x00000002": "out"},
             "verdict": {"2": "XDP_PASS", "3": "XDP_TX", "4": "XDP_REDIRECT"}}
    for line in cp.stdout.splitlines():
        r = line.split("\t")
        if len(r) >= 3:
            r[1], r[2] = names["direction"].get(r[1], r[1]), names["verdict"].get(r[2], r[2])
            rows.append(r)
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("    " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


class Stopped(Exception):
    """SIGTERM: end the demo now, tearing everything down (no tier demo)."""


def _stop(signum: int, frame: object) -> None:
    raise Stopped()


def keep_open(lab: Lab, daemon: L4lbd, backend: str) -> None:
    """Wait for Ctrl-C while the user pokes at the lab. The lab stays up whatever happens to
    l4lbd: killing and restarting it (as the README's Operations section does) is the point."""
    step("the lab is up. Try, in another shell:")
    c1 = lab.ns_of("c1")
    ctl = f"L4LBCTL_SOCKET={daemon.socket} {L4LBCTL}"
    l4lbd = [str(Path(sys.executable).with_name("l4lbd")), "--config", str(daemon.config_path)]
    print(f"  ip netns exec {c1} curl http://{lab.vip4}/")
    print(f"  ip netns exec {c1} curl -g 'http://[{lab.vip6}]/'")
    print(f"  {ctl} stats --rate --watch")
    print(f"  {ctl} backend drain web4 {backend}")
    print(f"  daemon log: {daemon.log_path}")
    print(f"  kill -9 l4lbd (XDP keeps forwarding, the maps stay pinned): kill -9 {daemon.proc.pid if daemon.proc else ''}")
    print("  start it again in the LB's namespace (hitless: it reuses the pinned maps):")
    print(f"    ip netns exec {lab.lb_ns} {shlex.join(l4lbd)} >> {daemon.log_path} 2>&1 &")
    print("  Ctrl-C here (or kill -TERM {}) tears it all down.".format(os.getpid()), flush=True)
    said_exit = False
    try:
        while True:
            if not said_exit and daemon.proc is not None and daemon.proc.poll() is not None:
                print(f"  (l4lbd exited with {daemon.proc.returncode}; the lab stays up: start it again as above)",
                      flush=True)
                said_exit = True
            time.sleep(0.5)
    except KeyboardInterrupt:
        print()


def up(keep: bool) -> int:
    signal.signal(signal.SIGTERM, _stop)
    with private_bpffs("l4lb-demo-bpffs-") as bpffs:
        return _up(bpffs, keep)


def _up(bpffs: Path, keep: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="l4lb-demo-"))
    daemon: L4lbd | None = None
    try:
        step("building the lab: 2 clients, the LB (eth0 + eth1), 3 backends + 1 behind eth1")
        with Lab(clients=2, backends=3, seg_b_backends=1, client_extra_addrs=4, prefix=PREFIX) as lab:
            for n, h in sorted(lab.hosts.items()):
                print(f"  {n:<4} netns {h.ns:<22} {', '.join(h.addresses()[:2])}")

            step("starting l4lbd on the LB (compiles the XDP program, attaches it to eth0 and eth1)")
            cfg = default_config(work, bpffs, [lab.lb_if, lab.lb_if2])
            cfg["datapath"].update(xdp_mode="auto", maglev_m=16381, max_backends=4096, flow_table_size=65536)
            daemon = L4lbd(lab.lb_ns, work, cfg)
            daemon.write_config()
            print("  config " + str(daemon.config_path) + ":\n    "
                  + daemon.config_path.read_text().rstrip().replace("\n", "\n    "))
            show(["ip", "netns", "exec", lab.lb_ns, "l4lbd", "--config", str(daemon.config_path)])
            daemon.start()
            ctl = Ctl(daemon.socket)
            ctl("status")

            seg_a = sorted(n for n, h in lab.backends.items() if h.segment == "a")
            seg_b = sorted(n for n, h in lab.backends.items() if h.segment == "b")
            step("creating services with l4lbctl: TCP VIP:80 over IPv4 (client-IP affinity) and IPv6")
            ctl("service", "add", "web4", f"{lab.vip4}:80/tcp", "--no-sport-hash",
                *[a for n in seg_a for a in ("-b", lab.backend_addrs[n][0])])
            ctl("service", "add", "web6", f"[{lab.vip6}]:80/tcp",
                *[a for n in seg_a for a in ("-b", lab.backend_addrs[n][1])])
            ctl("service", "add", "far4", f"{lab.vips4[1]}:80/tcp",
                *[a for n in seg_b for a in ("-b", lab.backend_addrs[n][0])])

            step("curl from every client address through the VIPs")
            print(f"  IPv4 {lab.vip4}: {dict(traffic(lab, lab.vip4))}")
            print(f"  IPv6 {lab.vip6}: {dict(traffic(lab, lab.vip6))}")
            ctl("stats")

            victim = seg_a[0]
            step(f"draining {victim} (weight 0: established flows stay, no new ones) and curling again")
            ctl("backend", "drain", "web4", lab.backend_addrs[victim][0])
            after = traffic(lab, lab.vip4)
            print(f"  IPv4 {lab.vip4}: {dict(after)}  ({victim} got {after.get(victim, 0)} new connections)")
            if after.get(victim, 0):
                raise DemoError(f"drained backend {victim} still got new connections")
            ctl("backend", "undrain", "web4", lab.backend_addrs[victim][0])

            step(f"a backend behind the LB's second NIC: {lab.vips4[1]} goes out of eth1 (XDP_REDIRECT)")
            print(f"  IPv4 {lab.vips4[1]}: {dict(traffic(lab, lab.vips4[1]))}")
            ctl("stats", "--reasons")

            step("recording a few flows into a pcapng file (inbound client packets and outbound IPIP)")
            record(ctl, lab, work)

            if keep:
                keep_open(lab, daemon, lab.backend_addrs[victim][0])
            daemon.stop()
            step("tearing the lab down")
        tier_demo(bpffs, work / "tier")
        print("\ndemo OK")
        return 0
    except Stopped:
        print("\ndemo stopped (SIGTERM): everything torn down", file=sys.stderr)
        return 0
    except DemoError as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        if daemon is not None:
            print(f"  last lines of the daemon log ({daemon.log_path}):\n    "
                  + daemon.log_tail(15).replace("\n", "\n    "), file=sys.stderr)
        print("  Run `make setup` again (it checks BCC and the kernel headers), then `make demo-down`.",
              file=sys.stderr)
        return 1
    except AssertionError as e:  # the daemon did not come up
        print(f"\ndemo FAILED: l4lbd did not start: {e}\n  Run `make setup` again (BCC, kernel headers).",
              file=sys.stderr)
        return 1
    finally:
        if daemon is not None:
            daemon.kill()
        shutil.rmtree(work, ignore_errors=True)


def tier_demo(bpffs: Path, work: Path) -> None:
    """Two boxes behind an ECMP router, VIPs over BGP: announce, fleet status, drain, undrain."""
    step("a tier: 2 LB boxes (l4lbd + BIRD each) behind a router running BIRD with ECMP, over BGP")
    with Lab(clients=1, backends=2, lbs=2, router=True, prefix=PREFIX) as lab:
        vip = lab.vip4
        tier = Tier(lab, work, bpffs, [{"name": "web", "vip": vip, "port": 80,
                                        "backends": [{"address": h.ip4} for h in lab.backends.values()]}],
                    bgp={"drain_delay": 3})
        try:
            tier.up()
            hops = tier.wait_nexthops(f"{vip}/32", {b.ip for b in tier.boxes.values()})
            print(f"  the router has one next hop per box after {hops:.1f}s:")
            show(["ip", "netns", "exec", lab.ns_of("router"), "ip", "route", "show", vip])
            print("    " + netns.ip(lab.ns_of("router"), "route", "show", vip).stdout.strip().replace("\n", "\n    "))
            print(f"  IPv4 {vip} through the router: {dict(traffic(lab, vip))}")
            socks = [a for b in tier.boxes.values() for a in ("-s", str(b.l4lbd.socket))]
            Ctl(tier.boxes["lb2"].l4lbd.socket)("box", "status")
            show(["l4lbctl", *socks, "fleet", "status"])
            print("    " + Ctl(tier.boxes["lb"].l4lbd.socket)(*socks, "fleet", "status", echo=False)
                  .rstrip().replace("\n", "\n    "))
            lb2 = Ctl(tier.boxes["lb2"].l4lbd.socket)
            step("draining lb2: graceful-shutdown community first (the router stops choosing it), withdraw after 3 s")
            lb2("box", "drain", "--delay", "3")
            tier.wait_nexthops(f"{vip}/32", {tier.boxes["lb"].ip})
            print("  the router still holds lb2's route, not as best:")
            print("    " + tier.router_birdc("show", "route", "for", f"{vip}/32").strip().replace("\n", "\n    "))
            time.sleep(3.5)
            lb2("box", "status")
            lb2("box", "undrain")
            tier.wait_nexthops(f"{vip}/32", {b.ip for b in tier.boxes.values()})
            print("  lb2 is back in the ECMP route")
        except AssertionError as e:
            raise DemoError(f"the tier did not converge: {e}") from None
        finally:
            tier.down()


def down() -> int:
    """Remove what demo runs that are gone left behind; spare the labs of runs still alive."""
    removed = netns.cleanup(PREFIX)
    live = sorted({t for ns in netns.list_netns(PREFIX + "-") if (t := netns.tag_of(ns, PREFIX))})
    print(f"removed {len(removed)} namespaces of demo runs that are gone" if removed else "nothing to remove")
    for tag in live:
        pid = (netns.OWNER_DIR / f"{tag}.owner").read_text().split()[0] if netns.owner_alive(tag) else "?"
        print(f"spared lab {PREFIX}-{tag}-*: its demo (or test) is still running (pid {pid}); "
              "Ctrl-C it in its shell, or kill -TERM it")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m l4lb.lab.demo", description="l4lb in network namespaces, "
                                "step by step (make demo)")
    keep_help = "leave the first lab up until Ctrl-C, to poke at it"
    p.add_argument("--keep", action="store_true", help=keep_help)
    sub = p.add_subparsers(dest="command")
    u = sub.add_parser("up", help="build the lab, run the demo, tear it down (the default)")
    u.add_argument("--keep", action="store_true", default=argparse.SUPPRESS, help=keep_help)
    sub.add_parser("down", help="remove namespaces of demo runs that are gone (running ones are spared)")
    args = p.parse_args(argv)
    if args.command == "down":
        return down()
    return up(keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
