"""Where each service of a desired state sits, and how many backends it has in all.

A single-service write (a drain of one backend of one of 1,000 services) needs
to find its service by name, count the backends of all the others against the
limits, and make the next state with one service replaced. Done with a walk
over the list each, that is several passes over 1,000 services per request.
An index does each in O(1), and the state a replacement makes gets its index
for free (same names at the same places), so a stream of drains never walks
the list at all. States are immutable once made (the control core replaces
them whole), which is what makes remembering an index per state object safe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from operator import attrgetter

from l4lb.models import DesiredState, Service

_KEEP = 4  # indexes of the last few states: the committed one, the one being written, a dry run's


@dataclass(frozen=True)
class StateIndex:
    state: DesiredState
    position: dict[str, int]   # service name -> index in state.services (shared by replacements)
    backends: int               # backends of all services together

    def find(self, name: str) -> Service | None:
        i = self.position.get(name)
        return None if i is None else self.state.services[i]

    def replaced(self, svc: Service) -> DesiredState:
        """The state with ``svc`` in the place of its namesake (which must exist).
        Built without validation: the caller validated ``svc``, and names and
        keys stay those of a valid state."""
        i = self.position[svc.name]
        services = list(self.state.services)
        old, services[i] = services[i], svc
        new = DesiredState.model_construct(services=services)
        _remember(StateIndex(new, self.position, self.backends - len(old.backends) + len(svc.backends)))
        return new


_indexes: dict[int, StateIndex] = {}
_lock = threading.Lock()  # reads of the committed state run in API threads, beside a write


def _remember(index: StateIndex) -> None:
    with _lock:
        _indexes[id(index.state)] = index  # the entry holds the state: its id stays its own
        while len(_indexes) > _KEEP:
            del _indexes[next(iter(_indexes))]


def index_of(state: DesiredState) -> StateIndex:
    """The index of ``state``: remembered, or built (one pass)."""
    hit = _indexes.get(id(state))
    if hit is not None and hit.state is state:
        return hit
    services = state.services
    index = StateIndex(state, {n: i for i, n in enumerate(map(attrgetter("name"), services))},
                       sum(map(len, map(attrgetter("backends"), services))))
    _remember(index)
    return index
