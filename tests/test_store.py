"""Durable desired state: revisions, two-phase writes, rollback, crash durability,
one row per service (only changed rows written, order kept), schema 1 -> 2."""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from l4lb.models import BackendState, DesiredState, Service
from l4lb.store import GAP, Record, StaleRevision, Store, StoreError, positions


def state(*names: str) -> DesiredState:
    return DesiredState.model_validate({"services": [
        {"name": n, "vip": "198.51.100.1", "port": 1000 + i, "backends": [{"address": "192.0.2.10"}]}
        for i, n in enumerate(names)
    ]})


def test_fresh_store_is_empty_revision_0(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        rec = s.read()
        assert rec.revision == 0 and rec.state == DesiredState() and rec.updated_at == 0


def test_durability_pragmas(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_commit_bumps_revision_and_persists(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        with s.write(0, state("a")) as rev:
            assert rev == 1
        with s.write(1, state("a", "b")) as rev:
            assert rev == 2
    with Store(tmp_path / "s.db") as s:
        rec = s.read()
        assert rec.revision == 2 and [x.name for x in rec.state.services] == ["a", "b"] and rec.updated_at > 0


def test_exception_in_block_rolls_back(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        with s.write(0, state("a")):
            pass
        with pytest.raises(RuntimeError, match="datapath said no"):
            with s.write(1, state("b")):
                raise RuntimeError("datapath said no")
        rec = s.read()
        assert rec.revision == 1 and [x.name for x in rec.state.services] == ["a"]
        with s.write(1, state("c")) as rev:  # usable after a rollback
            assert rev == 2


def test_stale_revision_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        with s.write(0, state("a")):
            pass
        with pytest.raises(StaleRevision):
            with s.write(0, state("b")):
                pass
        assert s.read().revision == 1


def test_second_writer_cannot_interleave(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE: another connection cannot write while a transaction is open."""
    path = tmp_path / "s.db"
    with Store(path) as s:
        with s.write(0, state("a")):
            other = sqlite3.connect(path, timeout=0.1)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            other.close()
        assert s.read().revision == 1


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(path)


def test_invalid_v1_document_refused_and_left_alone(tmp_path: Path) -> None:
    """A schema-1 document this version refuses is not converted: the operator looks at an untouched file."""
    path = tmp_path / "s.db"
    bad = '{"services": [{"name": "x"}]}'
    make_v1(path, 7, bad, 1700000000.0)
    with pytest.raises(StoreError, match="revision 7.*not converted"):
        Store(path)
    assert v1_contents(path) == ("1", 7, bad, 1700000000.0)


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreError):
        Store(path)


CRASH = textwrap.dedent("""
    import os, sys
    from l4lb.store import Store
    from l4lb.models import DesiredState
    doc = DesiredState.model_validate({"services": [{"name": "kept", "vip": "203.0.113.5", "port": 443}]})
    s = Store(sys.argv[1])
    if sys.argv[2] == "after-commit":
        with s.write(0, doc):
            pass
        os._exit(9)  # no close, no checkpoint: only the WAL has it
    with s.write(0, doc):
        os._exit(9)  # dies inside the transaction, before COMMIT
""")


@pytest.mark.parametrize("when", ["after-commit", "before-commit"])
def test_crash_keeps_exactly_the_committed_state(tmp_path: Path, when: str) -> None:
    path = tmp_path / "s.db"
    cp = subprocess.run([sys.executable, "-c", CRASH, str(path), when], capture_output=True, text=True)
    assert cp.returncode == 9, cp.stderr
    with Store(path) as s:
        rec = s.read()
    if when == "after-commit":
        assert rec.revision == 1 and rec.state.services[0].name == "kept"
    else:
        assert rec.revision == 0 and rec.state == DesiredState()
    assert os.path.exists(path)


# --- one row per service ---------------------------------------------------------------------


def svc(name: str, port: int, n_backends: int = 3) -> Service:
    return Service.model_validate({
        "name": name, "vip": "203.0.113.7", "port": port,
        "backends": [{"address": f"192.0.2.{1 + j}"} for j in range(n_backends)],
    })


def drained(s: Service) -> Service:
    """``s`` with its first backend draining: what one PATCH of a drain changes."""
    b0 = s.backends[0]
    flip = BackendState.draining if b0.state is BackendState.active else BackendState.active
    return s.model_copy(update={"backends": [b0.model_copy(update={"state": flip}), *s.backends[1:]]})


def many(n: int) -> list[Service]:
    return [svc(f"svc{i:04d}", 1000 + i) for i in range(n)]


def of(services: list[Service]) -> DesiredState:
    return DesiredState(services=services)


@contextmanager
def counted(s: Store) -> Iterator[list[int]]:
    """Rows inserted, updated or deleted by the statements in the block (sqlite3's total_changes)."""
    out: list[int] = []
    before = s._db.total_changes
    yield out
    out.append(s._db.total_changes - before)


def stored(path: Path) -> DesiredState:
    """What the file holds, through a new connection (no cache)."""
    with Store(path) as s:
        return s.read().state


def names(state: DesiredState) -> list[str]:
    return [x.name for x in state.services]


def test_one_of_n_change_writes_one_row(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    services = many(300)
    with Store(path) as s:
        with s.write(0, of(services)):
            pass
        services[150] = drained(services[150])
        with counted(s) as n, s.write(1, of(services)):
            pass
        assert n == [2]  # that service's row and the revision row
        # Equal content in new objects (e.g. parsed again): compared as JSON, nothing but the revision written.
        with counted(s) as n, s.write(2, of([Service.model_validate(x.model_dump()) for x in services])):
            pass
        assert n == [1]
    assert stored(path) == of(services)
    with Store(path) as s:  # a new connection: its cache comes from read(), by object
        services = list(s.read().state.services)
        services[7] = drained(services[7])
        with counted(s) as n, s.write(3, of(services)):
            pass
        assert n == [2]
    with Store(path) as s:  # a new connection that never read: compared with the rows' JSON
        services[8] = drained(services[8])
        with counted(s) as n, s.write(4, of(services)):
            pass
        assert n == [2]
    assert stored(path) == of(services)


def test_changes_in_place_write_their_rows_and_read_back(tmp_path: Path) -> None:
    """Drains of a few services, each replaced in its place (the store looks only at those),
    then a swap of two names' places (not in place: every position checked)."""
    path = tmp_path / "s.db"
    services = many(100)
    with Store(path) as s:
        with s.write(0, of(services)):
            pass
        for i in (3, 40, 99):
            services[i] = drained(services[i])
        with counted(s) as n, s.write(1, of(services)):
            pass
        assert n == [4]
        services[40] = services[40].model_copy()  # a new object, the same content: nothing to write
        with counted(s) as n, s.write(2, of(services)):
            pass
        assert n == [1]
        services[10], services[11] = services[11], services[10]
        with counted(s) as n, s.write(3, of(services)):
            pass
        assert n == [2]
    assert stored(path) == of(services)


def test_insert_and_delete_in_the_middle_write_one_row(tmp_path: Path) -> None:
    """The control core keeps services sorted by name: a new one usually lands between two others."""
    path = tmp_path / "s.db"
    services = many(200)
    with Store(path) as s:
        with s.write(0, of(services)):
            pass
        services.insert(100, svc("svc0099a", 999))
        with counted(s) as n, s.write(1, of(services)):
            pass
        assert n == [2]
        del services[50]
        with counted(s) as n, s.write(2, of(services)):
            pass
        assert n == [2]
        services.append(services.pop(0))  # a move: one row's position
        with counted(s) as n, s.write(3, of(services)):
            pass
        assert n == [2]
    assert names(stored(path)) == [x.name for x in services]


def test_order_kept_through_reorders_inserts_and_deletes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    rng = random.Random(3)
    pool = many(60)
    current = pool[:20]
    with Store(path) as s:
        for rev in range(40):
            op = rng.choice(["shuffle", "move", "insert", "delete", "reverse"])
            if op == "shuffle":
                rng.shuffle(current)
            elif op == "move":
                current.insert(rng.randrange(len(current) + 1), current.pop(rng.randrange(len(current))))
            elif op == "insert":
                spare = [x for x in pool if x not in current]
                for x in rng.sample(spare, k=min(3, len(spare))):
                    current.insert(rng.randrange(len(current) + 1), x)
            elif op == "delete" and len(current) > 3:
                del current[rng.randrange(len(current))]
            else:
                current.reverse()
            with s.write(rev, of(current)):
                pass
            assert names(s.read().state) == [x.name for x in current], op
            assert names(stored(path)) == [x.name for x in current], op


def test_order_kept_when_a_gap_runs_out(tmp_path: Path) -> None:
    """Every insertion at the same spot halves the gap; then all rows are renumbered."""
    path = tmp_path / "s.db"
    current = [svc("a", 1), svc("z", 2)]
    with Store(path) as s:
        with s.write(0, of(current)):
            pass
        for i in range(40):  # z-0000 < ... < z-0039 < z: each goes right after the previous one, before "z"
            current.insert(i + 1, svc(f"y{i:04d}", 100 + i))
            with s.write(i + 1, of(current)):
                pass
        got = sorted(s._db.execute("SELECT position, name FROM services").fetchall())
    assert [n for _, n in got] == [x.name for x in current]
    assert names(stored(path)) == [x.name for x in current]


@pytest.mark.parametrize("old", [
    [], [None, None], [0, GAP, 2 * GAP], [2 * GAP, 0, GAP], [None, 5, None, 3, 9, None], [5, 5 + 1, None, 5 + 2],
])
def test_positions_increase_and_keep_what_is_in_order(old: list[int | None]) -> None:
    new = positions(old)
    assert len(new) == len(old) and all(a < b for a, b in zip(new, new[1:]))
    if old == [2 * GAP, 0, GAP]:
        assert new[1:] == [0, GAP]  # the one moved item takes a new position, the others keep theirs
    if old == [None, 5, None, 3, 9, None]:
        assert new[3:5] == [3, 9]


def test_duplicate_names_refused_and_nothing_written(tmp_path: Path) -> None:
    """A state built without validation (model_construct) cannot slip two rows of one name in."""
    path = tmp_path / "s.db"
    with Store(path) as s:
        with s.write(0, of([svc("a", 1)])):
            pass
        with pytest.raises(ValueError, match="two services of the same name"):
            with s.write(1, DesiredState.model_construct(services=[svc("b", 2), svc("b", 3)])):
                pass
        assert s.read() == Record(1, of([svc("a", 1)]), s.read().updated_at)


def test_delete_and_recreate(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    a, b, c = svc("a", 1), svc("b", 2), svc("c", 3)
    with Store(path) as s:
        with s.write(0, of([a, b, c])):
            pass
        with s.write(1, of([a, c])):
            pass
        assert names(stored(path)) == ["a", "c"]
        with s.write(2, of([a, b, c])):  # the very same object again: a row to insert, not "unchanged"
            pass
        assert stored(path) == of([a, b, c])
        with s.write(3, of([a, c])):
            pass
        b2 = svc("b", 22)
        with s.write(4, of([c, b2, a])):  # recreated with other content, elsewhere in the order
            pass
    assert stored(path) == of([c, b2, a])


def deny_commit(s: Store) -> None:
    s._db.set_authorizer(lambda action, arg1, *_: sqlite3.SQLITE_DENY
                         if action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT" else sqlite3.SQLITE_OK)


@pytest.mark.parametrize("then", ["same connection", "after another commit"])
@pytest.mark.parametrize("failure", ["block raises", "COMMIT fails"])
def test_rollback_leaves_rows_and_cache_consistent(tmp_path: Path, failure: str, then: str) -> None:
    path = tmp_path / "s.db"
    a, b, c, e = svc("a", 1), svc("b", 2), svc("c", 3), svc("e", 5)
    with Store(path) as s:
        with s.write(0, of([a, b, c, e])):
            pass
        b2, d = drained(b), svc("d", 4)
        rolled_back = of([d, b2, c, a])  # inserted, changed, kept, moved; e deleted
        if failure == "block raises":
            with pytest.raises(RuntimeError, match="datapath said no"):
                with s.write(1, rolled_back):
                    raise RuntimeError("datapath said no")
        else:
            deny_commit(s)
            with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
                with s.write(1, rolled_back):
                    pass
            s._db.set_authorizer(None)
        assert not s._db.in_transaction
        with Store(path) as other:  # not s.read(): that would refill s's cache from the file
            rec = other.read()
        assert rec.revision == 1 and rec.state == of([a, b, c, e])
        if then == "same connection":
            # The same objects again: the store must not believe they are in the file already.
            with counted(s) as n, s.write(1, rolled_back):
                pass
            assert n == [5]  # d inserted, b updated, a moved, e deleted, the revision row
        else:
            # Revision 2 is now another state: s must not take its rolled-back 2 for it.
            with Store(path) as other, other.write(1, of([a, b, c])):
                pass
            with counted(s) as n, s.write(2, rolled_back):
                pass
            assert n == [4]  # d inserted, b updated, a moved, the revision row
    assert stored(path) == rolled_back


def test_other_connection_committed_since(tmp_path: Path) -> None:
    """A cache of an older revision is not trusted: the rows are compared with the file."""
    path = tmp_path / "s.db"
    a, b = svc("a", 1), svc("b", 2)
    with Store(path) as one, Store(path) as two:
        with one.write(0, of([a, b])):
            pass
        assert two.read().revision == 1
        with two.write(1, of([drained(a), b])):
            pass
        with one.write(2, of([a, b])):  # `one` last wrote exactly these objects, at revision 1
            pass
    assert stored(path) == of([a, b])


@pytest.mark.parametrize("document, message", [
    ('{"name": "b", "vip": "not-an-address", "port": 2}', r"service row 'b' \(revision 1\) is invalid"),
    ("{not json", r"service row 'b' \(revision 1\) is invalid"),
    (svc("c", 9).model_dump_json(), r"service row 'b' \(revision 1\) holds service 'c'"),
    (svc("b", 1).model_dump_json(), r"stored state \(revision 1\) is invalid: .*'a' and 'b' both use"),
])
def test_corrupt_service_row_named(tmp_path: Path, document: str, message: str) -> None:
    path = tmp_path / "s.db"
    with Store(path) as s:
        with s.write(0, of([svc("a", 1), svc("b", 2), svc("c", 3)])):
            pass
    db = sqlite3.connect(path)
    db.execute("UPDATE services SET document = ? WHERE name = 'b'", (document,))
    db.commit()
    db.close()
    with Store(path) as s, pytest.raises(StoreError, match=message):
        s.read()


def test_row_breaking_a_newer_rule_is_kept_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Rows an older version accepted (a loopback VIP, a name ending in a newline) must not stop
    the daemon from starting: kept as they are, with a warning naming what to fix."""
    path = tmp_path / "s.db"
    with Store(path) as s:
        with s.write(0, of([svc("a", 1), svc("b", 2)])):
            pass
    legacy = json.loads(svc("b", 2).model_dump_json()) | {"name": "b\n", "vip": "127.0.0.1"}
    db = sqlite3.connect(path)
    db.execute("UPDATE services SET name = 'b\n', document = ? WHERE name = 'b'", (json.dumps(legacy),))
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING, logger="l4lb.store"), Store(path) as s:
        got = s.read().state.services
    assert [(x.name, str(x.vip)) for x in got] == [("a", "203.0.113.7"), ("b\n", "127.0.0.1")]
    assert "stored service 'b\\n' breaks a rule of this version" in caplog.text
    assert "127.0.0.1 is a loopback address" in caplog.text and "name must be" in caplog.text


def test_rows_sharing_a_position_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as s:
        with s.write(0, of([svc("a", 1), svc("b", 2)])):
            pass
    db = sqlite3.connect(path)
    db.execute("UPDATE services SET position = 0")
    db.commit()
    db.close()
    with Store(path) as s, pytest.raises(StoreError, match="'a' and 'b' share position 0"):
        s.read()


def test_missing_revision_row_refused_not_recreated(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as s:
        with s.write(0, of([svc("a", 1)])):
            pass
    db = sqlite3.connect(path)
    db.execute("DELETE FROM head")
    db.commit()
    with pytest.raises(StoreError, match="revision row is missing"):
        Store(path)
    assert db.execute("SELECT count(*) FROM head").fetchone() == (0,)
    db.close()


@pytest.mark.parametrize("version", ["3", "99"])
def test_newer_schema_left_alone(tmp_path: Path, version: str) -> None:
    path = tmp_path / "s.db"
    with Store(path) as s:
        with s.write(0, of([svc("a", 1)])):
            pass
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    db.commit()
    before = db.execute("SELECT key, value FROM meta ORDER BY key").fetchall()
    with pytest.raises(StoreError, match=f"schema version {version}, newer"):
        Store(path)
    assert db.execute("SELECT key, value FROM meta ORDER BY key").fetchall() == before
    assert ("schema_version", version) in before
    assert db.execute("SELECT name FROM services").fetchall() == [("a",)]
    db.close()


# --- schema 1 -> 2 ---------------------------------------------------------------------------

# The schema-1 layout, as l4lb/store.py created it: the whole state as one document.
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE desired (
 id INTEGER PRIMARY KEY CHECK (id = 1),
 revision INTEGER NOT NULL,
 document TEXT NOT NULL,
 updated_at REAL NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def make_v1(path: Path, revision: int, document: str, updated_at: float) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_SCHEMA)
    db.execute("INSERT INTO desired VALUES (1, ?, ?, ?)", (revision, document, updated_at))
    db.commit()
    db.close()


def v1_contents(path: Path) -> tuple[str, int, str, float]:
    db = sqlite3.connect(path)
    (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    row = db.execute("SELECT revision, document, updated_at FROM desired").fetchone()
    tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert tables == {"meta", "desired"}, "a schema-1 file with schema-2 tables in it"
    return (version, *row)


def v1_document(state: DesiredState) -> str:
    return json.dumps(state.model_dump(mode="json"), separators=(",", ":"))  # as schema 1 wrote it


def test_v1_file_converted_on_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.db"
    old = of(many(50))
    make_v1(path, 41, v1_document(old), 1700000000.5)
    with caplog.at_level(logging.INFO, logger="l4lb.store"), Store(path) as s:
        rec = s.read()
        assert (rec.revision, rec.state, rec.updated_at) == (41, old, 1700000000.5)
    assert [r.name for r in caplog.records] == ["l4lb.store"]
    assert "converted from schema 1" in caplog.text and "revision 41, 50 services" in caplog.text
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    assert {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == {
        "meta", "head", "services"}
    assert db.execute("SELECT count(*) FROM services").fetchone() == (50,)
    db.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="l4lb.store"), Store(path) as s:  # reopened: nothing to convert
        rec = s.read()
        assert (rec.revision, rec.state, rec.updated_at) == (41, old, 1700000000.5)
        services = list(rec.state.services)
        services[3] = drained(services[3])
        with counted(s) as n, s.write(41, of(services)) as rev:
            assert rev == 42
        assert n == [2]
    assert caplog.records == []
    assert stored(path) == of(services)


def test_empty_v1_file_converted(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    make_v1(path, 0, DesiredState().model_dump_json(), 0)
    with Store(path) as s:
        assert s.read() == Record(0, DesiredState(), 0)
        with s.write(0, of([svc("a", 1)])) as rev:
            assert rev == 1


# Converts a schema-1 file and dies (os._exit) when the statement given runs for the
# n-th time, or right after the conversion committed ("after").
MIGRATION_CRASH = textwrap.dedent("""
    import os, sqlite3, sys
    path, statement, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seen = 0
    def trace(sql):
        global seen
        if sql.startswith(statement):
            seen += 1
            if seen == nth:
                os._exit(9)
    connect = sqlite3.connect
    def traced(*a, **kw):
        db = connect(*a, **kw)
        db.set_trace_callback(trace)
        return db
    sqlite3.connect = traced
    from l4lb.store import Store
    Store(path)
    os._exit(9 if statement == "after" else 3)
""")


@pytest.mark.parametrize("statement, nth", [
    ("INSERT INTO services", 17), ("DROP TABLE desired", 1), ("COMMIT", 1), ("after", 1),
])
def test_crash_during_conversion_leaves_v1_or_v2(tmp_path: Path, statement: str, nth: int) -> None:
    path = tmp_path / "s.db"
    old = of(many(30))
    document = v1_document(old)
    make_v1(path, 12, document, 1700000000.0)
    cp = subprocess.run([sys.executable, "-c", MIGRATION_CRASH, str(path), statement, str(nth)],
                        capture_output=True, text=True)
    assert cp.returncode == 9, cp.stderr
    if statement == "after":
        db = sqlite3.connect(path)
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
        db.close()
    else:
        assert v1_contents(path) == ("1", 12, document, 1700000000.0)
    with Store(path) as s:  # either way it opens to the same state
        rec = s.read()
    assert (rec.revision, rec.state, rec.updated_at) == (12, old, 1700000000.0)


# A committed state of 20 services, then a write that changes, inserts, deletes and
# moves rows, killed inside the block ("block"), in the middle of its statements
# ("statements", at the second row update) or after its COMMIT ("after-commit").
ROWS_CRASH = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[3])
    from test_store import drained, many, of
    from l4lb.store import Store
    s = Store(sys.argv[1])
    old = many(20)
    with s.write(0, of(old)):
        pass
    new = [drained(x) if i % 5 == 0 else x for i, x in enumerate(old)]
    del new[7]
    new.insert(3, new.pop())
    new.insert(10, many(21)[20])
    if sys.argv[2] == "statements":
        count = [0]
        def trace(sql):
            if sql.startswith("UPDATE services"):
                count[0] += 1
                if count[0] == 2:
                    os._exit(9)
        s._db.set_trace_callback(trace)
    with s.write(1, of(new)):
        if sys.argv[2] == "block":
            os._exit(9)
    os._exit(9)
""")


@pytest.mark.parametrize("when", ["block", "statements", "after-commit"])
def test_crash_in_a_row_write_keeps_the_committed_state(tmp_path: Path, when: str) -> None:
    path = tmp_path / "s.db"
    cp = subprocess.run([sys.executable, "-c", ROWS_CRASH, str(path), when, str(Path(__file__).parent)],
                        capture_output=True, text=True)
    assert cp.returncode == 9, cp.stderr
    with Store(path) as s:
        rec = s.read()
    old = many(20)
    if when == "after-commit":
        assert rec.revision == 2 and rec.state != of(old) and len(rec.state.services) == 20
        assert names(rec.state)[3] == "svc0019" and "svc0007" not in names(rec.state)
    else:
        assert rec.revision == 1 and rec.state == of(old)
