"""Rendering: aligned tables for people, JSON/YAML (the API's own bodies) for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click
import yaml

FORMATS = ("table", "json", "yaml")

Cell = str | int | float | None


def _cell(v: Cell) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], *, right: Sequence[bool] | None = None) -> str:
    """Columns padded to their widest cell; numbers (or columns flagged in ``right``) right-aligned."""
    text = [[_cell(c) for c in row] for row in rows]
    if right is None:
        right = [bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
                 and any(isinstance(r[i], (int, float)) for r in rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(out).rstrip()

    return "\n".join([line(list(headers))] + [line(r) for r in text])


def fields(pairs: Sequence[tuple[str, Cell]]) -> str:
    """``Key:  value`` lines, values aligned."""
    width = max((len(k) for k, _ in pairs), default=0) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {_cell(v)}" for k, v in pairs)


def dump(data: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")


def emit(data: Any, fmt: str) -> None:
    click.echo(dump(data, fmt))


def count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")
