"""Desired services + health facts -> effective services (pure, no I/O).

The overlay is the runtime layer between what the operator asked for and
what the datapath holds. A backend whose probe is *down* is treated like a
drained one: Maglev weight 0, established flows keep their backend. A
backend the operator drained or put in maintenance stays as it is. When every
backend of a service that would take new connections is down, the service's
``on_all_down`` policy decides: ``fail_open`` keeps all of them (a checker
that fails everything is more often wrong than every backend; the service is
reported as failing open), ``fail_closed`` takes them all out.

A service the overlay does not change is passed on as the *same object*, and
so is an effective service whose inputs did not change: the datapath skips
services by identity, which keeps a drain at 1,000 services cheap. Work is
proportional to what changed: a desired write recomputes only the services
whose objects are new, a health change only the services using its probes.

Usage (the control core): ``eff = overlay.effective(services)`` or
``eff = overlay.with_facts({key: Health.down})``, apply ``eff.services`` to
the datapath, then ``overlay.accept(eff)`` once it is in force (a failed
apply accepts nothing, so the overlay keeps describing what is in force).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from l4lb.health.targets import Probe, fail_open, probes_of
from l4lb.inplace import replaced_at
from l4lb.models import BackendState, Service


class Health(str, Enum):
    up = "up"
    down = "down"
    unknown = "unknown"     # not checked yet (or not at all): counts as up


@dataclass(frozen=True)
class Entry:
    """One service as the overlay last computed it."""

    desired: Service
    probes: tuple[Probe | None, ...]   # per backend; () when nothing is checked
    effective: Service
    down: tuple[int, ...]              # indices of backends whose probe is down (and that were usable)
    fail_open: bool                    # all usable backends down, all kept (policy fail_open)


def overlay_service(svc: Service, probes: Sequence[Probe | None], facts: Mapping[str, Health]) -> Entry:
    """The pure core: one service under the given facts."""
    down = tuple(i for i, p in enumerate(probes)
                 if p is not None and facts.get(p.key) is Health.down and svc.backends[i].effective_weight > 0)
    if not down:
        return Entry(svc, tuple(probes), svc, (), False)
    usable = sum(1 for b in svc.backends if b.effective_weight > 0)
    if len(down) == usable and fail_open(svc):
        return Entry(svc, tuple(probes), svc, down, True)
    backends = list(svc.backends)
    for i in down:
        backends[i] = backends[i].model_copy(update={"state": BackendState.draining})
    return Entry(svc, tuple(probes), svc.model_copy(update={"backends": backends}), down, False)


@dataclass(frozen=True)
class Effective:
    """A computed overlay, not yet in force."""

    services: list[Service]            # in desired order
    entries: dict[str, Entry]
    facts: dict[str, Health]
    changed: frozenset[str]            # services whose effective object differs from the one in force
    desired: Sequence[Service] = ()    # the desired list it was computed from
    # Names whose entry may differ from the one in force, the same services in the same order
    # otherwise (None: look at all of them).
    touched: frozenset[str] | None = None
    failing_open: frozenset[str] | None = None  # fail_open, when known already

    @property
    def fail_open(self) -> frozenset[str]:
        if self.failing_open is not None:
            return self.failing_open
        return frozenset(n for n, e in self.entries.items() if e.fail_open)


class Overlay:
    def __init__(self, facts: Mapping[str, Health] | None = None) -> None:
        self.facts: dict[str, Health] = {k: v for k, v in (facts or {}).items() if v is not Health.unknown}
        self._entries: dict[str, Entry] = {}
        self._order: list[str] = []
        # What is in force, as lists in desired order: effective() of the same list
        # with a few services replaced looks at those only (_in_place).
        self._desired: Sequence[Service] = ()
        self._effective: list[Service] = []
        self._failing_open: frozenset[str] = frozenset()
        self._users: dict[str, set[str]] = {}   # probe key -> names of services using it

    # -- computing (no state changes) -------------------------------------------------

    def effective(self, services: Sequence[Service]) -> Effective:
        """The overlay of a desired service list under the current facts."""
        eff = self._in_place(services)
        if eff is not None:
            return eff
        entries: dict[str, Entry] = {}
        changed = set()
        for svc in services:
            old = self._entries.get(svc.name)
            if old is not None and old.desired is svc:
                entries[svc.name] = old
                continue
            entries[svc.name] = e = overlay_service(svc, probes_of(svc), self.facts)
            if old is None or old.effective is not e.effective:
                changed.add(svc.name)
        changed |= self._entries.keys() - entries.keys()
        return Effective([e.effective for e in entries.values()], entries, self.facts, frozenset(changed),
                         services)

    def _in_place(self, services: Sequence[Service]) -> Effective | None:
        """effective() of the list in force with a few services replaced by their
        namesakes in place (a drain): only those are computed, and nothing walks
        the 1,000 others. None when the change is not of that kind."""
        last = self._desired
        differ = replaced_at(last, services) if len(last) == len(self._effective) else None
        if differ is None or any(last[i].name != services[i].name for i in differ):
            return None
        entries, effective = dict(self._entries), list(self._effective)
        changed, failing = set(), set(self._failing_open)
        for i in differ:
            svc = services[i]
            old = entries[svc.name]
            entries[svc.name] = e = overlay_service(svc, probes_of(svc), self.facts)
            effective[i] = e.effective
            if old.effective is not e.effective:
                changed.add(svc.name)
            (failing.add if e.fail_open else failing.discard)(svc.name)
        return Effective(effective, entries, self.facts, frozenset(changed), services,
                         frozenset(services[i].name for i in differ), frozenset(failing))

    def with_facts(self, changes: Mapping[str, Health]) -> Effective:
        """The services in force under the facts with ``changes``; only services
        using a changed probe are computed again."""
        real = {k: v for k, v in changes.items() if self.facts.get(k, Health.unknown) is not v}
        facts = {k: v for k, v in {**self.facts, **real}.items() if v is not Health.unknown}
        entries = dict(self._entries)
        changed = set()
        for name in set().union(*(self._users.get(k, ()) for k in real)):
            old = entries[name]
            entries[name] = e = overlay_service(old.desired, old.probes, facts)
            if e.effective is not old.effective or e.fail_open != old.fail_open:
                changed.add(name)
        return Effective([entries[n].effective for n in self._order], entries, facts, frozenset(changed),
                         self._desired)

    # -- adopting ---------------------------------------------------------------------

    def accept(self, eff: Effective) -> None:
        """``eff`` is in force now."""
        old = self._entries
        for name in old.keys() - eff.entries.keys() if eff.touched is None else ():
            self._unuse(name, old[name])
        for name in eff.entries if eff.touched is None else eff.touched:
            e = eff.entries[name]
            prev = old.get(name)
            if prev is not None and prev.probes is e.probes:
                continue
            if prev is not None:
                self._unuse(name, prev)
            for p in e.probes:
                if p is not None:
                    self._users.setdefault(p.key, set()).add(name)
        self._entries = eff.entries
        if eff.touched is None:
            self._order = list(eff.entries)
        self._desired, self._effective, self._failing_open = eff.desired, eff.services, eff.fail_open
        self.facts = eff.facts

    def _unuse(self, name: str, e: Entry) -> None:
        for p in e.probes:
            if p is not None:
                users = self._users.get(p.key)
                if users is not None:
                    users.discard(name)
                    if not users:
                        del self._users[p.key]

    # -- reading ----------------------------------------------------------------------

    def entry(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def health(self, name: str, index: int) -> Health | None:
        """Health of backend ``index`` of service ``name`` (None: not checked)."""
        e = self._entries.get(name)
        if e is None or not e.probes or e.probes[index] is None:
            return None
        return self.facts.get(e.probes[index].key, Health.unknown)

    def keys(self) -> Iterable[str]:
        """Probe keys the services in force use."""
        return self._users.keys()

    @property
    def fail_open(self) -> frozenset[str]:
        return self._failing_open
