"""``l4lbctl record``: the n-tuple PCAP recorder (hubble-record-like) over /v1/recordings.

Layout: ``record`` is a group whose default command is ``start``, so both

    l4lbctl record "203.0.113.7 0 198.51.100.10 80 tcp" --packets 100 -w cap.pcapng
    l4lbctl record start "any 0 198.51.100.10 80 tcp" --duration 30s

start a recording, and ``record list|show|stop|download|delete`` manage them (a filter has
spaces, so it can never be taken for a subcommand name). Filters are checked here with the
daemon's own parser (l4lb.recfilter) before anything is sent: bad input is exit 2 and
starts nothing.

While a recording runs, one status line goes to stderr (rewritten in place on a terminal,
a plain line per interval otherwise) until a limit ends it or Ctrl-C (or SIGTERM) stops it
through the API; then the files' paths on the daemon go to stdout, or with -w the local
copies' paths.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any

import click
import httpx

from l4lb.recfilter import expand_filter
from l4lb.recorder.limits import RotationPolicy

from .client import Client, segment
from .context import App, _completion_client, output_option, pass_app
from .errors import EXIT_INTERRUPTED, CliError, Unreachable
from .output import emit, fields, table

MAX_CAPTURE_LENGTH = 16384            # recorder.recording.MAX_CAPTURE_LENGTH (kept import-free here)
NAME_RE = re.compile(r"[A-Za-z0-9_. -]{0,64}")   # as api/recordings.py RecordingBody.name, whole
REASONS = {
    "max_packets": "packet limit reached", "max_bytes": "byte limit reached",
    "max_duration": "duration reached", "max_files": "file limit reached", "stopped": "stopped",
    "daemon_shutdown": "the daemon shut down", "daemon_restart": "the daemon restarted",
    "failed": "failed", "disk_full": "the recorder's disk is full (recorder.min_free_bytes)",
    "max_recording_bytes": "the recording reached recorder.max_recording_bytes",
    "max_total_bytes": "the recordings reached recorder.max_total_bytes: delete old ones",
    "write_error": "writing its file failed (see the daemon's log)",
}
ABNORMAL = {"daemon_shutdown", "daemon_restart", "failed", "disk_full", "max_recording_bytes", "max_total_bytes",
            "write_error"}
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Interrupted(CliError):
    exit_code = EXIT_INTERRUPTED


# --- parameter types ----------------------------------------------------------------------------------------------


class SizeType(click.ParamType):
    """Bytes: 1500, 64k, 10M, 1G (powers of 1000) or 64Ki, 10Mi, 1Gi (powers of 1024)."""

    name = "BYTES"
    _UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
              "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", str(value))
        if not m:
            self.fail(f"{value!r} is not a size (e.g. 1500, 64k, 10M, 1Gi)", param, ctx)
        n = float(m.group(1)) * self._UNITS[(m.group(2) or "").lower()]
        if n < 1 or n != int(n):
            self.fail(f"{value!r} must be a whole number of bytes >= 1", param, ctx)
        return int(n)


class DurationType(click.ParamType):
    """Seconds: 30, 2.5, 30s, 5m, 1h, 1d."""

    name = "SECS"
    _UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", str(value))
        if not m or float(m.group(1)) <= 0:
            self.fail(f"{value!r} is not a duration > 0 (e.g. 30, 2.5, 30s, 5m, 1h)", param, ctx)
        seconds = float(m.group(1)) * self._UNITS[m.group(2)]
        if seconds > 86400 * 365:
            self.fail(f"{value!r} is more than a year", param, ctx)
        return seconds


class RecNameType(click.ParamType):
    name = "NAME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not NAME_RE.fullmatch(str(value)):
            self.fail(f"{value!r}: up to 64 letters, digits, spaces, '_', '.', '-'", param, ctx)
        return str(value)


SIZE, DURATION = SizeType(), DurationType()
def complete_recording(ctx: click.Context, _: click.Parameter, incomplete: str) -> list[str]:
    try:
        client = _completion_client(ctx)
        if client is None:
            return []
        with client:
            recs = client.json("GET", "/v1/recordings")["recordings"]
        return [r["id"] for r in recs if r["id"].startswith(incomplete)]
    except Exception:  # noqa: BLE001 - completion is best effort
        return []


REC_ID = click.argument("rid", metavar="ID", shell_complete=complete_recording)


# --- formatting ---------------------------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def clock(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def elapsed(rec: dict[str, Any]) -> float:
    return (rec.get("stopped") or time.time()) - rec["started"]


def file_path(f: dict[str, Any]) -> str:
    """The file on the daemon's side (the API gives ``path`` when it can, else the name)."""
    return str(f.get("path") or f["name"])


