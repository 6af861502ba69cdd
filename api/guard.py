"""Bounded connections for the API listeners: a connection cap and header/body read deadlines.

uvicorn has neither a deadline for reading a request's headers nor a cap on open
connections (``limit_concurrency`` answers 503 only once a request's headers are in, so
connections that never finish their headers pile up until the daemon runs out of file
descriptors, and then the unix socket stalls too). This is a subclass of uvicorn's h11
protocol that adds them, using only the asyncio protocol interface and h11's public
connection state:

* at most ``max_connections`` open connections per listener, and ``max_per_client`` from
  one client address: one more is answered 503 and closed at once, so descriptors stay
  bounded whatever the peers do, and one peer cannot hold every connection;
* a request's headers must be complete ``header_timeout`` seconds after its first byte
  (or after the connection opened): else 408 and close;
* its body must be complete ``body_timeout`` seconds after its headers: else close
  (the handler waiting for it sees a disconnect). This also bounds how long uvicorn
  reads and discards the rest of a body that was answered early (401, 413).

Deadlines count from the start of each phase, never from the last byte, so dripping one
byte at a time does not extend them. Refusals and timeouts are counted and logged in
summary (under attack, one line per connection would flood the log).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("l4lbd.api")

LOG_EVERY = 10.0


@dataclass(frozen=True)
class Bounds:
    header_timeout: float
    body_timeout: float
    max_connections: int | None = None      # None: no cap (the unix socket, guarded by its mode)
    max_per_client: int | None = None       # per client address (TCP)


def _raw_response(status: int, reason: str, detail: str) -> bytes:
    body = (f'{{"type":"urn:l4lb:problem:{reason.lower().replace(" ", "-")}","title":"{reason}",'
            f'"status":{status},"detail":"{detail}","errors":[]}}').encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


_BUSY = _raw_response(503, "Service Unavailable", "too many open connections to this listener; retry later")
_BUSY_CLIENT = _raw_response(503, "Service Unavailable",
                             "too many open connections from this address to this listener; retry later")
_SLOW_HEADERS = _raw_response(408, "Request Timeout", "the request headers did not arrive in time")


class Watch:
    """Counts refusals and timeouts of one listener. The first of a kind is logged at once,
    then that kind is summarised once per ``LOG_EVERY`` seconds while it keeps happening."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.total: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._windows: dict[str, asyncio.TimerHandle] = {}

    def note(self, event: str) -> None:
        self.total[event] += 1
        if event in self._windows:
            self._pending[event] += 1
            return
        log.warning("API %s: %s (more are summarised every %.0f s)", self.name, event, LOG_EVERY)
        self._open(event)

    def _open(self, event: str) -> None:
        self._windows[event] = asyncio.get_running_loop().call_later(LOG_EVERY, self._close, event)

    def _close(self, event: str) -> None:
        del self._windows[event]
        n = self._pending.pop(event, 0)
        if n:
            log.warning("API %s: %d more %s in the last %.0f s (%d in all)", self.name, n, event, LOG_EVERY,
                        self.total[event])
            self._open(event)


def guarded_protocol(bounds: Callable[[], Bounds], watch: Watch) -> type[asyncio.Protocol]:
    """An h11 protocol class for uvicorn's ``http=``; ``bounds`` is read per connection (a
    SIGHUP reload applies to new connections)."""

    by_client: Counter[str] = Counter()     # open connections per client address, this listener

    class Guarded(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _phase: str | None = None
        _bounds: Bounds
        _client: str | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._bounds = bounds()
            cap, per_client = self._bounds.max_connections, self._bounds.max_per_client
            if cap is not None and len(self.connections) > cap:
                self._refuse("connection refused at the limit", _BUSY)
                return
            peer = transport.get_extra_info("peername")
            if per_client is not None and isinstance(peer, tuple) and peer:
                if by_client[peer[0]] >= per_client:
                    self._refuse("connection refused at the per-client limit", _BUSY_CLIENT)
                    return
                self._client = peer[0]
                by_client[self._client] += 1
            self._arm("headers")

        def _refuse(self, event: str, answer: bytes) -> None:
            watch.note(event)
            # Out of the count now, not when the loop gets to connection_lost: a burst of
            # refused connections must not refuse the next client at the listener's cap.
            self.connections.discard(self)
            self.transport.write(answer)
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow(receiving=True)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow(receiving=False)

        def connection_lost(self, exc: Exception | None) -> None:
            self._arm(None)
            if self._client is not None:
                by_client[self._client] -= 1
                if not by_client[self._client]:
                    del by_client[self._client]
                self._client = None
            super().connection_lost(exc)

        def _follow(self, *, receiving: bool) -> None:
            """Which deadline applies now, from h11's view of the peer."""
            if self.transport.is_closing():
                self._arm(None)
                return
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                phase: str | None = "body"
            elif state is h11.IDLE and (receiving or self.conn.trailing_data[0]):
                phase = "headers"       # part of a request head is in (h11 still waits for the rest)
            else:
                phase = None            # request complete, or idle between requests (uvicorn's keep-alive)
            if phase != self._phase:
                self._arm(phase)

        def _arm(self, phase: str | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._phase = phase
            if phase is not None:
                delay = self._bounds.header_timeout if phase == "headers" else self._bounds.body_timeout
                self._timer = self.loop.call_later(delay, self._expired)

        def _expired(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            watch.note(f"{self._phase} timeout")
            if self._phase == "headers" and (self.cycle is None or self.cycle.response_complete):
                self.transport.write(_SLOW_HEADERS)
            self.transport.close()

    return Guarded
