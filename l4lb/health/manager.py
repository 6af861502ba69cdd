"""The health room's one moving part: desired state in, transitions out.

* It subscribes to the control core. From every View whose *desired* state
  changed it works out the probes (one per distinct key, l4lb/health/targets.py)
  of the services that changed, and starts, changes or stops them in the
  scheduler. Probes through the tunnel get a mark and a source address from
  the datapath's ProbeTunnel; the sources follow the box's address and route
  changes (l4lb/health/sources.py).
* Transitions from the scheduler are written to the health store first, then
  handed to ``Control.set_health`` (the control core's one change path), then
  logged with their reason. A failed apply is retried; nothing is lost.
* On start it reads the last known states, which the daemon gives the control
  core *before* the first converge (``restored_facts``), so the effective
  state at start equals what was in force: a restart flaps nothing.

All of it runs in its own thread; the subscriber callback only records the
View and wakes that thread (it runs under the control lock).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from l4lb.health.machine import Damping, Transition
from l4lb.health.overlay import Health
from l4lb.health.probe import Route
from l4lb.health.scheduler import Failure, LoopStats, ProbeConfig
from l4lb.health.sources import SourceFollower
from l4lb.health.store import HealthStore
from l4lb.health.targets import Probe, ProbeSpec, probes_of
from l4lb.health.worker import Latency, ProbeWorker
from l4lb.inplace import replaced_at
from l4lb.models import Service
from l4lb.view import View

log = logging.getLogger("l4lbd.health")

LOG_BURST = 20   # transitions logged one by one per round; the rest are summed up


class ControlLike(Protocol):
    def subscribe(self, fn: Callable[[View], None]) -> None: ...
    def set_health(self, facts: dict[str, Health]) -> frozenset[str]: ...
    def view(self) -> View: ...


class TunnelLike(Protocol):
    def load(self) -> None: ...
    def routes(self, addresses: set[str]) -> dict[str, tuple[int, str | None]]: ...
    def counters(self) -> dict[str, int]: ...
    def recheck_sources(self) -> dict[str, tuple[str | None, str | None]]: ...


class HealthManager:
    def __init__(self, state_dir: Path, *, tunnel: TunnelLike | None = None, tunnel_error: str | None = None,
                 damping: Damping = Damping(), max_in_flight: int = 4096) -> None:
        self.store = HealthStore(state_dir / "health.db")
        self._restored = self.store.load()
        self.tunnel: TunnelLike | None = None   # once loaded
        self._tunnel_todo = tunnel
        self._tunnel_loaded: TunnelLike | None = None
        self.tunnel_error = tunnel_error or ("the probe tunnel is not set up" if tunnel is None
                                             else "the probe tunnel is being set up")
        self.worker = ProbeWorker(self._transition, damping=damping, max_in_flight=max_in_flight,
                                  restored=self._restored)
        self.transitions: deque[Transition] = deque(maxlen=256)   # recent ones, for the API
        self._control: ControlLike | None = None
        self._view: View | None = None
        self._seen: dict[str, tuple[Service, tuple[Probe | None, ...]]] = {}  # service -> object, probes
        self._followed: list[Service] = []  # the desired list last followed
        self._users: dict[str, dict[str, Probe]] = {}      # probe key -> service name -> its probe
        self._tunnel_refs: dict[str, int] = {}             # backend address -> tunnel probes naming it
        self._routes: dict[str, tuple[int, str | None]] = {}
        self._queue: deque[Transition] = deque()
        self._unapplied: dict[str, Health] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._fail_open: frozenset[str] = frozenset()
        self._sources = SourceFollower(self._wake.set)   # tunnel probes follow address and route changes

    def restored_facts(self) -> dict[str, Health]:
        """The last known states, for the overlay the control core starts with."""
        return {k: h for k, (h, _) in self._restored.items()}

    # -- wiring ----------------------------------------------------------------------

    def start(self, control: ControlLike) -> None:
        self._control = control
        self._thread = threading.Thread(target=self._run, name="l4lb-health-apply", daemon=True)
        self._thread.start()
        control.subscribe(self._on_view)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self.worker.stop()
        self._sources.stop()
        self.store.close()

    def _on_view(self, view: View) -> None:
        # Under the control lock: record and wake, nothing else.
        self._view = view
        self._wake.set()

    def _transition(self, t: Transition) -> None:
        # In the thread that reads the probe worker.
        self._queue.append(t)
        self.transitions.append(t)
        self._wake.set()

    # -- the worker ------------------------------------------------------------------

    def _load_tunnel(self, tunnel: TunnelLike) -> None:
        """Compiling the encapsulator takes seconds: done in a thread of its own,
        once a check needs it, so neither a restart nor the health changes of
        other probes wait for it, and a box without tunnel checks never pays.
        Until then tunnel probes do not run (the restored states stay in force)."""
        try:
            tunnel.load()
        except Exception as e:  # noqa: BLE001
            self.tunnel_error = f"the probe tunnel could not be set up: {e}"
            log.error("health: %s; checks with via = \"tunnel\" will not run", self.tunnel_error)
            return
        self._tunnel_loaded = tunnel
        self._wake.set()

    def _tunnel_arrived(self) -> None:
        """The tunnel is ready: route the tunnel probes that could not run."""
        self.tunnel, self._tunnel_loaded, self.tunnel_error = self._tunnel_loaded, None, None
        self._tunnel_refs = {}
        self._sources.start()   # before the sources are looked up: no change falls in between
        self._reprobe({k for k, users in self._users.items()
                       if any(p.spec.via == "tunnel" for p in users.values())})

    def _run(self) -> None:
        desired = None
        while not self._stop:
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                view = self._view
                if view is not None and view.desired is not desired:
                    first = desired is None
                    desired = view.desired
                    self._follow(view.desired.services)
                    if first and self._restored:
                        # States of probes no service uses any more (removed while we were away).
                        stale = [k for k in self._restored if k not in self._users]
                        if stale:
                            self.store.forget(stale)
                            self._unapplied.update({k: Health.unknown for k in stale})
                if self._tunnel_loaded is not None:
                    self._tunnel_arrived()
                if self.tunnel is not None and self._sources.due():
                    self._follow_sources()
                self._apply()
                self._report_fail_open()
            except Exception:  # noqa: BLE001 - keep checking; the next round retries
                log.exception("health manager round failed")
                time.sleep(0.5)

    def _follow(self, services: list[Service]) -> None:
        """Start, change and stop probes for the services that changed."""
        touched: set[str] = set()
        last, self._followed = self._followed, services
        at = replaced_at(last, services)
        names: set[str] | None = None
        if at is not None and all(last[i].name == services[i].name for i in at):
            services = [services[i] for i in at]  # a few replaced in place (a drain): those alone
        else:
            names = {svc.name for svc in services}
        for svc in services:
            old = self._seen.get(svc.name)
            if old is not None and old[0] is svc:
                continue
            probes = probes_of(svc)
            if old is not None:
                touched |= self._unuse(svc.name, old[1])
            for p in probes:
                if p is not None:
                    self._users.setdefault(p.key, {})[svc.name] = p
                    touched.add(p.key)
            self._seen[svc.name] = (svc, probes)
        for name in [n for n in self._seen if n not in names] if names is not None else ():
            touched |= self._unuse(name, self._seen.pop(name)[1])
        if touched:
            self._reprobe(touched)

    def _unuse(self, name: str, probes: tuple[Probe | None, ...]) -> set[str]:
        keys = set()
        for p in probes:
            if p is not None and name in self._users.get(p.key, {}):
                del self._users[p.key][name]
                keys.add(p.key)
        return keys

    def _reprobe(self, keys: set[str]) -> None:
        changes: dict[str, ProbeConfig | None] = {}
        gone = []
        new_addrs = set()
        for key in keys:
            users = self._users.get(key)
            if not users:
                self._users.pop(key, None)
                gone.append(key)
                changes[key] = None
                continue
            first = next(iter(users.values()))
            if first.spec.via == "tunnel" and first.spec.address not in self._routes:
                new_addrs.add(first.spec.address)
        self._update_tunnel(new_addrs)
        for key in keys:
            users = self._users.get(key)
            if users:
                probes = list(users.values())
                timing = probes[0].timing
                for p in probes[1:]:
                    timing = timing.merge(p.timing)
                changes[key] = ProbeConfig(probes[0].spec, timing, self._route(probes[0].spec))
        self.worker.update(changes)
        if gone:
            # Facts of probes nobody uses any more must not come back with a later service.
            self.store.forget(gone)
            self._unapplied.update({k: Health.unknown for k in gone})

    def _follow_sources(self) -> None:
        """The box's addresses or routes changed: re-route the tunnel probes whose source moved."""
        assert self.tunnel is not None
        tunnel_probes = {k: p.spec.address for k, users in self._users.items()
                         for p in list(users.values())[:1] if p.spec.via == "tunnel"}
        keys = self._sources.follow(self.tunnel, self._routes, tunnel_probes)
        if keys:
            self._reprobe(keys)

    def _update_tunnel(self, new_addrs: set[str]) -> None:
        # Reference counts of backend addresses probed through the tunnel.
        refs: dict[str, int] = {}
        for users in self._users.values():
            p = next(iter(users.values()), None)
            if p is not None and p.spec.via == "tunnel":
                refs[p.spec.address] = refs.get(p.spec.address, 0) + 1
        if refs and self.tunnel is None and self._tunnel_todo is not None:
            tunnel, self._tunnel_todo = self._tunnel_todo, None
            threading.Thread(target=self._load_tunnel, args=(tunnel,), name="l4lb-health-tunnel", daemon=True).start()
        if self.tunnel is None or (not new_addrs and refs.keys() == self._tunnel_refs.keys()):
            self._tunnel_refs = refs
            return
        try:
            self._routes = self.tunnel.routes(set(refs))
            self.tunnel_error = None
        except Exception as e:  # noqa: BLE001 - probes then report why they cannot run
            self.tunnel_error = f"probe tunnel: {e}"
            log.error("%s", self.tunnel_error)
        self._tunnel_refs = refs

    def _route(self, spec: ProbeSpec) -> Route | str:
        if spec.via == "direct":
            return Route()
        r = self._routes.get(spec.address)
        if r is None:
            return f"not run: {self.tunnel_error or 'no mark for ' + spec.address}"
        mark, source = r
        if source is None:
            return Route(mark, None, no_route=spec.address)   # a failed check each time, not "not run"
        return Route(mark, source)

    def _apply(self) -> None:
        """Persist, then apply, the transitions the scheduler reported."""
        batch: list[Transition] = []
        while self._queue:
            batch.append(self._queue.popleft())
        real = [t for t in batch if t.old is not t.new]
        if real:
            self.store.save((t.key, t.new, t.at, t.reason) for t in real)
        self._log(batch)
        for t in real:
            self._unapplied[t.key] = t.new
        if not self._unapplied or self._control is None:
            return
        facts, self._unapplied = self._unapplied, {}
        try:
            changed = self._control.set_health(facts)
        except Exception as e:  # noqa: BLE001 - kept and retried on the next round
            log.error("health change not applied (%s); retrying", e)
            self._unapplied = {**facts, **self._unapplied}
            self._wake.set()
            time.sleep(0.2)
            return
        if changed:
            log.info("health: datapath updated for %s", ", ".join(sorted(changed)))

    def _log(self, batch: list[Transition]) -> None:
        """One line per transition with its reason; a burst (a switch died) is
        logged as its first LOG_BURST lines and one summary, not thousands.
        unknown -> up changes nothing in the datapath: debug only."""
        shown = 0
        rest: dict[str, int] = {}
        for t in batch:
            level = (logging.DEBUG if t.old is Health.unknown and t.new is Health.up
                     else logging.WARNING if t.new is Health.down else logging.INFO)
            if level == logging.DEBUG and not log.isEnabledFor(logging.DEBUG):
                continue
            if shown >= LOG_BURST and level > logging.DEBUG:
                rest[t.new.value] = rest.get(t.new.value, 0) + 1
                continue
            shown += level > logging.DEBUG
            users = self._users.get(t.key, {})
            p = next(iter(users.values()), None)
            what = p.spec.description if p is not None else t.key
            svcs = ", ".join(sorted(users)) or "none"
            if t.old is t.new:
                log.warning("health: %s stays %s: %s (services: %s)", what, t.new.value.upper(), t.reason, svcs)
            else:
                log.log(level, "health: %s is %s (was %s): %s (services: %s)", what, t.new.value.upper(),
                        t.old.value, t.reason, svcs)
        if rest:
            log.warning("health: and %s more in this burst (GET /v1/health lists them)",
                        ", ".join(f"{n} {state.upper()}" for state, n in sorted(rest.items())))

    def _report_fail_open(self) -> None:
        if self._control is None:
            return
        now = self._control.view().fail_open
        for name in sorted(now - self._fail_open):
            log.error("health: every backend of service %s is down: FAILING OPEN, all of them keep taking "
                      "new connections (on_all_down = fail_open). Check the backends and the check itself.", name)
        for name in sorted(self._fail_open - now):
            log.warning("health: service %s no longer fails open", name)
        self._fail_open = now

    # -- reading (API, metrics) ---------------------------------------------------------

    def details(self) -> dict[str, dict[str, Any]]:
        """Probe key -> its state, counters, last result and check (from the worker)."""
        return self.worker.details()

    @property
    def stats(self) -> LoopStats:
        return self.worker.stats

    @property
    def latency(self) -> dict[tuple[str, str], Latency]:
        return self.worker.latency

    @property
    def failures(self) -> list[Failure]:
        """The newest failed checks, oldest first."""
        return list(self.worker.failures)

    def service_probes(self, svc: Service) -> tuple[Probe | None, ...]:
        """``probes_of(svc)``, from what the manager worked out already when it can."""
        seen = self._seen.get(svc.name)
        return seen[1] if seen is not None and seen[0] is svc else probes_of(svc)


def from_config(cfg: Any) -> HealthManager | None:
    """The daemon's health room from its config (``[health]``), or None when disabled.
    The probe tunnel is set up by the manager's thread once started; if that
    fails it is logged, tunnel probes report that they cannot run (and change
    nothing), direct probes work as usual."""
    h = cfg.health
    if not h.enabled:
        return None
    tunnel, error = None, "the probe tunnel is disabled (health.tunnel = false)"
    if h.tunnel:
        from l4lb.datapath.probes import ProbeTunnel, TunnelConfig  # BCC: only when really starting

        tunnel, error = ProbeTunnel(TunnelConfig(
            bpffs=cfg.datapath.bpffs, device=h.tunnel_device, mtu=h.tunnel_mtu, mark_base=h.mark,
            table=h.route_table, rule_priority=h.rule_priority)), None
    return HealthManager(cfg.state_dir, tunnel=tunnel, tunnel_error=error, max_in_flight=h.max_in_flight,
                         damping=Damping(h.flap_window, h.flap_max_changes, h.flap_hold))
