"""The BGP room's pure parts: planner, BIRD config rendering (checked by the real
``bird -p`` parser), session/route parsing, [bgp] config validation, box state
store, and the fleet comparison of digests. No kernel, no daemon."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from l4lb.bgp import plan as planner
from l4lb.bgp.bird import Session, SpeakerError, parse_protocols, parse_routes, render
from l4lb.bgp.box import BOX, BoxState, BoxStore, Drain
from l4lb.bgp.config import BgpSection
from l4lb.bgp.reconciler import Reconciler
from l4lb.cli.fleet import compare, coverage
from l4lb.config import ConfigError, parse
from l4lb.models import DesiredState, Service
from l4lb.view import View

BGP = BgpSection.model_validate({"local_as": 65010, "router_id": "192.0.2.1", "communities": ["65010:1"],
                                 "peers": [{"address": "192.0.2.254", "remote_as": 65000, "bfd": True}],
                                 "services": {"web": {"communities": ["65010:80", "65010:7:9"], "med": 20}},
                                 "drain_delay": 10})


def svc(name: str, vip: str, port: int = 80, backends: int = 2, announce: bool = True, state: str = "active") -> Service:
    base = "192.0.2." if ":" not in vip else "2001:db8::"
    return Service(name=name, vip=vip, port=port, announce=announce,
                   backends=[{"address": f"{base}{100 + i}", "state": state} for i in range(backends)])


def view(*services: Service, converged: bool = True, attached: bool = True) -> View:
    return View(1, DesiredState(services=list(services)), tuple(services), {"eth0": "native"} if attached else {},
                converged)


def by_prefix(prefixes) -> dict[str, planner.Prefix]:
    return {p.prefix: p for p in prefixes}


def test_not_converged_means_do_not_know() -> None:
    assert planner.plan(view(svc("web", "198.51.100.10"), converged=False), BoxState(), BGP, 0) is None


def test_serving_prefixes_with_union_of_communities_and_lowest_med() -> None:
    got = by_prefix(planner.plan(view(svc("web", "198.51.100.10"), svc("dns", "198.51.100.10", 53),
                                      svc("v6", "2001:db8::10")), BoxState(), BGP, 0))
    p = got["198.51.100.10/32"]
    assert (p.announce, p.reason, p.services) == (True, planner.SERVING, ("dns", "web"))
    assert p.communities == ("65010:1", "65010:7:9", "65010:80") and p.med == 20 and p.prepend == 0
    assert got["2001:db8::10/128"].announce and got["2001:db8::10/128"].communities == ("65010:1",)


def test_withdraw_reasons() -> None:
    got = by_prefix(planner.plan(view(svc("web", "198.51.100.10"), svc("dns", "198.51.100.10", 53, backends=0),
                                      svc("off", "198.51.100.11", announce=False),
                                      svc("drained", "198.51.100.12", state="draining")), BoxState(), BGP, 0))
    assert got["198.51.100.10/32"].reason == "no usable backend: dns" and not got["198.51.100.10/32"].announce
    assert got["198.51.100.11/32"].reason == planner.ANNOUNCE_OFF
    assert got["198.51.100.12/32"].reason == "no usable backend: drained"
    # Only services that announce count: an announce=false service without backends does not hold the VIP back.
    ok = planner.plan(view(svc("web", "198.51.100.10"), svc("x", "198.51.100.10", 53, backends=0, announce=False)),
                      BoxState(), BGP, 0)
    assert ok[0].announce
    detached = planner.plan(view(svc("web", "198.51.100.10"), attached=False), BoxState(), BGP, 0)
    assert detached[0].reason == planner.NOT_ATTACHED


def test_all_backends_down_fail_open_announces_and_says_so_fail_closed_withdraws() -> None:
    """Health sets the effective weights: fail_closed leaves no usable backend (withdrawn
    from this box, as a tier wants when only this box sees them down); fail_open keeps
    them all, so the VIP stays announced and its reason names the services failing open."""
    closed = svc("web", "198.51.100.10", state="draining")   # every weight 0: what fail_closed leaves
    opened = svc("dns", "198.51.100.11", 53)
    v = View(1, DesiredState(services=[closed, opened]), (closed, opened), {"eth0": "native"}, True,
             fail_open=frozenset({"dns"}))
    got = by_prefix(planner.plan(v, BoxState(), BGP, 0))
    assert (got["198.51.100.10/32"].announce, got["198.51.100.10/32"].reason) == (False, "no usable backend: web")
    assert (got["198.51.100.11/32"].announce, got["198.51.100.11/32"].reason) == (True, "serving (failing open: dns)")


def test_drain_is_graceful_then_withdrawn() -> None:
    box = BoxState().with_drain(BOX, Drain(since=100.0, delay=10.0))
    v = view(svc("web", "198.51.100.10"), svc("api", "198.51.100.11"))
    p = planner.plan(v, box, BGP, 105.0)[0]
    assert (p.announce, p.reason, p.med, p.prepend, p.withdraw_at) == (True, planner.DRAINING, 4294967295, 3, 110.0)
    assert "65535:0" in p.communities
    assert planner.next_deadline(planner.plan(v, box, BGP, 105.0), 105.0) == 5.0
    assert all(not p.announce and p.reason == planner.DRAINED for p in planner.plan(v, box, BGP, 110.0))
    # A service drain touches its VIP only; draining again never postpones the withdraw.
    one = BoxState().with_drain("api", Drain(100.0, 10.0)).with_drain("api", Drain(200.0, 10.0))
    got = by_prefix(planner.plan(v, one, BGP, 120.0))
    assert got["198.51.100.10/32"].reason == planner.SERVING and got["198.51.100.11/32"].reason == planner.DRAINED
    # ...but a shorter delay hastens it ("withdraw now" during a long graceful phase).
    long = BoxState().with_drain(BOX, Drain(100.0, 3600.0))
    assert by_prefix(planner.plan(v, long, BGP, 120.0))["198.51.100.10/32"].reason == planner.DRAINING
    now = long.with_drain(BOX, Drain(120.0, 0.0))
    assert now.drains[BOX] == Drain(120.0, 0.0)
    assert all(p.reason == planner.DRAINED for p in planner.plan(v, now, BGP, 120.0))


def test_box_store_round_trip_and_bad_file(tmp_path: Path) -> None:
    store = BoxStore(tmp_path / "box.json")
    assert store.load() == BoxState()
    state = BoxState().with_drain(BOX, Drain(1.5, 30.0)).with_drain("web", Drain(2.0, 0.0))
    store.save(state)
    assert store.load() == state and [p.name for p in tmp_path.iterdir()] == ["box.json"]
    (tmp_path / "box.json").write_text("{\"drains\": 3}")
    with pytest.raises(ValueError, match="unreadable box state"):
        store.load()


def test_render_is_accepted_by_bird_and_carries_the_attributes(tmp_path: Path) -> None:
    box = BoxState().with_drain("api", Drain(0.0, 1e9))
    v = view(svc("web", "198.51.100.10"), svc("api", "198.51.100.11"), svc("v6", "2001:db8::10"),
             svc("down", "198.51.100.12", backends=0))
    cfg = BGP.model_copy(update={"next_hop_v6": "2001:db8::1"})
    text = render(cfg, planner.plan(v, box, cfg, 1.0))
    assert "route 198.51.100.12/32" not in text and "route 198.51.100.10/32 blackhole;" in text
    assert "if net = 198.51.100.11/32 then { bgp_community.add((65010, 1)); bgp_community.add((65535, 0)); " \
           "bgp_med = 4294967295; bgp_path.prepend(65010); bgp_path.prepend(65010); bgp_path.prepend(65010); }" in text
    assert "bgp_large_community.add((65010, 7, 9));" in text and "route 2001:db8::10/128 blackhole;" in text
    assert "ipv6 { table l4lb_v6; import none; export filter l4lb_export_v6; next hop address 2001:db8::1; };" in text
    assert "error wait" not in text  # BIRD's default (60, 300) unless configured
    cfg = cfg.model_copy(update={"error_wait": (1, 5)})
    text = render(cfg, planner.plan(v, box, cfg, 1.0))
    assert text.count("  error wait time 1, 5;") == len(cfg.peers)
    main, inc = tmp_path / "bird.conf", tmp_path / "l4lbd.d"
    inc.mkdir()
    (inc / "l4lbd.conf").write_text(text)
    main.write_text(f'protocol device {{}}\ninclude "{inc}/*.conf";\n')
    cp = subprocess.run(["bird", "-p", "-c", str(main)], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr + text
    # Mutation check of the check itself: BIRD refuses a broken file.
    (inc / "l4lbd.conf").write_text(text.replace("blackhole;", "blackhole", 1))
    assert subprocess.run(["bird", "-p", "-c", str(main)], capture_output=True, timeout=30).returncode != 0
    # Nothing to announce still renders a valid file (sessions stay up, nothing exported).
    (inc / "l4lbd.conf").write_text(render(cfg, ()))
    assert subprocess.run(["bird", "-p", "-c", str(main)], capture_output=True, timeout=30).returncode == 0


def test_parse_birdc_output() -> None:
    text = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     18:05:43.470
l4lb_vips_v4 Static     l4lb_v4    up     18:05:43.470
l4lb_peer_192_0_2_254 BGP        ---        start  18:05:34.012  Active        Socket: Connection refused
"""
    (s,) = parse_protocols(text, BGP)
    assert (s.peer, s.state, s.bgp_state, s.info, s.established) == \
        ("192.0.2.254", "start", "Active", "Socket: Connection refused", False)
    assert parse_protocols("BIRD 2.0.12 ready.\n", BGP)[0].state == "unknown"
    routes = "BIRD 2.0.12 ready.\nTable l4lb_v4:\n198.51.100.11/32     blackhole [l4lb_vips_v4 18:05:09.562] * (200)\n"
    assert parse_routes(routes) == {"198.51.100.11/32"}


