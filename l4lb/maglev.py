"""Pure-Python weighted Maglev lookup-table builder (no kernel access).

The table maps each of ``m`` slots (``m`` prime, from ``MAGLEV_SIZES``) to a
backend. The datapath hashes a flow to a slot, so the table must be a pure
function of *what* the backends are, never of how or when they were added: we
sort the identities and derive everything from the identity bytes and a 12-byte
seed. Nothing here uses Python's ``hash()``, which is salted per process.

Permutations (Maglev, de-correlated)
    For backend ``i`` a keyed BLAKE2b of its identity gives two 64-bit numbers
    ``h1, h2``; ``offset = h1 % m`` and ``skip = h2 % (m - 1) + 1`` as in the
    paper. The paper's walk ``(offset + j * skip) % m`` makes any two backends'
    preference orders affine images of each other, which occasionally correlates
    them badly; we walk ``p_i(j) = (offset + pi(j) * skip) % m`` instead, where
    ``pi`` is one seeded pseudo-random permutation of ``range(m)`` shared by all
    backends (see ``_scramble``). Because ``m`` is prime each ``p_i`` is still a
    permutation of the slots: backend ``i``'s order of preference.

Quotas
    Backend ``i`` gets exactly ``quota_i`` slots, the weight-proportional share of
    ``m`` rounded by the largest-remainder method (ties to the earlier identity),
    so shares are as exact as integers allow. A backend with weight > 0 gets at
    least one slot whenever ``m`` can give one to every such backend, so an
    active backend never silently receives no traffic.

Assignment (what the table *is*)
    Every backend walks its preference order on a clock: position ``j`` is
    reached at time ``key = clock[j] / w_i`` where ``clock[j] = sum_{k<=j}
    1/(m-k)`` (the discrete exponential clock, see ``_clock``), so heavier
    backends walk faster. Conceptually all candidates ``(i, j)`` are visited in
    increasing ``(key, i)`` order and a slot goes to the first visitor that still
    has quota left. With equal weights this is "everyone takes turns by
    position", close to the paper; with exponential clocks a contested slot goes
    to each contender with probability proportional to its weight, so when a
    backend leaves, its slots spread over the others about as their quotas grow
    and little else has to move.

Vectorisation (how it is computed fast)
    Visiting candidates one by one is far too slow in Python, so we work in
    rounds. Each round covers a band of keys ``[k0, k1)`` common to all backends:
    every backend with quota left proposes all its candidates in that band whose
    slot is still free. Each proposed slot goes to the proposer with the lowest
    ``(key, i)``; a backend accepts its wins in key order only up to its remaining
    quota. A slot won by a backend that ran out of quota in the same round stays
    free; proposers that lost it rewind to it and the next band restarts at its
    key, so no free slot is skipped. Bands never overlap, so across rounds the
    order is the conceptual one; within a round it differs only in those
    quota-exhaustion corner cases (measured: most tables are identical to the
    one-by-one greedy, on average < 0.15% of slots differ and at most ~2% at
    m = 251; deterministically either way). A band is sized to scan about ``m``
    candidates, which claims roughly two thirds of the free slots per round:
    ~log(m) rounds for any N, never m/N rounds. In the late rounds, when few
    slots are free but a band still spans ~m positions, the same candidates
    are found backwards: for each free slot, the position at which each
    backend's walk reaches it (pi^-1 of (slot - offset) / skip mod m), which
    is far less work and gives the same candidates in the same order.
    ``build_many`` spreads many tables over worker processes.

Limits (measured, see tests/test_maglev.py)
    Exact shares cost some disruption: removing one of N backends moves its own
    slots plus roughly 0.005-0.0075 of the table at m >= 32749 (m >= 100 N),
    about 0.009 at m = 16381 and up to ~0.02 at m = 2039.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from l4lb import maglevc
from l4lb.models import MAGLEV_SIZES, MAX_WEIGHT

SEED_LEN = 12  # Cilium's maglev hash seed is 12 bytes; keep the same shape.

Identity = tuple[str, int]


@dataclass(frozen=True, eq=False)
class MaglevTable:
    """Result of :func:`build`.

    ``identities`` holds every backend passed in (weight 0 included), sorted, so
    an index stays meaningful however weights change. ``table[slot]`` is an
    index into ``identities``, or -1 in every slot when nobody has weight > 0.
    """

    identities: tuple[Identity, ...]
    table: np.ndarray

    @property
    def m(self) -> int:
        return int(self.table.shape[0])

    def backend_at(self, slot: int) -> Identity | None:
        if not 0 <= slot < self.m:
            raise IndexError(f"slot {slot} out of range for a table of size {self.m}")
        idx = int(self.table[slot])
        return None if idx < 0 else self.identities[idx]

    # ndarray has no usable ``==`` for a dataclass, so compare content explicitly.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaglevTable):
            return NotImplemented
        return self.identities == other.identities and np.array_equal(self.table, other.table)

    def __hash__(self) -> int:
        return hash((self.identities, self.table.tobytes()))


def _validate(weights: Mapping[Identity, int], m: int, seed: bytes) -> None:
    if m not in MAGLEV_SIZES:
        raise ValueError(f"Maglev table size m must be one of {MAGLEV_SIZES}, not {m!r}")
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_LEN:
        got = f"{len(seed)} bytes" if isinstance(seed, (bytes, bytearray)) else type(seed).__name__
        raise ValueError(f"Maglev seed must be exactly {SEED_LEN} bytes, got {got}")
    for ident, w in weights.items():
        if (
            not isinstance(ident, tuple)
            or len(ident) != 2
            or not isinstance(ident[0], str)
            or not isinstance(ident[1], int)
            or isinstance(ident[1], bool)
        ):
            raise ValueError(f"backend identity must be (address: str, port: int), got {ident!r}")
        # Callers must agree on one spelling of an address, or the same backend
        # would hash differently (e.g. "::1" vs "0000:...:0001") and move flows.
        canonical = _exploded(ident[0])
        if canonical is None:
            raise ValueError(f"backend identity {ident!r}: {ident[0]!r} is not an IP address")
        if canonical != ident[0]:
            raise ValueError(f"backend identity {ident!r}: address must be exploded, i.e. {canonical!r}")
        if not 0 <= ident[1] <= 65535:
            raise ValueError(f"backend identity {ident!r}: port must be in 0..65535")
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)):
            raise ValueError(f"weight of {ident} must be an integer, got {w!r}")
        if not 0 <= w <= MAX_WEIGHT:
            raise ValueError(f"weight of {ident} must be in 0..{MAX_WEIGHT}, got {w}")


@lru_cache(maxsize=1 << 16)
def _exploded(addr: str) -> str | None:
    # Cached: a daemon rebuilding tables validates the same addresses again and again.
    try:
        return ipaddress.ip_address(addr).exploded
    except ValueError:
        return None


def _offset_skip(identities: tuple[Identity, ...], m: int, seed: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Per-backend permutation parameters from a keyed hash of the identity."""
    offset = np.empty(len(identities), dtype=np.int64)
    skip = np.empty(len(identities), dtype=np.int64)
    key = bytes(seed)
    for i, (addr, port) in enumerate(identities):
        # The separator keeps (addr, port) unambiguous; the digest is identical in
        # every process and on every machine.
        digest = hashlib.blake2b(f"{addr}|{port}".encode(), digest_size=16, key=key).digest()
        offset[i] = int.from_bytes(digest[:8], "little") % m
        skip[i] = int.from_bytes(digest[8:], "little") % (m - 1) + 1
    return offset, skip


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser: exact wrapping uint64 maths, same result everywhere."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@lru_cache(maxsize=16)
def _scramble(m: int, seed: bytes) -> np.ndarray:
    """pi: a seeded pseudo-random permutation of range(m) shared by all backends.

    Classic Maglev walks offset + j*skip. Two such walks are affine images of
    each other, so when two backends' skips happen to have a simple ratio mod m
    their preference orders are strongly correlated and removing a backend can
    move several percent of unrelated slots (measured: ~1% of random 3-4 backend
    sets at m=65521 exceed the 1/N + 1% budget, up to 1/N + 4%). Walking
    offset + pi(j)*skip instead keeps every backend's walk a permutation but
    makes any two walks look independent. pi sorts the indices by a hash that
    is a bijection on uint64 (so all keys differ and every sort algorithm gives
    the same order) computed in exact integer maths: identical on every
    machine. It is cached per (m, seed).
    """
    salt = int.from_bytes(hashlib.blake2b(b"maglev-scramble", digest_size=8, key=seed).digest(), "little")
    keys = _splitmix64(np.arange(m, dtype=np.uint64) ^ np.uint64(salt))
    pi = np.argsort(keys).astype(np.int64)
    pi.flags.writeable = False
    return pi