def label(rec: dict[str, Any]) -> str:
    return rec["id"] + (f" ({rec['name']})" if rec.get("name") else "")


def limits_text(rec: dict[str, Any]) -> str:
    stop = rec.get("stop") or {}
    parts = []
    if stop.get("packets"):
        parts.append(f"{stop['packets']} packets")
    if stop.get("bytes"):
        parts.append(human_bytes(stop["bytes"]))
    if stop.get("duration"):
        parts.append(f"{stop['duration']:g} s")
    return ", ".join(parts)


def rotate_text(rec: dict[str, Any]) -> str:
    rot = rec.get("rotate") or {}
    parts = []
    if rot.get("size"):
        parts.append(f"every {human_bytes(rot['size'])}")
    if rot.get("seconds"):
        parts.append(f"every {rot['seconds']:g} s")
    if rot.get("count"):
        parts.append(f"{rot['count']} files" + (" (ring)" if rot.get("size") else ""))
    return ", ".join(parts)


def status_text(rec: dict[str, Any], seconds: float) -> str:
    stop = rec.get("stop") or {}
    packets = f"{rec['packets']}" + (f"/{stop['packets']}" if stop.get("packets") else "")
    state = rec["state"] if rec["state"] == "running" else f"stopped: {REASONS.get(rec['stop_reason'], rec['stop_reason'])}"
    return (f"{rec['id']}  {packets} packets  {human_bytes(rec['bytes'])}  {rec['lost']} lost  "
            f"{clock(seconds)}  {state}")


def summary(rec: dict[str, Any]) -> str:
    reason = REASONS.get(rec.get("stop_reason") or "", rec.get("stop_reason") or rec["state"])
    files = rec["files"]
    text = (f"Recording {label(rec)} {reason}: {rec['packets']} packets, {human_bytes(rec['bytes'])}, "
            f"{rec['lost']} lost, {len(files)} file{'' if len(files) == 1 else 's'}, {elapsed(rec):.1f} s.")
    if rec["lost"]:
        text += f"\nWarning: {rec['lost']} matching packets were lost (the daemon could not keep up)."
    return text


def show_recording(rec: dict[str, Any]) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["started"]))
    pairs: list[tuple[str, Any]] = [
        ("Recording", rec["id"]),
        ("Name", rec.get("name")),
        ("State", rec["state"] + (f" ({REASONS.get(rec['stop_reason'], rec['stop_reason'])})"
                                  if rec.get("stop_reason") else "")),
        ("Filters", "; ".join(rec["filters"])),
        ("Capture", f"{rec['capture_length']} bytes per packet" if rec["capture_length"] else "whole packets"),
        ("Format", rec["format"]),
        ("Direction", {"in": "in (as packets arrived)", "out": "out (as the LB sent them)",
                       "both": "in and out"}.get(rec.get("direction", "both"), rec.get("direction"))
         + ("" if rec.get("verdict", True) else "; verdict in the comment")),
        ("Stop after", limits_text(rec) or "-"),
        ("Rotate", rotate_text(rec) or "-"),
        ("Started", started),
        ("Elapsed", f"{elapsed(rec):.1f} s"),
        ("Packets", rec["packets"]),
        ("Bytes", rec["bytes"]),
        ("Lost", rec["lost"]),
    ]
    click.echo(fields(pairs))
    if rec["files"]:
        click.echo()
        click.echo(table(["INDEX", "SIZE", "PATH"], [[f["index"], f["size"], file_path(f)] for f in rec["files"]]))
    for problem in rec.get("problems") or ():
        click.echo(f"problem: {problem} (not served)")


