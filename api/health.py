"""Health routes: the runtime health of every checked backend (l4lb/health).
Read-only: checks are configured in the desired state (a service's ``health``)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from l4lb.control import Control
from l4lb.health.report import report, service_report
from l4lb.names import NAME_REGEX

from . import errors
from .jsonroute import StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute)


class BackendHealth(BaseModel):
    model_config = ConfigDict(extra="allow")

    address: str
    port: int
    state: str = Field(description="Admin state from the desired document (active, draining, maintenance)")
    health: str | None = Field(description="up, down or unknown (in force in the datapath); null: not checked")
    key: str | None = Field(default=None, description="The probe (shared by every service checking the same)")
    check: str | None = None
    since: float | None = Field(default=None, description="Unix time of the last change")
    reason: str | None = Field(default=None, description="Why it is in this state")
    last_result: str | None = None
    last_error: str | None = None
    held_down_until: float | None = Field(default=None, description="Flap damping: held down until (unix time)")
    checks: int | None = None
    failures: int | None = None


class ServiceHealth(BaseModel):
    name: str
    checked: bool
    on_all_down: str | None
    fail_open: bool = Field(description="Every backend is down and all are kept (on_all_down = fail_open)")
    backends: list[BackendHealth]


class HealthReport(BaseModel):
    model_config = ConfigDict(extra="allow")

    revision: int
    runtime: int = Field(description="Counts runtime (health) changes applied to the datapath")
    enabled: bool
    probes: dict[str, int]
    fail_open: list[str]
    services: list[ServiceHealth]


def _parts(request: Request) -> tuple[Control, Any]:
    return request.app.state.control, getattr(request.app.state, "health", None)


@router.get("/v1/health", response_model=HealthReport, tags=["observe"],
            summary="Health of every checked backend, probe counters, recent transitions")
def get_health(
    request: Request,
    services: bool = Query(default=True, description="false: counters only, no per-backend entries"),
) -> Response:
    control, manager = _parts(request)
    # Serialised here, not through response_model (which documents it): validating
    # 10,000 backends' entries into models again took a second.
    doc = report(control.view(), control.health, manager, services=services)
    return Response(json.dumps(doc), media_type="application/json")


@router.get("/v1/services/{name}/health", response_model=ServiceHealth, tags=["observe"],
            responses=errors.responses(404, 422), summary="Health of one service's backends")
def get_service_health(
    request: Request, name: str = PathParam(pattern=NAME_REGEX, description="Service name"),
) -> dict[str, Any]:
    control, manager = _parts(request)
    view = control.view()
    _, svc = control.read_service(name)
    return service_report(svc, view, control.health, manager)
