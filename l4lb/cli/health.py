"""Health checks in the CLI: ``--check``/``--check-opt`` on ``service add|edit``,
the HEALTH columns of ``service show`` and ``stats``, and ``l4lbctl health``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .context import App, complete_service, output_option, pass_app
from .errors import CliError
from .output import emit, table
from .params import NAME
from .specs import hostport

F = TypeVar("F", bound=Callable[..., Any])
CHECK_TYPES = ("tcp", "http", "https", "udp-dns", "none")


def check_options(f: F) -> F:
    f = click.option("--check-opt", "check_opts", multiple=True, metavar="KEY=VALUE",
                     help="A health check setting: interval=1, fall=3, via=direct, path=/healthz, "
                          "expect_status=200-299, query=example.com, on_all_down=fail_closed, ... (repeatable).")(f)
    f = click.option("--check", "check_type", type=click.Choice(CHECK_TYPES), default=None,
                     help="Health check of the backends (none: remove it).")(f)
    return f


def _value(text: str) -> Any:
    """``1`` -> 1, ``0.5`` -> 0.5, ``true`` -> True; anything else stays text."""
    try:
        v = json.loads(text)
    except ValueError:
        return text
    return v if isinstance(v, (int, float, bool)) else text


def check_body(old: dict[str, Any] | None, check_type: str | None, opts: tuple[str, ...]) -> dict[str, Any] | None:
    """The service's ``health`` after the options (``old`` is the current one, if any);
    the daemon validates the result and says what is wrong."""
    if check_type == "none":
        if opts:
            raise click.UsageError("--check none removes the check: give no --check-opt with it")
        return None
    new = dict(old or {})
    if check_type is not None and check_type != new.get("type"):
        # Another kind of check: settings of the old kind may not apply; timing and policy do.
        keep = ("interval", "timeout", "rise", "fall", "via", "port", "on_all_down")
        new = {k: v for k, v in new.items() if k in keep and v is not None}
        new["type"] = check_type
    for opt in opts:
        key, sep, text = opt.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--check-opt {opt!r}: use KEY=VALUE")
        new[key.strip()] = _value(text)
    if "type" not in new:
        raise click.UsageError("the service has no health check: give --check TYPE")
    return new


def describe(check: dict[str, Any] | None) -> str:
    """One line: ``http GET /healthz via tunnel, every 2 s (timeout 1 s), rise 2 fall 3, fail_open``."""
    if not check or check.get("type") in (None, "none"):
        return "none"
    what = check["type"]
    if what in ("http", "https"):
        what += f" {check.get('method') or 'GET'} {check.get('path') or '/'}"
        if check.get("expect_status"):
            what += f" expect {check['expect_status']}"
    if what == "udp-dns":
        what += f" {check.get('query_type') or 'A'} {check.get('query')}"
    if check.get("port"):
        what += f" port {check['port']}"
    return (f"{what} via {check.get('via', 'tunnel')}, every {check.get('interval', 2):g} s "
            f"(timeout {check.get('timeout', 1):g} s), rise {check.get('rise', 2)} fall {check.get('fall', 3)}, "
            f"{check.get('on_all_down', 'fail_open')}")


def health_cell(health: str | None) -> str:
    return health.upper() if health else "-"


def ago(since: float | None) -> str:
    if not since:
        return "-"
    s = max(0.0, time.time() - since)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def backend_rows(report: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """(address, port) -> the backend's health entry of a /v1/services/NAME/health answer."""
    return {(b["address"], b["port"]): b for b in report.get("backends", [])}


@click.command("health", short_help="Health of the checked backends.")
@click.argument("services", nargs=-1, type=NAME, shell_complete=complete_service)
@output_option
@pass_app
def health(app: App, services: tuple[str, ...]) -> None:
    """Every checked backend: its health (in force in the datapath), since when,
    why, and the last error. Services failing open are listed first.

    With -o json/yaml the API's document (GET /v1/health) is printed."""
    data = app.client.json("GET", "/v1/health")
    if services:
        have = {s["name"] for s in data["services"]}
        missing = [n for n in services if n not in have]
        if missing:
            raise CliError(f"no service named {', '.join(repr(n) for n in missing)}")
        data["services"] = [s for s in data["services"] if s["name"] in services]
    if app.output != "table":
        emit(data, app.output)
        return
    lines = [f"FAILING OPEN: {name} (every backend is down; all of them are kept)" for name in data["fail_open"]]
    if not data.get("enabled", True):
        lines.append("health checks are disabled in the daemon's config ([health] enabled = false)")
    rows = [[s["name"], hostport(b["address"], b["port"]), b["state"], health_cell(b["health"]), ago(b.get("since")),
             b.get("not_run_reason") or b.get("last_error") or "-"]
            for s in data["services"] if s["checked"] for b in s["backends"] if b.get("key")]
    lines.append(table(["SERVICE", "BACKEND", "STATE", "HEALTH", "SINCE", "LAST ERROR"], rows) if rows
                 else "no checked backends")
    checks = data.get("checks")
    if checks and checks.get("failed"):
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(checks.get("failed_by", {}).items()) if n)
        lines.append(f"checks since the start: {checks['ok']} ok, {checks['failed']} failed ({kinds}); "
                     "the newest failures with their source ports: -o json, recent_failures")
    click.echo("\n".join(lines))