class StatusLine:
    """One status line on stderr: rewritten in place (\\r) on a terminal, else a line per update."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.open = False

    def update(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
            self.open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False


# --- downloads ----------------------------------------------------------------------------------------------------


def targets(dest: str, files: list[dict[str, Any]]) -> list[Path]:
    """Where each file goes: into DEST if it is a directory (or ends with /), keeping the
    daemon's names; else DEST itself, or with several files DEST's stem + _INDEX + suffix."""
    p = Path(dest)
    if dest.endswith(os.sep) or p.is_dir():
        return [p / Path(f["name"]).name for f in files]
    if len(files) == 1:
        return [p]
    return [p.with_name(f"{p.stem}_{f['index']}{p.suffix}") for f in files]


def check_destination(dest: str) -> None:
    """Refuse a -w that cannot be written *before* a recording is started."""
    p = Path(dest)
    folder = p if (dest.endswith(os.sep) or p.is_dir()) else (p.parent if str(p.parent) else Path("."))
    if not folder.is_dir():
        raise click.BadParameter(f"{folder} is not a directory", param_hint="'-w' / '--write'")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.BadParameter(f"cannot write into {folder}", param_hint="'-w' / '--write'")
    if p.exists() and not p.is_dir() and not p.is_file():
        raise click.BadParameter(f"{p} exists and is not a regular file", param_hint="'-w' / '--write'")


def _stream(client: Client, url: str, out: IO[bytes]) -> int:
    """GET url into out without holding the file in memory; the same error mapping as Client
    (it has no streaming call, so its private helpers are reused here)."""
    try:
        with client._http.stream("GET", url) as r:
            if r.status_code >= 400:
                r.read()
                raise client._problem(r)
            want = int(r.headers.get("content-length", -1))
            got = 0
            for chunk in r.iter_bytes(1 << 20):
                out.write(chunk)
                got += len(chunk)
    except httpx.TimeoutException:
        raise Unreachable(f"no answer from l4lbd at {client.endpoint.describe()} within "
                          f"{client.endpoint.timeout:g} s", "raise it with --timeout") from None
    except httpx.TransportError as e:
        raise client._unreachable(e) from None
    if want >= 0 and got != want:
        raise CliError(f"{url}: got {got} of {want} bytes")
    return got


def download(client: Client, rec: dict[str, Any], dest: str, files: list[dict[str, Any]]) -> list[Path]:
    """Each file to a temporary name next to its target, renamed when complete: a target is
    either the whole file or untouched. Copies are 0600, like the daemon's (captured traffic)."""
    saved = []
    for f, target in zip(files, targets(dest, files)):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                _stream(client, f"/v1/recordings/{segment(rec['id'])}/files/{f['index']}", out)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
        saved.append(target)
    return saved


# --- the command group ----------------------------------------------------------------------------------------------


class RecordGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, starts ``start``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["start", *args]
        return super().parse_args(ctx, args)


@click.group("record", cls=RecordGroup, short_help="Record matching packets to pcapng/pcap (hubble-like filters).",
             subcommand_metavar="[start] FILTER... [OPTIONS] | COMMAND [ARGS]...", options_metavar="")
def record() -> None:
    """Record packets matching n-tuple filters into pcapng/pcap files on the daemon.

    \b
    FILTER is "SRC SPORT DST DPORT PROTO" (quote each one), like `hubble record`:
      SRC/DST  address or prefix, or any/*/0 (both wildcards: IPv4 and IPv6)
      PORTS    1-65535, or any/*/0;  PROTO  tcp, udp, icmp, icmpv6, any, or 1-255

    \b
    l4lbctl record "203.0.113.0/24 0 198.51.100.10 80 tcp" --packets 1000 -w web.pcapng
    l4lbctl record "any 0 198.51.100.10 53 udp" --duration 30s -w /tmp/
    l4lbctl record --detach --name dns "any 0 any 53 udp" --rotate-size 100M --rotate-count 5
    l4lbctl record list
    l4lbctl record download ID -w - | wireshark -k -i -

    Without a subcommand, `record FILTER...` is `record start FILTER...`.
    """


