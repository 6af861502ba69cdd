"""Recorder n-tuple filters: parsing, masks, BPF keys, mask slots and templates, reference matching."""

from __future__ import annotations

import ipaddress
import json

import pytest
from conftest import UNICODE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb.recfilter import (
    KEY_STRUCT,
    MAX_MASKS_PER_FAMILY,
    DuplicateFilterError,
    Filter,
    Mask,
    MaskedKey,
    MaskLimitError,
    PacketTuple,
    assign_mask_slots,
    build_table,
    compile_masks,
    expand_filter,
    first_match,
    matches,
    parse_filter,
)

N4 = ipaddress.IPv4Network
N6 = ipaddress.IPv6Network
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- parsing

def test_parse_brief_examples():
    f = parse_filter("198.51.100.0/24 0 203.0.113.1 80 TCP")
    assert f == Filter(4, N4("198.51.100.0/24"), N4("203.0.113.1/32"), 0, 80, 6)
    g = parse_filter("any any 2001:db8::/32 443 tcp")
    assert g == Filter(6, N6("::/0"), N6("2001:db8::/32"), 0, 443, 6)


@pytest.mark.parametrize("wild", ["0", "any", "ANY", "*", "Any"])
def test_wildcard_tokens_everywhere(wild):
    f = parse_filter(f"{wild} {wild} 203.0.113.0/24 {wild} {wild}")
    assert (f.src, f.sport, f.dport, f.proto) == (N4("0.0.0.0/0"), 0, 0, 0)
    g = parse_filter(f"2001:db8::1 80 {wild} {wild} udp")
    assert (g.family, g.dst, g.sport, g.proto) == (6, N6("::/0"), 80, 17)


@pytest.mark.parametrize(
    "token,number", [("tcp", 6), ("TCP", 6), ("Udp", 17), ("UDP", 17), ("6", 6), ("17", 17), ("47", 47), ("255", 255)]
)
def test_proto_names_and_numbers(token, number):
    assert parse_filter(f"192.0.2.0/24 0 any 0 {token}").proto == number


def test_icmp_names_fix_family():
    assert parse_filter("any 0 any 0 icmp").family == 4
    assert parse_filter("any 0 any 0 ICMPv6").family == 6
    assert parse_filter("any 0 any 0 icmp6").proto == 58


def test_bare_addresses_are_host_prefixes():
    g = parse_filter("192.0.2.7 1234 198.51.100.9 80 tcp")
    assert (g.src.prefixlen, g.dst.prefixlen) == (32, 32)
    h = parse_filter("2001:db8::7 0 2001:db8::1 0 any")
    assert (h.src.prefixlen, h.dst.prefixlen) == (128, 128)


def test_explicit_zero_prefix_fixes_family():
    assert parse_filter("0.0.0.0/0 0 any 80 tcp").family == 4
    assert parse_filter("any 0 ::/0 80 tcp").family == 6
    assert parse_filter("0.0.0.0 0 any 80 tcp").src == N4("0.0.0.0/0")
    assert parse_filter("any 0 :: 80 tcp").dst == N6("::/0")
    assert parse_filter("0.0.0.0/32 0 any 80 tcp").src == N4("0.0.0.0/32")


