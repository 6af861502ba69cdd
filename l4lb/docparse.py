"""Documents (JSON request bodies, the CLI's JSON/YAML files) parsed strictly.

Python's json and PyYAML accept things an operator never means, and say nothing:
- a key given twice in one object: both keep the last, so ``{"port": 80, "port": 81}``
  would apply 81 without a word (RFC 8259 leaves duplicate names to the parser; YAML 1.2
  forbids them, PyYAML does not check);
- ``NaN`` and ``Infinity``: not JSON (RFC 8259), yet json.loads takes them (and reads
  ``1e400`` as infinity);
- nesting deeper than the interpreter's stack: json.loads ends in RecursionError, which a
  daemon would answer as its own internal error instead of the client's.
Here each of those is a ``DocumentError`` (a ValueError) whose message says what and where
it can, so every entry point refuses such a document with a clear error before any of it is used.
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml


class DocumentError(ValueError):
    """A document that parses but is refused (or does not parse): ``msg`` says why."""

    def __init__(self, msg: str, line: int | None = None, column: int | None = None) -> None:
        where = f" at line {line}, column {column}" if line is not None else ""
        super().__init__(f"{msg}{where}")
        self.msg, self.line, self.column = msg, line, column


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: only then look for which key
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DocumentError(f"the key {key!r} is given twice in one object")
            seen.add(key)
    return out


def _no_constant(name: str) -> Any:
    raise DocumentError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise DocumentError(f"{text} is beyond the range of a number")
    return v


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant, parse_float=_finite)


def loads_json(raw: str | bytes) -> Any:
    """``raw`` as JSON, strictly (see the module's doc). Malformed JSON is json's own
    JSONDecodeError (it locates the error); the refusals above are DocumentError."""
    text = raw.decode("utf-8-sig") if isinstance(raw, (bytes, bytearray)) else raw  # UnicodeDecodeError as json's
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise DocumentError("the document is nested too deeply") from None


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Checked before PyYAML flattens merge keys (<<): a literal key may override a merged one.
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    twice = key in seen
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    break
                if twice:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"the key {key!r} is given twice in one mapping", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def loads_yaml(text: str) -> Any:
    """``text`` as YAML (JSON is YAML too), refusing duplicate keys; errors are yaml.YAMLError."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except RecursionError:
        raise DocumentError("the document is nested too deeply") from None
