"""The man page writer (l4lb/manpages.py): roff escaping and click's paragraph kinds.
The installed pages themselves are rendered with `man -l` in tests/test_systemd.py."""

from __future__ import annotations

import subprocess

import click

from l4lb.manpages import click_page, escape


def test_escape_keeps_roff_control_characters_literal() -> None:
    assert escape(".hidden\n'quoted\nC:\\path --opt") == "\\&.hidden\n\\&'quoted\nC:\\epath \\-\\-opt"


def test_click_page_keeps_b_blocks_and_renders_clean(tmp_path) -> None:
    @click.group(epilog="Exit codes: 0 ok; 130 interrupted.\n\nEnvironment: X_SOCKET.")
    def tool() -> None:
        """Do things.

        \b
        tool one --flag
        .starts with a dot
        """

    @tool.command()
    @click.option("--flag", help="A flag -- with \\ a backslash.")
    def one(flag: bool) -> None:
        """The first thing."""

    page = tmp_path / "tool.1"
    page.write_text(click_page(tool, "tool", "9.9"))
    cp = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                        env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert cp.returncode == 0 and cp.stderr == "", cp.stderr
    lines = [line.strip() for line in cp.stdout.splitlines()]
    # The \b block keeps its lines (and its dot line is text, not a roff request).
    assert lines[lines.index("tool one --flag") + 1] == ".starts with a dot"
    assert "A flag -- with \\ a backslash." in lines and "tool one [OPTIONS]" in lines
    assert "EXIT STATUS" in lines and "0 ok; 130 interrupted." in lines and "X_SOCKET." in lines
