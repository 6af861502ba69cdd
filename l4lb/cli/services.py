"""``l4lbctl service list|show|add|edit|delete``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .client import revision_of, segment
from .context import App, complete_service, output_option, pass_app
from .errors import ApiError, CliError
from .health import ago, backend_rows, check_body, check_options, describe, health_cell
from .output import count, emit, fields, table
from .params import BACKEND_WEIGHTED, CIDR, IP, NAME, PORT, PREFIX, PROTOCOL, SERVICE_ADDRESS
from .specs import ServiceAddress, hostport

F = TypeVar("F", bound=Callable[..., Any])


def option_flags(options: dict[str, Any]) -> list[str]:
    """The service options that differ from the defaults, as the CLI's flags name them."""
    flags = []
    if options.get("l4_dnat"):
        flags.append("dnat")
    if options.get("hash_src_port") is False:
        flags.append("no-sport-hash")
    if options.get("affinity_prefix") is not None:
        flags.append(f"affinity=/{options['affinity_prefix']}")
    if options.get("maglev_weights") is False:
        flags.append("no-weights")
    if options.get("no_backend") == "drop":
        flags.append("no-backend=drop")
    if options.get("answer_ping") is False:
        flags.append("no-ping")
    return flags


def service_endpoint(svc: dict[str, Any]) -> str:
    return f"{svc['protocol']} {hostport(svc['vip'], svc['port'])}"


def option_flags_decorator(f: F) -> F:
    """Flags mirroring ServiceOptions; None = not given (server default on add, unchanged on edit)."""
    f = click.option("--ping/--no-ping", "answer_ping", default=None,
                     help="The LB answers ping to the VIP (--no-ping: unless another service on it does).")(f)
    f = click.option("--no-backend", "no_backend", type=click.Choice(["reject", "drop"]), default=None,
                     help="Without a usable backend: reject (TCP RST / ICMP port unreachable) or drop.")(f)
    f = click.option("--weights/--no-weights", "maglev_weights", default=None,
                     help="Honour backend weights in Maglev (--no-weights: all equal).")(f)
    f = click.option("--affinity-prefix", "affinity_prefix", type=PREFIX, default=None,
                     help="With --no-sport-hash: clients whose addresses share this many leading bits share "
                          "a backend (IPVS -M; IPv4 0-32, IPv6 0-128; 'none': the whole address).")(f)
    f = click.option("--sport-hash/--no-sport-hash", "hash_src_port", default=None,
                     help="Hash the client port (--no-sport-hash: client-IP affinity).")(f)
    f = click.option("--dnat/--no-dnat", "l4_dnat", default=None,
                     help="L4 DNAT: rewrite the destination port to each backend's port.")(f)
    return f


def address_options(f: F) -> F:
    f = click.option("--proto", "--protocol", "proto", type=PROTOCOL, help="tcp (default) or udp.")(f)
    f = click.option("--port", type=PORT, help="Service port (instead of VIP:PORT).")(f)
    f = click.option("--vip", type=IP, help="Virtual IP (instead of VIP:PORT).")(f)
    return f


def _merge_address(address: ServiceAddress | None, vip: str | None, port: int | None,
                   proto: str | None) -> tuple[str | None, int | None, str | None]:
    if address is not None:
        if vip is not None or port is not None:
            raise click.UsageError("give VIP:PORT[/PROTO] or --vip/--port, not both")
        if proto and address.protocol and proto.lower() != address.protocol:
            raise click.UsageError(f"protocol {address.protocol} in {hostport(address.vip, address.port)}/"
                                   f"{address.protocol} differs from --proto {proto}")
        return str(address.vip), address.port, address.protocol or (proto.lower() if proto else None)
    return vip, port, proto.lower() if proto else None


def _options(**given: Any) -> dict[str, Any]:
    """The options given; ``affinity_prefix="none"`` is an explicit null (the whole address)."""
    return {k: (None if k == "affinity_prefix" and v == "none" else v) for k, v in given.items() if v is not None}


def sources_cell(svc: dict[str, Any]) -> str:
    ranges = svc.get("source_ranges") or []
    return ", ".join(ranges) if ranges else "any"


def source_range_option(f: F) -> F:
    return click.option("--source-range", "source_ranges", type=CIDR, multiple=True,
                        help="Only clients in this CIDR prefix reach the service (repeatable; the VIP's family; "
                             "others are dropped in the datapath). Default: every client.")(f)


