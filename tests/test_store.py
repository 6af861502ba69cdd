"""Durable desired state: revisions, two-phase writes, rollback, crash durability."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from l4lb.models import DesiredState
from l4lb.store import StaleRevision, Store, StoreError


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


def test_invalid_document_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("""UPDATE desired SET revision = 7, document = '{"services": [{"name": "x"}]}'""")
    db.commit()
    db.close()
    with Store(path) as s, pytest.raises(StoreError, match="revision 7"):
        s.read()


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
