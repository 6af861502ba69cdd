"""ETags and the If-Match / If-None-Match preconditions a write is checked against.

The whole document's tag is its revision; a service's is a hash of its stored
JSON, so writers of different services never fail each other's preconditions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from l4lb.issues import PreconditionFailed
from l4lb.models import Service
from l4lb.servicejson import service_json


def state_etag(revision: int) -> str:
    """Opaque tag of the whole document (the API quotes it)."""
    return f"r{revision}"


def service_etag(service: Service) -> str:
    """Tag of one service: a hash of its content, so writers of different services do not collide."""
    return "s" + hashlib.sha256(service_json(service).encode()).hexdigest()[:20]  # the stored JSON


@dataclass(frozen=True)
class Precondition:
    """Parsed If-Match / If-None-Match: opaque tags, or ("*",). None = header absent."""

    if_match: tuple[str, ...] | None = None
    if_none_match: tuple[str, ...] | None = None

    def check(self, current: str | None | Callable[[], str | None], what: str) -> None:
        """``current``: the target's tag (or a function giving it, called if a header was), None: absent."""
        if self.if_match is None and self.if_none_match is None:
            return
        current = current() if callable(current) else current
        if self.if_match is not None:
            if current is None:
                raise PreconditionFailed(f"If-Match given but {what} does not exist")
            if "*" not in self.if_match and current not in self.if_match:
                raise PreconditionFailed(
                    f"If-Match {', '.join(_q(t) for t in self.if_match)} does not match the current ETag "
                    f"{_q(current)} of {what}: it changed since you read it; read it again and retry"
                )
        if self.if_none_match is not None and current is not None:
            if "*" in self.if_none_match:
                raise PreconditionFailed(f"If-None-Match: * but {what} already exists")
            if current in self.if_none_match:
                raise PreconditionFailed(f"If-None-Match matches the current ETag {_q(current)} of {what}")


def _q(tag: str) -> str:
    return f'"{tag}"' if tag != "*" else "*"


NO_PRECONDITION = Precondition()
