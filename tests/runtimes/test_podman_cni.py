"""podman 4.3 with ``network_backend = "cni"`` on each CNI chain, containers from --rootfs.

A private podman (rt_podman) runs two busybox containers on the chain's network: "web"
(httpd on 80, published with ``-p HOSTPORT:80``) and "pinger". They ping each other, the
client namespace gets web's page through node-IP:hostPort, and after ``podman rm -f`` the
chain holds no lease, host interface, netns or iptables rule of either container.
"""
from __future__ import annotations

import os

import pytest

from rt_chains import require_tools
from rt_net import WEB_PAGE, free_host_port, wait_tcp
from rt_podman import Podman

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def podman(chain, tmp_path_factory):
    require_tools("podman", "runc", "busybox", "iptables-save")
    pm = Podman(str(tmp_path_factory.mktemp(f"podman-{chain.name}")), chain.bin_dir,
                chain.conf_dir, chain.network_name)
    try:
        yield pm
    finally:
        pm.close()


@pytest.fixture(scope="module")
def containers(podman):
    host_port = free_host_port()
    podman.run_detached("web", ["/bin/sh", "-c", f"echo '{WEB_PAGE}' > /www/index.html; "
                                                 "exec httpd -f -p 80 -h /www"],
                        publish=[f"{host_port}:80"])
    podman.run_detached("pinger", ["/bin/sleep", "3600"])
    web_ip, pinger_ip = podman.ip("web"), podman.ip("pinger")
    wait_tcp(web_ip, 80)
    return {"host_port": host_port, "web_ip": web_ip, "pinger_ip": pinger_ip,
            "netns": [podman.netns_path("web"), podman.netns_path("pinger")]}


def test_containers_get_ips_of_the_chain_and_ping_each_other(podman, chain, containers):
    import ipaddress
    for key in ("web_ip", "pinger_ip"):
        assert ipaddress.ip_address(containers[key]) in chain.subnet, (containers, chain.subnet)
    for src, dst in (("pinger", "web_ip"), ("web", "pinger_ip")):
        out = podman("exec", src, "ping", "-c", "3", "-W", "2", containers[dst])
        assert " 0% packet loss" in out, (src, out)


def test_published_host_port_serves_a_client_outside(client_link, containers):
    body = client_link.http_get(client_link.node_ip, containers["host_port"])
    assert body.strip() == WEB_PAGE


def test_rm_leaves_nothing_behind(podman, chain, containers):
    ips = [containers["web_ip"], containers["pinger_ip"]]
    assert set(ips) <= chain.leased_ips()
    podman.remove_all()
    assert podman("ps", "-a", "-q").strip() == ""
    for netns in containers["netns"]:
        assert not netns or not os.path.exists(netns), f"netns {netns} survives podman rm"
    for ip in ips:
        assert chain.leftovers(ip, []) == []
    assert chain.pod_links() == [], "pod interfaces left on the node"
