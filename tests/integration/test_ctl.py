"""vswitchctl and the metrics endpoint against a running daemon: every subcommand prints a
table by default and JSON with --json; the daemon serves Prometheus text on 127.0.0.1."""
import json
import os
import random
import subprocess
import sys

from tests.integration.helpers import REPO, Cluster, nsexec, ping


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


def _ctl(*args):
    return subprocess.run([sys.executable, "-m", "vswitch.cli", *args], capture_output=True, text=True,
                          cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)


def test_install_cni_writes_a_runnable_launcher_and_a_valid_conflist(tmp_path):
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    r = _ctl("--socket", "/run/test/vsw.sock", "install-cni", "--bin-dir", str(bin_dir),
             "--conf-dir", str(conf_dir), "--subnet", "10.77.0.0/16")
    assert r.returncode == 0, r.stderr
    exe = bin_dir / "vswitch"
    assert os.access(exe, os.X_OK)
    v = subprocess.run([str(exe)], env={"CNI_COMMAND": "VERSION"}, capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stderr
    assert "1.0.0" in json.loads(v.stdout)["supportedVersions"]
    conf = json.loads((conf_dir / "05-vswitch.conflist").read_text())
    plugin = conf["plugins"][0]
    assert plugin["type"] == "vswitch" and plugin["socket"] == "/run/test/vsw.sock"   # vswitchctl's --socket
    assert {"portMappings", "bandwidth"} <= {k for k, on in plugin["capabilities"].items() if on}
    assert plugin["ipam"]["ranges"] == [[{"subnet": "10.77.0.0/16"}]]
    r = _ctl("install-cni", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir), "--socket", "/other.sock")
    assert r.returncode == 0 and json.loads((conf_dir / "05-vswitch.conflist").read_text())["plugins"][0][
        "socket"] == "/other.sock"
    bad = _ctl("install-cni", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir), "--subnet", "10.77.0.1/16")
    assert bad.returncode == 2 and "10.77.0.1/16" in bad.stderr
    missing = _ctl("install-cni", "--conf-dir", str(conf_dir))
    assert missing.returncode == 2 and "--bin-dir" in missing.stderr
