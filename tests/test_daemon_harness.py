"""Harness for running the real l4lbd (real BPF datapath) in a private network
namespace, plus tests of the harness's own pieces (sd_notify, map dumps).

A DaemonLab owns: a netns with a veth pair (the daemon attaches XDP to one
end), a private directory on the session bpffs (so other tests' pins are
never touched), a state directory and a config file. The daemon runs as
``ip netns exec NS python -m l4lb.daemon --config ...`` and is reached from the
test process over its unix socket. Only documentation addresses are used and
nothing is configured in the root namespace.

Other test modules import this one: ``from test_daemon_harness import ...``.
"""

from __future__ import annotations

import ctypes as ct
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from l4lb.lab import netns
from l4lb.lab.l4lbd import PY, L4lbd, default_config, to_toml, xdp_prog_id  # noqa: F401 (re-exported)

NS_PREFIX = "l4d"


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {cp.returncode}: {cp.stderr.strip()}")
    return cp


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (BPF, XDP, network namespaces): run `make test` as root", pytrace=False)


class DaemonLab(L4lbd):
    """One netns + private bpffs dir + one l4lbd process (restartable)."""

    def __init__(self, bpffs: Path, tag: str, *, env: dict[str, str] | None = None, ns_prefix: str = NS_PREFIX) -> None:
        require_root()
        workdir = Path(tempfile.mkdtemp(prefix=f"l4lbd-{tag}-"))
        self.bpffs = bpffs / f"l4lbd-{os.getpid()}-{tag}"
        super().__init__(f"{ns_prefix}-{os.getpid()}-{tag}", workdir,
                         default_config(workdir, self.bpffs, ["lbt0a"]), env=env)
        self.bpffs.mkdir()
        self.prefix: list[str] = []              # runs the daemon under e.g. prlimit or unshare (which exec it)
        self.worker: netns.NetnsWorker | None = None
        _run("ip", "netns", "add", self.ns)
        self.nsexec("ip", "link", "set", "lo", "up")
        self.add_veth("lbt0")

    def command(self, *args: str) -> list[str]:
        return [*self.prefix, *super().command(*args)]

    @contextmanager
    def running(self, services: dict[str, dict] | None = None) -> Iterator["DaemonLab"]:
        """Start the daemon, create ``services`` (name -> body), yield; tear everything down after."""
        try:
            self.start()
            with self.client() as c:
                for name, body in (services or {}).items():
                    assert c.put(f"/v1/services/{name}", json=body).status_code == 201
            yield self
        finally:
            self.close()

    # -- namespace --------------------------------------------------------------------

    def nsexec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.ns, *cmd, check=check)

    def add_veth(self, base: str) -> tuple[str, str]:
        a, b = f"{base}a", f"{base}b"
        self.nsexec("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        self.nsexec("ip", "link", "set", a, "up")
        self.nsexec("ip", "link", "set", b, "up")
        return a, b

    def xdp_prog_id(self, iface: str) -> int | None:
        return xdp_prog_id(self.ns, iface)

    # -- maps ---------------------------------------------------------------------------------

    def pin_dirs(self) -> list[Path]:
        return sorted(self.bpffs.glob("maps-*"))

    def dump_maps(self) -> dict[str, dict[bytes, bytes]]:
        dirs = self.pin_dirs()
        assert len(dirs) == 1, f"expected one pinned map set, found {dirs}"
        return dump_pinned_maps(dirs[0])

    @classmethod
    @contextmanager
    def started(cls, bpffs: Path, name: str, **kw: Any) -> Iterator["DaemonLab"]:
        """A lab whose daemon runs with the default config, closed on the way out
        (the module fixture of most daemon tests)."""
        lab = cls(bpffs, name, **kw)
        try:
            lab.start()
            yield lab
        finally:
            lab.close()

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.kill()
        _run("ip", "netns", "del", self.ns, check=False)
        # Pins hold the maps (and the program) alive: remove them with the netns gone.
        shutil.rmtree(self.bpffs, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- reading pinned maps without the datapath's code ------------------------------------------------

_BPF_MAP_TYPE_PERCPU = {5, 6, 10}       # percpu hash, percpu array, lru percpu hash
_BPF_MAP_TYPE_OF_MAPS = {12, 13}        # array of maps, hash of maps


class _MapInfo(ct.Structure):
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32),
                ("name", ct.c_char * 16), ("_rest", ct.c_byte * 256)]


