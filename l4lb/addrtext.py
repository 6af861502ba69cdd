"""Address texts, fast: the exploded form (the datapath's and Maglev's
spelling of a backend identity) to and from addresses and packed bytes.

The standard library's ipaddress formats and parses IPv6 in Python at
~10-20 µs an address; a restart at 100,000 IPv6 backends did that several
times per backend. These do the same in a hex conversion; tests compare them
with ipaddress on many addresses.
"""

from __future__ import annotations

import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def exploded_packed(packed: bytes) -> str:
    """Exploded text of a 4- or 16-byte address."""
    if len(packed) == 4:
        return socket.inet_ntoa(packed)
    h = packed.hex()
    return f"{h[0:4]}:{h[4:8]}:{h[8:12]}:{h[12:16]}:{h[16:20]}:{h[20:24]}:{h[24:28]}:{h[28:32]}"


def exploded(addr: IPAddress) -> str:
    return addr.exploded if addr.version == 4 else exploded_packed(addr.packed)


def from_exploded(text: str) -> IPAddress:
    """The address of an exploded text (any other spelling is parsed the slow way)."""
    if len(text) == 39 and text[4] == ":":
        try:
            return ipaddress.IPv6Address(int(text.replace(":", ""), 16))
        except ValueError:
            pass
    return ipaddress.ip_address(text)
