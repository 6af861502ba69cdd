"""Parsing what operators type: service addresses and backend references.

The daemon validates everything again; parsing here gives a usage error (exit 2)
before any request, and lets the CLI build URLs and compare backend identities.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PROTOCOLS = ("tcp", "udp")


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{what} port {text!r} must be 1-65535")
    return int(text)


def _address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid IPv4 or IPv6 address") from None


def split_hostport(text: str) -> tuple[IPAddress, int | None]:
    """``ADDR``, ``ADDR:PORT``, ``V6`` or ``[V6]:PORT`` (as the API's backend paths)."""
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")) or rest == ":":
            raise ValueError(f"{text!r} is not [IPv6]:PORT")
        port = rest[1:] or None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    addr = _address(host)
    if text.startswith("[") and addr.version != 6:
        raise ValueError(f"{text!r}: brackets are for IPv6 addresses")
    return addr, (_port(port, "the") if port is not None else None)


def hostport(address: str | IPAddress, port: int | None) -> str:
    """How the CLI prints an endpoint: ``192.0.2.1:80``, ``[2001:db8::1]:80``."""
    addr = ipaddress.ip_address(address)
    if port is None:
        return str(addr)
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


@dataclass(frozen=True)
class BackendRef:
    address: IPAddress
    port: int | None = None
    weight: int | None = None

    @classmethod
    def parse(cls, text: str, *, allow_weight: bool = False) -> "BackendRef":
        """``ADDR``, ``ADDR:PORT``, ``[V6]:PORT``; with ``allow_weight`` also ``...@WEIGHT``."""
        weight = None
        if allow_weight and "@" in text:
            text, _, w = text.rpartition("@")
            if not w.isdigit() or int(w) > 65535:
                raise ValueError(f"weight {w!r} must be 0-65535")
            weight = int(w)
        addr, port = split_hostport(text)
        return cls(addr, port, weight)

    @property
    def path(self) -> str:
        """The form the API takes in a URL path segment (quoted by the client)."""
        return hostport(self.address, self.port)

    def same_identity(self, backend: dict, service_port: int) -> bool:
        """Whether ``backend`` (an API object) is this one: same address and effective port."""
        return (ipaddress.ip_address(backend["address"]) == self.address
                and (backend.get("port") or service_port) == (self.port or service_port))


@dataclass(frozen=True)
class ServiceAddress:
    vip: IPAddress
    port: int
    protocol: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ServiceAddress":
        """``VIP:PORT[/PROTO]`` or ``[V6]:PORT[/PROTO]``."""
        spec, _, proto = text.partition("/")
        if proto and proto.lower() not in PROTOCOLS:
            raise ValueError(f"protocol {proto!r} must be tcp or udp")
        addr, port = split_hostport(spec)
        if addr.version == 6 and not spec.startswith("["):
            raise ValueError(f"{text!r}: put an IPv6 VIP in brackets, e.g. [2001:db8::1]:443/tcp")
        if port is None:
            raise ValueError(f"{text!r} needs a port: VIP:PORT[/PROTO], e.g. 198.51.100.1:80/tcp or [2001:db8::1]:443")
        return cls(addr, port, proto.lower() or None)
