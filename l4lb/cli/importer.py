"""``l4lbctl import ipvsadm|keepalived FILE``: another load balancer's config as a document for apply.

Offline: it reads files and prints, and talks to no daemon. The document goes to
stdout (YAML, or -o json); what has no exact equivalent goes to stderr, one line
each with file and line, saying whether it was ignored, approximated or skipped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from .context import App, output_option, pass_app
from .errors import InputError
from .output import count, emit

if TYPE_CHECKING:  # imported when a command runs: l4lb.importers pulls in the models (pydantic),
    from l4lb.importers import Result  # ~0.2 s of CPU every other l4lbctl command has no use for


def _read(path: str) -> str:
    name = "<stdin>" if path == "-" else path
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except OSError as e:
        raise InputError(f"{name}: {e.strerror}") from None
    return raw.decode("utf-8", errors="replace")


def _run(app: App, kind: str, path: str, convert: Callable[[], Result]) -> None:
    from l4lb.importers import SourceError

    try:
        result = convert()
    except SourceError as e:
        raise InputError(f"{e.source}:{e.line}: {e.message}" if e.line else f"{e.source}: {e.message}",
                         "nothing was imported") from None
    for note in result.notes:
        click.echo(f"Note: {note}", err=True)
    backends = sum(len(s["backends"]) for s in result.services)
    click.echo(f"imported {count(len(result.services), 'service')} ({count(backends, 'backend')}) from {path}"
               + (f"; {count(len(result.notes), 'note')} above: review them before `l4lbctl apply -f`"
                  if result.notes else ""), err=True)
    if app.output == "json":
        emit(result.document(), "json")
        return
    click.echo(f"# l4lb desired state imported from {kind} {path} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.")
    click.echo("# No `revision:`: `l4lbctl apply -f FILE` replaces the box's whole desired state with it.")
    emit(result.document(), "yaml")


@click.group("import", short_help="Convert an ipvsadm or keepalived config into a document for apply.")
def import_() -> None:
    """Convert another load balancer's configuration into a desired-state document.

    \b
    l4lbctl import ipvsadm rules.txt > state.yaml        # from `ipvsadm -S -n`
    ipvsadm -S -n | l4lbctl import ipvsadm - | l4lbctl apply -f - --dry-run
    l4lbctl import keepalived /etc/keepalived/keepalived.conf > state.yaml

    The document goes to stdout; each thing without an exact equivalent (a
    scheduler other than Maglev, NAT, persistence timeouts, sorry servers,
    notify scripts, VRRP...) is reported on stderr with its file and line and
    what the importer did with it: ignored, approximated or skipped. A file
    that is not valid ipvsadm/keepalived syntax imports nothing (exit 2).
    """


@import_.command("ipvsadm", short_help="Rules saved by `ipvsadm -S -n` ('-' = stdin).")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True))
@output_option
@pass_app
def ipvsadm(app: App, path: str) -> None:
    """Rules saved by `ipvsadm -S -n` (FILE, or '-' for stdin) -> a document for apply."""
    from l4lb.importers import ipvsadm as parser

    _run(app, "ipvsadm", path, lambda: parser.parse(_read(path), "<stdin>" if path == "-" else path))


@import_.command("keepalived", short_help="keepalived.conf virtual servers, with checkers as health checks.")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, exists=True))
@output_option
@pass_app
def keepalived(app: App, path: str) -> None:
    """keepalived.conf (FILE and what it includes) -> a document for apply.

    Virtual servers become services, real servers backends, and TCP_CHECK,
    HTTP_GET, SSL_GET and DNS_CHECK checkers health checks (to the real server's
    own address, like keepalived's).
    """
    from l4lb.importers import keepalived as parser

    _run(app, "keepalived", path, lambda: parser.parse_file(path))
