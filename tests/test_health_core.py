"""Health checks, the pure core: check models, probe identities, the overlay
(desired + facts -> effective, by identity), the rise/fall/flap machine with a
fake clock, and the control core's runtime change path. The lab tests
(tests/test_health_lab.py) run the same code against real servers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from l4lb.backendref import BackendRef
from l4lb.control import Control
from l4lb.issues import ApplyFailed
from l4lb.limits import Limits
from l4lb.health.machine import Damping, ProbeState
from l4lb.health.overlay import Health, Overlay
from l4lb.health.targets import Timing, probes_of
from l4lb.models import BackendState, DesiredState, HealthCheck, Service
from l4lb.store import Store
from l4lb.view import View

VIP, VIP2 = "198.51.100.10", "198.51.100.11"


def svc(name: str, vip: str = VIP, port: int = 80, backends: Sequence[str | dict] = ("192.0.2.1", "192.0.2.2"),
        **kw: Any) -> Service:
    return Service.model_validate({"name": name, "vip": vip, "port": port, **kw,
                                   "backends": [b if isinstance(b, dict) else {"address": b} for b in backends]})


def errors_of(fn: Any) -> str:
    with pytest.raises(ValidationError) as e:
        fn()
    return str(e.value)


# --- the document ---------------------------------------------------------------------------


def test_check_validation_says_what_is_wrong() -> None:
    assert "type\n  Field required" in errors_of(lambda: HealthCheck.model_validate({}))
    assert "path applies to http/https checks, not tcp" in errors_of(lambda: HealthCheck(type="tcp", path="/"))
    assert "needs query" in errors_of(lambda: HealthCheck(type="udp-dns"))
    assert "timeout 3.0 s is longer than the interval 2.0 s" in errors_of(lambda: HealthCheck(type="tcp", timeout=3))
    assert "'2000' is not a status code" in errors_of(lambda: HealthCheck(type="http", expect_status="200,2000"))
    assert "printable ASCII" in errors_of(lambda: HealthCheck(type="http", path="/a\r\nX: y"))
    assert "tls_verify applies to https" in errors_of(lambda: HealthCheck(type="http", tls_verify=True))
    assert "needs method GET" in errors_of(lambda: HealthCheck(type="http", method="HEAD", body_contains="ok"))
    assert "is not a DNS name" in errors_of(lambda: HealthCheck(type="udp-dns", query="a..b"))
    # A backend override is checked against its service's check, with the backend's location.
    err = errors_of(lambda: svc("web", backends=["192.0.2.1", {"address": "192.0.2.2", "health": {"port": 81}}]))
    assert "backend 192.0.2.2: health: the service has no health check" in err
    err = errors_of(lambda: svc("web", health={"type": "tcp"},
                                backends=[{"address": "192.0.2.2", "health": {"path": "/x"}}]))
    assert "path applies to http/https checks, not tcp" in err


def test_documents_without_checks_keep_their_meaning_and_checks_round_trip() -> None:
    plain = svc("web")
    assert plain.health is None and probes_of(plain) == ()
    checked = svc("web", health={"type": "https", "path": "/healthz", "expect_status": "200,204", "interval": 1},
                  backends=["192.0.2.1", {"address": "192.0.2.2", "health": {"type": "none"}}])
    again = DesiredState.model_validate_json(DesiredState(services=[checked]).model_dump_json()).services[0]
    assert again == checked and probes_of(again) == probes_of(checked)
    assert probes_of(checked)[1] is None  # exempted


# --- probes: one per distinct check ---------------------------------------------------------------


def test_services_sharing_a_check_share_one_probe() -> None:
    tcp = {"type": "tcp", "via": "direct"}
    a = svc("a", health={**tcp, "interval": 1, "fall": 5})
    b = svc("b", vip=VIP2, health={**tcp, "interval": 3, "fall": 2})
    pa, pb = probes_of(a), probes_of(b)
    assert [p.key for p in pa] == [p.key for p in pb]  # direct: the VIP is not part of it
    assert pa[0].timing.merge(pb[0].timing) == Timing(1, 1.0, 2, 2)
    ta = probes_of(svc("a", health={"type": "tcp"}))
    tb = probes_of(svc("b", vip=VIP2, health={"type": "tcp"}))
    assert ta[0].key != tb[0].key and "vip=198.51.100.10" in ta[0].key  # tunnel: the VIP is part of the target
    o = probes_of(svc("a", health={"type": "http"}, backends=[{"address": "192.0.2.1", "health": {"port": 8080}}]))
    assert o[0].spec.port == 8080 and o[0].spec.dest == VIP


# --- the overlay ----------------------------------------------------------------------------------


def key(s: Service, i: int) -> str:
    p = probes_of(s)[i]
    assert p is not None
    return p.key


def test_overlay_drains_down_backends_and_keeps_everything_else_by_identity() -> None:
    checked = svc("web", health={"type": "tcp"}, backends=["192.0.2.1", "192.0.2.2", "192.0.2.3"])
    plain = svc("plain", vip=VIP2)
    ov = Overlay()
    eff = ov.effective([plain, checked])
    assert eff.services[0] is plain and eff.services[1] is checked
    ov.accept(eff)
    eff = ov.with_facts({key(checked, 0): Health.down})
    assert eff.changed == {"web"} and eff.services[0] is plain
    web = eff.services[1]
    assert [b.state for b in web.backends] == [BackendState.draining, BackendState.active, BackendState.active]
    assert web.maglev_weights()[("192.0.2.1", 80)] == 0
    ov.accept(eff)
    # A desired write that leaves these services alone gets the very same effective objects.
    again = ov.effective([plain, checked])
    assert again.services[1] is web and not again.changed
    # A health change of a probe nobody uses touches nothing.
    assert not ov.with_facts({"tcp direct 192.0.2.99:80": Health.down}).changed


def test_all_down_fail_open_keeps_all_and_says_so_fail_closed_takes_all_out() -> None:
    ops = dict(backends=["192.0.2.1", "192.0.2.2", {"address": "192.0.2.3", "state": "draining"}])
    open_ = svc("open", health={"type": "tcp"}, **ops)
    closed = svc("closed", vip=VIP2, health={"type": "tcp", "on_all_down": "fail_closed"}, **ops)
    ov = Overlay()
    ov.accept(ov.effective([closed, open_]))
    # The drained backend does not count: two usable ones, both down.
    facts = {key(s, i): Health.down for s in (open_, closed) for i in (0, 1)}
    eff = ov.with_facts(facts)
    assert eff.fail_open == {"open"}
    assert eff.services[1] is open_
    assert all(w == 0 for w in eff.services[0].maglev_weights().values())
    ov.accept(eff)
    # Desired writes that replace a service in its place (a drain) look at that one only,
    # and what fails open follows: here "open" gets a usable backend that is not down.
    closed2 = closed.model_copy(update={"port": 81})
    open2 = open_.model_copy(update={"backends": [*open_.backends[:2], open_.backends[2].model_copy(
        update={"state": BackendState.active})]})
    for services, touched, failing in (([closed2, open_], {"closed"}, {"open"}), ([closed2, open2], {"open"}, set())):
        eff = ov.effective(services)
        assert eff.touched == touched and eff.fail_open == failing
        assert eff.services == Overlay(ov.facts).effective(services).services  # as computed from scratch
        ov.accept(eff)
        assert ov.fail_open == failing
    ov.accept(ov.effective([closed, open_]))
    eff = ov.with_facts({key(open_, 0): Health.up})
    assert eff.fail_open == frozenset() and eff.changed == {"open"}
    assert eff.services[1].maglev_weights() == {("192.0.2.1", 80): 100, ("192.0.2.2", 80): 0, ("192.0.2.3", 80): 0}


# --- rise, fall, flaps ------------------------------------------------------------------------------


def test_rise_fall_from_unknown_and_from_a_restored_state() -> None:
    t = [0.0]
    st = ProbeState("k", Timing(1, 0.5, rise=2, fall=3))

    def obs(ok: bool) -> Any:
        t[0] += 1
        return st.observe(ok, None if ok else "connect: connection refused", 0.001, t[0], 1000 + t[0])

    assert obs(True).new is Health.up                    # unknown -> up on the first success
    assert obs(False) is None and obs(False) is None
    tr = obs(False)
    assert tr.new is Health.down and tr.reason == "3 consecutive failures: connect: connection refused"
    assert obs(True) is None and obs(True).new is Health.up and st.since == 1006
    restored = ProbeState("k", Timing(1, 0.5, rise=2, fall=3), state=Health.down, since=5.0)
    assert restored.observe(True, None, 0.001, 1, 1) is None   # a restored down needs rise successes
    assert restored.observe(True, None, 0.001, 2, 2).new is Health.up


def test_flapping_is_held_down_and_visible() -> None:
    damping = Damping(window=60, max_changes=3, hold=100)
    st = ProbeState("k", Timing(1, 0.5, rise=1, fall=1), damping, state=Health.up)
    now = 0.0
    changes = []
    for ok in (False, True, False, True):
        now += 1
        tr = st.observe(ok, None if ok else "x", 0.001, now, now)
        changes.append((tr.old.value, tr.new.value) if tr else None)
    # The fourth change within the window is one too many: held down instead of up.
    assert changes == [("up", "down"), ("down", "up"), ("up", "down"), ("down", "down")]
    assert st.state is Health.down and "flapping: 4 changes in 60 s, held down for 100 s" in st.reason
    assert st.to_dict(now)["held_down_until"] == now + 100
    assert st.observe(True, None, 0.001, now + 50, now + 50) is None  # still held
    assert st.observe(True, None, 0.001, now + 101, now + 101).new is Health.up


# --- the control core's runtime change path -----------------------------------------------------------


@dataclass
class ObjectsDatapath:
    """Records the service objects of every apply (the real datapath skips them by identity)."""

    applied: list[list[Service]] = field(default_factory=list)
    fail_next: bool = False

    def apply(self, services: Sequence[Service]) -> None:
        self.applied.append(list(services))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("map write refused")

    def attach(self, interfaces: Sequence[str], mode: str = "auto") -> dict[str, str]:
        return {}

    def detach(self, interfaces: Sequence[str]) -> None:
        pass

    def stats(self) -> Any:
        return None

    def status(self) -> dict:
        return {}


def test_set_health_changes_the_datapath_not_the_document(tmp_path: Path) -> None:
    dp = ObjectsDatapath()
    web = svc("web", health={"type": "tcp"})
    down = key(web, 1)
    # Facts restored from the last run are in force from the first converge on.
    control = Control(Store(tmp_path / "s.db"), dp, Limits(), overlay=Overlay({down: Health.down}))
    views: list[View] = []
    control.subscribe(views.append)
    control.converge()
    other = svc("other", vip=VIP2)
    control.put_service(other)
    control.put_service(web)
    in_force = dp.applied[-1]
    assert in_force[0] is other and in_force[1].backends[1].state is BackendState.draining
    revision = control.revision
    assert control.set_health({down: Health.up}) == {"web"}
    assert dp.applied[-1][0] is other and dp.applied[-1][1] is web     # back to the desired object itself
    assert control.revision == revision and views[-1].runtime == 1 and views[-1].revision == revision
    assert control.set_health({down: Health.up}) == frozenset() and len(views) == 5  # no change, no View
    # A failed apply changes nothing: the overlay still describes what is in force.
    dp.fail_next = True
    with pytest.raises(RuntimeError):
        control.set_health({down: Health.down})
    assert control.health("web", 1) == "up" and control.view().effective[1] is web
    # Desired writes keep applying the overlay.
    control.set_health({down: Health.down})
    control.patch_backend("web", BackendRef.parse("192.0.2.1"), weight=50)
    assert [b.state for b in dp.applied[-1][1].backends] == [BackendState.active, BackendState.draining]
    with pytest.raises(ApplyFailed):
        dp.fail_next = True
        control.put_service(svc("third", vip="198.51.100.12"))
    assert dp.applied[-1][1].backends[1].state is BackendState.draining  # the rollback, overlay included
