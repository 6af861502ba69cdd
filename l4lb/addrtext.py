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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

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


def exploded_rows(addrs: "np.ndarray", v4: "np.ndarray") -> list[str]:
    """Exploded texts of many addresses at once (a restart reads 100,000 backend
    slots back): ``addrs`` (n, 16) bytes, an IPv4 address in the first 4 of its row
    where ``v4`` (n booleans) says so. The IPv6 texts are formatted by numpy in one
    pass (hex digits and colons for all rows, then one decode), not per address."""
    import numpy as np  # here: l4lb.models (and so the CLI) imports this module

    hexdigits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    addrs = np.ascontiguousarray(addrs, dtype=np.uint8).reshape(len(addrs), 16)
    v4 = np.asarray(v4, dtype=bool)
    out: list[str] = [""] * len(addrs)
    rows4 = np.flatnonzero(v4).tolist()
    if rows4:
        raw4 = addrs[v4, :4].tobytes()
        for j, i in enumerate(rows4):
            out[i] = socket.inet_ntoa(raw4[4 * j:4 * j + 4])
    rows6 = np.flatnonzero(~v4).tolist()
    if rows6:
        a = addrs[~v4].reshape(len(rows6), 8, 2)
        chars = np.full((len(rows6), 8, 5), ord(":"), dtype=np.uint8)  # 8 groups: 4 digits and a colon
        chars[:, :, 0], chars[:, :, 1] = hexdigits[a[:, :, 0] >> 4], hexdigits[a[:, :, 0] & 15]
        chars[:, :, 2], chars[:, :, 3] = hexdigits[a[:, :, 1] >> 4], hexdigits[a[:, :, 1] & 15]
        text = chars.tobytes().decode("ascii")
        for j, i in enumerate(rows6):
            out[i] = text[40 * j:40 * j + 39]
    return out
