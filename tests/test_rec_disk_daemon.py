"""A recording that fills its disk, through a real l4lbd (issue 11): the recorder directory
is a 1 MiB tmpfs mounted in the daemon's own private mount namespace (nothing is mounted
where the rest of the machine sees it), the state store is on the ordinary disk. Packets
go into the daemon's XDP program through its veth, as in test_rec_api.py.

With ``recorder.min_free_bytes = 0`` nothing stops the recording before the kernel's
ENOSPC does: it must stop with reason ``disk_full``, its file must end on a whole packet
(tshark reads it without complaint) and hold exactly the packets and bytes reported, the
stop call must answer 2xx, a new recording must be refused 507 while there is no room, and
state writes must go on working.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_daemon_harness import DaemonLab
from test_rec_api import FILTER, WEB, inject, wait_for
from test_rec_disk import tshark_check

from l4lb.lab import netns

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

TMPFS = "1m"


@pytest.fixture(scope="module")
def lab(bpffs: Path):
    the_lab = DaemonLab(bpffs, "recdisk")
    the_lab.worker = netns.NetnsWorker(the_lab.ns)
    rec = Path(the_lab.config["recorder_dir"])
    rec.mkdir()
    the_lab.config["recorder"] = {"min_free_bytes": 0}
    the_lab.prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                      f'mount -t tmpfs -o size={TMPFS},mode=0700 tmpfs "$1" && shift && exec "$@"', "sh", str(rec)]
    with the_lab.running({"web": WEB}):
        yield the_lab


def test_a_full_disk_stops_the_recording_cleanly(lab: DaemonLab, tmp_path: Path) -> None:
    daemon_view = Path(f"/proc/{lab.proc.pid}/root") / Path(lab.config["recorder_dir"]).relative_to("/")
    with lab.client() as c:
        r = c.post("/v1/recordings", json={"filters": [FILTER], "name": "fill"})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        for _ in range(20):                                  # 1,400-byte packets: ~750 fill 1 MiB
            inject(lab, 100, size=1400)
            if c.get(f"/v1/recordings/{rid}").json()["state"] != "running":
                break
        wait_for(lambda: c.get(f"/v1/recordings/{rid}").json()["state"] == "stopped", what="the recording to stop")
        got = c.get(f"/v1/recordings/{rid}").json()
        assert got["stop_reason"] == "disk_full", got
        stop = c.post(f"/v1/recordings/{rid}/stop")
        assert stop.status_code == 200 and stop.json()["stop_reason"] == "disk_full", stop.text

        # The file as the daemon sees it, the file as downloaded, and the report agree.
        on_disk = daemon_view / got["files"][0]["name"]
        dl = c.get(f"/v1/recordings/{rid}/files/0")
        assert dl.status_code == 200
        assert len(dl.content) == on_disk.stat().st_size == got["files"][0]["size"] > 500_000
        copy = tmp_path / "fill.pcapng"
        copy.write_bytes(dl.content)
        assert tshark_check(copy) == (got["packets"], got["bytes"])

        # Cutting the file back freed what the failed write had taken; fill that too (as
        # something else on the file system would): no room for another recording, said so
        # (507). The store, on its own disk, takes writes all the same.
        filler = daemon_view / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        r = c.post("/v1/recordings", json={"filters": [FILTER]})
        assert r.status_code == 507 and r.headers["content-type"] == "application/problem+json", r.text
        assert "min_free_bytes" in r.json()["detail"] and str(lab.dir) not in r.text
        assert c.put("/v1/services/web2", json={**WEB, "port": 81}).status_code == 201

        # Room again: recording works again.
        filler.unlink()
        assert c.delete(f"/v1/recordings/{rid}").status_code == 204
        r = c.post("/v1/recordings", json={"filters": [FILTER]})
        assert r.status_code == 201, r.text
        assert c.delete(f"/v1/recordings/{r.json()['id']}").status_code == 204
    log = lab.log_text()
    lines = [line for line in log.splitlines() if "writing its file" in line]
    assert len(lines) == 1 and "disk_full" in lines[0], log[-3000:]   # one line for the full disk, not one per write
