"""The l4lbd configuration file (TOML): parsed and validated, no side effects.

A bad file is refused with one line per problem naming the key, e.g.
``api.tcp.token_file: a TCP listener needs a bearer token``. Loading reads the
API token file (it is part of the config) but touches nothing else; checks that
need the host (do the interfaces exist?) live in the daemon's preflight.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import stat
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from l4lb.bgp.config import BgpSection
from l4lb.models import DEFAULT_MAGLEV_M, MAGLEV_SIZES, MAX_BACKENDS_PER_SERVICE
from l4lb.scalars import Bool, Int, Num

if TYPE_CHECKING:
    from l4lb.datapath.config import DatapathConfig
    from l4lb.recorder.budget import DiskLimits

DEFAULT_PATH = Path("/etc/l4lbd/l4lbd.toml")
DEFAULT_SOCKET = Path("/run/l4lbd/l4lbd.sock")
DEFAULT_SEED = base64.b64encode(b"l4lb-default").decode()  # same as DatapathConfig's default
MIN_TOKEN_LEN = 16
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
IFNAME_MAX = 15  # IFNAMSIZ - 1
DEFAULT_STATE_DIR = Path("/var/lib/l4lbd/state")
LEGACY_STATE_DIR = Path("/var/lib/l4lbd")
DB_NAME = "state.sqlite3"
# PUT /v1/state bodies: the documented 1,000 services x 100 backends are 4.3 MB as
# sent by the benchmark and 6.9 MB as GET /v1/state returns them (every field).
DEFAULT_MAX_BODY_BYTES = 16 << 20


class ConfigError(ValueError):
    """The config file is unusable; ``problems`` holds one 'key: message' per issue."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"{self.path}: {self.problems[0]}"
        return f"{self.path}:\n" + "\n".join(f"  {p}" for p in self.problems)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _absolute(v: Path) -> Path:
    if not v.is_absolute():
        raise ValueError(f"must be an absolute path, not {str(v)!r}")
    return v


class DatapathSection(_Section):
    interfaces: list[str] = Field(description="Interfaces the XDP program is attached to")
    xdp_mode: Literal["native", "generic", "auto"] = "auto"
    bpffs: Path = Path("/sys/fs/bpf/l4lb")
    maglev_m: Int = DEFAULT_MAGLEV_M
    maglev_seed: str = Field(default=DEFAULT_SEED, description="12 bytes, base64 (as Cilium's hash seed)")
    outer_src_v4: ipaddress.IPv4Network | None = None
    outer_src_v6: ipaddress.IPv6Network | None = None
    # Map capacities are compile-time sizes: they change only with a restart.
    max_services: Int = Field(default=1024, ge=1, le=65536)
    max_backends: Int = Field(default=65536, ge=1, le=1 << 22)
    flow_table_size: Int = Field(default=1 << 20, ge=1024, le=1 << 26)  # a power of two
    icmp_rate: Int = Field(default=1000, ge=0, le=1_000_000)
    # ICMP errors about VIP flows (a router's frag-needed for a backend's reply)
    # go to the flow's backend; false leaves them to this box's kernel.
    forward_icmp_errors: Bool = True
    # "cache": next hops from a map the daemon keeps from routes and neighbours
    # (saves a FIB lookup per packet; the FIB is still asked when the cache has
    # no entry); "fib": bpf_fib_lookup for every packet.
    nexthop: Literal["cache", "fib"] = "cache"

    @field_validator("interfaces")
    @classmethod
    def _ifnames(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or len(name) > IFNAME_MAX or any(c in name for c in "/: \t\n") or name in (".", ".."):
                raise ValueError(f"{name!r} is not a valid interface name")
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"interface {dup[0]!r} is listed twice")
        return v

    @field_validator("outer_src_v4", "outer_src_v6", mode="before")
    @classmethod
    def _prefix(cls, v: Any, info: Any) -> Any:
        if isinstance(v, str):
            kind = ipaddress.IPv4Network if info.field_name.endswith("v4") else ipaddress.IPv6Network
            try:
                kind(v)
            except ValueError as e:
                raise ValueError(f"{v!r} is not an IPv{info.field_name[-1]} prefix: {e}") from None
        return v

    @field_validator("bpffs")
    @classmethod
    def _bpffs(cls, v: Path) -> Path:
        return _absolute(v)

    @field_validator("maglev_m")
    @classmethod
    def _m(cls, v: int) -> int:
        if v not in MAGLEV_SIZES:
            raise ValueError(f"{v} is not an allowed Maglev table size; use one of {', '.join(map(str, MAGLEV_SIZES))}")
        return v

    @field_validator("flow_table_size")
    @classmethod
    def _flow_table_size(cls, v: int) -> int:
        # The flow table is buckets of 8 ways, and the bucket count a power of two.
        if v & (v - 1):
            lo = 1 << (v.bit_length() - 1)
            raise ValueError(f"{v} is not a power of two (the flow table is set-associative); use {lo} or {lo * 2}")
        return v

    @field_validator("maglev_seed")
    @classmethod
    def _seed(cls, v: str) -> str:
        try:
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64") from None
        if len(raw) != 12:
            raise ValueError(f"must decode to 12 bytes, not {len(raw)} (e.g. `head -c12 /dev/urandom | base64`)")
        return v

    @property
    def seed_bytes(self) -> bytes:
        return base64.b64decode(self.maglev_seed)


