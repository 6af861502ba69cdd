"""Errors the CLI shows as one plain line on stderr, with their exit codes.

Exit codes (documented in ``l4lbctl --help``):
  0 success, 1 the daemon refused or failed the request, 2 bad usage or bad input
  (arguments, files, YAML), 3 the daemon cannot be reached, 4 a precondition failed
  (the state or service changed since it was read: stale ETag), 130 interrupted.
"""

from __future__ import annotations

from typing import Any

EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_STALE = 4
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """Anything the user should read as one message, never as a traceback."""

    exit_code = EXIT_API

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def lines(self) -> list[str]:
        return [f"Error: {self.message}"] + ([f"Hint: {self.hint}"] if self.hint else [])


class InputError(CliError):
    """A bad file, bad YAML/JSON, a bad argument found after parsing."""

    exit_code = EXIT_USAGE


class Unreachable(CliError):
    """No answer from the daemon: not running, wrong socket, permissions, network."""

    exit_code = EXIT_UNREACHABLE


class ApiError(CliError):
    """The daemon answered with an RFC 9457 problem (or, rarely, something else non-2xx)."""

    def __init__(self, status: int, title: str, detail: str, errors: list[dict[str, Any]] | None = None,
                 hint: str | None = None) -> None:
        super().__init__(detail, hint)
        self.status = status
        self.title = title
        self.errors = errors or []

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return EXIT_STALE if self.status == 412 else EXIT_API

    def lines(self) -> list[str]:
        out = [f"Error: {self.message} (HTTP {self.status} {self.title})"]
        # The detail already joins validation issues; list them only when it does not.
        if len(self.errors) > 1 and not all(e.get("msg", "") in self.message for e in self.errors):
            out += [f"  {'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', '')}" for e in self.errors]
        if self.hint:
            out.append(f"Hint: {self.hint}")
        return out