def _libbpf() -> ct.CDLL:
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_obj_get.argtypes = [ct.c_char_p]
    lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    return lib


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def _dump_fd(lib: ct.CDLL, fd: int) -> dict[bytes, bytes]:
    info = _MapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    if lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) != 0:
        raise OSError(ct.get_errno(), "bpf_obj_get_info_by_fd")
    vsize = info.value_size
    if info.type in _BPF_MAP_TYPE_PERCPU:
        vsize = ((vsize + 7) // 8 * 8) * _possible_cpus()
    key = ct.create_string_buffer(info.key_size)
    nxt = ct.create_string_buffer(info.key_size)
    val = ct.create_string_buffer(max(vsize, 8))
    out: dict[bytes, bytes] = {}
    prev = None
    while lib.bpf_map_get_next_key(fd, prev, nxt) == 0:
        ct.memmove(key, nxt, info.key_size)
        prev = key
        if lib.bpf_map_lookup_elem(fd, key, val) != 0:
            continue  # e.g. an empty array-of-maps slot
        raw = val.raw[:vsize]
        if info.type in _BPF_MAP_TYPE_OF_MAPS:
            # The value is the inner map's id, which changes on every swap:
            # compare what the inner map holds instead.
            inner_id = int.from_bytes(raw[:4], "little")
            ifd = lib.bpf_map_get_fd_by_id(inner_id)
            if ifd < 0:
                raise OSError(ct.get_errno(), f"map id {inner_id}")
            try:
                inner = _dump_fd(lib, ifd)
            finally:
                os.close(ifd)
            raw = b"".join(k + v for k, v in sorted(inner.items()))
        out[key.raw] = raw
    return out


# Pins beside the maps.h maps: the program, its devmap, tail-call array and recorder maps (what
# recordings armed, not the service state), the records (pinned.py).
NOT_STATE = ("prog", "tx_ports", "slow_paths", "rec_filters", "rec_bits", "rec_masks", "rec_lost_cnt", "rec_events",
             "prog_types", "converged")


def dump_pinned_maps(pin_dir: Path, skip: tuple[str, ...] = NOT_STATE) -> dict[str, dict[bytes, bytes]]:
    """Every pinned map's contents (key bytes -> value bytes), inner maps resolved
    (the Maglev buffers' own pins, in the maglev/ directory, are reached that way)."""
    lib = _libbpf()
    out = {}
    for path in sorted(pin_dir.iterdir()):
        if path.name in skip or path.is_dir():
            continue
        fd = lib.bpf_obj_get(str(path).encode())
        if fd < 0:
            raise OSError(ct.get_errno(), f"bpf_obj_get {path}")
        try:
            out[path.name] = _dump_fd(lib, fd)
        finally:
            os.close(fd)
    if "maglev_outer" in out and "services" in out:
        # Packets see the table buffer a service entry's `ring` names (struct
        # svc_info: id, flags, ring — u32 each); which buffer that is, and what
        # spare buffers hold, is not state. So: each service id's table in force.
        tables, services = out["maglev_outer"], {}
        by_id = {}
        for k, v in out["services"].items():
            services[k] = v[:8]
            by_id[v[:4]] = tables.get(v[8:12])  # maglev_outer's keys are u32 too
        out["services"], out["maglev_outer"] = services, by_id
    return out


def nonzero(entries: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """Array maps list every slot; keep the ones that hold something."""
    return {k: v for k, v in entries.items() if v.strip(b"\0")}


# --- notify socket ------------------------------------------------------------------------------------


class NotifyListener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET, drained by a thread
    (like systemd, it always reads: the daemon's sends must never find it full)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self.messages.clear()

    def texts(self) -> list[str]:
        with self._cond:
            return [m for _, m in self.messages]

    def wait(self, line: str, timeout: float = 60) -> list[str]:
        """Wait until some message has ``line`` as one of its lines; returns all messages so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(line in m.split("\n") for _, m in self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {line!r} from the daemon; got {[m for _, m in self.messages]}")
                self._cond.wait(left)
            return [m for _, m in self.messages]

    def close(self) -> None:
        self._closed = True
        self._thread.join(1)
        self.sock.close()


# --- tests of the harness itself -----------------------------------------------------------------------


def test_to_toml_roundtrip() -> None:
    import tomllib

    doc = {"a": 1, "b": "x\"y", "c": [1, 2], "t": {"u": True, "v": {"w": 2.5}}}
    assert tomllib.loads(to_toml(doc)) == doc


def test_sd_notify_reaches_path_and_abstract_sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from l4lb.daemon import sd_notify, watchdog_interval

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False  # outside systemd: a no-op

    listener = NotifyListener(tmp_path / "notify")
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
        assert sd_notify("READY=1\nSTATUS=hello")
        assert listener.wait("READY=1", timeout=2) == ["READY=1\nSTATUS=hello"]
    finally:
        listener.close()

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as full:  # nobody reads it
        full.bind(str(tmp_path / "full"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "full"))
        t0 = time.monotonic()
        results = [sd_notify("WATCHDOG=1") for _ in range(500)]
        assert time.monotonic() - t0 < 5 and results[0] and not results[-1]  # dropped, never blocked

    name = f"l4lbd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("WATCHDOG=1")
        assert s.recv(100) == b"WATCHDOG=1"

    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None  # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.5
