"""/v1/stats and /v1/stats/zero: the control core's counters, shown from the
daemon's zero point (l4lb/zeroing.py), with active/inactive flows per backend
from the flow table (l4lb/datapath/flowscan.py, cached a second).

Handlers are plain ``def`` (FastAPI's thread pool): a flow-table scan of a
million entries (~50 ms) never runs on the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from l4lb.control import Control
from l4lb.issues import Issue, NotFound
from l4lb.stats import with_flows
from l4lb.zeroing import Baseline

from . import errors
from .jsonroute import StrictJSONRoute
from .schemas import Stats, ZeroBody

router = APIRouter(route_class=StrictJSONRoute)


def flow_scan(request: Request) -> Any | None:
    """The latest flow-table scan, or None where the daemon has no flow table to read (tests' fakes)."""
    watch = getattr(request.app.state, "flows", None)
    return None if watch is None else watch.get()   # None too if the table cannot be read (logged)


def _document(request: Request, raw: dict[str, Any]) -> Stats:
    baseline: Baseline = request.app.state.zero
    return Stats.model_validate(with_flows(baseline.apply(raw), flow_scan(request)))


@router.get("/v1/stats", response_model=Stats, tags=["observe"],
            summary="Packets/bytes and rates per service, per backend and per datapath reason; flows per backend")
def get_stats(request: Request) -> Stats:
    control: Control = request.app.state.control
    return _document(request, control.stats())


@router.post("/v1/stats/zero", response_model=Stats, tags=["observe"], responses=errors.responses(404, 422),
             summary="Show counters from now on (like ipvsadm -Z); the datapath's and Prometheus' stay monotonic")
def zero_stats(request: Request, body: ZeroBody | None = None) -> Stats:
    control: Control = request.app.state.control
    names = None if body is None else body.services
    raw = control.stats()
    if names is not None:
        have = {s["name"] for s in raw["services"]}
        missing = sorted(set(names) - have)
        if missing:  # nothing zeroed
            raise NotFound(f"no service named {', '.join(map(repr, missing))}; nothing was zeroed",
                           [Issue(("body", "services"), f"no service named {n!r}", "not_found") for n in missing])
    request.app.state.zero.zero(raw, names)
    return _document(request, raw)
