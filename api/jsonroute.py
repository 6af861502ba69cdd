"""Routes whose JSON bodies are parsed strictly (l4lb/docparse.py): a duplicate key, NaN or
a body nested too deeply is a 422 like any malformed JSON, located at the body; so is
a body that is not UTF-8 (RFC 8259), which json.loads would have read as UTF-16 or -32.

FastAPI parses a body with ``Request.json()`` (json.loads, which keeps the last of two equal
keys); a route class that hands its handler a Request with a strict ``json()`` is FastAPI's own
way to change that. A refusal is raised as a JSONDecodeError, which FastAPI turns into its
``json_invalid`` validation error, rendered as a problem like every other (api/errors.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from l4lb.docparse import DocumentError, loads_json


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = loads_json(body)
            except DocumentError as e:
                raise json.JSONDecodeError(e.msg, "", 0) from None
            except UnicodeDecodeError as e:
                raise json.JSONDecodeError(f"not UTF-8 text at byte {e.start}", "", e.start) from None
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