@record.command("start")
@click.argument("filters", nargs=-1, required=True, metavar="FILTER...")
@click.option("--capture-length", "--snaplen", "capture_length", type=click.IntRange(0, MAX_CAPTURE_LENGTH),
              default=0, metavar="BYTES", help="Bytes kept per packet (0 = whole packet) [default: 0].")
@click.option("--format", "fmt", type=click.Choice(["pcapng", "pcap"], case_sensitive=False), default="pcapng",
              show_default=True, help="File format (pcap: nanosecond classic pcap).")
@click.option("--direction", type=click.Choice(["in", "out", "both"], case_sensitive=False), default="both",
              show_default=True, help="Copies kept: in (as the packet arrived), out (as the LB sent it), both.")
@click.option("--no-verdict", "no_verdict", is_flag=True,
              help="pcapng: name the XDP verdict in the comment, not as an epb_verdict option (files that "
                   "Debian 12's editcap/mergecap/tshark -w can copy).")
@click.option("-c", "--packets", type=click.IntRange(min=1), metavar="N", help="Stop after N packets.")
@click.option("--bytes", "max_bytes", type=SIZE, help="Stop before the captured bytes exceed this (10M, 1Gi...).")
@click.option("--duration", type=DURATION, help="Stop after this long (30, 30s, 5m, 1h).")
@click.option("-C", "--rotate-size", type=SIZE, help="New file once the current one exceeds this size.")
@click.option("-G", "--rotate-seconds", type=DURATION, help="New file every this many seconds.")
@click.option("-W", "--rotate-count", type=click.IntRange(1, 100000), metavar="N",
              help="Keep N files: a ring with --rotate-size, else stop after N files.")
@click.option("--name", type=RecNameType(), help="A label shown in list/show and in the pcapng comment.")
@click.option("-w", "--write", "--output-file", "write", metavar="PATH|DIR",
              help="When done, download the file(s) to PATH (or into DIR, keeping their names).")
@click.option("-d", "--detach", is_flag=True, help="Start, print the recording's id and exit (it keeps running).")
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True, metavar="SECS",
              help="Refresh the status line every SECS seconds.")
@output_option
@pass_app
def start(app: App, filters: tuple[str, ...], capture_length: int, fmt: str, direction: str, no_verdict: bool,
          packets: int | None,
          max_bytes: int | None, duration: float | None, rotate_size: int | None, rotate_seconds: float | None,
          rotate_count: int | None, name: str | None, write: str | None, detach: bool, interval: float) -> None:
    """Start recording packets that match any FILTER; show live counts until a limit or Ctrl-C.

    Ctrl-C (or SIGTERM) stops the recording on the daemon and ends normally (exit 0). Then
    the files' paths on the daemon are printed, or with -w the paths of the local copies.
    """
    _check_filters(filters)
    try:
        RotationPolicy(file_size=rotate_size, rotate_ns=round(rotate_seconds * 1e9) if rotate_seconds else None,
                       max_files=rotate_count)
    except ValueError:
        raise click.UsageError("--rotate-count needs --rotate-size (a ring of files) or --rotate-seconds "
                               "(stop after N files)") from None
    if detach and write:
        raise click.UsageError("--detach leaves the recording running: download it later with "
                               "`l4lbctl record download ID -w PATH`")
    if write:
        check_destination(write)
    body: dict[str, Any] = {
        "filters": list(filters), "capture_length": capture_length, "format": fmt.lower(),
        "direction": direction.lower(), "verdict": not no_verdict,
        "stop": {k: v for k, v in (("packets", packets), ("bytes", max_bytes), ("duration", duration)) if v},
        "rotate": {k: v for k, v in (("size", rotate_size), ("seconds", rotate_seconds), ("count", rotate_count))
                   if v},
    }
    if name:
        body["name"] = name

    if detach:
        with _arming(filters, app):
            rec = app.client.json("POST", "/v1/recordings", json=body)
        if app.output != "table":
            emit(rec, app.output)
        else:
            click.echo(rec["id"])  # alone on stdout: rid=$(l4lbctl record --detach ...)
        return

    with _stop_signals_deferred(), _arming(filters, app):
        # Ctrl-C is held back until the id is known: a recording must never be left running unseen.
        rec = app.client.json("POST", "/v1/recordings", json=body)
    rec = _watch(app, rec, interval)
    saved = download(app.client, rec, write, rec["files"]) if write else []
    if app.output != "table":
        emit({**rec, "saved": [str(p) for p in saved]} if write else rec, app.output)
    else:
        for p in saved or [file_path(f) for f in rec["files"]]:
            click.echo(str(p))
    if rec.get("stop_reason") in ABNORMAL:
        raise CliError(f"recording {rec['id']} ended early: {REASONS[rec['stop_reason']]}")


