"""The l4lbd config file: the sample parses, every bad key is refused by name, CLI exit codes."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from l4lb import config as cfgmod
from l4lb.config import ConfigError, parse

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "systemd" / "l4lbd.toml"

MINIMAL = """
[datapath]
interfaces = ["eth0"]
"""


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse(text, "test.toml")
    return str(e.value)


def test_sample_config_is_valid_and_documents_every_key() -> None:
    cfg = cfgmod.load(SAMPLE)
    assert cfg.datapath.interfaces == ["eth0"]
    assert cfg.datapath.seed_bytes == b"l4lb-default"
    assert cfg.api.mode == 0o600
    text = SAMPLE.read_text()
    # Every key of every section appears in the sample (commented or not).
    from l4lb.bgp import config as bgp

    for model in (cfgmod.Config, cfgmod.DatapathSection, cfgmod.ApiSection, cfgmod.LimitsSection, cfgmod.TcpListener,
                  cfgmod.RecorderSection, cfgmod.HealthSection, bgp.BgpSection, bgp.Peer, bgp.Bfd, bgp.Attributes):
        for name, field in model.model_fields.items():
            if field.exclude or name in ("datapath", "api", "limits", "tcp", "recorder", "health", "bgp", "peers",
                                         "services"):
                continue
            assert f"{name} =" in text, f"{model.__name__}.{name} is not documented in {SAMPLE.name}"


def test_defaults_of_a_minimal_config() -> None:
    cfg = parse(MINIMAL)
    assert cfg.api.socket == Path("/run/l4lbd/l4lbd.sock") and cfg.api.mode == 0o600
    assert cfg.api.tcp is None
    assert cfg.datapath.xdp_mode == "auto" and cfg.datapath.maglev_m == 16381
    assert cfg.log_level == "info" and cfg.state_dir == Path("/var/lib/l4lbd/state")
    assert cfg.recorder_dir == Path("/var/lib/l4lbd/recordings")
    assert (cfg.recorder.max_total_bytes, cfg.recorder.max_recording_bytes, cfg.recorder.min_free_bytes) == (
        4 << 30, 1 << 30, 1 << 30)
    assert (cfg.api.max_body_bytes, cfg.api.header_timeout, cfg.api.body_timeout) == (16 << 20, 10.0, 60.0)
    dp = cfg.datapath_config()
    assert dp.maglev_seed == b"l4lb-default" and dp.maglev_m == 16381 and dp.bpffs == Path("/sys/fs/bpf/l4lb")


def test_store_of_the_old_default_state_dir_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before recordings got a directory apart, the default state_dir was /var/lib/l4lbd."""
    legacy, new = tmp_path / "l4lbd", tmp_path / "l4lbd" / "state"
    monkeypatch.setattr(cfgmod, "LEGACY_STATE_DIR", legacy)
    monkeypatch.setattr(cfgmod, "DEFAULT_STATE_DIR", new)
    assert parse(MINIMAL).state_dir == new                   # nothing there yet: the new default
    legacy.mkdir()
    (legacy / "state.sqlite3").write_bytes(b"")
    assert parse(MINIMAL).state_dir == legacy                # an old install's store is used where it is
    new.mkdir()
    (new / "state.sqlite3").write_bytes(b"")
    assert parse(MINIMAL).state_dir == new                   # once moved, the new place wins


def test_recorder_dir_must_not_be_the_state_dir() -> None:
    msg = refused(MINIMAL.replace("[datapath]", 'state_dir = "/srv/l4"\nrecorder_dir = "/srv/l4"\n[datapath]'))
    assert "recorder_dir and state_dir are both /srv/l4" in msg


