"""Bearer-token check for the TCP listener (the unix socket relies on file permissions).

It wraps the ASGI app of that listener only. The token is read through a
callable so a SIGHUP reload can change it without restarting the listener.
Health probes stay open: they reveal nothing and load balancers probe them
without credentials. The check needs the headers only: a refused request's body is
never buffered or parsed (uvicorn drops it as it arrives, within the listener's
body deadline).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

from .errors import send_problem

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def token_matches(presented: bytes, expected: str) -> bool:
    # Compare fixed-length digests so neither content nor length leaks through timing.
    return hmac.compare_digest(hashlib.sha256(presented).digest(), hashlib.sha256(expected.encode()).digest())


class BearerAuth:
    def __init__(self, app: Any, token: Callable[[], str | None]) -> None:
        self.app = app
        self._token = token

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS:
            expected = self._token()
            if expected is not None:
                header = dict(scope.get("headers") or []).get(b"authorization", b"")
                scheme, _, credentials = header.partition(b" ")
                if scheme.lower() != b"bearer" or not token_matches(credentials.strip(), expected):
                    await _unauthorized(send, "missing bearer token" if not header else "wrong bearer token")
                    return
        await self.app(scope, receive, send)


async def _unauthorized(send: Callable, detail: str) -> None:
    await send_problem(send, 401, f"{detail}: send Authorization: Bearer <token from api.tcp.token_file>",
                       slug="unauthorized", headers=[(b"www-authenticate", b'Bearer realm="l4lbd"')])
