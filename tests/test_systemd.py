"""The systemd unit, the install target, and l4lbd run the way the unit runs it.

PID 1 here is not systemd, so the unit cannot be started for real. Instead:

* ``systemd-analyze verify`` and ``security --offline`` check the unit file;
* ``make install DESTDIR=...`` stages everything into a temporary root: files,
  modes, idempotence, the config never overwritten, and a real venv;
* the daemon from that venv is started with the unit's ExecStart= in a netns
  lab, inside a sandbox built from the unit's own settings (`Sandbox`): its
  ExecStartPre=+ as root, then User= (a stand-in uid), CapabilityBoundingSet=
  / AmbientCapabilities=, NoNewPrivileges=, SystemCallFilter= (plus the
  syscall parts of PrivateDevices=, ProtectClock=, ProtectKernelLogs=,
  RestrictNamespaces=) and RestrictAddressFamilies= as a seccomp filter with
  SystemCallErrorNumber=, SystemCallArchitectures=native, UMask=, a clean
  environment, ProtectSystem=strict with the unit's writable paths,
  ProtectProc=, and TemporaryFileSystem= + BindPaths= for the bpffs.
  Real traffic goes through the VIP; READY=1 and WATCHDOG=1 arrive on a
  NOTIFY_SOCKET; the recorder captures; ExecReload= and the stop signal are
  exercised; a restart reuses the pins; control restarts with fewer
  capabilities fail.
  What the emulation leaves out is listed in NOT_EMULATED.
"""

from __future__ import annotations

import base64
import ctypes as ct
import errno
import functools
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from test_daemon_harness import NotifyListener, require_root

from l4lb import config as config_mod
from l4lb.lab.l4lbd import L4lbd, xdp_prog_id

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

REPO = Path(__file__).resolve().parent.parent
UNIT_FILE = REPO / "systemd" / "l4lbd.service"
SAMPLE = REPO / "systemd" / "l4lbd.toml"
SYSUSERS = REPO / "systemd" / "l4lbd.sysusers"
HELPER = REPO / "systemd" / "l4lbd-prepare-bpffs"
PREFIX = "/opt/l4lb"
CONFIG = "/etc/l4lbd/l4lbd.toml"
# No CAP_SYS_ADMIN: pins are opened by path, never by id (issue 11, item 9).
NEEDED_CAPS = {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"}
# Control sets for a first start: the unit's minus each one.
CONTROL_CAPS = {f"without-{c}": sorted(NEEDED_CAPS - {c}) for c in sorted(NEEDED_CAPS)}
NS_PREFIX = "sdu"
# The unit's User= (l4lbd) does not exist on a test machine; nobody stands in.
STANDIN = pwd.getpwnam("nobody")
BPF_FS_MAGIC = 0xCAFE4A11


# --- reading the unit ---------------------------------------------------------------------------------------


@dataclass
class Unit:
    entries: list[tuple[str, str, str]]  # (section, key, value), in file order

    @classmethod
    def parse(cls, text: str) -> Unit:
        entries, section = [], ""
        lines = iter(text.splitlines())
        for raw in lines:
            line = raw.strip()
            while line.endswith("\\"):
                line = line[:-1] + " " + next(lines, "").strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, sep, value = line.partition("=")
            assert sep, f"not a Key=Value line: {raw!r}"
            entries.append((section, key.strip(), value.strip()))
        return cls(entries)

    @classmethod
    def load(cls, path: Path = UNIT_FILE) -> Unit:
        return cls.parse(path.read_text())

    def all(self, key: str, section: str = "Service") -> list[str]:
        return [v for s, k, v in self.entries if s == section and k == key]

    def get(self, key: str, default: str | None = None, section: str = "Service") -> str | None:
        values = self.all(key, section)
        return values[-1] if values else default

    def words(self, key: str) -> list[str]:
        out: list[str] = []
        for v in self.all(key):
            out = [] if not v else out + v.split()  # an empty assignment resets the list
        return out

    def yes(self, key: str) -> bool:
        return (self.get(key) or "no").lower() in ("yes", "true", "on", "1", "strict", "full")

    def seconds(self, key: str) -> float:
        total = 0.0
        units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 1e-3}
        for n, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", self.get(key) or ""):
            total += float(n) * units[unit]
        return total

    def commands(self, key: str) -> list[tuple[str, list[str]]]:
        """Exec lines as (prefix flags, argv)."""
        out = []
        for v in self.all(key):
            m = re.match(r"([-+@:!]*)(.*)", v)
            assert m is not None
            out.append((m.group(1), shlex.split(m.group(2))))
        return out


# --- SystemCallFilter= as systemd reads it ------------------------------------------------------------------


