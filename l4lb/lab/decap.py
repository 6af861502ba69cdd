"""Load ``bpf_src/decap.c`` with BCC and attach it to lab backends.

One compiled object serves any number of backends in any namespaces: a BPF
program is not tied to a network namespace, only its attachment is.  The
object's ``decap_addrs`` map lists the outer destinations to decapsulate (all
backends' own addresses) and counts packets per address, so a test can tell
which backend decapsulated what.  Compiling takes a few seconds, hence
:meth:`Decap.shared` (one object per process, address registrations are
reference-counted).
"""

from __future__ import annotations

import ctypes as ct
import importlib.resources
import ipaddress
import socket
import threading
from typing import Any

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


def source_text() -> str:
    return (importlib.resources.files("l4lb.bpf_src") / "decap.c").read_text()


def _key_bytes(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    a = ipaddress.ip_address(addr)
    if a.version == 4:
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed).packed
    return a.packed


class Decap:
    """The backend decapsulator (``xdp_decap``) and the ``xdp_pass`` program."""

    _shared: "Decap | None" = None
    _shared_lock = threading.Lock()

    def __init__(self, cflags: tuple[str, ...] = ()):
        from bcc import BPF  # imported late: the pure helpers above need no bcc

        self._BPF = BPF
        self.bpf = BPF(text=source_text().encode(), cflags=list(cflags))
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


def ifindex_in(ns: str, ifname: str) -> int:
    return netns.call_in_netns(ns, socket.if_nametoindex, ifname)
