"""Acceptance 5: kill -9 of the daemon during a ping between pods, then a restart: the
pods are re-adopted (same ports, IPs, hostPort rules, shapers), the ping resumes, and the
lost packets are reported."""
import json
import re
import time
from pathlib import Path

from tests.integration.helpers import nspopen, ping


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
