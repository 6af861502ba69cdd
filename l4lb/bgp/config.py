"""The ``[bgp]`` section of l4lbd.toml: validated, no side effects (strict like the rest).

    [bgp]
    local_as = 65010
    router_id = "192.0.2.1"
    [[bgp.peers]]
    address = "192.0.2.254"
    remote_as = 65000
    bfd = true
    [bgp.services.web]            # optional, per service name
    communities = ["65010:80"]
    med = 10

Passwords live in files (``password_file``, not readable by other users), as
the API token does: a secret in the config file leaks with it.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from l4lb.names import valid_name
from l4lb.scalars import Bool, Int, Num

ASN = Field(ge=1, le=4294967295)
# RFC 1997 standard communities "a:b" (16-bit halves) and RFC 8092 large ones "a:b:c" (32-bit parts).
COMMUNITY_RE = re.compile(r"^\d{1,10}:\d{1,10}(:\d{1,10})?$")
GRACEFUL_SHUTDOWN = "65535:0"   # RFC 8326


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_community(c: str) -> str:
    if not COMMUNITY_RE.match(c):
        raise ValueError(f"{c!r} is not a community: write ASN:VALUE (e.g. 65010:80) or a large one ASN:X:Y")
    parts = [int(x) for x in c.split(":")]
    top = 0xFFFF if len(parts) == 2 else 0xFFFFFFFF
    if any(p > top for p in parts):
        raise ValueError(f"{c!r}: each part of a {'standard' if len(parts) == 2 else 'large'} community "
                         f"is at most {top}")
    return c


class Attributes(_Section):
    """Attributes added to announced prefixes (every prefix, or one service's)."""

    communities: tuple[str, ...] = ()
    med: Int | None = Field(default=None, ge=0, le=4294967295)

    @field_validator("communities")
    @classmethod
    def _communities(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_community(c) for c in v)


class Peer(_Section):
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    remote_as: Int = ASN
    bfd: Bool = False
    password_file: Path | None = None
    local_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    password: SecretStr | None = Field(default=None, exclude=True, repr=False)  # read from password_file

    @model_validator(mode="before")
    @classmethod
    def _no_inline_password(cls, data: Any) -> Any:
        if isinstance(data, dict) and "password" in data:
            raise ValueError("put the BGP password in a file and name it with password_file")
        return data

    @model_validator(mode="after")
    def _load(self) -> "Peer":
        if self.local_address is not None and self.local_address.version != self.address.version:
            raise ValueError(f"local_address {self.local_address} and address {self.address} differ in family")
        if self.password_file is not None:
            from l4lb.config import read_secret  # late: l4lb.config imports this module

            secret = read_secret(self.password_file, "password_file", 1)
            if '"' in secret or "\\" in secret:
                raise ValueError(f"password_file {self.password_file}: the password may not hold '\"' or '\\'")
            object.__setattr__(self, "password", SecretStr(secret))
        return self


class Bfd(_Section):
    interval_ms: Int = Field(default=100, ge=10, le=10000, description="BFD tx/rx interval")
    multiplier: Int = Field(default=3, ge=1, le=255)


class BgpSection(_Section):
    local_as: Int = ASN
    router_id: ipaddress.IPv4Address
    peers: list[Peer] = Field(min_length=1)
    next_hop_v4: ipaddress.IPv4Address | None = Field(default=None, description="default: the session's address")
    next_hop_v6: ipaddress.IPv6Address | None = None
    hold_time: Int = Field(default=90, ge=3, le=65535)
    connect_retry: Int = Field(default=5, ge=1, le=3600, description="seconds between connection attempts")
    # BIRD's "error wait time": after a session fails (BFD down, an error from the peer) BIRD
    # waits this long before trying again, doubling from the first to the second figure.
    error_wait: tuple[Int, Int] = Field(default=(60, 300), description="seconds: first and longest wait")
    bfd: Bfd = Bfd()
    communities: tuple[str, ...] = ()            # on every prefix
    med: Int | None = Field(default=None, ge=0, le=4294967295)
    services: dict[str, Attributes] = Field(default_factory=dict)
    # Box drain: first make the prefixes unattractive, then withdraw them.
    drain_delay: Num = Field(default=30.0, ge=0, le=86400, description="seconds from drain to withdraw")
    drain_med: Int | None = Field(default=4294967295, ge=0, le=4294967295)
    drain_prepend: Int = Field(default=3, ge=0, le=16, description="extra copies of local_as while draining")
    drain_graceful_shutdown: Bool = Field(default=True, description="add the RFC 8326 community while draining")
    speaker: str = Field(default="bird", pattern="^bird$", description="the BGP speaker l4lbd drives")
    bird_socket: Path = Path("/run/bird/bird.ctl")
    bird_include: Path = Path("/run/l4lbd/bird/l4lbd.conf")
    birdc: str = "birdc"
    poll_interval: Num = Field(default=2.0, gt=0, le=60, description="seconds between session-state reads")

    @field_validator("communities")
    @classmethod
    def _communities(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_community(c) for c in v)

    @field_validator("services")
    @classmethod
    def _names(cls, v: dict[str, Attributes]) -> dict[str, Attributes]:
        for name in v:
            if not valid_name(name):
                raise ValueError(f"{name!r} is not a service name")
        return v

    @field_validator("bird_socket", "bird_include")
    @classmethod
    def _abs(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"must be an absolute path, not {str(v)!r}")
        return v

    @field_validator("error_wait")
    @classmethod
    def _error_wait(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1] <= 86400:
            raise ValueError(f"error_wait must be [first, longest] seconds with 1 <= first <= longest <= 86400, not {list(v)}")
        return v

    @model_validator(mode="after")
    def _peers(self) -> "BgpSection":
        seen = set()
        for p in self.peers:
            if p.address in seen:
                raise ValueError(f"peer {p.address} is listed twice")
            seen.add(p.address)
        return self

    def attributes(self, service: str) -> Attributes:
        return self.services.get(service, Attributes())