@functools.cache
def syscall_group(name: str) -> frozenset[str]:
    """A systemd syscall group, nested groups expanded (systemd-analyze syscall-filter)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                         check=True).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            names |= syscall_group(word) if word.startswith("@") else {word}
    assert names, f"empty syscall group {name}"
    return frozenset(names)


def _expand(item: str) -> frozenset[str]:
    return syscall_group(item) if item.startswith("@") else frozenset({item})


# Settings that also take syscalls away (their other effects are not emulated).
IMPLIED_DENY = {"PrivateDevices": "@raw-io", "ProtectClock": "@clock", "ProtectKernelLogs": "syslog",
                "ProtectKernelModules": "@module", "RestrictNamespaces": "unshare setns"}


def allowed_syscalls(unit: Unit) -> set[str]:
    """systemd's rules: the first assignment being an allow list adds @default;
    then in order, plain entries add and ~entries remove."""
    allowed: set[str] | None = None
    for value in unit.all("SystemCallFilter"):
        if not value:
            allowed = None
            continue
        deny = value.startswith("~")
        if allowed is None:
            assert not deny, "the emulation handles allow lists only"
            allowed = set(syscall_group("@default"))
        for item in value.lstrip("~").split():
            allowed = allowed - _expand(item) if deny else allowed | _expand(item)
    assert allowed is not None, "the unit has no SystemCallFilter="
    for key, items in IMPLIED_DENY.items():
        if unit.yes(key):
            for item in items.split():
                allowed -= _expand(item)
    return allowed


def unit_caps(unit: Unit) -> list[str]:
    return sorted(unit.words("CapabilityBoundingSet"))


# [Service] settings the Sandbox applies (or that tests check directly), and those it leaves out.
EMULATED = {
    "Type", "TimeoutStartSec", "ExecStartPre", "ExecStart", "ExecReload", "WatchdogSec", "Restart", "RestartSec",
    "KillMode", "KillSignal", "TimeoutStopSec", "User", "Group", "CapabilityBoundingSet", "AmbientCapabilities",
    "NoNewPrivileges", "StateDirectory", "StateDirectoryMode", "RuntimeDirectory", "RuntimeDirectoryMode",
    "ConfigurationDirectory", "UMask", "ProtectSystem", "TemporaryFileSystem", "BindPaths", "ReadWritePaths",
    "ProtectProc", "PrivateMounts", "RestrictAddressFamilies", "SystemCallArchitectures", "SystemCallFilter",
    "SystemCallErrorNumber", "Environment",
}
NOT_EMULATED = {
    "LimitNOFILE", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectClock", "ProtectHostname",
    "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
    "LockPersonality", "RemoveIPC", "KeyringMode",
}


# --- the sandbox --------------------------------------------------------------------------------------------

# Stage 1, root, in a private mount namespace: the file-system view.
STAGE1 = r'''
import json, os, subprocess, sys
spec = json.loads(sys.argv[1])
def mount(*a):
    subprocess.run(["mount", *a], check=True)
def mountpoints():
    out = []
    for line in open("/proc/self/mountinfo"):
        mp = line.split()[4]
        out.append(mp.encode().decode("unicode_escape"))
    return out
mount("--make-rprivate", "/")
# TemporaryFileSystem= with BindPaths= below it: the bind sources are taken
# from the host's view (staged first), as systemd does.
for t in spec["tmpfs"]:
    staged = []
    for i, src in enumerate(t["binds"]):
        st = os.path.join(spec["stage"], str(len(staged)) + "-" + str(i))
        os.makedirs(st)
        mount("--bind", src, st)
        staged.append(st)
    mount("-t", "tmpfs", "-o", "mode=0755,nodev,strictatime", "tmpfs", t["path"])
    for src, st in zip(t["binds"], staged):
        os.makedirs(src, exist_ok=True)
        mount("--move", st, src)
    if t["ro"]:
        mount("-o", "remount,ro", t["path"])
if spec["protect_proc"]:  # ProtectProc=: a procfs of our own with hidepid
    mount("-t", "proc", "-o", "hidepid=" + spec["protect_proc"], "proc", "/proc")
if spec["strict"]:  # ProtectSystem=strict: all read-only but /dev, /proc, /sys and the writable paths
    for mp in sorted(set(mountpoints())):
        if any(mp == p or mp.startswith(p + "/") for p in ("/dev", "/proc", "/sys")):
            continue
        subprocess.run(["mount", "-o", "remount,bind,ro", mp], capture_output=True)
    for p in spec["rw"]:
        if p not in mountpoints():
            mount("--bind", p, p)
        mount("-o", "remount,bind,rw", p)
os.execvpe(spec["setpriv"][0], spec["setpriv"] + ["/usr/bin/python3", "-I", "-c", spec["stage2"],
           json.dumps(spec)] + spec["argv"], spec["env"])
'''

# Stage 2, unprivileged, no new privileges: seccomp and umask, then exec.
STAGE2 = r'''
import ctypes, json, os, sys
spec = json.loads(sys.argv[1])
argv = sys.argv[2:]
if spec["seccomp"] is not None:
    sc = spec["seccomp"]
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(Cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ALLOW, ERRNO, EQ = 0x7FFF0000, 0x00050000, 4
    # Only the native architecture (libseccomp's default) = SystemCallArchitectures=native.
    ctx = lib.seccomp_init(ERRNO | sc["errno"])
    for name in sc["allow"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            continue  # not a syscall of this architecture
        if name == "socket" and sc["families"] is not None:
            for fam in sc["families"]:  # RestrictAddressFamilies=
                rc = lib.seccomp_rule_add_array(ctx, ALLOW, nr, 1, ctypes.byref(Cmp(0, EQ, fam, 0)))
                assert rc == 0, (name, rc)
            continue
        rc = lib.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None)
        assert rc == 0, (name, rc)
    assert lib.seccomp_load(ctx) == 0, "seccomp_load failed"
os.umask(spec["umask"])
os.execv(argv[0], argv)
'''


@dataclass
class Sandbox:
    """One emulated run environment of the unit, under a fake root.

    The unit's paths map to: /opt/l4lb -> `destdir` (what install.sh staged),
    /etc/l4lbd/l4lbd.toml -> `config`, /var/lib, /run and /sys/fs/bpf -> under `root`.
    """

    unit: Unit
    destdir: Path
    root: Path
    config: Path
    caps: list[str] | None = None           # None: the unit's own
    notify: Path | None = None

    def __post_init__(self) -> None:
        if self.caps is None:
            self.caps = unit_caps(self.unit)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)

    # -- paths -------------------------------------------------------------------------------------------------
    def host(self, path: str) -> str:
        if path == CONFIG:
            return str(self.config)
        if path == PREFIX or path.startswith(PREFIX + "/"):
            return str(self.destdir) + path
        if path.startswith(("/var/lib/", "/run/", "/sys/fs/bpf")):
            return str(self.root) + path
        return path

    def arg(self, a: str, mainpid: int | None = None) -> str:
        if a == self.unit.get("User"):
            return STANDIN.pw_name
        if a == "$MAINPID":
            assert mainpid is not None
            return str(mainpid)
        return self.host(a) if a.startswith("/") else a

    def argv(self, key: str, mainpid: int | None = None) -> list[tuple[str, list[str]]]:
        return [(flags, [self.arg(a, mainpid) for a in argv]) for flags, argv in self.unit.commands(key)]

    def directories(self) -> dict[str, Path]:
        """StateDirectory=/RuntimeDirectory= as systemd makes them: owned by User=, with their modes."""
        out = {}
        for key, base in (("StateDirectory", "/var/lib/"), ("RuntimeDirectory", "/run/")):
            for name in self.unit.words(key):
                d = Path(self.host(base + name))
                d.mkdir(parents=True, exist_ok=True)
                os.chown(d, STANDIN.pw_uid, STANDIN.pw_gid)
                os.chmod(d, int(self.unit.get(key + "Mode", "0755") or "0755", 8))
                out[key] = d
        return out

    # -- the run ---------------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        dirs = self.directories()
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", "LANG": "C.UTF-8",
               "USER": STANDIN.pw_name, "LOGNAME": STANDIN.pw_name, "HOME": str(dirs["StateDirectory"]),
               "SHELL": "/usr/sbin/nologin", "INVOCATION_ID": os.urandom(16).hex(),
               "STATE_DIRECTORY": str(dirs["StateDirectory"]), "RUNTIME_DIRECTORY": str(dirs["RuntimeDirectory"]),
               "CONFIGURATION_DIRECTORY": str(self.config.parent)}
        for assignment in self.unit.all("Environment"):
            for kv in shlex.split(assignment):
                k, _, v = kv.partition("=")
                env[k] = v
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = str(self.notify)
            if self.unit.get("WatchdogSec"):
                env["WATCHDOG_USEC"] = str(int(self.unit.seconds("WatchdogSec") * 1_000_000))
        return env

    def spec(self, argv: list[str]) -> dict:
        u = self.unit
        caps = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in self.caps or []])
        setpriv = ["setpriv", f"--reuid={STANDIN.pw_uid}", f"--regid={STANDIN.pw_gid}", "--clear-groups",
                   f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}"]
        if u.yes("NoNewPrivileges"):
            setpriv.append("--no-new-privs")
        binds = [self.host(p.lstrip("-").split(":")[0]) for p in u.words("BindPaths")]
        tmpfs = []
        for t in u.words("TemporaryFileSystem"):
            path, _, opts = t.partition(":")
            hp = self.host(path)
            tmpfs.append({"path": hp, "ro": "ro" in opts.split(","),
                          "binds": [b for b in binds if b.startswith(hp + "/")]})
        rw = [str(d) for d in self.directories().values()]
        rw += [self.host(p.lstrip("-")) for p in u.words("ReadWritePaths")]
        stage = Path(tempfile.mkdtemp(prefix="stage-", dir=self.root))
        errno_name = u.get("SystemCallErrorNumber")
        families = u.words("RestrictAddressFamilies")
        return {
            "tmpfs": tmpfs, "stage": str(stage), "strict": u.get("ProtectSystem") == "strict", "rw": rw + binds,
            "protect_proc": u.get("ProtectProc") if u.get("ProtectProc") not in (None, "default") else None,
            "setpriv": setpriv + ["--"], "stage2": STAGE2, "env": self.env(), "argv": argv,
            "umask": int(u.get("UMask", "0022") or "0022", 8),
            "seccomp": {"allow": sorted(allowed_syscalls(u)),
                        "errno": getattr(errno, errno_name) if errno_name else errno.EPERM,
                        "families": [int(getattr(socket, f)) for f in families] if families else None}
            if u.all("SystemCallFilter") else None,
        }

    def command(self, ns: str, argv: list[str]) -> list[str]:
        """`argv` as the unit's service process, in netns `ns`."""
        spec = self.spec(argv)
        return ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private",
                "/usr/bin/python3", "-I", "-c", STAGE1, json.dumps(spec)]

    def run_privileged(self, key: str) -> None:
        """ExecStartPre=+... lines: as root, outside the sandbox (what "+" means)."""
        for flags, argv in self.argv(key):
            assert "+" in flags, f"{key} {argv} would run sandboxed; the emulation expects '+'"
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert cp.returncode == 0 or "-" in flags, f"{argv}: {cp.stderr}"