#: After this long without the daemon's answer, ``record start`` says what it waits for.
ARMING_NOTICE_S = 0.3


@contextmanager
def _arming(filters: tuple[str, ...], app: App | None = None) -> Iterator[None]:
    """The daemon answers a start once the filters are armed in the datapath (map writes,
    milliseconds). Should it take longer (the daemon busy with a large apply, a slow disk),
    one line on stderr says what the pause is, rather than silence (not when there is no
    daemon socket to wait for: that error follows at once)."""
    n = sum(len(expand_filter(f)) for f in filters)
    # The notice is said whole before the answer's lines, or not at all: cancel() cannot
    # stop a timer that already fired, so both sides take this lock.
    lock, answered = threading.Lock(), [False]

    def say() -> None:
        endpoint = getattr(getattr(app, "client", None), "endpoint", None)
        sock = getattr(endpoint, "socket", None)
        if endpoint is not None and endpoint.url is None and sock is not None and not os.path.exists(sock):
            return
        with lock:
            if not answered[0]:
                click.echo(f"Waiting for l4lbd to arm {n} filter{'s' if n != 1 else ''} in the datapath...", err=True)

    notice = threading.Timer(ARMING_NOTICE_S, say)
    notice.daemon = True
    notice.start()
    try:
        yield
    finally:
        notice.cancel()
        with lock:
            answered[0] = True


def _check_filters(filters: tuple[str, ...]) -> None:
    """Parse every filter as the daemon will: a bad one is a usage error and nothing starts."""
    if all(len(f.split()) == 1 for f in filters) and len(filters) % 5 == 0:
        quoted = " ".join('"' + " ".join(filters[i:i + 5]) + '"' for i in range(0, len(filters), 5))
        raise click.UsageError(f"each filter is one argument of 5 fields: quote it, e.g. l4lbctl record {quoted}")
    for text in filters:
        try:
            expand_filter(text)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=f"FILTER {text!r}") from None


