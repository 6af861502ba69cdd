"""Durable desired state: one SQLite file in the state directory.

Schema 2 keeps one row per service (its name, its JSON and a position that
orders the rows) and one ``head`` row with the revision, which only ever grows
(the API's ETags are built from it). A write stores only the services that
changed since the last commit, so draining one backend of one service out of a
thousand rewrites one row, not the whole state. WAL with synchronous=FULL means
a COMMIT has reached the disk when it returns, so the control core may answer
2xx right after it. A schema-1 file (the whole state as one JSON document) is
converted when it is opened, in one transaction.

Writes are two-phase so the datapath can be changed *inside* the transaction:

    with store.write(expected_revision, new_state) as new_revision:
        datapath.apply(...)          # raising here rolls the store back
    # committed (fsync'd) here

The write lock is taken with BEGIN IMMEDIATE, so a second daemon on the same
file cannot interleave (it would fail with "database is locked").

Every store has an identity (``store_id``, random, made when the file is
created): the pinned maps remember which store they were converged from, so
a start with another box's store, or a new empty one, is noticed
(l4lb/lifecycle/guard.py).
"""

from __future__ import annotations

import bisect
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pydantic import ValidationError

from l4lb.models import STORED, DesiredState, Service
from l4lb.servicejson import service_json

SCHEMA_VERSION = 2
# Positions of a freshly numbered state are i * GAP: a service inserted between
# two others takes the midpoint, so about 32 insertions at the same spot fit
# before every row is renumbered; int64 leaves room for ~2e9 insertions at an end.
GAP = 1 << 32

log = logging.getLogger("l4lb.store")

# read() rebuilds a DesiredState from validated services with model_construct
# and runs the model's whole-set check (_unique: names, VIP:port) itself:
# pydantic would re-run every Service's own validator too (~10% of a read of
# 1000 x 100). Both only hold while DesiredState looks as it does today.
if set(DesiredState.model_fields) != {"services"} or set(
    DesiredState.__pydantic_decorators__.model_validators
) | set(DesiredState.__pydantic_decorators__.field_validators) != {"_unique"}:
    raise ImportError("l4lb.store: DesiredState grew fields or validators; the store must follow")


class StoreError(RuntimeError):
    """The store file is unusable (corrupt, newer schema, invalid document)."""


class StaleRevision(StoreError):
    """Somebody committed since the caller read the revision it expected."""


@dataclass(frozen=True)
class Record:
    revision: int
    state: DesiredState
    updated_at: float  # unix time of the commit (0 for the empty initial state)


class _Row(NamedTuple):
    """What one service row holds, plus the object it was written from or read
    as (None when only the text is known)."""

    service: Service | None
    document: str
    position: int


_service_json = service_json  # the row of a service (l4lb/servicejson.py: shared with its ETag)


def positions(old: Sequence[int | None]) -> list[int]:
    """New strictly increasing positions for a list whose items had positions
    ``old`` (None: a new item). The longest run of old positions that is still
    in order is kept, so a reorder, insertion or deletion moves few rows; the
    others go into the gaps, or, if a gap is too narrow, everything is renumbered."""
    keep = _increasing(old)
    out: list[int | None] = [p if i in keep else None for i, p in enumerate(old)]
    i = 0
    while i < len(out):
        if out[i] is not None:
            i += 1
            continue
        j = i
        while j < len(out) and out[j] is None:
            j += 1
        lo, hi, m = (out[i - 1] if i else None), (out[j] if j < len(out) else None), j - i
        if lo is None and hi is None:
            fill = [k * GAP for k in range(m)]
        elif hi is None:
            fill = [lo + (k + 1) * GAP for k in range(m)]
        elif lo is None:
            fill = [hi - (m - k) * GAP for k in range(m)]
        else:
            step = (hi - lo) // (m + 1)
            if step < 1:
                return [k * GAP for k in range(len(old))]
            fill = [lo + (k + 1) * step for k in range(m)]
        out[i:j] = fill
        i = j
    return out  # type: ignore[return-value]  # no None left


