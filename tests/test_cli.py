"""l4lbctl, the installed console script, against a real l4lbd (real BPF datapath in
a private netns; one daemon, one BPF compile for the module).

Every invocation is a subprocess of .venv/bin/l4lbctl; none may print a Python
traceback. What the CLI claims is checked against the daemon's API directly, and
refused commands are shown to change nothing (revision and document unchanged).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
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

import test_daemon_harness as harness
from test_daemon_harness import PY, DaemonLab

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

L4LBCTL = Path(sys.executable).parent / "l4lbctl"
VIP4, VIP6 = "198.51.100.20", "2001:db8:20::1"
TCP_PORT = 9180
TOKEN = "cli-test-token-0123456789abcdef"


# --- fixtures and helpers --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(bpffs: Path) -> Iterator[DaemonLab]:
    assert L4LBCTL.exists(), f"{L4LBCTL} missing: run `.venv/bin/pip install -e . --no-deps`"
    saved, harness.NS_PREFIX = harness.NS_PREFIX, "cli"  # our netns prefix: cli-<pid>-ctl
    try:
        the_lab = DaemonLab(bpffs, "ctl")
    finally:
        harness.NS_PREFIX = saved
    try:
        token = the_lab.dir / "api.token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        # A TCP listener too (inside the lab netns only) for --url and the bearer token.
        the_lab.config["api"]["tcp"] = {"listen": f"127.0.0.1:{TCP_PORT}", "token_file": str(token)}
        the_lab.start()
        yield the_lab
    finally:
        the_lab.close()


@pytest.fixture
def api(lab: DaemonLab) -> Iterator[httpx.Client]:
    """The daemon's API, straight (to set up and to check what the CLI did); every test starts empty."""
    with lab.client() as c:
        assert c.put("/v1/state", json={"services": []}).status_code == 200
        yield c


