"""Fixtures of the simulation tests: every test runs with both datapaths (``dp_impl``)."""
import pytest

from vswitch.sim import Simulation


@pytest.fixture
def make_sim(dp_impl):
    """make_sim(**kw) -> a Simulation on the implementation of this test's parameter."""
    def make(**kw):
        kw.setdefault("seed", 0)
        return Simulation(impl=dp_impl, **kw)
    return make


@pytest.fixture
def sim(make_sim):
    """Two pods a, b; an external client 192.0.2.10; node address 192.0.2.1."""
    s = make_sim(subnet="10.0.0.0/24", node_ips=["192.0.2.1"])
    s.add_pod("a")
    s.add_pod("b")
    s.add_external("client", ip="192.0.2.10")
    return s
