"""ETag / If-Match plumbing (RFC 9110): quoting on the way out, parsing on the way in.

Tags are opaque to clients: the desired-state document's is ``"r<revision>"``
and a service's is a hash of its content (so automation editing different
services does not collide). Backend resources share their service's tag.
"""

from __future__ import annotations

import re

from l4lb.issues import Invalid, Issue
from l4lb.preconditions import Precondition

_TAG = re.compile(r'\s*(W/)?"([^"]*)"\s*(?:,|$)')


def quote(tag: str) -> str:
    return f'"{tag}"'


def _parse(header: str, name: str) -> tuple[str, ...]:
    if header.strip() == "*":
        return ("*",)
    tags: list[str] = []
    pos = 0
    while pos < len(header):
        m = _TAG.match(header, pos)
        if not m or m.end() == pos:
            raise Invalid(
                f"{name} must be * or a list of quoted entity tags, e.g. {name}: \"r12\"",
                [Issue(("header", name), "malformed entity tag list", "etag")],
            )
        # A weak tag never matches in If-Match's strong comparison: keep it unmatchable.
        tags.append(("W/" if m.group(1) else "") + m.group(2))
        pos = m.end()
    if not tags:
        raise Invalid(f"{name} is empty", [Issue(("header", name), "empty", "etag")])
    return tuple(tags)


def precondition(if_match: str | None, if_none_match: str | None = None) -> Precondition:
    return Precondition(
        if_match=_parse(if_match, "If-Match") if if_match is not None else None,
        if_none_match=_parse(if_none_match, "If-None-Match") if if_none_match is not None else None,
    )
