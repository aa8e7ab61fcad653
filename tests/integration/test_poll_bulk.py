"""vswitchd --poll-bulk-kib (docs/daemon.md "Bulk batches"; off by default), on a real
node with --uplink: with 32, a TCP stream from a client beyond the uplink to a pod's
hostPort makes batches of at least that many KiB across the wire, after which the loop does
not poll (status.loop.bulk), while a stream between two pods of the node, and pings, still
poll; by default nothing is bulk. A bound out of range is refused before the daemon
starts."""
import subprocess
import sys

import pytest

from tests.integration.helpers import UPLINK_NODE_IP, iperf3, ping, uplinked_node
from vswitch import lab

PORT = 5201         # hostPort = containerPort: iperf3 listens and connects on one number


@pytest.mark.parametrize("kib", [32, None])
def test_only_streams_across_the_wire_skip_the_polling_window(nss, tmp_path, kib):
    with uplinked_node(nss, tmp_path, daemon_args=("--poll-bulk-kib", str(kib)) if kib else ()) as c:
        a = c.add_pod("a", 2, port_mappings=[{"hostPort": PORT, "containerPort": PORT, "protocol": "tcp"}])
        b = c.add_pod("b", 3)
        d = c.daemon
        assert d.call("status")["poll_bulk_kib"] == (kib or 0)          # default: off
        assert ping(a.ns, b.ip)["received"] == 3
        st0 = d.call("status")["loop"]
        assert st0["polls"] > 0 and st0["bulk"] == 0         # pings: small batches, polled after
        iperf3(b.ns, b.ip, a.ns, seconds=1)                  # pod to pod on this node
        st1 = d.call("status")["loop"]
        assert st1["bulk"] == 0 and st1["polls"] - st0["polls"] > st1["batches"] - st0["batches"]
        iperf3(a.ns, UPLINK_NODE_IP, c.client, seconds=1)     # client -> node IP:hostPort -> pod a
        st2 = d.call("status")["loop"]
        if kib:
            assert st2["bulk"] - st1["bulk"] > 1000          # GSO frames off the wire: bulk batches
        else:
            assert st2["bulk"] == 0


def test_a_bound_out_of_range_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vswitch.daemon", "--socket", str(tmp_path / "s"),
                        "--state-dir", str(tmp_path / "st"), "--poll-bulk-kib", "-1"],
                       capture_output=True, text=True, timeout=60, cwd=str(lab.REPO))
    assert r.returncode == 2 and "poll_bulk_kib=-1" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()
