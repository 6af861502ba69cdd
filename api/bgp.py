"""BGP and box state over HTTP, and their Prometheus metrics; l4lb/bgp does the work."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field

from l4lb.issues import ControlError, Issue, NotFound

from . import errors
from .jsonroute import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute)


class BgpNotConfigured(ControlError):
    status, slug, title = 409, "bgp-not-configured", "BGP is not configured on this box"


class DrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    services: list[str] | None = Field(default=None, description="Only these services (default: the whole box)")
    delay: float | None = Field(default=None, ge=0, le=86400,
                                description="Seconds of graceful shutdown before the withdraw (default: bgp.drain_delay)")


class UndrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    services: list[str] | None = None


def _bgp(request: Request) -> Any:
    bgp = getattr(request.app.state, "bgp", None)
    if bgp is None:
        raise BgpNotConfigured("this box has no [bgp] section in its config: nothing is announced")
    return bgp


def _check_services(request: Request, names: list[str] | None) -> None:
    known = {s.name for s in request.app.state.control.snapshot()[1].services}
    for i, n in enumerate(names or []):
        if n not in known:
            raise NotFound(f"no service named {n!r}", [Issue(("body", "services", i), "no such service", "not_found")])


@router.get("/v1/bgp", tags=["bgp"], responses=errors.responses(409),
            summary="BGP: sessions, prefixes (announced / withdrawn / pending / error, and why), box drain state")
def get_bgp(request: Request) -> dict[str, Any]:
    return _bgp(request).status()


@router.post("/v1/box/drain", tags=["bgp"], responses=errors.responses(404, 409, 422),
             summary="Drain the box (or some services): graceful shutdown first, withdraw after the delay")
def drain(request: Request, body: DrainBody | None = None) -> dict[str, Any]:
    body = body or DrainBody()
    bgp = _bgp(request)
    _check_services(request, body.services)
    bgp.drain(body.services, body.delay)
    return bgp.status()


@router.post("/v1/box/undrain", tags=["bgp"], responses=errors.responses(404, 409, 422),
             summary="End a drain: announce again what this box can serve")
def undrain(request: Request, body: UndrainBody | None = None) -> dict[str, Any]:
    bgp = _bgp(request)
    bgp.undrain((body or UndrainBody()).services)
    return bgp.status()


def status_extras(request: Request) -> dict[str, Any]:
    """What /v1/status adds: the fleet digest and a BGP summary."""
    out: dict[str, Any] = {}
    digest = getattr(request.app.state, "digest", None)
    if digest is not None:
        out["digest"] = digest.digest()
    bgp = getattr(request.app.state, "bgp", None)
    if bgp is not None:
        s = bgp.status()
        out["bgp"] = {"box": s["box"]["state"], "error": s["error"], "last_change": s["last_change"],
                      "sessions": {x["peer"]: x["bgp_state"] for x in s["sessions"]},
                      "announced": [p["prefix"] for p in s["prefixes"] if p["state"] == "announced"],
                      "withdrawn": [p["prefix"] for p in s["prefixes"] if p["state"] != "announced"]}
    return out


class BgpCollector:
    def __init__(self, bgp: Any) -> None:
        self._bgp = bgp

    def collect(self) -> Iterator[Metric]:
        s = self._bgp.status()
        up = GaugeMetricFamily("l4lb_bgp_session_established", "1 while the BGP session to a peer is Established",
                               labels=["peer", "state"])
        for x in s["sessions"]:
            up.add_metric([x["peer"], x["bgp_state"]], int(x["established"]))
        yield up
        pre = GaugeMetricFamily("l4lb_bgp_prefix_announced", "1 while the speaker announces the prefix",
                                labels=["prefix", "state", "reason"])
        for p in s["prefixes"]:
            pre.add_metric([p["prefix"], p["state"], p["reason"]], int(p["state"] == "announced"))
        yield pre
        yield GaugeMetricFamily("l4lb_bgp_last_change_timestamp_seconds", "Wall time of the last prefix change",
                                value=s["last_change"] or 0)
        yield GaugeMetricFamily("l4lb_bgp_error", "1 while the speaker refused or could not be reached",
                                value=int(s["error"] is not None))
        box = GaugeMetricFamily("l4lb_box_drain", "1 for the box's drain state", labels=["state"])
        for st in ("active", "draining", "drained"):
            box.add_metric([st], int(s["box"]["state"] == st))
        yield box
