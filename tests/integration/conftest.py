"""Fixtures of the daemon's integration tests: namespaces and a vswitchd per test.

Every test using the namespace fixtures is marked ``integration`` and skipped (with the
reason) only where root or /dev/net/tun is missing. Namespaces and the daemon are removed in every outcome.
"""
import pytest

from tests.integration.helpers import Cluster, Namespaces, skip_reason


def pytest_collection_modifyitems(config, items):
    reason = skip_reason()
    for item in items:
        if "tests/integration/" in str(item.fspath) or "tests/faults/" in str(item.fspath):
            if "nss" not in getattr(item, "fixturenames", ()):
                continue        # no namespaces (e.g. install-cni): runs anywhere
            item.add_marker(pytest.mark.integration)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def nss():
    n = Namespaces()
    try:
        yield n
    finally:
        n.cleanup()


@pytest.fixture
def cluster(nss, tmp_path):
    """A node namespace running vswitchd (no uplink); pods come from cluster.add_pod."""
    c = Cluster(nss, tmp_path)
    c.daemon.start()
    try:
        yield c
    finally:
        rc = c.daemon.stop()
        if rc not in (0, None, -9):
            print(c.daemon.logs())
