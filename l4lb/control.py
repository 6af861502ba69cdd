"""The control core: every change to the load balancer goes through here.

A write is one transaction: validate → check the precondition (ETag) → stage
in the store → ``datapath.apply(new services)`` → commit. Any failure before
the commit rolls the store back and re-applies the previous service set, so a
rejected or failed request changes nothing, in the store or in the maps. The
caller gets a result only once the change is both durable and in the datapath.

One lock serialises writes *and* datapath reads (stats/status), so the
datapath never sees two callers at once; API handlers run in a thread pool.
The periodic rate sample is the exception: it leans on the datapath's own
lock, so a write never waits while 100,000 counters are walked.

Errors are ``ControlError`` subclasses carrying an HTTP-ish status and located
issues; the API layer only renders them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from l4lb.applymetrics import ApplyMetrics
from l4lb.background import Background
from l4lb.backendref import BackendRef, check_backend_fits
from l4lb.canonical import canonical, canonical_service
from l4lb.datapath.config import DatapathFull
from l4lb.health.overlay import Effective, Health, Overlay
from l4lb.issues import ApplyFailed, Conflict, Invalid, Issue, NotFound, _invalid
from l4lb.limits import Limits, limit_issues
from l4lb.memory import freeze
from l4lb.models import Backend, BackendState, DesiredState, Service
from l4lb.plan import Plan, diff
from l4lb.preconditions import NO_PRECONDITION, Precondition, service_etag, state_etag
from l4lb.stateindex import index_of
from l4lb.stats import Counters, RateTracker, Sample, flatten_stats, stats_answer
from l4lb.store import Record, Store
from l4lb.view import View

log = logging.getLogger("l4lbd.control")

class DatapathLike(Protocol):
    """What the control core needs from l4lb.datapath.Datapath."""

    def apply(self, services: Sequence[Service]) -> None: ...  # all or nothing; restores itself on failure
    def attach(self, interfaces: Sequence[str], mode: str = "auto") -> dict[str, str]: ...
    def detach(self, interfaces: Sequence[str]) -> None: ...
    def stats(self) -> Any: ...
    def status(self) -> dict: ...


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Committed:
    revision: int
    changed: bool
    plan: Plan
    state: DesiredState  # in force after the call: answers and ETags come from it, not a later read
    dry_run: bool = False

    def service(self, name: str) -> Service:
        return self.state.services[index_of(self.state).position[name]]


# --- the core ----------------------------------------------------------------------------------


class Control:
    def __init__(
        self,
        store: Store,
        datapath: DatapathLike,
        limits: Limits,
        *,
        post_apply_hook: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        overlay: Overlay | None = None,
    ) -> None:
        self._store = store
        self._dp = datapath
        self.limits = limits
        self._hook = post_apply_hook  # test-only failure injection, see daemon
        self._clock = clock
        self._lock = threading.RLock()
        # The committed state, replaced as one object: reads need no lock (a long
        # apply must not stall GETs) and never see a revision with another's document.
        self._snap: Record = store.read()
        self.converged = False
        self.degraded: str | None = None  # why the datapath may not match the store
        self.interfaces: dict[str, str] = {}  # attached interface -> XDP mode used
        self.apply_metrics = ApplyMetrics()
        self._rates = RateTracker()
        # Neighbour/next-hop upkeep of new backends runs after the answer (Datapath.settle).
        settle = getattr(datapath, "settle", None)
        self._writes = 0  # writes in progress: background upkeep waits for them (see _pause)
        self._last_write = 0.0
        self._settle = (Background(lambda: settle(pause=self._pause), "l4lb-settle")
                        if settle is not None else None)
        self._subscribers: list[Callable[[View], None]] = []
        # Runtime state beside the document (health): what the datapath holds is
        # overlay.effective(desired). Health changes bump `runtime`, not the revision.
        self._overlay = overlay if overlay is not None else Overlay()
        self._in_force: Effective | None = None
        self.runtime = 0

    # -- subscribers (health, BGP, fleet status: l4lb/view.py) -------------------------

    def subscribe(self, fn: Callable[[View], None]) -> None:
        """Call ``fn(view)`` now and after every change that reached the datapath.
        It runs under the control lock, in the writer's thread: it must only
        record the view and wake its own worker, never block or call back in."""
        with self._lock:
            self._subscribers.append(fn)
            self._call(fn, self.view())

    def view(self) -> View:
        snap, eff = self._snap, self._in_force
        effective = tuple(eff.services) if eff is not None else tuple(snap.state.services)
        return View(snap.revision, snap.state, effective, dict(self.interfaces), self.ready,
                    runtime=self.runtime, fail_open=eff.fail_open if eff is not None else frozenset())

    def _publish(self) -> None:
        if not self._subscribers:
            return
        view = self.view()
        for fn in self._subscribers:
            self._call(fn, view)

    @staticmethod
    def _call(fn: Callable[[View], None], view: View) -> None:
        try:
            fn(view)
        except Exception:  # noqa: BLE001 - a subscriber's bug must not fail a write
            log.exception("subscriber %r failed", fn)

    # -- lifecycle -----------------------------------------------------------------

    def converge(self) -> None:
        """Make the datapath hold the last committed state (daemon start, after a crash)."""
        with self._lock:
            self._apply(self._overlay.effective(self._state.services), settle_later=True)
            if self._settle is not None:
                self._settle.kick()  # neighbours of the backends after READY, not before
            self.converged = True
            self.degraded = None
            self._publish()

    def heal(self) -> bool:
        """Retry converging after a failed rollback; True when consistent."""
        with self._lock:
            if self.degraded is None:
                return True
            try:
                self.converge()
                log.warning("datapath converged again to revision %d", self._revision)
                return True
            except Exception as e:  # noqa: BLE001 - keep trying, report
                self.degraded = f"datapath does not match revision {self._revision}: {e}"
                return False

    def attach(self, interfaces: Sequence[str], mode: str) -> dict[str, str]:
        with self._lock:
            used = self._dp.attach(list(interfaces), mode)
            self.interfaces.update(used)
            self._publish()
            return used

    def detach(self, interfaces: Sequence[str]) -> None:
        with self._lock:
            self._dp.detach(list(interfaces))
            for i in interfaces:
                self.interfaces.pop(i, None)
            self._publish()

    def update_runtime(self, datapath_config: Any) -> None:
        """Datapath knobs that need no new program (seed, outer sources, ICMP rate)."""
        with self._lock:
            update = getattr(self._dp, "update_runtime", None)
            if update is None:
                raise NotImplementedError("this datapath cannot change settings at run time")
            update(datapath_config)

    def healthy(self, timeout: float) -> bool:
        """For the watchdog: the lock can be taken (no write is stuck) and the datapath is consistent."""
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            return self.degraded is None
        finally:
            self._lock.release()

    @property
    def ready(self) -> bool:
        return self.converged and self.degraded is None

    def set_limits(self, limits: Limits) -> None:
        """New limits (SIGHUP); refused if the current state already exceeds them."""
        with self._lock:
            issues = limit_issues(self._state.services, limits, list_loc=("services",),
                                   item_loc=lambda i: ("services", i, "backends"))
            if issues:
                raise Invalid("the current desired state exceeds the new limits: " + "; ".join(i.msg for i in issues), issues)
            self.limits = limits

    # -- runtime overlay (health) -----------------------------------------------------------

    def set_health(self, facts: Mapping[str, Health]) -> frozenset[str]:
        """Health facts by probe key (l4lb/health). The services using them are
        applied to the datapath with down backends at weight 0; the desired
        document and its revision do not change, ``runtime`` counts the change.
        All or nothing: a failed apply leaves datapath and overlay as they were.
        Returns the services whose effective state changed."""
        with self._lock:
            eff = self._overlay.with_facts(facts)
            if eff.facts == self._overlay.facts:
                return frozenset()
            if eff.changed and self.converged:
                self._apply(eff)
            else:  # nothing to write (or not converged yet: converge applies the overlay)
                self._overlay.accept(eff)
                self._in_force = eff if self._in_force is not None else None
            self.runtime += 1
            self._publish()
            return eff.changed

    def health(self, name: str, index: int) -> str | None:
        h = self._overlay.health(name, index)
        return None if h is None else h.value

    def _apply(self, eff: Effective, *, settle_later: bool = False) -> None:
        """Datapath first, then the overlay: a failure leaves both describing what is in force.
        ``settle_later``: neighbour upkeep of new backends after the answer (see _commit)."""
        if settle_later and self._settle is not None:
            self._dp.apply(eff.services, settle=False)  # type: ignore[call-arg]
        else:
            self._dp.apply(eff.services)
        self._overlay.accept(eff)
        self._in_force = eff

    # -- reads (lock-free: one snapshot each) ---------------------------------------------

    @property
    def _state(self) -> DesiredState:
        return self._snap.state

    @property
    def _revision(self) -> int:
        return self._snap.revision

    @property
    def revision(self) -> int:
        return self._snap.revision

    def snapshot(self) -> tuple[int, DesiredState]:
        snap = self._snap
        return snap.revision, snap.state

    def read_service(self, name: str) -> tuple[int, Service]:
        snap = self._snap
        return snap.revision, self._find(snap.state, name)

    def read_backend(self, name: str, ref: BackendRef) -> tuple[int, Service, Backend]:
        snap = self._snap
        svc = self._find(snap.state, name)
        return snap.revision, svc, svc.backends[ref.index_in(svc)]

    def get_service(self, name: str) -> Service:
        return self.read_service(name)[1]

    # -- writes -----------------------------------------------------------------------

    def replace_state(self, new: DesiredState, pre: Precondition = NO_PRECONDITION, dry_run: bool = False) -> Committed:
        with self._lock:
            pre.check(state_etag(self._revision), "the desired state")
            issues = limit_issues(new.services, self.limits, list_loc=("body", "services"),
                                   item_loc=lambda i: ("body", "services", i, "backends"))
            if issues:
                raise Invalid("; ".join(i.msg for i in issues), issues)
            return self._commit(canonical(new), dry_run=dry_run, bulk=True)

    def put_service(self, service: Service, pre: Precondition = NO_PRECONDITION) -> tuple[Committed, bool]:
        with self._lock:
            old = index_of(self._state).find(service.name)
            pre.check(service_etag(old) if old else None, f"service {service.name!r}")
            for other in self._state.services:
                if other.name != service.name and other.key == service.key:
                    raise Conflict(
                        f"{service.vip} port {service.port}/{service.protocol.value} is already used by service "
                        f"{other.name!r}",
                        [Issue(("body", "vip"), f"{service.vip}:{service.port}/{service.protocol.value} is used by "
                               f"service {other.name!r}", "conflict")],
                    )
            others = [s for s in self._state.services if s.name != service.name]
            issues = limit_issues([service], self.limits, list_loc=("path", "name"),
                                   item_loc=lambda i: ("body", "backends"),
                                   others=(len(others), sum(len(s.backends) for s in others)))
            if issues:
                raise Invalid("; ".join(i.msg for i in issues), issues)
            # Validated parts, name and key unique (checked above): no second validation of every service.
            committed = self._commit(canonical(DesiredState.model_construct(services=[*others, service]),
                                               trusted=others))
            return committed, old is None

    def delete_service(self, name: str, pre: Precondition = NO_PRECONDITION) -> Committed:
        with self._lock:
            old = self._find(self._state, name)
            pre.check(service_etag(old), f"service {name!r}")
            return self._commit(DesiredState(services=[s for s in self._state.services if s.name != name]))

    def put_backend(
        self, name: str, ref: BackendRef, backend: Backend, pre: Precondition = NO_PRECONDITION,
    ) -> tuple[Committed, bool, Backend]:
        """Create or replace the backend ``ref`` of service ``name`` (address from the URL).
        Returns the result, whether it was created, and the backend as stored."""
        with self._lock:
            svc = self._find(self._state, name)
            pre.check(lambda: service_etag(svc), f"service {name!r}")
            if backend.address != ref.address:
                raise Invalid(f"body address {backend.address} differs from the URL's {ref.address}",
                              [Issue(("body", "address"), "differs from the address in the URL")])
            if ref.port is not None and backend.port is not None and backend.port != ref.port:
                raise Invalid(f"body port {backend.port} differs from the URL's {ref.port}",
                              [Issue(("body", "port"), "differs from the port in the URL")])
            if ref.port is not None and backend.port is None and ref.port != svc.port:
                backend = backend.model_copy(update={"port": ref.port})
            check_backend_fits(svc, backend)
            ident = backend.identity(svc.port)
            idx = next((i for i, b in enumerate(svc.backends) if b.identity(svc.port) == ident), None)
            backends = list(svc.backends)
            if idx is None:
                backends.append(backend)
            else:
                backends[idx] = backend
            new_svc = self._rebuild(svc, backends)
            committed = self._commit(self._with_service(new_svc))
            return committed, idx is None, backend

    def patch_backend(
        self, name: str, ref: BackendRef, *, weight: int | None = None, state: BackendState | None = None,
        pre: Precondition = NO_PRECONDITION,
    ) -> tuple[Committed, Backend]:
        with self._lock:
            svc = self._find(self._state, name)
            pre.check(lambda: service_etag(svc), f"service {name!r}")
            idx = ref.index_in(svc)
            update: dict[str, Any] = {}
            if weight is not None:
                update["weight"] = weight
            if state is not None:
                update["state"] = state
            backends = list(svc.backends)
            try:
                backends[idx] = Backend.model_validate({**backends[idx].model_dump(), **update})
            except ValidationError as e:
                raise _invalid(e, ("body",)) from None
            committed = self._commit(self._with_service(self._rebuild(svc, backends)))
            return committed, backends[idx]

    def delete_backend(self, name: str, ref: BackendRef, pre: Precondition = NO_PRECONDITION) -> Committed:
        with self._lock:
            svc = self._find(self._state, name)
            pre.check(lambda: service_etag(svc), f"service {name!r}")
            idx = ref.index_in(svc)
            backends = [b for i, b in enumerate(svc.backends) if i != idx]
            return self._commit(self._with_service(self._rebuild(svc, backends)))

    # -- read side: stats and status ----------------------------------------------------

    def sample(self) -> None:
        """Record a stats sample for rates (called periodically by the daemon)."""
        # Not under the control lock: the datapath serialises its own reads, and a
        # write must not wait for 100,000 counters to be read and flattened.
        now, raw = self._clock(), self._dp.stats()
        with self._lock:
            self._rates.observe(now, Sample(raw))

    def stats(self) -> dict[str, Any]:
        """Counters of every desired service/backend (with its health) and per-reason totals, with rates."""
        # Read and flatten outside the lock: a write must not wait for 100,000 counters.
        now, sample = self._clock(), Sample(self._dp.stats())
        sample.flat
        with self._lock:
            base = self._rates.base(now)
            self._rates.observe(now, sample)
            revision, state = self.snapshot()
        return stats_answer(revision, state, sample, base, now, self.health, self.view().fail_open)

    def raw_stats(self) -> tuple[DesiredState, Counters]:
        """State and flat counters, for the Prometheus collector."""
        state, raw = self._state, self._dp.stats()  # not under the lock: see stats()
        return state, flatten_stats(raw)

    def status(self) -> dict[str, Any]:
        with self._lock:
            dp_status = self._dp.status()
            snap = self._snap
            state = snap.state
            by_state = Counter(b.state.value for s in state.services for b in s.backends)
            return {
                "revision": snap.revision,
                "updated_at": snap.updated_at or None,
                "ready": self.ready,
                "degraded": self.degraded,
                "services": len(state.services),
                "backends": sum(by_state.values()),
                "backends_by_state": {k.value: by_state.get(k.value, 0) for k in BackendState},
                "interfaces": dict(self.interfaces),
                "limits": asdict(self.limits),
                "datapath": dp_status,
            }

    def summary(self) -> str:
        """One line for sd_notify STATUS= and logs."""
        revision, state = self.snapshot()
        n_b = sum(len(s.backends) for s in state.services)
        ifs = ",".join(f"{i}({m})" for i, m in sorted(self.interfaces.items())) or "none"
        flag = "" if self.degraded is None else " DEGRADED"
        return f"revision {revision}: {len(state.services)} services, {n_b} backends, interfaces {ifs}{flag}"

    # -- internals ----------------------------------------------------------------------

    def _pause(self) -> None:
        """Let writes go first: wait while one runs or another may follow (20 ms
        after the last), at most a second, so upkeep still progresses under a
        stream of writes."""
        for _ in range(200):
            if not self._writes and time.monotonic() - self._last_write > 0.02:
                return
            time.sleep(0.005)

    def _commit(self, new: DesiredState, *, dry_run: bool = False, bulk: bool = False) -> Committed:
        self._writes += 1
        try:
            return self._commit_inner(new, dry_run=dry_run, bulk=bulk)
        finally:
            self._writes -= 1
            self._last_write = time.monotonic()

    def _commit_inner(self, new: DesiredState, *, dry_run: bool, bulk: bool) -> Committed:
        old = self._state
        p0 = time.monotonic()
        prefetch = getattr(self._dp, "prefetch", None)
        if bulk and prefetch is not None and not dry_run:
            prefetch(new.services)  # Maglev tables build while we diff and stage
        plan = diff(old, new)
        if dry_run:
            return Committed(self._revision, not plan.empty, plan, old, dry_run=True)
        if new == old:
            self.apply_metrics.observe("unchanged")
            return Committed(self._revision, False, plan, old)
        t0 = time.monotonic()
        staged = False
        try:
            with self._store.write(self._revision, new) as revision:
                staged = True
                t1 = time.monotonic()
                self._apply(self._overlay.effective(new.services), settle_later=True)
                t2 = time.monotonic()
                if self._hook is not None:
                    self._hook()
        except Exception as e:
            self.apply_metrics.observe("failed", time.monotonic() - t0)
            log.error("apply of revision %d failed (%s); restoring revision %d", self._revision + 1, e, self._revision)
            if staged:
                self._restore(old)
            if isinstance(e, DatapathFull):  # the request, not the box: 422
                raise Invalid(f"{e}; nothing was changed (revision {self._revision})") from e
            raise ApplyFailed(f"{e}; the store and the datapath still hold revision {self._revision}") from e
        t3 = time.monotonic()
        took = t3 - t0
        self.apply_metrics.observe("ok", took)
        self._snap = Record(revision, new, time.time())
        self.degraded = None  # the datapath now holds exactly the committed state
        s = plan.summary()
        # Where the time went: plan, store (stage + commit), datapath (and its own parts).
        dp = getattr(self._dp, "last_timings", None)
        phases = (f"plan={t0 - p0:.3f}s store={(t1 - t0) + (t3 - t2):.3f}s datapath={t2 - t1:.3f}s"
                  + (f" [{dp.summary()}]" if hasattr(dp, "summary") else ""))
        log.info("revision %d applied in %.3fs (%s): %s", revision, took, phases,
                 ", ".join(f"{k}={v}" for k, v in s.items() if v))
        if self._settle is not None:
            self._settle.kick()
        self._publish()
        if bulk:
            # A big document leaves ~10^6 long-lived objects: without this, the next
            # requests each pay a full collection scanning all of them (~150 ms).
            # Frozen objects are still freed by reference counting.
            freeze()  # l4lb/memory.py: the sampler sorts this request's garbage out once
        return Committed(revision, True, plan, new)

    def _restore(self, old: DesiredState) -> None:
        try:
            self._apply(self._overlay.effective(old.services))
        except Exception as e:  # noqa: BLE001
            self.degraded = f"datapath could not be restored to revision {self._revision}: {e}"
            log.critical("%s", self.degraded)

    def _find(self, state: DesiredState, name: str) -> Service:
        svc = index_of(state).find(name)
        if svc is None:
            raise NotFound(f"no service named {name!r}", [Issue(("path", "name"), "no such service", "not_found")])
        return svc

    def _with_service(self, svc: Service) -> DesiredState:
        # One validated service replaces its namesake (same key): names and keys stay unique, so no
        # DesiredState validation (every Service's validator again), and the list stays canonical.
        return index_of(self._state).replaced(canonical_service(svc))

    def _rebuild(self, svc: Service, backends: list[Backend]) -> Service:
        index = index_of(self._state)
        issues = limit_issues([svc.model_copy(update={"backends": backends})], self.limits,
                               list_loc=("path", "backend"), item_loc=lambda i: ("path", "backend"),
                               others=(len(index.position) - 1, index.backends - len(svc.backends)))
        if issues:
            raise Invalid("; ".join(i.msg for i in issues), issues)
        try:  # validated parts as they are (no dump and re-parse of 100 backends); the service's checks run
            return Service.model_validate({**dict(svc), "backends": backends})
        except ValidationError as e:
            raise _invalid(e, ("body",)) from None