def _cfg(bgp: str) -> str:
    return f'[datapath]\ninterfaces = ["eth0"]\n[bgp]\n{bgp}\n'


@pytest.mark.parametrize("bgp, problem", [
    ('local_as = 65010\nrouter_id = "192.0.2.1"', "bgp.peers: required key is missing"),
    ('local_as = 0\nrouter_id = "192.0.2.1"\n[[bgp.peers]]\naddress = "192.0.2.254"\nremote_as = 1',
     "bgp.local_as: Input should be greater than or equal to 1"),
    ('local_as = 1\nrouter_id = "2001:db8::1"\n[[bgp.peers]]\naddress = "192.0.2.254"\nremote_as = 1', "bgp.router_id"),
    ('local_as = 1\nrouter_id = "192.0.2.1"\ncommunities = ["65536:1"]\n[[bgp.peers]]\naddress = "192.0.2.254"\n'
     'remote_as = 1', "each part of a standard community is at most 65535"),
    ('local_as = 1\nrouter_id = "192.0.2.1"\n[[bgp.peers]]\naddress = "192.0.2.254"\nremote_as = 1\npassword = "x"',
     "put the BGP password in a file"),
    ('local_as = 1\nrouter_id = "192.0.2.1"\n[[bgp.peers]]\naddress = "192.0.2.254"\nremote_as = 1\n'
     '[[bgp.peers]]\naddress = "192.0.2.254"\nremote_as = 2', "peer 192.0.2.254 is listed twice"),
    ('local_as = 1\nrouter_id = "192.0.2.1"\nhold = 3\n[[bgp.peers]]\naddress = "192.0.2.254"\nremote_as = 1',
     "bgp.hold: unknown key"),
    ('local_as = 1\nrouter_id = "192.0.2.1"\nerror_wait = [10, 5]\n[[bgp.peers]]\naddress = "192.0.2.254"\n'
     'remote_as = 1', "error_wait must be [first, longest] seconds"),
    ('local_as = 1\nrouter_id = "192.0.2.1"\nerror_wait = [0, 5]\n[[bgp.peers]]\naddress = "192.0.2.254"\n'
     'remote_as = 1', "error_wait must be [first, longest] seconds"),
])
def test_bad_bgp_config_is_refused_with_the_key(bgp: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(_cfg(bgp))
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_password_file_must_be_private() -> None:
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write("s3cret\n")
    path = Path(f.name)
    try:
        path.chmod(0o644)
        text = _cfg(f'local_as = 1\nrouter_id = "192.0.2.1"\n[[bgp.peers]]\naddress = "192.0.2.254"\n'
                    f'remote_as = 1\npassword_file = "{path}"')
        with pytest.raises(ConfigError, match="accessible by other users"):
            parse(text)
        path.chmod(0o600)
        peer = parse(text).bgp.peers[0]
        assert peer.password.get_secret_value() == "s3cret" and "s3cret" not in repr(peer)
        assert 'password "s3cret";' in render(parse(text).bgp, ())
    finally:
        path.unlink()


def test_fleet_compare_flags_the_odd_box() -> None:
    def st(seed: str, **tables: str) -> dict:
        return {"digest": {"seed": seed, "services": tables, "digest": "x"}}

    boxes = {"a": st("s", web="1", dns="2"), "b": st("s", web="1", dns="2"), "c": st("s", web="9", dns="2"),
             "d": st("t", web="1"), "e": None}
    assert compare(boxes) == {"c": ["web table"], "d": ["maglev seed", "dns missing"], "e": ["unreachable"]}
    assert compare({"a": st("s", web="1"), "b": st("s", web="1")}) == {}


# -- dual stack: an IPv6 session per router, as the tier lab and the README run it --------------

DUAL = BgpSection.model_validate({"local_as": 65010, "router_id": "192.0.2.1", "poll_interval": 0.05,
                                  "peers": [{"address": "192.0.2.254", "remote_as": 65000, "bfd": True},
                                            {"address": "2001:db8:0:1::fe", "remote_as": 65000, "bfd": True}]})


def _protocols(text: str) -> dict[str, str]:
    """The generated BGP protocols by name, each with its body."""
    return {b.split(None, 1)[0]: b for b in text.split("protocol bgp ")[1:]}


def _bird_accepts(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    inc = tmp_path / "inc"
    inc.mkdir(exist_ok=True)
    (inc / "l4lbd.conf").write_text(text)
    (tmp_path / "bird.conf").write_text(f'protocol device {{}}\ninclude "{inc}/*.conf";\n')
    return subprocess.run(["bird", "-p", "-c", str(tmp_path / "bird.conf")], capture_output=True, text=True,
                          timeout=30)


def test_dual_stack_render_each_session_carries_its_own_family(tmp_path: Path) -> None:
    v = view(svc("web", "198.51.100.10"), svc("web6", "2001:db8:0:100::10"), svc("dns6", "2001:db8:0:100::10", 53))
    text = render(DUAL, planner.plan(v, BoxState(), DUAL, 0))
    peers = _protocols(text)
    v4, v6 = peers["l4lb_peer_192_0_2_254"], peers["l4lb_peer_2001_db8_0_1__fe"]
    assert "neighbor 2001:db8:0:1::fe as 65000;" in v6 and "bfd on;" in v6
    assert "ipv4 { table l4lb_v4;" in v4 and "ipv6" not in v4, v4
    # The IPv6 session's own address is the next hop (BIRD adds the link-local one): nothing to configure.
    assert "ipv6 { table l4lb_v6; import none; export filter l4lb_export_v6; };" in v6 and "ipv4" not in v6, v6
    assert "route 2001:db8:0:100::10/128 blackhole;" in text and text.count("2001:db8:0:100::10/128") == 1
    cp = _bird_accepts(tmp_path, text)
    assert cp.returncode == 0, cp.stderr + text
    # The other way round: IPv4 VIPs over an IPv6-only session need next_hop_v4, and BIRD takes it.
    only6 = DUAL.model_copy(update={"peers": [DUAL.peers[1]], "next_hop_v4": "192.0.2.1"})
    text = render(only6, planner.plan(v, BoxState(), only6, 0))
    (v6,) = _protocols(text).values()
    assert "ipv4 { table l4lb_v4; import none; export filter l4lb_export_v4; next hop address 192.0.2.1; };" in v6
    cp = _bird_accepts(tmp_path, text)
    assert cp.returncode == 0, cp.stderr + text


class FakeBird:
    """A speaker that refuses the first ``fail`` configures; holds what it was last given."""

    def __init__(self, fail: int = 0, up: tuple[str, ...] = ("192.0.2.254", "2001:db8:0:1::fe")) -> None:
        self.fail, self.up, self.calls, self.text = fail, up, 0, ""

    def configure(self, text: str) -> bool:
        self.calls += 1
        if self.calls <= self.fail:
            raise SpeakerError("birdc configure: no answer in 20s")
        changed, self.text = text != self.text, text
        return changed

    def sessions(self) -> list[Session]:
        return [Session(p.address.compressed, "x", "up", "Established" if p.address.compressed in self.up else "Active",
                        "") for p in DUAL.peers]

    def routes(self) -> set[str]:
        return {line.split()[1] for line in self.text.splitlines() if line.strip().startswith("route ")}


def _states(r: Reconciler) -> dict[str, str]:
    return {p["prefix"]: p["state"] for p in r.status()["prefixes"]}


def test_an_ipv6_prefix_is_announced_only_while_an_ipv6_session_is_up(tmp_path: Path) -> None:
    bird = FakeBird(up=("192.0.2.254",))
    r = Reconciler(DUAL, bird, BoxStore(tmp_path / "box.json"))
    r.on_view(view(svc("web", "198.51.100.10"), svc("web6", "2001:db8:0:100::10")))
    r.reconcile_once()
    assert _states(r) == {"198.51.100.10/32": "announced", "2001:db8:0:100::10/128": "pending"}
    bird.up = ("192.0.2.254", "2001:db8:0:1::fe")
    r.reconcile_once()
    assert _states(r) == {"198.51.100.10/32": "announced", "2001:db8:0:100::10/128": "announced"}
    # Over the IPv4 session it counts only with next_hop_v6 (then that session carries IPv6 too).
    bird.up = ("192.0.2.254",)
    r.update_config(DUAL.model_copy(update={"next_hop_v6": "2001:db8:0:1::1"}))
    r.reconcile_once()
    assert _states(r)["2001:db8:0:100::10/128"] == "announced"


def test_a_failed_hand_over_to_the_speaker_is_retried(tmp_path: Path) -> None:
    bird = FakeBird(fail=2)
    r = Reconciler(DUAL, bird, BoxStore(tmp_path / "box.json"))
    r.start()
    try:
        r.on_view(view(svc("web6", "2001:db8:0:100::10")))
        deadline = time.monotonic() + 30  # a bound for a stuck thread, not a timing claim
        while _states(r) != {"2001:db8:0:100::10/128": "announced"}:
            assert time.monotonic() < deadline, (bird.calls, r.status())
            time.sleep(0.02)
        assert bird.calls == 3 and r.status()["error"] is None
    finally:
        r.stop()


def test_an_announced_prefix_whose_reason_changes_stays_announced(tmp_path: Path) -> None:
    """serving -> serving (failing open: web) is a health change that leaves the speaker's text as
    it was, so no read-back follows at once: the prefix must not show "pending" (nor drop out of
    the announced list that ``fleet status`` compares) until the next poll, up to poll_interval later."""
    slow = DUAL.model_copy(update={"poll_interval": 60.0})
    bird = FakeBird()
    r = Reconciler(slow, bird, BoxStore(tmp_path / "box.json"))
    web = svc("web", "198.51.100.10")
    r.on_view(view(web))
    r.start()
    try:
        deadline = time.monotonic() + 30  # a bound for a stuck thread, not a timing claim
        while _states(r) != {"198.51.100.10/32": "announced"}:   # the first pass polls at once
            assert time.monotonic() < deadline, r.status()
            time.sleep(0.02)
        since, text = r.status()["prefixes"][0]["since"], bird.text
        r.on_view(View(2, DesiredState(services=[web]), (web,), {"eth0": "native"}, True, runtime=1,
                       fail_open=frozenset({"web"})))
        while (p := r.status()["prefixes"][0])["reason"] != "serving (failing open: web)":
            assert time.monotonic() < deadline, r.status()
            time.sleep(0.02)
        assert bird.text == text   # nothing new for the speaker
        assert p["state"] == "announced" and p["since"] >= since, p
    finally:
        r.stop()


def test_fleet_coverage_names_the_boxes_announcing_each_prefix() -> None:
    def st(announced: list[str], withdrawn: list[str] = ()) -> dict:
        return {"bgp": {"announced": announced, "withdrawn": list(withdrawn)}}

    v4, v6, w6 = "198.51.100.10/32", "2001:db8:0:100::10/128", "2001:db8:0:100::11/128"
    boxes = {"a": st([v4, v6, w6]), "b": st([v4, v6], [w6]), "c": st([v6, v4], [w6]), "d": None, "e": {"bgp": None}}
    got = coverage(boxes)
    assert list(got) == [v4, v6, w6]  # IPv4 first, then IPv6
    assert got == {v4: ["a", "b", "c"], v6: ["a", "b", "c"], w6: ["a"]}
    assert coverage({"x": st([], [w6])}) == {w6: []}


def test_readme_router_example_is_the_one_the_lab_generates() -> None:
    from l4lb.lab.tier import router_config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("BIRD 2: this is the lab's router")
    block = readme[readme.index("```\n", start) + 4:]
    block = block[:block.index("   ```")]
    want = router_config("192.0.2.254", ["192.0.2.1", "2001:db8:0:1::1", "192.0.2.2", "2001:db8:0:1::2"], bfd_mult=3)
    assert [line.removeprefix("   ") for line in block.splitlines()] == want.rstrip("\n").splitlines()


def test_readme_frr_example_is_the_one_the_lab_runs() -> None:
    from l4lb.lab.frr import bgpd_config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("FRR 8.4 (Debian 12's): the lab's second router runs this")
    block = readme[readme.index("```\n", start) + 4:]
    block = block[:block.index("   ```")]
    want = bgpd_config(65000, 65010, ("192.0.2.254", "2001:db8:0:1::254"),
                       ["192.0.2.1", "2001:db8:0:1::1", "192.0.2.2", "2001:db8:0:1::2"])
    assert [line.removeprefix("   ") for line in block.splitlines()] == want.rstrip("\n").splitlines()
