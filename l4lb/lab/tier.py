"""A tier of LB boxes behind an ECMP router, on top of the lab (root only).

``Lab(lbs=N, router=True)`` gives the namespaces (clients, ``router``, ``lb``
… ``lbN``, backends, all on segment A). A ``Tier`` runs what a real tier runs:

* on the router, BIRD 2 with two eBGP sessions per box, one per address
  family, each over its own family (an IPv4 session carries the IPv4 VIPs, an
  IPv6 session the IPv6 ones; BFD, short timers), ``merge paths on`` so the
  kernel gets one ECMP route with a next hop per box (hashed on L4: the lab
  sets ``fib_multipath_hash_policy=1`` for both families), IPv6 next hops
  taken as the boxes' global addresses, and the RFC 8326 graceful-shutdown
  community honoured (local preference 0);
* on each box, BIRD 2 (its own process, so it outlives l4lbd, as the
  distribution's unit does) whose main config includes what l4lbd generates,
  and l4lbd itself with a ``[bgp]`` section, the same seed and the same
  services on every box.

The router's config is the README's BIRD example, generated here so the
test and the documentation cannot drift apart. With ``Lab(routers=2)`` a
second router, ``router2``, runs FRR with the README's FRR example
(l4lb/lab/frr.py) and every box peers with it too (the clients still route
via the first).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from l4lb.lab import netns
from l4lb.lab.frr import FrrRouter, bfdd_config, bgpd_config
from l4lb.lab.l4lbd import L4lbd, default_config
from l4lb.lab.topology import Lab

ROUTER_AS = 65000
TIER_AS = 65010
SEED = "dGllci1zZWVkLTEy"  # base64 of "tier-seed-12": the same on every box


# BFD in the lab: 100 ms packets, down after 10 missed (1 s). With x 3 (300 ms) a loaded
# 2-core test machine, where BIRD may not run for a few hundred ms, flapped sessions.
BFD_MS, BFD_MULT = 100, 10


def _peer_name(ip: str) -> str:
    return "lb_" + ip.replace(".", "_").replace(":", "_")


def router_config(router_ip: str, boxes: Iterable[str], *, bfd_ms: int = BFD_MS, bfd_mult: int = BFD_MULT,
                  log: str = "syslog") -> str:
    """BIRD 2 on the upstream router: ECMP over the boxes, BFD, graceful shutdown honoured.

    ``boxes``: every address of every box that the router peers with; an IPv4 address
    gets an IPv4 session (IPv4 VIPs), an IPv6 address an IPv6 session (IPv6 VIPs)."""
    peers = "\n".join(f"protocol bgp {_peer_name(ip)} from tier{'6' if ':' in ip else ''} "
                      f"{{ neighbor {ip} as {TIER_AS}; }}" for ip in boxes)
    common = (f"  local as {ROUTER_AS};\n  bfd on;\n  hold time 9;\n"
              "  connect delay time 1; connect retry time 1; error wait time 1, 5;")
    return f"""log {log} all;
router id {router_ip};
protocol device {{}}
protocol bfd {{ interface "*" {{ min rx interval {bfd_ms} ms; min tx interval {bfd_ms} ms; multiplier {bfd_mult}; }}; }}
# One kernel route per VIP with a next hop per box (ECMP).
protocol kernel {{ ipv4 {{ export all; }}; merge paths on; }}
protocol kernel {{ ipv6 {{ export all; }}; merge paths on; }}
# RFC 8326: a box that drains tags its routes GRACEFUL_SHUTDOWN; prefer the others.
filter from_tier {{ if (65535, 0) ~ bgp_community then bgp_local_pref = 0; accept; }}
template bgp tier {{
{common}
  ipv4 {{ import filter from_tier; export none; }};
}}
# IPv6 VIPs over IPv6 sessions; the box's global address as next hop, not its link-local one.
template bgp tier6 {{
{common}
  ipv6 {{ import filter from_tier; export none; next hop prefer global; }};
}}
{peers}
"""


def box_bird_config(include_dir: Path, log: str = "syslog") -> str:
    """A box's BIRD main config: what /etc/bird/bird.conf holds after `make install` adds our include."""
    return f"""log {log} all;
protocol device {{}}
include "{include_dir}/*.conf";
"""


@dataclass
class Box:
    name: str
    ns: str
    ip: str           # IPv4: the router's next hop for IPv4 VIPs
    ip6: str          # IPv6: the router's next hop for IPv6 VIPs
    dir: Path
    l4lbd: L4lbd
    bird: subprocess.Popen | None = None

    @property
    def bird_socket(self) -> Path:
        return self.dir / "bird.ctl"

    @property
    def include(self) -> Path:
        return self.dir / "bird" / "l4lbd.conf"