_inverses: dict[tuple[int, bytes], tuple[np.ndarray, np.ndarray]] = {}


def _unscramble(pi: np.ndarray, seed: bytes) -> np.ndarray:
    """pi's inverse (position of each value in pi), cached next to the pi it inverts."""
    hit = _inverses.get((len(pi), seed))
    if hit is None or hit[0] is not pi:
        pi_inv = np.empty(len(pi), dtype=np.int64)
        pi_inv[pi] = np.arange(len(pi), dtype=np.int64)
        pi_inv.flags.writeable = False
        if len(_inverses) >= 16:
            _inverses.clear()
        hit = _inverses[(len(pi), seed)] = (pi, pi_inv)
    return hit[1]


def _quotas(w: np.ndarray, m: int) -> np.ndarray:
    """Largest-remainder apportionment of m slots by weight (exact integer maths)."""
    total = int(w.sum())
    scaled = w * m  # each term <= 65535 * 131071 < 2**33: int64 is exact
    quota = scaled // total
    rem = scaled - quota * total
    short = m - int(quota.sum())
    # Biggest remainder first, earlier identity on ties: lexsort's last key is primary.
    order = np.lexsort((np.arange(len(w)), -rem))
    quota[order[:short]] += 1
    # Give every positive-weight backend at least one slot when possible, taking
    # it from the currently largest quotas (earlier identity on ties).
    positive = w > 0
    if int(positive.sum()) <= m:
        for i in np.flatnonzero(positive & (quota == 0)):
            donor = int(np.lexsort((np.arange(len(w)), -quota))[0])
            quota[donor] -= 1
            quota[i] = 1
    return quota