def run(lab: DaemonLab | None, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One l4lbctl process, on the lab's socket unless told otherwise. Never a traceback."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("L4LBCTL_")}
    if lab is not None:
        e["L4LBCTL_SOCKET"] = str(lab.socket)
    e.update(env or {})
    cp = subprocess.run([*prefix, str(L4LBCTL), *args], input=stdin, capture_output=True, text=True,
                        timeout=timeout, env=e)
    assert "Traceback" not in cp.stderr + cp.stdout, cp.stderr
    return cp


def ok(lab: DaemonLab, *args: str, **kw: Any) -> str:
    cp = run(lab, *args, **kw)
    assert cp.returncode == 0, f"l4lbctl {' '.join(args)} -> {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    assert cp.stderr == ""
    return cp.stdout


def fails(lab: DaemonLab | None, code: int, *args: str, **kw: Any) -> str:
    """Runs a command that must fail with ``code``; returns its stderr (nothing on stdout)."""
    cp = run(lab, *args, **kw)
    assert cp.returncode == code, f"l4lbctl {' '.join(args)} -> {cp.returncode}, wanted {code}\n{cp.stderr}"
    assert cp.stdout == "" and cp.stderr.strip(), cp
    return cp.stderr


def snapshot(api: httpx.Client) -> tuple[str, Any]:
    r = api.get("/v1/state")
    return r.headers["x-l4lb-revision"], r.json()


def rows(table: str) -> list[list[str]]:
    """A CLI table split into cells (columns are separated by two or more spaces)."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in table.strip().splitlines()]


def fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def web(**kw: Any) -> dict[str, Any]:
    doc = {"vip": VIP4, "port": 80, "backends": [{"address": "192.0.2.1"}, {"address": "192.0.2.2", "weight": 50}]}
    return doc | kw


def web6(**kw: Any) -> dict[str, Any]:
    doc = {"vip": VIP6, "port": 443, "options": {"l4_dnat": True},
           "backends": [{"address": "2001:db8::10", "port": 8443}, {"address": "2001:db8::11"}]}
    return doc | kw


class Interposer:
    """A unix-socket relay in front of the daemon that, right before relaying the first
    request with ``method``, runs ``meddle`` (a real write through the daemon's own
    socket). It puts a concurrent change exactly between the CLI's read and its
    conditional write, which a test could not otherwise time."""

    def __init__(self, upstream: Path, path: Path, method: str, meddle: Callable[[], None]) -> None:
        self.upstream, self.method, self.meddle = str(upstream), method, meddle
        self.meddled = False
        relay = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with socket.socket(socket.AF_UNIX) as up:
                    up.connect(relay.upstream)
                    answers = up.makefile("rb")
                    while head := _read_head(self.rfile):
                        body = self.rfile.read(_length(head))
                        if head.split(b" ", 1)[0].decode() == relay.method and not relay.meddled:
                            relay.meddled = True
                            relay.meddle()
                        up.sendall(head + body)
                        rhead = _read_head(answers)
                        self.wfile.write(rhead + answers.read(_length(rhead)))

        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _read_head(f: Any) -> bytes:
    head = b""
    while line := f.readline():
        head += line
        if line == b"\r\n":
            return head
    return b""


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def inject_udp(lab: DaemonLab, dst: str, dport: int, count: int) -> None:
    """Real frames into the XDP interface, from its veth peer inside the lab netns."""
    script = (
        "from scapy.all import Ether, IP, IPv6, UDP, sendp\n"
        f"l3 = IPv6(src='2001:db8:77::7', dst='{dst}') if ':' in '{dst}' else IP(src='203.0.113.77', dst='{dst}')\n"
        f"sendp([Ether(dst='02:00:00:00:00:01') / l3 / UDP(sport=41000 + i, dport={dport}) / (b'x' * 20)"
        f" for i in range({count})], iface='lbt0b', verbose=False)\n"
    )
    lab.nsexec(PY, "-c", script)


# --- basics ------------------------------------------------------------------------------------------------------------


def test_help_lists_every_command_and_the_exit_codes() -> None:
    out = ok(None, "--help")
    for command in ("status", "service", "backend", "apply", "export", "stats", "record"):
        assert f"  {command} " in out
    assert "Exit codes" in out and "stale ETag" in out
    assert ok(None, "service", "--help").count("\n  ") >= 5
    assert ok(None, "--version").startswith("l4lbctl, version ")


def test_status_in_every_format(lab: DaemonLab, api: httpx.Client) -> None:
    api.put("/v1/services/web", json=web())
    table = fields(ok(lab, "status"))
    assert table["Ready"] == "yes" and table["Services"] == "1" and table["Backends"] == "2 (2 active)"
    assert table["Interfaces"] == "lbt0a (generic)"
    assert table["Program"].startswith(f"id {lab.xdp_prog_id('lbt0a')}, tag ")
    assert table["Revision"].startswith(api.get("/v1/state").headers["x-l4lb-revision"] + " (updated ")
    assert "services 1/64" in table["Maps"]
    as_json = json.loads(ok(lab, "-o", "json", "status"))
    as_yaml = yaml.safe_load(ok(lab, "status", "-o", "yaml"))
    for doc in (as_json, as_yaml):
        assert doc["ready"] is True and doc["services"] == 1 and doc["interfaces"] == {"lbt0a": "generic"}
    assert json.loads(ok(lab, "status", env={"L4LBCTL_OUTPUT": "json"}))["backends"] == 2


# --- services ----------------------------------------------------------------------------------------------------------


def test_service_add_list_show_edit_delete(lab: DaemonLab, api: httpx.Client) -> None:
    out = ok(lab, "service", "add", "web", f"{VIP4}:80/tcp", "-b", "192.0.2.1", "-b", "192.0.2.2@50")
    assert out.startswith(f"service 'web' created: tcp {VIP4}:80, 2 backends (revision ")
    ok(lab, "service", "add", "alt", f"[{VIP6}]:443", "--dnat", "--no-sport-hash",
       "-b", "[2001:db8::10]:8443", "-b", "2001:db8::11")
    added = yaml.safe_load(ok(lab, "service", "add", "dns", "--vip", VIP4, "--port", "53", "--proto", "udp",
                              "--no-weights", "--no-backend", "drop", "--no-ping", "-o", "yaml"))
    assert added == api.get("/v1/services/dns").json()
    assert api.get("/v1/services/web").json() == {
        "name": "web", "vip": VIP4, "port": 80, "protocol": "tcp",
        "options": {"l4_dnat": False, "hash_src_port": True, "affinity_prefix": None, "maglev_weights": True,
                    "no_backend": "reject", "answer_ping": True},
        "backends": [{"address": "192.0.2.1", "port": None, "weight": 100, "state": "active", "health": None},
                     {"address": "192.0.2.2", "port": None, "weight": 50, "state": "active", "health": None}],
        "announce": True, "health": None, "source_ranges": []}
    alt = api.get("/v1/services/alt").json()
    assert alt["options"] == {"l4_dnat": True, "hash_src_port": False, "affinity_prefix": None,
                              "maglev_weights": True, "no_backend": "reject", "answer_ping": True}
    assert [(b["address"], b["port"]) for b in alt["backends"]] == [("2001:db8::10", 8443), ("2001:db8::11", None)]
    dns = api.get("/v1/services/dns").json()
    assert (dns["protocol"], dns["port"], dns["options"]["maglev_weights"], dns["backends"]) == ("udp", 53, False, [])
    assert (dns["options"]["no_backend"], dns["options"]["answer_ping"]) == ("drop", False)

    assert rows(ok(lab, "service", "list")) == [
        ["NAME", "PROTO", "VIP:PORT", "BACKENDS", "ACTIVE", "OPTIONS"],
        ["alt", "tcp", f"[{VIP6}]:443", "2", "2", "dnat,no-sport-hash"],
        ["dns", "udp", f"{VIP4}:53", "0", "0", "no-weights,no-backend=drop,no-ping"],
        ["web", "tcp", f"{VIP4}:80", "2", "2", "-"],
    ]
    listed = api.get("/v1/services").json()
    assert json.loads(ok(lab, "service", "list", "-o", "json")) == listed
    assert yaml.safe_load(ok(lab, "-o", "yaml", "service", "list")) == listed

    show = ok(lab, "service", "show", "alt")
    head, _, backends = show.partition("\n\n")
    assert fields(head)["Address"] == f"tcp [{VIP6}]:443" and fields(head)["Options"] == "dnat, no-sport-hash"
    assert rows(backends) == [["BACKEND", "WEIGHT", "STATE"], ["[2001:db8::10]:8443", "100", "active"],
                              ["[2001:db8::11]:443", "100", "active"]]
    assert json.loads(ok(lab, "service", "show", "alt", "-o", "json")) == alt
    assert yaml.safe_load(ok(lab, "service", "show", "alt", "-o", "yaml")) == alt

    out = ok(lab, "service", "edit", "web", "--port", "8080", "--no-sport-hash")
    assert out.startswith("service 'web' updated: port 80 -> 8080, hash_src_port true -> false (revision ")
    edited = api.get("/v1/services/web").json()
    assert edited["port"] == 8080 and edited["options"]["hash_src_port"] is False
    assert [b["weight"] for b in edited["backends"]] == [100, 50]  # backends kept
    assert json.loads(ok(lab, "service", "edit", "web", f"{VIP4}:8081/tcp", "-o", "json"))["port"] == 8081
    rev = snapshot(api)
    assert ok(lab, "service", "edit", "web", "--port", "8081") == "service 'web' unchanged\n"
    assert snapshot(api) == rev

    assert ok(lab, "service", "delete", "dns").startswith("service 'dns' deleted (revision ")
    assert api.get("/v1/services/dns").status_code == 404
    deleted = json.loads(ok(lab, "service", "delete", "alt", "-o", "json"))
    assert deleted == {"deleted": "alt", "revision": int(snapshot(api)[0])}
    assert ok(lab, "service", "list", "-o", "yaml").count("name: ") == 1


def test_source_ranges_affinity_prefix_and_ipv6_backends_of_an_ipv4_vip(lab: DaemonLab, api: httpx.Client) -> None:
    out = ok(lab, "service", "add", "edge", f"{VIP4}:443", "-b", "192.0.2.1", "-b", "2001:db8::11",
             "--source-range", "203.0.113.0/24", "--source-range", "192.0.2.128/25",
             "--no-sport-hash", "--affinity-prefix", "24")
    assert out.startswith(f"service 'edge' created: tcp {VIP4}:443, 2 backends (revision ")
    edge = api.get("/v1/services/edge").json()
    assert edge["source_ranges"] == ["203.0.113.0/24", "192.0.2.128/25"]
    assert (edge["options"]["hash_src_port"], edge["options"]["affinity_prefix"]) == (False, 24)
    assert [b["address"] for b in edge["backends"]] == ["192.0.2.1", "2001:db8::11"]
    head = ok(lab, "service", "show", "edge").partition("\n\n")[0]
    assert fields(head)["Source ranges"] == "203.0.113.0/24, 192.0.2.128/25"
    assert fields(head)["Options"] == "no-sport-hash, affinity=/24"
    assert rows(ok(lab, "service", "list"))[1][-1] == "no-sport-hash,affinity=/24,sources=2"

    out = ok(lab, "service", "edit", "edge", "--source-range", "198.51.100.0/24")
    assert out.startswith("service 'edge' updated: source ranges 198.51.100.0/24 (revision ")
    assert api.get("/v1/services/edge").json()["source_ranges"] == ["198.51.100.0/24"]
    out = ok(lab, "service", "edit", "edge", "--any-source", "--affinity-prefix", "none")
    assert out.startswith("service 'edge' updated: affinity_prefix 24 -> null, source ranges any (revision ")
    edge = api.get("/v1/services/edge").json()
    assert edge["source_ranges"] == [] and edge["options"]["affinity_prefix"] is None
    assert fields(ok(lab, "service", "show", "edge").partition("\n\n")[0])["Source ranges"] == "any"

    # export / apply: the new fields go round unchanged.
    exported = ok(lab, "service", "edit", "edge", "--source-range", "203.0.113.0/24", "--affinity-prefix", "16")
    assert "source ranges 203.0.113.0/24" in exported
    rev = snapshot(api)
    doc = ok(lab, "export")
    assert "203.0.113.0/24" in doc and "affinity_prefix: 16" in doc
    ok(lab, "apply", "-f", "-", stdin=doc)
    assert snapshot(api) == rev


def test_service_refusals_are_plain_and_change_nothing(lab: DaemonLab, api: httpx.Client) -> None:
    api.put("/v1/services/web", json=web())
    before = snapshot(api)
    err = fails(lab, 1, "service", "add", "web", f"{VIP4}:81")
    assert err == ("Error: service 'web' exists already\n"
                   "Hint: change it with `l4lbctl service edit web`, or delete it first\n")
    err = fails(lab, 1, "service", "add", "other", f"{VIP4}:80/tcp")
    assert err.startswith(f"Error: {VIP4} port 80/tcp is already used by service 'web' (HTTP 409 ")
    err = fails(lab, 1, "service", "add", "mixed", f"[{VIP6}]:82", "-b", "192.0.2.1")
    assert f"backend 192.0.2.1 is IPv4 but VIP {VIP6} is IPv6 (an IPv4 VIP may have IPv6 backends" in err
    err = fails(lab, 1, "service", "add", "ranges", f"{VIP4}:82", "--source-range", "2001:db8::/32")
    assert f"source range 2001:db8::/32 is IPv6 but VIP {VIP4} is IPv4" in err
    err = fails(lab, 1, "service", "add", "aff", f"{VIP4}:82", "--affinity-prefix", "40", "--no-sport-hash")
    assert "affinity_prefix 40 is longer than an IPv4 address (32 bits)" in err
    err = fails(lab, 1, "service", "add", "aff", f"{VIP4}:82", "--affinity-prefix", "24")
    assert "it needs hash_src_port false" in err
    assert fails(lab, 1, "service", "show", "nope") == "Error: no service named 'nope' (HTTP 404 Not found)\n"
    assert fails(lab, 1, "service", "delete", "nope").startswith("Error: no service named 'nope'")
    assert f"is IPv4 but VIP {VIP6} is IPv6" in fails(lab, 1, "service", "edit", "web", f"[{VIP6}]:80")
    assert snapshot(api) == before


@pytest.mark.parametrize("args, message", [
    (("service", "add", "web", VIP4), "needs a port"),
    (("service", "add", "web", f"{VIP6}:80"), "put an IPv6 VIP in brackets"),
    (("service", "add", "web", f"{VIP4}:80/icmp"), "protocol 'icmp' must be tcp or udp"),
    (("service", "add", "web", f"{VIP4}:0"), "port '0' must be 1-65535"),
    (("service", "add", "web"), "give the service address"),
    (("service", "add", "web", f"{VIP4}:80", "--vip", VIP4), "not both"),
    (("service", "add", "bad name", f"{VIP4}:80"), "1-63 letters"),
    (("service", "add", "web", f"{VIP4}:80", "-b", "192.0.2.1@x"), "weight 'x' must be 0-65535"),
    (("service", "edit", "web"), "nothing to change"),
    (("service", "add", "web", f"{VIP4}:80", "--source-range", "192.0.2.1/24"), "has host bits set: the prefix is 192.0.2.0/24"),
    (("service", "add", "web", f"{VIP4}:80", "--source-range", "192.0.2.1"), "write 192.0.2.1/32"),
    (("service", "add", "web", f"{VIP4}:80", "--affinity-prefix", "129"), "is not a prefix length"),
    (("service", "edit", "web", "--source-range", "192.0.2.0/24", "--any-source"), "not both"),
    (("backend", "add", "web", "192.0.2.300"), "'192.0.2.300' is not a valid IPv4 or IPv6 address"),
    (("backend", "add", "web", "[192.0.2.3]:80"), "brackets are for IPv6"),
    (("backend", "add", "web", "[2001:db8::1"), "is not [IPv6]:PORT"),
    (("backend", "weight", "web", "192.0.2.1", "65536"), "65536 is not in the range"),
    (("backend", "add", "web", "192.0.2.3", "--state", "gone"), "'gone' is not one of"),
    (("stats", "--watch", "soon"), "'soon' is not a valid float"),
    (("-o", "xml", "status"), "'xml' is not one of 'table', 'json', 'yaml'"),
    (("apply",), "Missing option '-f'"),
    (("nosuchcommand",), "No such command 'nosuchcommand'"),
])
def test_bad_arguments_are_usage_errors_and_send_nothing(lab: DaemonLab, api: httpx.Client,
                                                         args: tuple[str, ...], message: str) -> None:
    api.put("/v1/services/web", json=web())
    before = snapshot(api)
    assert message in fails(lab, 2, *args)
    assert snapshot(api) == before


# --- backends ----------------------------------------------------------------------------------------------------------


def test_backend_commands(lab: DaemonLab, api: httpx.Client) -> None:
    api.put("/v1/services/web", json=web())
    api.put("/v1/services/alt", json=web6())

    def backend(service: str, ref: str) -> dict[str, Any]:
        r = api.get(f"/v1/services/{service}/backends/{ref}")
        assert r.status_code == 200, r.text
        return r.json()

    assert ok(lab, "backend", "add", "web", "192.0.2.3", "-w", "20").startswith(
        "backend 192.0.2.3:80 of 'web' added: weight 20, active (revision ")
    assert backend("web", "192.0.2.3") == {"address": "192.0.2.3", "port": None, "weight": 20, "state": "active",
                                           "health": None}
    added = json.loads(ok(lab, "backend", "add", "alt", "[2001:db8::12]:9443", "--state", "draining", "-o", "json"))
    assert added == {"address": "2001:db8::12", "port": 9443, "weight": 100, "state": "draining", "health": None}
    assert backend("alt", "[2001:db8::12]:9443")["state"] == "draining"

    ok(lab, "backend", "drain", "web", "192.0.2.1")
    assert backend("web", "192.0.2.1")["state"] == "draining"
    assert yaml.safe_load(ok(lab, "backend", "drain", "web", "192.0.2.1:80", "--maintenance", "-o", "yaml")) == {
        "address": "192.0.2.1", "port": None, "weight": 100, "state": "maintenance", "health": None}
    assert json.loads(ok(lab, "backend", "undrain", "web", "192.0.2.1", "-o", "json"))["state"] == "active"
    assert backend("web", "192.0.2.1")["state"] == "active"
    assert yaml.safe_load(ok(lab, "-o", "yaml", "backend", "weight", "web", "192.0.2.1", "80"))["weight"] == 80
    assert ok(lab, "backend", "weight", "web", "192.0.2.1", "100").startswith(
        "backend 192.0.2.1 of 'web' reweighted: weight 100, active (revision ")
    assert ok(lab, "backend", "weight", "alt", "2001:db8::11", "7").startswith(
        "backend 2001:db8::11 of 'alt' reweighted: weight 7, active (revision ")
    assert backend("alt", "2001:db8::11")["weight"] == 7
    assert ok(lab, "backend", "remove", "alt", "[2001:db8::10]:8443").startswith(
        "backend [2001:db8::10]:8443 removed from 'alt' (revision ")
    assert [b["address"] for b in api.get("/v1/services/alt").json()["backends"]] == ["2001:db8::11", "2001:db8::12"]
    removed = json.loads(ok(lab, "backend", "remove", "web", "192.0.2.3", "-o", "json"))
    assert removed == {"service": "web", "removed": "192.0.2.3", "revision": int(snapshot(api)[0])}

    # What is shown by `service show` is what the API holds.
    _, _, table = ok(lab, "service", "show", "alt").partition("\n\n")
    assert rows(table)[1:] == [["[2001:db8::11]:443", "7", "active"], ["[2001:db8::12]:9443", "100", "draining"]]

    before = snapshot(api)
    err = fails(lab, 1, "backend", "add", "web", "192.0.2.2")
    assert err.startswith("Error: service 'web' already has backend 192.0.2.2:80\n")
    assert fails(lab, 1, "backend", "drain", "web", "192.0.2.9") == \
        "Error: service 'web' has no backend 192.0.2.9 (HTTP 404 Not found)\n"
    assert "IPv4 but VIP 2001:db8:20::1 is IPv6" in fails(lab, 1, "backend", "add", "alt", "192.0.2.9")
    assert "set options.l4_dnat" in fails(lab, 1, "backend", "add", "web", "192.0.2.9:8080")
    assert "no service named 'nope'" in fails(lab, 1, "backend", "weight", "nope", "192.0.2.1", "3")
    assert snapshot(api) == before


@pytest.mark.parametrize("argv, meddle_path, meddle_body", [
    (("service", "edit", "web", "--port", "8080"), "/v1/services/web/backends/192.0.2.1", {"weight": 9}),
    (("backend", "add", "web", "192.0.2.3"), "/v1/services/web/backends/192.0.2.2", {"state": "draining"}),
])
def test_concurrent_change_between_read_and_write_is_refused(lab: DaemonLab, api: httpx.Client, tmp_path: Path,
                                                             argv: tuple[str, ...], meddle_path: str,
                                                             meddle_body: dict) -> None:
    """`service edit` and `backend add` write with the service's ETag: a change made by
    somebody else after the CLI's read is refused (exit 4), not overwritten."""
    api.put("/v1/services/web", json=web())

    def meddle() -> None:
        with lab.client() as other:
            assert other.patch(meddle_path, json=meddle_body).status_code == 200

    relay = Interposer(lab.socket, tmp_path / "relay.sock", "PUT", meddle)
    try:
        err = fails(None, 4, "--socket", str(tmp_path / "relay.sock"), *argv)
    finally:
        relay.close()
    assert relay.meddled
    assert "it changed since you read it" in err and "(HTTP 412 Precondition failed)" in err
    assert "Hint: " in err and "changed meanwhile" in err
    svc = api.get("/v1/services/web").json()  # only the meddler's change happened
    assert svc["port"] == 80 and [b["address"] for b in svc["backends"]] == ["192.0.2.1", "192.0.2.2"]
    ref = meddle_path.rsplit("/", 1)[1]
    assert {k: v for k, v in api.get(f"/v1/services/web/backends/{ref}").json().items() if k in meddle_body} == meddle_body


# --- apply / export ----------------------------------------------------------------------------------------------------


def _populate(lab: DaemonLab) -> None:
    ok(lab, "service", "add", "web", f"{VIP4}:80", "-b", "192.0.2.1", "-b", "192.0.2.2@50")
    ok(lab, "service", "add", "alt", f"[{VIP6}]:443/tcp", "--dnat", "--no-weights", "-b", "[2001:db8::10]:8443")
    ok(lab, "service", "add", "dns", f"{VIP4}:53/udp", "--no-sport-hash", "-b", "192.0.2.3")
    ok(lab, "backend", "drain", "web", "192.0.2.2")


def test_export_apply_roundtrip(lab: DaemonLab, api: httpx.Client, tmp_path: Path) -> None:
    _populate(lab)
    revision, state = snapshot(api)

    text = ok(lab, "export")
    assert text.startswith("# l4lb desired state from unix:")
    doc = yaml.safe_load(text)
    assert doc["revision"] == int(revision)
    assert {k: v for k, v in doc.items() if k != "revision"} == json.loads(json.dumps(state), object_hook=lambda d: {
        k: v for k, v in d.items() if not (k in ("port", "health") and v is None)})  # null is left out
    (tmp_path / "state.yaml").write_text(text)
    (tmp_path / "state.json").write_text(ok(lab, "export", "-o", "json"))
    assert json.loads((tmp_path / "state.json").read_text()) == doc

    # Applying the export unchanged is a no-op (no new revision), from YAML, JSON and stdin.
    assert ok(lab, "apply", "-f", str(tmp_path / "state.yaml")) == f"no changes (revision {revision})\n"
    assert ok(lab, "apply", "-f", str(tmp_path / "state.json")) == f"no changes (revision {revision})\n"
    result = json.loads(ok(lab, "apply", "-f", "-", "-o", "json", stdin=text))
    assert result["changed"] is False and result["plan"]["empty"] and result["revision"] == int(revision)
    assert snapshot(api) == (revision, state)

    # A revision-less export rebuilds the same state from nothing.
    template = ok(lab, "export", "--no-revision")
    assert "revision" not in yaml.safe_load(template)
    api.put("/v1/state", json={"services": []})
    out = ok(lab, "apply", "-f", "-", stdin=template)
    assert "+ service alt: tcp [2001:db8:20::1]:443 dnat no-weights" in out
    assert "    + backend 192.0.2.2:80  weight 50, state draining" in out
    assert "applied revision" in out and "3 services created, 4 backends added" in out
    assert snapshot(api)[1] == state
    assert yaml.safe_load(ok(lab, "export", "--no-revision")) == yaml.safe_load(template)


def test_apply_dry_run_prints_the_diff_and_changes_nothing(lab: DaemonLab, api: httpx.Client,
                                                          tmp_path: Path) -> None:
    _populate(lab)
    doc = yaml.safe_load(ok(lab, "export"))
    by_name = {s["name"]: s for s in doc["services"]}
    by_name["web"]["port"] = 8080
    by_name["dns"]["backends"][0]["weight"] = 5
    by_name["alt"]["backends"].append({"address": "2001:db8::11", "port": 9443})
    doc["services"] = [s for s in doc["services"] if s["name"] != "web"] + [{**by_name["web"], "name": "web2"}]
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(doc))
    before = snapshot(api)

    out = ok(lab, "apply", "-f", str(path), "--dry-run")
    assert out.splitlines() == [
        "~ service alt",
        "    + backend [2001:db8::11]:9443  weight 100, state active",
        "~ service dns",
        "    ~ backend 192.0.2.3:53: weight 100 -> 5",
        "- service web",
        "    - backend 192.0.2.1:80",
        "    - backend 192.0.2.2:80",
        f"+ service web2: tcp {VIP4}:8080",
        "    + backend 192.0.2.1:8080  weight 100, state active",
        "    + backend 192.0.2.2:8080  weight 50, state draining",
        "dry run: would have 1 service created, 2 services updated, 1 service deleted, 3 backends added, "
        f"1 backend changed, 2 backends removed; nothing applied (revision {before[0]})",
    ]
    plan = json.loads(ok(lab, "apply", "-f", str(path), "--dry-run", "-o", "json"))
    assert plan["dry_run"] is True and plan["changed"] is True
    assert plan["plan"]["summary"]["services_created"] == 1
    assert yaml.safe_load(ok(lab, "apply", "-f", str(path), "--dry-run", "-o", "yaml")) == plan
    assert snapshot(api) == before

    applied = ok(lab, "apply", "-f", str(path))
    assert applied.splitlines()[:-1] == out.splitlines()[:-1]
    assert applied.splitlines()[-1].startswith(f"applied revision {int(before[0]) + 1}: ")
    assert sorted(s["name"] for s in api.get("/v1/services").json()["services"]) == ["alt", "dns", "web2"]


