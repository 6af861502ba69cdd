"""keepalived.conf (keepalived 2.2) -> l4lb services, with its checkers as health checks.

Pure apart from reading the files it includes (``keepalived_conf`` reads the
syntax: blocks, comments, includes, variables). What is understood:

* ``virtual_server IP PORT``, ``virtual_server group NAME`` (each address and
  port of the ``virtual_server_group``, ranges like ``192.0.2.1-3``, becomes a
  service), ``real_server IP [PORT]``, ``weight``, ``protocol``, ``lb_algo`` /
  ``lvs_sched`` (+ ``mh-port``...), ``lb_kind`` / ``lvs_method``,
  ``persistence_timeout`` / ``persistence_granularity``, ``inhibit_on_failure``
  (what l4lb does with a failed backend anyway: no new connections, established
  ones stay);
* checkers: ``TCP_CHECK``, ``HTTP_GET``, ``SSL_GET``, ``DNS_CHECK`` with
  ``connect_port``, ``connect_timeout``, ``retry`` (``nb_get_retry``),
  ``delay_loop`` (on the checker, the real server or the virtual server),
  ``url { path status_code regex }``, ``virtualhost``, DNS ``type`` / ``name``.
  keepalived checks the real server's own address: so does the health check
  (``via: direct``). keepalived takes a server out after ``retry`` + 1 failed
  checks and back after one good one: ``fall`` = retry + 1, ``rise`` = 1.

Everything else is reported with its file and line, and what became of it.
"""

from __future__ import annotations

import glob
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import ipvs
from .ipvs import Notes
from .keepalived_conf import Globber, Lexer, Reader, Stmt, tree
from .result import Draft, Result, SourceError, finish, service_name

# keepalived's defaults (keepalived.conf(5), 2.2)
DEFAULT_DELAY_LOOP = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_RETRY = 1
DEFAULT_HTTP_STATUS = "200-299"
MAX_GROUP_MEMBERS = 1024

CHECKERS = {"TCP_CHECK": "tcp", "HTTP_GET": "http", "SSL_GET": "https", "DNS_CHECK": "udp-dns"}
NO_EQUIVALENT_CHECKERS = ("MISC_CHECK", "SMTP_CHECK", "BFD_CHECK", "PING_CHECK", "UDP_CHECK", "FILE_CHECK")
TIMING = ("delay_loop", "connect_timeout", "retry", "nb_get_retry", "delay_before_retry", "warmup")
LB_KINDS = {"dr": "g", "tun": "i", "nat": "m"}
OVERRIDABLE = {"type", "port", "via", "path", "host"}  # what a backend's health override may change

# --- meaning --------------------------------------------------------------------------------------


def _num(s: Stmt, kind: type = float, lo: float = 0, hi: float = 1 << 31) -> Any:
    if len(s.args) != 1:
        raise SourceError(*s.where(), f"{s.keyword} takes one number")
    try:
        v = kind(s.args[0])
    except ValueError:
        raise SourceError(*s.where(), f"{s.keyword} {s.args[0]!r} is not a number") from None
    if not lo <= v <= hi:
        raise SourceError(*s.where(), f"{s.keyword} {s.args[0]} is out of range ({lo}-{hi})")
    return v


def _addr(text: str, s: Stmt) -> str:
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        raise SourceError(*s.where(), f"{text!r} is not an IP address") from None


def _port(text: str, s: Stmt) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise SourceError(*s.where(), f"{text!r} is not a port number")
    return int(text)


@dataclass
class _Timing:
    values: dict[str, Stmt] = field(default_factory=dict)

    def under(self, block: Stmt) -> "_Timing":
        return _Timing({**self.values, **{c.keyword: c for c in block.children or [] if c.keyword in TIMING}})


@dataclass
class _Ctx:
    notes: Notes
    groups: dict[str, Stmt]


def parse_file(path: str) -> Result:
    """keepalived.conf at ``path`` (and what it includes) -> a Result."""
    def read(p: str) -> str:
        with open(p, encoding="utf-8", errors="replace") as f:
            return f.read()
    return parse(path, read, glob.glob)


