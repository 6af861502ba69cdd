"""HTTP routes. Handlers translate HTTP to control-core calls and back; nothing else.

Handlers are plain ``def``: FastAPI runs them in its thread pool, and the control
core (which blocks on the store and the datapath) serialises them itself.
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from . import errors
from .bgp import status_extras
from .document import parse_state
from .etags import precondition, quote
from .jsonroute import StrictJSONRoute
from .stats import flow_scan
from .schemas import (
    BackendBody,
    BackendList,
    BackendPatch,
    Health,
    ServiceBody,
    ServiceList,
    StateWriteResult,
    Status,
)
from l4lb.backendref import BackendRef
from l4lb.control import Committed, Control
from l4lb.issues import Invalid, Issue
from l4lb.preconditions import Precondition, service_etag, state_etag
from l4lb.memory import collections_paused
from l4lb.models import Backend, DesiredState, Service
from l4lb.names import NAME_REGEX

router = APIRouter(route_class=StrictJSONRoute)

Name = Annotated[str, PathParam(pattern=NAME_REGEX, description="Service name", examples=["web"])]
BackendPath = Annotated[
    str,
    PathParam(
        description="Backend address, optionally with port: `192.0.2.10`, `192.0.2.10:8080`, "
        "`2001:db8::10`, `[2001:db8::10]:8080`",
        examples=["192.0.2.10"],
    ),
]
IfMatch = Annotated[
    str | None, Header(alias="If-Match", description="ETag from a previous read; 412 if it changed since")
]
IfNoneMatch = Annotated[
    str | None, Header(alias="If-None-Match", description="`*` to create only if the service does not exist")
]
REVISION = "X-L4LB-Revision"


def _control(request: Request) -> Control:
    return request.app.state.control


def _ref(text: str) -> BackendRef:
    try:
        return BackendRef.parse(text)
    except ValueError as e:
        raise Invalid(f"backend {text!r}: {e}", [Issue(("path", "backend"), str(e), "backend_ref")]) from None


def _headers(response: Response, revision: int, etag: str | None) -> None:
    response.headers[REVISION] = str(revision)
    if etag is not None:
        response.headers["ETag"] = quote(etag)


# --- desired-state document ---------------------------------------------------------------


@router.get("/v1/state", response_model=DesiredState, tags=["state"], summary="The whole desired state")
def get_state(request: Request, response: Response) -> DesiredState:
    revision, state = _control(request).snapshot()
    _headers(response, revision, state_etag(revision))
    return state


# The body is read by hand (see api/document.py); OpenAPI still shows its schema.
_STATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/DesiredState"}}}}}


@router.put(
    "/v1/state", response_model=StateWriteResult, tags=["state"], responses=errors.responses(412, 413, 422, 500),
    summary="Replace the whole desired state in one transaction (or preview it with dry_run)",
    openapi_extra=_STATE_BODY,
)
async def put_state(
    request: Request, if_match: IfMatch = None,
    dry_run: Annotated[bool, Query(description="Validate and return the plan without applying")] = False,
) -> Response:
    try:
        raw = await request.body()      # bounded by api.max_body_bytes (api/limits.py)
    except ClientDisconnect:            # gone, or cut by the listener's body deadline: nobody to answer
        return Response(status_code=400)
    pre = precondition(if_match)
    return await run_in_threadpool(_put_state, _control(request), raw, request.headers.get("content-type"),
                                   pre, dry_run)


def _put_state(control: Control, raw: bytes, content_type: str | None, pre: Precondition, dry_run: bool) -> Response:
    # A whole document makes ~10^6 objects: no collector passes over them meanwhile (l4lb/memory.py).
    with collections_paused():
        c: Committed = control.replace_state(parse_state(raw, content_type), pre, dry_run=dry_run)
        # Serialised here, not through response_model (which documents it): the plan of a
        # 100,000-backend document is ~20 MB and FastAPI's validate-then-encode took seconds.
        answer = Response(f'{{"revision":{c.revision},"changed":{json.dumps(c.changed)},'
                          f'"dry_run":{json.dumps(c.dry_run)},"plan":{c.plan.to_json()}}}',
                          media_type="application/json")
    _headers(answer, c.revision, state_etag(c.revision))
    return answer


# --- services ---------------------------------------------------------------------------------


@router.get("/v1/services", response_model=ServiceList, tags=["services"], summary="All services")
def list_services(request: Request, response: Response) -> ServiceList:
    revision, state = _control(request).snapshot()
    _headers(response, revision, state_etag(revision))
    return ServiceList(revision=revision, services=state.services)


@router.get("/v1/services/{name}", response_model=Service, tags=["services"], responses=errors.responses(404, 422))
def get_service(request: Request, response: Response, name: Name) -> Service:
    revision, svc = _control(request).read_service(name)
    _headers(response, revision, service_etag(svc))
    return svc


@router.put(
    "/v1/services/{name}", response_model=Service, tags=["services"], status_code=200,
    responses={201: {"description": "Created", "model": Service}, **errors.responses(409, 412, 422, 500)},
    summary="Create or replace a service (idempotent)",
)
def put_service(
    request: Request, response: Response, name: Name, body: ServiceBody,
    if_match: IfMatch = None, if_none_match: IfNoneMatch = None,
) -> Service:
    if body.name is not None and body.name != name:
        raise Invalid(f"body name {body.name!r} differs from the URL's {name!r}",
                      [Issue(("body", "name"), f"differs from the name in the URL ({name!r})", "name_mismatch")])
    service = Service.model_validate({**body.model_dump(exclude={"name"}), "name": name})  # ValidationError → 422
    c, created = _control(request).put_service(service, precondition(if_match, if_none_match))
    stored = c.service(name)
    _headers(response, c.revision, service_etag(stored))
    if created:
        response.status_code = 201
        response.headers["Location"] = f"/v1/services/{name}"
    return stored


@router.delete(
    "/v1/services/{name}", status_code=204, response_class=Response, tags=["services"],
    responses=errors.responses(404, 412, 422, 500),
)
def delete_service(request: Request, name: Name, if_match: IfMatch = None) -> Response:
    c = _control(request).delete_service(name, precondition(if_match))
    return Response(status_code=204, headers={REVISION: str(c.revision)})


# --- backends ---------------------------------------------------------------------------------


@router.get(
    "/v1/services/{name}/backends", response_model=BackendList, tags=["backends"],
    responses=errors.responses(404, 422),
)
def list_backends(request: Request, response: Response, name: Name) -> BackendList:
    revision, svc = _control(request).read_service(name)
    _headers(response, revision, service_etag(svc))
    return BackendList(service=name, backends=svc.backends)


@router.get(
    "/v1/services/{name}/backends/{backend}", response_model=Backend, tags=["backends"],
    responses=errors.responses(404, 422),
)
def get_backend(request: Request, response: Response, name: Name, backend: BackendPath) -> Backend:
    revision, svc, b = _control(request).read_backend(name, _ref(backend))
    _headers(response, revision, service_etag(svc))
    return b


@router.put(
    "/v1/services/{name}/backends/{backend}", response_model=Backend, tags=["backends"], status_code=200,
    responses={201: {"description": "Created", "model": Backend}, **errors.responses(404, 412, 422, 500)},
    summary="Add or replace one backend of a service",
)
def put_backend(
    request: Request, response: Response, name: Name, backend: BackendPath, body: BackendBody,
    if_match: IfMatch = None,
) -> Backend:
    ref = _ref(backend)
    new = Backend(address=body.address or ref.address, port=body.port, weight=body.weight, state=body.state,
                  health=body.health)
    c, created, stored = _control(request).put_backend(name, ref, new, precondition(if_match))
    _headers(response, c.revision, service_etag(c.service(name)))
    if created:
        response.status_code = 201
    return stored


@router.patch(
    "/v1/services/{name}/backends/{backend}", response_model=Backend, tags=["backends"],
    responses=errors.responses(404, 412, 422, 500),
    summary="Change a backend's weight and/or state (state=draining: no new flows, existing flows stay)",
)
def patch_backend(
    request: Request, response: Response, name: Name, backend: BackendPath, body: BackendPatch,
    if_match: IfMatch = None,
) -> Backend:
    c, updated = _control(request).patch_backend(name, _ref(backend), weight=body.weight, state=body.state,
                                                 pre=precondition(if_match))
    _headers(response, c.revision, service_etag(c.service(name)))
    return updated


@router.delete(
    "/v1/services/{name}/backends/{backend}", status_code=204, response_class=Response, tags=["backends"],
    responses=errors.responses(404, 412, 422, 500),
)
def delete_backend(request: Request, name: Name, backend: BackendPath, if_match: IfMatch = None) -> Response:
    c = _control(request).delete_backend(name, _ref(backend), precondition(if_match))
    return Response(status_code=204, headers={REVISION: str(c.revision)})


# --- read side ---------------------------------------------------------------------------------


@router.get("/v1/status", response_model=Status, tags=["observe"],
            summary="Interfaces and XDP modes, program id, map fill levels (flows: in use / capacity), revision, "
                    "fleet digest, BGP summary")
def get_status(request: Request) -> Status:
    pending = list(getattr(request.app.state, "pending_restart", None) or [])
    status = _control(request).status()
    flows = status.get("datapath", {}).get("maps", {}).get("flows")
    scan = flow_scan(request)
    if isinstance(flows, dict) and scan is not None:
        flows["used"] = scan.used   # the engine knows the capacity; the scan (cached 1 s) what is in use
    return Status.model_validate(status | status_extras(request) | {"pending_restart": pending})


@router.get("/healthz", response_model=Health, tags=["observe"], summary="The daemon answers")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, tags=["observe"],
            responses={503: {"description": "Not ready", "model": Health}},
            summary="Datapath loaded, converged to the stored state and attached")
def readyz(request: Request, response: Response) -> Health:
    control = _control(request)
    if control.ready:
        return Health(status="ready")
    response.status_code = 503
    return Health(status="not ready", detail=control.degraded or "still starting")


@router.get("/metrics", response_class=PlainTextResponse, tags=["observe"],
            summary="Prometheus metrics (OpenMetrics if the Accept header asks for it)")
def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)
