"""``l4lbctl apply -f FILE`` and ``l4lbctl export``: the whole desired state as one document.

``export`` writes a top-level ``revision:`` (the API does not take that key: ``apply``
strips it and sends ``If-Match: "r<revision>"``), so applying a file exported at
revision N is refused once the state has moved past N. A file without
``revision:`` is applied against the current revision (read just before the
write); ``--force`` sends no If-Match at all.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import yaml

from l4lb.docparse import DocumentError, loads_json, loads_yaml

from .client import revision_of
from .context import App, output_option, pass_app
from .errors import ApiError, CliError, InputError
from .output import emit
from .specs import hostport

REVISION_KEY = "revision"


# --- reading a document -------------------------------------------------------------------------


def _read(path: str) -> tuple[str, str]:
    name = "<stdin>" if path == "-" else path
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except OSError as e:
        raise InputError(f"{name}: {e.strerror}") from None
    try:
        return name, raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: not UTF-8 text (byte {e.start})") from None


def _parse(name: str, text: str) -> Any:
    if name.endswith(".json"):
        try:
            return loads_json(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except DocumentError as e:
            raise InputError(f"{name}: refused: {e}") from None
    try:
        return loads_yaml(text)  # JSON is YAML too; a key given twice is refused
    except DocumentError as e:
        raise InputError(f"{name}: refused: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{name}: invalid YAML{where}: {problem}") from None


def load_document(path: str) -> tuple[dict[str, Any], int | None]:
    """The document to PUT (without ``revision``) and the revision it was exported at."""
    name, text = _read(path)
    doc = _parse(name, text)
    if doc is None:
        raise InputError(f"{name} is empty", "a desired-state document has a `services:` list "
                         "(`services: []` removes every service)")
    if not isinstance(doc, dict):
        raise InputError(f"{name}: the document must be a mapping with a `services:` list, "
                         f"not a {type(doc).__name__}")
    if "services" not in doc:
        # An empty mapping would otherwise mean "no services": make deleting everything explicit.
        raise InputError(f"{name} has no `services:` key", "`services: []` removes every service")
    revision = doc.pop(REVISION_KEY, None)
    if revision is not None and (isinstance(revision, bool) or not isinstance(revision, int) or revision < 0):
        raise InputError(f"{name}: `revision:` must be a revision number from `l4lbctl export`, not {revision!r}")
    try:
        json.dumps(doc)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: a value cannot be sent as JSON ({e}); quote it as a string") from None
    return doc, revision


# --- showing a plan -------------------------------------------------------------------------------

_SIGN = {"create": ("+", "green"), "update": ("~", "yellow"), "delete": ("-", "red")}


def _v(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def plan_lines(plan: dict[str, Any]) -> list[str]:
    from .services import option_flags

    out: list[str] = []
    for s in plan["services"]:
        sign, color = _SIGN[s["action"]]
        new = {c["field"]: c["new"] for c in s["changes"]}
        head = f"{sign} service {s['name']}"
        if s["action"] == "create":
            options = {k.removeprefix("options."): v for k, v in new.items() if k.startswith("options.")}
            head += f": {new.get('protocol')} {hostport(new['vip'], new['port'])}"
            head += "".join(f" {f}" for f in option_flags(options))
        out.append(click.style(head, fg=color))
        if s["action"] == "update":
            for c in s["changes"]:
                out.append(click.style(f"    ~ {c['field']}: {_v(c['old'])} -> {_v(c['new'])}", fg="yellow"))
        for b in s["backends"]:
            bsign, bcolor = _SIGN[b["action"]]
            line = f"    {bsign} backend {hostport(b['address'], b['port'])}"
            changes = [c for c in b["changes"] if c["field"] != "port" and c["old"] != c["new"]]
            if b["action"] == "create":
                line += "  " + ", ".join(f"{c['field']} {_v(c['new'])}" for c in changes)
            elif b["action"] == "update":
                line += ": " + ", ".join(f"{c['field']} {_v(c['old'])} -> {_v(c['new'])}" for c in changes)
            out.append(click.style(line, fg=bcolor))
    return out


def summary_text(summary: dict[str, int]) -> str:
    parts = [f"{summary[f'services_{k}']} {'service' if summary[f'services_{k}'] == 1 else 'services'} {k}"
             for k in ("created", "updated", "deleted") if summary.get(f"services_{k}")]
    parts += [f"{summary[f'backends_{k}']} {'backend' if summary[f'backends_{k}'] == 1 else 'backends'} {k}"
              for k in ("added", "changed", "removed") if summary.get(f"backends_{k}")]
    return ", ".join(parts) or "nothing"


# --- commands --------------------------------------------------------------------------------------


def _stale_hint(client: Any, revision: int | None) -> str:
    try:
        now = revision_of(client.get("/v1/state"))
    except CliError:
        now = None
    at = f" (it is at revision {now} now)" if now is not None else ""
    if revision is not None:
        return (f"the desired state changed since this file was exported at revision {revision}{at}: "
                "export again and redo your edits, or overwrite with --force")
    return f"the desired state changed while applying{at}: run apply again, or use --force"


@click.command("apply", short_help="Apply a desired-state document (YAML/JSON) to one box or a fleet, or --dry-run it.")
@click.option("-f", "--file", "path", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="YAML or JSON desired-state document ('-' = stdin).")
@click.option("--dry-run", is_flag=True, help="Show what would change; apply nothing.")
@click.option("--force", is_flag=True, help="Apply even if the state changed since the file's revision.")
@click.option("--continue", "keep_going", is_flag=True,
              help="With several boxes: go on after a box fails, and report each (default: stop at the first).")
@output_option
@pass_app
def apply(app: App, path: str, dry_run: bool, force: bool, keep_going: bool) -> None:
    """Make the daemon's desired state equal to FILE, in one transaction.

    FILE is what `l4lbctl export` writes (YAML, or JSON). Its `revision:` says
    which state it was based on: if the daemon has moved on since, apply is refused
    (exit 4) unless --force. Without `revision:`, the current state is the base.
    `services: []` removes every service; an empty file is an error.

    With several boxes (--url/--socket repeated, or --fleet FILE) the same
    document goes to each box in turn, each against its own current revision:
    the first failure stops the rollout (boxes after it are untouched), or with
    --continue every box is tried and the failures are reported at the end.
    """
    doc, revision = load_document(path)
    if len(app.endpoints) > 1:
        if revision is not None and not force:
            raise InputError(f"{path} carries `revision: {revision}`, which names one box's state",
                             "for a fleet, export with --no-revision (each box is checked against its own revision)")
        _apply_fleet(app, path, doc, dry_run, force, keep_going)
        return
    result = _apply_one(app.client, path, doc, revision, dry_run, force)
    if app.output != "table":
        emit(result, app.output)
        return
    _show_result(result, dry_run)


def _apply_one(client: Any, path: str, doc: dict[str, Any], revision: int | None, dry_run: bool,
               force: bool) -> dict[str, Any]:
    headers: dict[str, str] = {}
    if not force:
        if revision is not None:
            headers["If-Match"] = f'"r{revision}"'
        else:
            etag = client.get("/v1/state").headers.get("ETag")
            if etag:
                headers["If-Match"] = etag
    try:
        r = client.request("PUT", "/v1/state", json=doc, headers=headers,
                           params={"dry_run": "true"} if dry_run else None)
    except ApiError as e:
        if e.status == 412:
            e.hint = _stale_hint(client, revision)
        elif e.status == 422:  # locations are "body.services.0.vip": name the file instead
            e.message = f"{'<stdin>' if path == '-' else path}: " + e.message.replace("body.", "")
            e.errors = []
        raise
    return r.json()


def _show_result(result: dict[str, Any], dry_run: bool, indent: str = "") -> None:
    plan = result["plan"]
    for line in plan_lines(plan):
        click.echo(indent + line)
    if plan["empty"]:
        click.echo(f"{indent}no changes (revision {result['revision']})")
    elif dry_run:
        click.echo(f"{indent}dry run: would have {summary_text(plan['summary'])}; nothing applied "
                   f"(revision {result['revision']})")
    else:
        click.echo(f"{indent}applied revision {result['revision']}: {summary_text(plan['summary'])}")


def _apply_fleet(app: App, path: str, doc: dict[str, Any], dry_run: bool, force: bool, keep_going: bool) -> None:
    from .client import Client

    results: dict[str, Any] = {}
    failed: list[str] = []
    for ep in app.endpoints:
        if failed and not keep_going:
            results[ep.label] = {"status": "skipped"}
            continue
        try:
            with Client(ep) as client:
                result = _apply_one(client, path, doc, None, dry_run, force)
            results[ep.label] = {"status": "ok", **result}
            if app.output == "table":
                click.echo(f"{ep.label}:")
                _show_result(result, dry_run, "  ")
        except CliError as e:
            failed.append(ep.label)
            results[ep.label] = {"status": "failed", "error": e.message}
            if app.output == "table":
                click.echo(f"{ep.label}: FAILED")
                for line in e.lines():
                    click.echo("  " + line, err=True)
    if app.output != "table":
        emit({"boxes": results}, app.output)
    if failed:
        skipped = [n for n, r in results.items() if r["status"] == "skipped"]
        raise CliError(f"apply failed on {', '.join(failed)}"
                       + (f"; not tried: {', '.join(skipped)}" if skipped else ""),
                       None if keep_going else "fix it and apply again (boxes already done report no changes), "
                       "or --continue to try every box")


def export_document(state: dict[str, Any], revision: int | None) -> dict[str, Any]:
    def compact(d: dict[str, Any]) -> dict[str, Any]:
        # null is the default of a backend's port and health and of every check setting
        return {k: compact(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    services = [{**{k: v for k, v in s.items() if not (k == "health" and v is None)},
                 **({"health": compact(s["health"])} if s.get("health") else {}),
                 "backends": [compact(b) for b in s["backends"]]} for s in state["services"]]
    return ({REVISION_KEY: revision} if revision is not None else {}) | {"services": services}


@click.command("export", short_help="Print the desired state as a document for apply.")
@click.option("--no-revision", is_flag=True,
              help="Leave out `revision:` (e.g. a template for other boxes): apply then uses theirs.")
@output_option
@pass_app
def export(app: App, no_revision: bool) -> None:
    """Print the desired state as a document for `l4lbctl apply -f` (YAML; -o json for JSON)."""
    r = app.client.get("/v1/state")
    revision = None if no_revision else revision_of(r)
    doc = export_document(r.json(), revision)
    if app.output == "json":
        emit(doc, "json")
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    click.echo(f"# l4lb desired state from {app.endpoint.describe()} at {stamp}.")
    if revision is not None:
        click.echo(f"# `l4lbctl apply -f FILE` is refused if it changed since revision {revision} (--force overrides).")
    emit(doc, "yaml")