def test_apply_stale_file_is_refused_until_forced(lab: DaemonLab, api: httpx.Client, tmp_path: Path) -> None:
    _populate(lab)
    exported = ok(lab, "export")
    old_revision = yaml.safe_load(exported)["revision"]
    path = tmp_path / "old.yaml"
    path.write_text(exported.replace("weight: 50", "weight: 60"))
    ok(lab, "backend", "weight", "web", "192.0.2.1", "3")  # the state moves on meanwhile
    before = snapshot(api)

    for extra in ((), ("--dry-run",)):
        err = fails(lab, 4, "apply", "-f", str(path), *extra)
        assert f'If-Match "r{old_revision}" does not match the current ETag "r{before[0]}"' in err
        assert (f"Hint: the desired state changed since this file was exported at revision {old_revision} "
                f"(it is at revision {before[0]} now): export again and redo your edits, or overwrite with --force"
                ) in err
    assert snapshot(api) == before

    out = ok(lab, "apply", "-f", str(path), "--force")
    assert "~ backend 192.0.2.1:80: weight 3 -> 100" in out and "~ backend 192.0.2.2:80: weight 50 -> 60" in out
    weights = {b["address"]: b["weight"] for b in api.get("/v1/services/web").json()["backends"]}
    assert weights == {"192.0.2.1": 100, "192.0.2.2": 60}

    # Without `revision:` the current state is the base: it applies...
    doc = yaml.safe_load(path.read_text())
    del doc["revision"]
    doc["services"] = [s for s in doc["services"] if s["name"] != "dns"]
    (tmp_path / "norev.yaml").write_text(yaml.safe_dump(doc))
    assert "- service dns" in ok(lab, "apply", "-f", str(tmp_path / "norev.yaml"))
    # ...but a change between that read and the write is still refused.
    api.put("/v1/services/dns", json={"vip": VIP4, "port": 53, "protocol": "udp"})
    def meddle() -> None:
        with lab.client() as other:
            assert other.delete("/v1/services/alt").status_code == 204

    relay = Interposer(lab.socket, tmp_path / "relay.sock", "PUT", meddle)
    try:
        err = fails(None, 4, "-s", str(tmp_path / "relay.sock"), "apply", "-f", str(tmp_path / "norev.yaml"))
    finally:
        relay.close()
    assert relay.meddled and "Hint: the desired state changed while applying" in err
    assert sorted(s["name"] for s in api.get("/v1/services").json()["services"]) == ["dns", "web"]


