"""Fixtures of the real-runtime tests (issue 5, acceptance 2): chains, node, client link.

Theory of operation: every test here runs a real container runtime (containerd through
the CRI, podman, a libcni client) against a CNI plugin chain, parametrized by
``chain_name``: ``reference`` (Debian's plugins: bridge + host-local + portmap +
bandwidth) and ``vswitch`` (our daemon and plugin, started from the repository). The
vswitch chain is skipped, naming the missing files, until ``vswitch/daemon/main.py``,
``vswitch/cli.py`` and ``cni/plugin.py`` exist; after that it runs and must pass.
``VSWITCH_RT_CHAINS=reference`` (comma-separated) limits the chains.

The only skip for the rest is a missing root (everything here needs it). A missing
runtime binary is a failure naming the package: scripts/setup-runtimes.sh installs them.

Fixtures are module-scoped per chain: one client link, one chain (daemon included) and
one runtime per test module and chain, removed in every outcome.
"""
from __future__ import annotations

import os

import pytest

from rt_chains import CHAIN_NAMES, make_chain, vswitch_unavailable
from rt_net import ClientLink
from vswitch.lab import uid


def _selected_chains():
    raw = os.environ.get("VSWITCH_RT_CHAINS", "")
    names = [n.strip() for n in raw.split(",") if n.strip()] or list(CHAIN_NAMES)
    unknown = [n for n in names if n not in CHAIN_NAMES]
    if unknown:
        raise pytest.UsageError(f"VSWITCH_RT_CHAINS names unknown chains {unknown}; "
                                f"known: {', '.join(CHAIN_NAMES)}")
    return names


@pytest.fixture(scope="session", autouse=True)
def _needs_root():
    if os.geteuid() != 0:
        pytest.skip("runtime tests need root: they start containerd and podman, create "
                    "network namespaces, bridges and iptables rules")


@pytest.fixture(scope="module", params=_selected_chains())
def chain_name(request):
    if request.param == "vswitch":
        reason = vswitch_unavailable()
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def client_link():
    """A client namespace joined to the node by a veth pair (the hostPort client)."""
    link = ClientLink(uid()).create()
    try:
        yield link
    finally:
        link.remove()


@pytest.fixture(scope="module")
def chain(chain_name, client_link, tmp_path_factory):
    """The started chain; the vswitch one takes the client link's node end as uplink."""
    base = str(tmp_path_factory.mktemp(f"chain-{chain_name}"))
    ch = make_chain(chain_name, base, client_link.suffix, uplink=client_link.node_ifname)
    try:
        ch.start()
        yield ch
    finally:
        ch.stop()
