"""What a start may do when the store and the pinned maps disagree (pure).

The pinned maps carry traffic while no daemon runs, and they remember which
store revision they were converged to (the ``converged`` record: store id,
revision, whether they were still exactly that revision, the seed). A start
compares that with the store it opens. Converging a store to the maps is the
normal start; but a store that is missing or empty, belongs to another store
(another box, a copied disk), or is older than what the maps were converged
to would silently empty or roll back the datapath. Those are refused with
what happened and the ways out:

* ``l4lbd --adopt-datapath``: rebuild the desired state from what the maps
  hold, store it, and carry on from there;
* ``l4lbd --reset``: start with an empty desired state, on purpose;
* ``l4lbd --trust-store``: converge the maps to this store anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any


class Mode(str, Enum):
    normal = "normal"
    adopt = "adopt-datapath"
    reset = "reset"
    trust = "trust-store"


class Action(str, Enum):
    converge = "converge"      # make the maps hold the store's state
    adopt = "adopt"            # make the store hold the maps' state
    reset = "reset"            # store an empty state, then converge


@dataclass(frozen=True)
class StoreFacts:
    path: Path
    fresh: bool               # missing or zero length: a new store would be created
    store_id: str | None
    revision: int
    services: int


@dataclass(frozen=True)
class MapFacts:
    path: Path                # the pinned map set holding services (or the current one)
    services: int
    converged: dict[str, Any] | None
    current_layout: bool      # made with this config's layout (M, capacities)


@dataclass(frozen=True)
class Decision:
    action: Action
    trusted: bool = False     # the maps hold exactly the store's revision: adopt the tables in force
    refusal: str | None = None
    note: str | None = None   # logged at start

    @property
    def refused(self) -> bool:
        return self.refusal is not None


WAYS_OUT = ("Start once with `l4lbd --adopt-datapath` to rebuild the desired state from what the maps hold "
            "(see README: what can and cannot be recovered), or `l4lbd --reset` to start empty on purpose{trust}. "
            "Nothing was changed.")


def _refuse(why: str, trust: bool = True) -> Decision:
    extra = ", or `l4lbd --trust-store` to converge the maps to this store anyway" if trust else ""
    return Decision(Action.converge, refusal=f"{why}. {WAYS_OUT.format(trust=extra)}")


def decide(store: StoreFacts, maps: MapFacts | None, mode: Mode, seed: str) -> Decision:
    """What this start does. ``seed``: the digest of the configured Maglev seed."""
    if mode is Mode.adopt:
        if maps is not None and maps.services and not maps.current_layout:
            return Decision(Action.adopt, refusal=(
                f"the maps holding {maps.services} services ({maps.path}) were made with other datapath settings "
                "(maglev_m, max_services, max_backends or flow_table_size) or by an l4lb version with another map "
                "layout (bpf_src/lib/maps.h), which this version cannot read: start once with those settings (or "
                "that version) and --adopt-datapath, then change them; or start with the store, which fills maps "
                "of this layout and replaces the program atomically. Nothing was changed"))
        return Decision(Action.adopt)
    if mode is Mode.reset:
        return Decision(Action.reset)
    if mode is Mode.trust or maps is None or not maps.services:
        return Decision(Action.converge, trusted=_trusted(store, maps, seed))
    rec = maps.converged
    held = f"the pinned maps under {maps.path} hold {maps.services} services"
    if rec is not None:
        held += f" (converged from store {rec.get('store_id')} at revision {rec.get('revision')})"
    if store.fresh or store.revision == 0:
        what = "missing" if store.fresh else "empty (revision 0, never written)"
        return _refuse(f"the store {store.path} is {what} but {held}: starting would empty the datapath",
                       trust=False)
    if rec is None:
        # Maps of a daemon from before converged records: nothing to compare with.
        return Decision(Action.converge, note=f"{held} and carry no converged record: converging them to "
                                              f"revision {store.revision} of the store")
    if rec.get("store_id") != store.store_id:
        return _refuse(f"the store {store.path} (store {store.store_id}, revision {store.revision}) is not the one "
                       f"the maps were converged from: {held}. Another box's or an older copy's store would replace "
                       "every table")
    if store.revision < int(rec.get("revision", 0)):
        return _refuse(f"the store {store.path} is at revision {store.revision}, behind the maps: {held}. The store "
                       "is older than the datapath (restored from a backup?); converging would roll every change "
                       "since back")
    return Decision(Action.converge, trusted=_trusted(store, maps, seed))


def _trusted(store: StoreFacts, maps: MapFacts | None, seed: str) -> bool:
    """The maps were converged to exactly this store revision, untouched since,
    with this seed: their tables are the store's (no table needs building)."""
    rec = maps.converged if maps is not None and maps.current_layout else None
    return (rec is not None and bool(rec.get("clean")) and rec.get("store_id") == store.store_id
            and rec.get("revision") == store.revision and rec.get("seed") == seed)
