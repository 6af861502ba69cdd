"""The network-namespace lab: clients, one load balancer, backends (root only).

One builder for the test suite and the demo.  Picture (segment B is optional)::

      c1  c2 ...          lb                 b1  b2  b3 ...
      eth0 eth0      eth0    eth1            eth0 eth0 eth0
       |    |          |       \\               |    |    |
   v-c1 v-c2       v-lb(xdp_pass) \\         v-b1 v-b2 v-b3      <- bridge netns
   ====================br0==================================
                           v-lb2(xdp_pass) ---br1--- v-b4 ...     <- segment B
                                                     eth0
                                                      b4 (default route via lb)

* every box is a netns named ``<prefix>-<tag>-<name>`` (``l4t-1a2b3c-lb``);
  the bridge(s) live in ``<prefix>-<tag>-br``.  Nothing is configured in the
  root namespace.
* segment A: 192.0.2.0/24 + 2001:db8:0:1::/64; segment B: 203.0.113.0/24 +
  2001:db8:0:2::/64; VIPs in 198.51.100.0/24 and 2001:db8:0:100::/64, routed by
  the clients via the LB.
* LB: forwarding on (bpf_fib_lookup needs it), rp_filter 0; the bridge-side
  peer of each LB veth runs ``xdp_pass`` so XDP_TX/XDP_REDIRECT frames arrive.
  The LB's own veth (``lb_if`` in ``lb_ns``) is left free for the LB program.
* backends: VIPs on ``lo``, rp_filter 0, arp_ignore 1 / arp_announce 2,
  ``xdp_decap`` on eth0 (IPIP / IP6IP6 addressed to the backend), an HTTP
  server (ports 80, 8080; optionally HTTPS ports with a given certificate)
  and a UDP echo server (5353) bound to every VIP and to the backend's own
  addresses, answering with ``backend=<name>``. ``stop_server(name)`` /
  ``start_server(name)`` take one backend's servers away and back.
* clients and backends: ``ethtool -K eth0 tx off`` (veth checksum offload).

Use::

    with Lab(clients=2, backends=3) as lab:
        lab.call("lb", BPF.attach_xdp, lab.lb_if.encode(), lb_fn, 0)   # the LB program
        r = lab.curl("c1", lab.url(lab.vip4))
        assert r.ok and r.backend in lab.backends

``python -m l4lb.lab.topology up`` keeps a lab up until Ctrl-C (prints it as
JSON); ``python -m l4lb.lab.topology cleanup`` removes leftovers of dead runs.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import secrets
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from l4lb.lab import netns

# --------------------------------------------------------------------------- constants

PREFIX = "l4t"

NET_A4 = ipaddress.ip_network("192.0.2.0/24")          # clients, LB eth0, backends
NET_A6 = ipaddress.ip_network("2001:db8:0:1::/64")
NET_B4 = ipaddress.ip_network("203.0.113.0/24")        # optional LB eth1 + backends behind it
NET_B6 = ipaddress.ip_network("2001:db8:0:2::/64")
VIP_NET4 = ipaddress.ip_network("198.51.100.0/24")     # routed by clients via the LB
VIP_NET6 = ipaddress.ip_network("2001:db8:0:100::/64")

LB_IP4 = "192.0.2.1"
LB_IP6 = "2001:db8:0:1::1"
ROUTER_HOST = 254         # the optional router (a tier of LBs behind ECMP): 192.0.2.254
MAX_LBS = 9               # lb = .1, lb2 = .2, ... lb9 = .9
LB_B_IP4 = "203.0.113.1"
LB_B_IP6 = "2001:db8:0:2::1"

VIP4 = "198.51.100.10"
VIP6 = "2001:db8:0:100::10"
VIPS4 = (VIP4, "198.51.100.11")
VIPS6 = (VIP6, "2001:db8:0:100::11")

HTTP_PORTS = (80, 8080)
UDP_PORTS = (5353,)
HTTP_PORT = HTTP_PORTS[0]
UDP_PORT = UDP_PORTS[0]

# host numbers (the last octet; the IPv6 host part is the same digits: .11 <-> ::11)
CLIENT_BASE = 10          # c1 = .11, c2 = .12, ...    (at most 20 clients)
CLIENT_EXTRA_BASE = 150   # extra client addresses .151 ...  (at most 100 in all)
BACKEND_BASE = 100        # b1 = .101, ...              (at most 49 backends)
MAX_CLIENTS = 20
MAX_BACKENDS = 49

NODE_IF = "eth0"          # every node's first NIC
NODE_IF_B = "eth1"        # the LB's segment-B NIC
BRIDGE_A = "br0"
BRIDGE_B = "br1"


def _addr4(net: ipaddress.IPv4Network, host: int) -> str:
    return str(net.network_address + host)


def _addr6(net: ipaddress.IPv6Network, host: int) -> str:
    # host 11 -> 2001:db8:0:1::11 (same digits as the IPv4 octet, read as hex)
    return str(ipaddress.IPv6Address(int(net.network_address) + int(str(host), 16)))


# --------------------------------------------------------------------------- server

# Runs inside a backend netns as `python -I -c SERVER NAME SPEC_JSON`.
SERVER = r'''
import http.server, json, socket, socketserver, ssl, sys, threading
NAME = sys.argv[1]
SPEC = json.loads(sys.argv[2])

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "l4lb-lab"
    sys_version = ""

    def _reply(self, extra=b""):
        peer = self.client_address
        local = self.connection.getsockname()
        body = ("backend=%s\nclient_ip=%s\nclient_port=%d\nlocal_ip=%s\nlocal_port=%d\npath=%s\n"
                % (NAME, peer[0], peer[1], local[0], local[1], self.path)).encode() + extra
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", NAME)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        extra = b""
        parts = self.path.split("/")
        if len(parts) >= 3 and parts[1] == "bytes" and parts[2].isdigit():
            extra = b"x" * min(int(parts[2]), 64 << 20)
        self._reply(extra)

    do_HEAD = do_GET

    def do_POST(self):
        left = int(self.headers.get("Content-Length") or 0)
        got = 0
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            got += len(chunk)
            left -= len(chunk)
        self._reply(b"received=%d\n" % got)

    def log_message(self, *args):
        pass

def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET

def server_bind(self):
    # HTTPServer.server_bind calls socket.getfqdn(): a reverse DNS lookup that
    # hangs for seconds in a netns with a default route and no DNS.
    socketserver.TCPServer.server_bind(self)
    self.server_name = self.server_address[0]
    self.server_port = self.server_address[1]

threads = []
tls = None
if SPEC.get("https"):
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(SPEC["cert"], SPEC["key"])
for addr, port, secure in [(a, p, False) for a, p in SPEC["http"]] + [(a, p, True) for a, p in SPEC.get("https", [])]:
    cls = type("S", (http.server.ThreadingHTTPServer,),
               {"address_family": family(addr), "allow_reuse_address": True, "daemon_threads": True,
                "server_bind": server_bind})
    srv = cls((addr, port), Handler)
    if secure:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    threads.append(threading.Thread(target=srv.serve_forever, daemon=True))

def echo(sock):
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(b"backend=" + NAME.encode() + b"\n" + data, peer)

for addr, port in SPEC["udp"]:
    s = socket.socket(family(addr), socket.SOCK_DGRAM)
    s.bind((addr, port))
    threads.append(threading.Thread(target=echo, args=(s,), daemon=True))

for t in threads:
    t.start()
print("READY", flush=True)
threading.Event().wait()
'''


# --------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Iface:
    """One node-side veth and its bridge-side peer."""
    ns: str                  # netns holding the interface
    name: str                # "eth0" / "eth1"
    ifindex: int             # in ns
    mac: str
    ip4: str
    ip6: str
    plen4: int
    plen6: int
    segment: str             # "a" or "b"
    bridge: str              # "br0" / "br1", in the lab's bridge netns
    peer: str                # bridge-side veth name ("v-c1", "v-lb", "v-lb2", ...)
    peer_ifindex: int        # in the bridge netns
    peer_mac: str
    mtu: int
    extra_ip4: tuple[str, ...] = ()
    extra_ip6: tuple[str, ...] = ()


@dataclass(frozen=True)
class Host:
    """A client, the LB or a backend: one netns with one or two NICs."""
    name: str                # "c1", "lb", "lb2", "router", "b1"
    role: str                # "client" | "lb" | "router" | "backend"
    ns: str
    ifaces: tuple[Iface, ...]
    vips4: tuple[str, ...] = ()     # backends: VIPs held on lo
    vips6: tuple[str, ...] = ()

    @property
    def iface(self) -> Iface:
        return self.ifaces[0]

    @property
    def ifname(self) -> str:
        return self.iface.name

    @property
    def ifindex(self) -> int:
        return self.iface.ifindex

    @property
    def mac(self) -> str:
        return self.iface.mac

    @property
    def ip4(self) -> str:
        return self.iface.ip4

    @property
    def ip6(self) -> str:
        return self.iface.ip6

    @property
    def segment(self) -> str:
        return self.iface.segment

    def addresses(self) -> tuple[str, ...]:
        out: list[str] = []
        for i in self.ifaces:
            out += [i.ip4, i.ip6, *i.extra_ip4, *i.extra_ip6]
        return tuple(out)


def _body_fields(body: str) -> dict[str, str]:
    out = {}
    for line in body.splitlines():
        k, sep, v = line.partition("=")
        if sep and k and k not in out:
            out[k] = v
    return out


@dataclass(frozen=True)
class CurlResult:
    returncode: int          # curl's exit code (0 = transfer done)
    status: int              # HTTP status (0 if none)
    body: str
    stderr: str
    local_ip: str
    local_port: int
    remote_ip: str
    remote_port: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status == 200

    @property
    def fields(self) -> dict[str, str]:
        """The server's ``key=value`` lines: backend, client_ip, client_port, local_ip, ..."""
        return _body_fields(self.body)

    @property
    def backend(self) -> str | None:
        return self.fields.get("backend")


