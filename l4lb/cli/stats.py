"""``l4lbctl stats``: an ``ipvsadm -Ln --stats``-like table with active/inactive flows per
backend, optionally with rates, --watch, and --zero (the daemon's zero point, l4lb/zeroing.py)."""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from typing import Any

import click

from .context import App, complete_service, output_option, pass_app
from .errors import CliError
from .health import health_cell
from .output import dump, table
from .params import NAME
from .specs import hostport


def _rates(c: dict[str, Any]) -> list[Any]:
    # The API gives bits/s; the table shows bytes/s like the byte counters beside it.
    return [c.get("pps"), None if c.get("bps") is None else c["bps"] / 8]


def _flows(c: dict[str, Any]) -> list[Any]:
    return [c.get("active_flows"), c.get("inactive_flows")]


def _weights(services: list[dict[str, Any]]) -> dict[tuple[str, str, int], int]:
    return {(s["name"], ipaddress.ip_address(b["address"]).exploded, b.get("port") or s["port"]): b["weight"]
            for s in services for b in s["backends"]}


def stats_table(stats: dict[str, Any], weights: dict[tuple[str, str, int], int], *, rate: bool,
                reasons: bool) -> str:
    headers = ["PROT", "ADDRESS:PORT", "NAME", "WEIGHT", "STATE", "HEALTH", "ACTIVE", "INACTIVE", "PACKETS", "BYTES"]
    right = [False, False, False, True, False, False, True, True, True, True]
    if rate:
        headers += ["PKT/S", "BYTES/S"]
        right += [True, True]
    rows: list[list[Any]] = []
    for s in stats["services"]:
        rows.append([s["protocol"].upper(), hostport(s["vip"], s["port"]), s["name"], "", "",
                     "FAIL-OPEN" if s.get("fail_open") else "", *_flows(s), s["packets"], s["bytes"]]
                    + (_rates(s) if rate else []))
        for b in s["backends"]:
            w = weights.get((s["name"], ipaddress.ip_address(b["address"]).exploded, b["port"]))
            rows.append(["  ->", hostport(b["address"], b["port"]), "", w, b["state"], health_cell(b.get("health")),
                         *_flows(b), b["packets"], b["bytes"]] + (_rates(b) if rate else []))
    parts = [table(headers, rows, right=right) if rows else "no services"]
    if reasons:
        rheaders = ["REASON", "PACKETS", "BYTES"] + (["PKT/S", "BYTES/S"] if rate else [])
        rrows = [[k, v["packets"], v["bytes"]] + (_rates(v) if rate else []) for k, v in stats["reasons"].items()]
        parts.append(table(rheaders, rrows, right=[False] + [True] * (len(rheaders) - 1)))
    notes = []
    flows = stats.get("flows")
    if flows:
        notes.append(f"flows: ACTIVE = seen in the last {flows['active_window_seconds']:g} s, INACTIVE = older "
                     f"(estimated from the flow table, {flows['used']}/{flows['capacity']} entries in use)")
    zeroed = [s["zeroed_at"] for s in stats["services"] if s.get("zeroed_at")]
    if zeroed:
        notes.append("packets/bytes since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(min(zeroed)))
                     + (" or later" if len(set(zeroed)) > 1 else "") + " (l4lbctl stats --zero)")
    if rate:
        interval = stats.get("rate_interval_seconds")
        parts.append(f"rates over the last {interval:g} s" if interval
                     else "rates: not available yet (the daemon has no earlier sample; try again in a few seconds)")
    if notes:
        parts.append("\n".join(notes))
    return "\n\n".join(parts)


def _select(stats: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    if not names:
        return stats
    have = {s["name"] for s in stats["services"]}
    missing = [n for n in names if n not in have]
    if missing:
        raise CliError(f"no service named {', '.join(repr(n) for n in missing)}")
    return {**stats, "services": [s for s in stats["services"] if s["name"] in names]}


@click.command("stats", short_help="Packets/bytes per service and backend (ipvsadm-like).")
@click.argument("services", nargs=-1, type=NAME, shell_complete=complete_service)
@click.option("--rate", is_flag=True, help="Add pkt/s and bytes/s over the daemon's last sampling interval.")
@click.option("--reasons", is_flag=True, help="Also the datapath's per-reason counters (tx, pass_*, drop_*, ...).")
@click.option("--watch", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0, default=None,
              metavar="[SECS]", help="Redraw every SECS seconds (default 2) until Ctrl-C (exit 130).")
@click.option("--zero", is_flag=True, help="First zero the packet/byte counters shown (of SERVICES, or all and the "
              "reasons), like ipvsadm -Z. Display only: /metrics stays monotonic.")
@output_option
@pass_app
def stats(app: App, services: tuple[str, ...], rate: bool, reasons: bool, watch: float | None, zero: bool) -> None:
    """Packets and bytes per service (VIP) and per backend, like `ipvsadm -Ln --stats`,
    with ACTIVE/INACTIVE flows per backend like ipvsadm's ActiveConn/InActConn.

    Give service names to show only those. With -o json/yaml the API's document is
    printed (with --watch: one JSON document per line, or YAML documents).

    --zero sets the daemon's zero point: from then on every client's
    `l4lbctl stats` and /v1/stats show packets and bytes since it (until the
    daemon restarts, or the service or backend is removed). The datapath's
    counters and Prometheus' /metrics are never reset (rate() relies on that).
    """
    if zero:
        app.client.request("POST", "/v1/stats/zero", json={"services": list(services) if services else None})

    def frame() -> str:
        data = _select(app.client.json("GET", "/v1/stats"), services)
        if app.output == "json":
            return json.dumps(data, indent=None if watch else 2)
        if app.output == "yaml":
            return ("---\n" if watch else "") + dump(data, "yaml")
        weights = _weights(app.client.json("GET", "/v1/services")["services"])
        return stats_table(data, weights, rate=rate, reasons=reasons)

    if watch is None:
        click.echo(frame())
        return
    # Ctrl-C ends it like any interrupted l4lbctl: "Interrupted." and exit 130 (main()),
    # so a script can tell a watch that was stopped from one that finished.
    tty = sys.stdout.isatty()
    while True:
        text = frame()
        if app.output == "table":
            if tty:
                click.clear()
            head = f"Every {watch:g} s: l4lbctl stats{' --rate' if rate else ''}  {time.strftime('%Y-%m-%d %H:%M:%S')}"
            text = f"{head}\n\n{text}\n"
        click.echo(text)
        time.sleep(watch)
