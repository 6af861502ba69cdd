"""The recorder and its disk (issue 11): caps, the free-space reserve, a real ENOSPC, tampered
metadata. Recordings are driven here as the drain drives them (``write_many`` batches and
``tick``); test_rec_disk_daemon.py does the same through a real daemon whose recorder
directory is a small tmpfs.

Every file is read back with tshark: it must open without complaint (no packet cut short),
and hold exactly the packets and bytes the recording reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from scapy.all import IP, TCP, Ether, Raw, raw

from l4lb.recfilter import expand_filter
from l4lb.recorder.budget import MIN_START, DiskBudget, DiskLimits
from l4lb.recorder.limits import RotationPolicy, StopConditions
from l4lb.recorder.meta import BadMeta
from l4lb.recorder.pcapfile import RecordKind, Sample
from l4lb.recorder.recording import Recording, RecordingSpec, file_problem

T0 = 1_700_000_000 * 10**9
FRAME = raw(Ether() / IP(src="203.0.113.7", dst="198.51.100.10") / TCP(sport=40000, dport=80) / Raw(b"r" * 146))
BIG = 1 << 40


def spec(**kw) -> RecordingSpec:
    return RecordingSpec(filters=expand_filter("any 0 any 80 tcp"), **kw)


KIND = RecordKind("recording=t in service=web", 1, None)


def batch(start: int, n: int = 50) -> list[Sample]:
    """Samples as the drain batches them: monotonic time i, wall clock T0 + i (write_many(..., T0))."""
    return [(FRAME, i, len(FRAME), KIND) for i in range(start, start + n)]


def fake_statvfs(free: dict[str, int]):
    return lambda _path: SimpleNamespace(f_bavail=free["bytes"], f_frsize=1)


def tshark_check(path: Path) -> tuple[int, int]:
    """(packets, captured bytes) as tshark reads the file; fails on any warning."""
    cp = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.cap_len"],
                        capture_output=True, text=True, timeout=60)
    warnings = [line for line in cp.stderr.splitlines() if line.strip() and "Running as user" not in line]
    assert cp.returncode == 0 and not warnings, cp.stderr
    lens = [int(x) for x in cp.stdout.split()]
    return len(lens), sum(lens)


def run_until_stopped(recs: list[Recording], batches: int = 2000) -> None:
    for k in range(batches):
        running = [r for r in recs if r.state == "running"]
        if not running:
            return
        for r in running:
            r.write_many(batch(k * 50), T0)
            r.tick(k)
    raise AssertionError("still running")


def assert_files_match(rec: Recording) -> int:
    """The files hold exactly what the recording reports; returns their total size."""
    d = rec.to_dict()
    assert d["problems"] == []
    packets = captured = size = 0
    for f in d["files"]:
        path = rec.directory / f["name"]
        assert f["size"] == path.stat().st_size, (f, path.stat().st_size)
        n, b = tshark_check(path)
        packets, captured, size = packets + n, captured + b, size + f["size"]
    assert (d["packets"], d["bytes"]) == (packets, captured)
    return size


# --- caps and the reserve -----------------------------------------------------------------------------------


def test_a_recording_stops_at_its_own_cap(tmp_path: Path) -> None:
    budget = DiskBudget(tmp_path, DiskLimits(max_total_bytes=BIG, max_recording_bytes=20_000, min_free_bytes=0),
                        statvfs=fake_statvfs({"bytes": BIG}))
    rec = Recording("own", spec(), tmp_path, 0, budget=budget)
    rec.open(0)
    run_until_stopped([rec])
    assert rec.stop_reason == "max_recording_bytes"
    size = assert_files_match(rec)
    assert 20_000 - 300 < size <= 20_000          # full up to one record, never past the cap
    assert budget.used == size


def test_recordings_share_the_global_cap_and_stopped_ones_still_count(tmp_path: Path) -> None:
    budget = DiskBudget(tmp_path, DiskLimits(max_total_bytes=30_000, max_recording_bytes=BIG, min_free_bytes=0),
                        statvfs=fake_statvfs({"bytes": BIG}))
    old = Recording("old", spec(), tmp_path, 0, budget=budget)
    old.open(0)
    old.write_many(batch(0, 20), T0)
    old.stop()
    recs = [Recording(f"r{i}", spec(), tmp_path, 1 + i, budget=budget) for i in range(2)]
    for r in recs:
        r.open(0)
    run_until_stopped(recs)
    assert [r.stop_reason for r in recs] == ["max_total_bytes"] * 2
    total = sum(assert_files_match(r) for r in [old, *recs])
    assert 30_000 - 600 < total <= 30_000
    budget.rescan()
    assert budget.used == total
    assert "max_total_bytes" in (budget.refuse_start() or "")      # no room for a third: delete old ones


def test_the_free_space_reserve_is_never_written_into(tmp_path: Path) -> None:
    """The free space read at one tick less what was written since: a burst between two
    ticks cannot eat the reserve either."""
    free = {"bytes": 100_000}
    budget = DiskBudget(tmp_path, DiskLimits(max_total_bytes=BIG, max_recording_bytes=BIG, min_free_bytes=60_000),
                        statvfs=fake_statvfs(free))
    rec = Recording("reserve", spec(), tmp_path, 0, budget=budget)
    rec.open(0)
    for k in range(500):            # no refresh: the statvfs figure stays, the writes count against it
        rec.write_many(batch(k * 50), T0)
        if rec.state != "running":
            break
    assert rec.stop_reason == "disk_full"
    size = assert_files_match(rec)
    assert 40_000 - 600 < size <= 40_000
    assert "min_free_bytes" in (budget.refuse_start() or "")
    free["bytes"] = 60_000 + MIN_START
    assert budget.refuse_start() is None


def test_requests_that_can_never_fit_are_refused(tmp_path: Path) -> None:
    budget = DiskBudget(tmp_path, DiskLimits(max_recording_bytes=1 << 20))
    assert "stop.bytes" in budget.refuse_spec(2 << 20, None)
    assert "rotate.size x rotate.count" in budget.refuse_spec(None, 5 << 20)
    assert budget.refuse_spec(1 << 20, 1 << 20) is None


def test_a_ring_runs_within_its_cap(tmp_path: Path) -> None:
    """A ring's footprint is its files as they are: overwritten ones no longer count."""
    budget = DiskBudget(tmp_path, DiskLimits(max_total_bytes=BIG, max_recording_bytes=12_000, min_free_bytes=0),
                        statvfs=fake_statvfs({"bytes": BIG}))
    rec = Recording("ring", spec(rotation=RotationPolicy(file_size=2_000, max_files=3)), tmp_path, 0, budget=budget)
    rec.open(0)
    for k in range(40):
        rec.write_many(batch(k * 50), T0)
        rec.tick(k)
    assert rec.state == "running" and len(rec.files) == 3
    rec.stop()
    sizes = [f["size"] for f in rec.to_dict()["files"]]
    assert sum(sizes) <= 12_000 and budget.used == sum(sizes)
    for f in rec.to_dict()["files"]:
        tshark_check(tmp_path / f["name"])