@pytest.mark.parametrize(
    "text,field,why",
    [
        ("198.51.100.0/24 0 2001:db8::1 80 tcp", "mixed address families", "IPv6"),
        ("198.51.100.1/24 0 any 80 tcp", "src:", "host bits"),
        ("any 0 203.0.113.0/33 80 tcp", "dst:", "not an IPv4/IPv6"),
        ("any 0 host.example 80 tcp", "dst:", "not an IPv4/IPv6"),
        ("fe80::1%eth0 0 any 80 tcp", "src:", "not an IPv4/IPv6"),
        ("192.0.2.1 65536 any 80 tcp", "sport:", "out of range"),
        ("192.0.2.1 -1 any 80 tcp", "sport:", "not a port"),
        ("192.0.2.1 0 any http tcp", "dport:", "not a port"),
        ("192.0.2.1 0 any 0x50 tcp", "dport:", "not a port"),
        ("192.0.2.1 0 any ٨٠ tcp", "dport:", "not a port"),
        ("192.0.2.1 0 any 80 sctpx", "proto:", "not TCP"),
        ("192.0.2.1 0 any 80 256", "proto:", "out of range"),
        ("192.0.2.1 0 any 80 icmp", "dport:", "has no ports"),
        ("192.0.2.1 53 any 0 47", "sport:", "has no ports"),
        ("2001:db8::1 0 any 0 icmp", "proto:", "IPv4 protocol"),
        ("192.0.2.1 0 any 0 icmpv6", "proto:", "IPv6 protocol"),
        ("any 0 any 80 tcp", "family:", "ambiguous"),
        ("192.0.2.1 0 any 80", "filter:", "expected 5 fields"),
        ("192.0.2.1 0 any 80 tcp extra", "filter:", "expected 5 fields"),
        ("", "filter:", "got 0"),
    ],
)
def test_bad_input_names_field_and_reason(text, field, why):
    with pytest.raises(ValueError) as exc:
        parse_filter(text)
    msg = str(exc.value)
    assert msg.startswith(field) or field in msg, msg
    assert why in msg, msg


def test_family_argument_and_conflict():
    assert parse_filter("any 0 any 80 tcp", family=6).src == N6("::/0")
    with pytest.raises(ValueError, match="family: 6 given, but the addresses are IPv4"):
        parse_filter("192.0.2.0/24 0 any 80 tcp", family=6)
    with pytest.raises(ValueError, match="family: expected 4 or 6"):
        parse_filter("any 0 any 80 tcp", family=5)


def test_expand_filter_gives_one_per_family():
    v4, v6 = expand_filter("any any any 443 tcp")
    assert (v4.family, v6.family) == (4, 6)
    assert v4.dport == v6.dport == 443
    assert expand_filter("192.0.2.0/24 0 any 0 any") == (parse_filter("192.0.2.0/24 0 any 0 any"),)
    with pytest.raises(ValueError, match="dport"):
        expand_filter("any any any 99999 tcp")


def test_from_dict_and_json():
    d = {"src": "198.51.100.0/24", "dst": "203.0.113.1", "dport": 80, "proto": "TCP"}
    f = Filter.from_dict(d)
    assert f == parse_filter("198.51.100.0/24 0 203.0.113.1 80 TCP")
    assert Filter.from_json(json.dumps(d)) == f
    assert Filter.from_dict({"family": 6, "dport": "443", "proto": 6}) == parse_filter("any 0 ::/0 443 tcp")
    assert Filter.from_dict(f.to_dict()) == f
    assert f.to_dict() == {
        "family": 4, "src": "198.51.100.0/24", "sport": 0, "dst": "203.0.113.1/32", "dport": 80, "proto": "tcp",
    }


@pytest.mark.parametrize(
    "data,msg",
    [
        ({"src": "192.0.2.1", "bogus": 1}, "unknown field"),
        ({"src": "192.0.2.1", "dport": True}, "dport"),
        ({"src": "192.0.2.1", "dport": 1.5}, "dport"),
        ({"src": 3232235777}, "src"),
        ({"src": "192.0.2.1", "proto": None}, "proto"),
        ({"family": True}, "family"),
        ([1, 2], "expected an object"),
    ],
)
def test_from_dict_rejects(data, msg):
    with pytest.raises(ValueError, match=msg):
        Filter.from_dict(data)
    with pytest.raises(ValueError):
        Filter.from_json("{not json")


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match="mixed address families"):
        Filter(4, N4("192.0.2.0/24"), N6("::/0"))
    with pytest.raises(ValueError, match="sport"):
        Filter(4, N4("192.0.2.0/24"), N4("0.0.0.0/0"), sport=70000)
    with pytest.raises(ValueError, match="dport"):
        Filter(4, N4("192.0.2.0/24"), N4("0.0.0.0/0"), dport=80, proto=1)
    f = Filter(4, N4("192.0.2.0/24"), N4("0.0.0.0/0"))
    with pytest.raises(AttributeError):
        f.sport = 1  # type: ignore[misc]
    assert hash(f) == hash(parse_filter("192.0.2.0/24 0 any 0 any"))


# --------------------------------------------------------------------------- masks and keys

