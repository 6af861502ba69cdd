"""What every command shares: where the daemon is, the output format, a lazy client.

Command modules import from here (never from main.py), so main.py can import
them all and a new command group (e.g. ``record``) only needs to be added there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import click

from .client import DEFAULT_SOCKET, Client, Endpoint, check_url, read_token
from .errors import InputError
from .output import FORMATS

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class App:
    endpoints: list[Endpoint]       # one box, or the boxes of a fleet (apply, fleet status)
    output: str = "table"
    _client: Client | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> Endpoint:
        if len(self.endpoints) != 1:
            raise click.UsageError(f"this command talks to one box, and {len(self.endpoints)} are given "
                                   "(only apply and fleet take several)")
        return self.endpoints[0]

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.endpoint)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


pass_app = click.make_pass_decorator(App)


def endpoint_from(socket: str | None, url: str | None, token_file: str | None, timeout: float) -> Endpoint:
    """The global options (or environment) → an Endpoint. A token is used only with --url; it comes
    from a file or from L4LBCTL_TOKEN, never from the command line (other users can read that)."""
    if url:
        token = os.environ.get("L4LBCTL_TOKEN", "").strip()
        secret = read_token(Path(token_file)) if token_file else token
        return Endpoint(url=check_url(url), token=secret or None, timeout=timeout)
    return Endpoint(socket=Path(socket or DEFAULT_SOCKET), timeout=timeout)


def fleet_endpoints(path: str, timeout: float) -> list[Endpoint]:
    """A fleet file: ``boxes:`` mapping a name to ``url`` (+ ``token_file``) or ``socket``."""
    import yaml

    from l4lb.docparse import DocumentError, loads_yaml

    try:
        doc = loads_yaml(Path(path).read_text())
    except OSError as e:
        raise InputError(f"fleet file {path}: {e.strerror}") from None
    except (yaml.YAMLError, DocumentError) as e:
        raise InputError(f"fleet file {path}: invalid YAML: {str(e).splitlines()[0]}") from None
    boxes = doc.get("boxes") if isinstance(doc, dict) else None
    if not isinstance(boxes, dict) or not boxes:
        raise InputError(f"fleet file {path} needs a `boxes:` mapping of name -> {{url: ..}} or {{socket: ..}}")
    out = []
    for name, spec in boxes.items():
        if not isinstance(spec, dict) or set(spec) - {"url", "socket", "token_file"} or \
                ("url" in spec) == ("socket" in spec):
            raise InputError(f"fleet file {path}: box {name!r} needs exactly one of url: or socket: "
                             "(and token_file: with url:)")
        ep = endpoint_from(spec.get("socket"), spec.get("url"), spec.get("token_file"), timeout)
        out.append(replace(ep, name=str(name)))
    return out


def _set_output(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    app = ctx.find_object(App)
    if value is not None and app is not None:
        app.output = value.lower()


def output_option(f: F) -> F:
    """``-o table|json|yaml`` after the command too (``l4lbctl service list -o json``)."""
    return click.option(
        "-o", "--output", type=click.Choice(FORMATS, case_sensitive=False), default=None, expose_value=False,
        callback=_set_output, is_eager=True, help="Output format (default: the global -o, else table).",
    )(f)


# --- shell completion of live names (silent on any error: completion must never print junk) -------


def _completion_client(ctx: click.Context) -> Client | None:
    root = ctx.find_root().params
    try:
        ep = endpoint_from(next(iter(root.get("sockets") or ()), None), next(iter(root.get("urls") or ()), None),
                           root.get("token_file"), 2.0)
    except InputError:
        return None
    return Client(ep)


def complete_service(ctx: click.Context, _: click.Parameter, incomplete: str) -> list[str]:
    try:
        client = _completion_client(ctx)
        if client is None:
            return []
        with client:
            services = client.json("GET", "/v1/services")["services"]
        return [s["name"] for s in services if s["name"].startswith(incomplete)]
    except Exception:  # noqa: BLE001 - completion is best effort
        return []


def complete_backend(ctx: click.Context, _: click.Parameter, incomplete: str) -> list[str]:
    from .client import segment
    from .specs import hostport

    name = ctx.params.get("service")
    try:
        client = _completion_client(ctx)
        if client is None or not name:
            return []
        with client:
            svc = client.json("GET", f"/v1/services/{segment(name)}")
        refs = [hostport(b["address"], b.get("port") or svc["port"]) for b in svc["backends"]]
        return [r for r in refs if r.startswith(incomplete)]
    except Exception:  # noqa: BLE001 - completion is best effort
        return []
