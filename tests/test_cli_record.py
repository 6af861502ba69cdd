"""``l4lbctl record`` (the installed console script) against a real l4lbd: real XDP datapath
in a private netns, real frames injected into its veth, files read back with tshark.

What the CLI claims is checked against the daemon's API and against the files themselves;
refused commands are shown to start nothing. No invocation may print a traceback."""

from __future__ import annotations

import ipaddress
import json
import os
import pty
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from scapy.all import IP, TCP, Ether, Raw, raw
from test_daemon_harness import DaemonLab

from l4lb.lab import netns

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

L4LBCTL = Path(sys.executable).parent / "l4lbctl"
VIP = "198.51.100.30"
CLIENT = "203.0.113.30"
FILTER = f"{CLIENT} 0 {VIP} 80 tcp"
SIZE = 200


# --- fixtures and helpers --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(bpffs: Path) -> Iterator[DaemonLab]:
    assert L4LBCTL.exists(), f"{L4LBCTL} missing: run `.venv/bin/pip install -e . --no-deps`"
    the_lab = DaemonLab(bpffs, "crec")
    the_lab.worker = netns.NetnsWorker(the_lab.ns)
    # The recorder watches service traffic.
    with the_lab.running({"web": {"vip": VIP, "port": 80, "backends": [{"address": "192.0.2.1"}]}}):
        yield the_lab


@pytest.fixture
def api(lab: DaemonLab) -> Iterator[httpx.Client]:
    """The daemon's API, straight; every test starts and ends without recordings."""
    with lab.client() as c:
        def clear() -> None:
            for r in c.get("/v1/recordings").json()["recordings"]:
                assert c.delete(f"/v1/recordings/{r['id']}").status_code == 204

        clear()
        yield c
        clear()


def env_for(lab: DaemonLab | None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("L4LBCTL_")}
    if lab is not None:
        e["L4LBCTL_SOCKET"] = str(lab.socket)
    return e


def run(lab: DaemonLab | None, *args: str, text: bool = True) -> subprocess.CompletedProcess[Any]:
    cp = subprocess.run([str(L4LBCTL), *args], capture_output=True, text=text, timeout=120, env=env_for(lab))
    err = cp.stderr if text else cp.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    return cp


def ok(lab: DaemonLab, *args: str) -> str:
    cp = run(lab, *args)
    assert cp.returncode == 0, f"l4lbctl {' '.join(args)} -> {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    return cp.stdout


def fails(lab: DaemonLab | None, code: int, *args: str) -> str:
    cp = run(lab, *args)
    assert cp.returncode == code, f"l4lbctl {' '.join(args)} -> {cp.returncode}, wanted {code}\n{cp.stderr}"
    assert cp.stdout == "" and cp.stderr.strip(), cp
    return cp.stderr


def inject(lab: DaemonLab, n: int, *, src: str = CLIENT) -> None:
    """n TCP SYNs from src to VIP:80, sent into the XDP interface from its veth peer."""
    frames = [raw(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02") / IP(src=src, dst=VIP)
                  / TCP(sport=42000 + i, dport=80, flags="S") / Raw(b"c" * (SIZE - 54))) for i in range(n)]

    def go() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind(("lbt0b", 0))
            for f in frames:
                s.send(f)

    lab.worker.call(go)


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def recording_named(api: httpx.Client, name: str) -> dict[str, Any] | None:
    found = [r for r in api.get("/v1/recordings").json()["recordings"] if r["name"] == name]
    assert len(found) <= 1
    return found[0] if found else None


def live(lab: DaemonLab, *args: str, stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen([str(L4LBCTL), "record", *args], env=env_for(lab), text=True,
                            stdout=subprocess.PIPE, stderr=stderr)


def tshark(path: Path, *fields: str) -> list[list[str]]:
    cmd = ["tshark", "-r", str(path), "-T", "fields", "-E", "separator=|"]
    for f in fields:
        cmd += ["-e", f]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return [line.split("|") for line in cp.stdout.splitlines()]


def pcapng_blocks(data: bytes) -> list[int]:
    off, types = 0, []
    while off < len(data):
        btype, blen = struct.unpack_from("<II", data, off)
        types.append(btype)
        off += blen
    assert off == len(data), "a truncated block"
    return types


def rows(text: str) -> list[list[str]]:
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in text.strip().splitlines()]


