"""Request and response bodies of the REST API (the OpenAPI document is built from these).

Stored objects are the core models (l4lb.models) themselves; the bodies here
are only the shapes that differ on the wire (a service body whose name comes
from the URL, a backend body whose address comes from the URL, a patch).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from l4lb.names import NAME_REGEX
from l4lb.models import (
    MAX_BACKENDS_PER_SERVICE, MAX_SOURCE_RANGES_PER_SERVICE, Address, Backend, BackendState, HealthCheck,
    HealthOverride, Port, Protocol, Service, ServiceOptions, SourceRange, Weight,
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServiceBody(_Body):
    """A service as PUT to /v1/services/{name}; ``name`` may be omitted (the URL names it)."""

    name: str | None = Field(default=None, description="Must equal the name in the URL if given")
    vip: Address
    port: Port
    protocol: Protocol = Protocol.tcp
    options: ServiceOptions = ServiceOptions()
    backends: list[Backend] = Field(default_factory=list, max_length=MAX_BACKENDS_PER_SERVICE)
    announce: bool = Field(default=True, description="Announce the VIP over BGP while this box can serve it")
    health: HealthCheck | None = None
    source_ranges: list[SourceRange] = Field(
        default_factory=list, max_length=MAX_SOURCE_RANGES_PER_SERVICE,
        description="Clients allowed to reach the service: CIDR prefixes of the VIP's family (empty: every client)")


class BackendBody(_Body):
    """A backend as PUT to /v1/services/{name}/backends/{backend}: address (and port) come from the URL."""

    address: Address | None = Field(default=None, description="Must equal the address in the URL if given")
    port: Port | None = Field(default=None, description="Backend port (l4_dnat only); or put it in the URL")
    weight: Weight = 100
    state: BackendState = BackendState.active
    health: HealthOverride | None = None


class BackendPatch(_Body):
    """Change weight and/or state. ``state: draining`` = no new flows, existing flows stay."""

    weight: Weight | None = None
    state: BackendState | None = None

    @model_validator(mode="after")
    def _something(self) -> "BackendPatch":
        if self.weight is None and self.state is None:
            raise ValueError("give weight and/or state")
        return self


class ServiceList(BaseModel):
    revision: int
    services: list[Service]


class BackendList(BaseModel):
    service: str
    backends: list[Backend]


class FieldChangeOut(BaseModel):
    field: str
    old: Any = None
    new: Any = None


class BackendChangeOut(BaseModel):
    action: str
    address: str
    port: int
    changes: list[FieldChangeOut]


class ServiceChangeOut(BaseModel):
    action: str
    name: str
    changes: list[FieldChangeOut]
    backends: list[BackendChangeOut]


class PlanOut(BaseModel):
    empty: bool
    summary: dict[str, int]
    services: list[ServiceChangeOut]


class StateWriteResult(BaseModel):
    revision: int = Field(description="Revision now in force (unchanged for a dry run or a no-op)")
    changed: bool = Field(description="Whether the document differed from the one in force")
    dry_run: bool
    plan: PlanOut


class Counter(BaseModel):
    packets: int
    bytes: int
    pps: float | None = Field(description="Packets/s since the previous sample (null before there is one)")
    bps: float | None = Field(description="Bits/s since the previous sample")


_ACTIVE = ("Flows in the flow table for it whose last packet is at most flows.active_window_seconds old "
           "(ipvsadm's ActiveConn, estimated; null without a flow-table read)")
_INACTIVE = "Flows in the flow table for it seen longer ago than that (ipvsadm's InActConn, estimated)"


class FlowCounts(BaseModel):
    active_flows: int | None = Field(default=None, description=_ACTIVE)
    inactive_flows: int | None = Field(default=None, description=_INACTIVE)


class BackendStats(Counter, FlowCounts):
    address: str
    port: int
    state: BackendState
    health: str | None = Field(default=None, description="up, down or unknown (null: not checked)")


class ServiceStats(Counter, FlowCounts):
    name: str
    vip: str
    port: int
    protocol: Protocol
    fail_open: bool = Field(default=False, description="Every backend is down and all are kept (health)")
    zeroed_at: float | None = Field(default=None, description="When its counters were zeroed (POST /v1/stats/zero; "
                                    "epoch seconds): packets and bytes count from then. Null: since the maps were made")
    backends: list[BackendStats]


class FlowTable(BaseModel):
    used: int = Field(description="Entries holding a flow")
    capacity: int = Field(description="Entries the table has (datapath.flow_table_size)")
    stale: int = Field(description="Entries of a backend no longer in force (counted for nobody; overwritten as "
                       "new flows need the room)")
    active_window_seconds: float = Field(description="A flow is active if its last packet is at most this old")


class Stats(BaseModel):
    revision: int
    rate_interval_seconds: float | None
    services: list[ServiceStats]
    reasons: dict[str, Counter]
    reasons_zeroed_at: float | None = Field(default=None, description="When the reason counters were zeroed")
    flows: FlowTable | None = Field(default=None, description="The flow table read back (null: not available)")


ServiceName = Annotated[str, Field(pattern=NAME_REGEX)]


class ZeroBody(_Body):
    services: list[ServiceName] | None = Field(default=None, max_length=100_000, description="Zero these services "
                                               "(and their backends) only; absent or null: every service and the "
                                               "reason counters")


class Status(BaseModel):
    model_config = ConfigDict(extra="allow")

    revision: int
    updated_at: float | None
    ready: bool
    degraded: str | None
    services: int
    backends: int
    backends_by_state: dict[str, int]
    interfaces: dict[str, str] = Field(description="Attached interface -> XDP mode in use")
    limits: dict[str, int]
    datapath: dict[str, Any] = Field(description="Program id, attachments and map fill levels from the datapath")
    digest: dict[str, Any] | None = Field(default=None, description="What this box forwards, comparable across "
                                          "a tier: seed hash, per-service table hashes in backend identities, digest")
    bgp: dict[str, Any] | None = Field(default=None, description="Box drain state, sessions, announced prefixes")
    pending_restart: list[str] = Field(default_factory=list, description="Config keys whose value in the file "
                                       "differs from the one in force and that take effect only at the next start")


class Health(BaseModel):
    status: str
    detail: str | None = None


class ProblemError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details (media type application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[ProblemError] = []
