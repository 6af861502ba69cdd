"""Address fast paths decide exactly as the slow ones they skip (pure, no root):
l4lb.addresses' IPv6 global-unicast shortcut of unusable(), and l4lb.models'
C parser for hex-and-colons IPv6 text."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4lb.addresses import _unusable, unusable
from l4lb.models import _ip_or_none

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


# Texts over the alphabet the C parser is trusted with: groups of 0-5 hex digits,
# single and double colons, at either end too.
hex_colon_texts = st.lists(st.one_of(st.text("0123456789abcdefABCDEF", max_size=5), st.just(""), st.just(":")),
                           min_size=1, max_size=11).map(":".join)


def assert_parsers_agree(text: str) -> None:
    try:
        want = ipaddress.IPv6Address(text)
    except ValueError:
        want = None
    _ip_or_none.cache_clear()
    assert _ip_or_none(text) == want


@settings(max_examples=5000, deadline=None)
@given(st.one_of(hex_colon_texts, st.text("0123456789abcdef:", max_size=45)))
def test_c_parser_and_ipaddress_agree_on_hex_colon_text(text: str) -> None:
    assert_parsers_agree(text)


def test_other_spellings_still_parse() -> None:
    for text in ("::ffff:198.51.100.1", "2001:db8::1%eth0", "2001:DB8::1", "198.51.100.7"):
        _ip_or_none.cache_clear()
        assert _ip_or_none(text) == ipaddress.ip_address(text)
    assert _ip_or_none("2001:db8::g") is None and _ip_or_none("198.51.100.07") is None


@pytest.mark.parametrize("text", [
    "1:2:3:4:5:6:7::", "::1:2:3:4:5:6:7", "1::2::3", ":::", "1:2:3:4:5:6:7:8::", "00000::1", "::00001", "::",
    "1:2:3:4:5:6:7", "::1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8:9", ":1::", "1::", ":", "0:0:0:0:0:0:0::"])
def test_edge_spellings_agree(text: str) -> None:
    assert_parsers_agree(text)
