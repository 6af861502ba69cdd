"""Errors of the control core, and pydantic's errors turned into located issues.

A ``ControlError`` carries an HTTP-ish status and a list of ``Issue`` (where,
what, which kind); the API layer only renders them as problem+json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from l4lb.models import FieldError

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Issue:
    """One thing wrong with a request, at a location such as ("body", "backends", 2, "address")."""

    loc: Loc
    msg: str
    type: str = "value_error"

    def to_dict(self) -> dict[str, Any]:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


class ControlError(Exception):
    status = 500
    slug = "internal-error"
    title = "Internal error"

    def __init__(self, detail: str, errors: Sequence[Issue] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors)


class NotFound(ControlError):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(ControlError):
    status, slug, title = 409, "conflict", "Conflicts with another object"


class PreconditionFailed(ControlError):
    status, slug, title = 412, "precondition-failed", "Precondition failed"


class Invalid(ControlError):
    status, slug, title = 422, "validation-error", "Invalid request"


class ApplyFailed(ControlError):
    status, slug, title = 500, "apply-failed", "The change could not be applied; nothing was changed"


def _strip_union_tag(loc: Sequence[str | int]) -> Loc:
    # pydantic puts validator descriptions ("lax-or-strict[...]") in locs of union members.
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("function-after", "function-plain"))))


def issues_from_errors(errors: Sequence[Mapping[str, Any]], prefix: Loc = ()) -> list[Issue]:
    """pydantic error dicts → located issues; model-level FieldErrors keep their own field location."""
    out: list[Issue] = []
    seen_ip: set[Loc] = set()
    for e in errors:
        loc = prefix + _strip_union_tag(e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        kind = str(e.get("type", "value_error"))
        exc = (e.get("ctx") or {}).get("error")
        if isinstance(exc, FieldError):
            loc += exc.loc
        if kind in ("ip_v4_address", "ip_v6_address"):
            # The address union reports both members; say it once.
            if loc in seen_ip:
                continue
            seen_ip.add(loc)
            kind, msg = "ip_address", f"{e.get('input')!r} is not a valid IPv4 or IPv6 address"
        elif kind == "extra_forbidden":
            msg = "unknown field"
        elif kind in _STRICT_TYPES:
            msg = f"{msg}, not {_json_text(e.get('input'))}"  # e.g. "... a valid integer, not true"
        out.append(Issue(loc, msg, kind))
    return out


# Type errors of strict fields: naming the input makes "port": true obvious.
_STRICT_TYPES = frozenset({"int_type", "bool_type", "string_type"})


def _json_text(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def issues_from_validation(err: ValidationError, prefix: Loc = ()) -> list[Issue]:
    return issues_from_errors(err.errors(include_url=False), prefix)


def _invalid(err: ValidationError, prefix: Loc) -> Invalid:
    issues = issues_from_validation(err, prefix)
    return Invalid("; ".join(f"{_dotted(i.loc)}: {i.msg}" for i in issues), issues)


def _dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc)
