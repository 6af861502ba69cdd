"""keepalived.conf's syntax: words, comments, includes, variables, and a tree of statements. Pure
apart from reading the files (through ``read`` and ``glob`` callables).

* ``keyword args... { ... }`` blocks; a ``{`` may also start the next line;
* ``#`` and ``!`` comments, ``"quoted strings"`` (which may hold them), ``\\`` continuations;
* ``include GLOB``, relative to the including file, nested (at most 16 deep);
* ``$NAME=value`` definitions, used as ``$NAME`` or ``${NAME}``;
* ``@host`` lines (for one host only) are left out with a note.

What the statements mean is ``keepalived.py``'s business.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from .ipvs import Notes
from .result import SourceError

Reader = Callable[[str], str]
Globber = Callable[[str], list[str]]


@dataclass
class Stmt:
    """``keyword args...`` and, for a block, its statements."""

    keyword: str
    args: list[str]
    source: str
    line: int
    children: list["Stmt"] | None = None

    def where(self) -> tuple[str, int]:
        return self.source, self.line

    def first(self, *keywords: str) -> "Stmt | None":
        return next((c for c in self.children or [] if c.keyword in keywords), None)


_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def _split(text: str, source: str, n: int) -> list[str]:
    """Words of one logical line: quotes kept together, comments dropped, braces apart."""
    out: list[str] = []
    word, quoted, i = "", False, 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == '"':
                quoted = False
                out.append(word)
                word = ""
            else:
                word += c
        elif c == '"':
            if word:
                out.append(word)
            word, quoted = "", True
        elif c in "#!":
            break
        elif c.isspace() or c in "{}":
            if word:
                out.append(word)
            word = ""
            if c in "{}":
                out.append(c)
        else:
            word += c
        i += 1
    if quoted:
        raise SourceError(source, n, "a quoted string is not closed")
    if word:
        out.append(word)
    return out


class Lexer:
    def __init__(self, read: Reader, globber: Globber, notes: Notes) -> None:
        self.read, self.glob, self.notes = read, globber, notes
        self.vars: dict[str, str] = {}
        self.depth = 0

    def lines(self, path: str) -> list[tuple[str, int, list[str]]]:
        """(file, line, words) of ``path`` with its includes expanded in place."""
        try:
            text = self.read(path)
        except OSError as e:
            raise SourceError(path, 0, f"cannot read: {e.strerror or e}") from None
        out: list[tuple[str, int, list[str]]] = []
        pending, start = "", 0
        for n, raw in enumerate(text.splitlines(), 1):
            if raw.rstrip().endswith("\\"):
                pending, start = pending + raw.rstrip()[:-1] + " ", start or n
                continue
            line, first = pending + raw, start or n
            pending, start = "", 0
            out += self._line(path, first, line)
        if pending:
            out += self._line(path, start, pending)
        return out

    def _line(self, path: str, n: int, line: str) -> list[tuple[str, int, list[str]]]:
        stripped = line.strip()
        if stripped.startswith("@"):
            host = stripped.split(None, 1)[0]
            self.notes.add(path, n, host, "ignored", "a line for one host only (keepalived's conditional "
                           "configuration): import the file on that box, or remove the prefix")
            return []
        m = re.match(r"^\$(\w+)\s*=\s*(.*)$", stripped)
        if m:
            self.vars[m.group(1)] = m.group(2).strip()
            return []
        if "$" in line:
            def value(v: re.Match[str]) -> str:
                name = v.group(1) or v.group(2)
                if name not in self.vars:
                    raise SourceError(path, n, f"${name} is not defined (before this line)")
                return self.vars[name]
            line = _VAR.sub(value, line)
        words = _split(line, path, n)
        if words[:1] == ["include"]:
            return self._include(path, n, words)
        return [(path, n, words)] if words else []

    def _include(self, path: str, n: int, words: list[str]) -> list[tuple[str, int, list[str]]]:
        if len(words) != 2:
            raise SourceError(path, n, "include takes one file name or pattern")
        pattern = words[1]
        if not os.path.isabs(pattern):
            pattern = os.path.join(os.path.dirname(path), pattern)
        files = sorted(self.glob(pattern))
        if not files:
            self.notes.add(path, n, f"include {words[1]}", "ignored", "no file matches")
            return []
        self.depth += 1
        if self.depth > 16:
            raise SourceError(path, n, "includes nested more than 16 deep (does a file include itself?)")
        try:
            return [x for f in files for x in self.lines(f)]
        finally:
            self.depth -= 1


def tree(lines: list[tuple[str, int, list[str]]]) -> list[Stmt]:
    root: list[Stmt] = []
    stack: list[list[Stmt]] = [root]
    last_open: Stmt | None = None  # a statement that may still take a "{" from the next line
    for source, n, words in lines:
        cur: Stmt | None = None
        for w in words:
            if w == "{":
                target = cur or last_open
                if target is None or target.children is not None:
                    raise SourceError(source, n, "'{' without a keyword before it")
                target.children = []
                stack.append(target.children)
                cur = last_open = None
            elif w == "}":
                if len(stack) == 1:
                    raise SourceError(source, n, "'}' without a block to close")
                stack.pop()
                cur = last_open = None
            elif cur is None:
                cur = Stmt(w, [], source, n)
                stack[-1].append(cur)
            else:
                cur.args.append(w)
        last_open = cur
    if len(stack) > 1:
        opened = _unclosed(root)
        raise SourceError(opened.source, opened.line, f"block {opened.keyword} is never closed")
    return root


def _unclosed(stmts: list[Stmt]) -> Stmt:
    s = [x for x in stmts if x.children is not None][-1]
    inner = [x for x in s.children or [] if x.children is not None]
    return _unclosed(s.children or []) if inner else s