class TcpListener(_Section):
    listen: str = Field(description="host:port, e.g. 127.0.0.1:9180 or [2001:db8::1]:9180")
    token_file: Path | None = None
    localhost_only_insecure: Bool = Field(
        default=False, description="Allow no token, only when the host is a loopback address"
    )
    max_connections: Int = Field(
        default=256, ge=1, le=65536, description="Open connections at most; one more is answered 503 and closed"
    )
    max_connections_per_client: Int = Field(
        default=64, ge=1, le=65536,
        description="Open connections from one client address at most (so one peer cannot hold them all)",
    )
    # Filled from token_file while validating; never written back or logged.
    token: SecretStr | None = Field(default=None, exclude=True, repr=False)

    @property
    def host(self) -> str:
        return _split_hostport(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_hostport(self.listen)[1]

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _split_hostport(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_inline_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and "token" in data:
            raise ValueError("put the token in a file and name it with token_file (a token in the config leaks)")
        return data

    @model_validator(mode="after")
    def _auth(self) -> "TcpListener":
        loopback = ipaddress.ip_address(self.host).is_loopback
        if self.localhost_only_insecure and not loopback:
            raise ValueError(
                f"localhost_only_insecure is allowed only on a loopback host, and {self.host} is not one"
            )
        if self.token_file is None:
            if not self.localhost_only_insecure:
                raise ValueError(
                    "a TCP listener needs token_file (a bearer token); for a loopback-only test listener "
                    "set localhost_only_insecure = true"
                )
            return self
        object.__setattr__(self, "token", SecretStr(read_secret(self.token_file)))
        return self


def _split_hostport(v: str) -> tuple[str, int]:
    if v.startswith("["):
        host, sep, port = v[1:].partition("]:")
        if not sep:
            raise ValueError(f"{v!r} is not [ipv6]:port")
    else:
        host, sep, port = v.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{v!r} is not host:port (write IPv6 hosts as [addr]:port)")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host {host!r} must be an IP address") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} must be 1-65535")
    return host, int(port)


