"""What the control core publishes to the rooms around it (health, BGP, fleet status).

The control core is the one writer of the load balancer's state. Other
subsystems never reach into it: they subscribe and receive a ``View`` after
every change that reached the datapath (a committed write, a runtime change
such as a health transition, an attach), and act on it in their own threads.
A View is immutable, so a subscriber may keep it as long as it likes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from l4lb.models import DesiredState, Service


@dataclass(frozen=True)
class View:
    revision: int
    desired: DesiredState            # the committed document (what the operator asked for)
    effective: tuple[Service, ...]   # what the datapath holds: desired with runtime overlays applied
    interfaces: Mapping[str, str] = field(default_factory=dict)  # attached interface -> XDP mode
    converged: bool = False          # the datapath holds ``effective`` (and nothing half-applied)
    runtime: int = 0                 # bumped by every runtime change (health) that kept the revision
    fail_open: frozenset[str] = frozenset()  # services kept whole although all their backends are down

    def service(self, name: str) -> Service | None:
        return next((s for s in self.effective if s.name == name), None)

    @staticmethod
    def usable(svc: Service) -> int:
        """Backends that take new connections (Maglev weight > 0) in ``svc``."""
        return sum(1 for w in svc.maglev_weights().values() if w > 0)

    def serving(self) -> dict[str, bool]:
        """Service name -> this box can serve it now: program attached, datapath
        converged, and at least one backend that takes new connections."""
        up = self.converged and bool(self.interfaces)
        return {s.name: up and self.usable(s) > 0 for s in self.effective}
