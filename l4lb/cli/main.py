"""The ``l4lbctl`` command group and its entry point.

Adding a command group (e.g. the recorder's ``record``): write it in its own
module using ``from .context import App, pass_app, output_option`` and add it to
COMMANDS below, or from outside: ``from l4lb.cli.main import cli;
cli.add_command(record)`` before ``main()`` runs.

``main()`` is the only place exceptions end: CliError/click errors become one
line on stderr and an exit code; nothing else ever shows a traceback (set
L4LBCTL_DEBUG=1 to see one for an unexpected error).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Sequence

import click
from click.core import ParameterSource

from . import backends, box, fleet, health, importer, record, services, state, stats, status
from .context import App, endpoint_from, fleet_endpoints
from .errors import EXIT_INTERRUPTED, CliError
from .output import FORMATS

EPILOG = """\b
Exit codes: 0 ok; 1 the daemon refused or failed the request (its message is
printed), or the object exists already; 2 bad usage or input (arguments, file,
YAML/JSON); 3 the daemon cannot be reached (down, socket permission, network);
4 precondition failed: the state changed since it was read (stale ETag);
130 interrupted.

\b
Environment: L4LBCTL_SOCKET, L4LBCTL_URL, L4LBCTL_FLEET, L4LBCTL_TOKEN_FILE,
L4LBCTL_TOKEN, L4LBCTL_OUTPUT. Shell completion: eval "$(_L4LBCTL_COMPLETE=bash_source l4lbctl)".
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EPILOG)
@click.option("-s", "--socket", "sockets", envvar="L4LBCTL_SOCKET", metavar="PATH", multiple=True,
              help="l4lbd's unix socket [default: /run/l4lbd/l4lbd.sock]; repeat for a fleet (apply, fleet).")
@click.option("--url", "urls", envvar="L4LBCTL_URL", metavar="URL", multiple=True,
              help="Use the TCP listener instead, e.g. http://127.0.0.1:9180 (needs a token); repeat for a fleet.")
@click.option("--fleet", "fleet_file", envvar="L4LBCTL_FLEET", metavar="FILE", type=click.Path(dir_okay=False),
              help="YAML file naming the boxes of a tier (see `l4lbctl fleet --help`).")
@click.option("--token-file", envvar="L4LBCTL_TOKEN_FILE", metavar="PATH",
              help="File holding the bearer token for --url (or the token itself in L4LBCTL_TOKEN).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True, metavar="SECS",
              help="Give up waiting for the daemon after SECS seconds.")
@click.option("-o", "--output", type=click.Choice(FORMATS, case_sensitive=False), default="table",
              envvar="L4LBCTL_OUTPUT", show_default=True, help="Output format: tables for people, json/yaml for scripts.")
@click.version_option(package_name="l4lb", prog_name="l4lbctl")
@click.pass_context
def cli(ctx: click.Context, sockets: tuple[str, ...], urls: tuple[str, ...], fleet_file: str | None,
        token_file: str | None, timeout: float, output: str) -> None:
    """Operate l4lbd, the XDP layer-4 load balancer, through its REST API.

    \b
    l4lbctl status
    l4lbctl service add api 198.51.100.80:80/tcp -b 192.0.2.101 -b 192.0.2.102
    l4lbctl backend drain api 192.0.2.101
    l4lbctl export > state.yaml; $EDITOR state.yaml; l4lbctl apply -f state.yaml --dry-run
    l4lbctl stats --rate --watch
    """
    given = {n for n, v in (("sockets", sockets), ("urls", urls), ("fleet_file", fleet_file)) if v}
    if len(given) > 1:  # the ones on the command line win over the environment
        cmdline = {n for n in given if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE}
        if len(cmdline) != 1:
            raise click.UsageError("give --socket, --url or --fleet, not several kinds "
                                   "(check L4LBCTL_SOCKET, L4LBCTL_URL and L4LBCTL_FLEET)")
        sockets = sockets if "sockets" in cmdline else ()
        urls = urls if "urls" in cmdline else ()
        fleet_file = fleet_file if "fleet_file" in cmdline else None
    if fleet_file:
        endpoints = fleet_endpoints(fleet_file, timeout)
    elif urls:
        endpoints = [endpoint_from(None, u, token_file, timeout) for u in urls]
    else:
        endpoints = [endpoint_from(s, None, token_file, timeout) for s in sockets or (None,)]
    app = App(endpoints, output.lower())
    ctx.obj = app
    ctx.call_on_close(app.close)


COMMANDS: tuple[click.Command, ...] = (
    status.status, services.service, backends.backend, state.apply, state.export, stats.stats, record.record,
    box.box, fleet.fleet, importer.import_, health.health,
)
for _command in COMMANDS:
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry: run, map every failure to a message and an exit code, exit."""
    # `l4lbctl export | head` must end quietly, like any Unix tool.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="l4lbctl", standalone_mode=False)
    except CliError as e:
        for line in e.lines():
            click.echo(line, err=True)
        code = e.exit_code
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except click.exceptions.Exit as e:
        code = e.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("Interrupted.", err=True)
        code = EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the last line of defence: never a traceback
        if os.environ.get("L4LBCTL_DEBUG"):
            traceback.print_exc()
        click.echo(f"Error: unexpected {type(e).__name__}: {e} (L4LBCTL_DEBUG=1 shows the traceback)", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["cli", "main"]
