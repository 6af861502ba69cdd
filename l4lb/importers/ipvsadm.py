"""``ipvsadm -S -n`` (ipvsadm-save, also what ipvsadm-restore reads) -> l4lb services. Pure.

One rule per line, ipvsadm's own options (short or long, as ipvsadm 1.31 writes
and reads them)::

    -A -t 198.51.100.10:80 -s mh -b mh-port          a virtual service
    -A -u [2001:db8::53]:53 -s wrr -p 300            (persistent)
    -a -t 198.51.100.10:80 -r 192.0.2.101:80 -g -w 1 a real server of it

``#`` starts a comment. Names instead of numbers (a save without ``-n``) are
refused: l4lb needs addresses. A line that is not ipvsadm syntax stops the
import (SourceError); a valid rule that l4lb cannot express becomes a note.
"""

from __future__ import annotations

import getopt
import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import Any

from . import ipvs
from .ipvs import Notes
from .result import Draft, Result, SourceError, finish, service_name

SHORT = "AEDCaedLlZRSt:u:f:s:p:M:r:gimw:x:y:b:n6oc"
LONG = ["add-service", "edit-service", "delete-service", "clear", "add-server", "edit-server", "delete-server",
        "list", "zero", "restore", "save", "tcp-service=", "udp-service=", "sctp-service=", "fwmark-service=",
        "scheduler=", "persistent=", "netmask=", "real-server=", "gatewaying", "ipip", "masquerading", "weight=",
        "u-threshold=", "l-threshold=", "sched-flags=", "numeric", "ipv6", "ops", "pe=", "tun-type=", "tun-port=",
        "tun-nocsum", "tun-csum", "tun-remcsum", "connection", "exact"]
ALIASES = {"--add-service": "-A", "--edit-service": "-E", "--delete-service": "-D", "--clear": "-C",
           "--add-server": "-a", "--edit-server": "-e", "--delete-server": "-d", "--tcp-service": "-t",
           "--udp-service": "-u", "--fwmark-service": "-f", "--scheduler": "-s", "--persistent": "-p",
           "--netmask": "-M", "--real-server": "-r", "--gatewaying": "-g", "--ipip": "-i", "--masquerading": "-m",
           "--weight": "-w", "--u-threshold": "-x", "--l-threshold": "-y", "--sched-flags": "-b", "--ops": "-o",
           "--ipv6": "-6", "--numeric": "-n", "--list": "-L", "--zero": "-Z", "--restore": "-R", "--save": "-S"}
COMMANDS = {"-A", "-E", "-D", "-C", "-a", "-e", "-d", "-L", "-l", "-Z", "-R", "-S"}
DEFAULT_PERSISTENCE = "300"  # ipvsadm's, for a bare -p


@dataclass
class _Service:
    line: int
    doc: dict[str, Any]
    hash_src_port: bool
    affinity_prefix: int | None = None
    dnat: bool = False
    backends: list[dict[str, Any]] = field(default_factory=list)


def _options(tokens: list[str], source: str, n: int) -> dict[str, str]:
    # -p takes an optional timeout, which getopt cannot express: give a bare one ipvsadm's default.
    fixed: list[str] = []
    for i, t in enumerate(tokens):
        fixed.append(t)
        if t in ("-p", "--persistent") and (i + 1 == len(tokens) or tokens[i + 1].startswith("-")):
            fixed.append(DEFAULT_PERSISTENCE)
    try:
        pairs, rest = getopt.gnu_getopt(fixed, SHORT, LONG)
    except getopt.GetoptError as e:
        raise SourceError(source, n, f"not an ipvsadm rule: {e.msg}") from None
    if rest:
        raise SourceError(source, n, f"not an ipvsadm rule: unexpected {rest[0]!r}")
    out: dict[str, str] = {}
    for opt, value in pairs:
        key = ALIASES.get(opt, opt)
        if key in COMMANDS and any(k in COMMANDS for k in out):
            raise SourceError(source, n, "two commands on one line")
        out[key] = value
    return out