class _Stop(Exception):
    """SIGTERM while watching: stop the recording like Ctrl-C."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


@contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM back; _watch unblocks them once it can stop the recording (on an error,
    they are let through here)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        raise


def _watch(app: App, rec: dict[str, Any], interval: float) -> dict[str, Any]:
    """Poll until the recording stops, or stop it on Ctrl-C/SIGTERM. Returns the final document."""
    rid = rec["id"]
    line = StatusLine(sys.stderr)
    limits = limits_text(rec)
    click.echo(f"Recording {label(rec)}: {'; '.join(rec['filters'])}", err=True)
    click.echo(f"Until {limits + ' or ' if limits else ''}Ctrl-C.", err=True)
    t0 = time.monotonic()
    old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            while rec["state"] == "running":
                line.update(status_text(rec, time.monotonic() - t0))
                time.sleep(interval)
                rec = app.client.json("GET", f"/v1/recordings/{segment(rid)}")
        except (KeyboardInterrupt, _Stop):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the stop below must not be cut short twice
            try:
                rec = app.client.json("POST", f"/v1/recordings/{segment(rid)}/stop")
            except KeyboardInterrupt:
                line.end()
                raise Interrupted(f"interrupted: recording {rid} may still be running",
                                  f"stop it with `l4lbctl record stop {rid}`") from None
        except CliError as e:
            line.end()
            if isinstance(e, Unreachable):
                click.echo(f"Recording {rid}: lost contact with the daemon; it may still be running "
                           f"(`l4lbctl record show {rid}` once the daemon answers).", err=True)
            raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
    line.update(status_text(rec, time.monotonic() - t0))
    line.end()
    click.echo(summary(rec), err=True)
    return rec


# --- managing recordings --------------------------------------------------------------------------------------------


def _get(app: App, rid: str) -> dict[str, Any]:
    return app.client.json("GET", f"/v1/recordings/{segment(rid)}")


@record.command("list")
@output_option
@pass_app
def list_recordings(app: App) -> None:
    """All recordings (running and stopped), oldest first."""
    data = app.client.json("GET", "/v1/recordings")
    if app.output != "table":
        emit(data, app.output)
        return
    recs = data["recordings"]
    if not recs:
        click.echo("no recordings")
        return
    rows = []
    for r in recs:
        more = len(r["filters"]) - 1
        rows.append([r["id"], r.get("name"), r["state"], r.get("stop_reason"), r["packets"], r["bytes"], r["lost"],
                     len(r["files"]), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"])),
                     clock(elapsed(r)), r["filters"][0] + (f" (+{more})" if more else "")])
    click.echo(table(["ID", "NAME", "STATE", "REASON", "PACKETS", "BYTES", "LOST", "FILES", "STARTED", "ELAPSED",
                      "FILTER"], rows))


@record.command("show")
@REC_ID
@output_option
@pass_app
def show(app: App, rid: str) -> None:
    """One recording: filters, limits, live counts and its files."""
    rec = _get(app, rid)
    if app.output != "table":
        emit(rec, app.output)
    else:
        show_recording(rec)


@record.command("stop")
@REC_ID
@output_option
@pass_app
def stop(app: App, rid: str) -> None:
    """Stop a running recording (its files stay on the daemon); stopping a stopped one is a no-op."""
    rec = app.client.json("POST", f"/v1/recordings/{segment(rid)}/stop")
    if app.output != "table":
        emit(rec, app.output)
    else:
        show_recording(rec)


@record.command("download")
@REC_ID
@click.option("-w", "--write", "--output-file", "write", default=".", show_default=True, metavar="PATH|DIR|-",
              help="Into DIR keeping the daemon's names, to PATH (several files: PATH_INDEX), or - for stdout.")
@click.option("-i", "--index", "indexes", type=click.IntRange(min=0), multiple=True, metavar="N",
              help="Only file N (repeatable); default all.")
@pass_app
def download_cmd(app: App, rid: str, write: str, indexes: tuple[int, ...]) -> None:
    """Copy a recording's file(s) from the daemon; prints the local paths.

    A running recording can be downloaded too: the copy holds what was captured so far.
    `-w - | wireshark -k -i -` (or `| tshark -r -`) opens one file directly.
    """
    if write != "-":
        check_destination(write)
    rec = _get(app, rid)
    files = rec["files"]
    if indexes:
        have = {f["index"] for f in files}
        missing = sorted(set(indexes) - have)
        if missing:
            raise CliError(f"recording {rid} has no file {', '.join(map(str, missing))} "
                           f"(it has {', '.join(str(i) for i in sorted(have)) or 'none'})")
        files = [f for f in files if f["index"] in indexes]
    if not files:
        raise CliError(f"recording {rid} has no files")
    if write == "-":
        if len(files) != 1:
            raise click.UsageError(f"-w - writes one file; recording {rid} has {len(files)}: pick one with --index")
        if sys.stdout.isatty():
            raise click.UsageError("-w -: stdout is a terminal; pipe it (| wireshark -k -i -) or give a path")
        _stream(app.client, f"/v1/recordings/{segment(rid)}/files/{files[0]['index']}", sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    for p in download(app.client, rec, write, files):
        click.echo(str(p))
    if rec["state"] == "running":
        click.echo(f"Note: recording {rid} is still running: the copy holds what was captured so far.", err=True)


@record.command("delete")
@click.argument("rids", nargs=-1, required=True, metavar="ID...",
                shell_complete=complete_recording)
@pass_app
def delete(app: App, rids: tuple[str, ...]) -> None:
    """Stop (if running) and delete recordings with their files on the daemon."""
    for rid in rids:
        app.client.request("DELETE", f"/v1/recordings/{segment(rid)}")
        click.echo(f"recording {rid} deleted")


__all__ = ["record"]
