"""FRR on a lab router: the README's FRR example, run (root only).

The tier lab's second router (``Lab(routers=2)``) runs FRR 8.4 from Debian
(zebra, bfdd, bgpd, each in the foreground in the router's netns, sockets and
logs in a work directory) with the configuration the README shows operators,
generated here so the two cannot drift apart (tests/test_bgp_plan.py compares
them). It peers with the same boxes as the BIRD router; the tests read its
kernel routes (installed by zebra) and its BGP table (vtysh).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from l4lb.lab import netns

FRR_LIB = Path("/usr/lib/frr")
DAEMONS = ("zebra", "bfdd", "bgpd")


def bgpd_config(router_as: int, tier_as: int, sources: tuple[str, str], boxes: Iterable[str], *,
                bfd_profile: str | None = None) -> str:
    """FRR's BGP part on the upstream router: ECMP over the boxes, BFD, graceful shutdown honoured.

    ``sources``: the router's IPv4 and IPv6 address on the boxes' segment; ``boxes``: every
    address of every box; an IPv4 address joins peer group TIER (IPv4 VIPs), an IPv6 one
    TIER6 (IPv6 VIPs). ``bfd_profile``: a bfdd profile for the sessions (the lab's timers);
    without it FRR's defaults (300 ms x 3)."""
    addrs = list(boxes)
    lines = [
        "bgp community-list standard GSHUT permit graceful-shutdown",
        "route-map FROM-TIER permit 10",
        " match community GSHUT",
        " set local-preference 0",
        "route-map FROM-TIER permit 20",
        # BIRD on a box sends its global and its link-local address as the IPv6 next
        # hop: the kernel routes name the global one (as the BIRD example's "prefer global").
        "route-map FROM-TIER6 permit 10",
        " match community GSHUT",
        " set local-preference 0",
        " set ipv6 next-hop prefer-global",
        "route-map FROM-TIER6 permit 20",
        " set ipv6 next-hop prefer-global",
        f"router bgp {router_as}",
        " no bgp default ipv4-unicast",
    ]
    for group, source in zip(("TIER", "TIER6"), sources):
        # update-source: the sessions come from the address the boxes peer with, whatever
        # else the router has. (It does not stop bgpd from re-creating each BFD session once
        # TCP is up, which BIRD counts as a failure: README, FRR; the lab's error_wait.)
        lines += [f" neighbor {group} peer-group", f" neighbor {group} remote-as {tier_as}",
                  f" neighbor {group} update-source {source}",
                  f" neighbor {group} bfd", f" neighbor {group} timers 3 9"]
        lines += [f" neighbor {group} bfd profile {bfd_profile}"] if bfd_profile else []
    lines += [f" neighbor {a} peer-group {'TIER6' if ':' in a else 'TIER'}" for a in addrs]
    for fam, group in (("ipv4", "TIER"), ("ipv6", "TIER6")):
        lines += [f" address-family {fam} unicast", "  maximum-paths 16", f"  neighbor {group} activate",
                  f"  neighbor {group} route-map FROM-{group} in", " exit-address-family"]
    return "\n".join(lines) + "\n"


def bfdd_config(profile: str, interval_ms: int, multiplier: int) -> str:
    return (f"bfd\n profile {profile}\n  receive-interval {interval_ms}\n  transmit-interval {interval_ms}\n"
            f"  detect-multiplier {multiplier}\n exit\nexit\n")


class FrrRouter:
    """zebra, bfdd and bgpd in one netns; ``stop()`` ends them."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        # A directory of its own: the daemons drop to the package's frr user, which must
        # own where their sockets, pid files and logs go (and reach it: not under a 0700 one).
        self.dir = Path(tempfile.mkdtemp(prefix="l4lb-frr-"))
        self.procs: list[subprocess.Popen] = []

    @staticmethod
    def missing() -> str | None:
        """Why FRR cannot run here, or None."""
        if not all((FRR_LIB / d).exists() for d in DAEMONS) or shutil.which("vtysh") is None:
            return "FRR is not installed: run scripts/setup.sh (apt-get install frr)"
        return None

    def start(self, bgpd: str, bfdd: str, timeout: float = 30) -> None:
        d = self.dir
        (d / "zebra.conf").write_text("hostname router2\n")
        (d / "bfdd.conf").write_text(bfdd)
        (d / "bgpd.conf").write_text(bgpd)
        uid, gid = pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid
        for p in [d, *d.iterdir()]:
            os.chown(p, uid, gid)
        for name in DAEMONS:
            extra = ["--bfdctl", str(d / "bfdd.sock")] if name == "bfdd" else []
            self.procs.append(netns.popen(
                self.ns, str(FRR_LIB / name), "-f", d / f"{name}.conf", "-i", d / f"{name}.pid",
                "-z", d / "zserv.api", "--vty_socket", d, "-P", "0", "--log", f"file:{d / name}.log", *extra,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            # Each later daemon talks to zebra (bgpd to bfdd through it): wait for its vty.
            deadline = time.monotonic() + timeout
            while not (d / f"{name}.vty").exists():
                if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                    err = self.procs[-1].stderr.read().decode() if self.procs[-1].poll() is not None else ""
                    raise RuntimeError(f"FRR {name} did not start: {err}{self.log(name)}")
                time.sleep(0.05)

    def vtysh(self, *commands: str) -> str:
        args = [a for c in commands for a in ("-c", c)]
        return subprocess.run(["vtysh", "--vty_socket", str(self.dir), *args], capture_output=True, text=True,
                              timeout=30).stdout

    def bgp_route(self, prefix: str) -> str:
        """bgpd's paths for ``prefix`` ("Paths: (N available, best #k...)")."""
        return self.vtysh(f"show bgp {'ipv6' if ':' in prefix else 'ipv4'} unicast {prefix}")

    def log(self, name: str = "bgpd", lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / f"{name}.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        for p in reversed(self.procs):
            netns.stop(p)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)
