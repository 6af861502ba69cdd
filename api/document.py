"""The body of PUT /v1/state: parsed and validated off the event loop, a service at a time.

The documented 1,000 services x 100 backends are ~4.3 MB of JSON. Validated in one
pydantic call that holds the GIL for ~0.4-0.8 s, so while it ran /healthz and the
unix socket did not answer. Here the JSON is parsed in one go (~40 ms at that size),
then each service is validated on its own (well under a millisecond each), so the
event loop gets the GIL between services (the daemon's switch interval is 0.5 ms).
The whole-document checks (unique names and VIP:port) run once at the end, on the
validated services. Errors are located as FastAPI's would be (``body.services.3.vip``)
and capped at ``MAX_ISSUES``: a junk document must not produce a junk-sized answer.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from l4lb.issues import Invalid, Issue, issues_from_validation
from l4lb.docparse import DocumentError, loads_json
from l4lb.models import DesiredState, Service

MAX_ISSUES = 100
JSON_TYPES = ("application/json",)


def _refuse(issues: list[Issue], more: int = 0) -> Invalid:
    detail = "; ".join(f"{'.'.join(map(str, i.loc))}: {i.msg}" for i in issues)
    if more:
        detail += f"; and {more} more problems"
    return Invalid(detail, issues)


def _json_body(raw: bytes, content_type: str | None) -> Any:
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise _refuse([Issue(("body",), f"send the document as application/json (content-type {media or 'missing'})",
                             "content_type")])
    if not raw:
        raise _refuse([Issue(("body",), "a JSON body is required", "missing")])
    try:
        return loads_json(raw)    # no duplicate keys, NaN or runaway nesting
    except DocumentError as e:
        raise _refuse([Issue(("body",), f"body is not valid JSON ({e.msg})", "json_invalid")]) from None
    except json.JSONDecodeError as e:
        raise _refuse([Issue(("body", e.pos), f"body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                             "json_invalid")]) from None
    except UnicodeDecodeError as e:
        raise _refuse([Issue(("body",), f"body is not UTF-8 text (byte {e.start})", "json_invalid")]) from None


def parse_state(raw: bytes, content_type: str | None) -> DesiredState:
    """A DesiredState from the request body, or Invalid with located issues."""
    doc = _json_body(raw, content_type)
    services = doc.get("services") if isinstance(doc, dict) else None
    validated: list[Service] = []
    if isinstance(services, list):
        issues: list[Issue] = []
        for i, item in enumerate(services):
            try:
                validated.append(Service.model_validate(item))
            except ValidationError as e:
                issues.extend(issues_from_validation(e, ("body", "services", i)))
                if len(issues) >= MAX_ISSUES:
                    raise _refuse(issues[:MAX_ISSUES], more=len(services) - i - 1) from None
        if issues:
            raise _refuse(issues)
        doc = {**doc, "services": validated}    # validated services pass through as they are
    try:
        return DesiredState.model_validate(doc)
    except ValidationError as e:
        raise _refuse(issues_from_validation(e, ("body",))) from None