@lru_cache(maxsize=len(MAGLEV_SIZES))
def _clock(m: int) -> np.ndarray:
    """clock[j]: the time at which a backend of weight 1 reaches position j.

    It is the discrete exponential clock sum_{k<=j} 1/(m-k): for a random
    permutation, the chance that a given slot sits at position k given it was
    not at an earlier one is 1/(m-k). Racing these clocks scaled by 1/w (lowest
    clock/w first) hands a contested slot to backend i with probability
    ~ w_i / sum(w) -- the weighted-rendezvous property -- so when a backend
    leaves, its slots go to the others roughly in proportion to their new
    quotas. A plain position/w race would favour heavy backends (e.g. 3/4
    instead of 2/3 for weights 2:1) and the surplus would cascade.
    Built from IEEE division and a sequential cumsum (never pairwise), so it is
    bit-identical on every machine, unlike libm's log.
    """
    clock = np.cumsum(1.0 / (m - np.arange(m, dtype=np.float64)))
    clock.flags.writeable = False
    return clock


def build(weights: Mapping[Identity, int], m: int, seed: bytes, *, compiled: bool = True) -> MaglevTable:
    """Build the Maglev table for ``weights`` (identity -> weight) of size ``m``.

    The rounds run in l4lb/maglev_assign.c when it is built (``compiled``, the
    default; the whole build ~2x faster), in numpy otherwise: the same table
    either way."""
    _validate(weights, m, seed)
    identities = tuple(sorted(weights))
    n = len(identities)
    w = np.array([int(weights[i]) for i in identities], dtype=np.int64)
    owner = np.full(m, -1, dtype=np.int32)
    if n == 0 or int(w.sum()) == 0:
        owner.flags.writeable = False
        return MaglevTable(identities, owner)

    offset, skip = _offset_skip(identities, m, seed)
    need = _quotas(w, m)
    wf = w.astype(np.float64)
    clock = _clock(m)
    pi = _scramble(m, bytes(seed))
    pi_inv = _unscramble(pi, bytes(seed))
    if not (compiled and maglevc.assign(owner, wf, need, offset, skip, clock, pi, pi_inv)):
        _assign(owner, wf, need, offset, skip, clock, pi, pi_inv)
    owner.flags.writeable = False
    return MaglevTable(identities, owner)


