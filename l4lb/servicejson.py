"""A service's stored JSON form, remembered for the last few service objects.

After a write, the store needs the new service's JSON (its row) and the API
its ETag (a hash of the same JSON) for the very same object: made once, that
is one serialisation of 100 backends per request instead of two.
"""

from __future__ import annotations

import json
import threading

from l4lb.models import Service

_KEEP = 16
_memo: dict[int, tuple[Service, str]] = {}  # id -> (the object, which keeps the id its own; its JSON)
_lock = threading.Lock()


def service_json(svc: Service) -> str:
    hit = _memo.get(id(svc))
    if hit is not None and hit[0] is svc:
        return hit[1]
    text = json.dumps(svc.model_dump(mode="json"), separators=(",", ":"))
    with _lock:
        _memo[id(svc)] = (svc, text)
        while len(_memo) > _KEEP:
            del _memo[next(iter(_memo))]
    return text
