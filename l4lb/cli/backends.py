"""``l4lbctl backend add|remove|drain|undrain|weight`` (each one transaction on the daemon)."""

from __future__ import annotations

from typing import Any

import click

from .client import revision_of, segment
from .context import App, complete_backend, complete_service, output_option, pass_app
from .errors import ApiError, CliError
from .output import emit
from .params import BACKEND, NAME, STATE, WEIGHT
from .specs import BackendRef, hostport

SERVICE_ARG = click.argument("service", type=NAME, shell_complete=complete_service)
BACKEND_ARG = click.argument("backend", type=BACKEND, shell_complete=complete_backend)


def _path(service: str, ref: BackendRef) -> str:
    return f"/v1/services/{segment(service)}/backends/{segment(ref.path)}"


def _report(app: App, service: str, verb: str, backend: dict[str, Any], revision: int | None,
            service_port: int | None = None) -> None:
    if app.output != "table":
        emit(backend, app.output)
        return
    where = hostport(backend["address"], backend.get("port") or service_port)
    click.echo(f"backend {where} of {service!r} {verb}: weight {backend['weight']}, {backend['state']} "
               f"(revision {revision})")


def _patch(app: App, service: str, ref: BackendRef, verb: str, **change: Any) -> None:
    r = app.client.request("PATCH", _path(service, ref), json=change)
    _report(app, service, verb, r.json(), revision_of(r))


@click.group("backend", short_help="Add, remove, drain, undrain, weigh backends.")
def backend() -> None:
    """Add, remove, drain and weigh the backends of a service.

    BACKEND is ADDR, ADDR:PORT or [IPv6]:PORT (the port is needed only when the
    service has that address on several ports, with --dnat).
    """


@backend.command("add")
@SERVICE_ARG
@BACKEND_ARG
@click.option("-w", "--weight", type=WEIGHT, default=100, show_default=True, help="Maglev weight (0-65535).")
@click.option("--state", type=STATE, default="active", show_default=True,
              help="Initial state: active, draining (no new flows) or maintenance (no flows).")
@output_option
@pass_app
def add(app: App, service: str, backend: BackendRef, weight: int, state: str) -> None:
    """Add BACKEND to SERVICE; refused if it is there already.

    \b
    l4lbctl backend add api 192.0.2.103
    l4lbctl backend add api6 [2001:db8:0:1::103]:8443 --weight 50
    """
    # Read, check absence, write with the service's ETag: a concurrent add of the same
    # backend (or any change) gets a 412 instead of being silently replaced.
    r = app.client.get(f"/v1/services/{segment(service)}")
    svc, etag = r.json(), r.headers.get("ETag")
    if any(backend.same_identity(b, svc["port"]) for b in svc["backends"]):
        raise CliError(f"service {service!r} already has backend {hostport(backend.address, backend.port or svc['port'])}",
                       "change it with `l4lbctl backend weight|drain|undrain`")
    body: dict[str, Any] = {"weight": weight, "state": state.lower()}
    if backend.port is not None:
        body["port"] = backend.port
    try:
        r = app.client.request("PUT", _path(service, backend), json=body,
                               headers={"If-Match": etag} if etag else {})
    except ApiError as e:
        if e.status == 412:
            e.hint = f"service {service!r} changed meanwhile: check `l4lbctl service show {service}` and retry"
        raise
    _report(app, service, "added", r.json(), revision_of(r), svc["port"])


@backend.command("remove", short_help="Remove BACKEND from SERVICE.")
@SERVICE_ARG
@BACKEND_ARG
@output_option
@pass_app
def remove(app: App, service: str, backend: BackendRef) -> None:
    """Remove BACKEND from SERVICE (its flows move to the other backends)."""
    r = app.client.request("DELETE", _path(service, backend))
    if app.output != "table":
        emit({"service": service, "removed": backend.path, "revision": revision_of(r)}, app.output)
        return
    click.echo(f"backend {backend.path} removed from {service!r} (revision {revision_of(r)})")


@backend.command("drain", short_help="No new flows to BACKEND (existing ones stay).")
@SERVICE_ARG
@BACKEND_ARG
@click.option("--maintenance", is_flag=True,
              help="Also move its established flows away (state maintenance), not only new ones.")
@output_option
@pass_app
def drain(app: App, service: str, backend: BackendRef, maintenance: bool) -> None:
    """Stop sending new flows to BACKEND; established flows stay (unless --maintenance)."""
    state = "maintenance" if maintenance else "draining"
    _patch(app, service, backend, "drained" if state == "draining" else "set to maintenance", state=state)


@backend.command("undrain")
@SERVICE_ARG
@BACKEND_ARG
@output_option
@pass_app
def undrain(app: App, service: str, backend: BackendRef) -> None:
    """Put BACKEND back into service (state active)."""
    _patch(app, service, backend, "undrained", state="active")


@backend.command("weight")
@SERVICE_ARG
@BACKEND_ARG
@click.argument("weight", type=WEIGHT)
@output_option
@pass_app
def weight(app: App, service: str, backend: BackendRef, weight: int) -> None:
    """Set BACKEND's Maglev weight (0 = no new flows, like drain)."""
    _patch(app, service, backend, "reweighted", weight=weight)