def show_service(svc: dict[str, Any], revision: int | None = None, health: dict[str, Any] | None = None) -> None:
    backends = svc["backends"]
    states = {s: sum(1 for b in backends if b["state"] == s) for s in ("active", "draining", "maintenance")}
    summary = count(len(backends), "backend")
    if backends:
        summary += " (" + ", ".join(f"{n} {s}" for s, n in states.items() if n) + ")"
    pairs: list[tuple[str, Any]] = [
        ("Service", svc["name"]),
        ("Address", service_endpoint(svc)),
        ("Options", ", ".join(option_flags(svc["options"])) or "defaults (sport-hash, weights, no dnat, reject, ping)"),
        ("Source ranges", sources_cell(svc)),
        ("Backends", summary),
        ("Health check", describe(svc.get("health"))),
    ]
    if health and health.get("fail_open"):
        pairs.append(("Health", "FAILING OPEN: every backend is down, all of them are kept"))
    if revision is not None:
        pairs.append(("Revision", revision))
    click.echo(fields(pairs))
    if backends:
        click.echo()
        checked = bool(health and health.get("checked"))
        hb = backend_rows(health or {})
        rows = []
        for b in backends:
            port = b.get("port") or svc["port"]
            row: list[Any] = [hostport(b["address"], port), b["weight"], b["state"]]
            if checked:
                h = hb.get((b["address"], port), {})
                row += [health_cell(h.get("health")), ago(h.get("since")), h.get("last_error") or "-"]
            rows.append(row)
        extra = ["HEALTH", "SINCE", "LAST ERROR"] if checked else []
        click.echo(table(["BACKEND", "WEIGHT", "STATE", *extra], rows))


@click.group("service", short_help="List, show, add, edit, delete services.")
def service() -> None:
    """List, show, add, edit and delete services (VIP:PORT/PROTO -> backends)."""


@service.command("list")
@output_option
@pass_app
def list_services(app: App) -> None:
    """All services, one per line."""
    data = app.client.json("GET", "/v1/services")
    if app.output != "table":
        emit(data, app.output)
        return
    services = data["services"]
    if not services:
        click.echo(f"no services (revision {data['revision']})")
        return
    rows = []
    for s in services:
        active = sum(1 for b in s["backends"] if b["state"] == "active")
        flags = option_flags(s["options"]) + ([f"sources={len(s['source_ranges'])}"] if s.get("source_ranges") else [])
        rows.append([s["name"], s["protocol"], hostport(s["vip"], s["port"]), len(s["backends"]), active,
                     ",".join(flags) or "-"])
    click.echo(table(["NAME", "PROTO", "VIP:PORT", "BACKENDS", "ACTIVE", "OPTIONS"], rows))


@service.command("show")
@click.argument("name", type=NAME, shell_complete=complete_service)
@output_option
@pass_app
def show(app: App, name: str) -> None:
    """One service with its backends."""
    r = app.client.get(f"/v1/services/{segment(name)}")
    if app.output != "table":
        emit(r.json(), app.output)
        return
    show_service(r.json(), revision_of(r), app.client.json("GET", f"/v1/services/{segment(name)}/health"))


@service.command("add")
@click.argument("name", type=NAME)
@click.argument("address", type=SERVICE_ADDRESS, required=False, metavar="[VIP:PORT[/PROTO]]")
@address_options
@option_flags_decorator
@click.option("-b", "--backend", "backends", type=BACKEND_WEIGHTED, multiple=True,
              help="A backend ADDR, ADDR:PORT or [IPv6]:PORT, optionally @WEIGHT (repeatable). An IPv4 VIP "
                   "may have IPv6 backends (IPv4-in-IPv6).")
@source_range_option
@check_options
@output_option
@pass_app
def add(app: App, name: str, address: ServiceAddress | None, vip: str | None, port: int | None, proto: str | None,
        l4_dnat: bool | None, hash_src_port: bool | None, affinity_prefix: int | str | None,
        maglev_weights: bool | None, no_backend: str | None, answer_ping: bool | None, backends: tuple[Any, ...],
        source_ranges: tuple[str, ...], check_type: str | None, check_opts: tuple[str, ...]) -> None:
    """Create service NAME; refused if it exists already.

    \b
    l4lbctl service add api 198.51.100.80:80/tcp -b 192.0.2.101 -b 192.0.2.102@50
    l4lbctl service add dns --vip 2001:db8::53 --port 53 --proto udp
    l4lbctl service add alt [2001:db8::1]:443 --dnat -b [2001:db8::10]:8443
    l4lbctl service add web 198.51.100.1:80 -b 192.0.2.1 --check http --check-opt path=/healthz
    l4lbctl service add admin 198.51.100.9:22 -b 192.0.2.9 --source-range 203.0.113.0/24
    l4lbctl service add v6fabric 198.51.100.7:443 -b 2001:db8::17 -b 2001:db8::18
    l4lbctl service add sticky 198.51.100.8:443 -b 192.0.2.8 --no-sport-hash --affinity-prefix 24
    """
    vip, port, proto = _merge_address(address, vip, port, proto)
    if vip is None or port is None:
        raise click.UsageError("give the service address: VIP:PORT[/PROTO], or --vip and --port")
    body: dict[str, Any] = {"vip": vip, "port": port, "protocol": proto or "tcp",
                            "options": _options(l4_dnat=l4_dnat, hash_src_port=hash_src_port,
                                                affinity_prefix=affinity_prefix, maglev_weights=maglev_weights,
                                                no_backend=no_backend, answer_ping=answer_ping),
                            "source_ranges": list(source_ranges),
                            "backends": [{k: v for k, v in (("address", str(b.address)), ("port", b.port),
                                                            ("weight", b.weight)) if v is not None}
                                         for b in backends]}
    if check_type is not None or check_opts:
        body["health"] = check_body(None, check_type, check_opts)
    try:
        r = app.client.request("PUT", f"/v1/services/{segment(name)}", json=body, headers={"If-None-Match": "*"})
    except ApiError as e:
        if e.status == 412:  # If-None-Match: * → it exists; not a stale read, so exit 1
            raise CliError(f"service {name!r} exists already",
                           f"change it with `l4lbctl service edit {name}`, or delete it first") from None
        raise
    if app.output != "table":
        emit(r.json(), app.output)
        return
    svc = r.json()
    click.echo(f"service {name!r} created: {service_endpoint(svc)}, {count(len(svc['backends']), 'backend')} "
               f"(revision {revision_of(r)})")


