"""The state index (l4lb/stateindex.py): finding services by name, counting
backends and replacing one service without walking the list."""

from __future__ import annotations

from l4lb.models import BackendState, DesiredState, Service
from l4lb.stateindex import StateIndex, index_of


def svc(i: int, n: int) -> Service:
    return Service.model_validate({"name": f"s{i:03d}", "vip": "198.51.100.7", "port": 1000 + i,
                                   "backends": [{"address": f"192.0.2.{1 + j}"} for j in range(n)]})


def fresh(state: DesiredState) -> StateIndex:
    return StateIndex(state, {s.name: i for i, s in enumerate(state.services)},
                      sum(len(s.backends) for s in state.services))


def test_find_count_and_replace_agree_with_a_walk() -> None:
    state = DesiredState(services=[svc(i, 1 + i % 4) for i in range(50)])
    index = index_of(state)
    assert index_of(state) is index and index == fresh(state)
    assert index.find("s007") is state.services[7] and index.find("nope") is None
    s7 = state.services[7]
    drained = s7.model_copy(update={"backends": [s7.backends[0].model_copy(update={"state": BackendState.draining}),
                                                 *s7.backends[1:]]})
    new = index.replaced(drained)
    assert new.services[7] is drained and new.services[:7] == state.services[:7]
    assert state.services[7] is s7, "the old state is left as it was"
    assert index_of(new) == fresh(new) and index_of(new).position is index.position  # shared, never walked
    grown = index_of(new).replaced(svc(7, 9))  # another backend count
    assert index_of(grown) == fresh(grown) and index_of(grown).backends == index.backends - len(s7.backends) + 9


def test_a_state_not_seen_before_is_indexed() -> None:
    for k in range(6):  # more states than are remembered
        state = DesiredState(services=[svc(i, 2) for i in range(k)])
        assert index_of(state) == fresh(state)
