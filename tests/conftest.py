"""Shared fixtures. Root-only fixtures fail loudly (never skip) without root:
the suite is meant to run on a machine that can load BPF."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import strategies as st

# A shell without job control starts background commands (`make test &`) with SIGINT
# ignored, and an ignored signal stays ignored in every child: the tests that press
# Ctrl-C on l4lbctl or the demo would wait on a process that never hears it. A handled
# signal is reset to its default on exec, so children get Ctrl-C as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# Every character UTF-8 can encode (all but the surrogates): the set `st.text()` draws from
# by default, where Hypothesis gets it by encoding each of the 1.1 million code points
# (`characters(codec="utf-8")`, ~5 s per test process, more on a loaded VM, when a fresh
# clone has no .hypothesis cache yet). By category it is the same set, at once.
UNICODE = st.characters(exclude_categories=["Cs"])


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (BPF, XDP, network namespaces): run `make test` as root", pytrace=False)


@pytest.fixture(scope="session")
def bpffs() -> Iterator[Path]:
    """A private bpffs for the session (the machine has no /sys/fs/bpf)."""
    _require_root()
    from l4lb.lab.bpffs import private_bpffs

    with private_bpffs() as d:
        yield d


@pytest.fixture(scope="session")
def packet_env(bpffs: Path):
    """The real program on crafted packets (l4lb.lab.pktenv), compiled once for
    every module that runs it through BPF_PROG_TEST_RUN: 16 backends, M = 251.
    Tests program the services they need and put run-time knobs back."""
    from l4lb.lab.pktenv import PacketEnv

    with PacketEnv(bpffs, n_backends=16, maglev_m=251, max_backends=4096, flow_table_size=65536) as e:
        yield e


# --- network-namespace lab (l4lb.lab) -----------------------------------------------
# lab_decap: the backends' decapsulator, compiled once per session (~2.5 s).
# lab: a default lab (2 clients, LB, 3 backends), one per test module.
# lab_factory: lab_factory(**Lab kwargs) -> a started Lab, torn down after the test.

@pytest.fixture(scope="session")
def lab_decap():
    _require_root()
    from l4lb.lab import netns
    from l4lb.lab.decap import Decap

    netns.cleanup("l4t")            # leftovers of crashed runs (live runs are spared)
    return Decap.shared()


@pytest.fixture(scope="module")
def lab(lab_decap):
    from l4lb.lab.topology import Lab

    with Lab(clients=2, backends=3, decap=lab_decap) as the_lab:
        yield the_lab


@pytest.fixture
def lab_factory(lab_decap):
    from l4lb.lab.topology import Lab

    made = []

    def make(**kwargs):
        kwargs.setdefault("decap", lab_decap)
        made.append(Lab(**kwargs))
        return made[-1].up()

    yield make
    for one in reversed(made):
        one.teardown()