@service.command("edit")
@click.argument("name", type=NAME, shell_complete=complete_service)
@click.argument("address", type=SERVICE_ADDRESS, required=False, metavar="[VIP:PORT[/PROTO]]")
@address_options
@option_flags_decorator
@source_range_option
@click.option("--any-source", is_flag=True, help="Drop the source ranges: every client reaches the service.")
@check_options
@output_option
@pass_app
def edit(app: App, name: str, address: ServiceAddress | None, vip: str | None, port: int | None, proto: str | None,
         l4_dnat: bool | None, hash_src_port: bool | None, affinity_prefix: int | str | None,
         maglev_weights: bool | None, no_backend: str | None, answer_ping: bool | None,
         source_ranges: tuple[str, ...], any_source: bool, check_type: str | None,
         check_opts: tuple[str, ...]) -> None:
    """Change a service's address or options; its backends stay.

    Reads the service and writes it back with If-Match, so a change made by
    somebody else in between is refused (exit 4) instead of overwritten.

    \b
    l4lbctl service edit web --port 8080
    l4lbctl service edit web --no-sport-hash --dnat
    l4lbctl service edit web --check-opt interval=1 --check-opt fall=2
    l4lbctl service edit web --no-backend drop --no-ping
    l4lbctl service edit web --source-range 203.0.113.0/24 --source-range 192.0.2.0/25   (replaces the list)
    l4lbctl service edit web --any-source
    """
    vip, port, proto = _merge_address(address, vip, port, proto)
    options = _options(l4_dnat=l4_dnat, hash_src_port=hash_src_port, affinity_prefix=affinity_prefix,
                       maglev_weights=maglev_weights, no_backend=no_backend, answer_ping=answer_ping)
    checks = check_type is not None or bool(check_opts)
    if source_ranges and any_source:
        raise click.UsageError("give --source-range or --any-source, not both")
    ranges = [] if any_source else list(source_ranges) if source_ranges else None
    if vip is None and port is None and proto is None and not options and not checks and ranges is None:
        raise click.UsageError("nothing to change: give VIP:PORT[/PROTO], --vip, --port, --proto, option flags, "
                               "--source-range/--any-source or --check/--check-opt")
    r = app.client.get(f"/v1/services/{segment(name)}")
    old, etag = r.json(), r.headers.get("ETag")
    new = {k: v for k, v in old.items() if k != "name"}
    new.update({k: v for k, v in (("vip", vip), ("port", port), ("protocol", proto)) if v is not None})
    new["options"] = {**old["options"], **options}
    if ranges is not None:
        new["source_ranges"] = ranges
    if checks:
        new["health"] = check_body(old.get("health"), check_type, check_opts)
    if {**new, "name": name} == old:
        if app.output != "table":
            emit(old, app.output)
        else:
            click.echo(f"service {name!r} unchanged")
        return
    headers = {"If-Match": etag} if etag else {}
    try:
        r = app.client.request("PUT", f"/v1/services/{segment(name)}", json=new, headers=headers)
    except ApiError as e:
        if e.status == 412:
            e.hint = f"service {name!r} changed meanwhile: check `l4lbctl service show {name}` and retry"
        raise
    if app.output != "table":
        emit(r.json(), app.output)
        return
    svc = r.json()
    changed = [f"{k} {old[k]} -> {svc[k]}" for k in ("vip", "port", "protocol") if old[k] != svc[k]]
    changed += [f"{k} {json.dumps(old['options'].get(k))} -> {json.dumps(v)}"
                for k, v in svc["options"].items() if old["options"].get(k) != v]
    if old.get("health") != svc.get("health"):
        changed.append(f"health check {describe(svc.get('health'))}")
    if old.get("source_ranges") != svc.get("source_ranges"):
        changed.append(f"source ranges {sources_cell(svc)}")
    click.echo(f"service {name!r} updated: {', '.join(changed)} (revision {revision_of(r)})")


@service.command("delete")
@click.argument("name", type=NAME, shell_complete=complete_service)
@output_option
@pass_app
def delete(app: App, name: str) -> None:
    """Delete a service and its backends."""
    r = app.client.request("DELETE", f"/v1/services/{segment(name)}")
    if app.output != "table":
        emit({"deleted": name, "revision": revision_of(r)}, app.output)
        return
    click.echo(f"service {name!r} deleted (revision {revision_of(r)})")
