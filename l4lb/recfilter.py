"""N-tuple filters of the PCAP recorder: parsing, masks, BPF hash keys, reference matching.

Pure: no kernel, no I/O. The BPF half of the recorder matches packets with masked look-ups:
the distinct masks of the active filters, each in a slot of a BPF array (at most
:data:`MAX_MASKS_PER_FAMILY` per family; :func:`assign_mask_slots` decides which, keeping
every mask still in use where it is), and one hash map holding every filter under its masked
key. For each mask of the packet's family, the datapath masks the packet's tuple and looks it
up. :func:`first_match` is the reference of that look-up (first hit in mask order) and
:func:`matches` the plain semantics; the tests prove they agree. A mask is data (its slot's
template, :meth:`Mask.template`): a filter with a new mask is armed by map writes alone.

Filter syntax (like ``hubble record``)::

    SRC SPORT DST DPORT PROTO
    198.51.100.0/24 0 203.0.113.1 80 TCP
    any any 2001:db8::/32 443 tcp

* SRC/DST: a prefix (``198.51.100.0/24``, ``2001:db8::/32``), a bare address (= /32 or /128),
  or a wildcard ``any``, ``*`` or ``0``. ``0.0.0.0/0``, ``::/0`` and the bare unspecified
  addresses ``0.0.0.0`` and ``::`` are wildcards that also fix the family (write
  ``0.0.0.0/32`` to mean that one address). Host bits set below the prefix are an error.
* SPORT/DPORT: 1-65535, or ``0``/``any``/``*`` for any port. A port needs protocol TCP, UDP or
  any; with "any", only TCP and UDP packets (which carry ports) can match a non-zero port.
* PROTO: ``TCP``, ``UDP``, ``ICMP`` (IPv4 only), ``ICMPv6`` (IPv6 only), ``ANY``/``*``/``0``, or
  a number 1-255; case-insensitive.
* Both addresses must be of the same family. If both are plain wildcards, the family is
  ambiguous: pass ``family=`` to :func:`parse_filter`, or use :func:`expand_filter`, which
  returns one filter per family.

Masked key (:class:`MaskedKey`), i.e. the values the BPF hash key holds::

    family   4 or 6
    src_len  source prefix length       \\  the mask itself is part of the key: without it
    dst_len  destination prefix length   >  10.0.0.0/8 and 10.0.0.0/16 would have the same
    wild     bit 0 sport, bit 1 dport,  /   key, and a packet masked by one mask could hit a
             bit 2 proto are wildcards      filter stored under another
    src      16 bytes, network order, masked; IPv4 in bytes 0-3, bytes 4-15 zero
    dst      16 bytes, likewise
    sport    int 0-65535 (0 if wildcard); store as __be16 (socket.htons) in the C struct
    dport    likewise
    proto    int 0-255 (0 if wildcard)

:meth:`MaskedKey.pack` gives one concrete packed layout (see :data:`KEY_STRUCT`) for tests
and for a C struct that wants to mirror it; the C struct remains the definition.

A packet's tuple (:class:`PacketTuple`) has ports 0 when its protocol is neither TCP nor UDP;
that is what the datapath must extract too.
"""

from __future__ import annotations

import ipaddress
import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_MASKS_PER_FAMILY = 32

PROTO_ANY = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
#: Protocols whose packets carry ports the datapath extracts.
PORT_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP})

WILD_SPORT = 1
WILD_DPORT = 2
WILD_PROTO = 4