# --- recording until a limit ----------------------------------------------------------------------------------------------


def test_packet_limit_ends_it_and_the_downloaded_file_reads_in_tshark(lab: DaemonLab, api: httpx.Client,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "web.pcapng"
    proc = live(lab, FILTER, "--packets", "5", "--capture-length", "96", "--name", "limit", "-w", str(out),
                "--interval", "0.2")
    rec = wait_for(lambda: recording_named(api, "limit"), "the recording to start")
    assert rec["state"] == "running" and rec["stop"]["packets"] == 5
    inject(lab, 3, src="192.0.2.99")            # not matching
    inject(lab, 8)                              # 5 recorded, then the limit
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    final = api.get(f"/v1/recordings/{rec['id']}").json()
    assert (final["state"], final["stop_reason"], final["packets"]) == ("stopped", "max_packets", 5)
    # stdout: the local copy's path only; stderr: the banner, status lines, the summary
    assert stdout.splitlines() == [str(out)]
    assert f"Recording {rec['id']} (limit): {CLIENT}/32 0 {VIP}/32 80 TCP" in stderr
    assert "Until 5 packets or Ctrl-C." in stderr
    assert f"{rec['id']}  5/5 packets  480 B  0 lost" in stderr and "stopped: packet limit reached" in stderr
    assert f"Recording {rec['id']} (limit) packet limit reached: 5 packets, 480 B, 0 lost, 1 file" in stderr
    assert "\r" not in stderr, "stderr is no terminal: plain lines"
    # the copy is the daemon's file, byte for byte, and tshark reads it
    daemon_file = Path(final["files"][0]["path"])
    assert daemon_file.parent == lab.dir / "rec" and out.read_bytes() == daemon_file.read_bytes()
    assert tshark(out, "frame.cap_len", "frame.len", "ip.src", "tcp.dstport") == [["96", str(SIZE), CLIENT, "80"]] * 5
    assert not list(tmp_path.glob(".*.part")), "no temporary files left"


def test_without_w_it_prints_the_daemon_paths_json_too(lab: DaemonLab, api: httpx.Client) -> None:
    proc = live(lab, FILTER, "-c", "2", "--name", "paths", "--format", "pcap", "--interval", "0.2")
    rec = wait_for(lambda: recording_named(api, "paths"), "the recording to start")
    inject(lab, 2)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    path = Path(stdout.strip())
    assert path == lab.dir / "rec" / f"{rec['id']}_000000.pcap" and path.is_file()
    assert len(tshark(path, "frame.number")) == 2

    proc = live(lab, "-o", "json", FILTER, "-c", "1", "--name", "json", "--interval", "0.2")
    rec = wait_for(lambda: recording_named(api, "json"), "the recording to start")
    inject(lab, 1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    doc = json.loads(stdout)
    assert (doc["id"], doc["state"], doc["packets"], doc["stop_reason"]) == (rec["id"], "stopped", 1, "max_packets")


def test_rotation_downloads_every_file(lab: DaemonLab, api: httpx.Client, tmp_path: Path) -> None:
    # 300 bytes is less than header + one packet: every file holds exactly one packet
    proc = live(lab, FILTER, "-c", "3", "--rotate-size", "300", "--name", "rot", "-w", str(tmp_path / "r.pcapng"),
                "--interval", "0.2")
    wait_for(lambda: recording_named(api, "rot"), "the recording to start")
    inject(lab, 3)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    saved = [tmp_path / f"r_{i}.pcapng" for i in range(3)]
    assert stdout.splitlines() == [str(p) for p in saved]
    assert [len(tshark(p, "frame.number")) for p in saved] == [1, 1, 1]
    assert "3 files" in stderr


def test_duration_limit(lab: DaemonLab, api: httpx.Client, tmp_path: Path) -> None:
    cp = run(lab, "record", FILTER, "--duration", "1s", "-w", f"{tmp_path}/", "--interval", "0.2")
    assert cp.returncode == 0, cp.stderr
    (rec,) = api.get("/v1/recordings").json()["recordings"]
    assert (rec["stop_reason"], rec["packets"]) == ("max_duration", 0)
    assert cp.stdout.splitlines() == [str(tmp_path / rec["files"][0]["name"])]
    assert "duration reached" in cp.stderr
    assert tshark(tmp_path / rec["files"][0]["name"], "frame.number") == []


# --- Ctrl-C --------------------------------------------------------------------------------------------------------------


def test_ctrl_c_stops_the_recording_cleanly(lab: DaemonLab, api: httpx.Client, tmp_path: Path) -> None:
    proc = live(lab, FILTER, "--name", "ctrlc", "-w", str(tmp_path), "--interval", "0.2")
    rec = wait_for(lambda: recording_named(api, "ctrlc"), "the recording to start")
    inject(lab, 4)
    wait_for(lambda: api.get(f"/v1/recordings/{rec['id']}").json()["packets"] == 4, "4 packets")
    assert proc.poll() is None, "no limit: still recording"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Interrupted" not in stderr
    final = api.get(f"/v1/recordings/{rec['id']}").json()
    assert (final["state"], final["stop_reason"], final["packets"]) == ("stopped", "stopped", 4)
    local = tmp_path / final["files"][0]["name"]
    assert stdout.splitlines() == [str(local)]
    data = local.read_bytes()
    assert pcapng_blocks(data)[-1] == 5, "complete file: interface statistics block last"
    assert data == Path(final["files"][0]["path"]).read_bytes()
    assert len(tshark(local, "frame.number")) == 4
    inject(lab, 2)
    time.sleep(0.5)
    assert api.get(f"/v1/recordings/{rec['id']}").json()["packets"] == 4, "nothing recorded after the stop"


def test_sigterm_stops_it_too_and_a_terminal_gets_one_rewritten_line(lab: DaemonLab, api: httpx.Client) -> None:
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    proc = live(lab, FILTER, "--name", "tty", "--interval", "0.1", stderr=slave)
    os.close(slave)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rec = wait_for(lambda: recording_named(api, "tty"), "the recording to start")
        inject(lab, 2)
        wait_for(lambda: b"2 packets" in b"".join(chunks), "the status line to show 2 packets")
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        reader.join(5)
        os.close(master)
    assert proc.returncode == 0
    tty = b"".join(chunks).decode()
    assert "Traceback" not in tty
    assert api.get(f"/v1/recordings/{rec['id']}").json()["stop_reason"] == "stopped"
    status = tty[tty.index("Ctrl-C.") + len("Ctrl-C."):tty.index("Recording", tty.index("Ctrl-C."))]
    # many updates, all on one line: each starts with \r and clears the rest; one newline at the end
    assert status.count(f"\r{rec['id']}  ") >= 2 and status.count("\x1b[K") >= 2
    assert status.strip("\r\n").count("\n") == 0 and "stopped: stopped" in status
    assert stdout.strip() == str(lab.dir / "rec" / f"{rec['id']}_000000.pcapng")


# --- managing recordings -------------------------------------------------------------------------------------------------


def test_detach_list_show_stop_download_delete(lab: DaemonLab, api: httpx.Client, tmp_path: Path) -> None:
    rid = ok(lab, "record", "--detach", "--name", "probe", FILTER, "any 0 any 443 tcp").strip()
    rec = api.get(f"/v1/recordings/{rid}").json()
    assert (rec["state"], rec["name"], len(rec["filters"])) == ("running", "probe", 3)  # any/any: IPv4 + IPv6
    inject(lab, 4)
    wait_for(lambda: api.get(f"/v1/recordings/{rid}").json()["packets"] == 4, "4 packets")

    listed = rows(ok(lab, "record", "list"))
    assert listed[0] == ["ID", "NAME", "STATE", "REASON", "PACKETS", "BYTES", "LOST", "FILES", "STARTED", "ELAPSED",
                         "FILTER"]
    (row,) = listed[1:]
    assert row[:8] == [rid, "probe", "running", "-", "4", str(4 * SIZE), "0", "1"]
    assert row[10] == f"{CLIENT}/32 0 {VIP}/32 80 TCP (+2)"
    for argv in (("record", "list", "-o", "json"), ("-o", "json", "record", "list")):
        doc = json.loads(ok(lab, *argv))
        assert [(r["id"], r["packets"]) for r in doc["recordings"]] == [(rid, 4)]

    shown = ok(lab, "record", "show", rid)
    assert f"Recording:   {rid}" in shown and "State:       running" in shown and "Packets:     4" in shown
    assert f"{CLIENT}/32 0 {VIP}/32 80 TCP; 0.0.0.0/0 0 0.0.0.0/0 443 TCP; ::/0 0 ::/0 443 TCP" in shown
    assert str(lab.dir / "rec" / f"{rid}_000000.pcapng") in shown
    assert yaml.safe_load(ok(lab, "record", "show", rid, "-o", "yaml"))["packets"] == 4

    # a running recording downloads what it has so far
    cp = run(lab, "record", "download", rid, "-w", str(tmp_path / "early.pcapng"))
    assert cp.returncode == 0 and "still running" in cp.stderr
    assert len(tshark(tmp_path / "early.pcapng", "frame.number")) == 4

    stopped = ok(lab, "record", "stop", rid)
    assert "State:       stopped (stopped)" in stopped
    assert api.get(f"/v1/recordings/{rid}").json()["state"] == "stopped"
    assert "State:       stopped (stopped)" in ok(lab, "record", "stop", rid), "stopping again: a no-op"

    out = ok(lab, "record", "download", rid, "-w", str(tmp_path))
    local = tmp_path / f"{rid}_000000.pcapng"
    assert out.splitlines() == [str(local)]
    assert tshark(local, "ip.src", "frame.len") == [[CLIENT, str(SIZE)]] * 4
    cp = subprocess.run([str(L4LBCTL), "record", "download", rid, "-w", "-"], capture_output=True, timeout=60,
                        env=env_for(lab))
    assert cp.returncode == 0 and cp.stdout == local.read_bytes()
    assert "has no file 3" in fails(lab, 1, "record", "download", rid, "--index", "3", "-w", str(tmp_path))

    assert ok(lab, "record", "delete", rid) == f"recording {rid} deleted\n"
    assert api.get(f"/v1/recordings/{rid}").status_code == 404
    for argv in (("show", rid), ("stop", rid), ("delete", rid), ("download", rid, "-w", str(tmp_path))):
        err = fails(lab, 1, "record", *argv)
        assert err.startswith(f"Error: no recording '{rid}' (HTTP 404 "), err
    assert ok(lab, "record", "list") == "no recordings\n"


# --- refusals ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    ((f"{CLIENT} 0 {VIP} 80",), "expected 5 fields 'SRC SPORT DST DPORT PROTO', got 4"),
    ((f"{CLIENT} 0 2001:db8::1 80 tcp",), "mixed address families"),
    (("203.0.113.30/24 0 any 0 any",), "host bits set below the prefix length; did you mean 203.0.113.0/24?"),
    ((FILTER, "any 0 any 70000 tcp"), "port"),
    (("any 0 any 80 icmp",), "a port needs protocol TCP, UDP or ANY"),
    ((CLIENT, "0", VIP, "80", "tcp"), f'quote it, e.g. l4lbctl record "{CLIENT} 0 {VIP} 80 tcp"'),
    ((FILTER, "--rotate-count", "3"), "--rotate-count needs --rotate-size"),
    ((FILTER, "--capture-length", "20000"), "--capture-length"),
    ((FILTER, "--direction", "up"), "'up' is not one of 'in', 'out', 'both'"),
    ((FILTER, "--bytes", "10X"), "is not a size"),
    ((FILTER, "--duration", "0"), "is not a duration > 0"),
    ((FILTER, "--name", "a/b"), "up to 64 letters"),
    ((FILTER, "-w", "/nonexistent-dir/x.pcapng"), "/nonexistent-dir is not a directory"),
    ((FILTER, "--detach", "-w", "/tmp/x"), "--detach leaves the recording running"),
    ((), "Usage: l4lbctl record"),
])
def test_bad_input_is_exit_2_and_starts_nothing(lab: DaemonLab, api: httpx.Client, argv: tuple[str, ...],
                                                message: str) -> None:
    cp = run(lab, "record", *argv)
    assert cp.returncode == 2, cp
    assert message in cp.stderr, cp.stderr
    assert cp.stdout == "" and "Traceback" not in cp.stderr
    assert api.get("/v1/recordings").json()["recordings"] == [], "nothing started"