def test_mask_and_masked_key_values():
    f = parse_filter("198.51.100.0/24 0 203.0.113.1 80 TCP")
    assert f.mask() == Mask(4, 24, 32, sport_wild=True, dport_wild=False, proto_wild=False)
    k = f.masked_key()
    assert k == MaskedKey(
        family=4, src_len=24, dst_len=32, wild=1,
        src=bytes([198, 51, 100, 0]) + bytes(12), dst=bytes([203, 0, 113, 1]) + bytes(12),
        sport=0, dport=80, proto=6,
    )
    packed = k.pack()
    assert len(packed) == KEY_STRUCT.size == 44
    assert packed[:4] == bytes([4, 24, 32, 1])
    assert packed[4:8] == bytes([198, 51, 100, 0]) and packed[20:24] == bytes([203, 0, 113, 1])
    assert packed[36:40] == b"\x00\x00\x00\x50" and packed[40] == 6 and packed[41:] == bytes(3)


def test_masked_key_v6_and_wildcards():
    f = parse_filter("any any 2001:db8::/32 443 tcp")
    k = f.masked_key()
    assert k.src == bytes(16)
    assert k.dst == bytes.fromhex("20010db8") + bytes(12)
    assert (k.family, k.src_len, k.dst_len, k.wild, k.sport, k.dport, k.proto) == (6, 0, 32, 1, 0, 443, 6)
    g = parse_filter("any 0 ::/0 0 any")
    assert g.masked_key().wild == 7 and g.masked_key().proto == 0


def test_key_distinguishes_masks_with_equal_masked_values():
    # 10.0.0.0/8 and 10.0.0.0/16 mask to the same address: the prefix lengths keep them apart.
    a = parse_filter("10.0.0.0/8 0 any 0 any").masked_key()
    b = parse_filter("10.0.0.0/16 0 any 0 any").masked_key()
    assert a.src == b.src and a != b
    assert len(build_table([parse_filter("10.0.0.0/8 0 any 0 any"), parse_filter("10.0.0.0/16 0 any 0 any")])) == 2


def test_mask_apply_masks_packet():
    m = Mask(4, 24, 8, sport_wild=True, dport_wild=False, proto_wild=True)
    k = m.apply(PacketTuple.make("198.51.100.77", "203.0.113.5", 4321, 80, 6))
    assert k.src[:4] == bytes([198, 51, 100, 0]) and k.dst[:4] == bytes([203, 0, 0, 0])
    assert (k.sport, k.dport, k.proto, k.wild) == (0, 80, 0, 5)
    assert m.apply(PacketTuple.make("2001:db8::1", "2001:db8::2", 1, 2, 6)) is None
    with pytest.raises(ValueError):
        Mask(4, 33, 0, True, True, True)


def test_compile_masks_order_is_most_specific_first_and_deduplicated():
    texts = [
        "10.0.0.0/8 0 any 0 any",
        "192.0.2.0/24 0 203.0.113.1 80 tcp",
        "192.0.2.0/24 0 203.0.113.1 443 tcp",  # same mask as above
        "192.0.2.0/24 0 203.0.113.1 0 tcp",
        "192.0.2.0/24 1234 203.0.113.1 0 any",
        "any 0 203.0.113.0/24 80 udp",
        "203.0.113.0/24 0 any 80 udp",
        "2001:db8::/32 0 any 0 any",
        "any any 2001:db8::1 443 tcp",
    ]
    masks = compile_masks(parse_filter(t) for t in texts)
    assert masks == [
        Mask(4, 24, 32, True, False, False),
        Mask(4, 24, 32, True, True, False),
        Mask(4, 24, 32, False, True, True),
        Mask(4, 24, 0, True, False, False),
        Mask(4, 0, 24, True, False, False),
        Mask(4, 8, 0, True, True, True),
        Mask(6, 0, 128, True, False, False),
        Mask(6, 32, 0, True, True, True),
    ]
    assert compile_masks(reversed([parse_filter(t) for t in texts])) == masks


