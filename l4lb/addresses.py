"""Which addresses can be a VIP or a backend, and in words why not. Pure.

A VIP must be an address clients can reach through this box, and a backend one
an encapsulated packet can be routed to: no loopback, link-local, multicast,
broadcast, unspecified or reserved address, no IPv4-mapped IPv6 form of an
IPv4 address (it would be a second name for the same backend), and no zone
index (``fe80::1%eth0``), which only has a meaning on one host. The
documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32) are ordinary unicast here.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")          # RFC 1122 "this host on this network"
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def unusable(addr: IPAddress) -> str | None:
    """Why ``addr`` can be neither a VIP nor a backend; None when it can be either."""
    # IPv6 global unicast (2000::/3) is none of the classes below: decided by
    # its top bits. A document of 100,000 distinct IPv6 backends spent a second
    # in ipaddress's class properties and in the cache, whose keys collide
    # (IPv6Address hashes of structured addresses fold into few values).
    if isinstance(addr, ipaddress.IPv6Address) and not addr.scope_id and int(addr) >> 125 == 1:
        return None
    return _unusable(addr)


@lru_cache(maxsize=1 << 12)
def _unusable(addr: IPAddress) -> str | None:
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        return f"{addr} has a zone index (%{addr.scope_id}), which means something on this host only"
    if addr.is_unspecified:
        return f"{addr} is the unspecified address"
    if addr.is_loopback:
        return f"{addr} is a loopback address"
    if addr == _BROADCAST:
        return f"{addr} is the broadcast address"
    if addr.is_multicast:
        return f"{addr} is a multicast address"
    if addr.is_link_local:
        return f"{addr} is a link-local address"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return f"{addr} is an IPv4-mapped IPv6 address (::ffff:0:0/96); write the IPv4 address {addr.ipv4_mapped}"
        if addr.is_site_local:
            return f"{addr} is a site-local address (fec0::/10, deprecated by RFC 3879)"
        if addr.is_reserved:
            return f"{addr} is in reserved IPv6 space (not global unicast 2000::/3 or unique local fc00::/7)"
    else:
        if addr in _THIS_NETWORK:
            return f"{addr} is in 0.0.0.0/8 ('this network', RFC 1122)"
        if addr.is_reserved:
            return f"{addr} is in the reserved 240.0.0.0/4"
    return None