_WILDCARDS = frozenset({"any", "*", "0"})
_DIGITS = re.compile(r"[0-9]{1,5}")
_ADDR_CHARS = re.compile(r"[0-9A-Fa-f:./]+")
_PROTO_NAMES: dict[str, int] = {
    "tcp": PROTO_TCP,
    "udp": PROTO_UDP,
    "icmp": PROTO_ICMP,
    "icmpv6": PROTO_ICMPV6,
    "icmp6": PROTO_ICMPV6,
    "ipv6-icmp": PROTO_ICMPV6,
}
_PROTO_DISPLAY = {PROTO_ANY: "ANY", PROTO_TCP: "TCP", PROTO_UDP: "UDP", PROTO_ICMP: "ICMP", PROTO_ICMPV6: "ICMPv6"}
_PROTO_FAMILY = {PROTO_ICMP: 4, PROTO_ICMPV6: 6}
_FIELDS = ("src", "sport", "dst", "dport", "proto")
_DICT_KEYS = frozenset({"family", *_FIELDS})

#: One packed layout of a :class:`MaskedKey` (44 bytes, no implicit padding):
#: ``struct rec_key { u8 family, src_len, dst_len, wild; u8 src[16], dst[16];
#: __be16 sport, dport; u8 proto, pad[3]; }``.
KEY_STRUCT = struct.Struct("!BBBB16s16sHHB3x")


class MaskLimitError(ValueError):
    """More distinct masks in one family than the datapath has compiled-in slots for."""


class DuplicateFilterError(ValueError):
    """Two filters have the same masked key, so one BPF hash entry would have to hold both."""


def _family_max(family: int) -> int:
    return 32 if family == 4 else 128


def _wild_net(family: int) -> IPNetwork:
    return ipaddress.IPv4Network("0.0.0.0/0") if family == 4 else ipaddress.IPv6Network("::/0")


def _addr16(value: int, family: int) -> bytes:
    if family == 4:
        return value.to_bytes(4, "big") + bytes(12)
    return value.to_bytes(16, "big")


def _prefix_mask(length: int, family: int) -> int:
    bits = _family_max(family)
    return ((1 << length) - 1) << (bits - length) if length else 0


# --------------------------------------------------------------------------- field parsers

def _parse_addr(field: str, token: Any) -> IPNetwork | None:
    """A prefix or address; ``None`` for a family-less wildcard."""
    if not isinstance(token, str):
        raise ValueError(f"{field}: expected an address or prefix as a string, got {token!r}")
    text = token.strip()
    if text.lower() in _WILDCARDS:
        return None
    if not text:
        raise ValueError(f"{field}: empty")
    if not _ADDR_CHARS.fullmatch(text):
        raise ValueError(f"{field}: {token!r} is not an IPv4/IPv6 address or prefix")
    if text in ("0.0.0.0", "::"):
        return ipaddress.ip_network(text + "/0")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(
                f"{field}: {token!r} has host bits set below the prefix length; did you mean {loose}?"
            ) from None
        raise ValueError(f"{field}: {token!r} is not an IPv4/IPv6 address or prefix ({exc})") from None


def _parse_number(field: str, token: Any, *, what: str, words: dict[str, int], bad: str, top: int,
                  out_of_range: str) -> int:
    """A port or protocol: an int, or a string of digits or one of ``words``
    (the wildcards among them), within 0..top. Bools are not numbers here."""
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise ValueError(f"{field}: expected {what}, got {token!r}")
    value = token
    if isinstance(token, str):
        text = token.strip().lower()
        if text in words:
            return words[text]
        if not _DIGITS.fullmatch(text):
            raise ValueError(f"{field}: {token!r} {bad}")
        value = int(text)
    if not 0 <= value <= top:
        raise ValueError(f"{field}: {out_of_range.format(value)}")
    return value


_PORT_WORDS = dict.fromkeys(_WILDCARDS, 0)
_PROTO_WORDS = {**dict.fromkeys(_WILDCARDS, PROTO_ANY), **_PROTO_NAMES}


def _parse_port(field: str, token: Any) -> int:
    return _parse_number(field, token, what="a port number", words=_PORT_WORDS, top=65535,
                         bad="is not a port number (0-65535, 0/any/* = any port)",
                         out_of_range="port {} out of range 0-65535 (0 = any port)")


