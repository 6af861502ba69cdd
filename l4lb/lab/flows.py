"""Frames of many distinct flows, for the benches' "new connection" rows.

Flow number j of a template is the template with the client (source) port
1 + j % 65535 and the last byte of the client address (j // 65535) % 256: the
order in which bpf_src/lib/bench.h (BENCH_NEXT_FLOW) and bench/c/trafficgen.c
step through flows, so all three name the same flow by the same number. That
gives 65,535 x 256 distinct flows per template before one repeats.
"""

from __future__ import annotations

import numpy as np

FLOWS_PER_BYTE = 65535
FLOW_SPACE = FLOWS_PER_BYTE * 256
ETH_HLEN = 14


def _layout(frame: bytes) -> tuple[int, int, int]:
    """(offset of the client address's last byte, of the L4 header, L4 checksum offset in it)."""
    ethertype = frame[12:14]
    if ethertype == b"\x08\x00":
        if frame[ETH_HLEN] != 0x45:
            raise ValueError("IPv4 with options is not supported")
        last, l4, proto = ETH_HLEN + 15, ETH_HLEN + 20, frame[ETH_HLEN + 9]
    elif ethertype == b"\x86\xdd":
        last, l4, proto = ETH_HLEN + 23, ETH_HLEN + 40, frame[ETH_HLEN + 6]
    else:
        raise ValueError("not an IPv4/IPv6 frame")
    if proto not in (6, 17):
        raise ValueError("the frame must carry TCP or UDP right after the IP header")
    return last, l4, 16 if proto == 6 else 6


def flow_of(frame: bytes) -> int:
    """The flow number of `frame` (see the module docstring)."""
    last, l4, _ = _layout(frame)
    port = int.from_bytes(frame[l4:l4 + 2], "big")
    if not 1 <= port <= FLOWS_PER_BYTE:
        raise ValueError("client port 0 is not a flow number")
    return frame[last] * FLOWS_PER_BYTE + port - 1


def _fold(total: np.ndarray) -> np.ndarray:
    while (total >> 16).any():
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF).astype(np.uint16)


def _sum16(block: np.ndarray) -> np.ndarray:
    """Per row, the sum of big-endian 16-bit words of `block` (an even number of bytes)."""
    w = np.ascontiguousarray(block).view(">u2")
    return w.sum(axis=1, dtype=np.uint64)


def flow_frames(template: bytes, first: int, n: int) -> np.ndarray:
    """Flows first .. first+n-1 of `template` (Ethernet, IPv4 without options or IPv6
    without extension headers, then TCP or UDP), one frame per row, with the IPv4
    header checksum and the TCP/UDP checksum recomputed."""
    out = np.tile(np.frombuffer(template, dtype=np.uint8), (n, 1))
    for start in range(0, n, CHUNK):  # chunks: the checksum sums widen to 32 bits
        _fill(out[start:start + CHUNK], template, first + start)
    return out


CHUNK = 1 << 16


def _fill(f: np.ndarray, template: bytes, first: int) -> None:
    last, l4, csum_at = _layout(template)
    n = len(f)
    j = np.arange(first, first + n, dtype=np.int64) % FLOW_SPACE
    port = 1 + j % FLOWS_PER_BYTE
    f[:, last] = j // FLOWS_PER_BYTE
    f[:, l4], f[:, l4 + 1] = port >> 8, port & 0xFF
    v6 = template[12:14] == b"\x86\xdd"
    if not v6:
        f[:, ETH_HLEN + 10:ETH_HLEN + 12] = 0
        c = _fold(_sum16(f[:, ETH_HLEN:ETH_HLEN + 20]))
        f[:, ETH_HLEN + 10], f[:, ETH_HLEN + 11] = c >> 8, c & 0xFF
    seg = len(template) - l4
    body = f[:, l4:]
    body[:, csum_at:csum_at + 2] = 0
    if seg % 2:
        body = np.concatenate([body, np.zeros((n, 1), dtype=np.uint8)], axis=1)
    addrs = f[:, ETH_HLEN + 8:ETH_HLEN + 40] if v6 else f[:, ETH_HLEN + 12:ETH_HLEN + 20]
    proto = template[ETH_HLEN + (6 if v6 else 9)]
    c = _fold(_sum16(addrs) + _sum16(body) + proto + seg)
    if proto == 17:
        c[c == 0] = 0xFFFF  # a UDP checksum of 0 means "none"
    f[:, l4 + csum_at], f[:, l4 + csum_at + 1] = c >> 8, c & 0xFF
