"""One long-lived worker thread that runs a function on demand."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Background:
    """Runs ``fn`` in one daemon thread, once per kick(); kicks while it runs
    coalesce into one more run. Errors are logged and the next kick tries
    again. (One thread, started on first use: starting a thread per request
    cost ~1 ms of a drain.)"""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._fn = fn
        self._name = name
        self._kicked = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def kick(self) -> None:
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._kicked.set()

    def _run(self) -> None:
        while True:
            self._kicked.wait()
            self._kicked.clear()
            try:
                self._fn()
            except Exception:  # noqa: BLE001 - upkeep must not die
                log.exception("%s failed", self._name)
