"""The control core behind the API, with a recording datapath passed in (unit level).

End-to-end behaviour (real daemon, real BPF maps, unix socket) is in
test_api.py and test_daemon.py; here are the transaction rules themselves:
validation before anything, preconditions, store+datapath all-or-nothing,
rollback re-applying the old set, limits, rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from l4lb.backendref import BackendRef
from l4lb.canonical import canonical
from l4lb.control import Control
from l4lb.issues import ApplyFailed, Conflict, Invalid, NotFound, PreconditionFailed
from l4lb.limits import Limits
from l4lb.preconditions import Precondition, service_etag, state_etag
from l4lb.stats import RateTracker
from l4lb.models import Backend, BackendState, DesiredState, Service
from l4lb.store import Store


@dataclass
class RecordingDatapath:
    applied: list[list[str]] = field(default_factory=list)
    fail_on: set[int] = field(default_factory=set)  # 1-based apply calls that raise
    counters: dict = field(default_factory=dict)

    def apply(self, services: Sequence[Service]) -> None:
        self.applied.append(sorted(s.name for s in services))
        if len(self.applied) in self.fail_on:
            raise RuntimeError(f"map write refused (call {len(self.applied)})")

    def attach(self, interfaces: Sequence[str], mode: str = "auto") -> dict[str, str]:
        return {i: "generic" for i in interfaces}

    def detach(self, interfaces: Sequence[str]) -> None:
        pass

    def stats(self) -> Any:
        @dataclass
        class S:
            services: dict
            backends: dict
            reasons: dict

        return S(self.counters.get("services", {}), self.counters.get("backends", {}), self.counters.get("reasons", {}))

    def status(self) -> dict:
        return {"program_id": 7, "maps": {"services": {"used": 0, "max": 10}}}


def svc(name: str, vip: str = "198.51.100.1", port: int = 80, backends: Sequence[str | dict] = ("192.0.2.1",),
        **kw: Any) -> Service:
    return Service.model_validate({"name": name, "vip": vip, "port": port, **kw,
                                   "backends": [b if isinstance(b, dict) else {"address": b} for b in backends]})


@pytest.fixture
def dp() -> RecordingDatapath:
    return RecordingDatapath()


@pytest.fixture
def control(tmp_path: Path, dp: RecordingDatapath) -> Control:
    c = Control(Store(tmp_path / "s.db"), dp, Limits(max_services=3, max_backends_per_service=4, max_backends_total=8))
    c.converge()
    return c


def test_put_creates_then_replaces_idempotently(control: Control, dp: RecordingDatapath) -> None:
    c, created = control.put_service(svc("web"))
    assert created and c.revision == 1 and c.changed
    c, created = control.put_service(svc("web"))
    assert not created and not c.changed and c.revision == 1
    assert dp.applied == [[], ["web"]]  # the no-op did not touch the datapath


def test_datapath_failure_changes_nothing_and_reapplies_old(tmp_path: Path, control: Control,
                                                            dp: RecordingDatapath) -> None:
    control.put_service(svc("web"))
    dp.fail_on = {3}
    with pytest.raises(ApplyFailed, match="map write refused.*still hold revision 1"):
        control.put_service(svc("api", port=443))
    assert dp.applied[-2:] == [["api", "web"], ["web"]]  # tried, then the old set again
    assert control.snapshot()[0] == 1 and [s.name for s in control.snapshot()[1].services] == ["web"]
    assert Store(tmp_path / "s.db").read().revision == 1  # and on disk
    assert control.ready


def test_a_change_the_maps_cannot_hold_is_refused_as_invalid(tmp_path: Path, control: Control,
                                                             dp: RecordingDatapath,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """DatapathFull (the maps cannot hold the change at every moment) is the
    request's fault: 422, and the old set re-applied, as for any failure."""
    from l4lb.datapath.config import DatapathFull

    control.put_service(svc("web"))
    real = dp.apply

    def full_once(services: Sequence[Service]) -> None:
        monkeypatch.setattr(dp, "apply", real)
        real(services)
        raise DatapathFull("the change does not fit the datapath's maps")

    monkeypatch.setattr(dp, "apply", full_once)
    with pytest.raises(Invalid, match="does not fit.*nothing was changed") as e:
        control.put_service(svc("web", backends=["192.0.2.9"]))
    assert e.value.status == 422
    assert dp.applied[-1] == ["web"] and control.snapshot()[0] == 1 and control.ready


def test_post_apply_hook_failure_rolls_back_store_and_datapath(tmp_path: Path, dp: RecordingDatapath) -> None:
    fail = {"on": False}

    def hook() -> None:
        if fail["on"]:
            raise RuntimeError("injected")

    c = Control(Store(tmp_path / "s.db"), dp, Limits(), post_apply_hook=hook)
    c.converge()
    c.put_service(svc("web"))
    fail["on"] = True
    with pytest.raises(ApplyFailed, match="injected"):
        c.replace_state(DesiredState(services=[svc("other", port=81)]))
    assert dp.applied[-1] == ["web"]
    assert Store(tmp_path / "s.db").read().state == c.snapshot()[1]


