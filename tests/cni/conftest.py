"""Fixtures of the CNI conformance suite (see cnitest.py for the helpers)."""
import contextlib
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cnitest import (Netns, Node, Runner, host_local_missing, install_plugin,  # noqa: E402
                     skip_reason, uid)


@pytest.fixture(scope="session")
def plugin_bin(tmp_path_factory):
    """A CNI bin dir holding the installed ``vswitch`` launcher."""
    bin_dir = tmp_path_factory.mktemp("cni") / "bin"
    install_plugin(bin_dir)
    return bin_dir


@pytest.fixture
def runner(plugin_bin):
    reason = host_local_missing()
    if reason:
        pytest.fail(reason)
    return Runner(plugin_bin)


@pytest.fixture
def hl_dir(tmp_path):
    """host-local's data dir for this test."""
    return tmp_path / "host-local"


@pytest.fixture
def net_name():
    return f"t{uid()}"


@pytest.fixture
def subnet():
    return f"10.{random.randrange(16, 250)}.{random.randrange(0, 250)}.0/24"


def _skip_without_kernel():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def _running_node(workdir):
    """A started Node in a namespace of its own; both removed in every outcome."""
    _skip_without_kernel()
    with Netns() as nets:
        n = Node(workdir, nets)
        try:
            n.start()
            yield n
        finally:
            n.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """vswitchd in its own node namespace, shared by the tests of one module."""
    with _running_node(tmp_path_factory.mktemp("node")) as n:
        yield n


@pytest.fixture
def fresh_node(tmp_path):
    """A node of this test alone (for tests that stop or restart the daemon)."""
    with _running_node(tmp_path / "node") as n:
        yield n


@pytest.fixture
def pods():
    """Pod namespaces of this test, removed in every outcome."""
    _skip_without_kernel()
    with Netns() as nets:
        yield nets