def _parse_proto(token: Any) -> int:
    return _parse_number("proto", token, what="a protocol name or number",
                         words=_PROTO_WORDS, top=255,
                         bad="is not TCP, UDP, ICMP, ICMPv6, ANY or a protocol number 0-255",
                         out_of_range="protocol number {} out of range 0-255 (0 = any)")


def _parse_family(token: Any) -> int | None:
    if token is None:
        return None
    if isinstance(token, bool) or token not in (4, 6, "4", "6"):
        raise ValueError(f"family: expected 4 or 6, got {token!r}")
    return int(token)


# --------------------------------------------------------------------------- Filter

@dataclass(frozen=True, slots=True)
class Filter:
    """One n-tuple filter. Wildcards: prefix length 0, port 0, proto 0.

    Build it with :func:`parse_filter`, :meth:`from_dict` or :meth:`from_json`; direct
    construction is validated too (networks must already be ``ipaddress`` networks).
    """

    family: int
    src: IPNetwork
    dst: IPNetwork
    sport: int = 0
    dport: int = 0
    proto: int = PROTO_ANY

    def __post_init__(self) -> None:
        if isinstance(self.family, bool) or self.family not in (4, 6):
            raise ValueError(f"family: expected 4 or 6, got {self.family!r}")
        for name in ("src", "dst"):
            net = getattr(self, name)
            if not isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                raise ValueError(f"{name}: expected an ipaddress network, got {net!r}")
            if net.version != self.family:
                raise ValueError(
                    f"mixed address families: {name} {net} is IPv{net.version} in an IPv{self.family} filter"
                )
        for name in ("sport", "dport"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise ValueError(f"{name}: port {value!r} out of range 0-65535 (0 = any port)")
        if isinstance(self.proto, bool) or not isinstance(self.proto, int) or not 0 <= self.proto <= 255:
            raise ValueError(f"proto: protocol number {self.proto!r} out of range 0-255 (0 = any)")
        if (self.sport or self.dport) and self.proto not in PORT_PROTOCOLS and self.proto != PROTO_ANY:
            which = "sport" if self.sport else "dport"
            raise ValueError(
                f"{which}: a port needs protocol TCP, UDP or ANY; protocol {self.proto} has no ports"
            )
        need = _PROTO_FAMILY.get(self.proto)
        if need is not None and need != self.family:
            raise ValueError(
                f"proto: {_PROTO_DISPLAY[self.proto]} is an IPv{need} protocol, this filter is IPv{self.family}"
            )

    # -- construction -----------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, *, family: int | None = None) -> Filter:
        return parse_filter(text, family=family)

    @classmethod
    def from_fields(
        cls,
        src: Any = "any",
        sport: Any = 0,
        dst: Any = "any",
        dport: Any = 0,
        proto: Any = "any",
        family: Any = None,
    ) -> Filter:
        """Build from separately given fields (strings or ints, as in the text syntax)."""
        fam = _parse_family(family)
        src_net = _parse_addr("src", src)
        dst_net = _parse_addr("dst", dst)
        sp = _parse_port("sport", sport)
        dp = _parse_port("dport", dport)
        pr = _parse_proto(proto)
        fams = {n.version for n in (src_net, dst_net) if n is not None}
        if src_net is not None and dst_net is not None and src_net.version != dst_net.version:
            raise ValueError(f"mixed address families: src {src_net} is IPv{src_net.version}, "
                             f"dst {dst_net} is IPv{dst_net.version}")
        if fams:
            (addr_fam,) = fams
            if fam is not None and fam != addr_fam:
                raise ValueError(f"family: {fam} given, but the addresses are IPv{addr_fam}")
            fam = addr_fam
        if fam is None:
            fam = _PROTO_FAMILY.get(pr)
        if fam is None:
            raise ValueError(
                "family: ambiguous, both addresses are wildcards; use 0.0.0.0/0 or ::/0, "
                "or give the family (4 or 6)"
            )
        return cls(
            family=fam,
            src=src_net if src_net is not None else _wild_net(fam),
            dst=dst_net if dst_net is not None else _wild_net(fam),
            sport=sp,
            dport=dp,
            proto=pr,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Filter:
        """From API/JSON fields ``src, sport, dst, dport, proto`` (missing = any) and optional
        ``family``. Unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise ValueError(f"filter: expected an object, got {type(data).__name__}")
        unknown = sorted(set(data) - _DICT_KEYS, key=str)
        if unknown:
            raise ValueError(f"filter: unknown field(s) {', '.join(map(str, unknown))}; "
                             f"expected {', '.join(sorted(_DICT_KEYS))}")
        return cls.from_fields(
            src=data.get("src", "any"),
            sport=data.get("sport", 0),
            dst=data.get("dst", "any"),
            dport=data.get("dport", 0),
            proto=data.get("proto", "any"),
            family=data.get("family"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Filter:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"filter: invalid JSON ({exc})") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; ``Filter.from_dict(f.to_dict()) == f``."""
        return {
            "family": self.family,
            "src": self.src.with_prefixlen,
            "sport": self.sport,
            "dst": self.dst.with_prefixlen,
            "dport": self.dport,
            "proto": _PROTO_DISPLAY.get(self.proto, str(self.proto)).lower(),
        }

    def __str__(self) -> str:
        """Canonical text; ``parse_filter(str(f)) == f``."""
        proto = _PROTO_DISPLAY.get(self.proto, str(self.proto))
        return f"{self.src.with_prefixlen} {self.sport} {self.dst.with_prefixlen} {self.dport} {proto}"

    # -- masks and keys -----------------------------------------------------------------
    def mask(self) -> Mask:
        return Mask(
            family=self.family,
            src_len=self.src.prefixlen,
            dst_len=self.dst.prefixlen,
            sport_wild=self.sport == 0,
            dport_wild=self.dport == 0,
            proto_wild=self.proto == PROTO_ANY,
        )

    def masked_key(self) -> MaskedKey:
        """The BPF hash key this filter is stored under (see the module docstring)."""
        m = self.mask()
        return MaskedKey(
            family=self.family,
            src_len=m.src_len,
            dst_len=m.dst_len,
            wild=m.wild,
            src=_addr16(int(self.src.network_address), self.family),
            dst=_addr16(int(self.dst.network_address), self.family),
            sport=self.sport,
            dport=self.dport,
            proto=self.proto,
        )


def parse_filter(text: str, *, family: int | None = None) -> Filter:
    """Parse ``"SRC SPORT DST DPORT PROTO"``; ValueError names the field and the reason."""
    if not isinstance(text, str):
        raise ValueError(f"filter: expected a string, got {type(text).__name__}")
    tokens = text.split()
    if len(tokens) != 5:
        raise ValueError(
            f"filter: expected 5 fields 'SRC SPORT DST DPORT PROTO', got {len(tokens)} in {text!r}"
        )
    src, sport, dst, dport, proto = tokens
    return Filter.from_fields(src=src, sport=sport, dst=dst, dport=dport, proto=proto, family=family)


def expand_filter(text: str) -> tuple[Filter, ...]:
    """Like :func:`parse_filter`, but a filter whose family is ambiguous (both addresses plain
    wildcards) becomes two filters, IPv4 then IPv6."""
    try:
        return (parse_filter(text),)
    except ValueError as exc:
        if not str(exc).startswith("family: ambiguous"):
            raise
    return (parse_filter(text, family=4), parse_filter(text, family=6))


# --------------------------------------------------------------------------- masks

class MaskedKey(NamedTuple):
    family: int
    src_len: int
    dst_len: int
    wild: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    proto: int

    def pack(self) -> bytes:
        """Packed as :data:`KEY_STRUCT` (network order for addresses and ports)."""
        return KEY_STRUCT.pack(self.family, self.src_len, self.dst_len, self.wild,
                               self.src, self.dst, self.sport, self.dport, self.proto)


class PacketTuple(NamedTuple):
    """A packet's n-tuple as the datapath extracts it (ports 0 unless TCP or UDP)."""

    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    proto: int

    @classmethod
    def make(cls, src: Any, dst: Any, sport: int = 0, dport: int = 0, proto: int = PROTO_TCP) -> PacketTuple:
        s = src if isinstance(src, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(src)
        d = dst if isinstance(dst, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(dst)
        if s.version != d.version:
            raise ValueError(f"packet: mixed address families {s} / {d}")
        for name, port in (("sport", sport), ("dport", dport)):
            if not 0 <= port <= 65535:
                raise ValueError(f"packet: {name} {port} out of range")
        if not 0 <= proto <= 255:
            raise ValueError(f"packet: proto {proto} out of range")
        if proto not in PORT_PROTOCOLS and (sport or dport):
            raise ValueError(f"packet: protocol {proto} carries no ports, sport/dport must be 0")
        return cls(s, d, sport, dport, proto)

    @property
    def family(self) -> int:
        return self.src.version


@dataclass(frozen=True, slots=True)
class Mask:
    """Which parts of the tuple a group of filters looks at."""

    family: int
    src_len: int
    dst_len: int
    sport_wild: bool
    dport_wild: bool
    proto_wild: bool

    def __post_init__(self) -> None:
        if self.family not in (4, 6):
            raise ValueError(f"mask: family must be 4 or 6, got {self.family!r}")
        top = _family_max(self.family)
        for name in ("src_len", "dst_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                raise ValueError(f"mask: {name} {value!r} out of range 0-{top} for IPv{self.family}")

    @property
    def wild(self) -> int:
        return (WILD_SPORT * self.sport_wild) | (WILD_DPORT * self.dport_wild) | (WILD_PROTO * self.proto_wild)

    def sort_key(self) -> tuple[int, ...]:
        """Total order, most specific first: family, more prefix bits, fewer wildcard
        fields, proto before dport before sport specificity, longer source prefix."""
        return (
            self.family,
            -(self.src_len + self.dst_len),
            self.sport_wild + self.dport_wild + self.proto_wild,
            self.proto_wild,
            self.dport_wild,
            self.sport_wild,
            -self.src_len,
        )

    def apply(self, pkt: PacketTuple) -> MaskedKey | None:
        """Mask a packet's tuple the way the datapath does; None if the family differs."""
        if pkt.family != self.family:
            return None
        fam = self.family
        return MaskedKey(
            family=fam,
            src_len=self.src_len,
            dst_len=self.dst_len,
            wild=self.wild,
            src=_addr16(int(pkt.src) & _prefix_mask(self.src_len, fam), fam),
            dst=_addr16(int(pkt.dst) & _prefix_mask(self.dst_len, fam), fam),
            sport=0 if self.sport_wild else pkt.sport,
            dport=0 if self.dport_wild else pkt.dport,
            proto=PROTO_ANY if self.proto_wild else pkt.proto,
        )

    def template(self) -> MaskedKey:
        """Its slot in the datapath's mask array: a key whose header (family, lengths, wild)
        is that of every key under this mask and whose address, port and protocol fields
        are the bits a packet keeps, so that ``key = packet AND template`` field by field
        (the datapath's :meth:`apply`, without a branch)."""
        fam = self.family
        return MaskedKey(
            family=fam,
            src_len=self.src_len,
            dst_len=self.dst_len,
            wild=self.wild,
            src=_addr16(_prefix_mask(self.src_len, fam), fam),
            dst=_addr16(_prefix_mask(self.dst_len, fam), fam),
            sport=0 if self.sport_wild else 0xFFFF,
            dport=0 if self.dport_wild else 0xFFFF,
            proto=0 if self.proto_wild else 0xFF,
        )


def compile_masks(filters: Iterable[Filter], *, limit: int = MAX_MASKS_PER_FAMILY) -> list[Mask]:
    """Distinct masks of ``filters``, IPv4 then IPv6, each most specific first
    (:meth:`Mask.sort_key`). Raises :class:`MaskLimitError` past ``limit`` per family."""
    return _within_limit(sorted({f.mask() for f in filters}, key=Mask.sort_key), limit)


def _within_limit(masks: list[Mask], limit: int) -> list[Mask]:
    for fam in (4, 6):
        n = sum(1 for m in masks if m.family == fam)
        if n > limit:
            raise MaskLimitError(
                f"{n} distinct IPv{fam} filter masks, the datapath has room for {limit}; "
                "use fewer distinct prefix lengths/wildcard combinations"
            )
    return masks


def assign_mask_slots(current: Mapping[Mask, int], needed: Iterable[Mask], *,
                      limit: int = MAX_MASKS_PER_FAMILY) -> dict[Mask, int]:
    """Slots of the datapath's mask array for ``needed``: IPv4 masks in ``0..limit-1``, IPv6
    masks in ``limit..2*limit-1``. A mask of ``current`` that is still needed keeps its slot
    (packets in flight keep finding it); a new one takes the lowest free slot of its family
    (the datapath's loop ends after the highest candidate). Raises :class:`MaskLimitError`
    (before anything is written) past ``limit`` distinct masks in a family."""
    masks = _within_limit(sorted(set(needed), key=Mask.sort_key), limit)
    out = {m: s for m, s in current.items() if m in set(masks)}
    for fam, base in ((4, 0), (6, limit)):
        taken = {s for m, s in out.items() if m.family == fam}
        free = (s for s in range(base, base + limit) if s not in taken)
        for m in masks:
            if m.family == fam and m not in out:
                out[m] = next(free)
    return out


# --------------------------------------------------------------------------- reference semantics

def matches(flt: Filter, pkt: PacketTuple) -> bool:
    """Plain semantics: same family, addresses inside the prefixes, equal ports/proto unless
    wildcard (0). Ports of a non-TCP/UDP packet are 0, so they never match a non-zero port."""
    if pkt.family != flt.family:
        return False
    return (
        pkt.src in flt.src
        and pkt.dst in flt.dst
        and (flt.sport == 0 or flt.sport == pkt.sport)
        and (flt.dport == 0 or flt.dport == pkt.dport)
        and (flt.proto == PROTO_ANY or flt.proto == pkt.proto)
    )


def build_table(filters: Iterable[Filter], values: Iterable[Any] | None = None) -> dict[MaskedKey, Any]:
    """The BPF hash map's contents: masked key -> value (default: the filter's index).
    Raises :class:`DuplicateFilterError` if two filters share a key (= are equal)."""
    filters = list(filters)
    vals = list(range(len(filters))) if values is None else list(values)
    if len(vals) != len(filters):
        raise ValueError("build_table: need one value per filter")
    table: dict[MaskedKey, Any] = {}
    for flt, val in zip(filters, vals):
        key = flt.masked_key()
        if key in table:
            raise DuplicateFilterError(f"filter {flt} is already present (value {table[key]!r})")
        table[key] = val
    return table


def first_match(masks: Iterable[Mask], table: Mapping[MaskedKey, Any], pkt: PacketTuple) -> Any | None:
    """Reference of the datapath's look-up: masks in order, first hit wins; None on no hit."""
    for mask in masks:
        key = mask.apply(pkt)
        if key is not None and key in table:
            return table[key]
    return None


__all__ = [
    "DuplicateFilterError",
    "assign_mask_slots",
    "Filter",
    "KEY_STRUCT",
    "MAX_MASKS_PER_FAMILY",
    "Mask",
    "MaskLimitError",
    "MaskedKey",
    "PacketTuple",
    "build_table",
    "compile_masks",
    "expand_filter",
    "first_match",
    "matches",
    "parse_filter",
]
