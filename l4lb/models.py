"""Validated desired-state models shared by the datapath, the daemon and the API.

Pure: no kernel, no I/O. Everything that reaches the datapath has passed through
these models, so the datapath can trust families, ports and limits.
"""

from __future__ import annotations

import ipaddress
from enum import Enum
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationInfo, field_validator,
    model_validator,
)

from l4lb.addresses import IPAddress, unusable
from l4lb.names import NAME_RULE, valid_name

# Validation context for documents read back from the store: rules added after
# a row was written (address classes, the name pattern) must not stop the
# daemon from starting; the store logs what such a row breaks.
STORED = {"stored": True}


def _stored(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("stored"))


@lru_cache(maxsize=1 << 17)
def _ip_or_none(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _parse_ip(v: Any) -> Any:
    """Parse each distinct address text once: a 100,000-backend document names
    the same servers for many VIPs, and parsing was most of its validation.
    Text that is no address goes on to the type's own validator, which words the error.
    Only text (or an address object) is an address: pydantic would take 1 as 0.0.0.1."""
    if isinstance(v, str):
        ip = _ip_or_none(v)
        if ip is not None:
            return ip
        return v
    if isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return v
    raise ValueError(f"an address is a string such as \"192.0.2.1\" or \"2001:db8::1\", not {type(v).__name__} {v!r}")


def _usable(v: IPAddress, info: ValidationInfo) -> IPAddress:
    problem = None if _stored(info) else unusable(v)
    if problem is not None:
        raise ValueError(f"{problem}: not usable as a VIP or backend")
    return v


Address = Annotated[IPAddress, BeforeValidator(_parse_ip), AfterValidator(_usable)]


@lru_cache(maxsize=1 << 17)
def _exploded(addr: IPAddress) -> str:
    return addr.exploded

# Prime table sizes allowed for Maglev (the paper and Cilium use primes so every
# skip value generates a full permutation).
MAGLEV_SIZES: tuple[int, ...] = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)
DEFAULT_MAGLEV_M = 16381

MAX_BACKENDS_PER_SERVICE = 1024
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


class Backend(_Strict):
    address: Address
    port: Port | None = Field(
        default=None, description="Backend port; used only with l4_dnat. Defaults to the service port."
    )
    weight: Weight = 100
    state: BackendState = BackendState.active

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
    maglev_weights: Flag = Field(default=True, description="Honour backend weights (false = all equal)")


class Service(_Strict):
    name: str
    vip: Address
    port: Port
    protocol: Protocol = Protocol.tcp
    options: ServiceOptions = ServiceOptions()
    backends: list[Backend] = Field(default_factory=list, max_length=MAX_BACKENDS_PER_SERVICE)
    announce: bool = Field(default=True, description="Announce the VIP over BGP while this box can serve it "
                           "(only when [bgp] is configured)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str, info: ValidationInfo) -> str:
        if not valid_name(v) and not _stored(info):
            raise ValueError(f"name must be {NAME_RULE}")
        return v

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "Service":
        seen: set[tuple[IPAddress, int]] = set()
        for i, b in enumerate(self.backends):
            if b.address == self.vip and not _stored(info):
                raise FieldError(f"backend {b.address} is the service's own VIP: its packets would come back "
                                 "to the load balancer", ("backends", i, "address"))
            if b.address.version != self.vip.version:
                raise FieldError(
                    f"backend {b.address} is IPv{b.address.version} but VIP {self.vip} is IPv{self.vip.version}",
                    ("backends", i, "address"),
                )
            if b.port is not None and b.port != self.port and not self.options.l4_dnat:
                raise FieldError(
                    f"backend {b.address} has port {b.port} but the service port is {self.port}; "
                    "set options.l4_dnat to translate ports",
                    ("backends", i, "port"),
                )
            ident = (b.address, b.port or self.port)
            if ident in seen:
                raise FieldError(f"backend {b.address} port {ident[1]} is listed twice", ("backends", i))
            seen.add(ident)
        return self

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


@lru_cache(maxsize=1 << 14)
def _service_key(vip: IPAddress, port: int, protocol: str) -> tuple[str, int, str]:
    # Formatting the VIP is most of the cost when an apply looks at 1,000 services.
    return (vip.exploded, port, protocol)
