"""containerd 1.6 through the CRI, as a kubelet drives it, on each CNI chain.

A private containerd (rt_containerd) uses the chain's bin and conf dirs. Our CRI client
(tools/cri) runs a "web" pod sandbox with a hostPort mapping and the bandwidth
annotations, and a busybox container serving HTTP on 80 (a page, and a sparse 2 GiB file
as the egress source) plus a discard sink on 5001 (the ingress sink); a second pod runs a sleeping busybox to ping from.
Then: the pod has an IP of the chain's subnet, the second pod pings it, the client
namespace gets the page through node-IP:hostPort, both directions hold the annotated rate
once the runtime's huge burst is spent, and StopPodSandbox then RemovePodSandbox (two CNI
DELs) leave no netns, IPAM lease, host interface or iptables rule behind.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pytest

from rt_chains import require_tools
from rt_containerd import IMAGE, Containerd, wait_for
from rt_net import WEB_PAGE, free_host_port, stream_rate_bps, wait_tcp
from tools.cri import PodSpec, PortMapping

pytestmark = pytest.mark.integration

RATE_BPS = 10_000_000            # the bandwidth annotations: "10M" (bit/s) each way
BANDWIDTH_ANNOTATIONS = {"kubernetes.io/ingress-bandwidth": "10M",
                         "kubernetes.io/egress-bandwidth": "10M"}
# /www/zero: a sparse 2 GiB file that httpd sends with sendfile (the egress source);
# port 5001 discards what it gets (the ingress sink).
WEB_SCRIPT = (f"echo '{WEB_PAGE}' > /www/index.html; truncate -s 2G /www/zero; "
              "(while true; do nc -l -p 5001 > /dev/null; done) & "
              "exec httpd -f -p 80 -h /www")


@dataclass
class Pod:
    id: str
    spec: PodSpec
    ip: str
    container_id: str
    netns: str
    pid: int                # the sandbox's process: /proc/PID/net is the pod's netns
    host_ifnames: list[str]


def run_pod(ctd: Containerd, chain, spec: PodSpec, command: list[str]) -> Pod:
    pod_id = ctd.cri.run_pod(spec)
    status, info = ctd.cri.pod_status(pod_id, verbose=True)
    assert ctd.cri.pb.PodSandboxState.Name(status.state) == "SANDBOX_READY", status
    details = info.get("info", {})
    netns = next((ns.get("path", "") for ns in details["runtimeSpec"]["linux"]["namespaces"]
                  if ns["type"] == "network"), "")
    cni_ifaces = (details.get("cniResult") or {}).get("Interfaces") or {}
    host_ifnames = [name for name, iface in cni_ifaces.items()
                    if not iface.get("Sandbox") and name not in chain.infra_ifnames]
    cid = ctd.cri.create_container(pod_id, spec, "main", IMAGE, command)
    ctd.cri.start_container(cid)
    wait_for(lambda: ctd.cri.container_state(cid) == "CONTAINER_RUNNING", 20,
             f"container of pod {spec.name} running")
    return Pod(pod_id, spec, status.network.ip, cid, netns, int(details["pid"]), host_ifnames)


def teardown_pod(ctd: Containerd, pod: Pod) -> None:
    for call in (ctd.cri.stop_pod, ctd.cri.remove_pod):
        try:
            call(pod.id)
        except Exception:  # the test already failed; containerd.stop() retries
            pass


@pytest.fixture(scope="module")
def ctd(chain, tmp_path_factory):
    require_tools("containerd", "ctr", "runc", "busybox", "iptables-save")
    base = str(tmp_path_factory.mktemp(f"containerd-{chain.name}"))
    runtime = Containerd(base, chain.bin_dir, chain.conf_dir)
    runtime.start()
    try:
        yield runtime
    finally:
        runtime.stop()


@pytest.fixture(scope="module")
def web_pod(ctd, chain):
    host_port = free_host_port()
    spec = PodSpec(name="web", port_mappings=[PortMapping(container_port=80,
                                                          host_port=host_port)],
                   annotations=dict(BANDWIDTH_ANNOTATIONS))
    pod = run_pod(ctd, chain, spec, ["/bin/sh", "-c", WEB_SCRIPT])
    try:
        wait_tcp(pod.ip, 80)
        yield pod
    finally:
        teardown_pod(ctd, pod)


@pytest.fixture(scope="module")
def pinger_pod(ctd, chain):
    pod = run_pod(ctd, chain, PodSpec(name="pinger"), ["/bin/sleep", "3600"])
    try:
        yield pod
    finally:
        teardown_pod(ctd, pod)


def test_pod_sandbox_gets_an_ip_of_the_chain(chain, web_pod):
    import ipaddress
    assert web_pod.ip, "PodSandboxStatus reported no IP"
    assert ipaddress.ip_address(web_pod.ip) in chain.subnet, (web_pod.ip, str(chain.subnet))
    assert os.path.exists(web_pod.netns), web_pod.netns


def test_second_pod_pings_the_first(ctd, web_pod, pinger_pod):
    assert pinger_pod.ip != web_pod.ip
    code, out, err = ctd.cri.exec_sync(pinger_pod.container_id,
                                       ["ping", "-c", "3", "-W", "2", web_pod.ip])
    assert code == 0, f"ping {web_pod.ip} from the pinger pod failed: {out!r} {err!r}"
    assert b" 0% packet loss" in out, out


def test_host_port_serves_a_client_outside_the_pod_network(client_link, web_pod):
    host_port = web_pod.spec.port_mappings[0].host_port
    body = client_link.http_get(client_link.node_ip, host_port)
    assert body.strip() == WEB_PAGE


@pytest.mark.parametrize("direction,port,annotation", [
    ("to", 5001, "kubernetes.io/ingress-bandwidth"),
    ("from", 80, "kubernetes.io/egress-bandwidth")],
    ids=["ingress", "egress"])
def test_bandwidth_annotation_holds_the_rate(web_pod, direction, port, annotation,
                                             record_property):
    assert web_pod.spec.annotations[annotation] == "10M"
    sample = stream_rate_bps(web_pod.ip, port, direction, pod_pid=web_pod.pid,
                             limit_bps=RATE_BPS,
                             request=b"GET /zero HTTP/1.0\r\n\r\n" if port == 80 else b"")
    record_property(f"{direction}_rate_bps", round(sample.rate_bps))
    print(f"{annotation}=10M: measured {sample}")
    # The shaper must not let more than the rate through (10% for TCP/IP and timer
    # slack), and traffic must still flow (a stalled shaper is no shaper).
    assert sample.rate_bps <= 1.10 * RATE_BPS, f"{annotation}=10M not held: {sample}"
    assert sample.rate_bps >= 0.50 * RATE_BPS, f"{annotation}=10M starves the pod: {sample}"


def test_stop_then_remove_leave_nothing_behind(ctd, chain, client_link):
    spec = PodSpec(name="ephemeral", port_mappings=[PortMapping(container_port=80,
                                                                host_port=free_host_port())],
                   annotations=dict(BANDWIDTH_ANNOTATIONS))
    pod = run_pod(ctd, chain, spec, ["/bin/sh", "-c", WEB_SCRIPT])
    try:
        wait_tcp(pod.ip, 80)
        assert client_link.http_get(client_link.node_ip,
                                    spec.port_mappings[0].host_port).strip() == WEB_PAGE
        assert pod.ip in chain.leased_ips()
        live = chain.leftovers(pod.ip, pod.host_ifnames)  # the detector sees a live pod
        assert any(pod.ip in p for p in live), live
        if chain.name == "reference":  # the bridge plugin's veth and bandwidth's ifb
            assert len(pod.host_ifnames) == 2, pod.host_ifnames

        ctd.cri.stop_pod(pod.id)
        assert not os.path.exists(pod.netns), f"netns {pod.netns} survives StopPodSandbox"
        assert chain.leftovers(pod.ip, pod.host_ifnames) == []

        ctd.cri.remove_pod(pod.id)
        assert not os.path.exists(pod.netns)
        assert chain.leftovers(pod.ip, pod.host_ifnames) == []
        assert pod.id not in [p.id for p in ctd.cri.list_pods()]
        teardowns = re.findall(rf'TearDown network for sandbox \\"{pod.id}\\" successfully',
                               open(ctd.log_path).read())
        assert len(teardowns) >= 2, ("expected a CNI DEL from StopPodSandbox and another "
                                     f"from RemovePodSandbox, containerd logged {teardowns}")
    finally:
        teardown_pod(ctd, pod)