def parse(path: str, read: Reader, globber: Globber = glob.glob) -> Result:
    notes = Notes()
    top = tree(Lexer(read, globber, notes).lines(path))
    ctx = _Ctx(notes, {s.args[0]: s for s in top if s.keyword == "virtual_server_group" and s.args})
    drafts: list[Draft] = []
    for s in top:
        if s.keyword == "virtual_server":
            drafts += _virtual_server(s, ctx)
        elif s.keyword == "virtual_server_group":
            continue
        elif s.keyword in ("vrrp_instance", "vrrp_sync_group", "vrrp_script", "vrrp_track_process"):
            notes.add(*s.where(), f"{s.keyword} {' '.join(s.args)}".strip(), "ignored",
                      "VRRP has no equivalent: l4lb boxes announce their VIPs over BGP (README: A tier of boxes)")
        elif s.keyword == "global_defs":
            notes.add(*s.where(), "global_defs", "ignored", "keepalived's own settings")
        else:
            notes.add(*s.where(), s.keyword, "ignored", "not a virtual server")
    return finish(drafts, notes.done())


def _members(s: Stmt, ctx: _Ctx) -> list[tuple[str, int]]:
    """(VIP, port) of ``virtual_server IP PORT`` or of each member of its group; [] if skipped."""
    if s.args[:1] == ["fwmark"]:
        ctx.notes.add(*s.where(), f"virtual_server {' '.join(s.args)}", "skipped",
                      "a firewall-mark service has no equivalent: an l4lb service is one VIP, port and protocol")
        return []
    if s.args[:1] == ["group"]:
        if len(s.args) != 2 or s.args[1] not in ctx.groups:
            raise SourceError(*s.where(), f"virtual_server group: no virtual_server_group {' '.join(s.args[1:])!r}")
        out: list[tuple[str, int]] = []
        for m in ctx.groups[s.args[1]].children or []:
            if m.keyword == "fwmark":
                ctx.notes.add(*m.where(), f"fwmark {' '.join(m.args)}", "skipped",
                              "a firewall-mark member has no equivalent")
                continue
            if len(m.args) != 1:
                raise SourceError(*m.where(), "a group member is `ADDRESS[-LAST] PORT`")
            out += [(a, _port(m.args[0], m)) for a in _range(m.keyword, m)]
        return out
    if len(s.args) != 2:
        raise SourceError(*s.where(), "virtual_server takes `ADDRESS PORT`, `group NAME` or `fwmark N`")
    if _port(s.args[1], s) == 0:
        ctx.notes.add(*s.where(), f"virtual_server {' '.join(s.args)}", "skipped",
                      "a service on every port (port 0) has no equivalent: an l4lb service has one port")
        return []
    return [(_addr(s.args[0], s), _port(s.args[1], s))]


def _range(text: str, s: Stmt) -> list[str]:
    """``192.0.2.1-3`` / ``2001:db8::1-3``: the last part counts up (keepalived's group ranges)."""
    base, dash, last = text.rpartition("-")
    if not dash or "." in last or ":" in last:
        return [_addr(text, s)]
    first = ipaddress.ip_address(_addr(base, s))
    step_text = str(first).rsplit("." if first.version == 4 else ":", 1)[1]
    start = int(step_text, 10 if first.version == 4 else 16)
    end = int(last, 10 if first.version == 4 else 16)
    if end < start or end - start >= MAX_GROUP_MEMBERS:
        raise SourceError(*s.where(), f"range {text} is empty or longer than {MAX_GROUP_MEMBERS}")
    return [str(first + i) for i in range(end - start + 1)]


