"""Validated desired-state models shared by the datapath, the daemon and the API.

Pure: no kernel, no I/O. Everything that reaches the datapath has passed through
these models, so the datapath can trust families, ports and limits.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from enum import Enum
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, ValidationInfo,
    ValidatorFunctionWrapHandler, WrapValidator, field_validator, model_validator,
)

from l4lb.addresses import IPAddress, unusable
from l4lb.addrtext import exploded
from l4lb.names import NAME_RULE, valid_name

# Validation context for documents read back from the store: rules added after
# a row was written (address classes, the name pattern) must not stop the
# daemon from starting; the store logs what such a row breaks.
STORED = {"stored": True}


def _stored(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("stored"))


_HEX_COLON = frozenset("0123456789abcdefABCDEF:")


@lru_cache(maxsize=1 << 17)
def _ip_or_none(text: str) -> IPAddress | None:
    # The family by its separator: ip_address() tries IPv4 first, and the
    # failed attempt (an exception) cost as much as the IPv6 parse itself.
    if ":" in text and _HEX_COLON.issuperset(text):
        # Plain hex-and-colons IPv6 text: the C parser, ~10x faster than
        # ipaddress's (which took ~1 s for a restart's 100,000 distinct
        # backends); over this alphabet both accept exactly the same texts as
        # the same addresses (tests/test_addresses.py). Anything it refuses
        # goes the slow way below, which has the last word.
        try:
            return ipaddress.IPv6Address(int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big"))
        except OSError:
            pass
    try:
        return ipaddress.IPv6Address(text) if ":" in text else ipaddress.IPv4Address(text)
    except ValueError:
        return None


@lru_cache(maxsize=1 << 17)
def _address_text(text: str) -> tuple[IPAddress, str | None] | None:
    """An address text parsed and judged once: (the address, why it is unusable or
    None), or None for text that is no address. One look-up by the text's (C) hash
    per backend: judging the parsed address again (its Python-level hash, for the
    class cache) was a third of a 100,000-backend document's validation."""
    ip = _ip_or_none.__wrapped__(text)  # this cache holds it: not twice
    return None if ip is None else (ip, unusable(ip))


