"""Assemble the BPF C source for BCC.

BCC rewrites map method calls (``services.lookup(&k)``) only in the main
translation unit, not inside #included headers. The tree keeps one header
per concern (like Katran's lib/bpf/), so we inline the project's own
``#include "lib/..."`` headers here, once each (#pragma once semantics), with
#line markers so compiler errors still name the real file and line.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$")


def bpf_src_dir() -> Path:
    return Path(str(resources.files("l4lb.bpf_src")))


def assemble(entry: str, root: Path | None = None) -> str:
    """Return `entry` (relative to bpf_src/) with local headers inlined."""
    root = root or bpf_src_dir()
    seen: set[Path] = set()
    out: list[str] = []

    def emit(path: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.add(path)
        rel = path.relative_to(root.resolve())
        out.append(f'#line 1 "{rel}"')
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            m = _INCLUDE.match(line)
            if m and (root / m.group(1)).is_file():
                emit(root / m.group(1))
                out.append(f'#line {n + 1} "{rel}"')
            elif _PRAGMA_ONCE.match(line):
                out.append("")
            else:
                out.append(line)

    emit(root / entry)
    return "\n".join(out) + "\n"


def enum_names(text: str, enum: str, prefix: str) -> list[str]:
    """Names of a C enum in declaration order, without `prefix`, lower case.

    Lets Python label counters by the C enum itself (single source of truth);
    only plain sequential enums (no explicit values but the first) are allowed.
    """
    m = re.search(r"enum\s+" + re.escape(enum) + r"\s*\{(.*?)\}", text, re.S)
    if not m:
        raise ValueError(f"enum {enum} not found")
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    names = []
    for i, item in enumerate(x.strip() for x in body.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        if value.strip() and not (i == 0 and value.strip() == "0"):
            raise ValueError(f"enum {enum}: explicit values are not supported ({item})")
        name = name.strip()
        if not name.startswith(prefix):
            raise ValueError(f"enum {enum}: {name} lacks prefix {prefix}")
        names.append(name[len(prefix):].lower())
    return names


def layout_digest(text: str, cflags: list[str]) -> str:
    """Identifies a map layout: the pinned maps of one digest are compatible."""
    maps = resources.files("l4lb.bpf_src").joinpath("lib/maps.h").read_text()
    h = hashlib.sha256(maps.encode())
    for f in sorted(cflags):
        h.update(f.encode() + b"\0")
    return h.hexdigest()[:12]