@pytest.mark.parametrize("name, content, code, message", [
    ("bad.yaml", "services: [\n  - {name: x\n", 2, "bad.yaml: invalid YAML at line 2, column 3: "),
    ("bad.json", '{"services": [}', 2, "bad.json: invalid JSON at line 1, column 15: Expecting value"),
    ("tabs.yaml", "services:\n\t- name: x\n", 2, "invalid YAML at line 2, column 1"),
    ("two.yaml", "services: []\n---\nservices: []\n", 2, "invalid YAML"),
    ("empty.yaml", "", 2, "empty.yaml is empty\nHint: a desired-state document has a `services:` list"),
    ("list.yaml", "- a\n", 2, "the document must be a mapping with a `services:` list, not a list"),
    ("noservices.yaml", "revision: 1\n", 2, "noservices.yaml has no `services:` key"),
    ("rev.yaml", "revision: abc\nservices: []\n", 2, "`revision:` must be a revision number"),
    ("date.yaml", "services: [{name: d, vip: 198.51.100.9, port: 80, when: 2024-01-01}]\n", 2,
     "a value cannot be sent as JSON"),
    ("latin1.yaml", b"services: []\n# caf\xe9\n", 2, "latin1.yaml: not UTF-8 text"),
    ("invalid.yaml", f"services:\n- name: a\n  vip: 198.51.100.300\n  port: 80\n- name: b\n  vip: {VIP4}\n"
     "  port: 99999\n  extra: 1\n", 1,
     "invalid.yaml: services.0.vip: '198.51.100.300' is not a valid IPv4 or IPv6 address; "
     "services.1.port: Input should be less than or equal to 65535; services.1.extra: unknown field"
     " (HTTP 422 Invalid request)"),
    ("dup.yaml", f"services:\n- {{name: a, vip: {VIP4}, port: 80}}\n- {{name: b, vip: {VIP4}, port: 80}}\n", 1,
     f"services 'a' and 'b' both use {VIP4} port 80/tcp"),
    # A key given twice: PyYAML and json would keep the last one without a word (l4lb/docparse.py).
    ("twice.yaml", f"services:\n- name: a\n  vip: {VIP4}\n  port: 80\n  port: 81\n", 2,
     "twice.yaml: invalid YAML at line 5, column 3: the key 'port' is given twice in one mapping"),
    ("twice.json", '{"services": [], "services": [{"name": "x"}]}', 2,
     "twice.json: refused: the key 'services' is given twice in one object"),
    ("nan.json", f'{{"services": [{{"name": "a", "vip": "{VIP4}", "port": 80, "backends": [{{"address": "192.0.2.1", '
     '"weight": NaN}]}]}', 2, "nan.json: refused: NaN is not a JSON number"),
])
def test_apply_bad_documents_change_nothing(lab: DaemonLab, api: httpx.Client, tmp_path: Path, name: str,
                                            content: str | bytes, code: int, message: str) -> None:
    api.put("/v1/services/web", json=web())
    before = snapshot(api)
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert message in fails(lab, code, "apply", "-f", str(path))
    assert snapshot(api) == before


