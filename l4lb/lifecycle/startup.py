"""The facts a start decides on (guard.py), gathered without changing
anything: the store, if there is one, and the pinned maps, read through their
pins without loading a program."""

from __future__ import annotations

from pathlib import Path

from l4lb.datapath.config import DatapathConfig
from l4lb.lifecycle.guard import MapFacts, StoreFacts
from l4lb.store import Store


def open_store(path: Path) -> tuple[StoreFacts, Store | None]:
    """Facts about the store at ``path``, and the store if there is one. A
    missing or zero-length file is not opened (SQLite would create a new,
    empty store: a start that is refused must leave nothing behind)."""
    if not path.exists() or path.stat().st_size == 0:
        return StoreFacts(path, fresh=True, store_id=None, revision=0, services=0), None
    store = Store(path)
    record = store.read()
    return StoreFacts(path, False, store.store_id, record.revision, len(record.state.services)), store


def pinned_maps(cfg: DatapathConfig) -> MapFacts | None:
    """The pinned map set that carries services: this config's layout if it
    does, else another layout's (the program attached now may use those)."""
    from l4lb.datapath.loader import pin_dir_of  # the datapath package imports BCC lazily
    from l4lb.datapath.survey import survey

    if not cfg.bpffs.is_dir():
        return None
    current = pin_dir_of(cfg)
    sets = survey(cfg.bpffs)
    mine = next((p for p in sets if p.path == current), None)
    pick = mine if mine is not None and mine.services else next((p for p in sets if p.services), mine)
    if pick is None:
        return None
    return MapFacts(pick.path, pick.services, pick.converged, pick.path == current)