def test_mask_cap_per_family():
    v4 = [parse_filter(f"0.0.0.0/{n} 0 any 0 any") for n in range(MAX_MASKS_PER_FAMILY)]
    v6 = [parse_filter(f"2001:db8::/{n} 0 any 0 any") for n in range(32, 32 + MAX_MASKS_PER_FAMILY)]
    assert len(compile_masks(v4 + v6)) == 2 * MAX_MASKS_PER_FAMILY
    with pytest.raises(MaskLimitError, match="33 distinct IPv4 filter masks.*room for 32"):
        compile_masks(v4 + v6 + [parse_filter("any 0 0.0.0.0/0 80 tcp")])
    with pytest.raises(MaskLimitError, match="IPv6"):
        compile_masks(v6 + [parse_filter("any 0 ::/0 80 tcp")])
    assert issubclass(MaskLimitError, ValueError)


def _m(text: str) -> Mask:
    return parse_filter(text).mask()


def test_assign_mask_slots_keeps_slots_and_fills_the_lowest_free():
    a, b, c = _m("10.0.0.0/8 0 any 0 any"), _m("192.0.2.0/24 0 203.0.113.1 80 tcp"), _m("any 0 2001:db8::/32 0 udp")
    first = assign_mask_slots({}, [a, b, c])
    assert first == {b: 0, a: 1, c: 32}, "IPv4 from 0, IPv6 from 32; most specific first"
    d = _m("192.0.2.7 0 any 0 any")
    second = assign_mask_slots(first, [a, c, d])
    assert second == {a: 1, c: 32, d: 0}, "kept masks keep their slot, a new one takes the lowest free"
    assert assign_mask_slots(second, []) == {}
    assert assign_mask_slots(second, [a, a, c]) == {a: 1, c: 32}, "duplicates are one mask"


def test_assign_mask_slots_limit_is_checked_before_anything():
    v4 = [Mask(4, n, 32, True, True, True) for n in range(MAX_MASKS_PER_FAMILY)]
    v6 = [Mask(6, n, 128, True, True, True) for n in range(MAX_MASKS_PER_FAMILY)]
    full = assign_mask_slots({}, v4 + v6)
    assert sorted(full.values()) == list(range(2 * MAX_MASKS_PER_FAMILY))
    assert all((s < MAX_MASKS_PER_FAMILY) == (m.family == 4) for m, s in full.items())
    with pytest.raises(MaskLimitError, match="33 distinct IPv4 filter masks.*room for 32"):
        assign_mask_slots(full, [*v4, *v6, Mask(4, 32, 32, True, True, True)])
    # Churn: one mask out, another in, the others stay put.
    swapped = assign_mask_slots(full, [*v4[1:], Mask(4, 32, 32, True, True, True), *v6])
    assert swapped[Mask(4, 32, 32, True, True, True)] == full[v4[0]]
    assert all(swapped[m] == full[m] for m in v4[1:] + v6)


def test_template_packs_as_a_key_of_bits_to_keep():
    t = _m("192.0.2.0/24 0 203.0.113.1 80 tcp").template()
    assert KEY_STRUCT.unpack(t.pack()) == (4, 24, 32, 1, bytes([255, 255, 255, 0]) + bytes(12),
                                           bytes([255] * 4) + bytes(12), 0, 0xFFFF, 0xFF)
    t6 = _m("2001:db8::/33 0 any 0 any").template()
    assert (t6.family, t6.src_len, t6.dst_len, t6.wild) == (6, 33, 0, 7)
    assert t6.src == bytes([255] * 4) + bytes([0x80]) + bytes(11) and t6.dst == bytes(16)
    assert (t6.sport, t6.dport, t6.proto) == (0, 0, 0)


def _and_key(t: MaskedKey, p: PacketTuple) -> MaskedKey:
    """What the datapath computes: the template's header, the packet's fields AND the template's."""
    fam = p.family
    raw = lambda a: int(a).to_bytes(4 if fam == 4 else 16, "big").ljust(16, b"\0")  # noqa: E731
    band = lambda x, y: bytes(i & j for i, j in zip(x, y))  # noqa: E731
    return MaskedKey(t.family, t.src_len, t.dst_len, t.wild, band(raw(p.src), t.src), band(raw(p.dst), t.dst),
                     p.sport & t.sport, p.dport & t.dport, p.proto & t.proto)


# --------------------------------------------------------------------------- reference semantics

