"""Probers on non-blocking sockets, driven by one epoll loop (l4lb/health/scheduler.py).

Each attempt is a small state machine that the loop feeds readiness events:

* tcp:     connect; success when the handshake completes. Closed with an
           RST (SO_LINGER 0): at thousands of checks per second, TIME_WAIT
           would otherwise run the LB out of local ports.
* http(s): connect, (TLS handshake, certificate not verified unless asked),
           one request (h11 writes and parses HTTP/1.1), success on an
           expected status and, if asked, a body substring in the first 64 KiB.
* udp-dns: one query (dnspython builds and parses it); success on a reply to
           it with RCODE NOERROR, whatever its answers.

Through the tunnel (``via = "tunnel"``) the socket connects to VIP:port with
SO_MARK naming the backend and the LB's own address towards it as source;
the tc encapsulator (bpf_src/hc_encap.c) does the rest. ``direct`` connects
to the backend's own address.

Why not asyncio: a coroutine, a future and a transport per check cost more
than the whole check at 5,000 checks/s (see bench/health.py); an epoll loop
over plain sockets does the same work in a few syscalls per check.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Any

from l4lb.health.targets import ProbeSpec
from l4lb.models import CheckType

EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP = 0x001, 0x004, 0x008, 0x010
LINGER_RST = struct.pack("ii", 1, 0)
BODY_LIMIT = 64 * 1024
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


FAILURE_KINDS = ("timeout", "refused", "reset", "unreachable", "tls", "http", "dns", "error")


def failure_kind(error: str) -> str:
    """The class of a failed check's error text, for counters (a bounded set of
    label values; the text itself is kept per probe and in the recent failures):
    timeout, refused, reset, unreachable, tls, http, dns or error."""
    e = error.lower()
    if e.startswith("timeout"):
        return "timeout"
    if "refused" in e:
        return "refused"
    if "reset" in e:
        return "reset"
    if "unreachable" in e or "no route" in e:
        return "unreachable"
    if e.startswith("tls"):
        return "tls"
    if e.startswith(("http", "body ", "the first", "connection closed before")):
        return "http"
    if e.startswith("dns"):
        return "dns"
    return "error"


class LocalError(Exception):
    """The LB could not start a probe (no socket, no tunnel): not the backend's fault."""