def _virtual_server(s: Stmt, ctx: _Ctx) -> list[Draft]:
    members = _members(s, ctx)
    if not members:
        return []
    if s.children is None:
        raise SourceError(*s.where(), "virtual_server needs a { ... } block")
    notes = ctx.notes
    proto = s.first("protocol")
    protocol = (proto.args[0].lower() if proto and proto.args else "tcp")
    if protocol == "sctp":
        notes.add(*proto.where(), "protocol SCTP", "skipped", "SCTP is not load-balanced by l4lb (TCP and UDP only)")
        return []
    if protocol not in ("tcp", "udp"):
        raise SourceError(*(proto or s).where(), f"protocol {protocol!r} is not TCP, UDP or SCTP")
    algo = s.first("lb_algo", "lvs_sched")
    flags = [c.keyword for c in s.children if c.keyword in ipvs.SCHEDULER_FLAGS]
    hash_port, r = ipvs.scheduler(algo.args[0] if algo and algo.args else None, flags,
                                  f"{algo.keyword} {algo.args[0]}" if algo and algo.args else "(no lb_algo: wlc)")
    r.to(notes, *(algo or s).where())
    kind, tunnel, kind_stmt = _lb_kind(s, "m")  # keepalived's default: NAT
    timeout = s.first("persistence_timeout")
    gran = s.first("persistence_granularity")
    family = ipaddress.ip_address(members[0][0]).version
    hash_port, affinity, r = ipvs.persistence(int(_num(timeout, int)) if timeout else None, gran.args[0] if gran and gran.args else None,
                                    family, f"persistence_timeout {timeout.args[0] if timeout else ''}",
                                    f"persistence_granularity {gran.args[0] if gran and gran.args else ''}", hash_port)
    r.to(notes, *(timeout or s).where())
    _vs_extras(s, notes)
    timing = _Timing().under(s)
    vhost = s.first("virtualhost")
    drafts = []
    for vip, port in members:
        name = service_name(protocol, vip, port) if s.args[:1] != ["group"] else f"{s.args[1]}-{service_name(protocol, vip, port)}"[:63]
        backends, checks, dnat = [], [], False
        for rs in (c for c in s.children if c.keyword == "real_server"):
            # scope: one note per virtual_server block, not per member of its group
            b, check, d = _real_server(rs, port, kind, tunnel, kind_stmt, timing, vhost, notes, f"{s.source}:{s.line}")
            backends.append(b)
            checks.append(check)
            dnat |= d
        doc: dict[str, Any] = {"name": name, "vip": vip, "port": port, "protocol": protocol}
        if ipvs.options(hash_port, dnat, affinity):
            doc["options"] = ipvs.options(hash_port, dnat, affinity)
        doc["backends"] = backends
        _service_health(doc, checks, s, notes)
        drafts.append(Draft(s.source, s.line, doc))
    return drafts


def _lb_kind(block: Stmt, default: str) -> tuple[str, str | None, Stmt | None]:
    st = block.first("lb_kind", "lvs_method")
    if st is None:
        return default, None, None
    if not st.args or st.args[0].lower() not in LB_KINDS:
        raise SourceError(*st.where(), f"{st.keyword} takes NAT, DR or TUN")
    tunnel = None
    if "type" in st.args[1:]:
        i = st.args.index("type")
        tunnel = st.args[i + 1].lower() if i + 1 < len(st.args) else None
    return LB_KINDS[st.args[0].lower()], tunnel, st


_VS_IGNORED = {
    "sorry_server": "sorry servers have no equivalent: with every backend down, health checks fail open or "
                    "closed (health.on_all_down)",
    "sorry_server_inhibit": "sorry servers have no equivalent",
    "sorry_server_lvs_method": "sorry servers have no equivalent",
    "quorum": "quorum has no equivalent (see health.on_all_down)",
    "quorum_up": "quorum scripts have no equivalent", "quorum_down": "quorum scripts have no equivalent",
    "hysteresis": "quorum has no equivalent", "ha_suspend": "VRRP-dependent checking has no equivalent",
    "alpha": "backends start as up (not yet checked counts as up)",
    "omega": "quorum scripts have no equivalent", "smtp_alert": "e-mail alerts: use the metrics",
    "persistence_engine": "persistence engines (SIP) have no equivalent",
    "ops": "one-packet scheduling: l4lb keeps each client port's datagrams on one backend",
    "notify_up": "notify scripts have no equivalent: watch /v1/health or the metrics",
    "notify_down": "notify scripts have no equivalent: watch /v1/health or the metrics",
    "uthreshold": "connection thresholds have no equivalent", "lthreshold": "connection thresholds have no equivalent",
    "warmup": "checks start at once", "delay_before_retry": "a failed check is retried at the check interval",
}
_VS_KNOWN = {"protocol", "lb_algo", "lvs_sched", "lb_kind", "lvs_method", "persistence_timeout",
             "persistence_granularity", "real_server", "virtualhost", "delay_loop", "connect_timeout", "retry",
             "ip_family", "inhibit_on_failure", "hashed", *ipvs.SCHEDULER_FLAGS}