def test_failed_restore_marks_degraded_until_healed(control: Control, dp: RecordingDatapath) -> None:
    control.put_service(svc("web"))
    dp.fail_on = {3, 4}
    with pytest.raises(ApplyFailed):
        control.put_service(svc("api", port=443))
    assert not control.ready and "could not be restored" in (control.degraded or "")
    assert "DEGRADED" in control.summary()
    assert control.heal() and control.ready and dp.applied[-1] == ["web"]


def test_conflicting_vip_port_proto_is_409(control: Control) -> None:
    control.put_service(svc("web"))
    with pytest.raises(Conflict, match="already used by service 'web'") as e:
        control.put_service(svc("web2"))
    assert e.value.errors[0].loc == ("body", "vip")
    control.put_service(svc("web-udp", protocol="udp"))  # same VIP:port, other protocol: fine


def test_limits(control: Control) -> None:
    with pytest.raises(Invalid, match="would have 5 backends; limits.max_backends_per_service is 4"):
        control.put_service(svc("web", backends=[f"192.0.2.{i}" for i in range(1, 6)]))
    for i in range(3):
        control.put_service(svc(f"s{i}", port=100 + i))
    with pytest.raises(Invalid, match="4 services exceed limits.max_services = 3") as e:
        control.put_service(svc("s3", port=103))
    assert e.value.errors[0].loc == ("path", "name")
    control.put_service(svc("s0", port=100, backends=[f"192.0.2.{i}" for i in range(1, 5)]))
    control.put_service(svc("s1", port=101, backends=[f"192.0.2.{i}" for i in range(1, 4)]))
    with pytest.raises(Invalid, match="9 backends in all exceed the datapath's 8 backend slots"):
        control.put_backend("s2", BackendRef.parse("192.0.2.9"), Backend(address="192.0.2.9"))


def test_whole_document_limits_are_located(control: Control) -> None:
    doc = DesiredState(services=[svc("a", backends=[f"192.0.2.{i}" for i in range(1, 6)])])
    with pytest.raises(Invalid) as e:
        control.replace_state(doc)
    assert e.value.errors[0].loc == ("body", "services", 0, "backends")


def test_set_limits_refuses_when_state_exceeds(control: Control) -> None:
    control.put_service(svc("a", backends=["192.0.2.1", "192.0.2.2"]))
    with pytest.raises(Invalid, match="exceeds the new limits"):
        control.set_limits(Limits(max_backends_per_service=1))
    assert control.limits.max_backends_per_service == 4
    control.set_limits(Limits(max_services=1))
    assert control.limits.max_services == 1


def test_preconditions(control: Control) -> None:
    control.put_service(svc("web"))
    current = service_etag(control.get_service("web"))
    with pytest.raises(PreconditionFailed, match="does not match the current ETag"):
        control.put_service(svc("web", backends=["192.0.2.7"]), Precondition(if_match=("s-stale",)))
    c, _ = control.put_service(svc("web", backends=["192.0.2.7"]), Precondition(if_match=(current,)))
    assert c.changed
    with pytest.raises(PreconditionFailed, match="already exists"):
        control.put_service(svc("web"), Precondition(if_none_match=("*",)))
    with pytest.raises(PreconditionFailed, match="does not exist"):
        control.put_service(svc("new", port=81), Precondition(if_match=("*",)))
    control.put_service(svc("new", port=81), Precondition(if_none_match=("*",)))
    with pytest.raises(PreconditionFailed):
        control.replace_state(DesiredState(), Precondition(if_match=(state_etag(1),)))
    control.replace_state(DesiredState(), Precondition(if_match=(state_etag(control.revision),)))
    assert control.snapshot()[1] == DesiredState()


def test_service_etag_ignores_other_services(control: Control) -> None:
    control.put_service(svc("web"))
    tag = service_etag(control.get_service("web"))
    control.put_service(svc("other", port=81))
    assert service_etag(control.get_service("web")) == tag
    control.delete_service("web", Precondition(if_match=(tag,)))