def test_full_datapath_section_maps_onto_datapath_config() -> None:
    seed = base64.b64encode(b"0123456789ab").decode()
    cfg = parse(f"""
log_level = "DEBUG"
[datapath]
interfaces = ["eth0", "eth1"]
xdp_mode = "native"
maglev_m = 251
maglev_seed = "{seed}"
outer_src_v4 = "192.0.2.0/28"
outer_src_v6 = "2001:db8:ff::/112"
max_services = 10
max_backends = 100
flow_table_size = 4096
icmp_rate = 5
[limits]
max_services = 10
max_backends_per_service = 7
""")
    assert cfg.log_level == "debug"
    dp = cfg.datapath_config()
    assert (dp.maglev_m, dp.maglev_seed, dp.max_services, dp.max_backends, dp.flow_table_size, dp.icmp_rate) == (
        251, b"0123456789ab", 10, 100, 4096, 5)
    assert str(dp.outer_src_v4) == "192.0.2.0/28" and str(dp.outer_src_v6) == "2001:db8:ff::/112"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bogus = 1\n" + MINIMAL, "bogus: unknown key"),
        (MINIMAL + "xdp_mod = 'native'\n", "datapath.xdp_mod: unknown key"),
        ("[api]\n", "datapath: required key is missing"),
        ("[datapath]\n", "datapath.interfaces: required key is missing"),
        (MINIMAL + "xdp_mode = 'fast'\n", "datapath.xdp_mode: Input should be 'native', 'generic' or 'auto'"),
        (MINIMAL + "maglev_m = 1000\n", "datapath.maglev_m: 1000 is not an allowed Maglev table size"),
        (MINIMAL + "maglev_seed = 'not base64!'\n", "datapath.maglev_seed: is not valid base64"),
        (MINIMAL + "maglev_seed = 'YWJj'\n", "datapath.maglev_seed: must decode to 12 bytes, not 3"),
        (MINIMAL + "outer_src_v4 = '2001:db8::/64'\n", "datapath.outer_src_v4"),
        (MINIMAL + "outer_src_v4 = '192.0.2.1/24'\n", "datapath.outer_src_v4"),
        (MINIMAL + "bpffs = 'relative/dir'\n", "datapath.bpffs: must be an absolute path"),
        ("[datapath]\ninterfaces = ['eth0', 'eth0']\n", "datapath.interfaces: interface 'eth0' is listed twice"),
        ("[datapath]\ninterfaces = ['a/b']\n", "datapath.interfaces: 'a/b' is not a valid interface name"),
        ("[datapath]\ninterfaces = ['sixteen-chars-xx']\n", "is not a valid interface name"),
        ("log_level = 'loud'\n" + MINIMAL, "log_level: 'loud' is not one of"),
        ("state_dir = 'var/lib'\n" + MINIMAL, "state_dir: must be an absolute path"),
        ("stats_interval = 0\n" + MINIMAL, "stats_interval"),
        (MINIMAL + "[api]\nsocket_mode = '0666'\n", "api.socket_mode: mode 0666 lets every local user"),
        (MINIMAL + "[api]\nsocket_mode = 'rw'\n", "api.socket_mode: 'rw' is not an octal mode"),
        (MINIMAL + "[api]\nsocket = 'l4lbd.sock'\n", "api.socket: must be an absolute path"),
        (MINIMAL + "[api]\nsocket = '/" + "x" * 120 + "'\n", "api.socket: "),
        (MINIMAL + "[limits]\nmax_services = 2000\n", "limits.max_services = 2000 exceeds the datapath's map size"),
        (MINIMAL + "[limits]\nmax_backends_per_service = 5000\n", "limits.max_backends_per_service"),
        (MINIMAL + "[limits]\nmax_services = 0\n", "limits.max_services"),
        (MINIMAL + "[api.tcp]\nlisten = '127.0.0.1:9180'\n", "api.tcp: a TCP listener needs token_file"),
        (MINIMAL + "[api.tcp]\nlisten = '0.0.0.0:9180'\nlocalhost_only_insecure = true\n",
         "api.tcp: localhost_only_insecure is allowed only on a loopback host, and 0.0.0.0 is not one"),
        (MINIMAL + "[api.tcp]\nlisten = '127.0.0.1'\nlocalhost_only_insecure = true\n", "api.tcp.listen: '127.0.0.1' is not host:port"),
        (MINIMAL + "[api.tcp]\nlisten = 'example.com:80'\nlocalhost_only_insecure = true\n", "must be an IP address"),
        (MINIMAL + "[api.tcp]\nlisten = '127.0.0.1:99999'\nlocalhost_only_insecure = true\n", "port '99999' must be 1-65535"),
        (MINIMAL + "[api.tcp]\nlisten = '::1:80'\nlocalhost_only_insecure = true\n", "write IPv6 hosts as [addr]:port"),
        (MINIMAL + "[api.tcp]\nlisten = '127.0.0.1:1'\ntoken = 'abc'\n", "put the token in a file"),
        (MINIMAL + "[api.tcp]\nlisten = '127.0.0.1:1'\ntoken_file = '/nonexistent/token'\n",
         "token_file /nonexistent/token: No such file or directory"),
        ("[datapath\n", "TOML syntax error"),
    ],
)
def test_bad_config_is_refused_naming_key_and_problem(text: str, expected: str) -> None:
    assert expected in refused(text)


