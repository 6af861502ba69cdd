"""Which probe each (service, backend) gets: pure, no I/O.

A probe is named by *what* it sends and what counts as success (``ProbeSpec``):
kind, way (tunnel or direct), addresses and port, and the check's parameters.
Its ``key`` is the probe's identity everywhere: in the overlay's facts, the
persisted state and the API. Services that share a backend with the same
check share one probe. Timing (interval, timeout, rise, fall) is not part of
the identity: when services sharing a probe disagree, the shortest interval
and timeout and the smallest rise and fall win (``Timing.merge``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from l4lb.models import HTTP_CHECKS, Backend, CheckType, HealthCheck, IPAddress, Service, status_ranges


@dataclass(frozen=True)
class Timing:
    interval: float
    timeout: float
    rise: int
    fall: int

    def merge(self, other: "Timing") -> "Timing":
        return Timing(min(self.interval, other.interval), min(self.timeout, other.timeout),
                      min(self.rise, other.rise), min(self.fall, other.fall))


@dataclass(frozen=True)
class ProbeSpec:
    kind: CheckType               # tcp | http | https | udp-dns
    via: str                      # "tunnel" | "direct"
    address: str                  # the backend (compressed text: canonical, RFC 5952)
    port: int                     # checked port
    vip: str | None = None        # tunnel: the inner destination
    method: str = "GET"
    path: str = "/"
    host: str | None = None       # None: the address connected to
    expect: tuple[tuple[int, int], ...] = ((200, 399),)
    body: str | None = None
    tls_verify: bool = False
    query: str = ""
    query_type: str = "A"

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    @property
    def dest(self) -> str:
        """The address the probe socket connects to."""
        return self.vip if self.via == "tunnel" and self.vip is not None else self.address

    @cached_property
    def key(self) -> str:
        return _key(self)

    @cached_property
    def description(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """For logs: ``http GET /healthz to 192.0.2.11:80 through the tunnel (VIP 198.51.100.10)``."""
        what = self.kind.value + (f" {self.method} {self.path}" if self.kind in HTTP_CHECKS else "")
        what += f" {self.query_type} {self.query}" if self.kind is CheckType.udp_dns else ""
        where = f"{_hostport(self.address, self.port)}"
        how = f" through the tunnel (VIP {self.vip})" if self.via == "tunnel" else " direct"
        return f"{what} to {where}{how}"


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _key(spec: ProbeSpec) -> str:
    # Readable and stable across versions of this module (it is persisted).
    parts = [spec.kind.value, spec.via, _hostport(spec.address, spec.port)]
    if spec.vip is not None:
        parts.append(f"vip={spec.vip}")
    if spec.kind in HTTP_CHECKS:
        parts += [spec.method, spec.path, f"host={spec.host or ''}",
                  "expect=" + ",".join(f"{a}-{b}" for a, b in spec.expect), f"body={spec.body or ''}",
                  f"verify={int(spec.tls_verify)}"]
    if spec.kind is CheckType.udp_dns:
        parts += [spec.query_type, spec.query]
    return " ".join(parts)


@dataclass(frozen=True)
class Probe:
    """What one (service, backend) is checked with."""

    spec: ProbeSpec
    timing: Timing

    @property
    def key(self) -> str:
        return self.spec.key


def check_of(svc: Service, b: Backend) -> HealthCheck | None:
    """The backend's effective check (None: not checked)."""
    check = b.health.over(svc.health) if b.health is not None else svc.health
    return None if check is None or check.type is CheckType.none else check


def probe_of(svc: Service, b: Backend) -> Probe | None:
    check = check_of(svc, b)
    if check is None:
        return None
    return _probe(check, _text(b.address), b.port or svc.port, _text(svc.vip))


@lru_cache(maxsize=1 << 17)
def _text(addr: IPAddress) -> str:
    return addr.compressed


@lru_cache(maxsize=1 << 17)
def _probe(check: HealthCheck, address: str, backend_port: int, vip: str) -> Probe:
    # Cached: 1,000 services naming the same few checks resolve each once.
    spec = ProbeSpec(
        kind=check.type, via=check.via, address=address, port=check.port or backend_port,
        vip=vip if check.via == "tunnel" else None,
        method=check.method or "GET", path=check.path or "/", host=check.host,
        expect=status_ranges(check.expect_status) if check.expect_status else ((200, 399),),
        body=check.body_contains, tls_verify=bool(check.tls_verify),
        query=check.query or "", query_type=check.query_type or "A")
    return Probe(spec, Timing(check.interval, check.timeout, check.rise, check.fall))


def probes_of(svc: Service) -> tuple[Probe | None, ...]:
    """One entry per backend, in backend order; () when nothing of ``svc`` is checked."""
    if svc.health is None and not any(b.health is not None for b in svc.backends):
        return ()
    return tuple(probe_of(svc, b) for b in svc.backends)


def fail_open(svc: Service) -> bool:
    return svc.health is None or svc.health.on_all_down == "fail_open"
