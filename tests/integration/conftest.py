"""Fixtures of the daemon's integration tests: namespaces and a vswitchd per test.

Every test using the namespace fixtures is marked ``integration`` and skipped (with the
reason) only where root or /dev/net/tun is missing. Namespaces and the daemon are removed in every outcome.
"""
import pytest

from tests.integration.helpers import NS_PREFIX, Namespaces, running_cluster, skip_reason


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
    with Namespaces(NS_PREFIX) as n:
        yield n


@pytest.fixture
def cluster(nss, tmp_path):
    """A node namespace running vswitchd (no uplink); pods come from cluster.add_pod."""
    with running_cluster(nss, tmp_path) as c:
        yield c