@dataclass
class Tier:
    lab: Lab
    workdir: Path
    bpffs: Path
    services: list[dict[str, Any]]
    bgp: dict[str, Any] = field(default_factory=dict)   # extra [bgp] keys for every box
    boxes: dict[str, Box] = field(default_factory=dict)
    router_bird: subprocess.Popen | None = None
    frr: FrrRouter | None = None                         # router2's FRR (Lab(routers=2))

    @property
    def router_socket(self) -> Path:
        return self.workdir / "router.ctl"

    # -- bring-up -----------------------------------------------------------------------

    def up(self, timeout: float = 120) -> "Tier":
        lab = self.lab
        rdir = self.workdir
        rdir.mkdir(parents=True, exist_ok=True)
        conf = rdir / "router.conf"
        conf.write_text(router_config(lab.router_ip4, [a for h in lab.lbs.values() for a in (h.ip4, h.ip6)],
                                      log=f'"{rdir / "router.log"}"'))
        self.router_bird = lab.popen("router", "bird", "-f", "-c", conf, "-s", self.router_socket,
                                     "-P", rdir / "router.pid", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peers = [{"address": lab.router_ip4, "remote_as": ROUTER_AS, "bfd": True},
                 {"address": lab.router_ip6, "remote_as": ROUTER_AS, "bfd": True}]
        if lab.n_routers == 2:
            self.frr = FrrRouter(lab.ns_of("router2"))
            self.frr.start(bgpd_config(ROUTER_AS, TIER_AS, lab.router2_ips,
                                       [a for h in lab.lbs.values() for a in (h.ip4, h.ip6)], bfd_profile="lab"),
                           bfdd_config("lab", BFD_MS, BFD_MULT))
            peers += [{"address": a, "remote_as": ROUTER_AS, "bfd": True} for a in lab.router2_ips]
        for name, host in lab.lbs.items():
            d = self.workdir / name
            (d / "bird").mkdir(parents=True, exist_ok=True)
            pins = self.bpffs / f"tier-{lab.tag}-{name}"
            pins.mkdir(exist_ok=True)
            cfg = default_config(d, pins, [host.ifname])
            cfg["datapath"]["maglev_seed"] = SEED
            box = Box(name, host.ns, host.ip4, host.ip6, d, L4lbd(host.ns, d, cfg))
            # error_wait: FRR re-creates each BFD session once its BGP session connects, which BIRD
            # counts as a failure (README, FRR): the lab waits 1 s for the retry, not 60.
            cfg["bgp"] = {"local_as": TIER_AS, "router_id": host.ip4, "hold_time": 9, "connect_retry": 1,
                          "error_wait": [1, 5],
                          "poll_interval": 0.5, "drain_delay": 5, "bird_socket": str(box.bird_socket),
                          "bird_include": str(box.include),
                          "bfd": {"interval_ms": BFD_MS, "multiplier": BFD_MULT},
                          # One session per family, each over its own (README: "IPv6 VIPs").
                          "peers": peers,
                          **self.bgp}
            (d / "bird.conf").write_text(box_bird_config(d / "bird", log=f'"{d / "bird.log"}"'))
            self.boxes[name] = box
            self.start_bird(box)
        # The boxes compile their programs at the same time (the slow part of a start).
        with ThreadPoolExecutor(len(self.boxes)) as ex:
            list(ex.map(lambda b: b.l4lbd.start(wait=False), self.boxes.values()))
        for box in self.boxes.values():
            box.l4lbd.wait_ready(timeout)
            with box.l4lbd.client() as c:
                r = c.put("/v1/state", json={"services": self.services})
                assert r.status_code == 200, r.text
        return self

    def start_bird(self, box: Box) -> None:
        box.bird = self.lab.popen(box.ns, "bird", "-f", "-c", box.dir / "bird.conf", "-s", box.bird_socket,
                                  "-P", box.dir / "bird.pid", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def down(self) -> None:
        for box in self.boxes.values():
            box.l4lbd.kill()
            if box.bird is not None:
                netns.stop(box.bird)
        if self.router_bird is not None:
            netns.stop(self.router_bird)
        if self.frr is not None:
            self.frr.stop()

    # -- looking at the router ------------------------------------------------------------

    def addresses(self, family: int = 4) -> set[str]:
        """Every box's address of that family: the router's next hops when all boxes announce."""
        return {b.ip6 if family == 6 else b.ip for b in self.boxes.values()}

    def nexthops(self, prefix: str, router: str = "router") -> set[str]:
        """Next hops of a router's kernel route to ``prefix`` (one per box announcing it)."""
        fam = "-6" if ":" in prefix else "-4"
        out = netns.ip(self.lab.ns_of(router), "-j", fam, "route", "show", prefix).stdout
        hops: set[str] = set()
        for r in json.loads(out or "[]"):
            if "gateway" in r:
                hops.add(r["gateway"])
            hops.update(h["gateway"] for h in r.get("nexthops", []) if "gateway" in h)
        return hops

    def wait_nexthops(self, prefix: str, want: Callable[[set[str]], bool] | set[str], timeout: float = 30,
                      step: float = 0.01, router: str = "router") -> float:
        """Seconds until the router's next hops for ``prefix`` satisfy ``want``; AssertionError at timeout."""
        ok = want if callable(want) else (lambda h: h == want)
        t0 = time.monotonic()
        while True:
            hops = self.nexthops(prefix, router)
            if ok(hops):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                said = (self.router_birdc("show", "protocols") if router == "router" or self.frr is None
                        else self.frr.vtysh("show bgp summary", "show bfd peers brief") + self.frr.log())
                raise AssertionError(f"{router}'s next hops for {prefix} after {timeout}s: {sorted(hops)}\n" + said)
            time.sleep(step)

    def router_birdc(self, *args: str) -> str:
        return subprocess.run(["birdc", "-s", str(self.router_socket), *args], capture_output=True, text=True,
                              timeout=30).stdout

    def box_of_flow(self, src: str, sport: int, dst: str, dport: int, proto: str = "udp") -> str:
        """The box the router's ECMP hash sends this flow to (the kernel's own answer).

        IPv4 only in this lab: an IPv6 sender's kernel gives the packet a random-seeded L4
        hash (for its flow label) and the router, on the same kernel, reuses that hash."""
        out = netns.ip(self.lab.ns_of("router"), "-j", "route", "get", dst, "from", src, "iif", "eth0",
                       "ipproto", proto, "sport", sport, "dport", dport).stdout
        gw = json.loads(out)[0]["gateway"]
        return next(n for n, b in self.boxes.items() if gw in (b.ip, b.ip6))
