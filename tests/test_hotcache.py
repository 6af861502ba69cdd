"""The datapath's per-CPU caches of `services` and `ifaces` (bpf_src/lib/hotcache.h)
in the real program, via BPF_PROG_TEST_RUN: every change the control path makes
reaches the next packet, and it is the epoch bump (Tables.tables_changed) that
makes a write visible -- the proof that the cache is really in use and that the
bump is what keeps it honest. The worker is pinned to one CPU: the caches are
per CPU."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator

import pytest
from scapy.all import IP, TCP, Ether, raw

from l4lb.lab.pktenv import EDGE_IF, EDGE_V4, edge_backends_v4
from l4lb.models import Service

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

XDP_PASS, XDP_TX = 2, 3
VIP = "198.51.100.77"
B = edge_backends_v4(4)
PKT = raw(Ether(dst="02:11:11:11:11:11", src="02:22:22:22:22:22") / IP(src="203.0.113.9", dst=VIP)
          / TCP(sport=40000, dport=80, flags="A"))


@pytest.fixture(scope="module")
def env(packet_env) -> Iterator:
    cpu = max(os.sched_getaffinity(0))
    before = packet_env.call(os.sched_getaffinity, 0)
    packet_env.call(os.sched_setaffinity, 0, {cpu})
    try:
        yield packet_env
    finally:
        packet_env.call(os.sched_setaffinity, 0, before)
        packet_env.apply([])


def svc(**options) -> Service:
    return Service(name="hc", vip=VIP, port=80, options=options,
                   backends=[{"address": a, **({"port": 8080} if options.get("l4_dnat") else {})} for a in B])


def send(env) -> tuple[int, bytes]:
    v, out, _ = env.run(PKT)
    return v, out


def test_every_service_change_reaches_the_next_packet(env):
    env.apply([svc()])
    v, out = send(env)
    assert v == XDP_TX and Ether(out)[IP].payload[TCP].dport == 80
    env.apply([svc(l4_dnat=True)])          # flags and backends of the cached entry change
    v, out = send(env)
    assert v == XDP_TX and Ether(out)[IP].payload[TCP].dport == 8080
    env.apply([])                           # gone: the kernel's
    assert send(env)[0] == XDP_PASS
    env.apply([svc()])
    assert send(env)[0] == XDP_TX


def test_a_services_write_is_seen_only_after_the_epoch_bump(env):
    env.apply([svc()])
    assert send(env)[0] == XDP_TX           # cached on this CPU
    t = env.dp.tables
    key = t.svc_key(ipaddress.ip_address(VIP), 80, socket.IPPROTO_TCP)
    saved = t.services[key]
    del t.services[key]
    try:
        assert send(env)[0] == XDP_TX, "the cache was not used: the write alone was seen"
        env.call(t.tables_changed)
        assert send(env)[0] == XDP_PASS, "a bumped epoch must invalidate the cached entry"
    finally:
        t.services[key] = saved
        env.call(t.tables_changed)
    assert send(env)[0] == XDP_TX


def test_an_ifaces_write_is_seen_only_after_the_epoch_bump(env):
    """The outer IPv4 source comes from the egress NIC's `ifaces` entry (no
    outer-source prefix configured here)."""
    env.apply([svc()])
    v, out = send(env)
    assert v == XDP_TX and Ether(out)[IP].src == EDGE_V4
    t = env.dp.tables
    key = t.ifaces.Key(env.edge_ifindex)
    saved = t.ifaces[key]
    changed = t.ifaces.Leaf.from_buffer_copy(bytes(saved))
    changed.v4 = int.from_bytes(bytes([192, 0, 2, 99]), "little")
    t.ifaces[key] = changed
    try:
        assert Ether(send(env)[1])[IP].src == EDGE_V4, "the cache was not used"
        env.call(t.tables_changed)
        assert Ether(send(env)[1])[IP].src == "192.0.2.99"
    finally:
        t.ifaces[key] = saved
        env.call(t.tables_changed)
    assert Ether(send(env)[1])[IP].src == EDGE_V4, EDGE_IF