def test_backend_operations(control: Control) -> None:
    control.put_service(svc("web", backends=["192.0.2.1", "192.0.2.2"]))
    c, b = control.patch_backend("web", BackendRef.parse("192.0.2.1"), state=BackendState.draining)
    assert b.state is BackendState.draining and b.effective_weight == 0
    _, created, b = control.put_backend("web", BackendRef.parse("192.0.2.3:80"), Backend(address="192.0.2.3", weight=5))
    assert created and b.weight == 5
    _, created, _ = control.put_backend("web", BackendRef.parse("192.0.2.3"), Backend(address="192.0.2.3", weight=6))
    assert not created
    assert [x.weight for x in control.get_service("web").backends] == [100, 100, 6]
    control.delete_backend("web", BackendRef.parse("192.0.2.2"))
    with pytest.raises(NotFound, match="has no backend 192.0.2.2"):
        control.delete_backend("web", BackendRef.parse("192.0.2.2"))
    with pytest.raises(NotFound, match="no service named 'nope'"):
        control.patch_backend("nope", BackendRef.parse("192.0.2.1"), weight=1)


def test_backend_family_and_port_checks(control: Control) -> None:
    control.put_service(svc("web"))
    control.put_service(svc("web6", vip="2001:db8:100::1", backends=["2001:db8::1"]))
    with pytest.raises(Invalid, match="backend 192.0.2.5 is IPv4 but VIP 2001:db8:100::1 is IPv6"):
        control.put_backend("web6", BackendRef.parse("192.0.2.5"), Backend(address="192.0.2.5"))
    control.put_backend("web", BackendRef.parse("2001:db8::5"), Backend(address="2001:db8::5"))  # 4in6
    with pytest.raises(Invalid, match="set options.l4_dnat"):
        control.put_backend("web", BackendRef.parse("192.0.2.9:8080"), Backend(address="192.0.2.9"))


def test_dnat_backends_need_the_port_when_ambiguous(control: Control) -> None:
    control.put_service(svc("web", options={"l4_dnat": True},
                            backends=[{"address": "192.0.2.1", "port": 8080}, {"address": "192.0.2.1", "port": 8081}]))
    with pytest.raises(Invalid, match="on ports 8080, 8081; name one as address:port"):
        control.patch_backend("web", BackendRef.parse("192.0.2.1"), weight=1)
    _, b = control.patch_backend("web", BackendRef.parse("192.0.2.1:8081"), weight=1)
    assert (b.port, b.weight) == (8081, 1)


@pytest.mark.parametrize(("text", "addr", "port"), [
    ("192.0.2.1", "192.0.2.1", None), ("192.0.2.1:8080", "192.0.2.1", 8080),
    ("2001:db8::1", "2001:db8::1", None), ("[2001:db8::1]:53", "2001:db8::1", 53), ("[2001:db8::1]", "2001:db8::1", None),
])
def test_backend_ref_parse(text: str, addr: str, port: int | None) -> None:
    ref = BackendRef.parse(text)
    assert (str(ref.address), ref.port) == (addr, port)


@pytest.mark.parametrize("text", ["x", "192.0.2.1:0", "192.0.2.1:http", "[2001:db8::1", "[2001:db8::1]x", "999.1.1.1"])
def test_backend_ref_parse_errors(text: str) -> None:
    with pytest.raises(ValueError):
        BackendRef.parse(text)


def test_canonical_order() -> None:
    s = DesiredState(services=[svc("b", port=2, backends=["192.0.2.9", "192.0.2.10"]), svc("a", port=1)])
    c = canonical(s)
    assert [x.name for x in c.services] == ["a", "b"]
    assert [str(b.address) for b in c.services[1].backends] == ["192.0.2.9", "192.0.2.10"]  # numeric, not text
    assert canonical(c) is c


def test_dry_run_changes_nothing(control: Control, dp: RecordingDatapath) -> None:
    res = control.replace_state(DesiredState(services=[svc("web")]), dry_run=True)
    assert res.dry_run and res.changed and res.revision == 0 and res.plan.summary()["services_created"] == 1
    assert control.snapshot() == (0, DesiredState()) and dp.applied == [[]]


def test_stats_rates_between_samples(tmp_path: Path, dp: RecordingDatapath) -> None:
    now = [100.0]
    c = Control(Store(tmp_path / "s.db"), dp, Limits(), clock=lambda: now[0])
    c.converge()
    c.put_service(svc("web"))
    key = ("198.51.100.1", 80, "tcp")
    ident = ("192.0.2.1", 80)
    dp.counters = {"services": {key: {"packets": 10, "bytes": 1000}},
                   "backends": {(key, ident): {"packets": 10, "bytes": 1000}},
                   "reasons": {"tx": {"packets": 10, "bytes": 1000}, "pass_not_ip": {"packets": 3, "bytes": 60}}}
    first = c.stats()
    assert first["services"][0]["packets"] == 10 and first["services"][0]["pps"] is None
    now[0] += 2
    dp.counters["services"][key] = {"packets": 30, "bytes": 3000}
    dp.counters["backends"][(key, ident)] = {"packets": 30, "bytes": 3000}
    second = c.stats()
    s = second["services"][0]
    assert (s["pps"], s["bps"], second["rate_interval_seconds"]) == (10.0, 8000.0, 2.0)
    assert s["backends"][0]["pps"] == 10.0
    assert second["reasons"]["tx"]["pps"] == 0.0 and second["reasons"]["pass_not_ip"]["packets"] == 3
    now[0] += 0.1  # too soon for a new interval: rated against the last sample >= 1 s old
    assert c.stats()["rate_interval_seconds"] == 2.1

    c.put_service(svc("new", port=81))  # created after the base sample: its counters started at 0
    dp.counters["services"][("198.51.100.1", 81, "tcp")] = {"packets": 21, "bytes": 0}
    now[0] += 1
    assert next(s for s in c.stats()["services"] if s["name"] == "new")["pps"] == pytest.approx(21 / 1.1, abs=0.01)


