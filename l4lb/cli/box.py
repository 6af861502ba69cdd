"""``l4lbctl box``: this box's BGP announcements and operator drain (per box, not in the document)."""

from __future__ import annotations

import time
from typing import Any

import click

from .context import App, output_option, pass_app
from .output import emit, fields, table


def _when(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def show_bgp(s: dict[str, Any]) -> None:
    drains = s["box"]["drains"]
    pairs = [("Speaker", f"{s['speaker']}, AS {s['local_as']}, router id {s['router_id']}"),
             ("Box", s["box"]["state"] + "".join(
                 f"; {'box' if k == '*' else k} {d['state']}, withdraw at {_when(d['withdraw_at'])}"
                 for k, d in drains.items())),
             ("Last change", _when(s["last_change"]))]
    if s.get("error"):
        pairs.append(("Error", s["error"]))
    click.echo(fields(pairs))
    click.echo()
    click.echo(table(["PEER", "STATE", "BGP", "SINCE", "INFO"],
                     [[x["peer"], x["state"], x["bgp_state"], x["since"], x["info"]] for x in s["sessions"]]))
    click.echo()
    click.echo(table(["PREFIX", "STATE", "REASON", "SERVICES", "ATTRIBUTES", "SINCE"],
                     [[p["prefix"], p["state"], p["reason"], ",".join(p["services"]), _attrs(p), _when(p["since"])]
                      for p in s["prefixes"]]))


def _attrs(p: dict[str, Any]) -> str:
    out = list(p["communities"])
    if p["med"] is not None:
        out.append(f"med {p['med']}")
    if p["prepend"]:
        out.append(f"prepend x{p['prepend']}")
    return " ".join(out) or "-"


@click.group("box", short_help="This box's BGP announcements; drain/undrain it for maintenance.")
def box() -> None:
    """BGP state of this box, and drains: a drained box (or service) first announces its VIPs
    with the graceful-shutdown community (RFC 8326), a high MED and a longer AS path, so
    routers move new traffic to the other boxes, then withdraws them after a delay."""


@box.command("status", short_help="Sessions, prefixes (announced/withdrawn and why), drains.")
@output_option
@pass_app
def status(app: App) -> None:
    s = app.client.json("GET", "/v1/bgp")
    if app.output != "table":
        emit(s, app.output)
        return
    show_bgp(s)


@box.command("drain", short_help="Graceful shutdown of this box's VIPs, then withdraw.")
@click.option("--service", "services", multiple=True, metavar="NAME", help="Only this service's VIP (repeatable).")
@click.option("--delay", type=click.FloatRange(0, 86400), metavar="SECS",
              help="Seconds between graceful shutdown and withdraw [default: bgp.drain_delay].")
@output_option
@pass_app
def drain(app: App, services: tuple[str, ...], delay: float | None) -> None:
    s = app.client.json("POST", "/v1/box/drain", json={"services": list(services) or None, "delay": delay})
    if app.output != "table":
        emit(s, app.output)
        return
    what = ", ".join(services) or "box"
    d = s["box"]["drains"].get(services[0] if services else "*", {})
    click.echo(f"{what} draining: graceful shutdown now, withdraw at {_when(d.get('withdraw_at'))}")


@box.command("undrain", short_help="Announce again what this box can serve.")
@click.option("--service", "services", multiple=True, metavar="NAME", help="Only this service's drain (repeatable).")
@output_option
@pass_app
def undrain(app: App, services: tuple[str, ...]) -> None:
    s = app.client.json("POST", "/v1/box/undrain", json={"services": list(services) or None})
    if app.output != "table":
        emit(s, app.output)
        return
    click.echo(f"{', '.join(services) or 'box'} undrained: box is {s['box']['state']}")
