"""vswitchctl and the metrics endpoint against a running daemon: every subcommand prints a
table by default and JSON with --json; the daemon serves Prometheus text on 127.0.0.1."""
import json
import random
import urllib.request

from tests.integration.helpers import Cluster, nsexec, ping


def test_vswitchctl_subcommands(cluster):
    a = cluster.add_pod("a", 2, port_mappings=[{"hostPort": 8080, "containerPort": 80}],
                        bandwidth={"egressRate": 10_000_000, "egressBurst": 1_000_000})
    b = cluster.add_pod("b", 3)
    assert ping(a.ns, b.ip, count=2)["received"] == 2
    d = cluster.daemon
    show = d.ctl("show").stdout
    assert a.port in show and a.ip in show and "8080->80/tcp" in show and "eg 10Mbit" in show
    js = json.loads(d.ctl("--json", "show").stdout)
    assert {p["name"] for p in js["ports"]} == {"vsw0", a.port, b.port}
    fdb = json.loads(d.ctl("--json", "fdb").stdout)["entries"]
    assert {e["port"] for e in fdb} >= {a.port, b.port}
    assert "MAC" in d.ctl("fdb").stdout
    counters = json.loads(d.ctl("--json", "counters", a.port).stdout)
    assert counters["ports"][a.port]["rx_packets"] >= 2
    assert "spoofed" in d.ctl("counters").stdout
    assert "PROTO" in d.ctl("conntrack").stdout
    tr = json.loads(d.ctl("--json", "trace", a.port, "--src-mac", a.attachment["mac"], "--dst-mac",
                          b.attachment["mac"], "--src-ip", a.ip, "--dst-ip", b.ip, "--proto", "udp").stdout)
    assert tr["stages"] and any(b.port in dec for _, dec in tr["stages"])
    spoof = d.ctl("trace", a.port, "--src-ip", "10.99.99.99", "--dst-ip", b.ip).stdout
    assert "spoof" in spoof.lower()
    assert "vswitch_pods 2" in d.ctl("metrics").stdout
    bad = d.ctl("counters", "no-such-port", check=False)
    assert bad.returncode == 1 and "no-such-port" in bad.stderr


def test_metrics_port_serves_prometheus_text_on_localhost(nss, tmp_path):
    port = random.randrange(20000, 30000)
    c = Cluster(nss, tmp_path, daemon_args=["--metrics-port", str(port)])
    c.daemon.start()
    try:
        c.add_pod("a", 2)
        out = nsexec(c.node, "python3", "-c",
                     f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())").stdout
        assert "vswitch_pods 1" in out and 'vswitch_port_rx_packets_total{port="vsw0"}' in out
        listening = nsexec(c.node, "ss", "-ltnH", f"sport = :{port}").stdout
        assert "127.0.0.1:" in listening
    finally:
        c.daemon.stop()
