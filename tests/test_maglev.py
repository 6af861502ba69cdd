"""Properties of the pure-Python Maglev table builder (l4lb/maglev.py)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb.maglev import MaglevTable, build
from l4lb.models import MAGLEV_SIZES

ROOT = Path(__file__).resolve().parent.parent
SEED = b"l4lb-maglev!"  # 12 bytes
assert len(SEED) == 12

# Builds are a few ms to ~25 ms; wall-clock deadlines would only measure how
# busy the shared machine is.
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies

_ipv4 = st.integers(0, 2**32 - 1).map(lambda x: ipaddress.IPv4Address(x).exploded)
_ipv6 = st.integers(0, 2**128 - 1).map(lambda x: ipaddress.IPv6Address(x).exploded)
_identity = st.tuples(st.one_of(_ipv4, _ipv6), st.integers(1, 65535))
seeds = st.binary(min_size=12, max_size=12)


def identities(min_size: int, max_size: int) -> st.SearchStrategy[list[tuple[str, int]]]:
    return st.lists(_identity, min_size=min_size, max_size=max_size, unique=True)


def v4(i: int, port: int = 80) -> tuple[str, int]:
    return (ipaddress.IPv4Address(0x0A000000 + i).exploded, port)


def equal(n: int, weight: int = 100) -> dict[tuple[str, int], int]:
    return {v4(i): weight for i in range(1, n + 1)}


def counts(t: MaglevTable) -> np.ndarray:
    """Slots per identity index (weight-0 identities included, as zeros)."""
    return np.bincount(t.table[t.table >= 0], minlength=len(t.identities))


def owners_in(t: MaglevTable, space: tuple[tuple[str, int], ...]) -> np.ndarray:
    """t's table re-expressed as indices into ``space`` (a superset of t's identities),
    so tables built from different identity sets compare slot by slot."""
    pos = {ident: i for i, ident in enumerate(space)}
    remap = np.array([pos[ident] for ident in t.identities], dtype=np.int64)
    return remap[t.table]


def changed_fraction(a: MaglevTable, b: MaglevTable) -> float:
    space = tuple(sorted(set(a.identities) | set(b.identities)))
    return float(np.mean(owners_in(a, space) != owners_in(b, space)))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("m", [0, 250, 1000, 65536, 65537, 131072, -251])
def test_rejects_non_listed_table_size(m: int) -> None:
    with pytest.raises(ValueError, match=r"table size m must be one of"):
        build(equal(3), m, SEED)


@pytest.mark.parametrize("seed", [b"", b"x" * 11, b"x" * 13, b"x" * 16])
def test_rejects_bad_seed_length(seed: bytes) -> None:
    with pytest.raises(ValueError, match=rf"seed must be exactly 12 bytes, got {len(seed)} bytes"):
        build(equal(3), 251, seed)


def test_rejects_non_bytes_seed() -> None:
    with pytest.raises(ValueError, match=r"seed must be exactly 12 bytes, got str"):
        build(equal(3), 251, "x" * 12)  # type: ignore[arg-type]


@pytest.mark.parametrize("weight", [-1, -65535, 65536])
def test_rejects_out_of_range_weight(weight: int) -> None:
    weights = equal(3) | {v4(9): weight}
    with pytest.raises(ValueError, match=rf"weight of .*10\.0\.0\.9.* must be in 0\.\.65535, got {weight}"):
        build(weights, 251, SEED)


@pytest.mark.parametrize("weight", [1.5, "3", True, None])
def test_rejects_non_integer_weight(weight: object) -> None:
    with pytest.raises(ValueError, match=r"must be an integer"):
        build({v4(1): weight}, 251, SEED)  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        (("::1", 80), r"address must be exploded, i\.e\. '0000:0000:0000:0000:0000:0000:0000:0001'"),
        (("10.0.0.300", 80), r"is not an IP address"),
        (("10.0.0.1", 70000), r"port must be in 0\.\.65535"),
        (("10.0.0.1",), r"must be \(address: str, port: int\)"),
        ((167772161, 80), r"must be \(address: str, port: int\)"),
        (("10.0.0.1", True), r"must be \(address: str, port: int\)"),
    ],
)
def test_rejects_malformed_identity(identity: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build({identity: 1}, 251, SEED)


# ---------------------------------------------------------------- basic shape


@pytest.mark.parametrize("m", [251, 65521])
def test_no_backends_or_all_weight_zero_gives_all_minus_one(m: int) -> None:
    empty = build({}, m, SEED)
    assert empty.identities == ()
    assert empty.table.dtype == np.int32 and empty.table.shape == (m,)
    assert (empty.table == -1).all()
    assert empty.backend_at(0) is None

    zero = build({v4(2): 0, v4(1): 0}, m, SEED)
    assert zero.identities == (v4(1), v4(2))  # kept, sorted, so indices stay stable
    assert (zero.table == -1).all()


def test_backend_at_and_immutability() -> None:
    t = build({v4(1): 1, v4(2): 1, v4(3): 0}, 251, SEED)
    assert t.identities == (v4(1), v4(2), v4(3))
    assert {t.backend_at(s) for s in range(251)} == {v4(1), v4(2)}
    assert t.backend_at(7) == t.identities[int(t.table[7])]
    for bad in (-1, 251):
        with pytest.raises(IndexError):
            t.backend_at(bad)
    with pytest.raises(ValueError):  # read-only: nobody patches a published table
        t.table[0] = 0
    assert t == build({v4(3): 0, v4(2): 1, v4(1): 1}, 251, SEED)
    assert hash(t) == hash(build({v4(3): 0, v4(2): 1, v4(1): 1}, 251, SEED))


@FAST
@given(idents=identities(1, 60), data=st.data(), m=st.sampled_from(MAGLEV_SIZES), seed=seeds)
def test_every_slot_filled_and_weight_zero_gets_nothing(idents, data, m, seed) -> None:
    weights = {i: data.draw(st.integers(0, 65535) | st.just(0), label=f"w{i}") for i in idents}
    t = build(weights, m, seed)
    assert t.identities == tuple(sorted(weights))
    assert t.table.dtype == np.int32 and t.table.shape == (m,)
    if any(weights.values()):
        assert t.table.min() >= 0 and t.table.max() < len(idents)
        c = counts(t)
        for idx, ident in enumerate(t.identities):
            if weights[ident] == 0:
                assert c[idx] == 0, f"weight-0 backend {ident} got {c[idx]} slots"
    else:
        assert (t.table == -1).all()


# ---------------------------------------------------------------- shares


@FAST
@given(n=st.integers(1, 1310), seed=seeds, data=st.data())
def test_equal_weight_shares_within_3_percent(n, seed, data) -> None:
    m = data.draw(st.sampled_from([s for s in MAGLEV_SIZES if s >= 100 * n]), label="m")
    c = counts(build(equal(n), m, seed))
    expected = m / n
    assert np.abs(c - expected).max() <= 0.03 * expected
    assert c.max() - c.min() <= 1  # largest-remainder apportionment: as even as integers allow


@FAST
@given(idents=identities(1, 100), seed=seeds, data=st.data())
def test_unequal_weight_shares_within_3_percent(idents, seed, data) -> None:
    # Weights within a 2:1 range so every backend's fair share is >= 50 slots
    # when m >= 100 N, which is what makes a 3 % relative bound meaningful.
    m = data.draw(st.sampled_from([s for s in MAGLEV_SIZES if s >= 100 * len(idents)]), label="m")
    weights = {i: data.draw(st.integers(500, 1000), label=f"w{i}") for i in idents}
    t = build(weights, m, seed)
    w = np.array([weights[i] for i in t.identities], dtype=float)
    expected = m * w / w.sum()
    assert (np.abs(counts(t) - expected) <= 0.03 * expected).all()


@FAST
@given(idents=identities(1, 40), m=st.sampled_from(MAGLEV_SIZES), seed=seeds, data=st.data())
def test_shares_are_exact_apportionment(idents, m, seed, data) -> None:
    # Any weights at all: each backend is within one slot of m * w / W, as long
    # as every positive weight deserves at least one slot (see the next test).
    weights = {i: data.draw(st.integers(0, 65535), label=f"w{i}") for i in idents}
    w = np.array([weights[i] for i in sorted(weights)], dtype=float)
    if w.sum() == 0:
        return
    expected = m * w / w.sum()
    if ((expected > 0) & (expected < 1)).any():
        return
    assert (np.abs(counts(build(weights, m, seed)) - expected) < 1).all()


def test_more_backends_than_slots() -> None:
    t = build(equal(300), 251, SEED)
    c = counts(t)
    assert t.table.min() >= 0
    assert sorted(set(c.tolist())) == [0, 1] and c.sum() == 251


def test_tiny_positive_weight_still_gets_one_slot() -> None:
    weights = {v4(1): 65535, v4(2): 65535, v4(3): 1, v4(4): 0}
    c = counts(build(weights, 251, SEED))
    assert c.tolist() == [125, 125, 1, 0]


# ---------------------------------------------------------------- disruption
#
# Exact shares and minimal disruption pull against each other: the slots of a
# removed backend are picked up by whoever is next in line for each of them,
# which never matches everyone's new quota exactly, and the difference
# cascades. The excess over the removed backend's own share shrinks roughly
# like 1/sqrt(m): measured maxima over random cases are ~0.006 at m = 32749 and
# 65521 (asserted below with the 0.01 budget), ~0.0085 at 16381 and up to a
# few percent at m <= 4093. Classic sequential Maglev measured worse on the
# same small cases.

BIG_M = [32749, 65521]


@SLOW
@given(n=st.integers(2, 200), m=st.sampled_from(BIG_M), seed=seeds, data=st.data())
def test_removing_one_of_n_equal_backends_moves_at_most_1_over_n_plus_1pct(n, m, seed, data) -> None:
    weights = equal(n)
    gone = data.draw(st.sampled_from(sorted(weights)), label="removed")
    before = build(weights, m, seed)
    after_drop = build({k: v for k, v in weights.items() if k != gone}, m, seed)
    after_zero = build(weights | {gone: 0}, m, seed)

    # Deleting a backend and setting its weight to 0 are the same table.
    space = before.identities
    assert np.array_equal(owners_in(after_drop, space), owners_in(after_zero, space))

    old, new = before.table, after_zero.table
    moved = old != new
    was_gone = old == space.index(gone)
    assert moved[was_gone].all()  # its slots must move...
    assert not (new == space.index(gone)).any()
    assert moved.mean() <= 1 / n + 0.01  # ...and hardly anything else does
    assert moved[~was_gone].mean() <= 0.01
    # Adding it back is the same pair of tables seen the other way round.
    assert changed_fraction(after_drop, before) == pytest.approx(moved.mean())


@SLOW
@given(idents=identities(3, 150), m=st.sampled_from(BIG_M), seed=seeds, data=st.data())
def test_removing_or_adding_weighted_backend_moves_about_its_share(idents, m, seed, data) -> None:
    weights = {i: data.draw(st.integers(1, 65535), label=f"w{i}") for i in idents}
    gone = data.draw(st.sampled_from(idents), label="removed")
    rest = {k: v for k, v in weights.items() if k != gone}
    share = weights[gone] / sum(weights.values())
    with_it, without = build(weights, m, seed), build(rest, m, seed)
    assert changed_fraction(without, with_it) <= share + 0.01  # adding
    assert changed_fraction(with_it, without) <= share + 0.01  # removing


def test_thousand_backends_remove_and_add() -> None:
    # The production-sized case (bench: m = 65521, N = 1000), deterministic.
    m, n = 65521, 1000
    weights = equal(n)
    base = build(weights, m, SEED)
    for gone in (v4(1), v4(500), v4(1000)):
        fraction = changed_fraction(base, build(weights | {gone: 0}, m, SEED))
        assert 1 / n <= fraction <= 1 / n + 0.01
    newcomer = v4(5000)
    fraction = changed_fraction(base, build(weights | {newcomer: 100}, m, SEED))
    assert 1 / (n + 1) - 0.001 <= fraction <= 1 / (n + 1) + 0.01


def test_scrambled_walk_avoids_correlated_permutations(monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by search: with the paper's affine walk (offset + j*skip) these four
    # backends' preference orders are correlated enough that removing one moves
    # 1/4 + 2.2 % of the table. The shared scramble pi brings it back to noise.
    import l4lb.maglev as maglev

    m, seed = 65521, (282).to_bytes(12, "little")
    weights = equal(4, weight=1)
    gone = v4(4)

    def excess() -> float:
        return changed_fraction(build(weights, m, seed), build(weights | {gone: 0}, m, seed)) - 1 / 4

    assert excess() <= 0.005
    monkeypatch.setattr(maglev, "_scramble", lambda m, seed: np.arange(m, dtype=np.int64))
    assert excess() > 0.015  # proves this case really exercises the scramble


# ---------------------------------------------------------------- reference


def reference_build(weights: dict[tuple[str, int], int], m: int, seed: bytes) -> np.ndarray:
    """The assignment the module docstring defines, one candidate at a time:
    visit (backend, position) pairs by increasing (clock[j] / w, backend) and
    give each free slot to the first visitor with quota left. Slow; small m only."""
    from l4lb.maglev import _clock, _offset_skip, _quotas, _scramble

    ids = tuple(sorted(weights))
    w = np.array([weights[i] for i in ids], dtype=np.int64)
    offset, skip = _offset_skip(ids, m, seed)
    need = _quotas(w, m).tolist() if w.sum() else [0] * len(ids)
    clock, pi = _clock(m), _scramble(m, seed)
    visits = sorted(
        (clock[j] / w[i], i, int((offset[i] + pi[j] * skip[i]) % m))
        for i in range(len(ids))
        if w[i] > 0
        for j in range(m)
    )
    table = [-1] * m
    for _, i, slot in visits:
        if need[i] and table[slot] < 0:
            table[slot] = i
            need[i] -= 1
    return np.array(table, dtype=np.int32)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=seeds)
def test_vectorised_build_follows_the_one_by_one_definition(data, seed) -> None:
    # The rounds may differ from the sequential greedy only where a backend runs
    # out of quota mid-round: measured mean < 0.15 % of slots, most tables equal.
    m = data.draw(st.sampled_from([509, 1021, 2039]), label="m")
    idents = data.draw(identities(1, m // 50), label="identities")
    weights = {i: data.draw(st.integers(0, 65535) | st.just(1), label=f"w{i}") for i in idents}
    fast = build(weights, m, seed).table
    slow = reference_build(weights, m, seed)
    assert np.array_equal(fast >= 0, slow >= 0)
    assert np.mean(fast != slow) <= 0.03


# ---------------------------------------------------------------- determinism


@FAST
@given(idents=identities(1, 50), m=st.sampled_from(MAGLEV_SIZES[:6]), seed=seeds, data=st.data())
def test_insertion_order_does_not_matter(idents, m, seed, data) -> None:
    weights = {i: data.draw(st.integers(0, 1000), label=f"w{i}") for i in idents}
    shuffled = data.draw(st.permutations(list(weights.items())), label="order")
    a, b = build(weights, m, seed), build(dict(shuffled), m, seed)
    assert a.identities == b.identities
    assert np.array_equal(a.table, b.table)


@FAST
@given(
    idents=identities(2, 30),
    m=st.sampled_from(MAGLEV_SIZES[:6]),
    seeds_=st.lists(seeds, min_size=2, max_size=2, unique=True),
)
def test_different_seed_gives_different_table(idents, m, seeds_) -> None:
    weights = dict.fromkeys(idents, 1)
    assert not np.array_equal(build(weights, m, seeds_[0]).table, build(weights, m, seeds_[1]).table)


_DIGEST_CASES = [
    # (weights as list, m, seed hex)
    ([[v4(i)[0], 8080, 100] for i in range(1, 101)], 16381, SEED.hex()),
    ([["2001:0db8:0000:0000:0000:0000:0000:0001", 443, 3], [v4(7)[0], 443, 1], [v4(8)[0], 443, 0]], 251, "00" * 12),
]

_DIGEST_SCRIPT = """
import hashlib, json, sys
from l4lb.maglev import build
out = []
for weights, m, seed in json.loads(sys.stdin.read()):
    t = build({(a, p): w for a, p, w in weights}, m, bytes.fromhex(seed))
    out.append(hashlib.sha256(t.table.astype("<i4").tobytes()).hexdigest())