def _hostport(text: str, source: str, n: int, what: str) -> tuple[str, int | None]:
    """``198.51.100.10:80``, ``[2001:db8::1]:443``, or an address alone."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]")
        port = port.removeprefix(":") if sep else None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise SourceError(source, n, f"{what} {text!r}: not a numeric address "
                          "(save the table with `ipvsadm -S -n`)") from None
    if port in (None, ""):
        return host, None
    if not port.isdigit() or int(port) > 65535:
        raise SourceError(source, n, f"{what} {text!r}: {port!r} is not a port number "
                          "(save the table with `ipvsadm -S -n`)")
    return host, int(port)


def _number(value: str, lo: int, hi: int, source: str, n: int, what: str) -> int:
    if not value.isdigit() or not lo <= int(value) <= hi:
        raise SourceError(source, n, f"{what} {value!r} is not a number from {lo} to {hi}")
    return int(value)


def parse(text: str, source: str = "<ipvsadm>") -> Result:
    """The rules of ``ipvsadm -S -n`` -> a Result (services and notes); SourceError for bad syntax."""
    notes = Notes()
    services: dict[tuple[str, str], _Service] = {}
    skipped: dict[tuple[str, str], str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            tokens = shlex.split(line)
        except ValueError as e:
            raise SourceError(source, n, f"not an ipvsadm rule: {e}") from None
        if tokens and tokens[0] == "ipvsadm":
            tokens = tokens[1:]
        opts = _options(tokens, source, n)
        command = next((k for k in opts if k in COMMANDS), None)
        if command is None:
            raise SourceError(source, n, "no command: a saved rule starts with -A (service) or -a (real server)")
        if command not in ("-A", "-a"):
            notes.add(source, n, command, "ignored", "not a rule of a saved table (`ipvsadm -S -n` writes -A and "
                      "-a only); `l4lbctl apply` replaces the whole desired state anyway")
            continue
        kinds = [k for k in ("-t", "-u", "--sctp-service", "-f") if k in opts]
        if len(kinds) != 1:
            raise SourceError(source, n, "name exactly one service: -t, -u, --sctp-service or -f")
        kind = kinds[0]
        key = (kind, opts[kind])
        if command == "-A":
            if key in services or key in skipped:
                raise SourceError(source, n, f"service {kind} {opts[kind]} is defined twice")
            why = _add_service(opts, kind, source, n, notes, services)
            if why:
                skipped[key] = why
                notes.add(source, n, f"{kind} {opts[kind]}", "skipped", why)
            continue
        if key in skipped:
            continue  # noted once, at its -A line
        if key not in services:
            raise SourceError(source, n, f"real server for {kind} {opts[kind]}, which no -A line before defines")
        _add_server(opts, services[key], source, n, notes)
    drafts = []
    for svc in services.values():
        svc.doc["options"] = ipvs.options(svc.hash_src_port, svc.dnat, svc.affinity_prefix)
        if not svc.doc["options"]:
            del svc.doc["options"]
        svc.doc["backends"] = svc.backends
        drafts.append(Draft(source, svc.line, svc.doc))
    return finish(drafts, notes.done())


def _add_service(opts: dict[str, str], kind: str, source: str, n: int, notes: Notes,
                 services: dict[tuple[str, str], _Service]) -> str | None:
    """An -A line; returns why it is skipped, or None."""
    if kind == "-f":
        return "a firewall-mark service has no equivalent: an l4lb service is one VIP, port and protocol"
    if kind == "--sctp-service":
        return "SCTP is not load-balanced by l4lb (TCP and UDP only)"
    vip, port = _hostport(opts[kind], source, n, "service")
    if not port:
        return "a service on every port (port 0) has no equivalent: an l4lb service has one port"
    protocol = "tcp" if kind == "-t" else "udp"
    family = ipaddress.ip_address(vip).version
    flags = [f for f in opts.get("-b", "").split(",") if f]
    for f in flags:
        if f not in ipvs.SCHEDULER_FLAGS:
            raise SourceError(source, n, f"-b {f!r} is not a scheduler flag ({', '.join(sorted(ipvs.SCHEDULER_FLAGS))})")
    sched = opts.get("-s")
    hash_port, r = ipvs.scheduler(sched, flags, f"-s {sched}" if sched else "-s (none: wlc)")
    r.to(notes, source, n)
    timeout = _number(opts["-p"], 1, 1 << 31, source, n, "-p") if "-p" in opts else None
    mask = opts.get("-M")
    if mask is not None:
        try:
            ipvs.prefix_len(mask, family)
        except ValueError:
            raise SourceError(source, n, f"-M {mask!r} is not a netmask") from None
    hash_port, affinity, r = ipvs.persistence(timeout, mask, family, f"-p {opts.get('-p')}", f"-M {mask}", hash_port)
    r.to(notes, source, n)
    for opt, what in (("-o", "one-packet scheduling: l4lb keeps each client port's datagrams on one backend"),
                      ("--pe", "persistence engines (SIP) have no equivalent")):
        if opt in opts:
            notes.add(source, n, opt + (f" {opts[opt]}" if opts[opt] else ""), "ignored", what)
    doc = {"name": service_name(protocol, vip, port), "vip": ipaddress.ip_address(vip).compressed, "port": port,
           "protocol": protocol}
    services[(kind, opts[kind])] = _Service(n, doc, hash_port, affinity)
    return None


def _add_server(opts: dict[str, str], svc: _Service, source: str, n: int, notes: Notes) -> None:
    if "-r" not in opts:
        raise SourceError(source, n, "-a needs -r ADDRESS[:PORT]")
    address, port = _hostport(opts["-r"], source, n, "real server")
    methods = [m for m in ("g", "i", "m") if f"-{m}" in opts]
    if len(methods) > 1:
        raise SourceError(source, n, "give one of -g, -i, -m")
    kind = methods[0] if methods else "g"  # ipvsadm's default: direct routing
    scope = svc.doc["name"]
    what = f"-{kind}" if methods else "(no -g/-i/-m: -g)"
    ipvs.forwarding(kind, what, opts.get("--tun-type")).to(notes, source, n, scope)
    weight = _number(opts.get("-w", "1"), 0, ipvs.MAX_WEIGHT, source, n, "-w")
    doc, dnat, r = ipvs.backend(address, port, svc.doc["port"], kind, weight, f"-r {opts['-r']}")
    r.to(notes, source, n, scope)
    svc.dnat |= dnat
    for opt, what in (("-x", "connection thresholds have no equivalent"),
                      ("-y", "connection thresholds have no equivalent")):
        if opt in opts:
            notes.add(source, n, f"{opt} {opts[opt]}", "ignored", what, scope)
    svc.backends.append(doc)