# --- a real full disk -------------------------------------------------------------------------------------------

ENOSPC_SCRIPT = """
import json, shutil, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_rec_disk import FRAME, T0, batch, spec
from l4lb.recorder.recording import Recording

tiny, out = Path(sys.argv[1]), Path(sys.argv[2])
rec = Recording("enospc", spec(), tiny, 0)          # no budget: nothing stops it before the kernel does
rec.open(0)
k = 0
while rec.state == "running" and k < 10_000:
    rec.write_many(batch(k * 50), T0)
    rec.tick(k)                                      # the drain's tick: flush what was staged
    k += 1
rec.stop()                                           # stopping a recording on a full disk must not raise
d = rec.to_dict()
shutil.copy(tiny / d["files"][0]["name"], out)
print(json.dumps({"rec": d, "df": shutil.disk_usage(tiny).free}))
"""


def test_enospc_stops_with_disk_full_and_the_file_ends_on_a_whole_packet(tmp_path: Path) -> None:
    """A 512 KiB tmpfs mounted in a private mount namespace (a child process: nothing is
    mounted where the rest of the machine can see it)."""
    tiny, out = tmp_path / "tiny", tmp_path / "copy.pcapng"
    tiny.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(ENOSPC_SCRIPT)
    cp = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size=512k tmpfs "$1" && shift && exec "$@"', "sh", str(tiny),
         sys.executable, str(script), str(tiny), str(out), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    result = json.loads(cp.stdout.splitlines()[-1])
    rec = result["rec"]
    assert (rec["state"], rec["stop_reason"]) == ("stopped", "disk_full")
    assert rec["files"][0]["size"] == out.stat().st_size > 400_000      # it filled the disk, then cut back
    assert tshark_check(out) == (rec["packets"], rec["bytes"]) and rec["packets"] > 1000
    assert "disk_full" in cp.stderr and "packets not written" in cp.stderr     # logged, with what was lost
    assert not any(tiny.iterdir()), "the tmpfs was private to the child"


