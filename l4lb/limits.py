"""How much desired state the box takes (services, backends per service, backend
slots in the datapath's maps), and the located issues of a write that exceeds it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from l4lb.issues import Issue, Loc
from l4lb.models import Service


@dataclass(frozen=True)
class Limits:
    max_services: int = 1024
    max_backends_per_service: int = 1024
    max_backends_total: int = 65536  # (service, backend) pairs the datapath's maps hold


def limit_issues(
    services: Sequence[Service], limits: Limits, *, list_loc: Loc, item_loc: Callable[[int], Loc],
    others: tuple[int, int] = (0, 0),
) -> list[Issue]:
    """Limit violations of ``services`` (the part being written) plus ``others`` (the rest: services, backends)."""
    issues: list[Issue] = []
    n = len(services) + others[0]
    if n > limits.max_services:
        issues.append(Issue(list_loc, f"{n} services exceed limits.max_services = {limits.max_services}", "limit"))
    for i, s in enumerate(services):
        if len(s.backends) > limits.max_backends_per_service:
            issues.append(Issue(item_loc(i), f"service {s.name!r} would have {len(s.backends)} backends; "
                                f"limits.max_backends_per_service is {limits.max_backends_per_service}", "limit"))
    total = sum(len(s.backends) for s in services) + others[1]
    if total > limits.max_backends_total:
        issues.append(Issue(list_loc, f"{total} backends in all exceed the datapath's "
                            f"{limits.max_backends_total} backend slots (datapath.max_backends)", "limit"))
    return issues
