"""What an import produces: services in the desired-state document's shape, and notes.

Pure. Both importers (ipvsadm, keepalived) build services as plain dicts, the
way ``l4lbctl export`` writes them, and say with a :class:`Note` (file and line)
what they could not carry over and what they did with it instead. ``finish``
then checks every service against the real models, so the document printed is
one ``l4lbctl apply`` takes (limits of the box aside), and leaves out, with a
note, a service l4lb cannot represent.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from l4lb.models import DesiredState, Service

Action = Literal["ignored", "approximated", "skipped", "mapped"]


class SourceError(ValueError):
    """The input is not valid ipvsadm/keepalived text: nothing is imported."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source}:{line}: {message}")
        self.source, self.line, self.message = source, line, message


@dataclass(frozen=True)
class Note:
    """Something of the source that has no exact equivalent, and what became of it."""

    source: str
    line: int
    what: str          # the source's words, e.g. "-s wlc" or "sorry_server"
    action: Action
    detail: str        # why, and what l4lb does instead

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.what}: {self.action}: {self.detail}"


@dataclass
class Draft:
    """One service being built, with where it was defined (for notes)."""

    source: str
    line: int
    doc: dict[str, Any]


@dataclass
class Result:
    services: list[dict[str, Any]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    def document(self) -> dict[str, Any]:
        return {"services": self.services}


def service_name(protocol: str, vip: str, port: int) -> str:
    """``tcp-198.51.100.10-80``, ``udp-2001-db8--53-53``: the API's name rules (no ':')."""
    addr = ipaddress.ip_address(vip).compressed.replace(":", "-")
    return f"{protocol}-{addr}-{port}"


def health_supported() -> bool:
    """Does this l4lb's desired state carry health checks (``Service.health``)?"""
    return "health" in Service.model_fields


def _messages(e: ValidationError) -> str:
    out = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        out.append((f"{loc}: " if loc else "") + str(err["msg"]).removeprefix("Value error, "))
    return "; ".join(out)


def finish(drafts: Iterable[Draft], notes: list[Note]) -> Result:
    """Validate each service with the real models; keep the ones l4lb takes, note the others."""
    result = Result(notes=list(notes))
    keys: dict[tuple[str, int, str], str] = {}
    names: set[str] = set()
    drafts = list(drafts)
    drop_health = not health_supported()
    for d in drafts:
        doc = d.doc
        if drop_health and ("health" in doc or any("health" in b for b in doc["backends"])):
            doc = {k: v for k, v in doc.items() if k != "health"}
            doc["backends"] = [{k: v for k, v in b.items() if k != "health"} for b in d.doc["backends"]]
            note = Note(d.source, d.line, "health checkers", "ignored",
                        "this l4lb has no health checks in its desired state")
            if note not in result.notes:
                result.notes.append(note)
        try:
            svc = Service.model_validate(doc)
        except ValidationError as e:
            result.notes.append(Note(d.source, d.line, f"service {doc.get('name')}", "skipped",
                                     f"l4lb refuses it: {_messages(e)}"))
            continue
        if svc.key in keys or svc.name in names:
            other = keys.get(svc.key, svc.name)
            result.notes.append(Note(d.source, d.line, f"service {svc.name}", "skipped",
                                     f"the same VIP, port and protocol (or name) as {other}, defined earlier"))
            continue
        keys[svc.key] = svc.name
        names.add(svc.name)
        result.services.append(doc)
    DesiredState.model_validate(result.document())  # unique names and keys: true by construction
    # In the order of the source: files as first met, then lines.
    order = {src: i for i, src in enumerate(dict.fromkeys([n.source for n in notes] + [d.source for d in drafts]))}
    result.notes.sort(key=lambda n: (order.get(n.source, len(order)), n.line))
    return result
