"""The BGP room: subscriber of the control core → its own worker thread → the speaker.

``on_view`` runs in the writer's thread under the control lock: it only keeps
the view and wakes the worker. The worker plans (l4lb/bgp/plan.py), renders
and hands the result to the speaker, reads the speaker's session states every
``poll_interval``, and wakes at a drain's withdraw deadline. Until the first
converged view arrives it changes nothing: the speaker keeps announcing what
the previous l4lbd left, so a restart withdraws nothing.

The status it reports (``status()``) is a snapshot: API handlers never wait
for the speaker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from l4lb.bgp import plan as planner
from l4lb.bgp.bird import Session, SpeakerError, render
from l4lb.bgp.box import BOX, BoxState, BoxStore, Drain
from l4lb.bgp.config import BgpSection
from l4lb.view import View

log = logging.getLogger("l4lbd.bgp")

ANNOUNCED, WITHDRAWN, PENDING, ERROR = "announced", "withdrawn", "pending", "error"


class Speaker(Protocol):
    def configure(self, text: str) -> bool: ...
    def sessions(self) -> list[Session]: ...
    def routes(self) -> set[str]: ...


@dataclass
class PrefixStatus:
    prefix: str
    services: tuple[str, ...]
    state: str                 # announced / withdrawn / pending / error
    reason: str                # planner's reason (serving, draining, no usable backend: web, ...)
    communities: tuple[str, ...] = ()
    med: int | None = None
    prepend: int = 0
    withdraw_at: float | None = None
    since: float = field(default_factory=time.time)  # last change of state or reason


class Reconciler:
    def __init__(self, cfg: BgpSection, speaker: Speaker, box: BoxStore, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._speaker = speaker
        self._box_store = box
        self._box = box.load()
        self._clock = clock
        self._cond = threading.Condition()
        self._view: View | None = None
        self._dirty = False
        self._stop = False
        self._prefixes: dict[str, PrefixStatus] = {}
        self._sessions: list[Session] = []
        self._error: str | None = None
        self._last_change: float | None = None
        self._applied: str | None = None   # the text the speaker runs (as far as we know)
        self._retry = False                # the last hand-over failed: try again at the next poll
        self._thread: threading.Thread | None = None

    # -- the control core's side --------------------------------------------------------

    def on_view(self, view: View) -> None:
        with self._cond:
            self._view = view
            self._dirty = True
            self._cond.notify()

    # -- operator actions (API) ---------------------------------------------------------

    def drain(self, services: list[str] | None = None, delay: float | None = None) -> BoxState:
        now = self._clock()
        d = Drain(now, self.cfg.drain_delay if delay is None else delay)
        return self._change_box(lambda b: _each(b, services, lambda s, k: s.with_drain(k, d)))

    def undrain(self, services: list[str] | None = None) -> BoxState:
        return self._change_box(lambda b: _each(b, services, lambda s, k: s.with_drain(k, None)))

    def _change_box(self, fn: Callable[[BoxState], BoxState]) -> BoxState:
        with self._cond:
            new = fn(self._box)
            self._box_store.save(new)  # durable before it is acted on
            self._box = new
            self._dirty = True
            self._cond.notify()
            return new

    def update_config(self, cfg: BgpSection) -> None:
        with self._cond:
            self.cfg = cfg
            self._dirty = True
            self._cond.notify()

    # -- worker -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="l4lb-bgp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker. Nothing is withdrawn: the speaker keeps announcing."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        next_poll = 0.0
        while True:
            with self._cond:
                deadline = planner.next_deadline(self._planned(), self._clock())
                wait = max(0.0, next_poll - time.monotonic())
                if deadline is not None:
                    wait = min(wait, deadline + 0.01)
                if not self._dirty and not self._stop:
                    self._cond.wait(wait)
                if self._stop:
                    return
                view, box, cfg, dirty = self._view, self._box, self.cfg, self._dirty
                self._dirty = False
            try:
                # A failed hand-over (BIRD busy, birdc timed out under load) is retried every
                # poll_interval: nothing else would ask again until the next change.
                if view is not None and (dirty or deadline is not None or self._retry) \
                        and self._reconcile(view, box, cfg):
                    next_poll = 0.0  # the speaker has news: read it back at once
                if time.monotonic() >= next_poll:
                    self._poll()
                    next_poll = time.monotonic() + cfg.poll_interval
            except Exception as e:  # noqa: BLE001 - the worker must outlive any one failure
                log.exception("BGP reconcile failed")
                self._error = str(e)
                time.sleep(min(cfg.poll_interval, 1.0))
                with self._cond:
                    self._dirty = True

    def _planned(self) -> tuple[planner.Prefix, ...] | None:
        if self._view is None:
            return None
        return planner.plan(self._view, self._box, self.cfg, self._clock())

    def reconcile_once(self) -> None:
        """One planning pass in the caller's thread (tests, ``--detach``)."""
        with self._cond:
            view, box, cfg = self._view, self._box, self.cfg
        if view is not None:
            self._reconcile(view, box, cfg)
        self._poll()

    def _reconcile(self, view: View, box: BoxState, cfg: BgpSection) -> bool:
        """Plan and hand the result to the speaker; True if the speaker was told something new."""
        prefixes = planner.plan(view, box, cfg, self._clock())
        if prefixes is None:
            return False  # not converged: don't know, change nothing
        changed = False
        text = render(cfg, prefixes)
        self._retry = True
        try:
            changed = self._speaker.configure(text)
            self._applied, self._error, self._retry = text, None, False
            if changed:
                log.info("BGP: %s", "; ".join(f"{p.prefix} {'announce' if p.announce else 'withdraw'} "
                                              f"({p.reason})" for p in prefixes) or "nothing to announce")
        except SpeakerError as e:
            log.error("BGP: %s", e)
            self._error = str(e)
        self._record(prefixes, failed=self._error is not None)
        return changed

    def _record(self, prefixes: tuple[planner.Prefix, ...], failed: bool) -> None:
        now = self._clock()
        new: dict[str, PrefixStatus] = {}
        for p in prefixes:
            state = (ERROR if failed else PENDING) if p.announce else WITHDRAWN
            st = PrefixStatus(p.prefix, p.services, state, p.reason, p.communities, p.med, p.prepend,
                              p.withdraw_at, now)
            old = self._prefixes.get(p.prefix)
            if old is not None and (old.state == state or (state == PENDING and old.state == ANNOUNCED)):
                # An announced prefix stays so until a poll says otherwise, whatever its reason now
                # (serving -> failing open changes nothing at the speaker, and no poll follows at once).
                st.state = old.state
                if old.reason == st.reason:
                    st.since = old.since   # unchanged
                else:
                    self._last_change = now
            else:
                self._last_change = now
            new[p.prefix] = st
        if self._prefixes.keys() - new.keys():
            self._last_change = now  # a deleted service's VIP went with the file
        self._prefixes = new

    def _poll(self) -> None:
        """Session states, and which planned prefixes the speaker really holds."""
        try:
            sessions = self._speaker.sessions()
            held = self._speaker.routes()
        except SpeakerError as e:
            self._error = str(e)
            return
        self._sessions = sessions
        up = {4 if "." in s.peer else 6 for s in sessions if s.established}
        now = self._clock()
        for p in self._prefixes.values():
            if p.state in (PENDING, ANNOUNCED):
                fam = 6 if ":" in p.prefix else 4
                state = ANNOUNCED if p.prefix in held and (fam in up or self._carried(fam, sessions)) else PENDING
                if state != p.state:
                    p.state, p.since, self._last_change = state, now, now

    def _carried(self, fam: int, sessions: list[Session]) -> bool:
        """A peer of the other family carries this one too when a next hop for it is configured."""
        nh = self.cfg.next_hop_v6 if fam == 6 else self.cfg.next_hop_v4
        return nh is not None and any(s.established for s in sessions)

    # -- read side ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self._clock()
        box = self._box
        d = box.drains.get(BOX)
        return {
            "speaker": self.cfg.speaker,
            "local_as": self.cfg.local_as,
            "router_id": str(self.cfg.router_id),
            "error": self._error,
            "last_change": self._last_change,
            "box": {"state": "active" if d is None else ("drained" if d.withdrawn(now) else "draining"),
                    "drains": {k: {"since": v.since, "withdraw_at": v.withdraw_at,
                                   "state": "drained" if v.withdrawn(now) else "draining"}
                               for k, v in sorted(box.drains.items())}},
            "sessions": [asdict(s) | {"established": s.established} for s in self._sessions],
            "prefixes": [asdict(p) for p in sorted(self._prefixes.values(), key=lambda p: p.prefix)],
        }


def _each(box: BoxState, services: list[str] | None, fn: Callable[[BoxState, str], BoxState]) -> BoxState:
    for key in services or [BOX]:
        box = fn(box, key)
    return box


def withdraw_all(cfg: BgpSection, speaker: Speaker) -> None:
    """``l4lbd --detach``: the box stops for good, so it announces nothing (sessions stay up)."""
    speaker.configure(render(cfg, ()))