def test_several_problems_are_all_reported() -> None:
    msg = refused("bogus = 1\nlog_level = 'x'\n[datapath]\ninterfaces = []\nmaglev_m = 7\n")
    assert "bogus: unknown key" in msg and "log_level:" in msg and "datapath.maglev_m:" in msg


def test_tcp_listener_with_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    token.chmod(0o600)
    cfg = parse(MINIMAL + f"[api.tcp]\nlisten = '[::1]:9180'\ntoken_file = '{token}'\n")
    assert cfg.api.tcp is not None
    assert (cfg.api.tcp.host, cfg.api.tcp.port) == ("::1", 9180)
    assert cfg.api.tcp.token is not None and cfg.api.tcp.token.get_secret_value() == "s3cret-token-0123456789"
    assert "s3cret" not in repr(cfg) and "s3cret" not in cfg.model_dump_json()

    token.chmod(0o604)
    assert "is accessible by other users (mode 0604)" in refused(
        MINIMAL + f"[api.tcp]\nlisten = '127.0.0.1:1'\ntoken_file = '{token}'\n")
    token.chmod(0o600)
    token.write_text("short\n")
    assert "at least 16 characters" in refused(MINIMAL + f"[api.tcp]\nlisten = '127.0.0.1:1'\ntoken_file = '{token}'\n")


def test_insecure_tcp_only_on_loopback() -> None:
    cfg = parse(MINIMAL + "[api.tcp]\nlisten = 'localhost:9180'\nlocalhost_only_insecure = true\n")
    assert cfg.api.tcp is not None and cfg.api.tcp.token is None and cfg.api.tcp.host == "127.0.0.1"


def test_socket_mode_accepts_toml_octal_and_string() -> None:
    assert parse(MINIMAL + "[api]\nsocket_mode = 0o660\n").api.mode == 0o660
    assert parse(MINIMAL + "[api]\nsocket_mode = '0640'\n").api.mode == 0o640


def test_restart_only_changes() -> None:
    a = parse(MINIMAL)
    b = parse("log_level = 'debug'\n[datapath]\ninterfaces = ['eth1']\nmaglev_m = 251\n[limits]\nmax_services = 3\n")
    assert a.restart_only_changes(b) == ["datapath.maglev_m"]
    assert a.restart_only_changes(a) == []


def test_pending_restart_is_the_difference_between_running_and_file() -> None:
    """SIGHUP's list: what the file says and the running daemon does not do yet, no more."""
    from l4lb.daemon import pending_restart

    running = parse(MINIMAL)
    seed = base64.b64encode(b"0123456789ab").decode()
    m509 = parse(MINIMAL + f"maglev_m = 509\nmaglev_seed = '{seed}'\nicmp_rate = 5\n")
    assert pending_restart(running, m509) == ["datapath.icmp_rate", "datapath.maglev_m", "datapath.maglev_seed"]
    # A reload puts the run-time keys in force; M stays as started.
    after = running.with_runtime_datapath(m509)
    assert (after.datapath.maglev_m, after.datapath.seed_bytes, after.datapath.icmp_rate) == (16381, b"0123456789ab", 5)
    assert pending_restart(after, m509) == ["datapath.maglev_m"]
    # Changing M back takes it off the list (it used to warn until the next restart).
    assert pending_restart(after, parse(MINIMAL + f"maglev_seed = '{seed}'\nicmp_rate = 5\n")) == []
    bgp = "[bgp]\nlocal_as = 65010\nrouter_id = '192.0.2.1'\n[[bgp.peers]]\naddress = '192.0.2.254'\nremote_as = 65000\n"
    assert pending_restart(running, parse(MINIMAL + bgp)) == ["bgp"]
    assert pending_restart(parse(MINIMAL + bgp), running) == ["bgp"]


