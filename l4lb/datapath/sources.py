"""The LB's own source address towards many destinations, from the kernel, cheaply.

Tunnel health probes bind the LB's address towards their backend (see
l4lb/datapath/probes.py). That used to be one ``ip route get`` per backend
over pyroute2: a netlink round trip plus a Python parse of the answer, about
0.5 ms each, half a minute for 65,535 backends. Here, per address, a UDP
socket of its family is connected to it and asked for its own address
(``getsockname``), then disconnected again: three system calls, about 10 µs,
and no packet is sent (a UDP connect only chooses the route and source).

Why the answer is the one ``ip route get ADDR`` gives:

* both are the kernel's own output route lookup with the same keys: no mark
  (the probes' fwmark rule does not match, exactly as for ``route get``), no
  bound interface, TOS 0, the caller's uid, through the policy rules and
  every table they name;
* the source is then chosen by the same kernel code: IPv4 the route's
  ``src`` (prefsrc), else the interface's primary address for that next hop
  (``inet_select_addr``); IPv6 the route's ``src``, else RFC 6724 source
  selection (``ipv6_dev_get_saddr``: deprecated addresses avoided, longest
  matching prefix, ...);
* blackhole, unreachable, prohibit and throw-to-nothing routes, and no route
  at all, make the connect fail (EINVAL, EHOSTUNREACH, EACCES, ENETUNREACH)
  where ``route get`` answers the same errors: both give None here.

Where it could differ: the socket's lookup also carries protocol UDP and a
destination port (9), which ``route get`` leaves out; only policy rules
selecting on ``ipproto``/``sport``/``dport`` see a difference (such a rule
would send the probes' own TCP packets elsewhere anyway).

The disconnect matters: a connected UDP socket keeps its source address
across a second ``connect``, so without ``connect(AF_UNSPEC)`` in between
every address after the first would get the first one's source. Python's
``socket.connect`` has no AF_UNSPEC form: libc's ``connect`` is called on the
descriptor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
from collections.abc import Iterable

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_UNSPEC = ctypes.create_string_buffer(16)   # a struct sockaddr whose sa_family is AF_UNSPEC (0)
PORT = 9   # any port will do: nothing is sent (discard, should a rule select on ports)


def sources_towards(addresses: Iterable[str]) -> dict[str, str | None]:
    """Address -> the LB's own address the kernel would send from towards it
    (None: no route, or a blackhole/unreachable/prohibit one). Addresses are
    IPv4 or IPv6 text; the answers are canonical text (``getsockname``)."""
    out: dict[str, str | None] = {}
    socks: dict[int, socket.socket] = {}
    try:
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            s = socks.get(family)
            if s is None:
                s = socks[family] = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                s.connect((address, PORT))
            except OSError:
                out[address] = None   # no route (the socket stays unconnected)
                continue
            out[address] = s.getsockname()[0]
            if _libc.connect(s.fileno(), _UNSPEC, len(_UNSPEC)) != 0:   # dissolve: the next connect chooses afresh
                raise OSError(ctypes.get_errno(), "source lookup: cannot disconnect a UDP socket")
    finally:
        for s in socks.values():
            s.close()
    return out