def _increasing(seq: Sequence[int | None]) -> set[int]:
    """Indices of a longest strictly increasing subsequence of the non-None values."""
    known = [(i, p) for i, p in enumerate(seq) if p is not None]
    if all(a[1] < b[1] for a, b in zip(known, known[1:])):
        return {i for i, _ in known}  # the usual case: nothing moved
    tails: list[int] = []  # tails[k]: smallest last value of an increasing run of length k+1
    tail_at: list[int] = []  # ... and the index it sits at
    prev: dict[int, int | None] = {}
    for i, p in known:
        k = bisect.bisect_left(tails, p)
        prev[i] = tail_at[k - 1] if k else None
        if k == len(tails):
            tails.append(p)
            tail_at.append(i)
        else:
            tails[k], tail_at[k] = p, i
    out: set[int] = set()
    at = tail_at[-1] if tail_at else None
    while at is not None:
        out.add(at)
        at = prev[at]
    return out


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread
        # is off because API handlers run in a thread pool; the control core
        # serialises every use with its own lock.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        # The committed rows by name, valid for revision _rows_revision (None:
        # unknown, load from the file before the next write).
        self._rows: dict[str, _Row] = {}
        self._rows_revision: int | None = None
        self._record: Record | None = None  # the last read, at its revision
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._init_schema()
        except (sqlite3.DatabaseError, StoreError) as e:
            self._db.close()
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"{self.path}: {e}") from None

    # -- schema -------------------------------------------------------------------------

    def _init_schema(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            try:
                version = SCHEMA_VERSION if row is None else int(row[0])
            except ValueError:
                raise StoreError(f"{self.path}: schema version {row[0]!r} is not a number") from None
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this l4lbd understands ({SCHEMA_VERSION})"
                )
            if version < 1:
                raise StoreError(f"{self.path}: unknown schema version {version}")
            migrated = None
            if row is None:  # a new file
                self._create_v2()
            elif version == 1:
                migrated = self._migrate_v1()
            if row is None or version != SCHEMA_VERSION:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            if db.execute("SELECT revision FROM head WHERE id = 1").fetchone() is None:
                raise StoreError(f"{self.path}: the revision row is missing")
            row = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
            if row is None:  # a new file, or one older than store identities
                db.execute("INSERT INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if migrated is not None:
            revision, rows = migrated
            self._rows, self._rows_revision = rows, revision
            log.info("%s: converted from schema 1 (one document) to schema 2 (one row per service): "
                     "revision %d, %d services", self.path, revision, len(rows))

    def _create_v2(self) -> None:
        db = self._db
        db.execute(
            "CREATE TABLE IF NOT EXISTS head ("
            " id INTEGER PRIMARY KEY CHECK (id = 1),"
            " revision INTEGER NOT NULL,"
            " updated_at REAL NOT NULL)"
        )
        # position first: it sits in the row's first page, next to the key.
        db.execute(
            "CREATE TABLE IF NOT EXISTS services ("
            " name TEXT PRIMARY KEY,"
            " position INTEGER NOT NULL,"
            " document TEXT NOT NULL)"
        )
        db.execute("INSERT OR IGNORE INTO head VALUES (1, 0, 0)")

    def _migrate_v1(self) -> tuple[int, dict[str, _Row]]:
        """Schema 1 (table ``desired``: the whole state as one document) to rows,
        inside the caller's transaction: a crash leaves the file at schema 1."""
        db = self._db
        row = db.execute("SELECT revision, document, updated_at FROM desired WHERE id = 1").fetchone()
        if row is None:
            raise StoreError(f"{self.path}: schema 1 file without its desired-state row")
        revision, document, updated_at = row
        try:
            state = DesiredState.model_validate_json(document, context=STORED)
        except ValidationError as e:
            raise StoreError(
                f"{self.path}: stored document (revision {revision}) is invalid, not converted to schema 2: {e}"
            ) from None
        self._create_v2()
        rows = {
            s.name: _Row(s, _service_json(s), p)
            for s, p in zip(state.services, positions([None] * len(state.services)))
        }
        db.executemany("INSERT INTO services VALUES (?, ?, ?)",
                       ((name, r.position, r.document) for name, r in rows.items()))
        db.execute("UPDATE head SET revision = ?, updated_at = ? WHERE id = 1", (revision, updated_at))
        db.execute("DROP TABLE desired")
        return revision, rows

    # -- reading ------------------------------------------------------------------------

    @property
    def store_id(self) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        if row is None:
            raise StoreError(f"{self.path}: the store id is missing")
        return str(row[0])

    def read(self) -> Record:
        db = self._db
        own = not db.in_transaction  # inside write()'s block: read what is staged, cache nothing
        if own and self._record is not None:
            # Read again at the same revision (a start reads before and after deciding): the
            # same document, since every write raises the revision. Validating 100,000
            # backends again would cost seconds.
            head = db.execute("SELECT revision FROM head WHERE id = 1").fetchone()
            if head is not None and head[0] == self._record.revision:
                return self._record
        try:
            if own:
                db.execute("BEGIN")  # one snapshot for the head and the rows
            try:
                head = db.execute("SELECT revision, updated_at FROM head WHERE id = 1").fetchone()
                stored = db.execute("SELECT name, position, document FROM services").fetchall()
            finally:
                if own and db.in_transaction:
                    db.execute("ROLLBACK")  # read only: nothing to keep
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: {e}") from None
        if head is None:
            raise StoreError(f"{self.path}: the revision row is missing")
        revision, updated_at = head
        stored.sort(key=lambda r: r[1])
        rows: dict[str, _Row] = {}
        last: tuple[str, int] | None = None
        for name, position, document in stored:
            if last is not None and last[1] == position:
                raise StoreError(f"{self.path}: service rows {last[0]!r} and {name!r} share position {position} "
                                 f"(revision {revision})")
            last = (name, position)
            try:
                svc = _read_service(document, name)
            except ValidationError as e:
                # A row this version refuses (e.g. written by a laxer one): do
                # not guess, make the operator look.
                raise StoreError(f"{self.path}: service row {name!r} (revision {revision}) is invalid: {e}") from None
            if svc.name != name:
                raise StoreError(f"{self.path}: service row {name!r} (revision {revision}) holds service {svc.name!r}")
            rows[name] = _Row(svc, document, position)
        state = DesiredState.model_construct(services=[r.service for r in rows.values()])
        try:
            state._unique()  # DesiredState's own whole-set check (see the top of this module)
        except ValueError as e:
            raise StoreError(f"{self.path}: stored state (revision {revision}) is invalid: {e}") from None
        record = Record(revision=revision, state=state, updated_at=updated_at)
        if own:
            self._rows, self._rows_revision = rows, revision
            self._record = record
        return record

    # -- writing ------------------------------------------------------------------------

    @contextmanager
    def write(self, expected_revision: int, state: DesiredState, *, at_least: int = 0) -> Iterator[int]:
        """Stage ``state`` as revision expected+1 (or ``at_least``, if higher: a
        start that takes the datapath's state over keeps revisions growing past
        the maps'); commit when the block ends without an exception, roll back
        otherwise (including a failed COMMIT)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            head = db.execute("SELECT revision FROM head WHERE id = 1").fetchone()
            if head is None:
                raise StoreError(f"{self.path}: the revision row is missing")
            current = head[0]
            if current != expected_revision:
                raise StaleRevision(f"store is at revision {current}, expected {expected_revision}")
            new_revision = max(current + 1, at_least)
            rows = self._stage(self._committed(current), state.services)
            db.execute("UPDATE head SET revision = ?, updated_at = ? WHERE id = 1", (new_revision, time.time()))
            yield new_revision
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        # Only a committed state becomes the base of the next write.
        self._rows, self._rows_revision = rows, new_revision
        self._record = None  # the last read is an older revision now: not kept alive

    def _committed(self, revision: int) -> dict[str, _Row]:
        """The rows of ``revision`` (the one in the file): the cache, unless
        another connection has committed since; then the file's rows as text."""
        if self._rows_revision == revision:
            return self._rows
        stored = self._db.execute("SELECT name, position, document FROM services").fetchall()
        return {name: _Row(None, document, position) for name, position, document in stored}

    def _stage(self, old: dict[str, _Row], services: Sequence[Service]) -> dict[str, _Row]:
        """Write the rows that differ from ``old``; return the new rows."""
        rows = self._stage_in_place(old, services)
        if rows is not None:
            return rows
        names = [s.name for s in services]
        if len(set(names)) != len(names):
            raise ValueError("a desired state with two services of the same name cannot be stored")
        old_pos = [old[n].position if n in old else None for n in names]
        # Same services in the same order (a drain): keep every position as it is.
        same_order = None not in old_pos and all(a < b for a, b in zip(old_pos, old_pos[1:]))  # type: ignore[operator]
        new_pos = old_pos if same_order else positions(old_pos)
        rows: dict[str, _Row] = {}
        inserts: list[tuple[str, int, str]] = []
        updates: list[tuple[int, str, str]] = []
        moves: list[tuple[int, str]] = []
        for svc, pos in zip(services, new_pos):
            prev = old.get(svc.name)
            if prev is not None and prev.service is svc and prev.position == pos:
                rows[svc.name] = prev  # the same object at the same place: nothing to do
                continue
            # Unchanged services are the same objects from one committed state
            # to the next: those are not even serialised.
            document = prev.document if prev is not None and prev.service is svc else _service_json(svc)
            rows[svc.name] = _Row(svc, document, pos)
            if prev is None:
                inserts.append((svc.name, pos, document))
            elif prev.document != document:
                updates.append((pos, document, svc.name))
            elif prev.position != pos:
                moves.append((pos, svc.name))
        db = self._db
        gone = [(n,) for n in old if n not in rows]
        if gone:
            db.executemany("DELETE FROM services WHERE name = ?", gone)
        if updates:
            db.executemany("UPDATE services SET position = ?, document = ? WHERE name = ?", updates)
        if moves:
            db.executemany("UPDATE services SET position = ? WHERE name = ?", moves)
        if inserts:
            db.executemany("INSERT INTO services VALUES (?, ?, ?)", inserts)
        return rows

    def _stage_in_place(self, old: dict[str, _Row], services: Sequence[Service]) -> dict[str, _Row] | None:
        """The common write (a drain): the services of ``old`` in the same order,
        the same objects but a few, each replaced by its namesake. Only those
        are looked at (a drain at 1,000 services must not walk 1,000 rows in
        Python); None when the change is not of that kind."""
        if len(old) != len(services):
            return None
        # Rows are kept in the order of the services they were written from.
        differ = [i for i, (r, s) in enumerate(zip(old.values(), services)) if r.service is not s]
        if len(differ) > 8:
            return None
        prev = list(old.values())
        if any(prev[i].service is None or prev[i].service.name != services[i].name for i in differ):
            return None
        rows = dict(old)
        updates = []
        for i in differ:
            svc, r = services[i], prev[i]
            document = _service_json(svc)
            rows[svc.name] = _Row(svc, document, r.position)
            if document != r.document:
                updates.append((document, svc.name))
        if updates:
            self._db.executemany("UPDATE services SET document = ? WHERE name = ?", updates)
        return rows

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_service(document: str, name: str) -> Service:
    """A stored row. One that breaks a rule added since it was written (address
    classes, the whole-name pattern) is kept as it is, so the datapath keeps
    forwarding it, and logged: the operator fixes or removes it through the API."""
    try:
        return Service.model_validate_json(document)
    except ValidationError as strict:
        svc = Service.model_validate_json(document, context=STORED)  # still invalid: the caller refuses it
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'service'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in strict.errors(include_url=False))
        log.warning("stored service %r breaks a rule of this version (%s); kept as stored: "
                    "change or remove it through the API", name, problems)
        return svc
