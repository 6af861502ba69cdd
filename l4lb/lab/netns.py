"""Low-level network-namespace helpers for the lab (root only).

Everything here acts on *named* namespaces (``/run/netns/NAME``, the ones
``ip netns`` manages).  Nothing configures the root namespace: commands that
must start there (``ip netns add``/``del``) only create or remove namespaces.

* :func:`run` / :func:`popen` run a command inside a namespace
  (``ip netns exec``).
* :func:`call_in_netns` runs a Python callable inside a namespace, on a
  short-lived worker thread that entered it with ``setns(2)`` (Python 3.11 has
  no ``os.setns``).  Sockets, netlink handles and XDP attachments made there
  belong to that namespace, and sockets keep belonging to it when used later
  from any thread.  :class:`NetnsWorker` keeps such a thread alive for many
  calls.
* :func:`cleanup` removes leftovers of crashed runs by name prefix, sparing
  namespaces whose owning process is still alive.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import signal
import subprocess
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")
OWNER_DIR = Path("/run/l4lb-lab")        # <tag>.owner files: "pid starttime"
CLONE_NEWNET = 0x40000000
IP = "ip"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(RuntimeError):
    """A namespace command failed (message carries the command and its stderr)."""


# --------------------------------------------------------------------------- commands

def _cmd(ns: str | None, cmd: Sequence[str]) -> list[str]:
    cmd = [str(c) for c in cmd]
    if ns is None:
        return cmd
    return [IP, "netns", "exec", ns, *cmd]


def run(ns: str | None, *cmd: Any, check: bool = True, timeout: float = 30,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` inside netns ``ns`` and return the completed process (text output).

    ``ns=None`` runs in the caller's namespace: use it only for ``ip netns``
    and ``ip -n NS ...`` commands, which do not configure the root namespace.
    Raises :class:`NetnsError` on a non-zero exit when ``check``.
    """
    full = _cmd(ns, cmd)
    try:
        cp = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"timed out after {timeout}s: {' '.join(full)}") from e
    if check and cp.returncode != 0:
        raise NetnsError(f"exit {cp.returncode}: {' '.join(full)}\n{cp.stderr.strip()}")
    return cp


