"""The last known state of every probe: ``state_dir/health.db`` (SQLite).

Runtime state, apart from the desired document: one row per probe key with
its state, since when and why. A transition is written here *before* it is
applied to the datapath, so after a crash (kill -9) the daemon starts from
what was in force or about to be, never from an older state: nothing flaps
and no transition is lost. WAL with synchronous=NORMAL survives a process
crash; after a power loss the last transitions may be re-learned from probes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from l4lb.health.overlay import Health


class HealthStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS probes (key TEXT PRIMARY KEY, state TEXT NOT NULL, "
                             "since REAL NOT NULL, reason TEXT NOT NULL)")

    def load(self) -> dict[str, tuple[Health, float]]:
        """key -> (state, since) of every probe that was up or down."""
        with self._lock:
            rows = self._db.execute("SELECT key, state, since FROM probes").fetchall()
        return {k: (Health(s), since) for k, s, since in rows if s in (Health.up.value, Health.down.value)}

    def save(self, rows: Iterable[tuple[str, Health, float, str]]) -> None:
        """(key, state, since, reason) in one transaction."""
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO probes VALUES (?, ?, ?, ?)",
                                     [(k, h.value, since, reason) for k, h, since, reason in rows])

    def forget(self, keys: Iterable[str]) -> None:
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM probes WHERE key = ?", [(k,) for k in keys])

    def close(self) -> None:
        with self._lock:
            self._db.close()