def test_rate_tracker_ignores_counter_resets(tmp_path: Path, dp: RecordingDatapath) -> None:
    now = [0.0]
    c = Control(Store(tmp_path / "s.db"), dp, Limits(), clock=lambda: now[0])
    c.converge()
    c.put_service(svc("web"))
    key = ("198.51.100.1", 80, "tcp")
    dp.counters = {"services": {key: {"packets": 50, "bytes": 5000}}}
    c.sample()
    now[0] = 5
    dp.counters = {"services": {key: {"packets": 1, "bytes": 100}}}
    assert c.stats()["services"][0]["pps"] is None


def test_rate_tracker_min_age() -> None:
    t = RateTracker(min_age=1.0)
    t.observe(0.0, {})
    t.observe(0.5, {("x",): (1, 1)})  # too close: not kept
    assert t.base(0.9) is None and t.base(1.0)[0] == 0.0


def test_status_and_summary(control: Control) -> None:
    control.put_service(svc("web", backends=["192.0.2.1", {"address": "192.0.2.2", "state": "maintenance"}]))
    control.attach(["lbt0a"], "generic")
    st = control.status()
    assert st["revision"] == 1 and st["services"] == 1 and st["backends"] == 2
    assert st["backends_by_state"] == {"active": 1, "draining": 0, "maintenance": 1}
    assert st["interfaces"] == {"lbt0a": "generic"} and st["datapath"]["program_id"] == 7
    assert control.summary() == "revision 1: 1 services, 2 backends, interfaces lbt0a(generic)"


def test_healthy_for_the_watchdog(control: Control, dp: RecordingDatapath) -> None:
    import threading

    assert control.healthy(0.1)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with control._lock:  # a write that hangs
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    assert not control.healthy(0.1)
    release.set()
    t.join()
    control.put_service(svc("web"))
    dp.fail_on = {3, 4}
    with pytest.raises(ApplyFailed):
        control.put_service(svc("api", port=443))
    assert not control.healthy(0.1)  # degraded: let systemd restart us into a clean converge


def test_readyz_is_503_while_degraded(control: Control, dp: RecordingDatapath) -> None:
    """In-process (no daemon): the probe mirrors the control core's state."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette nudges towards httpx2
        from fastapi.testclient import TestClient

    from l4lb.api.app import create_app

    client = TestClient(create_app(control))
    assert client.get("/readyz").status_code == 200
    control.put_service(svc("web"))
    dp.fail_on = {3, 4}
    assert client.put("/v1/services/api", json={"vip": "198.51.100.1", "port": 443}).status_code == 500
    r = client.get("/readyz")
    assert r.status_code == 503 and "could not be restored" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200  # alive, just not consistent
    assert control.heal() and client.get("/readyz").status_code == 200


def test_subscribers_see_every_change_that_reached_the_datapath(control: Control, dp: RecordingDatapath) -> None:
    views = []
    control.subscribe(views.append)
    assert len(views) == 1 and views[0].converged  # the current view at once
    control.put_service(svc("a", backends=["192.0.2.1", "192.0.2.2"]))
    assert views[-1].revision == control.revision and [s.name for s in views[-1].effective] == ["a"]
    assert views[-1].serving() == {"a": False}  # nothing attached yet
    control.attach(["eth9"], "auto")
    assert views[-1].serving() == {"a": True} and views[-1].interfaces == {"eth9": "generic"}
    control.patch_backend("a", BackendRef.parse("192.0.2.1"), state=BackendState.draining)
    control.patch_backend("a", BackendRef.parse("192.0.2.2"), state=BackendState.maintenance)
    assert views[-1].serving() == {"a": False}  # no backend takes new connections
    n = len(views)
    dp.fail_on.add(len(dp.applied) + 1)
    with pytest.raises(ApplyFailed):
        control.delete_service("a")
    assert len(views) == n  # a failed write changed nothing and published nothing
    control.subscribe(lambda v: 1 / 0)  # a broken subscriber does not fail writes
    control.delete_service("a")
    assert views[-1].effective == ()