def ip(ns: str, *args: Any, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip -n NS ARGS...`` (the ``ip`` tool enters the namespace itself)."""
    return run(None, IP, "-n", ns, *args, check=check)


def ip_batch(ns: str, lines: Iterable[str]) -> None:
    """Run many ``ip`` commands in one process inside ``ns`` (stops at the first error)."""
    text = "\n".join(lines) + "\n"
    run(None, IP, "-n", ns, "-batch", "-", input=text)


def sysctl(ns: str, settings: dict[str, Any]) -> None:
    """Set sysctls inside ``ns`` (keys like ``net.ipv4.ip_forward``)."""
    if settings:
        run(ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items()))


def popen(ns: str, *cmd: Any, **kwargs: Any) -> subprocess.Popen:
    """Start ``cmd`` inside ``ns``; returns the Popen.

    ``ip netns exec`` execs the command, so the Popen's pid is the command's
    own pid.  It runs in a new session (``start_new_session=True``) so that
    :func:`stop` can signal its whole process group.
    """
    kwargs.setdefault("start_new_session", True)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(_cmd(ns, cmd), **kwargs)


def stop(proc: subprocess.Popen, timeout: float = 3.0) -> None:
    """Terminate a process started by :func:`popen` (TERM, then KILL), reap it."""
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
    for f in (proc.stdout, proc.stderr, proc.stdin):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------- namespaces

def netns_path(ns: str) -> Path:
    return NETNS_DIR / ns


def exists(ns: str) -> bool:
    return netns_path(ns).exists()


def list_netns(prefix: str = "") -> list[str]:
    """Names of named namespaces starting with ``prefix``."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def add(ns: str) -> None:
    """Create a named namespace (fails if it exists) and bring its ``lo`` up."""
    run(None, IP, "netns", "add", ns)
    ip(ns, "link", "set", "lo", "up")


def pids(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns``."""
    cp = run(None, IP, "netns", "pids", ns, check=False)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def kill_all(ns: str, timeout: float = 2.0) -> None:
    """Kill every process living in ``ns`` (they were all started by the lab)."""
    me = os.getpid()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        victims = [p for p in pids(ns) if p != me]
        if not victims:
            return
        for p in victims:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in victims):
            time.sleep(0.02)


def delete(ns: str) -> None:
    """Kill what runs in ``ns`` and delete it.  Idempotent."""
    if not exists(ns):
        return
    kill_all(ns)
    cp = run(None, IP, "netns", "del", ns, check=False)
    if cp.returncode != 0 and exists(ns):
        raise NetnsError(f"cannot delete netns {ns}: {cp.stderr.strip()}")


# --------------------------------------------------------------------------- ownership

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _starttime(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def claim(tag: str) -> None:
    """Record that this process owns the namespaces tagged ``tag``."""
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    (OWNER_DIR / f"{tag}.owner").write_text(f"{pid} {_starttime(pid)}\n")


def release(tag: str) -> None:
    try:
        (OWNER_DIR / f"{tag}.owner").unlink()
    except FileNotFoundError:
        pass


def owner_alive(tag: str) -> bool:
    """True if the process that claimed ``tag`` still runs (same pid, same start time)."""
    try:
        pid_s, start = (OWNER_DIR / f"{tag}.owner").read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    return _alive(pid) and _starttime(pid) == start


def tag_of(ns: str, prefix: str) -> str | None:
    """``l4t-1a2b3c-lb`` -> ``1a2b3c`` for prefix ``l4t``."""
    head = prefix + "-"
    if not ns.startswith(head):
        return None
    rest = ns[len(head):]
    return rest.split("-", 1)[0] or None


def cleanup(prefix: str = "l4t", *, force: bool = False) -> list[str]:
    """Delete namespaces named ``PREFIX-<tag>-...`` left behind by crashed runs.

    A namespace is spared while the process that created it is alive (other
    test runs may share the machine) unless ``force``.  Processes inside a
    removed namespace are killed.  Returns the names removed.
    """
    removed = []
    tags_seen = set()
    for ns in list_netns(prefix + "-"):
        tag = tag_of(ns, prefix)
        if tag is None:
            continue
        if not force and owner_alive(tag):
            continue
        delete(ns)
        removed.append(ns)
        tags_seen.add(tag)
    for tag in tags_seen:
        release(tag)
    # owner files of dead processes whose namespaces are all gone (any prefix)
    if OWNER_DIR.is_dir():
        remaining = list_netns()
        for f in OWNER_DIR.glob("*.owner"):
            tag = f.name[: -len(".owner")]
            if not owner_alive(tag) and not any(f"-{tag}-" in n for n in remaining):
                release(tag)
    return removed


# --------------------------------------------------------------------------- setns

def _enter(ns: str) -> None:
    fd = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(ns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` inside netns ``ns`` and return its result.

    The call happens on a fresh thread that entered ``ns`` with
    ``setns(fd, CLONE_NEWNET)``; the caller's thread is never moved, and the
    worker thread ends afterwards.  Exceptions propagate.  Good for: BCC
    ``BPF.attach_xdp`` / ``remove_xdp``, BPF_PROG_TEST_RUN (ifindexes in its
    ctx and ``bpf_fib_lookup`` resolve in the caller's netns), sockets (a
    socket created here stays in ``ns`` when used later from any thread),
    ``socket.if_nametoindex``.

    Caution, pyroute2 0.9: ``IPRoute()`` opens its netlink socket lazily, on
    first use, in the thread that uses it.  An ``IPRoute()`` *created* here and
    used from another thread talks to THAT thread's namespace (the root one).
    Create-use-close it inside one call, or use :func:`iproute` /
    ``IPRoute(netns=ns)``.  ``/sys`` still shows the caller's mount (use
    netlink/ioctl, not sysfs); ``/proc/sys/net`` and ``/proc/thread-self/net``
    follow the thread.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            _enter(ns)
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name=f"netns:{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class NetnsWorker:
    """A long-lived thread inside ``ns`` that runs submitted callables in order.

    >>> with NetnsWorker(lab.lb_ns) as w:
    ...     idx = w.call(socket.if_nametoindex, lab.lb_if)
    """

    _STOP = object()

    def __init__(self, ns: str):
        self.ns = ns
        self._q: queue.Queue = queue.Queue()
        ready: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(ready,), name=f"netns-worker:{ns}",
                                        daemon=True)
        self._thread.start()
        ready.result()          # raises if setns failed

    def _loop(self, ready: Future) -> None:
        try:
            _enter(self.ns)
        except BaseException as e:  # noqa: BLE001
            ready.set_exception(e)
            return
        ready.set_result(None)
        while True:
            item = self._q.get()
            if item is self._STOP:
                return
            fut, fn, args, kwargs = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Future[T]":
        if not self._thread.is_alive():
            raise RuntimeError(f"worker for {self.ns} is closed")
        fut: Future = Future()
        self._q.put((fut, fn, args, kwargs))
        return fut

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(self._STOP)
            self._thread.join()

    def __enter__(self) -> "NetnsWorker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def iproute(ns: str) -> Any:
    """A pyroute2 ``IPRoute`` bound to ``ns`` from any thread (``IPRoute(netns=ns)``); close it."""
    from pyroute2 import IPRoute

    return IPRoute(netns=ns)


# --------------------------------------------------------------------------- link facts

def link_info(ns: str, ifname: str) -> dict[str, Any]:
    """``ip -j link show`` of one interface inside ``ns`` (ifindex, address, mtu, xdp, ...)."""
    import json

    cp = ip(ns, "-j", "-d", "link", "show", "dev", ifname)
    data = json.loads(cp.stdout)
    if not data:
        raise NetnsError(f"{ifname} not found in {ns}")
    return data[0]