def test_matches_examples():
    f = parse_filter("198.51.100.0/24 0 203.0.113.1 80 TCP")
    ok = PacketTuple.make("198.51.100.200", "203.0.113.1", 40000, 80, 6)
    assert matches(f, ok)
    assert not matches(f, ok._replace(src=ipaddress.ip_address("198.51.101.1")))
    assert not matches(f, ok._replace(dst=ipaddress.ip_address("203.0.113.2")))
    assert not matches(f, ok._replace(dport=81))
    assert not matches(f, ok._replace(proto=17))
    assert not matches(f, PacketTuple.make("2001:db8::1", "2001:db8::2", 40000, 80, 6))
    anyproto = parse_filter("any 0 203.0.113.1 80 any")
    assert matches(anyproto, ok._replace(proto=17))
    assert not matches(anyproto, PacketTuple.make("198.51.100.1", "203.0.113.1", 0, 0, 1))  # ICMP has no port
    assert matches(parse_filter("any 0 203.0.113.1 0 any"), PacketTuple.make("198.51.100.1", "203.0.113.1", 0, 0, 1))


def test_first_match_prefers_most_specific_mask():
    filters = [
        parse_filter("10.0.0.0/8 0 any 0 any"),
        parse_filter("10.1.0.0/16 0 any 80 tcp"),
        parse_filter("10.1.2.0/24 0 any 0 any"),
    ]
    masks, table = compile_masks(filters), build_table(filters, ["wide", "web", "narrow"])
    assert first_match(masks, table, PacketTuple.make("10.1.2.3", "192.0.2.1", 5, 80, 6)) == "narrow"
    assert first_match(masks, table, PacketTuple.make("10.1.9.3", "192.0.2.1", 5, 80, 6)) == "web"
    assert first_match(masks, table, PacketTuple.make("10.1.9.3", "192.0.2.1", 5, 81, 6)) == "wide"
    assert first_match(masks, table, PacketTuple.make("11.1.9.3", "192.0.2.1", 5, 80, 6)) is None
    with pytest.raises(DuplicateFilterError):
        build_table(filters + [parse_filter("10.0.0.0/8 any 0.0.0.0/0 * ANY")])


def test_packet_tuple_validation():
    with pytest.raises(ValueError, match="mixed"):
        PacketTuple.make("192.0.2.1", "2001:db8::1")
    with pytest.raises(ValueError, match="no ports"):
        PacketTuple.make("192.0.2.1", "192.0.2.2", 1, 2, 1)


# --------------------------------------------------------------------------- properties

_PORTS = st.sampled_from([0, 0, 53, 80, 443])


@st.composite
def filters(draw, family=None):
    fam = draw(st.sampled_from([4, 6])) if family is None else family
    bits = 32 if fam == 4 else 128
    net = N4 if fam == 4 else N6
    # a small address pool so that filters and packets overlap often
    base = draw(st.sampled_from([0x0A000000, 0xC0000200, 0xCB007100])) << (bits - 32)
    nets = []
    for _ in range(2):
        plen = draw(st.sampled_from([0, 8, 16, 24, 32, bits]))
        addr = base | draw(st.integers(0, (1 << (bits - 24)) - 1))
        mask = ((1 << plen) - 1) << (bits - plen) if plen else 0
        nets.append(net((addr & mask, plen)))
    proto = draw(st.sampled_from([0, 6, 17, 1 if fam == 4 else 58, 47]))
    ports = (draw(_PORTS), draw(_PORTS)) if proto in (0, 6, 17) else (0, 0)
    return Filter(fam, nets[0], nets[1], ports[0], ports[1], proto)


@st.composite
def packets(draw, family):
    bits = 32 if family == 4 else 128
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    addrs = []
    for _ in range(2):
        base = draw(st.sampled_from([0x0A000000, 0xC0000200, 0xCB007100])) << (bits - 32)
        addrs.append(cls(base | draw(st.integers(0, (1 << (bits - 24)) - 1))))
    proto = draw(st.sampled_from([6, 17, 1 if family == 4 else 58, 47]))
    ports = (draw(_PORTS.filter(bool)), draw(_PORTS.filter(bool))) if proto in (6, 17) else (0, 0)
    return PacketTuple(addrs[0], addrs[1], ports[0], ports[1], proto)