def _vs_extras(s: Stmt, notes: Notes) -> None:
    for c in s.children or []:
        if c.keyword in _VS_KNOWN:
            continue
        detail = _VS_IGNORED.get(c.keyword, "not understood by this importer")
        notes.add(*c.where(), " ".join([c.keyword, *c.args]), "ignored", detail)


_RS_KNOWN = {"weight", "inhibit_on_failure", "lvs_method", "lb_kind", "virtualhost", *TIMING, *CHECKERS}


def _real_server(rs: Stmt, port: int, kind: str, tunnel: str | None, kind_stmt: Stmt | None, timing: _Timing,
                 vhost: Stmt | None, notes: Notes, scope: str) -> tuple[dict[str, Any], dict | None, bool]:
    if not 1 <= len(rs.args) <= 2:
        raise SourceError(*rs.where(), "real_server takes `ADDRESS [PORT]`")
    address = _addr(rs.args[0], rs)
    rs_port = _port(rs.args[1], rs) if len(rs.args) == 2 else None
    own_kind, own_tunnel, own_stmt = _lb_kind(rs, kind) if rs.children else (kind, tunnel, kind_stmt)
    if own_stmt is None:
        own_tunnel, own_stmt = tunnel, kind_stmt
    what = f"{own_stmt.keyword} {' '.join(own_stmt.args)}" if own_stmt else "(no lb_kind: NAT)"
    ipvs.forwarding(own_kind, what, own_tunnel).to(notes, *(own_stmt or rs).where(), scope)
    w = rs.first("weight")
    weight = int(_num(w, int, 0, ipvs.MAX_WEIGHT)) if w else 1
    doc, dnat, r = ipvs.backend(address, rs_port, port, own_kind, weight, f"real_server {' '.join(rs.args)}")
    r.to(notes, *rs.where(), scope)
    for c in rs.children or []:
        if c.keyword in NO_EQUIVALENT_CHECKERS:
            notes.add(*c.where(), c.keyword, "ignored", "no equivalent check: the backend is not checked by it", scope)
        elif c.keyword not in _RS_KNOWN:
            notes.add(*c.where(), " ".join([c.keyword, *c.args]), "ignored",
                      _VS_IGNORED.get(c.keyword, "not understood by this importer"), scope)
    checkers = [c for c in rs.children or [] if c.keyword in CHECKERS]
    if len(checkers) > 1:
        notes.add(*checkers[1].where(), checkers[1].keyword, "ignored", f"a backend has one check in l4lb: "
                  f"{checkers[0].keyword} (line {checkers[0].line}) is used", scope)
    check = None
    if checkers:
        check = _checker(checkers[0], doc.get("port", port), timing.under(rs).under(checkers[0]),
                         rs.first("virtualhost") or vhost, notes, scope)
    return doc, check, dnat


def _checker(c: Stmt, port: int, timing: _Timing, vhost: Stmt | None, notes: Notes, scope: str) -> dict | None:
    kind = CHECKERS[c.keyword]
    t = timing.values
    interval = _num(t["delay_loop"]) if "delay_loop" in t else DEFAULT_DELAY_LOOP
    timeout = _num(t["connect_timeout"]) if "connect_timeout" in t else DEFAULT_CONNECT_TIMEOUT
    retry_st = t.get("retry") or t.get("nb_get_retry")
    retry = int(_num(retry_st, int, 0, 1000)) if retry_st else DEFAULT_RETRY
    check: dict[str, Any] = {"type": kind, "via": "direct"}
    cp = c.first("connect_port")
    if cp is not None:
        p = _port(cp.args[0] if cp.args else "", cp)
        if p != port:
            check["port"] = p
    elif kind == "udp-dns" and port != 53:
        check["port"] = 53  # DNS_CHECK's own default
    interval = min(max(interval, 0.1), 3600)
    if timeout > interval:
        notes.add(*c.where(), f"connect_timeout {timeout:g}", "approximated",
                  f"a check's timeout is at most its interval: {interval:g} s", scope)
        timeout = interval
    fall = min(retry + 1, 100)
    check.update(interval=interval, timeout=max(timeout, 0.01), rise=1, fall=fall)
    for key in ("delay_before_retry", "warmup"):
        if key in t:
            notes.add(*t[key].where(), f"{key} {' '.join(t[key].args)}", "approximated",
                      _VS_IGNORED[key], scope)
    handled = {"connect_port", "connect_timeout", "retry", "nb_get_retry", "delay_loop", "delay_before_retry",
               "warmup"}
    if kind in ("http", "https"):
        handled |= _http(c, check, vhost, notes, scope)
    elif kind == "udp-dns":
        handled |= {"type", "name"}
        name = c.first("name")
        if name is None or not name.args or name.args[0] in (".", ""):
            notes.add(*c.where(), "DNS_CHECK", "skipped", "it asks for the root ('.') without `name`, which a "
                      "udp-dns check cannot: give the name to ask for", scope)
            return None
        check["query"] = name.args[0].rstrip(".") or name.args[0]
        qtype = c.first("type")
        check["query_type"] = (qtype.args[0].upper() if qtype and qtype.args else "SOA")  # keepalived's default
    for x in c.children or []:
        if x.keyword not in handled:
            notes.add(*x.where(), f"{c.keyword} {' '.join([x.keyword, *x.args])}", "ignored",
                      "not part of an l4lb health check", scope)
    return check


