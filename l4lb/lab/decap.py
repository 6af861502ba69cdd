"""Load ``bpf_src/decap.c`` with BCC and attach it to lab backends.

One compiled object serves any number of backends in any namespaces: a BPF
program is not tied to a network namespace, only its attachment is.  The
object's ``decap_addrs`` map lists the outer destinations to decapsulate (all
backends' own addresses) and counts packets per address, so a test can tell
which backend decapsulated what.  Compiling takes a few seconds, hence
:meth:`Decap.shared` (one object per process, address registrations are
reference-counted).

The same object holds ``tc_reply_sport``, the backend half of L4 DNAT: a tc
egress program that gives DSR replies from a VIP the service port back
(what a real backend does with a stateless nftables rule).  See
:class:`ReplyRewrite` and :meth:`Decap.reply_port_rewrite`.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket
import threading
from dataclasses import dataclass
from typing import Any, Iterable

from l4lb.datapath.source import compile_bpf
from l4lb.lab import netns

# indices of decap_stats (keep in sync with bpf_src/decap.c)
DECAP_V4 = 0
DECAP_V6 = 1
DECAP_NOT_LOCAL = 2
DECAP_UNSUPPORTED = 3
DECAP_ERROR = 4
STAT_NAMES = ("decap_v4", "decap_v6", "not_local", "unsupported", "error")

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
_MODES = {"auto": 0, "native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


def _mode_flags(mode: str) -> int:
    try:
        return _MODES[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, not {mode!r}") from None


def _key_bytes(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    a = ipaddress.ip_address(addr)
    if a.version == 4:
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed).packed
    return a.packed


_PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


@dataclass(frozen=True)
class ReplyRewrite:
    """Replies from ``vip`` with source port ``backend_port`` leave with ``service_port``.

    The backend half of an ``l4_dnat`` service ``vip:service_port`` whose
    backends serve on ``backend_port``.  ``vip`` is normalised (``str`` of the
    address); bad input raises ``ValueError``.
    """

    vip: str
    backend_port: int
    service_port: int
    proto: str = "tcp"

    def __post_init__(self) -> None:
        try:
            vip = ipaddress.ip_address(self.vip)
        except ValueError:
            raise ValueError(f"vip must be an IP address, not {self.vip!r}") from None
        for name in ("backend_port", "service_port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
                raise ValueError(f"{name} must be an integer 1..65535, not {v!r}")
        if self.proto not in _PROTOS:
            raise ValueError(f"proto must be one of {sorted(_PROTOS)}, not {self.proto!r}")
        object.__setattr__(self, "vip", str(vip))

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.vip).version


class Decap:
    """The backend decapsulator (``xdp_decap``) and the ``xdp_pass`` program."""

    _shared: "Decap | None" = None
    _shared_lock = threading.Lock()

    def __init__(self, cflags: tuple[str, ...] = ()):
        from bcc import BPF  # imported late: the pure helpers above need no bcc

        self._BPF = BPF
        self.bpf = compile_bpf("decap.c", cflags)
        self.fn_decap = self.bpf.load_func(b"xdp_decap", BPF.XDP)
        self.fn_pass = self.bpf.load_func(b"xdp_pass", BPF.XDP)
        self._addrs = self.bpf[b"decap_addrs"]
        self._stats = self.bpf[b"decap_stats"]
        self._refs: dict[bytes, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> "Decap":
        """One compiled object per process (compiling costs ~2.5 s)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    # -- addresses ------------------------------------------------------------
    def _key(self, addr: Any) -> Any:
        k = self._addrs.Key()
        ct.memmove(ct.byref(k), _key_bytes(addr), 16)
        return k

    def add_address(self, addr: Any) -> None:
        """Decapsulate packets whose outer destination is ``addr`` (its counter starts at 0)."""
        kb = _key_bytes(addr)
        with self._lock:
            n = self._refs.get(kb, 0)
            if n == 0:
                self._addrs[self._key(addr)] = self._addrs.Leaf()
            self._refs[kb] = n + 1

    def remove_address(self, addr: Any) -> None:
        kb = _key_bytes(addr)
        with self._lock:
            n = self._refs.get(kb, 0)
            if n <= 1:
                self._refs.pop(kb, None)
                try:
                    del self._addrs[self._key(addr)]
                except KeyError:
                    pass
            else:
                self._refs[kb] = n - 1

    def count_for(self, addr: Any) -> int:
        """Packets decapsulated for outer destination ``addr`` (summed over CPUs)."""
        try:
            return int(self._addrs.sum(self._key(addr)).value)
        except KeyError:
            return 0

    def stats(self) -> dict[str, int]:
        """Global counters (process-wide when the object is shared: compare deltas)."""
        out = {}
        for i, name in enumerate(STAT_NAMES):
            out[name] = int(self._stats.sum(self._stats.Key(i)).value)
        return out

    # -- attach ---------------------------------------------------------------
    def _attach(self, fn: Any, ns: str, ifname: str, mode: str) -> None:
        netns.call_in_netns(ns, self._BPF.attach_xdp, ifname.encode(), fn, _mode_flags(mode))

    def attach(self, ns: str, ifname: str, mode: str = "native") -> None:
        """Attach ``xdp_decap`` to ``ifname`` inside netns ``ns``."""
        self._attach(self.fn_decap, ns, ifname, mode)

    def attach_pass(self, ns: str, ifname: str, mode: str = "native") -> None:
        """Attach the plain ``xdp_pass`` program to ``ifname`` inside netns ``ns``."""
        self._attach(self.fn_pass, ns, ifname, mode)

    def detach(self, ns: str, ifname: str, mode: str = "native") -> None:
        """Remove the XDP program from ``ifname`` inside ``ns`` (never the caller's namespace)."""
        netns.call_in_netns(ns, self._BPF.remove_xdp, ifname.encode(), _mode_flags(mode))

    # -- reply source-port rewrite (tc egress, L4 DNAT) ----------------------------
    def _rw_state(self) -> tuple[Any, Any]:
        """The tc program and its map, loaded on first use (older callers never pay)."""
        with self._lock:
            if getattr(self, "_fn_reply", None) is None:
                self._fn_reply = self.bpf.load_func(b"tc_reply_sport", self._BPF.SCHED_CLS)
                self._rw_map = self.bpf[b"reply_rewrites"]
                self._rw_refs: dict[ReplyRewrite, int] = {}
                self._rw_ifaces: dict[tuple[str, str], list[ReplyRewrite]] = {}
            return self._fn_reply, self._rw_map

    @staticmethod
    def _rw_key(m: Any, rule: ReplyRewrite) -> Any:
        k = m.Key()
        k.family = rule.family
        k.proto = _PROTOS[rule.proto]
        k.port = socket.htons(rule.backend_port)
        ct.memmove(ct.byref(k, type(k).addr.offset), _key_bytes(rule.vip), 16)
        return k

    def reply_port_rewrite(self, ns: str, ifname: str, rules: Iterable[ReplyRewrite]) -> None:
        """Rewrite the source port of replies leaving ``ifname`` (in netns ``ns``).

        Attaches ``tc_reply_sport`` to the egress of ``ifname`` (a clsact qdisc
        and one direct-action bpf filter; once per interface) and adds
        ``rules``.  The rules live in the object's one map, so they act on every
        interface it is attached to; a rule is reference-counted per interface.
        A rule whose (VIP, proto, backend port) is already mapped to another
        service port is refused with ``ValueError`` and nothing changes.
        """
        fn, m = self._rw_state()
        rules = list(rules)
        for r in rules:
            if not isinstance(r, ReplyRewrite):
                raise TypeError(f"rules must be ReplyRewrite, not {type(r).__name__}")
        where = (ns, ifname)
        with self._lock:
            wanted: dict[tuple, ReplyRewrite] = {}
            for r in [*self._rw_refs, *rules]:
                ident = (r.vip, r.proto, r.backend_port)
                other = wanted.setdefault(ident, r)
                if other.service_port != r.service_port:
                    raise ValueError(f"conflicting reply rewrites for {r.proto} {r.vip} port "
                                     f"{r.backend_port}: {other.service_port} and {r.service_port}")
            attach = where not in self._rw_ifaces
            if attach:
                netns.call_in_netns(ns, _tc_attach_egress, ifname, fn.fd, fn.name.decode())
                self._rw_ifaces[where] = []
            for r in rules:
                n = self._rw_refs.get(r, 0)
                if n == 0:
                    v = m.Leaf()
                    v.port = socket.htons(r.service_port)
                    m[self._rw_key(m, r)] = v
                self._rw_refs[r] = n + 1
                self._rw_ifaces[where].append(r)

    def remove_reply_port_rewrite(self, ns: str, ifname: str) -> None:
        """Detach ``tc_reply_sport`` from ``ifname`` and drop that interface's rules.

        Unknown interfaces are ignored; a namespace or link that is already gone
        only drops the rules."""
        self._rw_state()
        with self._lock:
            rules = self._rw_ifaces.pop((ns, ifname), None)
            if rules is None:
                return
            for r in rules:
                n = self._rw_refs.get(r, 0)
                if n <= 1:
                    self._rw_refs.pop(r, None)
                    try:
                        del self._rw_map[self._rw_key(self._rw_map, r)]
                    except KeyError:
                        pass
                else:
                    self._rw_refs[r] = n - 1
            if netns.exists(ns):
                netns.call_in_netns(ns, _tc_detach_egress, ifname)

    def reply_rewrite_packets(self, rule: ReplyRewrite) -> int:
        """Packets rewritten by ``rule`` so far (0 if it is not installed)."""
        try:
            m = self._rw_state()[1]
            return int(m[self._rw_key(m, rule)].packets)
        except KeyError:
            return 0

    @property
    def reply_prog_fd(self) -> int:
        """fd of ``tc_reply_sport`` (for BPF_PROG_TEST_RUN; loads it on first use)."""
        return int(self._rw_state()[0].fd)

    @property
    def prog_id(self) -> int:
        return _prog_id(self.fn_decap.fd)

    @property
    def pass_prog_id(self) -> int:
        return _prog_id(self.fn_pass.fd)


