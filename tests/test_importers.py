"""`l4lbctl import`'s pure parsers on sample files of both formats (tests/data/import/):
ipvsadm -S -n rules as ipvsadm 1.31 writes them, and a keepalived 2.2 configuration
with includes, comments, variables, groups and checkers. Each sample's whole
document is compared, every note is expected by line, and bad syntax stops the
import with the file and line. (The CLI and a real daemon: tests/test_cli.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from l4lb.importers import SourceError, ipvsadm, keepalived
from l4lb.importers.result import health_supported
from l4lb.models import DesiredState

DATA = Path(__file__).parent / "data" / "import"
KA = DATA / "keepalived"


def notes_of(result: Any) -> set[tuple[str, int, str, str]]:
    return {(Path(n.source).name, n.line, n.what, n.action) for n in result.notes}


def b(address: str, weight: int, **kw: Any) -> dict[str, Any]:
    return {"address": address, **({"port": kw.pop("port")} if "port" in kw else {}), "weight": weight, **kw}


# --- ipvsadm ----------------------------------------------------------------------------------------------


def test_ipvsadm_sample() -> None:
    r = ipvsadm.parse((DATA / "ipvsadm.rules").read_text(), "ipvsadm.rules")
    assert r.document() == {"services": [
        # mh with mh-port hashes the client port too: l4lb's default; weight 0 = no new connections.
        {"name": "tcp-198.51.100.10-80", "vip": "198.51.100.10", "port": 80, "protocol": "tcp",
         "backends": [b("192.0.2.101", 1), b("192.0.2.102", 2), b("192.0.2.103", 0)]},
        {"name": "tcp-198.51.100.10-443", "vip": "198.51.100.10", "port": 443, "protocol": "tcp",
         "options": {"hash_src_port": False},
         "backends": [b("192.0.2.101", 100), b("192.0.2.102", 100), b("192.0.2.103", 50)]},
        # NAT to another port: L4 DNAT.
        {"name": "udp-198.51.100.10-53", "vip": "198.51.100.10", "port": 53, "protocol": "udp",
         "options": {"l4_dnat": True}, "backends": [b("192.0.2.101", 1, port=5353), b("192.0.2.102", 1, port=5353)]},
        # -M: client-IP affinity by network.
        {"name": "tcp-198.51.100.11-25", "vip": "198.51.100.11", "port": 25, "protocol": "tcp",
         "options": {"hash_src_port": False, "affinity_prefix": 24}, "backends": [b("192.0.2.104", 1)]},
        # mh without mh-port hashes the client address only: client-IP affinity.
        {"name": "tcp-2001-db8-0-100--10-80", "vip": "2001:db8:0:100::10", "port": 80, "protocol": "tcp",
         "options": {"hash_src_port": False},
         "backends": [b("2001:db8:0:1::101", 1), b("2001:db8:0:1::102", 1)]},
    ]}
    assert notes_of(r) == {
        ("ipvsadm.rules", 7, "-s wlc", "approximated"), ("ipvsadm.rules", 7, "-p 600", "approximated"),
        ("ipvsadm.rules", 8, "-g", "approximated"),
        ("ipvsadm.rules", 11, "-s rr", "approximated"), ("ipvsadm.rules", 11, "-o", "ignored"),
        ("ipvsadm.rules", 12, "-m", "approximated"),
        ("ipvsadm.rules", 14, "-s sh", "approximated"), ("ipvsadm.rules", 14, "-p 300", "approximated"),
        ("ipvsadm.rules", 15, "-g", "approximated"), ("ipvsadm.rules", 15, "-x 1000", "ignored"),
        ("ipvsadm.rules", 15, "-y 800", "ignored"),
        ("ipvsadm.rules", 17, "-i", "approximated"),  # --tun-type gue
        ("ipvsadm.rules", 19, "-f 7", "skipped"),
        ("ipvsadm.rules", 21, "--sctp-service 198.51.100.10:2905", "skipped"),
    }
    # One note for the three -g lines of a service, naming the others.
    g = next(n for n in r.notes if n.line == 8)
    assert str(g).startswith("ipvsadm.rules:8: -g: approximated: direct routing becomes IPIP") and "(also lines 9, 10)" in str(g)
    DesiredState.model_validate(r.document())


def test_ipvsadm_long_options_and_defaults() -> None:
    r = ipvsadm.parse("ipvsadm --add-service --tcp-service 203.0.113.5:8080 --persistent\n"
                      "ipvsadm --add-server --tcp-service 203.0.113.5:8080 --real-server 192.0.2.7 --ipip\n", "x")
    assert r.services == [{"name": "tcp-203.0.113.5-8080", "vip": "203.0.113.5", "port": 8080, "protocol": "tcp",
                           "options": {"hash_src_port": False}, "backends": [b("192.0.2.7", 1)]}]
    assert ("x", 1, "-p 300", "approximated") in notes_of(r)  # a bare -p: ipvsadm's 300 s


@pytest.mark.parametrize("text,message", [
    ("-A -t 198.51.100.1:80 -s rr --bogus\n", "x:1: not an ipvsadm rule: option --bogus not recognized"),
    ("-A -t 198.51.100.1:80 -s rr\n-a -t 198.51.100.1:80\n", "x:2: -a needs -r ADDRESS[:PORT]"),
    ("-A -t web.example.com:http -s rr\n", "x:1: service 'web.example.com:http': not a numeric address"),
    ("-A -t 198.51.100.1:80\n-a -t 198.51.100.1:80 -r 192.0.2.1 -w 70000\n", "x:2: -w '70000' is not a number"),
    ("-A -t 198.51.100.1:80\n-A -t 198.51.100.1:80\n", "x:2: service -t 198.51.100.1:80 is defined twice"),
    ("-a -t 198.51.100.1:80 -r 192.0.2.1\n", "x:1: real server for -t 198.51.100.1:80, which no -A line"),
    ("-A -t 198.51.100.1:80 -u 198.51.100.1:80\n", "x:1: name exactly one service"),
    ("-A -t 198.51.100.1:80 -b bogus-flag\n", "x:1: -b 'bogus-flag' is not a scheduler flag"),
    ("-t 198.51.100.1:80\n", "x:1: no command"),
    ("-A -t 198.51.100.1:80\n-a -t 198.51.100.1:80 -r 192.0.2.1 -g -m\n", "x:2: give one of -g, -i, -m"),
])
def test_ipvsadm_bad_syntax_imports_nothing(text: str, message: str) -> None:
    with pytest.raises(SourceError) as e:
        ipvsadm.parse(text, "x")
    assert str(e.value).startswith(message), str(e.value)


def test_ipvsadm_services_l4lb_refuses_are_skipped_with_a_note() -> None:
    r = ipvsadm.parse("-A -t [2001:db8::100]:80\n-a -t [2001:db8::100]:80 -r 192.0.2.1:80\n"
                      "-A -t 198.51.100.1:0 -p\n-C\n", "x")
    assert r.services == []
    assert notes_of(r) == {("x", 1, "service tcp-2001-db8--100-80", "skipped"),  # IPv4 backend, IPv6 VIP
                           ("x", 1, "-s (none: wlc)", "approximated"),
                           ("x", 2, "(no -g/-i/-m: -g)", "approximated"),
                           ("x", 3, "-t 198.51.100.1:0", "skipped"), ("x", 4, "-C", "ignored")}
    assert "is IPv4 but VIP 2001:db8::100 is IPv6" in next(str(n) for n in r.notes if n.action == "skipped" and n.line == 1)


def test_ipvsadm_ipv6_real_servers_of_an_ipv4_service_become_4in6_backends() -> None:
    r = ipvsadm.parse("-A -t 198.51.100.1:80 -s sh -p 60 -M 16\n-a -t 198.51.100.1:80 -r [2001:db8::1]:80 -i\n"
                      "-a -t 198.51.100.1:80 -r 192.0.2.1:80 -i\n", "x")
    assert r.services == [{"name": "tcp-198.51.100.1-80", "vip": "198.51.100.1", "port": 80, "protocol": "tcp",
                           "options": {"hash_src_port": False, "affinity_prefix": 16},
                           "backends": [b("2001:db8::1", 1), b("192.0.2.1", 1)]}]


# --- keepalived ------------------------------------------------------------------------------------------


def hc(kind: str, interval: float, timeout: float, fall: int, **kw: Any) -> dict[str, Any]:
    return {"type": kind, "via": "direct", **({"port": kw.pop("port")} if "port" in kw else {}),
            "interval": interval, "timeout": timeout, "rise": 1, "fall": fall, **kw}


DNS_HEALTH = hc("udp-dns", 3.0, 1.0, 3, query="health.example.com", query_type="A")
KEEPALIVED_DOC = {"services": [
    {"name": "tcp-198.51.100.10-80", "vip": "198.51.100.10", "port": 80, "protocol": "tcp",
     "backends": [b("192.0.2.101", 100), b("192.0.2.102", 100), b("192.0.2.103", 50),
                  b("192.0.2.104", 0, health={"type": "none"})],  # no checker: never taken out
     "health": hc("http", 5.0, 2.0, 3, path="/healthz", expect_status="200")},
    {"name": "tcp-198.51.100.10-443", "vip": "198.51.100.10", "port": 443, "protocol": "tcp",
     "options": {"hash_src_port": False, "affinity_prefix": 24},  # persistence_granularity 255.255.255.0
     "backends": [b("192.0.2.101", 1), b("192.0.2.102", 1), b("192.0.2.103", 1, health={"port": 8443})],
     "health": hc("https", 10.0, 3.0, 2, path="/status", expect_status="200-299,301", host="www.example.com")},
    *({"name": f"DNS-udp-198.51.100.{n}-53", "vip": f"198.51.100.{n}", "port": 53, "protocol": "udp",
       "options": {"l4_dnat": True},
       "backends": [b("192.0.2.111", 1, port=5353), b("192.0.2.112", 1, port=5353)],
       "health": DNS_HEALTH} for n in (53, 54, 55)),
    {"name": "tcp-2001-db8-0-100--10-80", "vip": "2001:db8:0:100::10", "port": 80, "protocol": "tcp",
     "options": {"hash_src_port": False},
     "backends": [b("2001:db8:0:1::101", 1), b("2001:db8:0:1::102", 1), b("2001:db8:0:1::103", 1, health={"port": 8080})],
     "health": hc("tcp", 5.0, 2.0, 2)},
]}


def without_health(doc: dict[str, Any]) -> dict[str, Any]:
    return {"services": [{**{k: v for k, v in s.items() if k != "health"},
                          "backends": [{k: v for k, v in x.items() if k != "health"} for x in s["backends"]]}
                         for s in doc["services"]]}


def test_keepalived_sample_with_includes() -> None:
    r = keepalived.parse_file(str(KA / "keepalived.conf"))
    notes = notes_of(r)
    if health_supported():
        assert r.document() == KEEPALIVED_DOC
    else:  # this l4lb's models have no Service.health yet: checkers are reported, not imported
        assert r.document() == without_health(KEEPALIVED_DOC)
        assert ("keepalived.conf", 30, "health checkers", "ignored") in notes
    DesiredState.model_validate(r.document())
    expected = {
        ("keepalived.conf", 4, "global_defs", "ignored"),
        ("keepalived.conf", 18, "vrrp_instance VI_EDGE", "ignored"),
        ("keepalived.conf", 47, "delay_before_retry 2", "approximated"),
        ("keepalived.conf", 64, "notify_down /usr/local/bin/page-oncall web b3", "ignored"),
        ("keepalived.conf", 70, "url", "ignored"),  # the second url block
        ("10-tls.conf", 4, "lvs_sched wrr", "approximated"),
        ("10-tls.conf", 5, "lvs_method DR", "approximated"),
        ("10-tls.conf", 6, "persistence_timeout 600", "approximated"),
        ("10-tls.conf", 10, "sorry_server 192.0.2.200 443", "ignored"),
        ("10-tls.conf", 32, "real_server 192.0.2.103 8443", "ignored"),  # DR keeps the service port
        ("10-tls.conf", 42, "MISC_CHECK", "ignored"),
        ("20-dns.conf", 9, "lb_algo rr", "approximated"),
        ("20-dns.conf", 10, "lb_kind NAT", "approximated"),
        ("20-dns.conf", 12, "ops", "ignored"),
        ("20-dns.conf", 38, "lb_algo sh", "approximated"),
        ("20-dns.conf", 55, "virtual_server fwmark 7", "skipped"),
    }
    assert notes - {n for n in notes if n[2] == "health checkers"} == expected
    # Notes come in the order of the configuration: files as included, then lines.
    order = [(Path(n.source).name, n.line) for n in r.notes]
    files = ["keepalived.conf", "10-tls.conf", "20-dns.conf"]
    assert order == sorted(order, key=lambda x: (files.index(x[0]), x[1]))


def conf(tmp_path: Path, text: str, **more: str) -> str:
    for name, body in more.items():
        (tmp_path / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name.replace("__", "/")).write_text(body)
    (tmp_path / "keepalived.conf").write_text(text)
    return str(tmp_path / "keepalived.conf")


VS = "virtual_server 198.51.100.7 80 {\n  lb_algo mh\n  lb_kind TUN\n  real_server 192.0.2.9 80 {\n    weight 3\n  }\n}\n"


def test_keepalived_syntax_variants(tmp_path: Path) -> None:
    """Continuations, braces on one line or the next, quoted strings with '#', nested relative includes."""
    path = conf(tmp_path, "include sub/*.conf  # the rest\ninclude none/*.conf\n",
                **{"sub__1.conf": "include ../more/x.conf\n", "more__x.conf": VS.replace("lb_kind TUN", "lb_kind \\\n TUN"),
                   "sub__2.conf": 'virtual_server 198.51.100.8 80 { lb_algo mh\n lb_kind TUN\n'
                                  ' real_server 192.0.2.10 80 { weight 2\n  notify_up "/bin/echo #up" }\n}\n'})
    r = keepalived.parse_file(path)
    assert [(s["vip"], s["backends"]) for s in r.services] == [("198.51.100.7", [b("192.0.2.9", 3)]),
                                                                 ("198.51.100.8", [b("192.0.2.10", 2)])]
    assert notes_of(r) == {("keepalived.conf", 2, "include none/*.conf", "ignored"),
                           ("2.conf", 4, "notify_up /bin/echo #up", "ignored")}


@pytest.mark.parametrize("text,message", [
    ("virtual_server 198.51.100.7 80 {\n  real_server 192.0.2.9 80 {\n", "keepalived.conf:2: block real_server is never closed"),
    ("}\n", "keepalived.conf:1: '}' without a block"),
    ('virtual_server 198.51.100.7 80 {\n  notify_up "/bin/x\n}\n', "keepalived.conf:2: a quoted string is not closed"),
    ("virtual_server $VIP 80 {\n}\n", "keepalived.conf:1: $VIP is not defined"),
    ("include keepalived.conf\n", "keepalived.conf:1: includes nested more than 16 deep"),
    ("virtual_server 198.51.100.300 80 {\n}\n", "keepalived.conf:1: '198.51.100.300' is not an IP address"),
    ("virtual_server 198.51.100.7 http {\n}\n", "keepalived.conf:1: 'http' is not a port number"),
    ("virtual_server group NOPE {\n}\n", "keepalived.conf:1: virtual_server group: no virtual_server_group 'NOPE'"),
    (VS.replace("weight 3", "weight lots"), "keepalived.conf:5: weight 'lots' is not a number"),
    (VS.replace("lb_kind TUN", "lb_kind FAST"), "keepalived.conf:3: lb_kind takes NAT, DR or TUN"),
    (VS.replace("lb_algo mh", "protocol ICMP"), "keepalived.conf:2: protocol 'icmp' is not TCP, UDP or SCTP"),
    ("{\n}\n", "keepalived.conf:1: '{' without a keyword"),
])
def test_keepalived_bad_syntax_imports_nothing(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SourceError) as e:
        keepalived.parse_file(conf(tmp_path, text))
    assert f"{Path(e.value.source).name}:{e.value.line}: {e.value.message}".startswith(message), str(e.value)


def test_keepalived_checker_mapping(tmp_path: Path) -> None:
    """Timing comes from the checker, else the real server, else the virtual server, else keepalived's
    defaults (delay_loop 60, connect_timeout 5, retry 1); a timeout longer than the interval is cut."""
    text = ("virtual_server 198.51.100.7 80 {\n  lb_algo mh\n  lb_kind TUN\n  connect_timeout 9\n"
            "  real_server 192.0.2.9 80 {\n    retry 4\n    HTTP_GET {\n      url {\n        path /hc\n"
            "        regex \"OK ready\"\n        digest abc\n      }\n      delay_loop 4\n    }\n  }\n"
            "  real_server 192.0.2.10 80 {\n    DNS_CHECK {\n      type AAAA\n    }\n  }\n}\n")
    r = keepalived.parse_file(conf(tmp_path, text))
    checks = {}
    original = keepalived._service_health
    try:  # look at the checks before the service-level merge
        keepalived._service_health = lambda doc, cs, s, notes: checks.update(zip([x["address"] for x in doc["backends"]], cs))
        keepalived.parse_file(conf(tmp_path, text))
    finally:
        keepalived._service_health = original
    assert checks == {
        "192.0.2.9": hc("http", 4.0, 4.0, 5, path="/hc", body_contains="OK ready", expect_status="200-299"),
        "192.0.2.10": None,  # DNS_CHECK without a name asks for '.', which udp-dns cannot
    }
    assert {("keepalived.conf", 7, "connect_timeout 9", "approximated"), ("keepalived.conf", 11, "url digest", "ignored"),
            ("keepalived.conf", 17, "DNS_CHECK", "skipped")} <= notes_of(r)
    if health_supported():
        assert r.services[0]["backends"][1]["health"] == {"type": "none"}
