"""Acceptance 7: after every pod is detached and the daemon exits, no TAP device,
namespace or state entry of the test remains."""
import os
import json

from tests.integration.helpers import nsexec, sh


def test_nothing_is_left_over(cluster, nss):
    a = cluster.add_pod("a", 2)
    b = cluster.add_pod("b", 3)
    assert "tun" in nsexec(a.ns, "ip", "-d", "link", "show", "eth0").stdout
    assert cluster.daemon.call("detach", container_id=a.cid, ifname="eth0")["existed"]
    assert cluster.daemon.call("detach", container_id=b.cid, ifname="eth0")["existed"]
    # detach is idempotent
    assert not cluster.daemon.call("detach", container_id=b.cid, ifname="eth0")["existed"]
    for pod in (a, b):
        assert nsexec(pod.ns, "ip", "-o", "link", "show", "type", "tun").stdout.strip() == ""
    assert cluster.daemon.call("list")["attachments"] == []
    assert cluster.daemon.stop() == 0
    assert nsexec(cluster.node, "ip", "-o", "link", "show", "type", "tun").stdout.strip() == ""
    assert not os.path.exists(cluster.daemon.socket)
    state = os.path.join(cluster.daemon.state_dir, "state.json")
    assert not os.path.exists(state) or json.load(open(state))["attachments"] == []
    names = list(nss.names)
    nss.cleanup()
    listed = sh("ip", "netns", "list").stdout
    assert not any(n in listed for n in names)
    # no TAP of ours in the root namespace either
    assert not [l for l in sh("ip", "-o", "link", "show", "type", "tun").stdout.splitlines()
                if " vp" in l]
