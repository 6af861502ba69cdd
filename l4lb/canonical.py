"""The stored form of a desired state: services by name, backends by identity,
so that list order is never a change (no new revision, no datapath write)."""

from __future__ import annotations

from collections.abc import Sequence

from l4lb.models import DesiredState, Service


def canonical_service(s: Service) -> Service:
    """Backends in identity order (address family, bytes, effective port)."""
    order = sorted(s.backends, key=lambda b: (b.address.version, b.address.packed, b.port or s.port))
    return s if order == s.backends else s.model_copy(update={"backends": order})


def canonical(state: DesiredState, trusted: Sequence[Service] = ()) -> DesiredState:
    """Services by name, backends by identity.
    ``trusted`` services (those of the committed state) are canonical already and not sorted again."""
    known = {id(s) for s in trusted}
    services = sorted((s if id(s) in known else canonical_service(s) for s in state.services), key=lambda s: s.name)
    # A reordering of a valid state is valid: no second validation of every service.
    return state if services == state.services else DesiredState.model_construct(services=services)
