"""RFC 9457 problem details: every error the API returns is application/problem+json.

    {"type": "urn:l4lb:problem:validation-error", "title": "Invalid request", "status": 422,
     "detail": "body.backends.1.address: backend 2001:db8::5 is IPv6 but VIP 198.51.100.1 is IPv4",
     "errors": [{"loc": ["body", "backends", 1, "address"], "msg": "...", "type": "value_error"}]}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from l4lb.issues import ControlError, Issue, issues_from_errors, issues_from_validation

PROBLEM_TYPE = "application/problem+json"
log = logging.getLogger("l4lbd.api")


def problem_type(slug: str) -> str:
    return f"urn:l4lb:problem:{slug}"


def problem(
    status: int, detail: str, *, slug: str | None = None, title: str | None = None,
    errors: list[Issue] | None = None, headers: dict[str, str] | None = None,
) -> JSONResponse:
    phrase = HTTPStatus(status).phrase
    body: dict[str, Any] = {
        "type": problem_type(slug or phrase.lower().replace(" ", "-")),
        "title": title or phrase,
        "status": status,
        "detail": detail,
        "errors": [e.to_dict() for e in errors or []],
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_TYPE, headers=headers)


async def send_problem(send: Callable[[dict], Awaitable[None]], status: int, detail: str, *, slug: str,
                       headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """A problem answer written straight to ASGI ``send``: for middleware that answers before
    (or instead of) the app, e.g. without reading the request body."""
    body = json.dumps({"type": problem_type(slug), "title": HTTPStatus(status).phrase, "status": status,
                       "detail": detail, "errors": []}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", PROBLEM_TYPE.encode()), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def _loc_text(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def validation_problem(issues: list[Issue]) -> JSONResponse:
    detail = "; ".join(f"{_loc_text(i.loc)}: {i.msg}" for i in issues) or "invalid request"
    return problem(422, detail, slug="validation-error", title="Invalid request", errors=issues)


def install(app: FastAPI) -> None:
    @app.exception_handler(ControlError)
    async def _control(_: Request, exc: ControlError) -> JSONResponse:
        return problem(exc.status, exc.detail, slug=exc.slug, title=exc.title, errors=exc.errors)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_problem(_issues_from_request(exc))

    @app.exception_handler(ValidationError)
    async def _model_validation(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_problem(issues_from_validation(exc, ("body",)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return problem(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The exception's text stays in the log: it may name files and internals.
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return problem(500, f"internal error ({type(exc).__name__}); the daemon's log has the details",
                       slug="internal-error")


def _issues_from_request(exc: RequestValidationError) -> list[Issue]:
    """FastAPI's request errors (already located: body/path/query/header) → issues."""
    out = []
    # FastAPI's message for any JSON error is "JSON decode error": the parser's (or
    # l4lb.docparse's refusal, api/jsonroute.py) is in the context.
    why = {tuple(e["loc"]): (e.get("ctx") or {}).get("error") for e in exc.errors() if e.get("type") == "json_invalid"}
    for i in issues_from_errors(exc.errors()):
        if i.type == "json_invalid":
            i = Issue(i.loc, f"body is not valid JSON ({why.get(i.loc) or i.msg})", i.type)
        elif i.type == "missing" and i.loc == ("body",):
            i = Issue(i.loc, "a JSON body is required", i.type)
        out.append(i)
    return out


# OpenAPI fragments for the error answers each route may give.
_PROBLEM_DOCS = {
    401: "Missing or wrong bearer token (TCP listener only)",
    404: "No such service or backend",
    409: "Conflicts with another object (VIP:port/protocol in use; a recording's file not servable)",
    412: "If-Match / If-None-Match precondition failed (stale ETag)",
    413: "The request body is over the limit (api.max_body_bytes for PUT /v1/state, 1 MiB for others)",
    422: "Invalid request: see `errors` for the located problems",
    500: "The change could not be applied; the previous state is still in force",
    507: "The recorder's disk bounds leave no room for a recording (free space, total bytes)",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        c: {
            "description": _PROBLEM_DOCS[c],
            "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for c in codes
    }
