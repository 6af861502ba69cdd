"""The FastAPI application: wiring of routes, error rendering and metrics around a Control."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from l4lb.control import Control
from l4lb.zeroing import Baseline

from . import docs, errors
from .limits import DEFAULT_MAX_BODY_BYTES, BodyLimit
from .health import router as health_router
from .metrics import Metrics
from .bgp import router as bgp_router
from .recordings import router as recordings_router
from .routes import router
from .stats import router as stats_router
from .schemas import Problem

DESCRIPTION = """\
REST API of **l4lbd**, the XDP layer-4 load balancer.

* Every write is one transaction: validated, stored durably and applied to the
  datapath before the answer; a refused or failed write changes nothing.
* Reads carry an `ETag`; send it back in `If-Match` to make a write conditional
  (412 if somebody changed it meanwhile). The desired-state document's tag is its
  revision; a service's tag covers that service (and its backends) only.
* Errors are `application/problem+json` with an `errors` list of located problems.
* JSON bodies are read strictly: a key given twice in one object, `NaN`/`Infinity`
  or text that is not UTF-8 is a 422, never resolved silently.
* Bodies are limited: PUT /v1/state to `api.max_body_bytes` (16 MiB by default),
  every other request to 1 MiB; over the limit is 413, decided before the body is
  read when `Content-Length` says so.
* The unix socket is guarded by file permissions; the optional TCP listener needs
  `Authorization: Bearer <token>` (except `/healthz` and `/readyz`).
"""


def create_app(control: Control, *, version: str = "0.1.0",
               max_body_bytes: Callable[[], int] = lambda: DEFAULT_MAX_BODY_BYTES,
               zero: Baseline | None = None) -> FastAPI:
    # No CDN: /docs and its assets are served locally (api/docs.py); ReDoc, CDN-only, is off.
    app = FastAPI(title="l4lbd", version=version, description=DESCRIPTION, docs_url=None, redoc_url=None)
    docs.install(app)
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes)
    app.state.control = control
    app.state.health = None  # the daemon sets its HealthManager here
    app.state.flows = None   # the daemon sets its FlowWatch here (l4lb/datapath/flowscan.py)
    app.state.recorder = None
    app.state.zero = zero or Baseline()
    control.subscribe(lambda view: app.state.zero.prune(view.desired))
    app.state.metrics = Metrics(control, health=lambda: app.state.health, flows=lambda: app.state.flows,
                                recorder=lambda: app.state.recorder, version=version)
    errors.install(app)
    app.include_router(router)
    app.include_router(stats_router)
    app.include_router(health_router)
    app.include_router(recordings_router)
    app.include_router(bgp_router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            comps["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in comps["Problem"].pop("$defs", {}).items():
                comps.setdefault(name, sub)
            # FastAPI adds its own 422 schema to every route with parameters; ours is a Problem.
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    resp = op.get("responses", {})
                    if "422" in resp:
                        resp["422"] = errors.responses(422)[422]
            comps.pop("HTTPValidationError", None)
            comps.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
