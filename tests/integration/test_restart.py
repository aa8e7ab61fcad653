"""Acceptance 5: kill -9 of the daemon during a ping between pods, then a restart: the
pods are re-adopted (same ports, IPs, hostPort rules, shapers), the ping resumes, and the
lost packets are reported. A restart that adds ``--uplink`` keeps the pods too."""
import json
import re
import time
from pathlib import Path

from tests.integration.helpers import Cluster, nsexec, nspopen, ping, sh


def test_kill9_then_restart_readopts_pods_and_the_ping_resumes(cluster):
    a = cluster.add_pod("a", 2, port_mappings=[{"hostPort": 8080, "containerPort": 80}],
                        bandwidth={"ingressRate": 50_000_000, "ingressBurst": 2_000_000})
    b = cluster.add_pod("b", 3)
    assert ping(a.ns, b.ip)["received"] == 3
    before = cluster.daemon.call("show")
    state = json.loads(Path(cluster.daemon.state_dir, "state.json").read_text())
    assert len(state["attachments"]) == 2

    pinger = nspopen(a.ns, "ping", "-i", "0.05", "-c", "120", "-W", "1", b.ip)
    time.sleep(1.5)
    cluster.daemon.kill9()
    time.sleep(0.5)          # traffic is lost while no daemon runs
    cluster.daemon.start()
    out, _ = pinger.communicate(timeout=60)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    sent, received = int(m.group(1)), int(m.group(2))
    seqs = [int(s) for s in re.findall(r"icmp_seq=(\d+)", out)]
    print(f"ping across kill -9 and restart: {sent} sent, {received} received, {sent - received} lost")
    assert sent - received > 0               # the outage is visible ...
    assert seqs and max(seqs) >= 110         # ... and the ping resumed after the restart
    after = cluster.daemon.call("show")
    assert [(p["name"], p["port_id"], p["ips"], p["bandwidth"], p["port_mappings"]) for p in before["ports"]] == \
           [(p["name"], p["port_id"], p["ips"], p["bandwidth"], p["port_mappings"]) for p in after["ports"]]
    assert after["hostports"] == before["hostports"]
    assert all(p["fd"] >= 0 for p in after["ports"])
    assert ping(b.ns, a.ip)["received"] == 3


def test_restart_with_an_uplink_added_readopts_the_pods(nss, tmp_path):
    """The uplink saves its NIC's originals in the state before it moves them, at start,
    before the pods are re-adopted: that write keeps the saved attachments."""
    node, outside = nss.new("n"), nss.new("o")
    nic = f"up{node[-7:]}"
    sh("ip", "link", "add", nic, "netns", node, "type", "veth", "peer", "name", f"ou{node[-7:]}",
       "netns", outside)
    nsexec(node, "ip", "addr", "add", "192.0.2.1/24", "dev", nic)
    nsexec(node, "ip", "link", "set", nic, "up")
    c = Cluster(nss, tmp_path, node_ns=node)
    c.daemon.start()
    try:
        a, b = c.add_pod("a", 2), c.add_pod("b", 3)
        assert c.daemon.stop() == 0                   # the pods stay, in the state file
        c.daemon.extra_args = ["--uplink", nic]
        c.daemon.start()
        listed = sorted(x["container_id"] for x in c.daemon.call("list")["attachments"])
        assert listed == sorted([a.cid, b.cid])
        state = json.loads(Path(c.daemon.state_dir, "state.json").read_text())
        assert len(state["attachments"]) == 2 and state["uplink"]["name"] == nic
        assert ping(a.ns, b.ip)["received"] == 3
        c.detach_all()
    finally:
        c.daemon.stop()
