"""click parameter types for the operator's syntax (bad values are usage errors, exit 2)."""

from __future__ import annotations

from typing import Any

import click

from l4lb.names import NAME_RULE, valid_name

from .specs import BackendRef, ServiceAddress


class BackendRefType(click.ParamType):
    name = "BACKEND"

    def __init__(self, allow_weight: bool = False) -> None:
        self.allow_weight = allow_weight

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> BackendRef:
        if isinstance(value, BackendRef):
            return value
        try:
            return BackendRef.parse(str(value), allow_weight=self.allow_weight)
        except ValueError as e:
            self.fail(f"{e} (use ADDR, ADDR:PORT or [IPv6]:PORT{'[@WEIGHT]' if self.allow_weight else ''})",
                      param, ctx)


class ServiceAddressType(click.ParamType):
    name = "VIP:PORT[/PROTO]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> ServiceAddress:
        if isinstance(value, ServiceAddress):
            return value
        try:
            return ServiceAddress.parse(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class NameType(click.ParamType):
    name = "NAME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not valid_name(str(value)):
            self.fail(f"{value!r}: {NAME_RULE}", param, ctx)
        return str(value)


class IPType(click.ParamType):
    name = "ADDRESS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        import ipaddress

        try:
            return str(ipaddress.ip_address(str(value).strip("[]")))
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 or IPv6 address", param, ctx)


class CidrType(click.ParamType):
    """A source range, checked as the service model checks it (strict: no host bits)."""

    name = "CIDR"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from l4lb.models import _parse_cidr

        try:
            return str(_parse_cidr(str(value).strip()))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class PrefixType(click.ParamType):
    """A prefix length 0-128, or ``none`` (the whole address)."""

    name = "BITS|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        text = str(value).strip().lower()
        if text == "none":
            return "none"
        if text.isdigit() and 0 <= int(text) <= 128:
            return int(text)
        self.fail(f"{value!r} is not a prefix length (0-32 for IPv4, 0-128 for IPv6) or 'none'", param, ctx)


BACKEND = BackendRefType()
BACKEND_WEIGHTED = BackendRefType(allow_weight=True)
SERVICE_ADDRESS = ServiceAddressType()
NAME = NameType()
IP = IPType()
CIDR = CidrType()
PREFIX = PrefixType()
PORT = click.IntRange(1, 65535)
WEIGHT = click.IntRange(0, 65535)
PROTOCOL = click.Choice(["tcp", "udp"], case_sensitive=False)
STATE = click.Choice(["active", "draining", "maintenance"], case_sensitive=False)