@st.composite
def packets_near(draw, f):
    """Mostly packets that fall inside f, with an occasional field pushed out of it."""
    p = draw(packets(f.family))
    bits = 32 if f.family == 4 else 128
    cls = type(p.src)
    src, dst = (
        cls(int(n.network_address) | (draw(st.integers(0, (1 << (bits - n.prefixlen)) - 1)) if n.prefixlen < bits else 0))
        for n in (f.src, f.dst)
    )
    proto = f.proto or p.proto
    if proto in (6, 17):
        sport, dport = f.sport or p.sport or 1, f.dport or p.dport or 1
    else:
        sport = dport = 0
    near = PacketTuple(src, dst, sport, dport, proto)
    field = draw(st.sampled_from([None, None, "src", "dst", "sport", "dport", "proto"]))
    if field is None:
        return near
    return near._replace(**{field: getattr(p, field)}) if field != "proto" or p.proto in (6, 17) or not (sport or dport) else near


@PROPS
@given(filters())
def test_prop_text_and_dict_round_trip(f):
    assert parse_filter(str(f)) == f
    assert Filter.from_dict(f.to_dict()) == f
    assert Filter.from_json(json.dumps(f.to_dict())) == f


@PROPS
@given(st.data())
def test_prop_masked_lookup_equals_matches(data):
    f = data.draw(filters())
    p = data.draw(st.one_of(packets(f.family), packets_near(f)))
    assert matches(f, p) == (f.mask().apply(p) == f.masked_key())


@PROPS
@given(st.data())
def test_prop_template_and_equals_mask_apply(data):
    f = data.draw(filters())
    p = data.draw(st.one_of(packets(f.family), packets_near(f)))
    m = f.mask()
    assert _and_key(m.template(), p) == m.apply(p)
    assert (_and_key(m.template(), p) == f.masked_key()) == matches(f, p)


@PROPS
@given(st.data())
def test_prop_first_match_is_most_specific_matching_filter(data):
    fam = data.draw(st.sampled_from([4, 6]))
    fs = list(dict.fromkeys(data.draw(st.lists(filters(fam), min_size=1, max_size=12))))
    p = data.draw(st.one_of(packets(fam), packets_near(data.draw(st.sampled_from(fs)))))
    masks = compile_masks(fs)
    hit = first_match(masks, build_table(fs), p)
    matching = [i for i, f in enumerate(fs) if matches(f, p)]
    if not matching:
        assert hit is None
        return
    assert hit in matching
    best = min(masks.index(fs[i].mask()) for i in matching)
    assert masks.index(fs[hit].mask()) == best


@PROPS
@given(st.lists(filters(), max_size=20))
def test_prop_compile_masks_sorted_unique_and_total(fs):
    masks = compile_masks(fs)
    assert len(set(masks)) == len(masks) == len({f.mask() for f in fs})
    keys = [m.sort_key() for m in masks]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for fam in (4, 6):
        bits = [m.src_len + m.dst_len for m in masks if m.family == fam]
        assert bits == sorted(bits, reverse=True)


_TOKENS = st.sampled_from(
    ["any", "*", "0", "tcp", "UDP", "icmp", "icmpv6", "80", "65535", "65536", "-1", "192.0.2.0/24", "192.0.2.1/24",
     "2001:db8::/32", "2001:db8::1", "::/0", "0.0.0.0/0", "10.0.0.0/255.0.0.0", "1.2.3", "300.1.1.1", "x", "/", ":::"]
)


@PROPS
@given(st.one_of(st.lists(_TOKENS, max_size=7).map(" ".join), st.text(UNICODE, max_size=40)))
def test_prop_parser_only_raises_value_error(text):
    try:
        f = parse_filter(text)
    except ValueError as exc:
        assert str(exc)
        return
    assert isinstance(f, Filter)
    assert parse_filter(str(f)) == f


@PROPS
@given(filters(4), filters(6), st.booleans())
def test_prop_mixed_family_always_rejected(a, b, swap):
    if swap:
        a, b = b, a
    with pytest.raises(ValueError, match="mixed address families"):
        parse_filter(f"{a.src.with_prefixlen} 0 {b.dst.with_prefixlen} 0 any")