def read_secret(path: Path, key: str = "token_file", min_len: int = MIN_TOKEN_LEN) -> str:
    """One secret (a token, a BGP password) from a file that other users cannot read."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ValueError(f"{key} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{key} {path} is not UTF-8 text") from None
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ValueError(f"{key} {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); chmod o-rwx")
    if len(text) < min_len or any(c.isspace() for c in text):
        raise ValueError(f"{key} {path} must hold one secret of at least {min_len} characters, no spaces")
    return text


class ApiSection(_Section):
    socket: Path = DEFAULT_SOCKET
    socket_mode: Int | str = Field(default=0o600, description="octal, e.g. 0o600 or \"0660\"")
    tcp: TcpListener | None = None
    # Both listeners. PUT /v1/state bodies up to max_body_bytes, other requests 1 MiB.
    max_body_bytes: Int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1 << 20, le=1 << 30)
    header_timeout: Num = Field(default=10.0, gt=0, le=600, description="seconds for a request's headers")
    body_timeout: Num = Field(default=60.0, gt=0, le=3600, description="seconds for a request's body")

    @field_validator("socket")
    @classmethod
    def _sock(cls, v: Path) -> Path:
        _absolute(v)
        if len(os.fsencode(v)) > 107:  # sun_path is 108 bytes with the NUL
            raise ValueError(f"{v} is longer than a unix socket path may be (107 bytes)")
        return v

    @field_validator("socket_mode")
    @classmethod
    def _mode(cls, v: int | str) -> int:
        if isinstance(v, str):
            try:
                v = int(v, 8)
            except ValueError:
                raise ValueError(f"{v!r} is not an octal mode") from None
        if not 0 <= v <= 0o777:
            raise ValueError(f"{v:o} is not a permission mode (0-0777)")
        if v & 0o007:
            raise ValueError(f"mode {v:04o} lets every local user drive the load balancer; drop the 'other' bits")
        return v

    @property
    def mode(self) -> int:
        assert isinstance(self.socket_mode, int)
        return self.socket_mode


class RecorderSection(_Section):
    """Disk bounds of the packet recorder (see recorder/budget.py); a SIGHUP applies them."""

    max_total_bytes: Int = Field(default=4 << 30, ge=1 << 20, description="all recordings' files together")
    max_recording_bytes: Int = Field(default=1 << 30, ge=1 << 16, description="one recording's files")
    min_free_bytes: Int = Field(default=1 << 30, ge=0, description="free space left on recorder_dir's file system")

    def limits(self) -> "DiskLimits":
        from l4lb.recorder.budget import DiskLimits

        return DiskLimits(max_total_bytes=self.max_total_bytes, max_recording_bytes=self.max_recording_bytes,
                          min_free_bytes=self.min_free_bytes)


class LimitsSection(_Section):
    max_services: Int = Field(default=1024, ge=1)
    max_backends_per_service: Int = Field(default=MAX_BACKENDS_PER_SERVICE, ge=1, le=MAX_BACKENDS_PER_SERVICE)


class HealthSection(_Section):
    """Backend health checks (the checks themselves are in the desired state)."""

    enabled: Bool = True
    tunnel: Bool = Field(default=True, description="set up probes through the tunnel (device, rule, tc program)")
    tunnel_device: str = "l4lbhc"
    tunnel_mtu: Int = Field(default=1400, ge=1280, le=9000)
    mark: Int = Field(default=0x4C480000, ge=1 << 16, lt=1 << 32, description="fwmark base (low 16 bits: the backend)")
    route_table: Int = Field(default=19528, ge=1, lt=1 << 31)
    rule_priority: Int = Field(default=1000, ge=1, le=32765)
    max_in_flight: Int = Field(default=4096, ge=16, le=1 << 20)
    flap_window: Num = Field(default=60.0, gt=0, le=86400)
    flap_max_changes: Int = Field(default=4, ge=1, le=1000)
    flap_hold: Num = Field(default=120.0, ge=0, le=86400)

    @field_validator("tunnel_device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not v or len(v) > IFNAME_MAX - 2 or any(c in v for c in "/: \t\n"):
            raise ValueError(f"{v!r} is not a valid interface name of at most {IFNAME_MAX - 2} characters")
        return v

    @field_validator("mark")
    @classmethod
    def _mark(cls, v: int) -> int:
        if v & 0xFFFF:
            raise ValueError(f"{v:#x} has low bits set; the low 16 bits name the backend (e.g. {v & ~0xFFFF:#x})")
        return v


class Config(_Section):
    log_level: str = "info"
    # Separate directories under the unit's StateDirectory, so recordings are never
    # mixed with the store (and recorder.min_free_bytes keeps room for it).
    state_dir: Path = DEFAULT_STATE_DIR
    recorder_dir: Path = Path("/var/lib/l4lbd/recordings")
    stats_interval: Num = Field(default=5.0, gt=0, le=3600, description="seconds between rate samples")
    datapath: DatapathSection
    api: ApiSection = ApiSection()
    limits: LimitsSection = LimitsSection()
    recorder: RecorderSection = RecorderSection()
    bgp: BgpSection | None = None  # announce VIPs through a BGP speaker (l4lb/bgp)
    health: HealthSection = HealthSection()

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in LOG_LEVELS:
            raise ValueError(f"{v!r} is not one of {', '.join(LOG_LEVELS)}")
        return v.lower()

    @field_validator("state_dir", "recorder_dir")
    @classmethod
    def _dirs(cls, v: Path) -> Path:
        return _absolute(v)

    @model_validator(mode="after")
    def _dirs_apart(self) -> "Config":
        if self.recorder_dir == self.state_dir:
            raise ValueError(f"recorder_dir and state_dir are both {self.state_dir}: give recordings a directory "
                             "of their own (default /var/lib/l4lbd/recordings)")
        if "state_dir" not in self.model_fields_set:
            # Before 0.2 the default state_dir was /var/lib/l4lbd itself: keep using a store there.
            legacy = not (DEFAULT_STATE_DIR / DB_NAME).exists() and (LEGACY_STATE_DIR / DB_NAME).exists()
            object.__setattr__(self, "state_dir", LEGACY_STATE_DIR if legacy else DEFAULT_STATE_DIR)
        return self

    @model_validator(mode="after")
    def _limits_fit_maps(self) -> "Config":
        if self.limits.max_services > self.datapath.max_services:
            raise ValueError(
                f"limits.max_services = {self.limits.max_services} exceeds the datapath's map size "
                f"datapath.max_services = {self.datapath.max_services}"
            )
        return self

    @property
    def log_level_number(self) -> int:
        return getattr(logging, self.log_level.upper())

    @property
    def db_path(self) -> Path:
        return self.state_dir / DB_NAME

    def datapath_config(self) -> "DatapathConfig":
        from l4lb.datapath.config import DatapathConfig  # late: the datapath package imports BCC

        d = self.datapath
        return DatapathConfig(
            bpffs=d.bpffs,
            maglev_m=d.maglev_m,
            maglev_seed=d.seed_bytes,
            max_services=d.max_services,
            max_backends=d.max_backends,
            flow_table_size=d.flow_table_size,
            outer_src_v4=d.outer_src_v4,
            outer_src_v6=d.outer_src_v6,
            icmp_rate=d.icmp_rate,
            forward_icmp_errors=d.forward_icmp_errors,
            nexthop_cache=d.nexthop == "cache",
        )

    def restart_only_changes(self, new: "Config") -> list[str]:
        """Keys that differ in ``new`` and that no reload applies to a running datapath
        (a run-time datapath key counts too: it is pending while its update failed)."""
        changed = [key for key in ("state_dir", "recorder_dir") if getattr(self, key) != getattr(new, key)]
        changed += [f"datapath.{key}" for key in (*RESTART_DATAPATH_KEYS, *RUNTIME_DATAPATH_KEYS)
                    if getattr(self.datapath, key) != getattr(new.datapath, key)]
        changed += [f"health.{k}" for k in HealthSection.model_fields
                    if getattr(self.health, k) != getattr(new.health, k)]
        return changed

    def with_runtime_datapath(self, new: "Config") -> "Config":
        """This config with ``new``'s run-time datapath keys: what a reload can put in force
        while the program (its layout, the restart-only keys) stays as started."""
        update = {k: getattr(new.datapath, k) for k in RUNTIME_DATAPATH_KEYS}
        return self.model_copy(update={"datapath": self.datapath.model_copy(update=update)})


# [datapath] keys a reload applies to the running program, and those only a restart applies.
RUNTIME_DATAPATH_KEYS = ("maglev_seed", "outer_src_v4", "outer_src_v6", "icmp_rate", "forward_icmp_errors")
RESTART_DATAPATH_KEYS = ("bpffs", "maglev_m", "max_services", "max_backends", "flow_table_size", "nexthop")


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            continue  # pydantic's internal validator steps
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt, or in the wrong section?)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        problems.append(f"{_location(e['loc'])}: {msg}")
    return problems


def parse(text: str, source: Path | str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [f"TOML syntax error: {e}"]) from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, format_errors(e)) from None


def load(path: Path | str) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(path, ["not UTF-8 text"]) from None
    return parse(text, path)
