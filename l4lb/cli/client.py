"""HTTP client of l4lbd: the unix socket by default, or a TCP URL with a bearer token.

Every failure becomes a CliError with a plain message: transport problems
(no socket, refused, permission, timeout) as ``Unreachable``, non-2xx answers as
``ApiError`` carrying the server's problem+json ``detail``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from .errors import ApiError, InputError, Unreachable

DEFAULT_SOCKET = "/run/l4lbd/l4lbd.sock"
REVISION_HEADER = "X-L4LB-Revision"


@dataclass(frozen=True)
class Endpoint:
    socket: Path | None = None     # unix socket (the default), or
    url: str | None = None         # http(s)://host:port of the TCP listener
    token: str | None = None       # bearer token, only sent with url
    timeout: float = 60.0
    name: str | None = None        # a fleet file's name for the box

    def describe(self) -> str:
        return self.url if self.url else f"unix:{self.socket}"

    @property
    def label(self) -> str:
        return self.name or self.describe()


def read_token(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"token file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"token file {path} is not UTF-8 text") from None
    token = text.strip()
    if not token or any(c.isspace() for c in token):
        raise InputError(f"token file {path} must hold one token (one line, no spaces)")
    return token


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--url {url!r} must look like http://127.0.0.1:9180")
    if parts.path not in ("", "/") or parts.query:
        raise InputError(f"--url {url!r}: give only scheme, host and port (no path)")
    return url.rstrip("/")


def segment(text: str) -> str:
    """One URL path segment: IPv6 colons and brackets are quoted, never interpreted."""
    return quote(text, safe="")


def _oserror(exc: BaseException) -> OSError | None:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


class Client:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        headers = {"Accept": "application/json, application/problem+json", "User-Agent": "l4lbctl"}
        if endpoint.url:
            if endpoint.token:
                headers["Authorization"] = f"Bearer {endpoint.token}"
            self._http = httpx.Client(base_url=endpoint.url, headers=headers, timeout=endpoint.timeout)
        else:
            transport = httpx.HTTPTransport(uds=str(endpoint.socket))
            self._http = httpx.Client(transport=transport, base_url="http://l4lbd", headers=headers,
                                      timeout=endpoint.timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
        try:
            r = self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TimeoutException:
            raise Unreachable(f"no answer from l4lbd at {self.endpoint.describe()} within "
                              f"{self.endpoint.timeout:g} s", "raise it with --timeout") from None
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        if r.status_code >= 400:
            raise self._problem(r)
        return r

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def json(self, method: str, path: str, **kw: Any) -> Any:
        r = self.request(method, path, **kw)
        try:
            return r.json()
        except ValueError:
            raise ApiError(r.status_code, r.reason_phrase, f"{method} {path}: the answer is not JSON") from None

    # -- error mapping ---------------------------------------------------------------------

    def _unreachable(self, e: httpx.TransportError) -> Unreachable:
        where = self.endpoint.describe()
        os_err = _oserror(e)
        code = os_err.errno if os_err else None
        if self.endpoint.url is None:
            sock = self.endpoint.socket
            if code == errno.ENOENT:
                return Unreachable(f"no l4lbd socket at {sock}: is l4lbd running?",
                                   "give another socket with --socket or L4LBCTL_SOCKET")
            if code in (errno.EACCES, errno.EPERM):
                return Unreachable(f"permission denied on {sock}",
                                   "run as root or as a member of the socket's group (api.socket_mode)")
            if code == errno.ENOTSOCK or (sock is not None and sock.exists() and not sock.is_socket()):
                return Unreachable(f"{sock} is not a unix socket", "give l4lbd's socket (api.socket) with --socket")
            if code == errno.ECONNREFUSED:
                return Unreachable(f"nothing listens on {sock}: l4lbd is not running (stale socket)")
        elif code == errno.ECONNREFUSED:
            return Unreachable(f"connection refused by {where}: is the TCP listener (api.tcp) enabled?")
        reason = os.strerror(code) if code else (str(e) or type(e).__name__)
        return Unreachable(f"cannot talk to l4lbd at {where}: {reason}")

    def _problem(self, r: httpx.Response) -> ApiError:
        title, detail, errors = r.reason_phrase, "", []
        try:
            body = r.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            title = str(body.get("title") or title)
            detail = str(body.get("detail") or "")
            errors = [e for e in body.get("errors") or [] if isinstance(e, dict)]
        if not detail:
            detail = (r.text.strip()[:200] or title) if body is None else title
        hint = None
        if r.status_code == 401:
            hint = "give the API token with --token-file or L4LBCTL_TOKEN / L4LBCTL_TOKEN_FILE"
        return ApiError(r.status_code, title, detail, errors, hint)


def revision_of(r: httpx.Response) -> int | None:
    value = r.headers.get(REVISION_HEADER)
    return int(value) if value is not None and value.isdigit() else None
