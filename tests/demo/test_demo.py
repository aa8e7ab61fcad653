"""The README's first command: the demo runs its scenario and prints a true table."""
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vswitch import lab

REPO = Path(__file__).resolve().parents[2]


def _demo(*args, env=None):
    r = subprocess.run([sys.executable, "-m", "vswitch.lab.demo", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout


def _row(out, check):
    line = next(line for line in out.splitlines() if line.startswith(check))
    return line[len(check):].split()


def test_simulated_demo_reaches_every_check():
    out = _demo("--sim", "--seconds", "1")
    assert "SIMULATION" in out
    assert _row(out, "ping peer -> web")[0] == "1/1"
    assert _row(out, "client -> 198.18.0.2:8080")[0] == "SYN-ACK"
    rate = float(_row(out, "shaped egress")[0])
    # 1 s at 20 Mbit/s plus the 1 Mbit burst, offered at 80 Mbit/s: 20..21 Mbit/s
    assert 19.5 <= rate <= 21.1


@pytest.mark.integration
@pytest.mark.skipif(lab.kernel_unavailable() is not None, reason=lab.kernel_unavailable() or "")
def test_real_demo_pods_ping_hostport_and_shaping():
    out = _demo("--seconds", "3", "--nodes", "0")      # the cluster part: the test below
    assert "real pods" in out
    assert _row(out, "ping peer -> web")[0] == "3/3"
    assert _row(out, "client -> 198.18.0.2:8080")[:2] == ["HTTP", "200"]
    assert out.split("node iptables/nft rules: ")[1].split()[0] == "0"
    for direction in ("shaped egress", "shaped ingress"):
        ratio = float(_row(out, direction)[-4])
        assert 0.9 <= ratio <= 1.05, out
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith("vsdemo")]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(lab.kernel_unavailable() is not None, reason=lab.kernel_unavailable() or "")
def test_real_demo_cluster_part_pods_on_every_node_talk_and_each_hostport_is_local():
    from vswitch.lab.demo import cluster_unavailable
    why = cluster_unavailable()
    if why:
        pytest.skip(why)
    out = _demo("--seconds", "1", "--nodes", "3")
    cluster = out.split("a cluster of 3 nodes")[1]
    assert _row(cluster, "nodes known")[0] == "3/3"
    assert _row(cluster, "VXLAN peers")[0] == "2/2"
    nets = [ipaddress.ip_network(_row(cluster, f"node n{i}")[0]) for i in (1, 2, 3)]
    assert len(set(nets)) == 3 and all(n.subnet_of(ipaddress.ip_network("10.244.0.0/16")) for n in nets)
    for i, net in zip((1, 2, 3), nets):
        assert ipaddress.ip_address(_row(cluster, f"pod n{i}-web")[0]) in net
    assert _row(cluster, "ping across nodes")[0] == "6/6", out
    assert _row(cluster, "TCP across nodes")[0] == "3/3", out
    for i in (1, 2, 3):
        # the underlay address of node i is host i of 10.200.0.0/24; its own pod answers
        assert _row(cluster, f"hostPort 10.200.0.{i}:8080")[:4] == [f"n{i}-web", "served", "by", f"n{i}'s"], out
    assert "Gbit/s" in _row(cluster, "TCP n1 -> n2")[1]
