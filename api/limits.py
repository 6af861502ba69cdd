"""Request-body size limits, enforced while the body is read.

* A declared ``Content-Length`` over the limit is answered 413 at once, before any of
  the body is read.
* A chunked body is counted as it arrives; the read that passes the limit raises
  ``BodyTooLarge`` (413, problem+json through the app's error handler), so at most
  ``limit`` bytes are ever held.

PUT /v1/state, the whole desired state, may be as large as ``api.max_body_bytes``;
every other request at most ``SMALL_BODY_BYTES`` (a service with 1,024 IPv6 backends
and every field spelt out is ~110 KB), so only that one route can make the daemon
hold a large body, and that route parses it off the event loop (routes.put_state).

Written here rather than FastAPI's ``max_body_size``: that one answers a declared
oversize body that the route never reads with text/plain, and is fixed when the app
is built; this one answers problem+json like every other error and follows a reload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException

from l4lb.config import DEFAULT_MAX_BODY_BYTES  # noqa: F401 (create_app's default)

from .errors import send_problem

SMALL_BODY_BYTES = 1 << 20
BIG_BODY_ROUTES = frozenset({("PUT", "/v1/state")})


class BodyTooLarge(HTTPException):
    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


def _declared_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses such a request before it gets here
    return None


class BodyLimit:
    """ASGI middleware; ``max_body_bytes`` is read per request (a SIGHUP reload applies at once)."""

    def __init__(self, app: Any, max_body_bytes: Callable[[], int]) -> None:
        self.app = app
        self._max = max_body_bytes

    def limit(self, scope: dict[str, Any]) -> tuple[int, str]:
        big = self._max()
        if (scope.get("method"), scope.get("path")) in BIG_BODY_ROUTES:
            return big, f"api.max_body_bytes = {big}"
        small = min(big, SMALL_BODY_BYTES)
        return small, f"{small} bytes for any request but PUT /v1/state"

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, rule = self.limit(scope)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await send_problem(send, 413, f"the request body of {declared} bytes is over the limit ({rule})",
                               slug="content-too-large")
            return
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"the request body passed {limit} bytes, the limit ({rule})")
            return message

        await self.app(scope, counted, send)