# --- tampered files ------------------------------------------------------------------------------------------------


def saved(tmp_path: Path) -> Recording:
    rec = Recording("good", spec(name="probe", stop=StopConditions(max_packets=10)), tmp_path, 0)
    rec.open(0)
    rec.write_many(batch(0, 10), T0)
    return rec


@pytest.mark.parametrize("change, reason", [
    (lambda d: "{not json", "Invalid JSON"),
    (lambda d: json.dumps({**d, "packets": "10"}), "packets: Input should be a valid integer"),
    (lambda d: json.dumps({**d, "files": [{"index": 0, "name": "../../etc/passwd"}]}), "not named as"),
    (lambda d: json.dumps({**d, "files": [{"index": 0, "name": "good_000001.pcapng"}]}), "not named as"),
    (lambda d: json.dumps({**d, "id": "other"}), "names recording 'other'"),
    (lambda d: json.dumps({**d, "stop_reason": "/var/lib/l4lbd/secret"}), "stop_reason"),
    (lambda d: json.dumps({**d, "filters": [{"src": 7}]}), "recording spec is invalid"),
    (lambda d: json.dumps({**d, "stop": {"duration": "soon"}}), "recording spec is invalid"),
    (lambda d: json.dumps({**d, "capture_length": -1}), "capture_length"),
])
def test_tampered_metadata_is_refused_with_a_reason(tmp_path: Path, change, reason: str) -> None:
    rec = saved(tmp_path)
    meta = rec.meta_path()
    assert Recording.load_meta(meta).to_dict()["packets"] == 10      # untouched, it loads
    meta.write_text(change(json.loads(meta.read_text())))
    with pytest.raises(BadMeta, match=reason) as e:
        Recording.load_meta(meta)
    assert str(tmp_path) not in str(e.value)


def test_metadata_and_pcap_symlinks_are_not_followed(tmp_path: Path) -> None:
    rec = saved(tmp_path)
    meta = rec.meta_path()
    real = tmp_path / "elsewhere.json"
    os.replace(meta, real)
    meta.symlink_to(real)
    with pytest.raises(BadMeta, match="cannot open it"):
        Recording.load_meta(meta)
    os.replace(real, meta)
    pcap = tmp_path / rec.files[0].name
    pcap.unlink()
    pcap.symlink_to("/etc/hostname")
    loaded = Recording.load_meta(meta).to_dict()
    assert loaded["problems"] == ["file 0 is not a regular file (a symlink?)"]
    assert "path" not in loaded["files"][0] and loaded["files"][0]["size"] is None
    pcap.unlink()
    pcap.symlink_to(meta.name)                  # inside the directory, still not a regular file
    assert file_problem(tmp_path, pcap.name) == "is not a regular file (a symlink?)"


def test_many_filters_fit_the_section_comment_and_the_file_reads(tmp_path: Path) -> None:
    """A recording may have 16k filters; a pcapng option holds 64 KiB: the comment names
    as many as fit and says how many more."""
    filters = tuple(f for i in range(4000) for f in expand_filter(f"203.0.{i // 250}.{i % 250} 0 any {1 + i} tcp"))
    rec = Recording("many", RecordingSpec(filters=filters), tmp_path, 0)
    rec.open(0)
    rec.write_many(batch(0, 3), T0)
    rec.stop()
    comment = rec.section_comment()
    assert len(comment.encode()) <= 65535 and comment.endswith("more (l4lbctl record show many)")
    shown = comment.split("; filters: ")[1].split("; ... and ")[0].split("; ")
    assert shown == [str(f) for f in filters[:len(shown)]] and len(shown) > 500
    out = subprocess.run(["capinfos", "-c", str(tmp_path / rec.files[0].name)], capture_output=True, text=True)
    assert out.returncode == 0 and "Number of packets:   3" in out.stdout, out.stderr
