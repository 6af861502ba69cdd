"""``l4lbctl fleet status``: the boxes of a tier side by side, flagging one whose tables differ.

Boxes are named by repeated ``--url``/``--socket`` or a fleet file::

    boxes:
      lb1: {url: "http://192.0.2.1:9180", token_file: /etc/l4lb/lb1.token}
      lb2: {socket: /run/l4lbd/l4lbd.sock}
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import click

from .client import Client
from .context import App, output_option, pass_app
from .errors import CliError
from .output import emit, table


def compare(boxes: dict[str, dict[str, Any] | None]) -> dict[str, list[str]]:
    """Box -> what differs from the majority (seed, service tables, missing services); unreachable boxes too."""
    up = {n: s["digest"] for n, s in boxes.items() if s is not None and s.get("digest")}
    out: dict[str, list[str]] = {n: ["unreachable"] for n, s in boxes.items() if s is None}
    if not up:
        return out
    seed = Counter(d["seed"] for d in up.values()).most_common(1)[0][0]
    names = sorted({svc for d in up.values() for svc in d["services"]})
    for n, d in up.items():
        diffs = [] if d["seed"] == seed else ["maglev seed"]
        for svc in names:
            mine = d["services"].get(svc)
            common = Counter(x["services"].get(svc) for x in up.values()).most_common(1)[0][0]
            if mine != common:
                diffs.append(f"{svc} missing" if mine is None else f"{svc} table")
        if diffs:
            out[n] = diffs
    return out


def coverage(boxes: dict[str, dict[str, Any] | None]) -> dict[str, list[str]]:
    """Prefix -> the boxes announcing it, over the reachable boxes with BGP (IPv4 and IPv6 alike).

    Every prefix some box knows (announced or withdrawn) is listed, so one withdrawn by every box shows too."""
    bgp = {n: s["bgp"] for n, s in boxes.items() if s is not None and s.get("bgp")}
    known = {p for b in bgp.values() for p in (b.get("announced") or []) + (b.get("withdrawn") or [])}
    return {p: sorted(n for n, b in bgp.items() if p in (b.get("announced") or []))
            for p in sorted(known, key=lambda p: (":" in p, p))}


@click.group("fleet", short_help="Several boxes at once: compare what they forward and announce.")
def fleet() -> None:
    """Commands over the boxes named by repeated --url/--socket, or --fleet FILE
    (a YAML `boxes:` mapping of name -> {url, token_file} or {socket}).
    `l4lbctl --fleet FILE apply -f state.yaml` rolls one document out to all of them."""


@fleet.command("status", short_help="Digests and BGP state side by side; exit 1 if tables differ.")
@output_option
@pass_app
def status(app: App) -> None:
    boxes: dict[str, dict[str, Any] | None] = {}
    errors: dict[str, str] = {}
    for ep in app.endpoints:
        try:
            with Client(ep) as c:
                boxes[ep.label] = c.json("GET", "/v1/status")
        except CliError as e:
            boxes[ep.label], errors[ep.label] = None, e.message
    diffs = compare(boxes)
    prefixes = coverage(boxes)
    if app.output != "table":
        emit({"boxes": boxes, "differs": diffs, "errors": errors, "prefixes": prefixes}, app.output)
    else:
        rows = []
        for name, s in boxes.items():
            if s is None:
                rows.append([name, "-", "-", "-", "-", "-", "-", "UNREACHABLE: " + errors[name]])
                continue
            bgp = s.get("bgp") or {}
            sessions = bgp.get("sessions") or {}
            up = sum(1 for v in sessions.values() if v == "Established")
            rows.append([name, "yes" if s["ready"] else "no", s["revision"], (s.get("digest") or {}).get("digest", "-")[:12],
                         bgp.get("box", "-"), f"{up}/{len(sessions)}" if bgp else "-",
                         len(bgp.get("announced") or []) if bgp else "-",
                         "DIFFERS: " + ", ".join(diffs[name]) if name in diffs else "same"])
        click.echo(table(["BOX", "READY", "REVISION", "DIGEST", "BOX STATE", "SESSIONS", "ANNOUNCED", "TABLES"],
                         rows, right=[False, False, True, False, False, False, True, False]))
        if prefixes:  # which box announces what: a VIP (v4 or v6) one box withdrew stands out
            with_bgp = [n for n, s in boxes.items() if s is not None and s.get("bgp")]
            click.echo("\n" + table(["PREFIX", "ANNOUNCED BY", "NOT BY"],
                                     [[p, f"{len(by)}/{len(with_bgp)}", ", ".join(n for n in with_bgp if n not in by)]
                                      for p, by in prefixes.items()], right=[False, True, False]))
    if diffs:
        raise CliError(f"{len(diffs)} of {len(boxes)} boxes differ: {', '.join(sorted(diffs))}",
                       "apply the same document to every box (l4lbctl --fleet FILE apply -f state.yaml) "
                       "and give them the same maglev_seed and maglev_m")