@dataclass(frozen=True)
class Route:
    """How a probe's socket leaves the LB: ``mark`` and ``source`` for the tunnel.
    ``no_route``: the LB has no route to the tunnel's backend, so client traffic
    to it cannot leave either; each check fails at once (as a direct probe's
    connect does with "no route to host"), and a box whose backends are all
    unreachable from it stops serving them (and, with BGP, withdraws)."""

    mark: int = 0
    source: str | None = None
    no_route: str | None = None   # the backend's address, when the LB has no route to it


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Attempt:
    """One probe in flight. ``start`` returns the epoll events to wait for;
    ``event`` returns (ok, error) when done, or the next events (an int)."""

    __slots__ = ("spec", "route", "sock", "started", "deadline", "stage", "key")

    # The plain C socket type where nothing needs the Python wrapper (only TLS
    # does): its constructor and close() are C calls, a few µs less per check.
    socket_type: Any = socket.socket

    def __init__(self, spec: ProbeSpec, route: Route, started: float, timeout: float, key: Any) -> None:
        # The timeout runs from this attempt's own start (monotonic, the scheduler's
        # clock), not from the loop turn that launched it: a turn that launches a
        # burst (thousands come due after a stall) takes a while, and the last of
        # them would otherwise get that much less than their timeout.
        self.spec, self.route, self.started, self.deadline, self.key = spec, route, started, started + timeout, key
        self.sock: Any = None
        self.stage = "connecting"

    def _socket(self, kind: int) -> Any:
        spec, route = self.spec, self.route
        try:
            s = self.socket_type(_FAMILY[spec.family], kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as e:
            raise LocalError(f"socket: {e.strerror}") from None
        try:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            if route.mark:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, route.mark)
            if route.source:
                s.bind((route.source, 0))
        except OSError as e:
            s.close()
            raise LocalError(f"probe socket setup ({route}): {e.strerror}") from None
        self.sock = s
        return s

    def _connect(self, kind: int) -> int | tuple[bool, str]:
        if self.route.no_route is not None:
            return False, f"connect: no route from the LB to {self.route.no_route}"
        s = self._socket(kind)
        err = s.connect_ex((self.spec.dest, self.spec.port))
        if err == errno.EINPROGRESS:
            return EPOLLOUT
        if err == 0:
            return self.connected()
        if err in (errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.EPERM) and self.route.mark:
            raise LocalError(f"connect through the tunnel: {os.strerror(err)}")
        return False, f"connect: {os.strerror(err).lower()}"

    def start(self) -> int | tuple[bool, str]:
        return self._connect(socket.SOCK_STREAM)

    def connected(self) -> int | tuple[bool, str]:
        return True, ""

    def event(self, mask: int) -> int | tuple[bool, str]:
        if self.stage == "connecting":
            assert self.sock is not None
            # Writable without an error or hangup: the connect succeeded (no syscall to ask).
            if mask & (EPOLLERR | EPOLLHUP):
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    return False, f"connect: {os.strerror(err).lower()}"
            return self.connected()
        return self.step(mask)

    def step(self, mask: int) -> int | tuple[bool, str]:  # pragma: no cover - tcp never gets here
        return True, ""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def source_port(self) -> int | None:
        """The probe's local port (to find it in a packet capture); only asked for failures."""
        try:
            name = self.sock.getsockname() if self.sock is not None else None
        except OSError:
            return None
        return name[1] if isinstance(name, tuple) else None


class TcpAttempt(Attempt):
    __slots__ = ()
    socket_type = _socket.socket


