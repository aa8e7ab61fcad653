"""vswitchd --metrics-address: the Prometheus endpoint on the node's address (issue 15.4).

A node namespace and a "prometheus" namespace joined by a veth with an IPv4 and an IPv6
address each; vswitchd runs in the node namespace. The scrape is an HTTP GET from the
other namespace (python's urllib run there), so it proves the endpoint is reachable off
the node, not only on its loopback. The default (127.0.0.1) is not reachable from there.
"""
import sys

import pytest

from vswitch import lab

pytestmark = pytest.mark.integration

SCRAPE = ("import sys, urllib.request; "
          "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")


@pytest.fixture
def nodes(tmp_path):
    reason = lab.kernel_unavailable()
    if reason:
        pytest.skip(reason)
    with lab.Namespaces(prefix="vma") as nss:
        node, prom = nss.new("node"), nss.new("prom")
        lab.veth(node, "eth0", "198.18.77.1/24", prom, "eth0", "198.18.77.2/24")
        for ns, addr in ((node, "fd00:77::1/64"), (prom, "fd00:77::2/64")):
            lab.nsexec(ns, "ip", "addr", "add", addr, "dev", "eth0", "nodad")
        yield node, prom


def scrape(ns, url):
    return lab.nsexec(ns, sys.executable, "-I", "-c", SCRAPE, url, check=False, timeout=30)


@pytest.mark.parametrize("address, url_host", [("198.18.77.1", "198.18.77.1"),
                                               ("fd00:77::1", "[fd00:77::1]"),
                                               ("0.0.0.0", "198.18.77.1"),
                                               ("::", "[fd00:77::1]")])
def test_metrics_scraped_from_another_namespace(nodes, tmp_path, address, url_host):
    node, prom = nodes
    port = 19100
    d = lab.Daemon(node, tmp_path / "d", ["--switch", f"vsm{lab.uid()}"[:15], "--metrics-port", port,
                                          "--metrics-address", address]).start(timeout_s=30)
    try:
        r = scrape(prom, f"http://{url_host}:{port}/metrics")
        assert r.returncode == 0, r.stderr
        assert "# TYPE" in r.stdout and "vswitch_" in r.stdout
    finally:
        d.stop()


def test_default_address_is_loopback_only(nodes, tmp_path):
    node, prom = nodes
    port = 19101
    d = lab.Daemon(node, tmp_path / "d", ["--switch", f"vsm{lab.uid()}"[:15],
                                          "--metrics-port", port]).start(timeout_s=30)
    try:
        assert scrape(node, f"http://127.0.0.1:{port}/metrics").returncode == 0
        r = scrape(prom, f"http://198.18.77.1:{port}/metrics")
        assert r.returncode != 0 and ("refused" in r.stderr or "Errno" in r.stderr), r.stderr
    finally:
        d.stop()


def test_a_metrics_address_that_is_not_an_ip_is_refused(tmp_path):
    r = lab.sh(sys.executable, "-m", "vswitch.daemon", "--socket", tmp_path / "s", "--state-dir", tmp_path / "st",
               "--metrics-port", "19102", "--metrics-address", "node-1", check=False, cwd=str(lab.REPO))
    assert r.returncode == 2 and "--metrics-address 'node-1' is not an IP address" in r.stderr
