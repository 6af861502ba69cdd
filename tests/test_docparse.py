"""Strict documents (l4lb/docparse.py): what json and PyYAML take silently is refused,
and every document they parse that has none of it reads the same as before."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from l4lb.docparse import DocumentError, loads_json, loads_yaml


@pytest.mark.parametrize("text, message", [
    ('{"a": 1, "a": 1}', "the key 'a' is given twice in one object"),
    ('{"s": [{"x": {"port": 80, "name": "n", "port": 81}}]}', "the key 'port' is given twice"),
    ('{"w": NaN}', "NaN is not a JSON number"),
    ("[Infinity]", "Infinity is not a JSON number"),
    ("[-Infinity]", "-Infinity is not a JSON number"),
    ('{"w": 1e400}', "1e400 is beyond the range of a number"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a":' * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
])
def test_json_refusals(text: str, message: str) -> None:
    if "nested" not in message:
        json.loads(text)  # what the standard library takes without a word
    for raw in (text, text.encode()):
        with pytest.raises(DocumentError, match=message):
            loads_json(raw)


def test_json_errors_stay_json_errors() -> None:
    with pytest.raises(json.JSONDecodeError) as e:
        loads_json('{"a": [}')
    assert (e.value.lineno, e.value.colno) == (1, 8)
    with pytest.raises(UnicodeDecodeError):
        loads_json(b'{"a": "caf\xe9"}')
    assert loads_json(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # a UTF-8 byte-order mark is no error


@pytest.mark.parametrize("text, line", [
    ("a: 1\na: 2\n", 2),
    ("services:\n- name: x\n  port: 80\n  port: 81\n", 4),
    ('{"a": 1, "a": 2}', 1),                       # JSON is YAML too
    ("x: {p: 1, q: {r: 1, r: 2}}\n", 1),
])
def test_yaml_duplicate_keys(text: str, line: int) -> None:
    assert yaml.safe_load(text)                    # PyYAML keeps the last one
    with pytest.raises(yaml.constructor.ConstructorError) as e:
        loads_yaml(text)
    assert "is given twice in one mapping" in str(e.value.problem) and e.value.problem_mark.line + 1 == line


def test_yaml_merge_keys_may_be_overridden() -> None:
    text = "base: &b {p: 1, q: 2}\nx:\n  <<: *b\n  p: 3\n"
    assert loads_yaml(text) == yaml.safe_load(text) == {"base": {"p": 1, "q": 2}, "x": {"p": 3, "q": 2}}


def test_yaml_stays_safe() -> None:
    with pytest.raises(yaml.YAMLError):
        loads_yaml("!!python/object/apply:os.system ['true']")


JSONABLE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(JSONABLE)
def test_documents_without_refusals_read_as_before(doc: object) -> None:
    text = json.dumps(doc)
    assert loads_json(text) == json.loads(text) == loads_json(text.encode())
    assert loads_yaml(text) == yaml.safe_load(text)