def _assign(owner: np.ndarray, wf: np.ndarray, need: np.ndarray, offset: np.ndarray, skip: np.ndarray,
            clock: np.ndarray, pi: np.ndarray, pi_inv: np.ndarray) -> None:
    """The rounds (see the module's docstring), in numpy: fills ``owner`` (all -1 on
    entry) and consumes ``need``. The reference for l4lb/maglev_assign.c."""
    m, n = len(owner), len(wf)
    inv_skip: np.ndarray | None = None  # skip^-1 mod m, for walking back (late rounds)
    # ptr[i]: first permutation position backend i has not proposed yet.
    ptr = np.zeros(n, dtype=np.int64)
    k0 = 0.0
    free = m
    is_free = np.ones(m, dtype=bool)  # owner < 0, as bytes: the hot filter below reads it
    # Per-slot scratch for conflict resolution, reset after each round.
    best_key = np.full(m, np.inf)
    best_b = np.full(m, n, dtype=np.int64)
    while free:
        active = np.flatnonzero(need > 0)
        wa = wf[active]
        start = ptr[active]
        # Band width: at the current positions backend i covers w_i * (m - ptr_i)
        # permutation positions per unit of key, so this scans about m candidates
        # in total. (An active backend always has ptr < m: every free slot lies
        # ahead of it, or it was rewound to it.)
        next_keys = clock[start] / wa
        first = int(np.argmin(next_keys))
        k1 = max(k0 + m / float((wa * (m - start)).sum()), float(next_keys[first]))
        # Positions whose key clock[j] / w_i is below k1; the backend holding the
        # globally next candidate always takes it, so every round makes progress
        # even when the band is tiny (small m, huge weights) or rounding bites.
        end = np.minimum(np.maximum(np.searchsorted(clock, k1 * wa, side="left"), start), m)  # np.clip, cheaper
        end[first] = max(int(end[first]), int(start[first]) + 1)
        counts = end - start
        total = int(counts.sum())
        if total == 0:  # cannot happen: quotas sum to m and permutations are complete
            raise AssertionError("Maglev builder stalled")
        # Flattened candidates on free slots, grouped by backend, positions increasing.
        if 2 * free * len(active) < total:
            # Late rounds: few slots are free but the bands are as wide as ever, so
            # walk back from the free slots instead: where does each backend's walk
            # reach each of them? The same candidates, at a fraction of the work.
            if inv_skip is None:
                inv_skip = np.array([pow(int(x), m - 2, m) for x in skip], dtype=np.int64)  # m is prime
            free_s = np.flatnonzero(is_free)
            pos = (free_s[None, :] - offset[active][:, None]) % m
            pos *= inv_skip[active][:, None]
            pos %= m
            pos = pi_inv[pos]
            row, col = np.nonzero((pos >= start[:, None]) & (pos < end[:, None]))
            pos = pos[row, col]
            order = np.lexsort((pos, row))
            cand_b, cand_j, cand_s = active[row[order]], pos[order], free_s[col[order]]
            ptr[active] = end
            k0 = k1
            if not cand_b.size:
                continue
        else:
            # Per-backend values are repeated (cheaper than gathers), slots computed in place.
            group_start = np.cumsum(counts) - counts
            cand_j = np.arange(total, dtype=np.int64)
            cand_j -= np.repeat(group_start - start, counts)
            cand_s = pi[cand_j]
            cand_s *= np.repeat(skip[active], counts)
            cand_s += np.repeat(offset[active], counts)
            cand_s %= m
            ptr[active] = end
            k0 = k1
            # Only free slots are worth proposing.
            keep = np.flatnonzero(is_free[cand_s])
            if not keep.size:
                continue
            cand_b = np.repeat(active, counts)[keep]
            cand_j, cand_s = cand_j[keep], cand_s[keep]
        key = clock[cand_j] / wf[cand_b]
        # Winner per slot: lowest key, then lowest backend index.
        np.minimum.at(best_key, cand_s, key)
        at_best = key == best_key[cand_s]
        np.minimum.at(best_b, cand_s[at_best], cand_b[at_best])
        won = at_best & (best_b[cand_s] == cand_b)
        best_key[cand_s] = np.inf
        best_b[cand_s] = n
        # Each backend keeps its wins in key order (= candidate order) up to quota.
        wb = cand_b[won]
        ws = cand_s[won]
        # (np.r_ and np.diff cost more than the arithmetic here, ~25 rounds a table.)
        starts = np.empty(wb.size, dtype=bool)
        starts[:1] = True
        np.not_equal(wb[1:], wb[:-1], out=starts[1:])
        group_first = np.flatnonzero(starts)
        bounds = np.append(group_first, wb.size)
        rank = np.arange(wb.size) - np.repeat(group_first, bounds[1:] - bounds[:-1])
        accept = rank < need[wb]
        wb, ws = wb[accept], ws[accept]
        owner[ws] = wb.astype(np.int32)
        is_free[ws] = False
        np.subtract.at(need, wb, 1)
        free -= int(wb.size)
        # A slot still free after the round was won by a backend that ran out of
        # quota; proposers that lost it (and still need slots) rewind to it and
        # the next band restarts at its key, so it is offered again in order.
        left = is_free[cand_s] & (need[cand_b] > 0)
        if left.any():
            rb, rj = cand_b[left], cand_j[left]
            np.minimum.at(ptr, rb, rj)
            k0 = min(k0, float((clock[rj] / wf[rb]).min()))


