"""Backend-side decapsulation of *fragmented* tunnel packets (lab only).

When the LB hands a DF-clear packet that is too big for the tunnel to its
kernel, the kernel fragments the outer IPIP datagram (RFC 2003 5.1). A real
backend's kernel reassembles the outer datagram and then decapsulates it
(``ipip`` module). The lab kernel has no ``ipip``, and the lab's XDP
decapsulator (``bpf_src/decap.c``) sees fragments before reassembly, so it
passes them on. This process stands in for the ``ipip`` module for those:
it reads the kernel's *reassembled* IPIP datagrams from a raw socket
(protocol 4: the kernel delivers them there, instead of answering "protocol
unreachable") and writes the inner packet into a tun device, from which the
kernel receives it as if it had arrived decapsulated. A tool of its own,
since nothing else on this kernel decapsulates after reassembly.

``start(ns)`` runs it in a backend's namespace (it prints ``READY`` once
listening); ``stop(proc)`` ends it. The kernel's own counters (``IpReasmOKs``)
tell that a reassembly happened.
"""

from __future__ import annotations

import subprocess
import sys

from l4lb.lab import netns

TUN = "tdecap0"

SCRIPT = r'''
import fcntl, os, socket, struct, subprocess, sys
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
name = sys.argv[1]
tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
subprocess.run(["ip", "link", "set", name, "up"], check=True)
with open(f"/proc/sys/net/ipv4/conf/{name}/rp_filter", "w") as f:
    f.write("0")                      # the inner source (the client) is not routed via the tun
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IPIP)
print("READY", flush=True)
while True:
    pkt = raw.recv(65535)             # IPv4 raw sockets get the IP header too
    inner = pkt[(pkt[0] & 0x0F) * 4:]
    if inner and inner[0] >> 4 == 4:
        os.write(tun, inner)
'''


def start(ns: str) -> subprocess.Popen:
    proc = netns.popen(ns, sys.executable, "-I", "-c", SCRIPT, TUN, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "READY":
        err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
        netns.stop(proc)
        raise netns.NetnsError(f"tunnel reassembly helper in {ns} did not start: {line!r} {err.strip()}")
    return proc


def stop(proc: subprocess.Popen) -> None:
    netns.stop(proc)
