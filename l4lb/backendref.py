"""A backend as a URL names it (address, optionally port), and where such a
name lands in a service: which backend it is, and whether a backend fits the
service at all. Pure: the control core raises what these raise."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from l4lb.issues import Invalid, Issue, NotFound
from l4lb.models import Backend, IPAddress, Service


@dataclass(frozen=True)
class BackendRef:
    """A backend named in a URL: address and, optionally, port."""

    address: IPAddress
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> "BackendRef":
        """``192.0.2.1``, ``192.0.2.1:8080``, ``2001:db8::1``, ``[2001:db8::1]:8080``."""
        host, port = text, None
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"{text!r} is not [IPv6]:port")
            port = rest[1:] if rest else None
        elif text.count(":") == 1:
            host, _, port = text.partition(":")
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv4 or IPv6 address") from None
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
            raise ValueError(f"{host!r} has a zone index; backends are named by their global address")
        if port is not None:
            if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
                raise ValueError(f"port {port!r} must be 1-65535")
            return cls(addr, int(port))
        return cls(addr, None)

    def __str__(self) -> str:
        if self.port is None:
            return str(self.address)
        return f"[{self.address}]:{self.port}" if self.address.version == 6 else f"{self.address}:{self.port}"

    def index_in(self, svc: Service) -> int:
        """The position of the backend this names in ``svc``: by address alone only if that is unambiguous."""
        if self.port is not None:
            want = (self.address.exploded, self.port)
            for i, b in enumerate(svc.backends):
                if b.identity(svc.port) == want:
                    return i
        else:
            hits = [i for i, b in enumerate(svc.backends) if b.address == self.address]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                ports = ", ".join(str(svc.backends[i].identity(svc.port)[1]) for i in hits)
                raise Invalid(
                    f"service {svc.name!r} has backend {self.address} on ports {ports}; name one as address:port",
                    [Issue(("path", "backend"), "ambiguous: add the port", "ambiguous")],
                )
        raise NotFound(f"service {svc.name!r} has no backend {self}",
                       [Issue(("path", "backend"), "no such backend", "not_found")])


def check_backend_fits(svc: Service, b: Backend) -> None:
    """Refuse a backend the service cannot send to: an IPv4 backend of an IPv6 VIP, or
    another port than the service's without L4 DNAT."""
    if b.address.version != svc.vip.version and svc.vip.version == 6:  # a v4 VIP may have v6 backends: 4in6
        raise Invalid(
            f"backend {b.address} is IPv4 but VIP {svc.vip} is IPv6 (an IPv4 VIP may have IPv6 backends, not the reverse)",
            [Issue(("path", "backend"), f"IPv{b.address.version} backend for an IPv{svc.vip.version} VIP",
                   "family_mismatch")],
        )
    if b.port is not None and b.port != svc.port and not svc.options.l4_dnat:
        raise Invalid(
            f"backend {b.address} has port {b.port} but the service port is {svc.port}; "
            "set options.l4_dnat on the service to translate ports",
            [Issue(("body", "port"), "differs from the service port and l4_dnat is off", "port_mismatch")],
        )