def test_apply_unreadable_files(lab: DaemonLab, api: httpx.Client, tmp_path: Path) -> None:
    before = snapshot(api)
    assert fails(lab, 2, "apply", "-f", str(tmp_path / "missing.yaml")) == \
        f"Error: {tmp_path / 'missing.yaml'}: No such file or directory\n"
    assert "is a directory" in fails(lab, 2, "apply", "-f", str(tmp_path))
    assert snapshot(api) == before


# --- stats -------------------------------------------------------------------------------------------------------------


def test_stats_show_the_real_counters(lab: DaemonLab, api: httpx.Client) -> None:
    api.put("/v1/services/dns", json={"vip": VIP4, "port": 53, "protocol": "udp", "backends": [
        {"address": "192.0.2.1", "weight": 30}, {"address": "192.0.2.2", "weight": 70, "state": "draining"},
        {"address": "192.0.2.3"}]})
    api.put("/v1/services/alt", json=web6())
    base = json.loads(ok(lab, "stats", "-o", "json"))
    inject_udp(lab, VIP4, 53, 20)

    table = rows(ok(lab, "stats").split("\n\n")[0])  # then the notes on flows
    assert table[0] == ["PROT", "ADDRESS:PORT", "NAME", "WEIGHT", "STATE", "HEALTH", "ACTIVE", "INACTIVE", "PACKETS",
                        "BYTES"]
    svc = {r[1]: r for r in table[1:]}
    base_dns = next(s for s in base["services"] if s["name"] == "dns")
    udp = svc[f"{VIP4}:53"]
    assert udp[:3] == ["UDP", f"{VIP4}:53", "dns"] and int(udp[5]) - base_dns["packets"] == 20
    assert int(udp[6]) - base_dns["bytes"] == 20 * (14 + 20 + 8 + 20)
    backends = [r for r in table[1:] if r[0] == "->"]
    assert [r[1:4] for r in backends if r[1].startswith("192.0.2.")] == [
        ["192.0.2.1:53", "30", "active"], ["192.0.2.2:53", "70", "draining"], ["192.0.2.3:53", "100", "active"]]
    assert all(r[4] == "-" for r in backends)  # no health checks: no health
    got = sum(int(r[7]) for r in backends if r[1].startswith("192.0.2."))
    assert got - sum(b["packets"] for b in base_dns["backends"]) == 20
    assert svc[f"[{VIP6}]:443"][:3] == ["TCP", f"[{VIP6}]:443", "alt"]
    assert "[2001:db8::10]:8443" in svc and "[2001:db8::11]:443" in svc

    # Machine formats: the API's document; service names filter.
    doc = json.loads(ok(lab, "stats", "dns", "-o", "json"))
    assert [s["name"] for s in doc["services"]] == ["dns"] and doc["services"][0]["packets"] == int(udp[5])
    assert yaml.safe_load(ok(lab, "-o", "yaml", "stats", "alt"))["services"][0]["name"] == "alt"
    assert fails(lab, 1, "stats", "nope") == "Error: no service named 'nope'\n"

    # Rates (the daemon rates against a sample >= 1 s old) and per-reason counters.
    deadline = time.monotonic() + 10
    while (out := ok(lab, "stats", "--rate", "--reasons", "dns")) and "rates over the last" not in out:
        assert time.monotonic() < deadline, out
        time.sleep(0.3)
    services, reasons, footer, notes = out.strip().split("\n\n")
    assert notes.startswith("flows: ACTIVE = seen in the last 10 s")
    assert rows(services)[0][-2:] == ["PKT/S", "BYTES/S"]
    assert [len(r) for r in rows(services)[1:]] == [9, 11, 11, 11]  # name + 6 figures; weight, state, health + 6
    reason = {r[0]: r for r in rows(reasons)[1:]}
    assert rows(reasons)[0] == ["REASON", "PACKETS", "BYTES", "PKT/S", "BYTES/S"]
    assert set(reason) == set(doc["reasons"]) and sum(int(r[1]) for r in reason.values()) >= 20
    assert footer.startswith("rates over the last ")