print(json.dumps(out))
"""

# Pinned: a change here means every deployed table changes on upgrade and
# established flows move, so it must be deliberate (update these and say so).
GOLDEN = [
    "8e6aca1644b6b2cd1e5411793a7f8a250cb36f3222e8fd006f163327717730fd",
    "70bc1420c89c14ebc4808269a55d8b72b14821cf862a0ca1a0515794897e48b0",
]


def _digests_here() -> list[str]:
    return [
        hashlib.sha256(
            build({(a, p): w for a, p, w in weights}, m, bytes.fromhex(seed)).table.astype("<i4").tobytes()
        ).hexdigest()
        for weights, m, seed in _DIGEST_CASES
    ]


def test_identical_across_processes_with_different_hash_seeds() -> None:
    here = _digests_here()
    for hash_seed in ("0", "12345"):
        env = os.environ | {"PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, "-c", _DIGEST_SCRIPT],
            input=json.dumps(_DIGEST_CASES),
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
            check=True,
        )
        assert json.loads(proc.stdout) == here, f"PYTHONHASHSEED={hash_seed} built a different table"


def test_tables_match_pinned_digests() -> None:
    assert _digests_here() == GOLDEN


# Build speed is measured in bench/maglev_build.py (printed by bench/datapath.py),
# never asserted in a unit test.


# ---------------------------------------------------------------- compiled rounds


def test_compiled_rounds_are_built_and_used() -> None:
    # pip (make setup / make install) builds l4lb/maglev_assign.c; without it every
    # table would quietly take the ~3x slower numpy path.
    from l4lb import maglevc
    assert maglevc.library() is not None, "l4lb/_maglev_assign*.so missing: run make setup"


@SLOW
@given(idents=identities(1, 400), m=st.sampled_from([251, 509, 2039, 16381]), seed=seeds, data=st.data())
def test_compiled_rounds_give_the_numpy_table(idents, m, seed, data) -> None:
    # The C file is the numpy rounds operation by operation: every table is bit-identical,
    # weights of every size (ties, zeros, huge ratios, more backends than m can serve) included.
    weights = {i: data.draw(st.one_of(st.sampled_from([0, 1, 2, 100, 65535]), st.integers(0, 65535))) for i in idents}
    assert build(weights, m, seed) == build(weights, m, seed, compiled=False)


def test_compiled_rounds_equal_numpy_at_the_daemons_sizes() -> None:
    # The documented shape (100 backends, M = 16381) and a big one (1,000, M = 65521).
    for n, m in ((100, 16381), (1000, 65521)):
        weights = {(f"192.0.2.{1 + j % 250}", 1000 + j): 100 + j % 7 for j in range(n)}
        assert build(weights, m, SEED) == build(weights, m, SEED, compiled=False)
