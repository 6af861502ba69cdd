"""Durable desired state: one SQLite file in the state directory.

It holds a single document (the whole DesiredState as JSON) and a revision
that only ever grows; the API's ETags are built from it. WAL with
synchronous=FULL means a COMMIT has reached the disk when it returns, so the
control core may answer 2xx right after it.

Writes are two-phase so the datapath can be changed *inside* the transaction:

    with store.write(expected_revision, new_state) as new_revision:
        datapath.apply(...)          # raising here rolls the store back
    # committed (fsync'd) here

The write lock is taken with BEGIN IMMEDIATE, so a second daemon on the same
file cannot interleave (it would fail with "database is locked").
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from l4lb.models import DesiredState, Service

SCHEMA_VERSION = 1


class StoreError(RuntimeError):
    """The store file is unusable (corrupt, newer schema, invalid document)."""


class StaleRevision(StoreError):
    """Somebody committed since the caller read the revision it expected."""


@dataclass(frozen=True)
class Record:
    revision: int
    state: DesiredState
    updated_at: float  # unix time of the commit (0 for the empty initial state)


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread
        # is off because API handlers run in a thread pool; the control core
        # serialises every use with its own lock.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        self._pieces: dict[int, tuple[Service, str]] = {}  # id(service) -> (service, its JSON)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._init_schema()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise StoreError(f"{self.path}: {e}") from None

    def _init_schema(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS desired ("
                " id INTEGER PRIMARY KEY CHECK (id = 1),"
                " revision INTEGER NOT NULL,"
                " document TEXT NOT NULL,"
                " updated_at REAL NOT NULL)"
            )
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {row[0]}, newer than this l4lbd understands ({SCHEMA_VERSION})"
                )
            db.execute(
                "INSERT OR IGNORE INTO desired VALUES (1, 0, ?, 0)",
                (DesiredState().model_dump_json(),),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def read(self) -> Record:
        row = self._db.execute("SELECT revision, document, updated_at FROM desired WHERE id = 1").fetchone()
        if row is None:
            raise StoreError(f"{self.path}: the desired-state row is missing")
        try:
            state = DesiredState.model_validate_json(row[1])
        except ValidationError as e:
            # A document this version refuses (e.g. written by a laxer one): do
            # not guess, make the operator look.
            raise StoreError(f"{self.path}: stored document (revision {row[0]}) is invalid: {e}") from None
        return Record(revision=row[0], state=state, updated_at=row[2])

    @contextmanager
    def write(self, expected_revision: int, state: DesiredState) -> Iterator[int]:
        """Stage ``state`` as revision expected+1; commit when the block ends
        without an exception, roll back otherwise (including a failed COMMIT)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            (current,) = db.execute("SELECT revision FROM desired WHERE id = 1").fetchone()
            if current != expected_revision:
                raise StaleRevision(f"store is at revision {current}, expected {expected_revision}")
            new_revision = current + 1
            document = self._document(state)
            db.execute(
                "UPDATE desired SET revision = ?, document = ?, updated_at = ? WHERE id = 1",
                (new_revision, document, time.time()),
            )
            yield new_revision
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _document(self, state: DesiredState) -> str:
        """``json.dumps(state.model_dump(mode="json"))``, byte for byte, from
        per-service pieces cached by object: a write that changes one of a
        thousand services serialises that one (unchanged services are the
        same objects from one committed state to the next)."""
        if set(type(state).model_fields) != {"services"}:  # pragma: no cover - a new top-level field
            return json.dumps(state.model_dump(mode="json"), separators=(",", ":"))
        pieces: dict[int, tuple[Service, str]] = {}
        for svc in state.services:
            hit = self._pieces.get(id(svc))
            if hit is None or hit[0] is not svc:
                hit = (svc, json.dumps(svc.model_dump(mode="json"), separators=(",", ":")))
            pieces[id(svc)] = hit
        self._pieces = pieces
        return '{"services":[' + ",".join(piece for _, piece in pieces.values()) + "]}"

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
