"""Assemble and compile the project's BPF C sources: the one way to compile them.

BCC rewrites map method calls (``services.lookup(&k)``) only in the main
translation unit, not inside #included headers. The tree keeps one header
per concern (like Katran's lib/bpf/), so we inline the project's own
``#include "lib/..."`` headers here, once each (#pragma once semantics), with
#line markers so compiler errors still name the real file and line.

Every BPF program of the project (the loader's l4lb.c, the lab's decap.c, the
benches' bench_floor.c, a test's own small program) is compiled by
:func:`compile_bpf`, so none of them can miss that step (tests/test_source.py
checks that nothing else calls BCC's compiler).
"""

from __future__ import annotations

import hashlib
import re
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from l4lb.datapath.config import DatapathError

_COMPILE = threading.Lock()  # one BCC/LLVM compile at a time (the probe tunnel compiles in a thread)
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$")


def bpf_src_dir() -> Path:
    return Path(str(resources.files("l4lb.bpf_src")))


def assemble(entry: str, root: Path | None = None, *, text: str | None = None) -> str:
    """Return `entry` (relative to bpf_src/) with local headers inlined.

    With `text`, that C is assembled instead (its includes resolved against
    bpf_src/ all the same) and `entry` only names it in #line markers.
    """
    root = (root or bpf_src_dir()).resolve()
    if text is not None:
        return _assemble(entry, root, text)
    # A start assembles the entry several times (the pin directory's digest, the
    # program's): once per version of the files is enough.
    stamp = tuple((str(p), st.st_mtime_ns, st.st_size) for p in sorted(root.rglob("*"))
                  if p.suffix in (".c", ".h") and (st := p.stat()))
    key = (entry, root, stamp)
    last = _ASSEMBLED[0]  # one read: another thread (the probe tunnel's compile) may replace it
    if last is not None and last[0] == key:
        return last[1]
    out = _assemble(entry, root, None)
    _ASSEMBLED[0] = (key, out)
    return out


_ASSEMBLED: list[tuple[Any, str] | None] = [None]  # the last assembled entry: (name, root, files' stamps), text


def _assemble(entry: str, root: Path, text: str | None) -> str:
    seen: set[Path] = set()
    out: list[str] = []

    def emit(name: str, body: str) -> None:
        out.append(f'#line 1 "{name}"')
        for n, line in enumerate(body.splitlines(), start=1):
            m = _INCLUDE.match(line)
            if m and (root / m.group(1)).is_file():
                header = (root / m.group(1)).resolve()
                if header not in seen:
                    seen.add(header)
                    emit(str(header.relative_to(root)), header.read_text())
                out.append(f'#line {n + 1} "{name}"')
            elif _PRAGMA_ONCE.match(line):
                out.append("")
            else:
                out.append(line)

    if text is None:
        path = (root / entry).resolve()
        seen.add(path)
        text = path.read_text()
    emit(entry, text)
    return "\n".join(out) + "\n"


def compile_bpf(entry: str, cflags: Iterable[str] = (), *, text: str | None = None) -> Any:
    """Compile `entry` of bpf_src/ with BCC (its lib/ headers inlined) and return the ``bcc.BPF``.

    With `text`, that C is compiled instead (a test's own small program) and
    `entry` names it. BCC raises a bare Exception (the compiler's or verifier's
    log went to stderr): it becomes a DatapathError that names the entry.
    """
    from bcc import BPF  # imported here: only code that compiles needs libbcc

    src = assemble(entry, text=text)
    try:
        with _COMPILE:
            return BPF(text=src.encode(), cflags=list(cflags))
    except Exception as e:
        raise DatapathError(f"BPF compile of {entry} failed: {e}") from e


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


def layout_digest(text: str, cflags: list[str], maps_header: str = "lib/maps.h") -> str:
    """Identifies a map layout: the pinned maps of one digest are compatible."""
    maps = resources.files("l4lb.bpf_src").joinpath(maps_header).read_text()
    h = hashlib.sha256(maps.encode())
    for f in sorted(cflags):
        h.update(f.encode() + b"\0")
    return h.hexdigest()[:12]
