"""libcni (through tools/libcni-client, Go) on each CNI chain: ADD, CHECK, DEL with CAP_ARGS.

The client is built offline from Debian's golang-github-appc-cni-dev. On a namespace of
our own it runs ADD with capability args (portMappings and bandwidth) and CNI_ARGS, as a
runtime does; then the address is on the interface, an httpd in the namespace serves the
client namespace through node-IP:hostPort, the ingress rate holds, CHECK passes (libcni
hands the plugins the cached result) and fails, naming the address, once the address is
removed behind the chain's back (the reference chain's CHECK cannot pass at all: see
``known_check_failure`` in rt_chains), DEL removes everything (lease, host interfaces, rules, libcni's cache entry)
and a second DEL succeeds.
"""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess

import pytest

from rt_chains import REPO_ROOT, require_tools
from rt_net import WEB_PAGE, free_host_port, sh, stream_rate_bps, wait_tcp

pytestmark = pytest.mark.integration

RATE_BPS = 10_000_000
BURST_BITS = 800_000  # 100 kB: small, so the rate shows within a second


@pytest.fixture(scope="session")
def libcni_client(tmp_path_factory):
    require_tools("go")
    out = str(tmp_path_factory.mktemp("libcni") / "libcni-client")
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode", GOPROXY="off",
               GOFLAGS="", CGO_ENABLED="0")
    src = "/usr/share/gocode/src/github.com/containernetworking/cni/libcni"
    if not os.path.isdir(src):
        pytest.fail(f"{src} is missing: install the Debian package golang-github-appc-cni-dev "
                    "(scripts/setup-runtimes.sh)")
    res = subprocess.run(["go", "build", "-o", out, "./tools/libcni-client"], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"go build of tools/libcni-client failed:\n{res.stderr}"
    return out


class Netns:
    def __init__(self, name):
        self.name = name
        self.path = f"/run/netns/{name}"
        self.procs: list[subprocess.Popen] = []
        sh("ip", "netns", "add", name)

    def run_bg(self, *cmd: str) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *cmd],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def remove(self):
        for proc in self.procs:  # each in its own session: kill its children too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def netns(client_link):
    ns = Netns(f"vsrtl{client_link.suffix}")
    try:
        yield ns
    finally:
        ns.remove()


def test_add_check_del_with_capability_args(libcni_client, chain, client_link, netns,
                                            tmp_path):
    host_port = free_host_port()
    cache_dir = str(tmp_path / "cache")
    container_id = f"libcni-{client_link.suffix}"
    cap_args = {
        "portMappings": [{"hostPort": host_port, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": RATE_BPS, "ingressBurst": BURST_BITS,
                      "egressRate": RATE_BPS, "egressBurst": BURST_BITS},
    }

    def cni(op, check=True):
        cmd = [libcni_client, "-conflist", chain.conflist_path, "-bin-dir", chain.bin_dir,
               "-cache-dir", cache_dir, "-container-id", container_id, "-netns", netns.path,
               "-ifname", "eth0", "-cap-args", json.dumps(cap_args),
               "-args", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=libcni-pod",
               op]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
        if check:
            assert res.returncode == 0, f"libcni {op} failed: {res.stderr}"
        return res

    added = False
    try:
        result = json.loads(cni("add").stdout)
        added = True
        pod_ip = result["ips"][0]["address"].split("/")[0]
        assert ipaddress.ip_address(pod_ip) in chain.subnet, result
        host_ifnames = [i["name"] for i in result["interfaces"]
                        if not i.get("sandbox") and i["name"] not in chain.infra_ifnames]
        addrs = sh("ip", "-n", netns.name, "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert f"inet {pod_ip}/" in addrs, addrs

        www = tmp_path / "www"
        www.mkdir()
        (www / "index.html").write_text(WEB_PAGE + "\n")
        netns.run_bg("busybox", "httpd", "-f", "-p", "80", "-h", str(www))
        sink = netns.run_bg("busybox", "sh", "-c", "while true; do nc -l -p 5001 > /dev/null; done")
        wait_tcp(pod_ip, 80)
        # portMappings from CAP_ARGS: the client outside reaches the pod via the node.
        assert client_link.http_get(client_link.node_ip, host_port).strip() == WEB_PAGE
        # bandwidth from CAP_ARGS: the rate into the pod holds.
        sample = stream_rate_bps(pod_ip, 5001, "to", pod_pid=sink.pid, limit_bps=RATE_BPS)
        print(f"libcni ingressRate={RATE_BPS}: measured {sample}")
        assert 0.5 * RATE_BPS <= sample.rate_bps <= 1.10 * RATE_BPS, str(sample)

        checked = cni("check", check=False)
        if chain.known_check_failure:
            # Debian 12's portmap 1.1.1 fails CHECK on every IPv4-only pod (it looks for
            # an IPv6 DNAT chain it never made): containernetworking/plugins#819.
            assert checked.returncode != 0 and chain.known_check_failure in checked.stderr, \
                f"the reference CHECK changed behaviour: {checked.returncode} {checked.stderr}"
        else:
            assert checked.returncode == 0, f"CHECK right after ADD failed: {checked.stderr}"
            sh("ip", "-n", netns.name, "addr", "del", f"{pod_ip}/{chain.subnet.prefixlen}",
               "dev", "eth0")
            tampered = cni("check", check=False)
            assert tampered.returncode != 0, \
                "CHECK passed although the pod's address was removed behind its back"
            assert pod_ip in tampered.stderr, tampered.stderr

        live = chain.leftovers(pod_ip, host_ifnames)  # the detector sees a live pod
        assert any(pod_ip in p for p in live), live
        cni("del")
        added = False
        assert chain.leftovers(pod_ip, host_ifnames) == []
        cached = [n for n in os.listdir(os.path.join(cache_dir, "results"))
                  if container_id in n] if os.path.isdir(os.path.join(cache_dir, "results")) \
            else []
        assert cached == [], f"libcni cache entries left: {cached}"
        cni("del")  # DEL twice succeeds
    finally:
        if added:
            cni("del", check=False)