def _prog_id(fd: int) -> int:
    # /proc/self/fdinfo/<fd> of a BPF program fd has "prog_id:\t<id>"
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("prog_id:"):
                return int(line.split()[1])
    raise RuntimeError(f"fd {fd} is not a BPF program")


def _tc_attach_egress(ifname: str, fd: int, name: str) -> None:
    """In the current thread's netns: our direct-action bpf filter on ``ifname``'s egress."""
    from pyroute2 import IPRoute

    from l4lb.datapath.netlink import tc_attach_egress

    with IPRoute() as ipr:
        tc_attach_egress(ipr, _ifindex(ipr, ifname), fd, name)


def _tc_detach_egress(ifname: str) -> None:
    """Remove our egress filter from ``ifname`` (the clsact qdisc stays: others may use it)."""
    from pyroute2 import IPRoute

    from l4lb.datapath.netlink import tc_detach_egress

    with IPRoute() as ipr:
        try:
            idx = _ifindex(ipr, ifname)
        except LookupError:
            return
        tc_detach_egress(ipr, idx)


def _ifindex(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LookupError(f"no interface {ifname!r}")
    return int(found[0])


def ifindex_in(ns: str, ifname: str) -> int:
    return netns.call_in_netns(ns, socket.if_nametoindex, ifname)
