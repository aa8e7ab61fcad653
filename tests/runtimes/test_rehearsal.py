"""The Kubernetes rehearsal (issue 15.5): the image run with podman exactly as
deploy/20-daemonset.yaml says, pods through containerd's CRI, a rolling upgrade, a crash
that gives the NIC back, and an uninstall that leaves nothing.

Theory of operation: a node is a network namespace ``N`` made here, whose NIC (one end of
a veth) leads to a client namespace ``C`` running etcd (the cluster's store). The
DaemonSet's containers become ``podman run``s (``podman_argv``): the pod's host network is
``--network ns:/run/netns/N``; each hostPath volume is mounted at its mountPath with its
propagation (HostToContainer: rslave) and readOnly; the securityContext becomes flags
(privileged, capability drops, read-only root, no-new-privileges, user), anything else in
it fails the test; env is resolved from the ConfigMap and ``$(VAR)`` expanded as the
kubelet does (tests/deploy/k8s_manifests.py). The ConfigMap's values are the node's
(uplink: N's NIC, etcd: C's address). The node's files are kept apart from this machine's:
/opt/cni/bin, /etc/cni/net.d and /var/lib/vswitch live under a temporary node root
(the CNI dirs also hold Debian's reference plugins, as a node's would: the network list
delegates IPAM to host-local), /usr is the machine's (read-only), and /run/netns and
/run/vswitch are the machine's own paths, as the plugin on the node and containerd use them.

A private containerd (tests/runtimes/rt_containerd.py, with pod network namespaces under
/run/netns as on a node) uses the node's CNI dirs; pods get addresses of the node's leased
subnet, ping each other, and a client in C reaches a hostPort on the node's address.

The upgrade: a second image tag (the same build, relabelled: a different image the
runtime must switch to) replaces the container as a rolling update does: the old one gets
SIGTERM with the grace period (``podman stop -t``), the new pod's init container runs,
then the new vswitchd. Pings every 5 ms pod to pod and from the node's own address (on
vsw0 while vswitchd runs) to C measure the outage (the longest gap between replies).
Then vswitchd is killed with SIGKILL: the entry point gives the NIC its addresses back
(the node answers from its NIC), the container exits 137 and is started again (as the
kubelet restarts it): the pods are re-adopted. Then the uninstall: pods removed, the
DaemonSet's container stopped, ``vswitchctl uninstall-cni`` run from the image with the
init container's mounts; nothing is left (files, links, addresses, nft tables, netns).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest

import rt_containerd
from rt_chains import REFERENCE_BIN_DIR, require_tools
from rt_containerd import IMAGE, Containerd, wait_for
from rt_net import WEB_PAGE, free_host_port
from tools.cri import PodSpec, PortMapping
from vswitch import lab, rpc
from vswitch.lab.etcdns import NsEtcd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy"))
import k8s_manifests as km  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = km.REPO
NODE_NAME = "rehearsal-node"
PING_INTERVAL_S = 0.005
# podman's default limits (1048576) need CAP_SYS_RESOURCE, which this machine lacks
ULIMITS = ["--ulimit", "nofile=%d:%d" % ((min(os.sysconf("SC_OPEN_MAX"), 1048576),) * 2),
           "--ulimit", "nproc=4096:4096"]
# hostPaths kept under the test's node root (the machine's own must not change); the
# others are used as they are
NODE_ROOT_PATHS = ("/opt/cni/bin", "/etc/cni/net.d", "/var/lib/vswitch")


def sh(*args, check=True, timeout=120):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check, timeout=timeout)


def build_image() -> str:
    res = subprocess.run([os.path.join(REPO, "scripts/build-image.sh")], capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, f"scripts/build-image.sh failed:\n{res.stderr[-3000:]}"
    return res.stdout.strip().splitlines()[-1]


def podman_argv(ds: dict, c: dict, env: dict, node_ns: str, node_root: str, image: str, name: str) -> list[str]:
    """``podman run`` of DaemonSet container ``c`` as the kubelet would start it."""
    spec = km.pod_spec(ds)
    argv = ["podman", "run", "--name", name, *ULIMITS]
    assert spec["hostNetwork"] is True
    argv += ["--network", f"ns:/run/netns/{node_ns}"]
    sc = dict(c.get("securityContext", {}))
    if sc.pop("privileged", False):
        argv.append("--privileged")
    caps = sc.pop("capabilities", {})
    for cap in caps.get("drop", []):
        argv += ["--cap-drop", cap]
    for cap in caps.get("add", []):
        argv += ["--cap-add", cap]
    if sc.pop("readOnlyRootFilesystem", False):
        argv.append("--read-only")
    if sc.pop("allowPrivilegeEscalation", True) is False:
        argv += ["--security-opt", "no-new-privileges"]
    if "runAsUser" in sc:
        argv += ["--user", str(sc.pop("runAsUser"))]
    assert not sc, f"securityContext keys the rehearsal does not translate: {sorted(sc)}"
    for m in km.host_mounts(ds, c):
        host = m["host_path"]
        if host in NODE_ROOT_PATHS:
            host = os.path.join(node_root, host.lstrip("/"))
        os.makedirs(host, exist_ok=True)            # DirectoryOrCreate
        opts = [o for o, on in (("ro", m["read_only"]),
                                ("rslave", m["propagation"] == "HostToContainer"),
                                ("rshared", m["propagation"] == "Bidirectional")) if on]
        argv += ["-v", f"{host}:{m['mount_path']}" + (":" + ",".join(opts) if opts else "")]
    for k, v in env.items():
        argv += ["--env", f"{k}={v}"]
    words = km.expand(c.get("command", []) + c.get("args", []), env)
    if "command" in c:
        argv += ["--entrypoint", words[0], image, *words[1:]]
    else:
        argv += [image, *words]
    return argv


class Pinger:
    """``ping -D`` every 5 ms in a namespace; ``stop()`` gives the longest gap between replies."""

    def __init__(self, netns_path: str, target: str):
        self.proc = subprocess.Popen(["nsenter", f"--net={netns_path}", "ping", "-D", "-n", "-i",
                                      str(PING_INTERVAL_S), "-W", "1", target],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> tuple[float, int]:
        """(longest gap between two replies in ms, replies)."""
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=30)
        stamps = [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        return (max(gaps) * 1000 if gaps else float("inf")), len(stamps)


class Node:
    """Namespaces N and C, the veth between them, etcd in C, the node root, the containers."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.suffix = lab.uid()
        self.ns = f"vsrhn{self.suffix}"
        self.client_ns = f"vsrhc{self.suffix}"
        self.nic = f"vsrhe{self.suffix}"[:15]
        code = int(self.suffix, 16) % 250 + 2 if re.fullmatch(r"[0-9a-f]+", self.suffix) else 77
        self.node_ip, self.client_ip = f"198.19.{code}.1", f"198.19.{code}.2"
        self.node_root = os.path.join(tmp, "node-root")
        self.containers: list[str] = []
        self.etcd = None

    def create(self):
        sh("ip", "netns", "add", self.ns)
        sh("ip", "netns", "add", self.client_ns)
        lab.veth(self.ns, self.nic, f"{self.node_ip}/24", self.client_ns, "eth0", f"{self.client_ip}/24")
        for ns in (self.ns, self.client_ns):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # a gateway route, as a node has one (the uplink moves it and gives it back)
        sh("ip", "-n", self.ns, "route", "add", "default", "via", self.client_ip)
        self.etcd = NsEtcd(self.client_ns, self.client_ip, workdir=os.path.join(self.tmp, "etcd"))
        self.etcd.start(timeout_s=30)
        os.makedirs(os.path.join(self.node_root, "opt/cni/bin"))
        for name in os.listdir(REFERENCE_BIN_DIR):       # the node's reference plugins
            os.symlink(os.path.join(REFERENCE_BIN_DIR, name), os.path.join(self.node_root, "opt/cni/bin", name))
        return self

    def addresses(self, dev: str) -> list[str]:
        out = json.loads(sh("ip", "-n", self.ns, "-j", "-4", "addr", "show", "dev", dev, check=False).stdout or "[]")
        return sorted(f"{a['local']}/{a['prefixlen']}" for i in out for a in i.get("addr_info", []))

    def routes(self) -> str:
        return sh("ip", "-n", self.ns, "-4", "route", "show").stdout

    def links(self) -> list[str]:
        return sorted(i["ifname"] for i in json.loads(sh("ip", "-n", self.ns, "-j", "link").stdout))

    def nft_tables(self) -> str:
        return sh("ip", "netns", "exec", self.ns, "nft", "list", "tables", check=False).stdout.strip()

    def http_ok(self, port: int, path: str) -> bool:
        """The readiness probe: GET http://127.0.0.1:PORT/PATH from the node's namespace."""
        r = sh("ip", "netns", "exec", self.ns, "curl", "-sf", "-m", "2", f"http://127.0.0.1:{port}{path}",
               check=False, timeout=20)
        return r.returncode == 0

    def destroy(self):
        for name in reversed(self.containers):
            sh("podman", "rm", "-f", "-t", "5", name, check=False)
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd.cleanup()
        sh("ip", "netns", "del", self.client_ns, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


def test_rehearsal(tmp_path, record_property):
    require_tools("containerd", "ctr", "runc", "busybox", "podman", "buildah", "mmdebstrap", "nsenter", "curl")
    docs = km.load()
    ds, cm = docs["DaemonSet"], docs["ConfigMap"]
    image = build_image()
    image_next = image + "-next"
    # the upgrade's image: the same build under another tag with another label, so the
    # runtime starts a different image (built once per commit, not twice)
    ctr = sh("buildah", "from", image).stdout.strip()
    sh("buildah", "config", "--label", "vswitch.rehearsal=next", ctr)
    sh("buildah", "commit", "-q", "--rm", ctr, image_next)

    node = Node(str(tmp_path))
    ctd = None
    pods = []
    try:
        node.create()
        configmap = json.loads(json.dumps(cm))
        configmap["data"].update({"uplink": node.nic, "etcd-endpoints": node.etcd.url})
        init_c, daemon_c = km.container(ds, "install-cni"), km.container(ds, "vswitchd")
        init_env, daemon_env = (km.env_of(c, configmap, NODE_NAME) for c in (init_c, daemon_c))
        daemon_args = km.expand(daemon_c["args"], daemon_env)
        socket_path = km.option(daemon_args, "--socket")
        metrics = daemon_c["readinessProbe"]["httpGet"]
        metrics_port = {p["name"]: p["containerPort"] for p in daemon_c["ports"]}.get(metrics["port"], metrics["port"])
        grace_s = km.pod_spec(ds)["terminationGracePeriodSeconds"]
        addrs_before, routes_before = node.addresses(node.nic), node.routes()
        links_before = node.links()

        def run_pod_sandbox(tag: str, gen: int) -> str:
            """The DaemonSet's pod on the node: the init container, then vswitchd."""
            init = f"vsrh-init-{node.suffix}-{gen}"
            node.containers.append(init)
            res = sh(*podman_argv(ds, init_c, init_env, node.ns, node.node_root, tag, init), check=False)
            assert res.returncode == 0, f"install-cni failed: {res.stdout}{res.stderr}"
            name = f"vsrh-vswitchd-{node.suffix}-{gen}"
            node.containers.append(name)
            argv = podman_argv(ds, daemon_c, daemon_env, node.ns, node.node_root, tag, name)
            argv.insert(2, "-d")
            sh(*argv)
            return name

        def wait_ready(name: str, timeout_s: float = 60) -> None:
            def ready():
                state = sh("podman", "inspect", "-f", "{{.State.Status}}", name, check=False).stdout.strip()
                assert state == "running", f"{name} is {state}:\n" + sh("podman", "logs", name, check=False).stderr[-3000:]
                return node.http_ok(metrics_port, metrics["path"])
            wait_for(ready, timeout_s, f"{name} ready (GET {metrics['path']} on 127.0.0.1:{metrics_port})", 0.05)

        # -- install: the DaemonSet's pod starts on the node -----------------------------
        gen = 1
        daemon = run_pod_sandbox(image, gen)
        wait_ready(daemon)
        conf_dir = os.path.join(node.node_root, "etc/cni/net.d")
        bin_dir = os.path.join(node.node_root, "opt/cni/bin")
        conflists = sorted(n for n in os.listdir(conf_dir) if n.endswith(".conflist"))
        assert len(conflists) == 1, conflists
        # cluster mode: the node leased a subnet of the cluster CIDR from etcd
        # (ready means serving; the lease may take a moment longer: a CNI ADD before it gets
        # code 11 and the runtime retries)
        leased = wait_for(lambda: rpc.call(socket_path, "status")["cluster"]["pod_cidrs"], 30, "a leased subnet")
        subnets = [ipaddress.ip_network(s) for s in leased]
        cluster_cidr = ipaddress.ip_network(configmap["data"]["cluster-cidr"])
        assert subnets and all(s.subnet_of(cluster_cidr) for s in subnets), subnets
        assert node.addresses("vsw0") and node.node_ip + "/24" in node.addresses("vsw0"), node.addresses("vsw0")

        # -- pods through containerd's CRI with the installed network list ---------------
        cfg = rt_containerd._CONFIG.replace("netns_mounts_under_state_dir = true",
                                            "netns_mounts_under_state_dir = false")
        with mock.patch.object(rt_containerd, "_CONFIG", cfg):
            ctd = Containerd(os.path.join(str(tmp_path), "containerd"), bin_dir, conf_dir).start()
        host_port = free_host_port()
        web_spec = PodSpec(name="web", port_mappings=[PortMapping(container_port=80, host_port=host_port)])
        web = _run_pod(ctd, web_spec, ["/bin/sh", "-c", f"echo '{WEB_PAGE}' > /www/index.html; "
                                                        "exec httpd -f -p 80 -h /www"])
        pods.append(web)
        pinger = _run_pod(ctd, PodSpec(name="pinger"), ["/bin/sleep", "3600"])
        pods.append(pinger)
        for p in (web, pinger):
            assert any(ipaddress.ip_address(p["ip"]) in s for s in subnets), (p, subnets)
        code, out, err = ctd.cri.exec_sync(pinger["cid"], ["ping", "-c", "3", "-W", "2", web["ip"]])
        assert code == 0 and b" 0% packet loss" in out, (out, err)
        wait_tcp_in(node.client_ns, node.node_ip, host_port)
        assert _http_get(node.client_ns, node.node_ip, host_port).strip() == WEB_PAGE

        # -- the upgrade: a rolling update replaces the container ------------------------
        pod_ping = Pinger(pinger["netns"], web["ip"])
        node_ping = Pinger(f"/run/netns/{node.ns}", node.client_ip)
        time.sleep(1.0)
        t0 = time.monotonic()
        sh("podman", "stop", "-t", grace_s, daemon, timeout=grace_s + 60)
        stopped_s = time.monotonic() - t0
        assert sh("podman", "inspect", "-f", "{{.State.ExitCode}}", daemon).stdout.strip() == "0"
        # the old vswitchd gave the NIC back on SIGTERM
        assert node.node_ip + "/24" in node.addresses(node.nic)
        gen += 1
        daemon = run_pod_sandbox(image_next, gen)
        wait_ready(daemon)
        ready_s = time.monotonic() - t0
        wait_for(lambda: _pings(pinger["netns"], web["ip"]), 20, "pod-to-pod pings after the upgrade")
        time.sleep(1.0)
        pod_gap_ms, pod_replies = pod_ping.stop()
        node_gap_ms, node_replies = node_ping.stop()
        record_property("upgrade_pod_outage_ms", round(pod_gap_ms, 1))
        record_property("upgrade_node_outage_ms", round(node_gap_ms, 1))
        print(f"upgrade: old stopped in {stopped_s * 1000:.0f} ms, new ready after {ready_s * 1000:.0f} ms; "
              f"outage pod-to-pod {pod_gap_ms:.0f} ms ({pod_replies} replies), node {node_gap_ms:.0f} ms "
              f"({node_replies} replies)")
        listed = rpc.call(socket_path, "list")
        assert len(listed.get("attachments", [])) == 2, listed       # both re-adopted
        assert pod_gap_ms < 30_000 and node_gap_ms < 30_000
        assert _http_get(node.client_ns, node.node_ip, host_port).strip() == WEB_PAGE
        assert sh("podman", "inspect", "-f", "{{.ImageName}}", daemon).stdout.strip().endswith(image_next.split("/")[-1])

        # -- a vswitchd that dies gives the NIC its addresses back ------------------------
        pid = int(sh("podman", "inspect", "-f", "{{.State.Pid}}", daemon).stdout)
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGKILL)         # vswitchd, started by our container
        exit_code = sh("podman", "wait", daemon, timeout=60).stdout.strip()
        assert exit_code == "137", exit_code
        assert node.node_ip + "/24" in node.addresses(node.nic), node.addresses(node.nic)
        assert node.node_ip + "/24" not in node.addresses("vsw0")
        assert "default via " + node.client_ip in node.routes()
        assert lab.ping(node.ns, node.client_ip, count=2)["received"] == 2     # the node is reachable
        logs = sh("podman", "logs", daemon).stderr
        assert "uplink_given_back" in logs, logs[-2000:]
        # the kubelet restarts the container: the pods are re-adopted
        sh("podman", "start", daemon)
        wait_ready(daemon)
        wait_for(lambda: _pings(pinger["netns"], web["ip"]), 20, "pod-to-pod pings after the restart")
        assert node.node_ip + "/24" in node.addresses("vsw0")

        # -- uninstall -------------------------------------------------------------------
        for p in pods:
            ctd.cri.stop_pod(p["id"])
            ctd.cri.remove_pod(p["id"])
        pods.clear()
        assert rpc.call(socket_path, "list").get("attachments") == []
        sh("podman", "stop", "-t", grace_s, daemon, timeout=grace_s + 60)
        un = f"vsrh-uninstall-{node.suffix}"
        node.containers.append(un)
        uninstall = dict(init_c, command=["vswitchctl", "uninstall-cni", "--bin-dir", "/host/opt/cni/bin",
                                          "--conf-dir", "/host/etc/cni/net.d"])
        res = sh(*podman_argv(ds, uninstall, init_env, node.ns, node.node_root, image, un), check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        ctd.stop()
        ctd = None
        for name in list(node.containers):
            sh("podman", "rm", "-f", name)
            node.containers.remove(name)
        # nothing left
        assert os.listdir(conf_dir) == []
        assert sorted(os.listdir(bin_dir)) == sorted(os.listdir(REFERENCE_BIN_DIR))
        assert os.listdir(os.path.join(node.node_root, "var/lib/vswitch")) == []
        assert not os.path.exists(socket_path)
        assert node.links() == links_before
        assert node.addresses(node.nic) == addrs_before
        assert node.routes() == routes_before
        assert "vswitch" not in node.nft_tables()
        # the pods' namespaces are gone (other tests may add their own meanwhile)
        assert [p["netns"] for p in (web, pinger) if os.path.exists(p["netns"])] == []
        assert sh("podman", "ps", "-a", "-q", "--filter", f"name=vsrh-.*{node.suffix}").stdout.strip() == ""
    finally:
        if ctd is not None:
            ctd.stop()
        node.destroy()
        sh("buildah", "rmi", image_next, check=False)


def _run_pod(ctd: Containerd, spec: PodSpec, command: list[str]) -> dict:
    pod_id = ctd.cri.run_pod(spec)
    status, info = ctd.cri.pod_status(pod_id, verbose=True)
    details = info.get("info", {})
    netns = next(ns.get("path", "") for ns in details["runtimeSpec"]["linux"]["namespaces"]
                 if ns["type"] == "network")
    cid = ctd.cri.create_container(pod_id, spec, "main", IMAGE, command)
    ctd.cri.start_container(cid)
    wait_for(lambda: ctd.cri.container_state(cid) == "CONTAINER_RUNNING", 20, f"pod {spec.name} running")
    return {"id": pod_id, "cid": cid, "ip": status.network.ip, "netns": netns}


def _pings(netns: str, ip: str) -> bool:
    return subprocess.run(["nsenter", f"--net={netns}", "ping", "-c", "1", "-W", "1", ip],
                          capture_output=True).returncode == 0


def wait_tcp_in(ns: str, host: str, port: int, timeout_s: float = 20) -> None:
    code = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2).close()"
    wait_for(lambda: subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, host, str(port)],
                                    capture_output=True).returncode == 0, timeout_s, f"{host}:{port} from {ns}", 0.2)


def _http_get(ns: str, host: str, port: int) -> str:
    code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            "f'http://{sys.argv[1]}:{sys.argv[2]}/', timeout=10).read().decode())")
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, host, str(port)],
                          capture_output=True, text=True, check=True, timeout=30).stdout