def _http(c: Stmt, check: dict[str, Any], vhost: Stmt | None, notes: Notes, scope: str) -> set[str]:
    urls = [u for u in c.children or [] if u.keyword == "url"]
    for extra in urls[1:]:
        notes.add(*extra.where(), "url", "ignored", f"one URL per check: the first (line {urls[0].line}) is used", scope)
    host = c.first("virtualhost") or vhost
    status = DEFAULT_HTTP_STATUS
    if urls:
        u = urls[0]
        path = u.first("path")
        if path is not None and path.args:
            check["path"] = path.args[0]
        codes = [a for st in u.children or [] if st.keyword == "status_code" for a in st.args]
        if codes:
            status = ",".join(codes)
        host = u.first("virtualhost") or host
        for st in u.children or []:
            if st.keyword in ("path", "status_code", "virtualhost"):
                continue
            if st.keyword == "regex" and st.args and re.fullmatch(r"[\w .,:;/=-]+", st.args[0]):
                check["body_contains"] = st.args[0]  # a regex without special characters is a substring
                continue
            notes.add(*st.where(), f"url {st.keyword}", "ignored",
                      "digests and regular expressions are not checked (body_contains is a plain substring)"
                      if st.keyword in ("digest", "regex", "regex_no_match") else "not part of an l4lb health check",
                      scope)
    check["expect_status"] = status
    if host is not None and host.args:
        check["host"] = host.args[0]
    return {"url", "virtualhost", "http_protocol", "enable_sni"}


def _service_health(doc: dict[str, Any], checks: list[dict | None], s: Stmt, notes: Notes) -> None:
    """One check for the service (the most common), overrides for backends that differ."""
    present = [c for c in checks if c is not None]
    if not present:
        return
    counts = Counter(repr(sorted(c.items())) for c in present)
    common = next(c for c in present if repr(sorted(c.items())) == counts.most_common(1)[0][0])
    doc["health"] = common
    for b, c in zip(doc["backends"], checks):
        if c == common:
            continue
        if c is None:
            b["health"] = {"type": "none"}  # keepalived: no checker, never taken out
            continue
        diff = {k for k in c.keys() | common.keys() if c.get(k) != common.get(k)}
        override = {k: c.get(k, b.get("port") or doc["port"] if k == "port" else None) for k in diff}
        if diff <= OVERRIDABLE and None not in override.values() and _override_ok(common, override):
            b["health"] = override
        else:
            notes.add(*s.where(), f"checker of real_server {b['address']}", "approximated",
                      f"it differs from the service's check in {', '.join(sorted(diff))}; a backend can change only "
                      f"{', '.join(sorted(OVERRIDABLE))}: the service's check is used", f"{s.source}:{s.line}")


def _override_ok(check: dict[str, Any], override: dict[str, Any]) -> bool:
    from l4lb import models

    if not hasattr(models, "HealthOverride"):
        return True  # this l4lb has no health checks: finish() leaves them out
    try:
        models.HealthOverride.model_validate(override).over(models.HealthCheck.model_validate(check))
    except ValueError:
        return False
    return True
