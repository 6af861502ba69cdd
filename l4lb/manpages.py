"""Man pages for ``l4lbctl`` (section 1) and ``l4lbd`` (section 8), made from their parsers.

``python -m l4lb.manpages DIR`` writes ``DIR/man1/l4lbctl.1`` and ``DIR/man8/l4lbd.8``
(``make install`` does, into /usr/local/share/man). The text is the commands' own
help, so a page cannot drift from ``--help``.

Written here rather than with click-man: click-man 0.6 drops a command's epilog
(our exit codes and environment), runs click's ``\\b`` (keep as typed) blocks
together, and stops at a command group without help text. argparse-manpage
would cover only l4lbd, whose parser is a handful of options; one small roff
writer serves both.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

import click

# Epilog paragraphs that start with these words become sections of their own.
SECTIONS = {"Exit codes": "EXIT STATUS", "Environment": "ENVIRONMENT", "Signals": "SIGNALS", "Files": "FILES"}


def escape(text: str) -> str:
    """Text for roff: backslashes and hyphen-minus escaped, no line starting with a control character."""
    out = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").split("\n"):
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def paragraphs(text: str | None) -> Iterator[tuple[bool, str]]:
    """(keep as typed, text) per paragraph of click/argparse help (``\\b`` marks a kept one)."""
    for para in inspect.cleandoc(text or "").split("\n\n"):
        lines = para.split("\n")
        if lines and lines[0].strip() == "\b":
            yield True, "\n".join(lines[1:])
        elif para.strip():
            yield False, " ".join(line.strip() for line in lines)


def _body(text: str | None) -> list[str]:
    out = []
    for kept, para in paragraphs(text):
        out += [".PP", ".nf", escape(para), ".fi"] if kept else [".PP", escape(para)]
    return out


def _epilog(text: str | None) -> list[str]:
    out = []
    for kept, para in paragraphs(text):
        head, sep, rest = para.partition(":")
        if sep and head.strip() in SECTIONS:
            out += [f".SH {SECTIONS[head.strip()]}", escape(rest.strip())]
        else:
            out += [".PP", ".nf", escape(para), ".fi"] if kept else [".PP", escape(para)]
    return out


def _header(name: str, section: int, summary: str, version: str) -> list[str]:
    return [f'.TH {name.upper()} {section} "" "l4lb {version}" "l4lb manual"',
            ".SH NAME", f"{escape(name)} \\- {escape(summary)}"]


def _item(term: str, text: str) -> list[str]:
    return [".TP", f"\\fB{escape(term)}\\fR", escape(text or "")]


def _click_options(cmd: click.Command, ctx: click.Context, with_help: bool = True) -> list[str]:
    out = []
    for p in cmd.get_params(ctx):
        if not isinstance(p, click.Option) or ("--help" in p.opts and not with_help):
            continue  # arguments are in the synopsis; --help once, at the top
        record = p.get_help_record(ctx)
        if record is not None:
            out += _item(*record)
    return out


def _click_commands(group: click.Command, ctx: click.Context) -> list[str]:
    out = []
    for name, cmd in getattr(group, "commands", {}).items():
        if cmd.hidden:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx)
        out += [f'.SS "{escape(sub.command_path)} {escape(" ".join(cmd.collect_usage_pieces(sub)))}"']
        out += _body(cmd.help or cmd.short_help)
        options = _click_options(cmd, sub, with_help=False)
        if options:
            out += [".RS", *options, ".RE"]
        out += _click_commands(cmd, sub)
    return out


def click_page(cli: click.Command, name: str, version: str, section: int = 1, see_also: str = "") -> str:
    ctx = click.Context(cli, info_name=name)
    summary = cli.short_help or (cli.help or "").strip().split("\n")[0].rstrip(".")
    lines = _header(name, section, summary, version)
    lines += [".SH SYNOPSIS", f"\\fB{escape(name)}\\fR {escape(' '.join(cli.collect_usage_pieces(ctx)))}"]
    lines += [".SH DESCRIPTION", *_body(cli.help)]
    lines += [".SH OPTIONS", *_click_options(cli, ctx)]
    lines += [".SH COMMANDS", *_click_commands(cli, ctx)]
    lines += _epilog(cli.epilog)
    if see_also:
        lines += [".SH SEE ALSO", escape(see_also)]
    return "\n".join(lines) + "\n"


def argparse_page(parser: argparse.ArgumentParser, version: str, section: int = 8, see_also: str = "") -> str:
    name = parser.prog
    description = parser.description or ""
    summary, _, rest = description.partition("\n\n")
    lines = _header(name, section, summary.strip().rstrip("."), version)
    usage = parser.format_usage().removeprefix("usage: ").strip()
    lines += [".SH SYNOPSIS", "\\fB" + escape(name) + "\\fR " + escape(usage.removeprefix(name).strip())]
    lines += [".SH DESCRIPTION", *_body(rest or summary)]
    lines += [".SH OPTIONS"]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        term = ", ".join(action.option_strings) or action.dest
        if action.option_strings and action.nargs != 0:
            term += " " + formatter._format_args(action, action.dest.upper())
        lines += _item(term, formatter._expand_help(action) if action.help else "")
    lines += _epilog(parser.epilog)
    if see_also:
        lines += [".SH SEE ALSO", escape(see_also)]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """Relative path -> page text, for l4lbctl and l4lbd."""
    from l4lb import __version__
    from l4lb.cli.main import cli
    from l4lb.daemon import build_parser

    return {
        "man1/l4lbctl.1": click_page(cli, "l4lbctl", __version__, see_also="l4lbd(8)"),
        "man8/l4lbd.8": argparse_page(build_parser(), __version__, see_also="l4lbctl(1), systemctl(1), bird(8)"),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m l4lb.manpages DIR   (writes DIR/man1/l4lbctl.1 and DIR/man8/l4lbd.8)",
              file=sys.stderr)
        return 2
    for rel, text in pages().items():
        path = Path(args[0]) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
