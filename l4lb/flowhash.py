"""The datapath's flow hash in Python (bpf_src/lib/jhash.h + lookup.h), so
tests and tools can predict which Maglev slot a flow lands in."""

from __future__ import annotations

import ipaddress

M32 = 0xFFFFFFFF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & M32


def jhash_6words(k: list[int], initval: int) -> int:
    a = b = c = (0xDEADBEEF + (6 << 2) + initval) & M32
    a = (a + k[0]) & M32
    b = (b + k[1]) & M32
    c = (c + k[2]) & M32
    # JHASH_MIX
    a = (a - c) & M32; a ^= _rol(c, 4); c = (c + b) & M32
    b = (b - a) & M32; b ^= _rol(a, 6); a = (a + c) & M32
    c = (c - b) & M32; c ^= _rol(b, 8); b = (b + a) & M32
    a = (a - c) & M32; a ^= _rol(c, 16); c = (c + b) & M32
    b = (b - a) & M32; b ^= _rol(a, 19); a = (a + c) & M32
    c = (c - b) & M32; c ^= _rol(b, 4); b = (b + a) & M32
    a = (a + k[3]) & M32
    b = (b + k[4]) & M32
    c = (c + k[5]) & M32
    # JHASH_FINAL
    c ^= b; c = (c - _rol(b, 14)) & M32
    a ^= c; a = (a - _rol(c, 11)) & M32
    b ^= a; b = (b - _rol(a, 25)) & M32
    c ^= b; c = (c - _rol(b, 16)) & M32
    a ^= c; a = (a - _rol(c, 4)) & M32
    b ^= a; b = (b - _rol(a, 14)) & M32
    c ^= b; c = (c - _rol(b, 24)) & M32
    return c


def flow_hash(client: str, client_port: int, service_port: int, proto: int, seed: int,
              *, hash_src_port: bool = True, affinity_prefix: int | None = None) -> int:
    """Hash of (client address, client port, service port, protocol).

    With ``affinity_prefix`` the client address is cut to that many leading
    bits first (lookup.h mask_address), so a client network shares a backend.
    The C side reads ports in network order as 16-bit loads on a little-endian
    host; we reproduce those exact values."""
    addr = ipaddress.ip_address(client)
    if affinity_prefix is not None:
        addr = ipaddress.ip_network((addr, affinity_prefix), strict=False).network_address
    raw = addr.packed.ljust(16, b"\0")
    words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]
    sport = _be16(client_port) if hash_src_port else 0
    words.append(((sport << 16) | _be16(service_port)) & M32)
    words.append(proto)
    return jhash_6words(words, seed)


def _be16(port: int) -> int:
    return ((port & 0xFF) << 8) | (port >> 8)
