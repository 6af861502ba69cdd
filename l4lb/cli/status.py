"""``l4lbctl status``: is the daemon ready, what is attached, how full are the maps."""

from __future__ import annotations

import time
from typing import Any

import click

from .context import App, output_option, pass_app
from .output import emit, fields


def _maps(maps: dict[str, Any]) -> str:
    return ", ".join(f"{name} {m.get('used', '-')}/{m.get('max', '-')}" for name, m in maps.items()) or "-"


@click.command("status", short_help="Daemon readiness, interfaces, program, map fill levels.")
@output_option
@pass_app
def status(app: App) -> None:
    """The daemon's state: readiness, revision, interfaces and XDP modes, program, map fill levels."""
    s = app.client.json("GET", "/v1/status")
    if app.output != "table":
        emit(s, app.output)
        return
    dp = s.get("datapath") or {}
    by_state = s.get("backends_by_state") or {}
    revision = str(s["revision"])
    if s.get("updated_at"):
        revision += f" (updated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['updated_at']))})"
    limits = s.get("limits") or {}
    pairs: list[tuple[str, Any]] = [
        ("Daemon", app.endpoint.describe()),
        ("Ready", "yes" if s["ready"] else "no"),
    ]
    if s.get("degraded"):
        pairs.append(("Degraded", s["degraded"]))
    if s.get("pending_restart"):
        pairs.append(("Restart needed", "for " + ", ".join(s["pending_restart"])
                      + " (changed in the config file; in force at the next start)"))
    pairs += [
        ("Revision", revision),
        ("Services", s["services"]),
        ("Backends", f"{s['backends']}" + (" (" + ", ".join(f"{n} {k}" for k, n in by_state.items() if n) + ")"
                                            if s["backends"] else "")),
        ("Interfaces", ", ".join(f"{i} ({m})" for i, m in sorted((s.get("interfaces") or {}).items())) or "none"),
        ("Program", f"id {dp['program_id']}, tag {dp.get('program_tag', '-')}" if dp.get("program_id") else "-"),
        ("Maglev M", dp.get("maglev_m")),
        ("Maps", _maps(dp.get("maps") or {})),
        ("Limits", ", ".join(f"{k.removeprefix('max_').replace('_', ' ')} {v}" for k, v in limits.items()) or "-"),
    ]
    digest = s.get("digest") or {}
    if digest.get("digest"):
        pairs.append(("Digest", f"{digest['digest']} (seed {digest['seed']}; compare boxes: l4lbctl fleet status)"))
    bgp = s.get("bgp")
    if bgp:
        when = time.strftime("%H:%M:%S", time.localtime(bgp["last_change"])) if bgp.get("last_change") else "-"
        pairs += [("BGP", f"box {bgp['box']}, last change {when}" + (f", ERROR {bgp['error']}" if bgp.get("error") else "")),
                  ("BGP sessions", ", ".join(f"{p} {st}" for p, st in bgp["sessions"].items()) or "-"),
                  ("Announced", ", ".join(bgp["announced"]) or "nothing"),
                  ("Withdrawn", ", ".join(bgp["withdrawn"]) or "-")]
    click.echo(fields(pairs))