def test_stats_watch_redraws_until_ctrl_c(lab: DaemonLab, api: httpx.Client) -> None:
    api.put("/v1/services/web", json=web())
    env = {k: v for k, v in os.environ.items() if not k.startswith("L4LBCTL_")} | {"L4LBCTL_SOCKET": str(lab.socket)}
    for fmt, marker in (("table", "Every 0.3 s: l4lbctl stats --rate"), ("json", '{"revision": ')):
        proc = subprocess.Popen([str(L4LBCTL), "stats", "--rate", "-o", fmt, "--watch", "0.3"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        while sum(marker in line for line in lines) < 3:
            line = proc.stdout.readline()
            assert line, f"l4lbctl ended early: {lines} {proc.stderr.read()}"
            lines.append(line)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
        # The documented exit code for an interrupted l4lbctl, and one plain line.
        assert proc.returncode == 130 and err.strip() == "Interrupted.", (proc.returncode, err)
        if fmt == "json":  # one document per line
            docs = [json.loads(line) for line in lines + rest.splitlines() if line.strip()]
            assert len(docs) >= 3 and all(d["services"][0]["name"] == "web" for d in docs)
        else:
            assert sum(f"TCP   {VIP4}:80" in line for line in lines) >= 2


# --- import from ipvsadm / keepalived ------------------------------------------------------------------------------------


def contains(small: Any, big: Any) -> bool:
    """Every key of `small` is in `big` with the same value (recursively; lists element by element)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and contains(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(contains, small, big))
    return small == big


def test_import_pipes_into_apply(lab: DaemonLab, api: httpx.Client) -> None:
    """`l4lbctl import ... | l4lbctl apply -f -`: the real CLI twice, a real daemon; what the daemon
    holds afterwards is what the importer printed, and the notes went to stderr with file and line."""
    data = Path(__file__).parent / "data" / "import"
    env = {k: v for k, v in os.environ.items() if not k.startswith("L4LBCTL_")} | {"L4LBCTL_SOCKET": str(lab.socket)}
    for kind, path, stdin in (("ipvsadm", data / "ipvsadm.rules", True),
                              ("keepalived", data / "keepalived" / "keepalived.conf", False)):
        src = f"< {path} {L4LBCTL} import ipvsadm -" if stdin else f"{L4LBCTL} import {kind} {path}"
        cp = subprocess.run(["bash", "-o", "pipefail", "-c", f"{src} | {L4LBCTL} apply -f -"], env=env,
                            capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stdout + cp.stderr
        assert "applied revision" in cp.stdout, cp.stdout
        notes = [line for line in cp.stderr.splitlines() if line.startswith("Note: ")]
        assert notes and all(line.split(":", 3)[2].isdigit() for line in notes), cp.stderr
        assert any(": approximated: " in line for line in notes) and any(": skipped: " in line for line in notes)
        imported = yaml.safe_load(run(None, "import", kind, str(path)).stdout)
        state = api.get("/v1/state").json()
        have = {s["name"]: s for s in state["services"]}
        assert set(have) == {s["name"] for s in imported["services"]}
        for want in imported["services"]:
            assert contains(want, have[want["name"]]), (want, have[want["name"]])
    assert any(s.get("options", {}).get("l4_dnat") for s in state["services"])
    # Bad syntax: exit 2 with file and line, nothing on stdout, nothing applied.
    before = api.get("/v1/state").json()
    bad = run(None, "import", "ipvsadm", "-", stdin="-A -t 198.51.100.1:80 -s rr --bogus\n")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "Error: <stdin>:1: not an ipvsadm rule: option --bogus not recognized\nHint: nothing was imported\n"
    assert api.get("/v1/state").json() == before


# --- reaching the daemon -------------------------------------------------------------------------------------------------


def test_unreachable_daemon_is_one_plain_line(lab: DaemonLab, tmp_path: Path) -> None:
    err = fails(None, 3, "--socket", str(tmp_path / "none.sock"), "status")
    assert err == (f"Error: no l4lbd socket at {tmp_path / 'none.sock'}: is l4lbd running?\n"
                   "Hint: give another socket with --socket or L4LBCTL_SOCKET\n")
    with socket.socket(socket.AF_UNIX) as stale:  # bound, never listening: a daemon that died
        stale.bind(str(tmp_path / "stale.sock"))
        err = fails(None, 3, "service", "list", env={"L4LBCTL_SOCKET": str(tmp_path / "stale.sock")})
    assert err == f"Error: nothing listens on {tmp_path / 'stale.sock'}: l4lbd is not running (stale socket)\n"
    (tmp_path / "file").write_text("x")
    assert "is not a unix socket" in fails(None, 3, "-s", str(tmp_path / "file"), "export")
    assert "connection refused by http://127.0.0.1:1" in fails(None, 3, "--url", "http://127.0.0.1:1", "stats")
    assert "must look like http://127.0.0.1:9180" in fails(None, 2, "--url", "unix:/x", "status")
    assert "give --socket, --url or --fleet, not several kinds" in fails(None, 2, "-s", "/x", "--url", "http://127.0.0.1:1", "status")
    assert "this command talks to one box, and 2 are given" in fails(None, 2, "-s", "/x", "-s", "/y", "status")


def test_socket_permission_denied(lab: DaemonLab) -> None:
    """The socket is 0600 root: anybody else is told so, plainly."""
    err = fails(lab, 3, "status", prefix=("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"))
    assert err == (f"Error: permission denied on {lab.socket}\n"
                   "Hint: run as root or as a member of the socket's group (api.socket_mode)\n")


def test_tcp_listener_with_bearer_token(lab: DaemonLab, api: httpx.Client, tmp_path: Path) -> None:
    api.put("/v1/services/web", json=web())
    in_ns = ("ip", "netns", "exec", lab.ns)
    url = f"http://127.0.0.1:{TCP_PORT}"
    token_file = lab.dir / "api.token"
    listed = json.loads(ok(None, "--url", url, "--token-file", str(token_file), "service", "list", "-o", "json",
                           prefix=in_ns))
    assert [s["name"] for s in listed["services"]] == ["web"]
    assert "web" in ok(None, "stats", prefix=in_ns, env={"L4LBCTL_URL": url, "L4LBCTL_TOKEN": TOKEN})
    out = ok(None, "backend", "drain", "web", "192.0.2.1", prefix=in_ns,
             env={"L4LBCTL_URL": url, "L4LBCTL_TOKEN_FILE": str(token_file)})
    assert "drained" in out and api.get("/v1/services/web/backends/192.0.2.1").json()["state"] == "draining"
    # --socket on the command line wins over L4LBCTL_URL in the environment.
    assert "Ready:" in ok(None, "-s", str(lab.socket), "status", env={"L4LBCTL_URL": url})

    err = fails(None, 1, "--url", url, "status", prefix=in_ns)
    assert err.startswith("Error: missing bearer token: send Authorization: Bearer") and "(HTTP 401 " in err
    assert "Hint: give the API token with --token-file" in err
    err = fails(None, 1, "--url", url, "status", prefix=in_ns, env={"L4LBCTL_TOKEN": "wrong-token-0123456789"})
    assert err.startswith("Error: wrong bearer token")
    assert fails(None, 2, "--url", url, "--token-file", str(tmp_path / "nope"), "status") == \
        f"Error: token file {tmp_path / 'nope'}: No such file or directory\n"


# --- shell completion ----------------------------------------------------------------------------------------------------


def test_shell_completion_of_commands_and_live_names(lab: DaemonLab, api: httpx.Client) -> None:
    api.put("/v1/services/web", json=web())
    api.put("/v1/services/alt", json=web6())

    def complete(words: str) -> list[str]:
        parts = words.split(" ")
        out = ok(None, env={"_L4LBCTL_COMPLETE": "bash_complete", "COMP_WORDS": words,
                            "COMP_CWORD": str(len(parts) - 1)})
        return [line.split(",", 1)[1] for line in out.splitlines() if line]

    assert "_l4lbctl_completion" in ok(None, env={"_L4LBCTL_COMPLETE": "bash_source"})
    assert "compdef" in ok(None, env={"_L4LBCTL_COMPLETE": "zsh_source"})
    assert complete("l4lbctl ser") == ["service"]
    assert complete("l4lbctl backend d") == ["drain"]
    sock = str(lab.socket)
    assert complete(f"l4lbctl -s {sock} service show ") == ["alt", "web"]
    assert complete(f"l4lbctl -s {sock} service show w") == ["web"]
    assert complete(f"l4lbctl -s {sock} backend drain alt ") == ["[2001:db8::10]:8443", "[2001:db8::11]:443"]
    assert complete(f"l4lbctl -s {sock} backend drain alt [2001:db8::11") == ["[2001:db8::11]:443"]
    assert complete("l4lbctl -s /nonexistent.sock service show ") == []  # silent without a daemon


# --- the daemon going away ------------------------------------------------------------------------------------------------


def test_daemon_stopped_then_back(lab: DaemonLab, api: httpx.Client) -> None:
    api.put("/v1/services/web", json=web())
    assert lab.stop(signal.SIGTERM) == 0
    try:
        for argv in (("status",), ("service", "list"), ("backend", "drain", "web", "192.0.2.1"), ("export",),
                     ("stats", "--watch", "1")):
            err = fails(lab, 3, *argv)
            assert err.startswith(f"Error: no l4lbd socket at {lab.socket}: is l4lbd running?"), err
    finally:
        lab.start()
    assert fields(ok(lab, "status"))["Services"] == "1"
