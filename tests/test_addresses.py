"""l4lb.addresses: the IPv6 global-unicast shortcut of unusable() decides
exactly as the class-by-class check it skips (pure, no root)."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.addresses import _unusable, unusable

# Addresses near every class boundary the check knows, and anywhere at all.
_EDGES = [0, 1, 0xFFFF << 32, 0x2000 << 112, (0x4000 << 112) - 1, 0x4000 << 112, 0xFC00 << 112, 0xFE80 << 112,
          0xFEC0 << 112, 0xFF00 << 112, (1 << 128) - 1]
addresses = st.one_of(
    st.integers(min_value=0, max_value=(1 << 128) - 1),
    st.builds(lambda base, off: min(max(base + off, 0), (1 << 128) - 1), st.sampled_from(_EDGES),
              st.integers(min_value=-(1 << 20), max_value=1 << 20)),
)


@settings(max_examples=3000, deadline=None)
@given(addresses)
def test_shortcut_agrees_with_the_full_check(n: int) -> None:
    addr = ipaddress.IPv6Address(n)
    assert unusable(addr) == _unusable(addr)


def test_shortcut_covers_global_unicast_only() -> None:
    assert unusable(ipaddress.IPv6Address("2001:db8:b:1::1")) is None
    assert unusable(ipaddress.IPv6Address("3fff:ffff::1")) is None
    assert "reserved" in (unusable(ipaddress.IPv6Address("4000::1")) or "")
    assert "zone index" in (unusable(ipaddress.IPv6Address("2001:db8::1%eth0")) or "")
    assert "loopback" in (unusable(ipaddress.IPv4Address("127.0.0.1")) or "")