@dataclass(frozen=True)
class UdpReply:
    data: bytes              # b"backend=b1\n" + the payload sent
    peer: tuple[str, int]    # who answered (the VIP for DSR)

    @property
    def backend(self) -> str | None:
        first = self.data.split(b"\n", 1)[0].decode(errors="replace")
        return first.partition("=")[2] if first.startswith("backend=") else None


# --------------------------------------------------------------------------- the lab

class Lab:
    """Build, describe, use and tear down one lab instance.

    Parameters:
      clients, backends   numbers of client and segment-A backend namespaces (>= 1)
      seg_b_backends      > 0 adds the LB's second NIC (``lb_if2``) on segment B
                          with that many backends behind it (for XDP_REDIRECT)
      vips4, vips6        VIPs held on every backend's lo
      http_ports, udp_ports  server ports on every backend (VIPs and own addresses)
      https_ports, tls_cert  HTTPS ports on every backend, with (cert file, key file)
      client_extra_addrs  extra addresses per client (v4 and v6) to vary the source
      mtu                 MTU of the client links
      backend_mtu         MTU of the LB's and backends' links and their bridge ports
                          (None = mtu); raise it so encapsulated full-size packets fit
      decap               a :class:`l4lb.lab.decap.Decap` to use, None for the
                          process-wide shared one, False for no BPF at all (then
                          no decap on backends and no xdp_pass on the LB's peer)
      decap_mode          "native" | "generic" | "auto"
      prime_neighbours    ping LB->backends and clients->LB at start so that
                          neighbour entries exist (bpf_fib_lookup needs them)
      prefix              namespace name prefix (``cleanup(prefix)`` finds leftovers)
      lbs                 LB namespaces on segment A: ``lb`` (.1), ``lb2`` (.2), ... (a tier)
      router              add ``router`` (.254) on segment A: clients route the VIPs via
                          it instead of via ``lb``; forwarding, ECMP hashing on L4
                          (``fib_multipath_hash_policy=1``), no ICMP redirects. What
                          runs on it (a routing daemon) is up to the caller.
      routers             how many such routers (``router``, ``router2`` at .253): the
                          clients route via the first; a second one peers with the
                          same boxes (another routing daemon's view of the tier).
    """

    def __init__(
        self,
        clients: int = 2,
        backends: int = 3,
        *,
        seg_b_backends: int = 0,
        vips4: Sequence[str] = VIPS4,
        vips6: Sequence[str] = VIPS6,
        http_ports: Sequence[int] = HTTP_PORTS,
        udp_ports: Sequence[int] = UDP_PORTS,
        https_ports: Sequence[int] = (),
        tls_cert: tuple[str, str] | None = None,
        client_extra_addrs: int = 0,
        mtu: int = 1500,
        backend_mtu: int | None = None,
        decap: Any = None,
        decap_mode: str = "native",
        prime_neighbours: bool = True,
        prefix: str = PREFIX,
        lbs: int = 1,
        router: bool = False,
        routers: int = 1,
    ):
        if not 1 <= clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be 1..{MAX_CLIENTS}")
        if not 1 <= backends or backends + seg_b_backends > MAX_BACKENDS or seg_b_backends < 0:
            raise ValueError(f"backends must be >= 1 and backends + seg_b_backends <= {MAX_BACKENDS}")
        if not 1 <= lbs <= MAX_LBS:
            raise ValueError(f"lbs must be 1..{MAX_LBS}")
        if clients * client_extra_addrs > 100 or client_extra_addrs < 0:
            raise ValueError("clients * client_extra_addrs must be <= 100")
        for v in vips4:
            if ipaddress.ip_address(v) not in VIP_NET4:
                raise ValueError(f"IPv4 VIP {v} not in {VIP_NET4}")
        for v in vips6:
            if ipaddress.ip_address(v) not in VIP_NET6:
                raise ValueError(f"IPv6 VIP {v} not in {VIP_NET6}")
        self.n_clients = clients
        self.n_backends = backends
        self.n_seg_b = seg_b_backends
        self.vips4 = tuple(vips4)
        self.vips6 = tuple(vips6)
        self.http_ports = tuple(http_ports)
        self.udp_ports = tuple(udp_ports)
        self.https_ports = tuple(https_ports)
        self.tls_cert = tls_cert
        if self.https_ports and tls_cert is None:
            raise ValueError("https_ports need tls_cert=(cert file, key file)")
        self.client_extra_addrs = client_extra_addrs
        self.mtu = mtu
        self.backend_mtu = backend_mtu or mtu
        self._decap_arg = decap
        self.decap_mode = decap_mode
        self.prime_neighbours = prime_neighbours
        self.prefix = prefix
        self.n_lbs = lbs
        self.with_router = router
        if not 1 <= routers <= 2:
            raise ValueError("routers must be 1 or 2")
        self.n_routers = routers if router else 0

        self.tag = secrets.token_hex(3)
        self.bridge_ns = self._ns("br")
        self.hosts: dict[str, Host] = {}
        self.decap: Any = None            # the Decap object in use (None if decap=False)
        self._created: list[str] = []     # namespaces created so far (teardown order)
        self._servers: dict[str, subprocess.Popen] = {}
        self._decap_addrs: list[str] = []
        self._is_up = False
        self._torn_down = False

    # -- names --------------------------------------------------------------
    def _ns(self, name: str) -> str:
        return f"{self.prefix}-{self.tag}-{name}"

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this lab (bridge first)."""
        return [self.bridge_ns] + [h.ns for h in self.hosts.values()] if self.hosts else [self.bridge_ns]

    @property
    def clients(self) -> dict[str, Host]:
        return {n: h for n, h in self.hosts.items() if h.role == "client"}

    @property
    def backends(self) -> dict[str, Host]:
        return {n: h for n, h in self.hosts.items() if h.role == "backend"}

    @property
    def lb(self) -> Host:
        return self.hosts["lb"]

    @property
    def lbs(self) -> dict[str, Host]:
        """Every LB of the lab (one, or a tier): ``lb``, ``lb2``, ..."""
        return {n: h for n, h in self.hosts.items() if h.role == "lb"}

    @property
    def router_ip4(self) -> str:
        return _addr4(NET_A4, ROUTER_HOST)

    @property
    def router_ip6(self) -> str:
        return _addr6(NET_A6, ROUTER_HOST)

    @property
    def router2_ips(self) -> tuple[str, str]:
        """IPv4 and IPv6 address of the second router (``routers=2``)."""
        return _addr4(NET_A4, ROUTER_HOST - 1), _addr6(NET_A6, ROUTER_HOST - 1)

    # LB shortcuts (what a test needs to attach / drive the LB program)
    @property
    def lb_ns(self) -> str:
        return self._ns("lb")

    @property
    def lb_if(self) -> str:
        return NODE_IF

    @property
    def lb_ifindex(self) -> int:
        return self.lb.ifaces[0].ifindex

    @property
    def lb_mac(self) -> str:
        return self.lb.ifaces[0].mac

    @property
    def lb_ip4(self) -> str:
        return self.lb.ifaces[0].ip4

    @property
    def lb_ip6(self) -> str:
        return self.lb.ifaces[0].ip6

    @property
    def lb_peer(self) -> str:
        """Bridge-side peer of the LB's veth (runs xdp_pass), in ``bridge_ns``."""
        return self.lb.ifaces[0].peer

    @property
    def lb_if2(self) -> str | None:
        return NODE_IF_B if self.n_seg_b else None

    @property
    def lb_ifindex2(self) -> int | None:
        return self.lb.ifaces[1].ifindex if self.n_seg_b else None

    @property
    def lb_iface2(self) -> Iface | None:
        return self.lb.ifaces[1] if self.n_seg_b else None

    @property
    def vip4(self) -> str:
        return self.vips4[0]

    @property
    def vip6(self) -> str:
        return self.vips6[0]

    @property
    def backend_addrs(self) -> dict[str, tuple[str, str]]:
        """backend name -> (IPv4, IPv6) of its NIC."""
        return {n: (h.ip4, h.ip6) for n, h in self.backends.items()}

    def backend_by_addr(self, addr: str) -> str:
        a = ipaddress.ip_address(addr)
        for n, h in self.backends.items():
            if a in (ipaddress.ip_address(h.ip4), ipaddress.ip_address(h.ip6)):
                return n
        raise KeyError(addr)

    def host(self, name_or_ns: str | Host) -> Host:
        if isinstance(name_or_ns, Host):
            return name_or_ns
        if name_or_ns in self.hosts:
            return self.hosts[name_or_ns]
        for h in self.hosts.values():
            if h.ns == name_or_ns:
                return h
        raise KeyError(name_or_ns)

    def ns_of(self, name_or_ns: str | Host) -> str:
        if name_or_ns == self.bridge_ns or name_or_ns == "br":
            return self.bridge_ns
        return self.host(name_or_ns).ns

    # -- plan ---------------------------------------------------------------
    def _plan(self) -> list[dict[str, Any]]:
        """Names and addresses of every host (no kernel state)."""
        plan: list[dict[str, Any]] = []

        def nic(name: str, seg: str, host: int, peer: str, mtu: int,
                extra: Iterable[int] = ()) -> dict[str, Any]:
            n4, n6 = (NET_A4, NET_A6) if seg == "a" else (NET_B4, NET_B6)
            return {
                "name": name, "segment": seg, "peer": peer, "mtu": mtu,
                "bridge": BRIDGE_A if seg == "a" else BRIDGE_B,
                "ip4": _addr4(n4, host), "ip6": _addr6(n6, host),
                "plen4": n4.prefixlen, "plen6": n6.prefixlen,
                "extra_ip4": tuple(_addr4(n4, e) for e in extra),
                "extra_ip6": tuple(_addr6(n6, e) for e in extra),
            }

        for i in range(1, self.n_clients + 1):
            k = self.client_extra_addrs
            extra = [CLIENT_EXTRA_BASE + (i - 1) * k + j for j in range(1, k + 1)]
            plan.append({"name": f"c{i}", "role": "client",
                         "nics": [nic(NODE_IF, "a", CLIENT_BASE + i, f"v-c{i}", self.mtu, extra)]})
        lb_nics = [nic(NODE_IF, "a", 1, "v-lb", self.backend_mtu)]
        if self.n_seg_b:
            lb_nics.append(nic(NODE_IF_B, "b", 1, "v-lb2", self.backend_mtu))
        plan.append({"name": "lb", "role": "lb", "nics": lb_nics})
        for k in range(2, self.n_lbs + 1):
            plan.append({"name": f"lb{k}", "role": "lb", "nics": [nic(NODE_IF, "a", k, f"v-lb{k}", self.backend_mtu)]})
        for k in range(1, self.n_routers + 1):
            plan.append({"name": "router" if k == 1 else f"router{k}", "role": "router",
                         "nics": [nic(NODE_IF, "a", ROUTER_HOST + 1 - k, "v-rt" if k == 1 else f"v-rt{k}", self.backend_mtu)]})
        for j in range(1, self.n_backends + self.n_seg_b + 1):
            seg = "a" if j <= self.n_backends else "b"
            plan.append({"name": f"b{j}", "role": "backend",
                         "nics": [nic(NODE_IF, seg, BACKEND_BASE + j, f"v-b{j}", self.backend_mtu)]})
        return plan

    # -- bring-up -------------------------------------------------------------
    def up(self) -> "Lab":
        """Create everything; on any failure tear down what was made and re-raise."""
        if self._is_up:
            return self
        if self._torn_down:
            raise RuntimeError("a torn-down Lab cannot be brought up again; make a new one")
        netns.claim(self.tag)
        atexit.register(self.teardown)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        self._is_up = True
        return self

    def _add_ns(self, ns: str, sysctls: dict[str, Any]) -> None:
        netns.add(ns)
        self._created.append(ns)
        netns.sysctl(ns, sysctls)

    def _build(self) -> None:
        plan = self._plan()
        common6 = {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                   "net.ipv6.conf.all.accept_ra": 0, "net.ipv6.conf.default.accept_ra": 0}

        # bridge netns: no IPv6 on the bridge and its ports, no multicast snooping
        self._add_ns(self.bridge_ns, {"net.ipv6.conf.all.disable_ipv6": 1,
                                      "net.ipv6.conf.default.disable_ipv6": 1})
        bridges = [BRIDGE_A] + ([BRIDGE_B] if self.n_seg_b else [])
        br_cmds = [f"link add {b} type bridge mcast_snooping 0" for b in bridges]
        br_cmds += [f"link set {b} up" for b in bridges]

        for h in plan:
            ns = self._ns(h["name"])
            s: dict[str, Any] = dict(common6)
            s.update({"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0})
            if h["role"] in ("lb", "router"):
                s.update({"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1,
                          "net.ipv6.conf.default.forwarding": 1})
            if h["role"] == "router":  # one-armed: clients and LBs share its segment
                s.update({"net.ipv4.fib_multipath_hash_policy": 1, "net.ipv6.fib_multipath_hash_policy": 1,
                          "net.ipv4.conf.all.send_redirects": 0, "net.ipv4.conf.default.send_redirects": 0})
            if h["role"] == "client":
                s.update({"net.ipv4.conf.all.accept_redirects": 0, "net.ipv6.conf.all.accept_redirects": 0,
                          "net.ipv4.conf.default.accept_redirects": 0, "net.ipv6.conf.default.accept_redirects": 0})
            if h["role"] == "backend":
                s.update({"net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.default.arp_ignore": 1,
                          "net.ipv4.conf.all.arp_announce": 2, "net.ipv4.conf.default.arp_announce": 2})
            self._add_ns(ns, s)
            for n in h["nics"]:
                br_cmds.append(f"link add {n['peer']} mtu {n['mtu']} type veth peer name {n['name']} "
                               f"netns {ns} mtu {n['mtu']}")
                br_cmds.append(f"link set {n['peer']} master {n['bridge']} up")
        netns.ip_batch(self.bridge_ns, br_cmds)

        for h in plan:
            ns = self._ns(h["name"])
            cmds = []
            for n in h["nics"]:
                cmds.append(f"addr add {n['ip4']}/{n['plen4']} dev {n['name']}")
                cmds.append(f"addr add {n['ip6']}/{n['plen6']} dev {n['name']} nodad")
                for a in n["extra_ip4"]:
                    cmds.append(f"addr add {a}/{n['plen4']} dev {n['name']}")
                for a in n["extra_ip6"]:
                    cmds.append(f"addr add {a}/{n['plen6']} dev {n['name']} nodad")
                cmds.append(f"link set {n['name']} up")
            if h["role"] == "client":
                gw4, gw6 = (self.router_ip4, self.router_ip6) if self.with_router else (LB_IP4, LB_IP6)
                cmds.append(f"route add {VIP_NET4} via {gw4}")
                cmds.append(f"route add {VIP_NET6} via {gw6}")
                cmds.append(f"route add {NET_B4} via {LB_IP4}")
                cmds.append(f"route add {NET_B6} via {LB_IP6}")
            if h["role"] == "backend":
                for v in self.vips4:
                    cmds.append(f"addr add {v}/32 dev lo")
                for v in self.vips6:
                    cmds.append(f"addr add {v}/128 dev lo nodad")
                if h["nics"][0]["segment"] == "b":   # replies to clients go through the LB
                    cmds.append(f"route add default via {LB_B_IP4}")
                    cmds.append(f"route add ::/0 via {LB_B_IP6}")
            netns.ip_batch(ns, cmds)
            if h["role"] == "backend":
                netns.sysctl(ns, {"net.ipv4.conf.eth0.rp_filter": 0, "net.ipv4.conf.lo.rp_filter": 0,
                                  "net.ipv4.conf.eth0.arp_ignore": 1, "net.ipv4.conf.eth0.arp_announce": 2})
            if h["role"] in ("client", "backend"):
                for n in h["nics"]:
                    netns.run(ns, "ethtool", "-K", n["name"], "tx", "off")

        self._collect(plan)

        if self._decap_arg is not False:
            from l4lb.lab.decap import Decap

            self.decap = self._decap_arg if self._decap_arg is not None else Decap.shared()
            for nic in (n for lb in self.lbs.values() for n in lb.ifaces):
                self.decap.attach_pass(self.bridge_ns, nic.peer, self.decap_mode)
            for b in self.backends.values():
                for a in (b.ip4, b.ip6):
                    self.decap.add_address(a)
                    self._decap_addrs.append(a)
                self.decap.attach(b.ns, b.ifname, self.decap_mode)

        self._start_servers()
        if self.prime_neighbours:
            self._prime()

    def _collect(self, plan: list[dict[str, Any]]) -> None:
        def links(ns: str) -> dict[str, dict[str, Any]]:
            data = json.loads(netns.ip(ns, "-j", "link", "show").stdout)
            return {d["ifname"]: d for d in data}

        br = links(self.bridge_ns)
        for h in plan:
            ns = self._ns(h["name"])
            mine = links(ns)
            ifaces = []
            for n in h["nics"]:
                li, pi = mine[n["name"]], br[n["peer"]]
                ifaces.append(Iface(
                    ns=ns, name=n["name"], ifindex=li["ifindex"], mac=li["address"],
                    ip4=n["ip4"], ip6=n["ip6"], plen4=n["plen4"], plen6=n["plen6"],
                    segment=n["segment"], bridge=n["bridge"], peer=n["peer"],
                    peer_ifindex=pi["ifindex"], peer_mac=pi["address"], mtu=li["mtu"],
                    extra_ip4=n["extra_ip4"], extra_ip6=n["extra_ip6"]))
            backend = h["role"] == "backend"
            self.hosts[h["name"]] = Host(
                name=h["name"], role=h["role"], ns=ns, ifaces=tuple(ifaces),
                vips4=self.vips4 if backend else (), vips6=self.vips6 if backend else ())

    def stop_server(self, name: str) -> None:
        """Stop backend ``name``'s servers (HTTP, HTTPS, UDP echo): its addresses stay."""
        netns.stop(self._servers.pop(name))

    def start_server(self, name: str) -> None:
        """Start backend ``name``'s servers again (returns once they listen)."""
        self._start_servers([name])

    def _start_servers(self, names: Sequence[str] | None = None, timeout: float = 10.0) -> None:
        sel = selectors.DefaultSelector()
        for b in self.backends.values():
            if names is not None and b.name not in names:
                continue
            addrs = [*self.vips4, *self.vips6, b.ip4, b.ip6]
            spec: dict[str, Any] = {"http": [[a, p] for a in addrs for p in self.http_ports],
                                    "udp": [[a, p] for a in addrs for p in self.udp_ports]}
            if self.https_ports and self.tls_cert:
                spec.update(https=[[a, p] for a in addrs for p in self.https_ports],
                            cert=self.tls_cert[0], key=self.tls_cert[1])
            p = netns.popen(b.ns, sys.executable, "-I", "-c", SERVER, b.name, json.dumps(spec),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self._servers[b.name] = p
            sel.register(p.stdout, selectors.EVENT_READ, b.name)
        waiting = set(names if names is not None else self._servers)
        deadline = time.monotonic() + timeout
        try:
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise netns.NetnsError(f"servers did not start in {timeout}s: {sorted(waiting)}")
                for key, _ in sel.select(left):
                    name = key.data
                    line = key.fileobj.readline()
                    sel.unregister(key.fileobj)
                    if line.strip() != b"READY":
                        p = self._servers[name]
                        err = p.stderr.read().decode(errors="replace") if p.poll() is not None else ""
                        raise netns.NetnsError(f"server on {name} failed: {line!r} {err.strip()}")
                    waiting.discard(name)
        finally:
            sel.close()

    def _prime(self, timeout: float = 3.0) -> None:
        """Resolve the neighbours the traffic will need, so that tests see no
        ARP/ND broadcasts later (they are flooded to every port, the LB's too):
        LB -> backends, clients -> LB, backends -> every client address."""
        procs = []
        for b in self.backends.values():
            for a in (b.ip4, b.ip6):
                for lb in self.lbs.values():
                    procs.append(netns.popen(lb.ns, "ping", "-c1", "-W2", "-q", a,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        gateways = (LB_IP4, LB_IP6) + ((self.router_ip4, self.router_ip6) if self.with_router else ())
        for c in self.clients.values():
            for a in gateways:
                procs.append(netns.popen(c.ns, "ping", "-c1", "-W2", "-q", a,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        targets = [a for c in self.clients.values() for a in c.addresses()]

        def poke() -> None:
            # one empty datagram to the discard port of every client address makes
            # the kernel resolve it (the client answers with ICMP port unreachable)
            for a in targets:
                fam = socket.AF_INET6 if ":" in a else socket.AF_INET
                with socket.socket(fam, socket.SOCK_DGRAM) as s:
                    try:
                        s.sendto(b"", (a, 9))
                    except OSError:
                        pass

        for b in self.backends.values():
            netns.call_in_netns(b.ns, poke)
        for p in procs:
            p.wait(timeout=10)
        deadline = time.monotonic() + timeout
        pending = list(self.backends.values())
        while pending and time.monotonic() < deadline:
            still = []
            for b in pending:
                neigh = json.loads(netns.ip(b.ns, "-j", "neigh", "show").stdout or "[]")
                if any("INCOMPLETE" in (n.get("state") or []) for n in neigh):
                    still.append(b)
            pending = still
            if pending:
                time.sleep(0.05)

    # -- teardown -----------------------------------------------------------
    def teardown(self) -> None:
        """Stop servers, delete every namespace of this lab.  Idempotent, never raises
        for things already gone."""
        if self._torn_down:
            return
        self._torn_down = True
        errors = []
        for p in self._servers.values():
            try:
                netns.stop(p)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        self._servers.clear()
        if self.decap is not None:
            for a in self._decap_addrs:
                try:
                    self.decap.remove_address(a)
                except Exception as e:  # noqa: BLE001
                    errors.append(e)
            self._decap_addrs.clear()
        # everything carrying the tag, even namespaces made by a half-finished _build
        names = set(self._created) | set(netns.list_netns(f"{self.prefix}-{self.tag}-"))
        for ns in sorted(names, key=lambda n: n != self.bridge_ns):
            try:
                netns.delete(ns)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        netns.release(self.tag)
        try:
            atexit.unregister(self.teardown)
        except Exception:  # noqa: BLE001
            pass
        self._is_up = False
        if errors:
            raise netns.NetnsError(f"teardown of lab {self.tag}: {errors}")

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        self.teardown()

    # -- using the lab --------------------------------------------------------
    def run(self, where: str | Host, *cmd: Any, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command in a host's netns (``where`` = host name, Host, netns name or "br")."""
        return netns.run(self.ns_of(where), *cmd, check=check, timeout=timeout)

    def popen(self, where: str | Host, *cmd: Any, **kwargs: Any) -> subprocess.Popen:
        return netns.popen(self.ns_of(where), *cmd, **kwargs)

    def call(self, where: str | Host, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a Python callable inside a host's netns (see :func:`netns.call_in_netns`)."""
        return netns.call_in_netns(self.ns_of(where), fn, *args, **kwargs)

    def ping(self, where: str | Host, addr: str, count: int = 1, timeout: float = 2) -> bool:
        cp = self.run(where, "ping", "-c", count, "-W", timeout, "-q", addr, check=False,
                      timeout=count * timeout + 5)
        return cp.returncode == 0

    def curl(self, client: str | Host, url: str, *, source: str | None = None,
             local_port: int | tuple[int, int] | None = None, timeout: float = 5.0,
             args: Sequence[str] = ()) -> CurlResult:
        """Run the real ``curl`` in a client's netns.

        ``source``: a source address of that client (``--interface``; pick one of
        ``host.addresses()``); ``local_port``: a port or (lo, hi) range
        (``--local-port``).  Never raises on a failed transfer: check ``.ok``.
        """
        marker = "\n@@l4lb-lab@@"
        cmd = ["curl", "-sS", "-g", "--noproxy", "*", "--max-time", str(timeout),
               "-o", "-", "-w", marker + "%{http_code} %{local_ip} %{local_port} %{remote_ip} %{remote_port}"]
        if source:
            cmd += ["--interface", source]
        if local_port is not None:
            lp = local_port if isinstance(local_port, int) else f"{local_port[0]}-{local_port[1]}"
            cmd += ["--local-port", str(lp)]
        cmd += [*args, url]
        cp = self.run(client, *cmd, check=False, timeout=timeout + 10)
        body, _, tail = cp.stdout.rpartition(marker)
        if not _:
            body, tail = cp.stdout, ""
        parts = tail.split()
        parts += [""] * (5 - len(parts))

        def num(s: str) -> int:
            return int(s) if s.isdigit() else 0

        return CurlResult(returncode=cp.returncode, status=num(parts[0]), body=body, stderr=cp.stderr,
                          local_ip=parts[1], local_port=num(parts[2]), remote_ip=parts[3],
                          remote_port=num(parts[4]))

    def url(self, addr: str, port: int = HTTP_PORT, path: str = "/") -> str:
        host = f"[{addr}]" if ":" in addr else addr
        return f"http://{host}:{port}{path}"

    def udp(self, client: str | Host, addr: str, payload: bytes = b"ping", *,
            port: int = UDP_PORT, source: str | None = None, sport: int = 0,
            timeout: float = 2.0) -> UdpReply | None:
        """Send one UDP datagram from a client's netns and wait for the echo (None on timeout)."""
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET

        def go() -> UdpReply | None:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                if source or sport:
                    s.bind((source or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), sport))
                s.sendto(payload, (addr, port))
                try:
                    data, peer = s.recvfrom(65535)
                except socket.timeout:
                    return None
                return UdpReply(data, (peer[0], peer[1]))

        return self.call(client, go)

    def xdp_prog_id(self, where: str | Host, ifname: str) -> int | None:
        """Id of the XDP program attached to ``ifname`` in that netns (None if none)."""
        info = netns.link_info(self.ns_of(where), ifname)
        xdp = info.get("xdp") or {}
        if "prog" in xdp:
            return int(xdp["prog"]["id"])
        for a in xdp.get("attached", []):
            if "prog" in a:
                return int(a["prog"]["id"])
        return None

    def describe(self) -> dict[str, Any]:
        """Everything about the lab as plain JSON-able data."""
        return {
            "tag": self.tag, "bridge_ns": self.bridge_ns, "lb_ns": self.lb_ns, "lb_if": self.lb_if,
            "lb_ifindex": self.lb_ifindex, "lb_if2": self.lb_if2, "lb_ifindex2": self.lb_ifindex2,
            "vips4": list(self.vips4), "vips6": list(self.vips6),
            "http_ports": list(self.http_ports), "udp_ports": list(self.udp_ports),
            "hosts": {n: asdict(h) for n, h in self.hosts.items()},
        }


def build_lab(**kwargs: Any) -> Lab:
    """``Lab(**kwargs).up()``."""
    return Lab(**kwargs).up()


# --------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import signal

    ap = argparse.ArgumentParser(prog="python -m l4lb.lab.topology")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="bring a lab up, print it as JSON, wait for Ctrl-C/TERM")
    u.add_argument("--clients", type=int, default=2)
    u.add_argument("--backends", type=int, default=3)
    u.add_argument("--seg-b-backends", type=int, default=0)
    u.add_argument("--backend-mtu", type=int, default=None)
    u.add_argument("--prefix", default=PREFIX)
    c = sub.add_parser("cleanup", help="remove namespaces of dead lab runs")
    c.add_argument("--prefix", default=PREFIX)
    c.add_argument("--force", action="store_true", help="also remove labs whose owner still runs")
    a = ap.parse_args(argv)
    if a.cmd == "cleanup":
        for ns in netns.cleanup(a.prefix, force=a.force):
            print(f"removed {ns}")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Lab(a.clients, a.backends, seg_b_backends=a.seg_b_backends,
             backend_mtu=a.backend_mtu, prefix=a.prefix) as lab:
        print(json.dumps(lab.describe(), indent=2), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
