"""The pure planner: what this box announces, with which attributes, and why.

Input: a View of the control core (what the datapath holds and whether it can
serve), the box state (operator drains), the ``[bgp]`` config and the time.
Output: one ``Prefix`` per VIP (a /32 or /128) saying whether to announce it
and why not if not. A VIP carries every service on it, so it is announced
only while *every* service on it that has ``announce = true`` can be served:
a box that cannot serve one of them hands the whole VIP to boxes that can.

A View that is not converged (the daemon is starting, or a change failed
half-way) means "don't know": ``plan`` returns None and the caller keeps what
the speaker announces now. A restart must never flap a route.
"""

from __future__ import annotations

from dataclasses import dataclass

from l4lb.bgp.box import BoxState
from l4lb.bgp.config import GRACEFUL_SHUTDOWN, BgpSection
from l4lb.view import View

# Reasons a prefix is not announced (the API and CLI show them as they are).
SERVING = "serving"
FAILING_OPEN = "failing open"     # serving, but every backend of these services is down by its checks
DRAINING = "draining"            # announced, made unattractive; withdrawn at the deadline
DRAINED = "drained"
NO_BACKEND = "no usable backend"
NOT_ATTACHED = "program not attached"
ANNOUNCE_OFF = "announce = false"


@dataclass(frozen=True)
class Prefix:
    prefix: str                       # "198.51.100.10/32", "2001:db8::10/128"
    services: tuple[str, ...]         # the services on the VIP (sorted)
    announce: bool
    reason: str                       # SERVING, DRAINING or why it is withdrawn
    communities: tuple[str, ...] = ()
    med: int | None = None
    prepend: int = 0                  # extra copies of local_as
    withdraw_at: float | None = None  # a draining prefix's deadline (wall clock)

    @property
    def family(self) -> int:
        return 6 if ":" in self.prefix else 4


def plan(view: View, box: BoxState, cfg: BgpSection, now: float) -> tuple[Prefix, ...] | None:
    """Prefixes to announce or withdraw, sorted by prefix; None when the view cannot tell."""
    if not view.converged:
        return None
    serving = view.serving()
    by_vip: dict[str, list] = {}
    for svc in view.effective:
        by_vip.setdefault(svc.vip.compressed, []).append(svc)
    out = []
    for vip, services in by_vip.items():
        bits = 128 if ":" in vip else 32
        names = tuple(sorted(s.name for s in services))
        wanted = [s for s in services if s.announce]
        prefix = f"{vip}/{bits}"
        if not wanted:
            out.append(Prefix(prefix, names, False, ANNOUNCE_OFF))
            continue
        if not view.interfaces:
            out.append(Prefix(prefix, names, False, NOT_ATTACHED))
            continue
        down = [s.name for s in wanted if not serving.get(s.name)]
        if down:
            out.append(Prefix(prefix, names, False, f"{NO_BACKEND}: {', '.join(sorted(down))}"))
            continue
        communities = set(cfg.communities)
        meds = [cfg.med] if cfg.med is not None else []
        for s in wanted:
            attrs = cfg.attributes(s.name)
            communities.update(attrs.communities)
            if attrs.med is not None:
                meds.append(attrs.med)
        drains = [d for d in (box.drain_of(s.name) for s in wanted) if d is not None]
        drain = min(drains, key=lambda d: d.withdraw_at) if drains else None
        med = min(meds) if meds else None
        if drain is not None and drain.withdrawn(now):
            out.append(Prefix(prefix, names, False, DRAINED))
        elif drain is not None:
            if cfg.drain_graceful_shutdown:
                communities.add(GRACEFUL_SHUTDOWN)
            out.append(Prefix(prefix, names, True, DRAINING, tuple(sorted(communities)),
                              cfg.drain_med if cfg.drain_med is not None else med, cfg.drain_prepend,
                              drain.withdraw_at))
        else:
            # Failing open: every backend down by its checks, all kept (on_all_down = fail_open),
            # so the VIP stays announced; the reason says so (fail_closed withdraws instead).
            failing = sorted(s.name for s in wanted if s.name in view.fail_open)
            reason = f"{SERVING} ({FAILING_OPEN}: {', '.join(failing)})" if failing else SERVING
            out.append(Prefix(prefix, names, True, reason, tuple(sorted(communities)), med))
    return tuple(sorted(out, key=lambda p: (p.family, p.prefix)))


def next_deadline(prefixes: tuple[Prefix, ...] | None, now: float) -> float | None:
    """Seconds until a draining prefix must be withdrawn (the planner must run again then)."""
    times = [p.withdraw_at for p in prefixes or () if p.withdraw_at is not None]
    return max(0.0, min(times) - now) if times else None
