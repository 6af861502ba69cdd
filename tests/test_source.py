"""The one way BPF C is compiled (l4lb/datapath/source.py): header inlining, errors,
and that no other code calls BCC's compiler (issue 17: a bench that compiled
bench_floor.c by itself broke when the file gained a lib/ header)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from l4lb.datapath.config import DatapathError
from l4lb.datapath.source import assemble, bpf_src_dir, compile_bpf

ROOT = Path(__file__).resolve().parent.parent
SOURCE_PY = ROOT / "l4lb/datapath/source.py"
PY_DIRS = ("l4lb", "api", "recorder", "bench", "tests", "scripts")


def bcc_compiles(path: Path) -> list[int]:
    """Lines of `path` that call bcc's ``BPF(...)`` (by that name or as ``bcc.BPF(...)``)."""
    tree = ast.parse(path.read_text(), str(path))
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
            and ((isinstance(n.func, ast.Name) and n.func.id == "BPF")
                 or (isinstance(n.func, ast.Attribute) and n.func.attr == "BPF"))]


def test_only_compile_bpf_calls_bcc() -> None:
    files = [p for d in PY_DIRS for p in (ROOT / d).rglob("*.py")]
    assert SOURCE_PY in files and bcc_compiles(SOURCE_PY), "the checker must see compile_bpf's own call"
    others = {str(p.relative_to(ROOT)): lines for p in files if p != SOURCE_PY and (lines := bcc_compiles(p))}
    assert not others, f"compile BPF C with l4lb.datapath.source.compile_bpf, not BCC directly: {others}"


def test_assemble_inlines_lib_headers_once_with_line_markers() -> None:
    text = '#include "lib/jhash.h"\n#include <linux/ip.h>\n#include "lib/jhash.h"\nint after;\n'
    out = assemble("probe.c", text=text).splitlines()
    assert out.count('#line 1 "lib/jhash.h"') == 1, "a header included twice is inlined once"
    assert out.count("#define JHASH_INITVAL 0xdeadbeef") == 1
    assert '#line 1 "lib/common.h"' in out, "headers' own lib/ includes are inlined too"
    assert "#include <linux/ip.h>" in out, "system headers are left to the compiler"
    assert not any('"lib/' in line and "#include" in line for line in out)
    # the entry's own lines keep their numbers: `int after;` is line 4 of probe.c
    i = out.index("int after;")
    marker = max(j for j in range(i) if out[j].startswith("#line"))
    assert out[marker] == '#line 4 "probe.c"' and marker == i - 1


def test_assemble_of_a_file_equals_assemble_of_its_text() -> None:
    for entry in ("l4lb.c", "bench_floor.c", "decap.c"):
        assert assemble(entry) == assemble(entry, text=(bpf_src_dir() / entry).read_text())


@pytest.mark.bpf
def test_compile_error_names_the_entry() -> None:
    with pytest.raises(DatapathError, match="BPF compile of broken.c failed"):
        compile_bpf("broken.c", text="int f(struct xdp_md *ctx) { return undeclared; }\n")