def test_daemon_refusal_is_exit_1_and_starts_nothing(lab: DaemonLab, api: httpx.Client) -> None:
    many = [f"{ipaddress.ip_network(f'203.0.113.30/{n}', strict=False)} 0 any 0 any" for n in range(33)]  # 33 masks
    err = fails(lab, 1, "record", *many)
    assert "masks" in err and "(HTTP 422 " in err
    assert api.get("/v1/recordings").json()["recordings"] == []


def test_daemon_down_is_exit_3(lab: DaemonLab, api: httpx.Client, tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    for argv in ((FILTER,), (FILTER, "--detach"), ("list",), ("show", "abc"), ("stop", "abc"),
                 ("download", "abc", "-w", str(tmp_path)), ("delete", "abc")):
        err = fails(None, 3, "--socket", str(sock), "record", *argv)
        assert err.startswith(f"Error: no l4lbd socket at {sock}: is l4lbd running?"), err
    assert api.get("/v1/recordings").json()["recordings"] == []


def test_help_shows_the_layout() -> None:
    cp = run(None, "--help")
    assert cp.returncode == 0 and "  record " in cp.stdout
    cp = run(None, "record", "--help")
    assert cp.returncode == 0
    assert "Usage: l4lbctl record [start] FILTER... [OPTIONS] | COMMAND [ARGS]..." in cp.stdout
    for sub in ("start", "list", "show", "stop", "download", "delete"):
        assert f"  {sub} " in cp.stdout


# --- arming: map writes, no program swap; a restart ------------------------------------------------------------------


def test_any_new_mask_is_armed_before_the_cli_returns_and_the_program_stays(lab: DaemonLab,
                                                                             api: httpx.Client) -> None:
    prog = lab.xdp_prog_id("lbt0a")
    assert prog is not None
    srcs = ("203.0.113.64", "203.0.113.200")
    t0 = time.monotonic()
    # masks this daemon has not seen: a /26 source, a /28 destination with a source port wildcard, IPv6
    rid = ok(lab, "record", "--detach", f"{srcs[0]}/26 0 {VIP} 80 tcp", "203.0.113.192/28 0 198.51.100.16/28 0 any",
             "2001:db8:aa::/48 0 any 0 udp").strip()
    took = time.monotonic() - t0
    inject(lab, 2, src=srcs[0])         # right after the CLI returned: the filters must be armed already
    inject(lab, 3, src=srcs[1])
    wait_for(lambda: api.get(f"/v1/recordings/{rid}").json()["packets"] == 5, "5 packets")
    assert lab.xdp_prog_id("lbt0a") == prog, "armed by map writes: the attached program did not change"
    print(f"record --detach with 3 new masks returned in {took * 1000:.0f} ms (CLI start-up included)")
    ok(lab, "record", "stop", rid)
    inject(lab, 2, src=srcs[0])
    time.sleep(0.3)                     # nothing may arrive: there is no event to poll for
    assert api.get(f"/v1/recordings/{rid}").json()["packets"] == 5


def test_restart_keeps_the_program_and_a_new_recording_arms_on_the_adopted_one(lab: DaemonLab,
                                                                                 api: httpx.Client) -> None:
    """kill -9 with a recording running: the restarted daemon adopts the pinned program (no
    compile), clears the filters the dead one left armed, and arms new ones by map writes."""
    prog = lab.xdp_prog_id("lbt0a")
    old = ok(lab, "record", "--detach", f"203.0.113.9 0 {VIP} 80 tcp").strip()
    inject(lab, 1, src="203.0.113.9")
    wait_for(lambda: api.get(f"/v1/recordings/{old}").json()["packets"] == 1, "1 packet")
    lab.kill9()
    lab.start()
    with lab.client() as c:
        assert lab.xdp_prog_id("lbt0a") == prog, "adopted, not compiled and swapped"
        assert "cleared 1 filters an earlier daemon left armed" in lab.log_text()
        rid = run_ok_json(lab, "record", "--detach", "-o", "json", f"203.0.113.10/31 0 {VIP} 80 tcp")["id"]
        inject(lab, 2, src="203.0.113.10")
        inject(lab, 2, src="203.0.113.9")     # the dead daemon's filter is gone
        wait_for(lambda: c.get(f"/v1/recordings/{rid}").json()["packets"] == 2, "2 packets")
        # a TERM closes it cleanly; the next daemon arms again
        lab.stop()
        lab.start()
        assert lab.xdp_prog_id("lbt0a") == prog
    with lab.client() as c:
        assert c.get(f"/v1/recordings/{rid}").json()["stop_reason"] == "daemon_shutdown"
        rid2 = run_ok_json(lab, "record", "--detach", "-o", "json", f"203.0.113.10 0 {VIP} 80 tcp")["id"]
        inject(lab, 1, src="203.0.113.10")
        wait_for(lambda: c.get(f"/v1/recordings/{rid2}").json()["packets"] == 1, "1 packet")
        for r in (old, rid, rid2):
            c.delete(f"/v1/recordings/{r}")


def run_ok_json(lab: DaemonLab, *args: str) -> dict[str, Any]:
    return json.loads(ok(lab, *args))


def test_a_slow_start_says_what_it_waits_for(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from l4lb.cli import record

    monkeypatch.setattr(record, "ARMING_NOTICE_S", 0.01)
    with record._arming(("any 0 any 443 tcp", FILTER)):
        time.sleep(0.2)                 # a daemon that takes its time
    assert capsys.readouterr().err == "Waiting for l4lbd to arm 3 filters in the datapath...\n"
    monkeypatch.setattr(record, "ARMING_NOTICE_S", 5)
    with record._arming((FILTER,)):
        pass
    time.sleep(0.05)
    assert capsys.readouterr().err == "", "a quick answer: no line"


def test_a_notice_late_in_its_own_thread_is_not_said_after_the_answer(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from l4lb.cli import record

    sock = tmp_path / "l4lbd.sock"
    sock.touch()

    class SlowEndpoint:  # the timer fires, then its thread is held up (a busy machine, the GIL)
        socket = str(sock)

        @property
        def url(self) -> None:
            time.sleep(0.3)

    monkeypatch.setattr(record, "ARMING_NOTICE_S", 0.01)
    app = SimpleNamespace(client=SimpleNamespace(endpoint=SlowEndpoint()))
    with record._arming((FILTER,), app):  # type: ignore[arg-type]
        time.sleep(0.1)                 # answered while the notice's thread is still on its way
    time.sleep(0.5)
    assert capsys.readouterr().err == "", "the notice came after the answer (it lands in the status line)"


def test_direction_is_passed_shown_and_kept(lab: DaemonLab, api: httpx.Client, tmp_path: Path) -> None:
    rid = ok(lab, "record", "--detach", "--direction", "IN", FILTER).strip()
    assert api.get(f"/v1/recordings/{rid}").json()["direction"] == "in"
    assert "Direction:   in (as packets arrived)" in ok(lab, "record", "show", rid)
    inject(lab, 3)
    wait_for(lambda: api.get(f"/v1/recordings/{rid}").json()["packets"] == 3, "3 packets")
    ok(lab, "record", "stop", rid)
    ok(lab, "record", "download", rid, "-w", str(tmp_path))
    rows = tshark(tmp_path / f"{rid}_000000.pcapng", "frame.packet_flags_direction", "frame.interface_name")
    assert rows == [["0x00000001", "lbt0a"]] * 3