class HttpAttempt(Attempt):
    """HTTP/1.1 (h11) over the socket, or over TLS for https."""

    __slots__ = ("conn", "out", "tls", "body", "status")

    _contexts: dict[bool, ssl.SSLContext] = {}

    def connected(self) -> int | tuple[bool, str]:
        import h11

        spec = self.spec
        host = spec.host or _hostport(spec.dest, spec.port)
        self.conn = h11.Connection(our_role=h11.CLIENT)
        request = h11.Request(method=spec.method, target=spec.path, headers=[
            ("Host", host), ("User-Agent", "l4lb-health"), ("Accept", "*/*"), ("Connection", "close")])
        self.out = self.conn.send(request) + self.conn.send(h11.EndOfMessage())
        self.body = bytearray()
        self.status = 0
        self.tls = None
        if spec.kind is CheckType.https:
            assert self.sock is not None
            sni = spec.host if spec.host and not _is_ip(spec.host) else None
            self.tls = self._context(spec.tls_verify).wrap_socket(
                self.sock, server_hostname=sni, do_handshake_on_connect=False)
            self.sock = self.tls
            self.stage = "tls"
            return self._handshake()
        self.stage = "sending"
        return self._send()

    @classmethod
    def _context(cls, verify: bool) -> ssl.SSLContext:
        ctx = cls._contexts.get(verify)
        if ctx is None:
            ctx = ssl.create_default_context() if verify else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            cls._contexts[verify] = ctx
        return ctx

    def _handshake(self) -> int | tuple[bool, str]:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return EPOLLIN
        except ssl.SSLWantWriteError:
            return EPOLLOUT
        except (ssl.SSLError, OSError) as e:
            return False, f"TLS: {getattr(e, 'reason', None) or e}"
        self.stage = "sending"
        return self._send()

    def _send(self) -> int | tuple[bool, str]:
        assert self.sock is not None
        try:
            while self.out:
                n = self.sock.send(self.out)
                self.out = self.out[n:]
        except (BlockingIOError, ssl.SSLWantWriteError):
            return EPOLLOUT
        except ssl.SSLWantReadError:
            return EPOLLIN
        except OSError as e:
            return False, f"send: {e.strerror or e}".lower()
        self.stage = "receiving"
        return EPOLLIN

    def step(self, mask: int) -> int | tuple[bool, str]:
        if self.stage == "tls":
            return self._handshake()
        if self.stage == "sending":
            return self._send()
        return self._receive()

    def _receive(self) -> int | tuple[bool, str]:
        import h11

        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                return EPOLLIN
            except ssl.SSLWantWriteError:
                return EPOLLOUT
            except (ssl.SSLError, OSError) as e:
                return False, f"receive: {getattr(e, 'strerror', None) or e}".lower()
            try:
                self.conn.receive_data(data)
                while True:
                    ev = self.conn.next_event()
                    if ev is h11.NEED_DATA:
                        break
                    done = self._on(ev)
                    if done is not None:
                        return done
            except h11.RemoteProtocolError as e:
                return False, f"HTTP: malformed response ({e})"
            if not data:
                return False, ("connection closed before a response" if not self.status
                               else f"body does not contain {self.spec.body!r}")

    def _on(self, ev: Any) -> tuple[bool, str] | None:
        import h11

        spec = self.spec
        if isinstance(ev, h11.Response):
            self.status = ev.status_code
            if not any(lo <= ev.status_code <= hi for lo, hi in spec.expect):
                want = ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in spec.expect)
                return False, f"HTTP {ev.status_code} (expected {want})"
            return (True, "") if spec.body is None or spec.method == "HEAD" else None
        if isinstance(ev, h11.Data) and spec.body is not None:
            self.body += ev.data[:BODY_LIMIT - len(self.body)]
            if spec.body.encode() in self.body:
                return True, ""
            if len(self.body) >= BODY_LIMIT:
                return False, f"the first {BODY_LIMIT // 1024} KiB of the body do not contain {spec.body!r}"
        if isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
            return False, f"body does not contain {spec.body!r}"
        return None


def _is_ip(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
        return True
    except OSError:
        return False


class DnsAttempt(Attempt):
    __slots__ = ("query",)
    socket_type = _socket.socket

    def start(self) -> int | tuple[bool, str]:
        return self._connect(socket.SOCK_DGRAM)

    def connected(self) -> int | tuple[bool, str]:
        import dns.message
        import dns.rdatatype

        assert self.sock is not None
        self.query = dns.message.make_query(self.spec.query, dns.rdatatype.from_text(self.spec.query_type))
        try:
            self.sock.send(self.query.to_wire())
        except OSError as e:
            return False, f"send: {e.strerror}".lower()
        self.stage = "receiving"
        return EPOLLIN

    def step(self, mask: int) -> int | tuple[bool, str]:
        import dns.exception
        import dns.message
        import dns.rcode

        assert self.sock is not None
        try:
            data = self.sock.recv(65535)
        except BlockingIOError:
            return EPOLLIN
        except OSError as e:  # ICMP port unreachable arrives as ECONNREFUSED
            return False, f"receive: {e.strerror}".lower()
        try:
            reply = dns.message.from_wire(data)
        except dns.exception.DNSException as e:
            return False, f"DNS: malformed reply ({e})"
        if not self.query.is_response(reply):
            return EPOLLIN  # not ours (a stray datagram): keep waiting
        rcode = reply.rcode()
        if rcode != dns.rcode.NOERROR:
            return False, f"DNS: {dns.rcode.to_text(rcode)}"
        return True, ""


ATTEMPTS: dict[CheckType, type[Attempt]] = {
    CheckType.tcp: TcpAttempt, CheckType.http: HttpAttempt, CheckType.https: HttpAttempt,
    CheckType.udp_dns: DnsAttempt,
}