# --- many tables at once ------------------------------------------------------------

# Below this many tables, worker processes cost more (start-up, pickling) than
# they save: a drain rebuilds one table, a full document a thousand.
PARALLEL_MIN = 16
_CHUNK = 8  # tables per message: small, so an abandoned batch drains quickly

log = logging.getLogger(__name__)


def _send(stream: BinaryIO, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _recv(stream: BinaryIO) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("Maglev worker stream ended mid-message")
    return pickle.loads(data)


class _Workers:
    """Long-lived ``python -m l4lb.maglev`` processes, one chunk of jobs in
    flight each. Plain pipes, not multiprocessing: nothing depends on the
    caller's ``__main__``, and a worker that fails is simply replaced by
    building here. Workers exit when their stdin closes (also when we die)."""

    def __init__(self, n: int) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.procs = [subprocess.Popen([sys.executable, "-m", "l4lb.maglev"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=env) for _ in range(n)]

    def map(self, jobs: list[tuple[dict[Identity, int], int, bytes]]) -> Iterator[MaglevTable]:
        chunks = iter([jobs[i:i + _CHUNK] for i in range(0, len(jobs), _CHUNK)])
        inflight: deque[subprocess.Popen[bytes]] = deque()
        try:
            for proc in self.procs:
                chunk = next(chunks, None)
                if chunk is None:
                    break
                _send(proc.stdin, chunk)  # type: ignore[arg-type]
                inflight.append(proc)
            while inflight:
                proc = inflight.popleft()
                results = _recv(proc.stdout)  # type: ignore[arg-type]
                if results is None:
                    raise EOFError(f"Maglev worker {proc.pid} exited ({proc.poll()})")
                chunk = next(chunks, None)
                if chunk is not None:
                    _send(proc.stdin, chunk)  # type: ignore[arg-type]
                    inflight.append(proc)
                for identities, raw in results:
                    table = np.frombuffer(raw, dtype=np.int32)  # read-only, like build()'s
                    yield MaglevTable(identities, table)
        finally:
            # Abandoned halfway (the caller failed): read what is still coming, so the
            # next batch starts clean.
            for proc in inflight:
                _recv(proc.stdout)  # type: ignore[arg-type]

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_workers: _Workers | None = None
_workers_lock = threading.Lock()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _drop_workers() -> None:
    global _workers
    if _workers is not None:
        workers, _workers = _workers, None
        with contextlib.suppress(Exception):
            workers.close()


def start_workers() -> None:
    """Start the worker processes now rather than on the first big apply (a
    daemon calls this at start: a worker's interpreter and numpy take ~0.5 s)."""
    global _workers
    if _cpus() > 1 and _workers_lock.acquire(blocking=False):
        try:
            if _workers is None:
                _workers = _Workers(_cpus())
                atexit.register(_drop_workers)
        finally:
            _workers_lock.release()


def build_many(jobs: Sequence[Mapping[Identity, int]], m: int, seed: bytes) -> Iterator[MaglevTable]:
    """``build(w, m, seed)`` for every ``w`` in ``jobs``, yielded in order.

    Many tables are built by worker processes (one per CPU, started on first
    need and kept) while the caller consumes the ones already done; ``build``
    is a pure function, so the tables are the same either way. If a worker
    fails, the rest is built here."""
    global _workers
    done = 0
    # Workers serve one batch at a time; whoever finds them busy builds here. A
    # few tables are built here: a round trip to a worker cost more (~1-2 ms)
    # than it saved, once the daemon's upkeep stopped competing for the GIL.
    if (jobs and len(jobs) >= PARALLEL_MIN and _cpus() > 1
            and _workers_lock.acquire(blocking=False)):
        try:
            if _workers is None:
                _workers = _Workers(_cpus())
                atexit.register(_drop_workers)
            for table in _workers.map([(dict(w), m, bytes(seed)) for w in jobs]):
                done += 1
                yield table
        except (OSError, EOFError, pickle.PickleError) as e:
            log.warning("Maglev workers failed (%s); building the remaining %d tables here", e, len(jobs) - done)
            _drop_workers()
        finally:
            _workers_lock.release()
    for w in jobs[done:]:
        yield build(w, m, seed)


def _serve() -> None:
    """Worker loop: lists of (weights, m, seed) in, (identities, table bytes) out, until EOF."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while (jobs := _recv(inp)) is not None:
        tables = [build(w, m, seed) for w, m, seed in jobs]
        _send(out, [(t.identities, t.table.tobytes()) for t in tables])


if __name__ == "__main__":
    _serve()
