"""vswitchd --poll-bulk-kib (docs/daemon.md "Bulk batches"): on a real node, a TCP stream
between two pods makes batches of at least the bound, after which the loop does not poll
(counted in status.loop.bulk); with 0 it polls after every batch and counts none; pings
(small batches) still poll. A bound out of range is refused before the daemon starts."""
import subprocess
import sys

import pytest

from tests.integration.helpers import iperf3, ping, running_cluster
from vswitch import lab


@pytest.mark.parametrize("kib", [32, 0])
def test_a_stream_blocks_after_bulk_batches_and_pings_still_poll(nss, tmp_path, kib):
    with running_cluster(nss, tmp_path, daemon_args=("--poll-bulk-kib", str(kib))) as cluster:
        a, b = cluster.add_pod("a", 2), cluster.add_pod("b", 3)
        d = cluster.daemon
        assert d.call("status")["poll_bulk_kib"] == kib
        assert ping(a.ns, b.ip)["received"] == 3
        st0 = d.call("status")["loop"]
        assert st0["polls"] > 0 and st0["bulk"] == 0         # pings: small batches, polled after
        iperf3(b.ns, b.ip, a.ns, seconds=1)
        st = d.call("status")["loop"]
        if kib:
            assert st["bulk"] - st0["bulk"] > 1000           # 64 KiB TSO segments: bulk batches
        else:
            assert st["bulk"] == 0
            assert st["polls"] - st0["polls"] > st["batches"] - st0["batches"]


def test_a_bound_out_of_range_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vswitch.daemon", "--socket", str(tmp_path / "s"),
                        "--state-dir", str(tmp_path / "st"), "--poll-bulk-kib", "-1"],
                       capture_output=True, text=True, timeout=60, cwd=str(lab.REPO))
    assert r.returncode == 2 and "poll_bulk_kib=-1" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()
