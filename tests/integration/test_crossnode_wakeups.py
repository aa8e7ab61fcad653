"""Encapsulation adds no wakeup (issue 13: "encapsulation must not add a wake-up"): a ping
between pods on two vswitch nodes wakes each node's loop once, as a ping between two pods
of one node wakes that node's loop once. Counted with ``status`` -> ``loop.sleeps`` (the
loop's blocking waits: each one that ends is a wakeup), beside the same count over an idle
period of the same length (the loop's own timers).

The nodes run ``--poll-us 2000`` (a window of 2 ms, at most 8 ms when it widens), so that a
reply is caught by the window however loaded the machine is, and the 20 ms between pings
are longer than any window: every request finds both loops asleep."""
import time

import pytest

from vswitch import lab
from vswitch.lab import cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(lab.kernel_unavailable() is not None, reason=lab.kernel_unavailable() or "")]

PINGS = 100
INTERVAL_S = 0.02


@pytest.fixture(scope="module")
def c2():
    with cluster.Cluster(2, kinds="vswitch", pods_per_node=2,
                         node_kwargs={"vswitch": {"daemon_args": ("--poll-us", "2000")}}) as c:
        yield c


def _sleeps(c):
    return [n.daemon.call("status")["loop"]["sleeps"] for n in c.nodes]


def _wakeups_per_ping(c, src, dst_ip):
    """Each node's loop wakeups per ping over PINGS pings from ``src`` to ``dst_ip``, and
    its wakeups over an idle period as long, per ping: [(pinging, idle)] per node."""
    before = _sleeps(c)
    t0 = time.monotonic()
    time.sleep(PINGS * INTERVAL_S)
    idle = [b - a for a, b in zip(before, _sleeps(c))]
    idle_s = time.monotonic() - t0
    before = _sleeps(c)
    t0 = time.monotonic()
    out = lab.nsexec(src.ns, "ping", "-q", "-c", str(PINGS), "-i", str(INTERVAL_S), "-W", "5", dst_ip).stdout
    busy_s = time.monotonic() - t0
    assert f"{PINGS} received" in out, out
    return [((b - a) / PINGS, i * busy_s / idle_s / PINGS) for a, b, i in zip(before, _sleeps(c), idle)]


def test_a_cross_node_ping_wakes_each_node_once_as_a_same_node_ping_wakes_its_node(c2):
    n1, n2 = c2.nodes
    a, a2 = n1.pods
    b = n2.pods[0]
    for dst in (b.ip, a2.ip):
        assert lab.nsexec(a.ns, "ping", "-c", "3", "-i", "0.05", "-W", "5", dst, check=False).returncode == 0
    cross = _wakeups_per_ping(c2, a, b.ip)
    same = _wakeups_per_ping(c2, a, a2.ip)
    # every request finds the loops of the nodes it crosses asleep (so the count counts);
    # the reply comes back within the window: one wakeup per node per ping, beyond the
    # loop's own timers (which a ping's window may absorb, so they are an upper allowance)
    for pinging, idle in (*cross, same[0]):
        assert pinging >= 0.8, (cross, same)
        assert pinging - idle <= 1.25, (cross, same)
    assert same[1][0] - same[1][1] <= 0.2, same             # node 2 plays no part
