"""What changes between two desired states: a pure diff for dry runs and API answers.

Services are matched by name and backends by identity (address, effective
port), so reordering a list is not a change. The plan describes the document;
how the datapath turns it into map writes is the datapath's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter
from typing import Any, Literal

from l4lb.inplace import replaced_at
from l4lb.models import Backend, DesiredState, Service

Action = Literal["create", "update", "delete"]


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: Any
    new: Any

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class BackendChange:
    action: Action
    address: str
    port: int
    changes: tuple[FieldChange, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "address": self.address,
            "port": self.port,
            "changes": _changes_dicts(self.changes),
        }


@lru_cache(maxsize=4096)
def _changes_dicts(changes: tuple[FieldChange, ...]) -> list[dict[str, Any]]:
    # The same few tuples (from _field_changes) repeat over 100,000 backends; the
    # shared lists are only ever serialised, never changed.
    return [c.to_dict() for c in changes]


@dataclass(frozen=True)
class ServiceChange:
    action: Action
    name: str
    changes: tuple[FieldChange, ...] = ()          # service-level fields
    backends: tuple[BackendChange, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "name": self.name,
            "changes": [c.to_dict() for c in self.changes],
            "backends": [b.to_dict() for b in self.backends],
        }


@dataclass(frozen=True)
class Plan:
    services: tuple[ServiceChange, ...] = ()
    unchanged: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not self.services

    def summary(self) -> dict[str, int]:
        count = {a: sum(1 for s in self.services if s.action == a) for a in ("create", "update", "delete")}
        backends = [b for s in self.services for b in s.backends]
        return {
            "services_created": count["create"],
            "services_updated": count["update"],
            "services_deleted": count["delete"],
            "services_unchanged": len(self.unchanged),
            "backends_added": sum(1 for b in backends if b.action == "create"),
            "backends_changed": sum(1 for b in backends if b.action == "update"),
            "backends_removed": sum(1 for b in backends if b.action == "delete"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "empty": self.empty,
            "summary": self.summary(),
            "services": [s.to_dict() for s in self.services],
        }

    def to_json(self) -> str:
        """``json.dumps(self.to_dict())`` (compact) without building a dict per
        backend: the plan of a 100,000-backend document is ~20 MB of them."""
        services = []
        for s in self.services:
            backends = ",".join(
                # Addresses are IP text and actions literals: nothing to escape.
                f'{{"action":"{b.action}","address":"{b.address}","port":{b.port},"changes":{_changes_json(b.changes)}}}'
                for b in s.backends)
            services.append(f'{{"action":"{s.action}","name":{json.dumps(s.name)},'
                            f'"changes":{_changes_json(s.changes)},"backends":[{backends}]}}')
        summary = json.dumps(self.summary(), separators=(",", ":"))
        return f'{{"empty":{json.dumps(self.empty)},"summary":{summary},"services":[{",".join(services)}]}}'


@lru_cache(maxsize=4096)
def _changes_json(changes: tuple[FieldChange, ...]) -> str:
    return json.dumps(_changes_dicts(changes), separators=(",", ":"))


def _jsonable(v: Any) -> Any:
    if hasattr(v, "value"):  # enums
        return v.value
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _backend_changes(svc_old: Service, svc_new: Service) -> tuple[BackendChange, ...]:
    if len(svc_old.backends) == len(svc_new.backends) and svc_old.port == svc_new.port:
        # The same backends in the same places, most the same objects (a drain): pairwise.
        out: list[tuple[Any, BackendChange]] = []
        for a, b in zip(svc_old.backends, svc_new.backends):
            if a is b:
                continue
            if a.address != b.address or a.port != b.port:
                break
            ch = _fields(a, b)
            if ch:
                port = a.port or svc_old.port
                out.append(((a.address.version, a.address.packed, port),
                            BackendChange("update", _compressed(a.address), port, ch)))
        else:
            return tuple(c for _, c in sorted(out, key=lambda kc: kc[0]))
    return _matched_changes(svc_old, svc_new)


def _matched_changes(svc_old: Service, svc_new: Service) -> tuple[BackendChange, ...]:
    # Keyed by (parsed address, effective port): the identity, without formatting
    # the address (a 100,000-backend document is diffed in one go).
    old = {(b.address, b.port or svc_old.port): b for b in svc_old.backends}
    new = {(b.address, b.port or svc_new.port): b for b in svc_new.backends}
    out: list[BackendChange] = []
    for key in sorted(old.keys() | new.keys(), key=lambda k: (k[0].version, k[0].packed, k[1])):
        addr, port = _compressed(key[0]), key[1]
        a, b = old.get(key), new.get(key)
        if a is None:
            out.append(BackendChange("create", addr, port, _fields(None, b)))
        elif b is None:
            out.append(BackendChange("delete", addr, port))
        else:
            ch = _fields(a, b)
            if ch:
                out.append(BackendChange("update", addr, port, ch))
    return tuple(out)


@lru_cache(maxsize=1 << 17)
def _compressed(addr: Any) -> str:
    return addr.compressed


def _fields(a: Backend | None, b: Backend) -> tuple[FieldChange, ...]:
    if a is None:
        return _field_changes(True, None, None, None, b.port, b.weight, b.state)
    return _field_changes(False, a.port, a.weight, a.state, b.port, b.weight, b.state)


@lru_cache(maxsize=4096)
def _field_changes(created: bool, *values: Any) -> tuple[FieldChange, ...]:
    # The same few (old, new) combinations repeat over thousands of backends, and
    # FieldChange is immutable: build each tuple once.
    out = []
    for i, name in enumerate(("port", "weight", "state")):
        va, vb = values[i], values[i + 3]
        if created or va != vb:
            out.append(FieldChange(name, _jsonable(va), _jsonable(vb)))
    return tuple(out)


def _service_fields(a: Service, b: Service) -> tuple[FieldChange, ...]:
    out = []
    for name in ("vip", "port", "protocol", "announce"):
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            out.append(FieldChange(name, _jsonable(va), _jsonable(vb)))
    for name in type(a.options).model_fields:
        va, vb = getattr(a.options, name), getattr(b.options, name)
        if va != vb:
            out.append(FieldChange(f"options.{name}", va, vb))
    if a.source_ranges != b.source_ranges:
        out.append(FieldChange("source_ranges", _ranges(a), _ranges(b)))
    return tuple(out)


def _ranges(s: Service) -> tuple[str, ...]:
    return tuple(str(n) for n in s.source_ranges)  # a tuple: changes are hashed (cached JSON)


def diff(old: DesiredState, new: DesiredState) -> Plan:
    changes: list[ServiceChange] = []
    unchanged: list[str] = []
    olds, news = old.services, new.services
    differ = replaced_at(olds, news, most=len(olds))
    if differ is not None:
        # Same names in the same order (a drain of one of 1,000): only the pairs
        # that are not the same object are looked into.
        if all(olds[i].name == news[i].name for i in differ):
            for i in differ:
                a, b = olds[i], news[i]
                fields, backends = _service_fields(a, b), _backend_changes(a, b)
                if fields or backends:
                    changes.append(ServiceChange("update", a.name, fields, backends))
            changed = {c.name for c in changes}
            unchanged = list(map(_name, olds))
            if changed:
                unchanged = [n for n in unchanged if n not in changed]
            changes.sort(key=_name)
            unchanged.sort()  # in name order already (the stored form): one pass
            return Plan(tuple(changes), tuple(unchanged))
    before = {s.name: s for s in olds}
    after = {s.name: s for s in news}
    for name in sorted(before.keys() | after.keys()):
        a, b = before.get(name), after.get(name)
        if a is None:
            assert b is not None
            empty = Service(name=b.name, vip=b.vip, port=b.port, protocol=b.protocol)
            changes.append(ServiceChange("create", name, _service_fields_all(b), _backend_changes(empty, b)))
        elif b is None:
            changes.append(
                ServiceChange("delete", name, (), tuple(
                    BackendChange("delete", b_.address.compressed, b_.identity(a.port)[1]) for b_ in a.backends))
            )
        elif a is b:  # the same object: unchanged (most services of a single-backend change)
            unchanged.append(name)
        else:
            fields = _service_fields(a, b)
            backends = _backend_changes(a, b)
            if fields or backends:
                changes.append(ServiceChange("update", name, fields, backends))
            else:
                unchanged.append(name)
    return Plan(tuple(changes), tuple(unchanged))


_name = attrgetter("name")


def _service_fields_all(s: Service) -> tuple[FieldChange, ...]:
    out = [FieldChange(n, None, _jsonable(getattr(s, n))) for n in ("vip", "port", "protocol")]
    out += [FieldChange(f"options.{n}", None, getattr(s.options, n)) for n in type(s.options).model_fields]
    if s.source_ranges:
        out.append(FieldChange("source_ranges", None, _ranges(s)))
    return tuple(out)
