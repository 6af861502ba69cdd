"""The pure desired→desired diff used by dry runs."""

from __future__ import annotations

import json

from l4lb.models import DesiredState
from l4lb.plan import diff


def doc(*services: dict) -> DesiredState:
    return DesiredState.model_validate({"services": list(services)})


WEB = {"name": "web", "vip": "198.51.100.1", "port": 80,
       "backends": [{"address": "192.0.2.1"}, {"address": "192.0.2.2", "weight": 50}]}
DNS = {"name": "dns", "vip": "2001:db8::53", "port": 53, "protocol": "udp", "backends": [{"address": "2001:db8::1"}]}


def test_identical_states_give_an_empty_plan() -> None:
    p = diff(doc(WEB, DNS), doc(WEB, DNS))
    assert p.empty and p.unchanged == ("dns", "web") and p.summary()["services_unchanged"] == 2


def test_order_is_not_a_change() -> None:
    rev = {**WEB, "backends": list(reversed(WEB["backends"]))}
    assert diff(doc(WEB, DNS), doc(DNS, rev)).empty


def test_create_and_delete() -> None:
    p = diff(doc(WEB), doc(DNS))
    assert [(s.action, s.name) for s in p.services] == [("create", "dns"), ("delete", "web")]
    create = p.services[0]
    assert {c.field: c.new for c in create.changes}["vip"] == "2001:db8::53"
    assert [(b.action, b.address, b.port) for b in create.backends] == [("create", "2001:db8::1", 53)]
    delete = p.services[1]
    assert [(b.action, b.address) for b in delete.backends] == [("delete", "192.0.2.1"), ("delete", "192.0.2.2")]
    assert p.summary() == {"services_created": 1, "services_updated": 0, "services_deleted": 1,
                           "services_unchanged": 0, "backends_added": 1, "backends_changed": 0, "backends_removed": 2}


def test_backend_changes() -> None:
    new = {**WEB, "backends": [{"address": "192.0.2.1", "state": "draining"}, {"address": "192.0.2.3"}]}
    p = diff(doc(WEB), doc(new))
    (svc,) = p.services
    assert svc.action == "update" and svc.changes == ()
    got = {(b.action, b.address): {c.field: (c.old, c.new) for c in b.changes} for b in svc.backends}
    assert got[("update", "192.0.2.1")] == {"state": ("active", "draining")}
    assert ("delete", "192.0.2.2") in got
    assert got[("create", "192.0.2.3")]["weight"] == (None, 100)


def test_service_field_and_option_changes() -> None:
    new = {**WEB, "vip": "198.51.100.2", "options": {"hash_src_port": False}}
    (svc,) = diff(doc(WEB), doc(new)).services
    assert {c.field: (c.old, c.new) for c in svc.changes} == {
        "vip": ("198.51.100.1", "198.51.100.2"), "options.hash_src_port": (True, False)}


def test_dnat_port_change_is_a_new_backend_identity() -> None:
    a = {**WEB, "options": {"l4_dnat": True}, "backends": [{"address": "192.0.2.1", "port": 8080}]}
    b = {**WEB, "options": {"l4_dnat": True}, "backends": [{"address": "192.0.2.1", "port": 8081}]}
    (svc,) = diff(doc(a), doc(b)).services
    assert sorted((x.action, x.port) for x in svc.backends) == [("create", 8081), ("delete", 8080)]


def test_plan_is_json_serialisable() -> None:
    p = diff(doc(WEB), doc(DNS, {**WEB, "port": 8080}))
    text = json.dumps(p.to_dict())
    assert json.loads(text)["summary"]["services_created"] == 1


def test_to_json_is_exactly_the_dict_form() -> None:
    """The API writes a whole-document answer with to_json (no dict per backend)."""
    drained = {**WEB, "backends": [{"address": "192.0.2.1", "state": "draining"}, {"address": "192.0.2.3"}]}
    odd = {**DNS, "name": "d.n-s_1", "options": {"hash_src_port": False}}
    for old, new in [(doc(), doc(WEB, DNS)), (doc(WEB, DNS), doc()), (doc(WEB, DNS), doc(drained, odd)),
                     (doc(WEB), doc(WEB)), (doc(WEB, DNS), doc(drained, DNS))]:
        p = diff(old, new)
        assert json.loads(p.to_json()) == p.to_dict()


def test_changes_in_place_are_the_changes_matched_by_identity() -> None:
    """A drain keeps its service's other backends (same objects, same places) and the
    other services (same objects): the diff looks at those pairs only, with the same plan."""
    from l4lb.models import BackendState
    from l4lb.plan import _matched_changes

    old = doc(WEB, DNS, {**WEB, "name": "www", "port": 81})
    web = old.services[0]
    for b0 in (web.backends[1].model_copy(update={"state": BackendState.draining, "weight": 7}),  # in place
               web.backends[1].model_copy(update={"port": 8080})):  # another identity: matched instead
        new_web = web.model_copy(update={"backends": [web.backends[0], b0]})
        new = DesiredState.model_construct(services=[new_web, *old.services[1:]])
        p = diff(old, new)
        assert [s.name for s in p.services] == ["web"] and p.unchanged == ("dns", "www")
        assert p.services[0].backends == _matched_changes(web, new_web) != ()
    assert diff(old, DesiredState.model_construct(services=list(reversed(old.services)))).empty
