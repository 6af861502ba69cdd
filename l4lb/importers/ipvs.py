"""What IPVS's knobs mean in l4lb's terms, for both importers (keepalived drives IPVS too).

Pure. Each function returns the l4lb settings that match and the notes for what
does not: l4lb always picks backends by Maglev consistent hashing and always
forwards by IPIP/IP6IP6 direct server return.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .result import Action, Note

# IPVS schedulers that hash the client (and with the -port flag its port too).
HASHING = {"mh": "Maglev hashing", "sh": "source hashing"}
SCHEDULER_FLAGS = {"mh-port", "mh-fallback", "sh-port", "sh-fallback", "flag-1", "flag-2", "flag-3"}
FORWARDING = {"g": "direct routing", "i": "IPIP tunnel", "m": "NAT (masquerading)"}
MAX_WEIGHT = 65535


class Notes:
    """Collects notes; the same remark on many lines of one service becomes one note
    that names the other lines (a 100-backend service of -g lines gives one note)."""

    def __init__(self) -> None:
        self._notes: dict[tuple[str, str, str, str, str], tuple[Note, list[int]]] = {}

    def add(self, source: str, line: int, what: str, action: Action, detail: str, scope: str = "") -> None:
        key = (scope, source, what, action, detail)
        if key in self._notes:
            first, more = self._notes[key]
            if line != first.line and line not in more:
                more.append(line)
        else:
            self._notes[key] = (Note(source, line, what, action, detail), [])

    def done(self) -> list[Note]:
        out = []
        for note, more in self._notes.values():
            if more:
                shown = ", ".join(map(str, more[:5])) + (f" and {len(more) - 5} more" if len(more) > 5 else "")
                note = Note(note.source, note.line, note.what, note.action,
                            f"{note.detail} (also line{'s' if len(more) > 1 else ''} {shown})")
            out.append(note)
        return out


@dataclass
class Remarks:
    """Notes for one object, before they get their file and line."""

    items: list[tuple[str, Action, str]] = field(default_factory=list)

    def add(self, what: str, action: Action, detail: str) -> None:
        self.items.append((what, action, detail))

    def to(self, notes: Notes, source: str, line: int, scope: str = "") -> None:
        for what, action, detail in self.items:
            notes.add(source, line, what, action, detail, scope)


def scheduler(name: str | None, flags: Iterable[str], what: str) -> tuple[bool, Remarks]:
    """IPVS scheduler (+ flags) -> hash_src_port, and remarks. ``what`` is how the source says it."""
    r = Remarks()
    flags = set(flags)
    name = (name or "wlc").lower()
    if name in HASHING:
        with_port = f"{name}-port" in flags
        if name == "sh":
            r.add(what, "approximated", "source hashing becomes Maglev consistent hashing of the same key "
                  f"(client address{' and port' if with_port else ''}): backends may be chosen differently")
        return with_port, r
    r.add(what, "approximated", f"IPVS scheduler {name} has no equivalent: l4lb picks backends by Maglev "
          "consistent hashing of client address and port, in proportion to weights (connection counts play no part)")
    return True, r


def persistence(timeout: int | None, netmask: str | None, family: int, what_p: str, what_m: str,
                hash_src_port: bool) -> tuple[bool, int | None, Remarks]:
    """Persistence -> client-IP affinity (hash_src_port false), and its netmask
    (granularity) -> options.affinity_prefix (None: the whole address)."""
    r = Remarks()
    if timeout is None:
        if netmask is not None:
            r.add(what_m, "ignored", "a persistence netmask without persistence means nothing")
        return hash_src_port, None, r
    r.add(what_p, "approximated", "client-IP affinity (options.hash_src_port: false): a client keeps its "
          "backend while the backend set is unchanged, with no timeout")
    plen = prefix_len(netmask, family) if netmask is not None else None
    return False, plen if plen is not None and plen < (32 if family == 4 else 128) else None, r


def prefix_len(mask: str, family: int) -> int:
    """``255.255.255.0`` or ``24`` (IPv6: ``64``) -> prefix length; ValueError if neither."""
    if mask.isdigit():
        n = int(mask)
        if 0 <= n <= (32 if family == 4 else 128):
            return n
        raise ValueError(f"{mask} is not a prefix length for IPv{family}")
    return ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen


def forwarding(kind: str, what: str, tunnel: str | None = None) -> Remarks:
    """Forwarding method (g/i/m) -> remarks (l4lb only does IPIP/IP6IP6 DSR)."""
    r = Remarks()
    if kind == "g":
        r.add(what, "approximated", "direct routing becomes IPIP/IP6IP6 direct server return: backends must "
              "decapsulate (README: Backend setup)")
    elif kind == "m":
        r.add(what, "approximated", "NAT has no equivalent: l4lb forwards by IPIP/IP6IP6 direct server return, "
              "so backends must decapsulate and reply to clients directly, not through this box")
    elif tunnel not in (None, "ipip"):
        r.add(what, "approximated", f"a {tunnel} tunnel becomes IPIP/IP6IP6")
    return r


def backend(address: str, port: int | None, service_port: int, kind: str, weight: int,
            what_port: str) -> tuple[dict[str, Any], bool, Remarks]:
    """One real server -> a backend dict, whether it needs L4 DNAT, and remarks.

    IPVS rewrites the port only with NAT: for direct routing and tunnels ipvsadm itself
    sets the real server's port to the service's, so another port there means nothing."""
    r = Remarks()
    doc: dict[str, Any] = {"address": ipaddress.ip_address(address).compressed}
    dnat = False
    if port is not None and port != service_port:
        if kind == "m":
            doc["port"] = port
            dnat = True
        else:
            r.add(what_port, "ignored", f"IPVS uses the service port {service_port} with "
                  f"{FORWARDING[kind]}, as does l4lb")
    doc["weight"] = weight
    return doc, dnat, r


def options(hash_src_port: bool, dnat: bool, affinity_prefix: int | None = None) -> dict[str, Any]:
    """Only the options that differ from l4lb's defaults."""
    out: dict[str, Any] = {}
    if dnat:
        out["l4_dnat"] = True
    if not hash_src_port:
        out["hash_src_port"] = False
    if affinity_prefix is not None:
        out["affinity_prefix"] = affinity_prefix
    return out