def _address(v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
    """Parse and judge each distinct address text once: a 100,000-backend document
    names the same servers for many VIPs, and parsing was most of its validation.
    An address is returned as it is: pydantic's own union validator would try it
    as IPv4 first, which for an IPv6 address costs a str() and a failed parse.
    Text that is no address goes on to that validator, which words the error.
    Only text (or an address object) is an address: pydantic would take 1 as
    0.0.0.1. Addresses of no use to a load balancer are refused, except in rows
    read back from the store (STORED)."""
    if isinstance(v, str):
        hit = _address_text(v)
        if hit is None:
            ip = handler(v)
            problem = unusable(ip)
        else:
            ip, problem = hit
    elif isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip, problem = v, unusable(v)
    else:
        raise ValueError(f"an address is a string such as \"192.0.2.1\" or \"2001:db8::1\", not {type(v).__name__} {v!r}")
    if problem is not None and not _stored(info):
        raise ValueError(f"{problem}: not usable as a VIP or backend")
    return ip


Address = Annotated[IPAddress, WrapValidator(_address)]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_cidr(v: Any) -> Any:
    """A source range is written as a network with its prefix length and no
    host bits ("192.0.2.0/24", "2001:db8::/32"): "192.0.2.1/24" is most
    likely a typo for something else, and a bare address is written /32 or /128."""
    if isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return v
    if not isinstance(v, str):
        raise ValueError(f"a source range is a string such as \"192.0.2.0/24\", not {type(v).__name__} {v!r}")
    addr, slash, plen = v.partition("/")
    if not slash:
        ip = _ip_or_none(v)
        if ip is None:
            raise ValueError(f"{v!r} is not a CIDR prefix such as 192.0.2.0/24 or 2001:db8::/32")
        raise ValueError(f"{v!r} has no prefix length: write {v}/{ip.max_prefixlen} for that one address")
    try:
        return ipaddress.ip_network(v, strict=True)
    except ValueError as e:
        try:
            net = ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ValueError(f"{v!r} is not a CIDR prefix such as 192.0.2.0/24 or 2001:db8::/32 ({e})") from None
        raise ValueError(f"{v!r} has host bits set: the prefix is {net}") from None


SourceRange = Annotated[IPNetwork, BeforeValidator(_parse_cidr)]


def _exploded(addr: IPAddress) -> str:
    # Not cached by address: IPv6Address hashes of structured addresses collide
    # (int hashes fold mod 2^61-1), and ipaddress's own exploded takes ~10 µs for IPv6.
    return exploded(addr)

# Prime table sizes allowed for Maglev (the paper and Cilium use primes so every
# skip value generates a full permutation).
MAGLEV_SIZES: tuple[int, ...] = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_MAGLEV_M = 16381

MAX_BACKENDS_PER_SERVICE = 1024
# An allowlist is a handful of client networks; thousands of ranges per service
# would be a firewall's job, and each costs the datapath an LPM-trie node.
MAX_SOURCE_RANGES_PER_SERVICE = 256
MAX_WEIGHT = 65535


class FieldError(ValueError):
    """A ValueError that knows which field it is about (relative to the model
    that raises it). Pydantic keeps the exception in the error's ``ctx``, so the
    API can report e.g. ``body.backends.2.address`` instead of just ``body``."""

    def __init__(self, message: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.loc = loc


class Protocol(str, Enum):
    tcp = "tcp"
    udp = "udp"

    @property
    def number(self) -> int:
        return 6 if self is Protocol.tcp else 17


class BackendState(str, Enum):
    active = "active"          # takes new flows according to its weight
    draining = "draining"      # weight 0 in Maglev: no new flows, existing flows stay
    maintenance = "maintenance"  # out of the table and existing flows moved away


# Strict: JSON true is not port 1, 80.0 is not port 80.
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]
Weight = Annotated[int, Strict(), Field(ge=0, le=MAX_WEIGHT)]
Flag = Annotated[bool, Strict()]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- health checks (run by l4lb/health; runtime health never enters the document) ---


class CheckType(str, Enum):
    none = "none"
    tcp = "tcp"            # connect
    http = "http"
    https = "https"
    udp_dns = "udp-dns"    # a query for `query`; any reply to it with RCODE NOERROR


HTTP_CHECKS = (CheckType.http, CheckType.https)
CheckVia = Literal["tunnel", "direct"]
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no space, CR or LF (header-safe)
_DNS_NAME_RE = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                          r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?")


def status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """``"200-399"`` / ``"200,204,301-302"`` -> ((200, 399), ...); ValueError names the bad part."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not (lo.isdigit() and (hi.isdigit() or not _)) or not 100 <= int(lo) <= int(hi or lo) <= 599:
            raise ValueError(f"{part.strip()!r} is not a status code or range between 100 and 599")
        out.append((int(lo), int(hi or lo)))
    return tuple(out)


def _check_token(v: str | None, what: str) -> str | None:
    if v is not None and not _TOKEN_RE.fullmatch(v):
        raise ValueError(f"{what} must be 1-255 printable ASCII characters without spaces")
    return v


class HealthCheck(_Strict):
    """How a service's backends are checked. Absent (``health: null``): never."""

    type: CheckType
    port: Port | None = Field(default=None, description="Port to check; default the backend's port")
    via: CheckVia = Field(default="tunnel", description="tunnel: to VIP:port encapsulated to the backend, "
                          "as clients reach it; direct: to the backend's own address")
    interval: Annotated[float, Strict()] = Field(default=2.0, ge=0.1, le=3600, description="Seconds between checks")
    timeout: Annotated[float, Strict()] = Field(default=1.0, ge=0.01, le=3600, description="Seconds; at most the interval "
                           "(default 1, or the interval if shorter)")
    rise: Annotated[int, Strict()] = Field(default=2, ge=1, le=100, description="Consecutive successes that bring a backend up")
    fall: Annotated[int, Strict()] = Field(default=3, ge=1, le=100, description="Consecutive failures that take it down")
    on_all_down: Literal["fail_open", "fail_closed"] = Field(
        default="fail_open", description="All backends down: keep using all of them (fail_open) or none")
    method: Literal["GET", "HEAD"] | None = Field(default=None, description="http(s); default GET")
    path: str | None = Field(default=None, description="http(s); default /")
    host: str | None = Field(default=None, description="http(s) Host header and TLS SNI; default the "
                             "address connected to (the VIP through the tunnel)")
    expect_status: str | None = Field(default=None, description="http(s) codes/ranges, default 200-399")
    body_contains: str | None = Field(default=None, max_length=1024, description="http(s) GET: substring "
                                      "of the first 64 KiB of the body")
    tls_verify: Flag | None = Field(default=None, description="https: verify the certificate (default false)")
    query: str | None = Field(default=None, description="udp-dns: the name asked for (required)")
    query_type: Literal["A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_timeout(cls, data: Any) -> Any:
        if isinstance(data, dict) and "timeout" not in data and isinstance(data.get("interval"), (int, float)):
            return {**data, "timeout": min(1.0, data["interval"])}
        return data

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("path must start with /")
        return _check_token(v, "path")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        return _check_token(v, "host")

    @field_validator("expect_status")
    @classmethod
    def _status(cls, v: str | None) -> str | None:
        if v is not None:
            status_ranges(v)
        return v

    @field_validator("query")
    @classmethod
    def _query(cls, v: str | None) -> str | None:
        if v is not None and not _DNS_NAME_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a DNS name")
        return v

    @model_validator(mode="after")
    def _fits_type(self) -> "HealthCheck":
        if self.timeout > self.interval:
            raise FieldError(f"timeout {self.timeout} s is longer than the interval {self.interval} s", ("timeout",))
        http = ("method", "path", "host", "expect_status", "body_contains", "tls_verify")
        for name in http if self.type not in HTTP_CHECKS else ("tls_verify",) if self.type is CheckType.http else ():
            if getattr(self, name) is not None:
                raise FieldError(f"{name} applies to {'https' if name == 'tls_verify' else 'http/https'} "
                                 f"checks, not {self.type.value}", (name,))
        if self.body_contains is not None and self.method == "HEAD":
            raise FieldError("body_contains needs method GET (a HEAD response has no body)", ("body_contains",))
        for name in ("query", "query_type"):
            if self.type is not CheckType.udp_dns and getattr(self, name) is not None:
                raise FieldError(f"{name} applies to udp-dns checks, not {self.type.value}", (name,))
        if self.type is CheckType.udp_dns and self.query is None:
            raise FieldError("a udp-dns check needs query (the name to ask for)", ("query",))
        return self


class HealthOverride(_Strict):
    """One backend's changes to its service's check (``type: none`` exempts it)."""

    type: CheckType | None = None
    port: Port | None = None
    via: CheckVia | None = None
    path: str | None = None
    host: str | None = None

    def over(self, check: HealthCheck | None) -> HealthCheck:
        """The check this backend gets (ValueError if the result is not a valid check)."""
        update = {k: v for k, v in self if v is not None}
        if self.type is CheckType.none:
            return HealthCheck(type=CheckType.none)
        if check is None and "type" not in update:
            raise ValueError("the service has no health check: give the override a type")
        return HealthCheck.model_validate({**(check.model_dump() if check else {}), **update})


class Backend(_Strict):
    address: Address
    port: Port | None = Field(
        default=None, description="Backend port; used only with l4_dnat. Defaults to the service port."
    )
    weight: Weight = 100
    state: BackendState = BackendState.active
    health: HealthOverride | None = Field(default=None, description="Changes to the service's health check")

    @property
    def family(self) -> int:
        return self.address.version

    @property
    def effective_weight(self) -> int:
        """Weight Maglev uses: draining and maintenance backends take no new flows."""
        return self.weight if self.state is BackendState.active else 0

    def identity(self, service_port: int) -> tuple[str, int]:
        """What the Maglev table is built from: never local IDs or insertion order."""
        return (_exploded(self.address), self.port or service_port)


class ServiceOptions(_Strict):
    l4_dnat: Flag = Field(default=False, description="Rewrite the destination port to the backend port")
    hash_src_port: Flag = Field(
        default=True, description="Include the client port in the flow hash (false = client-IP affinity)"
    )
    affinity_prefix: Annotated[int, Strict()] | None = Field(
        default=None, ge=0, le=128, description="Client-IP affinity by network: clients whose addresses share "
        "this many leading bits share a backend (IPVS -M, keepalived persistence_granularity); IPv4 0-32, "
        "IPv6 0-128; needs hash_src_port false. Default: the whole address")
    maglev_weights: Flag = Field(default=True, description="Honour backend weights (false = all equal)")
    no_backend: Literal["reject", "drop"] = Field(
        default="reject", description="No usable backend: reject (TCP RST / ICMP port unreachable) or drop"
    )
    answer_ping: Flag = Field(default=True, description="The LB answers ICMP echo requests to the VIP")


class Service(_Strict):
    name: str
    vip: Address
    port: Port
    protocol: Protocol = Protocol.tcp
    options: ServiceOptions = ServiceOptions()
    backends: list[Backend] = Field(default_factory=list, max_length=MAX_BACKENDS_PER_SERVICE)
    announce: bool = Field(default=True, description="Announce the VIP over BGP while this box can serve it "
                           "(only when [bgp] is configured)")
    health: HealthCheck | None = Field(default=None, description="Backend health check (none: never checked)")
    source_ranges: list[SourceRange] = Field(
        default_factory=list, max_length=MAX_SOURCE_RANGES_PER_SERVICE,
        description="Clients allowed to reach the service: CIDR prefixes of the VIP's family (empty: every client); "
        "others are dropped in the datapath (reason drop_source_range)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str, info: ValidationInfo) -> str:
        if not valid_name(v) and not _stored(info):
            raise ValueError(f"name must be {NAME_RULE}")
        return v

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "Service":
        self._check_ranges()
        self._check_affinity()
        # Per backend, only C-level work where it can be (ipaddress's hash, == and
        # version are Python methods): 100,000 backends pass through here.
        seen: set[tuple[IPAddress, int]] = set()
        stored, vip, vip_type = _stored(info), self.vip, type(self.vip)
        for i, b in enumerate(self.backends):
            if b.address == vip and not stored:
                raise FieldError(f"backend {b.address} is the service's own VIP: its packets would come back "
                                 "to the load balancer", ("backends", i, "address"))
            if type(b.address) is not vip_type:
                # IPv4 in IPv6 (4in6) is how v6-only backend fabrics serve v4 clients;
                # the reverse (IPv6 over an IPv4 fabric) is not offered.
                if self.vip.version == 6:
                    raise FieldError(f"backend {b.address} is IPv4 but VIP {self.vip} is IPv6 (an IPv4 VIP may "
                                     "have IPv6 backends, encapsulated IPv4-in-IPv6; not the reverse)",
                                     ("backends", i, "address"))
                check = b.health.over(self.health) if b.health is not None else self.health
                if check is not None and check.type is not CheckType.none and check.via == "tunnel":
                    raise FieldError(f"backend {b.address}: health checks through the tunnel are not offered for "
                                     "IPv6 backends of an IPv4 VIP yet: use via: direct", ("backends", i, "health"))
            if b.port is not None and b.port != self.port and not self.options.l4_dnat:
                raise FieldError(
                    f"backend {b.address} has port {b.port} but the service port is {self.port}; "
                    "set options.l4_dnat to translate ports",
                    ("backends", i, "port"),
                )
            if b.health is not None:
                try:
                    b.health.over(self.health)
                except (ValueError, ValidationError) as e:
                    msg = "; ".join(_messages(e)) if isinstance(e, ValidationError) else str(e)
                    raise FieldError(f"backend {b.address}: health: {msg}", ("backends", i, "health")) from None
            ident = (b.address, b.port or self.port)
            before = len(seen)
            seen.add(ident)  # one hash: added, or listed twice
            if len(seen) == before:
                raise FieldError(f"backend {b.address} port {ident[1]} is listed twice", ("backends", i))
        return self

    def _check_ranges(self) -> None:
        seen: set[IPNetwork] = set()
        for i, net in enumerate(self.source_ranges):
            if net.version != self.vip.version:
                raise FieldError(f"source range {net} is IPv{net.version} but VIP {self.vip} is IPv{self.vip.version}: "
                                 "clients reach a VIP in its own family", ("source_ranges", i))
            if net in seen:
                raise FieldError(f"source range {net} is listed twice", ("source_ranges", i))
            seen.add(net)

    def _check_affinity(self) -> None:
        plen = self.options.affinity_prefix
        if plen is None:
            return
        if plen > self.vip.max_prefixlen:
            raise FieldError(f"affinity_prefix {plen} is longer than an IPv{self.vip.version} address "
                             f"({self.vip.max_prefixlen} bits)", ("options", "affinity_prefix"))
        if self.options.hash_src_port:
            raise FieldError("affinity_prefix groups clients by network for client-IP affinity: it needs "
                             "hash_src_port false", ("options", "affinity_prefix"))

    @property
    def key(self) -> tuple[str, int, str]:
        """(VIP, port, protocol): what the datapath looks services up by."""
        return _service_key(self.vip, self.port, self.protocol.value)

    def maglev_weights(self) -> dict[tuple[str, int], int]:
        """Backend identity -> Maglev weight."""
        return {
            b.identity(self.port): (b.effective_weight if self.options.maglev_weights else (1 if b.effective_weight else 0))
            for b in self.backends
        }


class DesiredState(_Strict):
    """The whole service set, applied as one transaction."""

    services: list[Service] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> "DesiredState":
        names: set[str] = set()
        keys: dict[tuple[str, int, str], str] = {}
        for i, s in enumerate(self.services):
            if s.name in names:
                raise FieldError(f"service name {s.name!r} is used twice", ("services", i, "name"))
            names.add(s.name)
            if s.key in keys:
                raise FieldError(
                    f"services {keys[s.key]!r} and {s.name!r} both use {s.vip} port {s.port}/{s.protocol.value}",
                    ("services", i),
                )
            keys[s.key] = s.name
        return self


Family = Literal[4, 6]


def _messages(err: ValidationError) -> list[str]:
    return [str(e["msg"]).removeprefix("Value error, ") for e in err.errors(include_url=False)]


@lru_cache(maxsize=1 << 14)
def _service_key(vip: IPAddress, port: int, protocol: str) -> tuple[str, int, str]:
    # Formatting the VIP is most of the cost when an apply looks at 1,000 services.
    return (vip.exploded, port, protocol)
