"""The recordings API on the real l4lbd (real datapath, XDP on a veth in a private netns),
over its unix socket: start / list / get / stop / download / delete, the error answers, and
what a SIGTERM and a restart do to recordings (closed cleanly, listed again afterwards).

Packets are injected into the veth peer, so the daemon's XDP program sees them; the service's
backend is unreachable on purpose (the packet is handed to the kernel): the inbound
observation point records it all the same."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from scapy.all import IP, TCP, UDP, Ether, Raw, raw
from test_daemon_harness import DaemonLab

from l4lb.lab import netns

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

VIP = "198.51.100.10"
CLIENT = "203.0.113.7"
WEB = {"vip": VIP, "port": 80, "backends": [{"address": "192.0.2.1"}]}
FILTER = f"{CLIENT} 0 {VIP} 80 tcp"


@pytest.fixture(scope="module")
def lab(bpffs: Path):
    the_lab = DaemonLab(bpffs, "rec")
    the_lab.worker = netns.NetnsWorker(the_lab.ns)
    with the_lab.running({"web": WEB}):
        yield the_lab


def inject(lab: DaemonLab, n: int, *, src: str = CLIENT, dport: int = 80, size: int = 200, udp: bool = False) -> None:
    frames = [raw(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02") / IP(src=src, dst=VIP)
                  / (UDP(sport=40000 + i, dport=dport) if udp else TCP(sport=40000 + i, dport=dport, flags="S"))
                  / Raw(b"r" * (size - 54))) for i in range(n)]

    def go() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind(("lbt0b", 0))
            for f in frames:
                s.send(f)

    lab.worker.call(go)


def wait_for(pred, timeout: float = 15, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def tshark_rows(data: bytes, tmp: Path, *fields: str) -> list[list[str]]:
    p = tmp / "dl.cap"
    p.write_bytes(data)
    cmd = ["tshark", "-r", str(p), "-T", "fields", "-E", "separator=|"]
    for f in fields:
        cmd += ["-e", f]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    return [line.split("|") for line in cp.stdout.splitlines()]


def test_start_list_stop_download_delete(lab, tmp_path: Path):
    with lab.client() as c:
        r = c.post("/v1/recordings", json={"filters": [FILTER], "capture_length": 64, "name": "web probe",
                                           "stop": {"packets": 1000}})
        assert r.status_code == 201, r.text
        rec = r.json()
        rid = rec["id"]
        assert (rec["state"], rec["name"], rec["packets"], rec["filters"]) == (
            "running", "web probe", 0, [f"{CLIENT}/32 0 {VIP}/32 80 TCP"])
        assert [f["index"] for f in rec["files"]] == [0]
        inject(lab, 5)
        inject(lab, 3, src="192.0.2.99")                   # not ours
        wait_for(lambda: c.get(f"/v1/recordings/{rid}").json()["packets"] == 5, what="5 packets")
        listed = c.get("/v1/recordings").json()["recordings"]
        assert [x["id"] for x in listed if x["state"] == "running"] == [rid]
        assert listed[-1]["bytes"] == 5 * 64
        # a running recording's file can be downloaded already
        assert c.get(f"/v1/recordings/{rid}/files/0").status_code == 200
        stopped = c.post(f"/v1/recordings/{rid}/stop").json()
        assert (stopped["state"], stopped["stop_reason"], stopped["packets"]) == ("stopped", "stopped", 5)
        assert stopped["stopped"] >= stopped["started"]
        inject(lab, 2)
        time.sleep(0.3)
        assert c.get(f"/v1/recordings/{rid}").json()["packets"] == 5, "nothing recorded after stop"
        dl = c.get(f"/v1/recordings/{rid}/files/0")
        assert dl.status_code == 200 and dl.headers["content-type"] == "application/x-pcapng"
        assert int(dl.headers["content-length"]) == len(dl.content) == stopped["files"][0]["size"]
        rows = tshark_rows(dl.content, tmp_path, "frame.cap_len", "frame.len", "ip.src",
                           "frame.packet_flags_direction")
        assert [r[:3] for r in rows] == [["64", "200", CLIENT]] * 5
        assert c.delete(f"/v1/recordings/{rid}").status_code == 204
        assert c.get(f"/v1/recordings/{rid}").status_code == 404
        assert not list((lab.dir / "rec").glob(f"{rid}*")), "files and metadata removed"


def test_pcap_format_and_two_recordings_at_once(lab, tmp_path: Path):
    with lab.client() as c:
        a = c.post("/v1/recordings", json={"filters": [{"src": CLIENT, "dport": 80, "proto": "tcp"}],
                                           "format": "pcap"}).json()
        b = c.post("/v1/recordings", json={"filters": ["any any any 80 any"], "capture_length": 100}).json()
        inject(lab, 4)
        inject(lab, 2, src="192.0.2.99")
        wait_for(lambda: c.get(f"/v1/recordings/{b['id']}").json()["packets"] == 6, what="b: 6")
        wait_for(lambda: c.get(f"/v1/recordings/{a['id']}").json()["packets"] == 4, what="a: 4")
        dl = c.get(f"/v1/recordings/{a['id']}/files/0")
        assert dl.headers["content-type"] == "application/vnd.tcpdump.pcap"
        assert struct.unpack("<I", dl.content[:4])[0] == 0xA1B23C4D
        assert tshark_rows(dl.content, tmp_path, "frame.cap_len", "frame.len") == [["200", "200"]] * 4
        for x in (a, b):
            assert c.delete(f"/v1/recordings/{x['id']}").status_code == 204


@pytest.mark.parametrize("body, loc", [
    ({"filters": ["203.0.113.7 0 198.51.100.10 80"]}, ["body", "filters", 0]),
    ({"filters": ["ok", "203.0.113.7 0 2001:db8::1 80 tcp"]}, ["body", "filters", 0]),
    ({"filters": ["203.0.113.7/24 0 any 0 any"]}, ["body", "filters", 0]),
    ({"filters": []}, ["body", "filters"]),
    ({"filters": [FILTER], "rotate": {"count": 3}}, ["body", "rotate"]),
    ({"filters": [FILTER], "format": "pcapx"}, ["body", "format"]),
    ({"filters": [FILTER], "direction": "sideways"}, ["body", "direction"]),
    ({"filters": [FILTER], "direction": 1}, ["body", "direction"]),
    ({"filters": [FILTER], "capture_length": -1}, ["body", "capture_length"]),
    ({"filters": [FILTER], "stop": {"packets": 0}}, ["body", "stop", "packets"]),
    ({"filters": [FILTER], "colour": "red"}, ["body", "colour"]),
])
def test_bad_requests_are_422_and_change_nothing(lab, body, loc):
    with lab.client() as c:
        before = c.get("/v1/recordings").json()
        r = c.post("/v1/recordings", json=body)
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert loc in [e["loc"] for e in r.json()["errors"]], r.json()
        assert c.get("/v1/recordings").json() == before


def test_too_many_masks_is_422_too_many_recordings_409_unknown_404(lab):
    with lab.client() as c:
        many = [f"{ipaddress.ip_network(f'203.0.113.7/{n}', strict=False)} 0 any 0 any"
                for n in range(33)]                                           # 33 IPv4 masks
        r = c.post("/v1/recordings", json={"filters": many})
        assert r.status_code == 422 and "masks" in r.json()["detail"]
        ids = []
        for i in range(64):
            r = c.post("/v1/recordings", json={"filters": [f"198.51.100.{i} 0 any 0 any"]})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        r = c.post("/v1/recordings", json={"filters": [FILTER]})
        assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json"
        for rid in ids:
            assert c.delete(f"/v1/recordings/{rid}").status_code == 204
        for method, url in (("get", "/v1/recordings/nope"), ("post", "/v1/recordings/nope/stop"),
                            ("delete", "/v1/recordings/nope"), ("get", "/v1/recordings/nope/files/0")):
            assert getattr(c, method)(url).status_code == 404, url
        rid = c.post("/v1/recordings", json={"filters": [FILTER]}).json()["id"]
        assert c.get(f"/v1/recordings/{rid}/files/7").status_code == 404
        assert c.get(f"/v1/recordings/{rid}/files/../../etc").status_code == 404
        c.delete(f"/v1/recordings/{rid}")


def test_term_closes_recordings_cleanly_and_a_restart_lists_them(lab, tmp_path: Path):
    with lab.client() as c:
        rid = c.post("/v1/recordings", json={"filters": [FILTER], "name": "across"}).json()["id"]
        inject(lab, 3)
        wait_for(lambda: c.get(f"/v1/recordings/{rid}").json()["packets"] == 3, what="3 packets")
    assert lab.stop(signal.SIGTERM) == 0
    files = sorted((lab.dir / "rec").glob(f"{rid}_*.pcapng"))
    assert len(files) == 1
    data = files[0].read_bytes()
    off, types = 0, []
    while off < len(data):
        btype, blen = struct.unpack_from("<II", data, off)
        types.append(btype)
        off += blen
    assert off == len(data) and types[-1] == 5, "complete blocks, statistics block last"
    # Metadata that is not what the recorder wrote: skipped at the restart, with a reason logged.
    rec_dir = lab.dir / "rec"
    good = json.loads((rec_dir / f"{rid}.json").read_text())
    (rec_dir / "junk.json").write_text("{not json")
    (rec_dir / "evil.json").write_text(json.dumps({**good, "id": "evil", "files": [{"index": 0, "name": "../../x"}]}))
    (rec_dir / "linked.json").symlink_to(rec_dir / f"{rid}.json")
    lab.start()
    with lab.client() as c:
        listing = c.get("/v1/recordings")
        assert listing.status_code == 200 and [x["id"] for x in listing.json()["recordings"]] == [rid]
        skipped = [line for line in lab.log_text().splitlines() if "recorder: skipping" in line]
        assert len(skipped) == 3 and any("junk.json: document: Invalid JSON" in x for x in skipped), skipped
        for name in ("junk.json", "evil.json", "linked.json"):
            (rec_dir / name).unlink()
        r = c.get(f"/v1/recordings/{rid}").json()
        assert (r["state"], r["stop_reason"], r["packets"], r["name"]) == ("stopped", "daemon_shutdown", 3, "across")
        dl = c.get(f"/v1/recordings/{rid}/files/0")
        assert dl.content == data
        assert len(tshark_rows(dl.content, tmp_path, "frame.number")) == 3
        # the restarted daemon records again
        rid2 = c.post("/v1/recordings", json={"filters": [FILTER]}).json()["id"]
        inject(lab, 2)
        wait_for(lambda: c.get(f"/v1/recordings/{rid2}").json()["packets"] == 2, what="2 packets")
        for x in (rid, rid2):
            assert c.delete(f"/v1/recordings/{x}").status_code == 204


@pytest.mark.parametrize("replace", ["symlink", "fifo"])
def test_a_capture_file_replaced_on_disk_is_listed_as_a_problem_and_not_served(lab, replace: str):
    with lab.client() as c:
        rid = c.post("/v1/recordings", json={"filters": [FILTER], "stop": {"packets": 1}}).json()["id"]
        inject(lab, 1)
        wait_for(lambda: c.get(f"/v1/recordings/{rid}").json()["state"] == "stopped", what="the recording to stop")
        path = lab.dir / "rec" / f"{rid}_000000.pcapng"
        path.unlink()
        if replace == "symlink":
            path.symlink_to("/etc/hostname")
        else:
            os.mkfifo(path)             # opened naively, a FIFO would hang the download
        listing = c.get("/v1/recordings")
        assert listing.status_code == 200
        rec = next(x for x in listing.json()["recordings"] if x["id"] == rid)
        assert rec["problems"] == ["file 0 is not a regular file (a symlink?)"]
        assert rec["files"][0]["size"] is None and "path" not in rec["files"][0]
        r = c.get(f"/v1/recordings/{rid}/files/0")
        assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json", r.text
        assert str(lab.dir) not in r.text and "/etc" not in r.text
        assert c.delete(f"/v1/recordings/{rid}").status_code == 204
        assert not path.exists() and not path.is_symlink() and Path("/etc/hostname").exists()