def is_bpffs(path: Path) -> bool:
    cp = subprocess.run(["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True)
    return cp.returncode == 0 and int(cp.stdout.strip(), 16) == BPF_FS_MAGIC


def unmount_all_under(root: Path) -> None:
    mps = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for mp in sorted((m for m in mps if m.startswith(str(root) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False)


def status_of(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def cap_names(mask_hex: str) -> set[str]:
    out = subprocess.run(["capsh", f"--decode={mask_hex}"], capture_output=True, text=True, check=True).stdout
    names = out.strip().partition("=")[2]
    return {n.upper() for n in names.split(",") if n}


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> Unit:
    return Unit.load()


def run_install(destdir: Path, *args: str, prefix: str | None = None, make: bool = False,
                src: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESTDIR": str(destdir)}
    env.pop("PREFIX", None)
    if prefix:
        env["PREFIX"] = prefix
    if make:
        cmd = ["make", "-s", "-C", str(src), "install", f"DESTDIR={destdir}"]
        if args:
            cmd.append(f"INSTALL_ARGS={' '.join(args)}")
    else:
        cmd = ["bash", str(src / "scripts" / "install.sh"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


SNAPSHOT_SKIP = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                       ".hypothesis", "*.pyc")


@pytest.fixture(scope="module")
def installed() -> Iterator[tuple[Path, str]]:
    """`make install DESTDIR=.../root` once for the module, venv and all, from a
    snapshot of the checkout (others edit it meanwhile; idempotence is per source)."""
    require_root()
    base = Path(tempfile.mkdtemp(prefix=f"{NS_PREFIX}-inst-"))
    os.chmod(base, 0o755)  # the stand-in user runs the staged venv
    shutil.copytree(REPO, base / "src", ignore=SNAPSHOT_SKIP)
    root = base / "root"
    root.mkdir(mode=0o755)
    try:
        cp = run_install(root, make=True, src=base / "src")
        assert cp.returncode == 0, cp.stdout + cp.stderr
        yield root, cp.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)


def tree(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """path -> (mode, uid, mtime_ns, content or link target) for everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        content = os.readlink(p) if p.is_symlink() else (p.read_bytes().hex()[:64] if p.is_file() else "")
        out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_mtime_ns, content)
    return out


# --- the unit file ------------------------------------------------------------------------------------------


def test_unit_promises(unit: Unit) -> None:
    assert unit.get("Type") == "notify"
    assert 10 <= unit.seconds("WatchdogSec") <= 120
    assert unit.get("Restart") == "on-failure"
    # Only the capabilities the daemon needs, given as ambient ones to a non-root user.
    assert set(unit_caps(unit)) == NEEDED_CAPS
    assert sorted(unit.words("AmbientCapabilities")) == unit_caps(unit)
    assert unit.get("User") not in (None, "root", "0") and unit.yes("NoNewPrivileges")
    # Stop never detaches: no ExecStop*, nothing anywhere says --detach, the
    # daemon (not a kill of everything) decides, and it gets time to close the API.
    assert not unit.all("ExecStop") and not unit.all("ExecStopPost")
    assert not [v for _, k, v in unit.entries if k.startswith("Exec") and "--detach" in v]
    assert unit.get("KillMode", "control-group") in ("control-group", "mixed")
    assert unit.get("KillSignal", "SIGTERM") == "SIGTERM"
    assert 15 <= unit.seconds("TimeoutStopSec") <= 90
    # Reload = validate, then SIGHUP to the main process.
    reload = unit.commands("ExecReload")
    assert reload[-1][1] in (["/bin/kill", "-HUP", "$MAINPID"], ["/usr/bin/kill", "-HUP", "$MAINPID"])
    assert "--check-config" in reload[0][1]
    # Hardening that the daemon is proven to live with below.
    assert unit.get("ProtectSystem") == "strict"
    assert {"AF_NETLINK", "AF_UNIX"} <= set(unit.words("RestrictAddressFamilies"))
    allowed = allowed_syscalls(unit)
    assert {"bpf", "perf_event_open"} <= allowed
    # What CAP_SYS_ADMIN would otherwise open up stays shut.
    assert not {"mount", "umount2", "pivot_root", "setns", "unshare", "swapon", "init_module", "reboot",
                "sethostname", "settimeofday"} & allowed
    assert not unit.yes("ProtectKernelModules"), "it hides /lib/modules, which BCC compiles against"
    assert not unit.yes("ProtectKernelTunables"), "the datapath sets accept_local under /proc/sys"
    assert unit.get("WantedBy", section="Install") == "multi-user.target"


def test_the_sandbox_knows_every_setting_of_the_unit(unit: Unit) -> None:
    """A new setting must be emulated below, or consciously listed as not emulated."""
    keys = {k for s, k, _ in unit.entries if s == "Service"}
    assert keys <= EMULATED | NOT_EMULATED, keys - EMULATED - NOT_EMULATED


def test_sample_config_paths_match_the_unit(unit: Unit) -> None:
    cfg = config_mod.load(SAMPLE)
    (state,) = unit.words("StateDirectory")
    (runtime,) = unit.words("RuntimeDirectory")
    (confdir,) = unit.words("ConfigurationDirectory")
    # Both under the StateDirectory (the rest of the file system is read-only), apart:
    # recordings never in the store's directory.
    assert cfg.state_dir.parent == cfg.recorder_dir.parent == Path("/var/lib") / state
    assert cfg.state_dir != cfg.recorder_dir
    assert cfg.api.socket.parent == Path("/run") / runtime
    assert unit.commands("ExecStart")[0][1][1:] == ["--config", str(Path("/etc") / confdir / "l4lbd.toml")]
    # The pin directory: prepared by ExecStartPre, bound into the service's view.
    (pre,) = unit.commands("ExecStartPre")
    assert pre[1][1:] == [str(cfg.datapath.bpffs), unit.get("User")]
    assert unit.words("BindPaths") == [str(cfg.datapath.bpffs)]
    assert unit.words("TemporaryFileSystem") == [f"{cfg.datapath.bpffs.parent}:ro"]


def test_sysusers_file_makes_the_units_user(unit: Unit, tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    with SYSUSERS.open() as f:
        cp = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", "-"], stdin=f, capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    (entry,) = [line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()
                if line.startswith(unit.get("User", "") + ":")]
    assert entry[5] == "/var/lib/" + unit.words("StateDirectory")[0] and entry[6] == "/usr/sbin/nologin"
    assert 0 < int(entry[2]) < 1000, "a system user"
    groups = (tmp_path / "etc/group").read_text().splitlines()
    assert any(line.startswith(unit.get("Group", "") + ":") for line in groups)


def rewritten_unit(installed_root: Path, dest: Path, text: str | None = None) -> Path:
    """The installed unit with its /opt/l4lb paths pointing into the staging root (verify wants them to exist)."""
    text = text if text is not None else (installed_root / "etc/systemd/system/l4lbd.service").read_text()
    dest.mkdir(exist_ok=True)
    out = dest / "l4lbd.service"
    out.write_text(text.replace(PREFIX + "/", f"{installed_root}{PREFIX}/"))
    return out


def test_systemd_analyze_verify(installed: tuple[Path, str], tmp_path: Path) -> None:
    root, _ = installed
    assert shutil.which("systemd-analyze"), "scripts/setup.sh installs systemd"
    good = rewritten_unit(root, tmp_path / "good")
    cp = subprocess.run(["systemd-analyze", "verify", str(good)], capture_output=True, text=True)
    assert cp.returncode == 0 and not cp.stdout.strip() and not cp.stderr.strip(), cp.stdout + cp.stderr
    # Control: verify really looks (a missing ExecStart binary fails it).
    text = (root / "etc/systemd/system/l4lbd.service").read_text()
    text = text.replace("/venv/bin/l4lbd --config", "/venv/bin/nope --config")
    bad = rewritten_unit(root, tmp_path / "bad", text)
    cp = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True)
    assert cp.returncode != 0 and "nope" in cp.stdout + cp.stderr


def test_security_exposure_is_low(installed: tuple[Path, str], tmp_path: Path) -> None:
    path = rewritten_unit(installed[0], tmp_path)
    cp = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=30", str(path)],
                        capture_output=True, text=True)
    last = (cp.stdout.strip().splitlines() or [""])[-1]
    print(last)
    assert cp.returncode == 0, f"exposure above 3.0: {last}\n{cp.stderr}"


# --- make install -------------------------------------------------------------------------------------------


def test_install_puts_the_promised_files_with_sane_modes(installed: tuple[Path, str]) -> None:
    root, out = installed
    files = {
        "etc/systemd/system/l4lbd.service": 0o644,
        "etc/l4lbd/l4lbd.toml": 0o644,
        "etc/sysusers.d/l4lbd.conf": 0o644,
        "opt/l4lb/libexec/l4lbd-prepare-bpffs": 0o755,
        "opt/l4lb/share/l4lbd/l4lbd.toml.sample": 0o644,
        "opt/l4lb/share/l4lbd/README.md": 0o644,
        "usr/local/share/man/man1/l4lbctl.1": 0o644,
        "usr/local/share/man/man8/l4lbd.8": 0o644,
    }
    for rel, mode in files.items():
        st = (root / rel).lstat()
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode and st.st_uid == 0, rel
        assert f"/{rel}" in out, f"install did not say it put {rel}"
    src = root.parent / "src"
    # The sample, with a random seed filled in (the sample names none: the public default).
    conf, sample = (root / "etc/l4lbd/l4lbd.toml").read_text(), (src / "systemd/l4lbd.toml").read_text()
    seed = installed_seed(root)
    assert len(base64.b64decode(seed, validate=True)) == 12 and seed != config_mod.DEFAULT_SEED
    assert re.sub(r"^maglev_seed = .*$", "# maglev_seed = ...", conf, flags=re.M) == \
        re.sub(r"^# maglev_seed = .*$", "# maglev_seed = ...", sample, flags=re.M)
    assert config_mod.parse(conf).datapath.maglev_seed == seed
    helper = (root / "opt/l4lb/libexec/l4lbd-prepare-bpffs").read_bytes()
    assert helper == (src / "systemd/l4lbd-prepare-bpffs").read_bytes()
    # The unit as shipped (PREFIX is the default).
    assert (root / "etc/systemd/system/l4lbd.service").read_bytes() == (src / "systemd/l4lbd.service").read_bytes()
    for tool in ("l4lbd", "l4lbctl"):
        assert os.readlink(root / "usr/local/bin" / tool) == f"{PREFIX}/venv/bin/{tool}"
    # Nothing group/other-writable outside the venv.
    for p in root.rglob("*"):
        if "venv" in p.parts or p.is_symlink():
            continue
        assert not p.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), p
    # The venv: Debian's python with system site packages (bcc), l4lb installed, not editable.
    venv = root / "opt/l4lb/venv"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg and "home = /usr/bin" in cfg
    probe = subprocess.run([str(venv / "bin/python"), "-I", "-c", "import bcc, l4lb; print(l4lb.__file__)"],
                           capture_output=True, text=True, cwd="/")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(venv / "lib")), f"not a copy in the venv: {probe.stdout}"
    assert not list(venv.glob("lib/python3*/site-packages/__editable__*"))
    assert any(venv.glob("lib/python3*/site-packages/l4lb/bpf_src/l4lb.c")), "BPF sources ship as package data"
    version = subprocess.run([str(venv / "bin/l4lbd"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("l4lbd ")
    # What the appliance needs and no more: Swagger UI's assets, no packet libraries (tests and benches only).
    probe = subprocess.run([str(venv / "bin/python"), "-I", "-c", "import importlib.util as u; "
                            "print([bool(u.find_spec(m)) for m in ('swagger_ui_bundle', 'scapy', 'dpkt')])"],
                           capture_output=True, text=True, cwd="/")
    assert probe.stdout.strip() == "[True, False, False]", probe.stdout + probe.stderr


def installed_seed(root: Path) -> str:
    m = re.search(r'^maglev_seed = "([^"]+)"', (root / "etc/l4lbd/l4lbd.toml").read_text(), re.M)
    assert m, "make install wrote no maglev_seed"
    return m.group(1)


def test_installed_man_pages_render(installed: tuple[Path, str]) -> None:
    """`man -l` renders both pages without a groff warning, and they carry every command and option."""
    root, _ = installed
    from l4lb.cli.main import cli
    from l4lb.daemon import build_parser

    def render(page: Path) -> str:
        cp = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                            env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "0"}, timeout=60)
        assert cp.returncode == 0 and cp.stderr == "", cp.stderr
        return re.sub(r".\x08", "", cp.stdout)  # drop overstriking, should a pager leave it

    ctl = render(root / "usr/local/share/man/man1/l4lbctl.1")
    assert ctl.startswith("L4LBCTL(1)") and "EXIT STATUS" in ctl and "130 interrupted" in ctl
    assert "L4LBCTL_SOCKET" in ctl.split("ENVIRONMENT", 1)[1]
    for name, group in cli.commands.items():
        for sub in ([f"{name} {s}" for s in group.commands] if isinstance(group, click.Group) else [name]):
            assert re.search(rf"^ +l4lbctl {sub} ", ctl, re.M), f"no section for l4lbctl {sub}"
    assert "--dry-run" in ctl and "--rotate-size" in ctl
    daemon = render(root / "usr/local/share/man/man8/l4lbd.8")
    assert daemon.startswith("L4LBD(8)")
    for option in (a for action in build_parser()._actions for a in action.option_strings):
        assert option in daemon, option
    assert "SIGNALS" in daemon and "a bad file is refused" in " ".join(daemon.split())


def test_install_is_idempotent(installed: tuple[Path, str]) -> None:
    root, _ = installed
    before = tree(root)
    cp = run_install(root, make=True, src=root.parent / "src")  # venv step included: found up to date
    assert cp.returncode == 0, cp.stderr
    assert tree(root) == before, "a second install changed files"
    said = [line for line in cp.stdout.splitlines() if line.startswith("[install] ")]
    assert not [s for s in said if re.match(r"\[install\] (installed|updated|linked|created)", s)], said
    assert any("venv" in s and "up to date" in s for s in said)


def test_install_never_overwrites_the_config(installed: tuple[Path, str]) -> None:
    root, _ = installed
    conf = root / "etc/l4lbd/l4lbd.toml"
    original = conf.read_text()
    mine = original.replace('interfaces = ["eth0"]', 'interfaces = ["ens1f0"]')
    assert mine != original
    try:
        conf.write_text(mine)
        cp = run_install(root, "--no-venv", src=root.parent / "src")
        assert cp.returncode == 0, cp.stderr
        assert conf.read_text() == mine
        assert "kept       /etc/l4lbd/l4lbd.toml (yours" in cp.stdout
        assert "venv       skipped" in cp.stdout
    finally:
        conf.write_text(original)


def test_install_prefix_rewrites_the_unit(tmp_path: Path) -> None:
    cp = run_install(tmp_path, "--no-venv", prefix="/usr/local/l4lb")
    assert cp.returncode == 0, cp.stderr
    unit = Unit.load(tmp_path / "etc/systemd/system/l4lbd.service")
    assert unit.commands("ExecStart")[0][1][0] == "/usr/local/l4lb/venv/bin/l4lbd"
    assert unit.commands("ExecStartPre")[0][1][0] == "/usr/local/l4lb/libexec/l4lbd-prepare-bpffs"
    assert PREFIX + "/" not in (tmp_path / "etc/systemd/system/l4lbd.service").read_text()
    assert (tmp_path / "usr/local/l4lb/libexec/l4lbd-prepare-bpffs").is_file()
    assert not (tmp_path / "usr/local/l4lb/venv").exists() and not (tmp_path / "opt").exists()
    assert "man pages  skipped: no venv" in cp.stdout


def test_every_box_gets_its_own_random_seed_and_an_existing_default_is_flagged(
        installed: tuple[Path, str], tmp_path: Path) -> None:
    cp = run_install(tmp_path, "--no-venv")
    assert cp.returncode == 0 and "with a random datapath.maglev_seed" in cp.stdout, cp.stdout + cp.stderr
    assert installed_seed(tmp_path) != installed_seed(installed[0])  # one per install: copy it across a tier
    conf = tmp_path / "etc/l4lbd/l4lbd.toml"
    mine = re.sub(r"^maglev_seed = .*\n", "", conf.read_text(), flags=re.M)  # an operator's file without one
    conf.write_text(mine)
    cp = run_install(tmp_path, "--no-venv")
    assert cp.returncode == 0 and conf.read_text() == mine  # never overwritten...
    assert "WARNING    /etc/l4lbd/l4lbd.toml uses the public default datapath.maglev_seed" in cp.stdout  # ...but flagged


@pytest.mark.parametrize("args,env,message", [
    (["--bogus"], {}, "unknown argument"),
    ([], {"DESTDIR": "relative/root"}, "DESTDIR must be an absolute path"),
    ([], {"PREFIX": "/"}, "PREFIX must be an absolute path other than /"),
    ([], {"PREFIX": "opt/l4lb"}, "PREFIX must be an absolute path other than /"),
])
def test_install_refuses_bad_input_and_changes_nothing(tmp_path: Path, args: list[str], env: dict[str, str],
                                                       message: str) -> None:
    full = {**os.environ, "DESTDIR": str(tmp_path / "root"), **env}
    cp = subprocess.run(["bash", str(REPO / "scripts/install.sh"), *args], capture_output=True, text=True,
                        env=full, cwd=tmp_path)
    assert cp.returncode != 0 and message in cp.stderr, cp.stderr
    assert not list(tmp_path.iterdir())


# --- the bpffs helper (the unit's ExecStartPre) -------------------------------------------------------------


def test_prepare_bpffs_mounts_when_missing_and_hands_over_pins(tmp_path: Path) -> None:
    require_root()
    parent = tmp_path / "sys-fs-bpf"
    parent.mkdir()
    target = parent / "l4lb"
    assert not is_bpffs(parent)
    try:
        cp = subprocess.run([str(HELPER), str(target), STANDIN.pw_name], capture_output=True, text=True)
        assert cp.returncode == 0, cp.stderr
        assert "mounted a bpf filesystem" in cp.stdout and is_bpffs(parent)
        st = target.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (STANDIN.pw_uid, STANDIN.pw_gid, 0o700)
        # A pin left by a root run (e.g. a manual l4lbd) becomes the service user's.
        pin = target / "leftover"
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, ct.c_void_p]
        lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
        fd = lib.bpf_map_create(2, b"sdu_left", 4, 4, 1, None)  # BPF_MAP_TYPE_ARRAY
        assert fd >= 0, ct.get_errno()
        try:
            assert lib.bpf_obj_pin(fd, str(pin).encode()) == 0, ct.get_errno()
        finally:
            os.close(fd)
        assert pin.stat().st_uid == 0
        again = subprocess.run([str(HELPER), str(target), STANDIN.pw_name], capture_output=True, text=True)
        assert again.returncode == 0 and "mounted" not in again.stdout, "second run mounts again"
        assert pin.stat().st_uid == STANDIN.pw_uid
        assert subprocess.run([str(HELPER), str(target)], capture_output=True).returncode == 2
    finally:
        subprocess.run(["umount", "-l", str(parent)], check=False)


# --- the sandbox itself -------------------------------------------------------------------------------------

PROBE = r'''
import errno, json, os, socket, sys
out = {}
def attempt(name, fn):
    try:
        r = fn()
        out[name] = "ok" if r is None else r
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
for name, fam, kind in (("vsock", socket.AF_VSOCK, socket.SOCK_STREAM), ("netlink", socket.AF_NETLINK, socket.SOCK_RAW),
                        ("inet6", socket.AF_INET6, socket.SOCK_DGRAM)):
    attempt(name, lambda: socket.socket(fam, kind).close())
attempt("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, 0, 5))  # unprivileged, but in @resources
attempt("proc1", lambda: os.stat("/proc/1") and None)
def write(path):
    open(path, "w").close()
    mode = oct(os.stat(path).st_mode & 0o777)
    os.unlink(path)
    return mode
scratch, state, bpf_parent, bpf_dir = sys.argv[1:5]
attempt("scratch", lambda: write(scratch + "/probe"))          # 1777 dir outside the writable paths
attempt("state", lambda: write(state + "/probe"))
attempt("bpf_parent_list", lambda: sorted(os.listdir(bpf_parent)))
attempt("bpf_parent_mkdir", lambda: os.mkdir(bpf_parent + "/other"))
attempt("bpf_dir_mkdir", lambda: os.rmdir(os.mkdir(bpf_dir + "/probe") or bpf_dir + "/probe"))
st = {k: v.strip() for k, v in (l.split(":", 1) for l in open("/proc/self/status"))}
out.update(uid=os.getuid(), caps=st["CapEff"], amb=st["CapAmb"], bnd=st["CapBnd"], nnp=st["NoNewPrivs"],
           seccomp=st["Seccomp"], env=sorted(os.environ))
print(json.dumps(out))
'''


def test_sandbox_really_restricts(unit: Unit, installed: tuple[Path, str], workdir: Path) -> None:
    """The emulation is not a no-op: a probe meets the unit's limits; the same probe outside does not."""
    ns = f"{NS_PREFIX}-{os.getpid()}-probe"
    box = make_box(unit, installed[0], workdir, "probe")
    scratch = box.root / "scratch"
    scratch.mkdir(mode=0o1777)
    os.chmod(scratch, 0o1777)
    box.run_privileged("ExecStartPre")  # mounts a bpffs on .../sys/fs/bpf, makes .../l4lb
    state = box.directories()["StateDirectory"]
    paths = [str(scratch), str(state), box.host("/sys/fs/bpf"), box.host("/sys/fs/bpf/l4lb")]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cp = subprocess.run(box.command(ns, ["/usr/bin/python3", "-I", "-c", PROBE, *paths]),
                            capture_output=True, text=True)
        assert cp.returncode == 0, cp.stderr
        got = json.loads(cp.stdout)
        assert got["uid"] == STANDIN.pw_uid
        assert cap_names(got["caps"]) == cap_names(got["amb"]) == cap_names(got["bnd"]) == NEEDED_CAPS
        assert got["nnp"] == "1" and got["seccomp"] == "2"
        assert (got["vsock"], got["netlink"], got["inet6"]) == ("EPERM", "ok", "ok")  # RestrictAddressFamilies=
        assert got["setpriority"] == "EPERM"                                          # SystemCallFilter=
        assert got["proc1"] == "ENOENT"                                               # ProtectProc=invisible
        assert got["scratch"] == "EROFS"                                              # ProtectSystem=strict
        assert got["state"] == "0o600"                                                # StateDirectory=, UMask=
        assert got["bpf_parent_list"] == ["l4lb"] and got["bpf_parent_mkdir"] == "EROFS"  # TemporaryFileSystem=
        assert got["bpf_dir_mkdir"] == "ok"                                                # BindPaths=
        assert "NOTIFY_SOCKET" not in got["env"] and "VIRTUAL_ENV" not in got["env"]
        # Control: the same probe as the same user, outside the sandbox.
        free = subprocess.run(["ip", "netns", "exec", ns, "setpriv", f"--reuid={STANDIN.pw_uid}",
                               f"--regid={STANDIN.pw_gid}", "--clear-groups", "/usr/bin/python3", "-I", "-c", PROBE,
                               *paths], capture_output=True, text=True)
        ctl = json.loads(free.stdout)
        assert (ctl["vsock"], ctl["setpriority"], ctl["scratch"], ctl["seccomp"], ctl["proc1"]) == (
            "ok", "ok", "0o644", "0", "ok"), ctl
        assert ctl["bpf_parent_list"] == "EACCES", "the bpffs root is 0700: only the bind mount lets the user in"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


# --- the daemon as the unit runs it -------------------------------------------------------------------------


class UnitDaemon(L4lbd):
    """l4lbd started by the unit's ExecStartPre=/ExecStart= inside the Sandbox, in the lab's LB netns."""

    def __init__(self, box: Sandbox, ns: str, config: dict) -> None:
        super().__init__(ns, box.root, config)
        self.box = box
        self.config_path = box.config
        self.log_path = box.root / "l4lbd.log"

    def write_config(self, text: str | None = None) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.config_path.parent, 0o755)
        super().write_config(text)
        os.chmod(self.config_path, 0o644)

    def command(self, *args: str) -> list[str]:
        ((_, argv),) = self.box.argv("ExecStart")
        return self.box.command(self.ns, argv + list(args))

    def start(self, **kwargs) -> None:  # type: ignore[override]
        self.write_config()
        self.box.run_privileged("ExecStartPre")
        super().start(write_config=False, **kwargs)

    def reload(self) -> list[subprocess.CompletedProcess[str]]:
        """ExecReload= lines in order, sandboxed, stopping at the first failure (as systemd does)."""
        assert self.proc is not None
        done = []
        for _, argv in self.box.argv("ExecReload", mainpid=self.proc.pid):
            done.append(subprocess.run(self.box.command(self.ns, argv), capture_output=True, text=True, timeout=120))
            if done[-1].returncode != 0:
                break
        return done


@dataclass
class Service:
    lab: Any
    daemon: UnitDaemon
    notify: NotifyListener
    box: Sandbox
    created: int  # status of the PUT that created the "web" service


def daemon_config(box: Sandbox, installed_conf: Path, iface: str) -> dict:
    """The installed sample config with its paths under the sandbox root, sized for a test."""
    doc = tomllib.loads(installed_conf.read_text())
    doc["state_dir"] = box.host(doc["state_dir"])
    doc["recorder_dir"] = box.host(doc["recorder_dir"])
    doc["api"]["socket"] = box.host(doc["api"]["socket"])
    doc["datapath"]["bpffs"] = box.host(doc["datapath"]["bpffs"])
    doc["datapath"].update(interfaces=[iface], maglev_m=1021, max_services=64, max_backends=4096,
                           flow_table_size=65536)
    doc["limits"] = {"max_services": 32, "max_backends_per_service": 64}
    doc["stats_interval"] = 1.0
    return doc


def make_box(unit: Unit, installed_root: Path, base: Path, name: str, **kwargs) -> Sandbox:
    root = base / name
    return Sandbox(unit, installed_root, root, root / "etc/l4lbd/l4lbd.toml", **kwargs)


def wait_ready(daemon: UnitDaemon, notify: NotifyListener, timeout: float = 120) -> None:
    """READY=1 on the notify socket, failing at once if the daemon exits (systemd would too)."""
    deadline = time.monotonic() + timeout
    while not any("READY=1" in m.split("\n") for m in notify.texts()):
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            raise AssertionError(f"l4lbd exited with {daemon.proc.returncode} before READY=1: "
                                 f"{notify.texts()}\n{daemon.log_tail()}")
        assert time.monotonic() < deadline, f"no READY=1 after {timeout}s\n{daemon.log_tail()}"
        time.sleep(0.1)


def notify_listener(path: Path) -> NotifyListener:
    listener = NotifyListener(path)
    os.chmod(path, 0o777)  # like systemd's /run/systemd/notify: any service user may send
    return listener


@pytest.fixture(scope="module")
def lab(lab_decap):
    from l4lb.lab.topology import Lab

    with Lab(clients=1, backends=2, prefix=NS_PREFIX, decap=lab_decap) as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=f"{NS_PREFIX}-run-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        unmount_all_under(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def service(unit: Unit, installed: tuple[Path, str], lab, workdir: Path) -> Iterator[Service]:
    box = make_box(unit, installed[0], workdir, "main")
    notify = notify_listener(workdir / "notify")
    box.notify = notify.path
    daemon = UnitDaemon(box, lab.lb_ns, daemon_config(box, installed[0] / "etc/l4lbd/l4lbd.toml", lab.lb_if))
    try:
        daemon.start(wait=False)
        wait_ready(daemon, notify, timeout=unit.seconds("TimeoutStartSec"))
        backends = [lab.backend_addrs[n][0] for n in lab.backends]
        with daemon.client() as c:  # every later test sends traffic to it
            r = c.put("/v1/services/web", json={"vip": lab.vip4, "port": 80,
                                                "backends": [{"address": a} for a in backends]})
        assert r.status_code == 201, r.text
        yield Service(lab, daemon, notify, box, r.status_code)
    finally:
        daemon.kill()
        notify.close()
        print(daemon.log_tail(60))


def test_ready_only_when_attached_then_watchdog(service: Service, unit: Unit) -> None:
    msgs = service.notify.wait("READY=1")
    assert service.daemon.proc is not None and service.daemon.proc.poll() is None, service.daemon.log_tail()
    assert xdp_prog_id(service.daemon.ns, service.lab.lb_if) is not None
    assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in msgs)
    # WATCHDOG_USEC from the unit's WatchdogSec=; the daemon pings at half of it, the first right away.
    assert service.daemon.proc is not None
    environ = dict(kv.split("=", 1) for kv in
                   Path(f"/proc/{service.daemon.proc.pid}/environ").read_text().split("\0") if "=" in kv)
    assert environ["WATCHDOG_USEC"] == str(int(unit.seconds("WatchdogSec") * 1_000_000))
    assert environ["NOTIFY_SOCKET"] == str(service.notify.path)
    service.notify.wait("WATCHDOG=1", timeout=30)


def test_runs_unprivileged_with_exactly_the_units_capabilities(service: Service, unit: Unit) -> None:
    assert service.daemon.proc is not None
    st = status_of(service.daemon.proc.pid)
    assert st["Uid"].split() == [str(STANDIN.pw_uid)] * 4
    for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert cap_names(st[key]) == set(unit_caps(unit)), key
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    cmdline = Path(f"/proc/{service.daemon.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert str(service.box.destdir / "opt/l4lb/venv/bin/l4lbd").encode() in cmdline, cmdline
    # Its files are the service user's; the pins sit in the bound bpffs directory.
    pins = Path(service.box.host("/sys/fs/bpf/l4lb"))
    assert is_bpffs(pins) and pins.stat().st_uid == STANDIN.pw_uid and list(pins.glob("maps-*"))
    sock = Path(service.daemon.config["api"]["socket"])
    assert sock.stat().st_uid == STANDIN.pw_uid and stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_forwards_real_traffic_through_the_vip(service: Service) -> None:
    lab = service.lab
    assert service.created == 201, "the service was created through the API"
    seen = set()
    for _ in range(8):
        res = lab.curl("c1", lab.url(lab.vip4))
        assert res.ok, res.stderr
        assert res.remote_ip == lab.vip4
        seen.add(res.backend)
    assert seen <= set(lab.backends) and seen
    with service.daemon.client() as c:
        (svc,) = c.get("/v1/stats").json()["services"]
    assert svc["packets"] >= 8 * 3, "handshake, request and ACKs of every request went through XDP"
    assert svc["active_flows"] >= 1, "the flow table is read back under the unit's capabilities"


def test_recorder_captures_under_the_sandbox(service: Service) -> None:
    """Perf rings (CAP_PERFMON, perf_event_open) and files in the StateDirectory, as the unit allows."""
    lab = service.lab
    with service.daemon.client() as c:
        r = c.post("/v1/recordings", json={"filters": [f"any any {lab.vip4} 80 tcp"]})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        for _ in range(3):
            assert lab.curl("c1", lab.url(lab.vip4)).ok
        deadline = time.monotonic() + 15
        while c.get(f"/v1/recordings/{rid}").json()["packets"] < 9 and time.monotonic() < deadline:
            time.sleep(0.2)
        rec = c.post(f"/v1/recordings/{rid}/stop").json()
        assert rec["packets"] >= 9, rec
        data = c.get(f"/v1/recordings/{rid}/files/0").content
    assert data[:4] == bytes.fromhex("0a0d0d0a"), "a pcapng file"
    files = [p for p in Path(service.daemon.config["recorder_dir"]).rglob("*") if p.is_file()]
    assert files and all(p.stat().st_uid == STANDIN.pw_uid for p in files)


def test_nothing_was_refused_to_the_daemon(service: Service) -> None:
    # The interface sysctl the datapath sets (not hidden by the unit) took effect.
    v = service.lab.run("lb", "cat", f"/proc/sys/net/ipv4/conf/{service.lab.lb_if}/accept_local").stdout.strip()
    assert v == "1"
    log = service.daemon.log_text()
    for word in ("Permission denied", "Operation not permitted", "Read-only file system", "cannot set",
                 "Traceback"):
        assert word not in log, f"{word!r} in the daemon log:\n{service.daemon.log_tail(60)}"


def test_exec_reload_validates_then_reloads(service: Service) -> None:
    d = service.daemon
    service.notify.clear()
    runs = d.reload()
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    service.notify.wait("RELOADING=1")
    service.notify.wait("READY=1")
    deadline = time.monotonic() + 10
    while "configuration reloaded" not in d.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "configuration reloaded" in d.log_text()
    # A broken file: systemctl reload fails at the check, no signal is sent, the daemon runs on.
    good = d.config_path.read_text()
    try:
        d.config_path.write_text(good + "\nbogus_key = 1\n")
        service.notify.clear()
        runs = d.reload()
        assert len(runs) == 1 and runs[0].returncode != 0 and "bogus_key" in runs[0].stderr
        time.sleep(1)
        assert not [m for m in service.notify.texts() if "RELOADING=1" in m], "the daemon was signalled"
        assert d.log_text().count("configuration reloaded") == 1 and "reload refused" not in d.log_text()
        assert d.proc is not None and d.proc.poll() is None
    finally:
        d.config_path.write_text(good)


def test_stop_leaves_xdp_attached_and_traffic_flowing(service: Service, unit: Unit) -> None:
    d, lab = service.daemon, service.lab
    prog = xdp_prog_id(d.ns, lab.lb_if)
    assert d.proc is not None
    d.proc.send_signal(getattr(signal, unit.get("KillSignal", "SIGTERM") or "SIGTERM"))
    assert d.proc.wait(timeout=unit.seconds("TimeoutStopSec")) == 0, d.log_tail()
    assert "STOPPING=1" in service.notify.texts()
    assert xdp_prog_id(d.ns, lab.lb_if) == prog
    res = lab.curl("c1", lab.url(lab.vip4))
    assert res.ok and res.backend in lab.backends, res.stderr


def stop(service: Service, unit: Unit) -> None:
    d = service.daemon
    if d.proc is not None and d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=unit.seconds("TimeoutStopSec")) == 0


def test_restart_adopts_the_pins_and_an_upgrade_replaces_the_program(service: Service, unit: Unit) -> None:
    """What `systemctl restart` (or Restart=on-failure) does, with only the unit's
    capabilities: pins exist, XDP is attached. The same version adopts the pinned
    program and maps (opened by path: no CAP_SYS_ADMIN); an upgrade whose program
    differs compiles against the pinned maps and replaces the program atomically."""
    d, lab = service.daemon, service.lab

    def restart() -> str:
        stop(service, unit)
        mark = len(d.log_text())
        service.notify.clear()
        d.start(wait=False)
        wait_ready(d, service.notify, timeout=unit.seconds("TimeoutStartSec"))
        return d.log_text()[mark:]

    restart()  # what is attached may be a recorder build (a recording ran): then this one compiles
    prog = xdp_prog_id(d.ns, lab.lb_if)
    log = restart()
    assert xdp_prog_id(d.ns, lab.lb_if) == prog and "pinned program adopted, not compiled" in log, log
    with d.client() as c:
        assert c.get("/v1/services/web").status_code == 200, "the desired state came back from the store"
    res = lab.curl("c1", lab.url(lab.vip4))
    assert res.ok and res.backend in lab.backends, res.stderr
    d.config["datapath"]["nexthop"] = "fib"  # another program, same maps
    try:
        log = restart()
        new = xdp_prog_id(d.ns, lab.lb_if)
        assert new is not None and new != prog and f"replaced XDP program id {prog} atomically" in log, log
        res = lab.curl("c1", lab.url(lab.vip4))
        assert res.ok and res.backend in lab.backends, res.stderr
        for word in ("Permission denied", "Operation not permitted", "Traceback"):
            assert word not in d.log_text(), d.log_tail(40)
    finally:
        d.config["datapath"]["nexthop"] = "cache"
        stop(service, unit)


@pytest.mark.parametrize("name", sorted(CONTROL_CAPS))
def test_a_first_start_needs_every_capability_of_the_unit(service: Service, unit: Unit, name: str) -> None:
    """Control runs: a first start (fresh pins, its own interface) with the unit's
    set minus one capability fails, for want of that capability, while the main
    daemon's traffic flows on. So the set is minimal and really applied."""
    lab = service.lab
    iface = "ctl" + name.removeprefix("without-CAP_")[:4].lower()
    lab.run("lb", "ip", "link", "add", iface, "type", "veth", "peer", "name", iface + "p", check=False)
    lab.run("lb", "ip", "link", "set", iface, "up")
    box = make_box(unit, service.box.destdir, service.box.root.parent, f"ctl-{name}", caps=CONTROL_CAPS[name])
    notify = notify_listener(box.root / "notify")
    box.notify = notify.path
    daemon = UnitDaemon(box, lab.lb_ns, daemon_config(box, service.box.destdir / "etc/l4lbd/l4lbd.toml", iface))
    try:
        daemon.start(wait=False)
        assert daemon.proc is not None
        deadline = time.monotonic() + unit.seconds("TimeoutStartSec")
        while daemon.proc.poll() is None and time.monotonic() < deadline:
            assert not any("READY=1" in m.split("\n") for m in notify.texts()), f"l4lbd runs with {name}"
            time.sleep(0.1)
        assert daemon.proc.poll() not in (None, 0), daemon.log_tail()
        why = [line for line in daemon.log_text().splitlines() if "cannot start" in line]
        print(name, why)
        # The kernel's refusal, in the reason or in what BCC printed just before it.
        assert why and ("Operation not permitted" in daemon.log_text() or "Permission denied" in daemon.log_text()), \
            daemon.log_tail()
        assert xdp_prog_id(lab.lb_ns, iface) is None
        assert lab.curl("c1", lab.url(lab.vip4)).ok
    finally:
        daemon.kill()
        notify.close()
        lab.run("lb", "ip", "link", "del", iface, check=False)