def test_load_reports_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        cfgmod.load(tmp_path / "missing.toml")


# --- CLI --------------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "l4lbd.toml"
    p.write_text(text)
    return p


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from l4lb.daemon import main

    p = write(tmp_path, f"[datapath]\ninterfaces = ['lo']\nbpffs = '{tmp_path}'\n")
    assert main(["--config", str(p), "--check-config"]) == 0
    out = capsys.readouterr()
    assert "is valid" in out.out
    assert "warning: datapath.maglev_seed is the public default" in out.err  # no seed given
    seed = base64.b64encode(b"0123456789ab").decode()
    p.write_text(p.read_text() + f"maglev_seed = '{seed}'\n")
    assert main(["--config", str(p), "--check-config"]) == 0
    assert capsys.readouterr().err == ""


def test_check_config_bad_key_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from l4lb.daemon import main

    p = write(tmp_path, "[datapath]\ninterfaces = ['lo']\nmaglev_m = 12\n")
    assert main(["--config", str(p), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert "datapath.maglev_m: 12 is not an allowed Maglev table size" in err


def test_check_config_missing_interface_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from l4lb.daemon import main

    p = write(tmp_path, f"[datapath]\ninterfaces = ['nosuchif0']\nbpffs = '{tmp_path}'\n")
    assert main(["--config", str(p), "--check-config"]) == 2
    assert "there is no interface named 'nosuchif0'" in capsys.readouterr().err


def test_daemon_refuses_bad_config_before_doing_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Plain start with a bad file: exit 2 with the key named; no state dir, no socket made."""
    from l4lb.daemon import main

    state = tmp_path / "state"
    p = write(tmp_path, f"state_dir = '{state}'\n[datapath]\ninterfaces = ['lo']\nxdp_mode = 'turbo'\n"
                        f"[api]\nsocket = '{tmp_path}/s.sock'\n")
    assert main(["--config", str(p)]) == 2
    assert "datapath.xdp_mode" in capsys.readouterr().err
    assert not state.exists() and not (tmp_path / "s.sock").exists()


def test_cli_modes_are_exclusive() -> None:
    from l4lb.daemon import main

    with pytest.raises(SystemExit) as e:
        main(["--check-config", "--detach"])
    assert e.value.code == 2



# Numbers and switches are taken as written (l4lb/scalars.py): pydantic's lax mode read
# `stats_interval = true` as one second and `forward_icmp_errors = 0` as false, silently.
BGP = '\n[bgp]\nlocal_as = 65010\nrouter_id = "192.0.2.1"\n{}\n[[bgp.peers]]\naddress = "192.0.2.254"\nremote_as = 65000\n{}'


@pytest.mark.parametrize(("text", "expected"), [
    ("stats_interval = true\n" + MINIMAL, "stats_interval: Input should be a valid number"),
    (MINIMAL + "maglev_m = true\n", "datapath.maglev_m: Input should be a valid integer"),
    (MINIMAL + "flow_table_size = 65536.0\n", "datapath.flow_table_size: Input should be a valid integer"),
    (MINIMAL + "forward_icmp_errors = 0\n", "datapath.forward_icmp_errors: Input should be a valid boolean"),
    (MINIMAL + "forward_icmp_errors = \"no\"\n", "datapath.forward_icmp_errors: Input should be a valid boolean"),
    (MINIMAL + "[health]\nenabled = 1\n", "health.enabled: Input should be a valid boolean"),
    (MINIMAL + "[api]\nmax_body_bytes = \"16777216\"\n", "api.max_body_bytes: Input should be a valid integer"),
    (MINIMAL + BGP.format("hold_time = false", ""), "bgp.hold_time: Input should be a valid integer"),
    (MINIMAL + BGP.format("", "bfd = 1"), "bgp.peers[0].bfd: Input should be a valid boolean"),
])
def test_numbers_and_switches_are_taken_as_written(text: str, expected: str) -> None:
    assert expected in refused(text)


def test_an_integer_is_a_valid_number_of_seconds() -> None:
    cfg = parse("stats_interval = 2\n" + MINIMAL + "[api]\nheader_timeout = 10\n", "test.toml")
    assert (cfg.stats_interval, cfg.api.header_timeout) == (2.0, 10.0)
