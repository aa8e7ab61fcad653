"""The demo: three pods talking through vswitch, then pods on a cluster of nodes, printed as tables.

As root (``python -m vswitch.lab.demo``): a private node namespace runs vswitchd with an uplink
veth to a client namespace; three pods (network namespaces) are added through the real
CNI plugin exactly as a container runtime adds them (the ``vswitch`` executable, CNI_*
variables, the network list on stdin, host-local IPAM from Debian's
containernetworking-plugins); then it pings between pods, reaches a pod's hostPort from
the client through the node address, and measures the shaped pod's rate with iperf3
against its setting. Everything is deleted again (CNI DEL, daemon SIGTERM, namespaces).

Then the cluster (``--nodes N``, default 3; 0 leaves it out): an underlay bridge with a
real etcd member on it (Debian's etcd-server), N node namespaces each running vswitchd in
cluster mode with ``--uplink eth0`` (``lab.etcdns.MemberCluster(etcd_members=1)``): every
daemon leases its own pod subnet from etcd and learns the others from it (no peer
files); on each node one pod is ADDed through the CNI plugin with ``"subnet":
"usePodCidr"`` and a hostPort. It pings every pod from every pod on another node, fetches
over TCP (HTTP) from each pod the pod of the next node, and from a host on the underlay
fetches each node's hostPort, answered by that node's own pod (the body names it).

Without root, or with ``--sim``, the same scenario runs in the in-process simulation
(vswitch.sim: the same Switch and Datapath on a virtual clock), and the output says so.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SUBNET = "10.77.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"  # the cluster part: each node leases a /24 of it
NODE_IP = "198.18.0.2"         # RFC 2544 benchmarking range: never routed anywhere
CLIENT_IP = "198.18.0.10"
HOST_PORT, CONTAINER_PORT = 8080, 80
SHAPED_RATE_BPS = 20_000_000
SHAPED_BURST_BITS = 1_000_000


def table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------ real pods, as root

def run_real(seconds: float) -> list[tuple[str, str, str]]:
    from vswitch_cni.install import conflist, install
    from vswitch import lab

    for tool in ("iperf3", "ping"):
        if shutil.which(tool) is None:
            raise SystemExit(f"demo: {tool} is missing (apt-get install -y iperf3 iputils-ping)")
    if not os.access(f"{lab.SYSTEM_CNI_PATH}/host-local", os.X_OK):
        raise SystemExit("demo: host-local IPAM is missing (apt-get install -y containernetworking-plugins)")

    rows = [("check", "result", "detail")]
    work = Path(tempfile.mkdtemp(prefix="vswitch-demo-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        nss = stack.enter_context(lab.Namespaces("vsdemo"))
        node, client = nss.new("node"), nss.new("client")
        lab.veth(node, "eth0", f"{NODE_IP}/24", client, "eth0", f"{CLIENT_IP}/24")
        daemon = lab.Daemon(node, work / "node", ["--uplink", "eth0"])
        daemon.start()
        stack.callback(daemon.stop)

        bin_dir, conf_dir = work / "bin", work / "net.d"
        install(str(bin_dir), str(conf_dir), socket_path=daemon.socket, subnet=SUBNET)
        conf = conflist(subnet=SUBNET, socket_path=daemon.socket, name="vswitch-demo")
        conf["plugins"][0]["ipam"]["dataDir"] = str(work / "ipam")
        chain = lab.CniChain(conf, cni_path=[bin_dir, lab.SYSTEM_CNI_PATH])

        specs = {
            "web": {"portMappings": [{"hostPort": HOST_PORT, "containerPort": CONTAINER_PORT,
                                      "protocol": "tcp"}]},
            "peer": {},
            "shaped": {"bandwidth": {"egressRate": SHAPED_RATE_BPS, "egressBurst": SHAPED_BURST_BITS,
                                     "ingressRate": SHAPED_RATE_BPS, "ingressBurst": SHAPED_BURST_BITS}},
        }
        pods = {}
        for name, rc in specs.items():
            ns = nss.new(name)
            cid = f"demo-{name}-{lab.uid()}"
            t0 = time.perf_counter()
            result = chain.add(cid, nss.path(ns), "eth0", runtime_config=rc)
            add_ms = (time.perf_counter() - t0) * 1e3
            ip = result["ips"][0]["address"].split("/")[0]
            pods[name] = (ns, cid, ip, rc)
            stack.callback(chain.delete, cid, nss.path(ns), "eth0", rc, result)
            rows.append((f"pod {name}", ip, f"CNI ADD {add_ms:.0f} ms" + (", " + ", ".join(rc) if rc else "")))

        p = lab.ping(pods["peer"][0], pods["web"][2], count=3)
        rows.append(("ping peer -> web", f"{p['received']}/{p['sent']}",
                     f"avg rtt {p['rtt_avg_ms']} ms" if p["rtt_avg_ms"] is not None else "no reply"))
        p = lab.ping(pods["web"][0], "10.77.0.1", count=2)
        rows.append(("ping web -> gateway", f"{p['received']}/{p['sent']}", "vsw0 in the node namespace"))

        server = lab.nspopen(pods["web"][0], sys.executable, "-m", "http.server", CONTAINER_PORT,
                             "--bind", "0.0.0.0", stdout=subprocess_devnull(), stderr=subprocess_devnull())
        stack.callback(server.wait, 10)
        stack.callback(server.kill)
        lab.wait_listening(pods["web"][0], CONTAINER_PORT)
        fetch = lab.nsexec(client, sys.executable, "-c",
                           "import urllib.request as u; r = u.urlopen('http://%s:%d/', timeout=5); "
                           "print(r.status, len(r.read()))" % (NODE_IP, HOST_PORT), check=False)
        rules = node_firewall_rules(node)
        rows.append((f"client -> {NODE_IP}:{HOST_PORT}", "HTTP " + (fetch.stdout.split() or ["failed"])[0],
                     f"DNAT to web {pods['web'][2]}:{CONTAINER_PORT} in the switch; "
                     f"node iptables/nft rules: {rules}"))

        res = lab.iperf3(pods["peer"][0], pods["peer"][2], pods["shaped"][0], seconds=seconds, omit_s=1)
        got = lab.received_bps(res)
        rows.append(("shaped egress", f"{got / 1e6:.2f} Mbit/s",
                     f"set {SHAPED_RATE_BPS / 1e6:.0f} Mbit/s: {got / SHAPED_RATE_BPS:.3f} of the rate"))
        res = lab.iperf3(pods["shaped"][0], pods["shaped"][2], pods["peer"][0], seconds=seconds, omit_s=1)
        got = lab.received_bps(res)
        rows.append(("shaped ingress", f"{got / 1e6:.2f} Mbit/s",
                     f"set {SHAPED_RATE_BPS / 1e6:.0f} Mbit/s: {got / SHAPED_RATE_BPS:.3f} of the rate"))
        res = lab.iperf3(pods["web"][0], pods["web"][2], pods["peer"][0], seconds=seconds)
        rows.append(("unshaped peer -> web", f"{lab.received_bps(res) / 1e9:.2f} Gbit/s", "iperf3 TCP, 1 stream"))
    rows.append(("cleanup", "done", "CNI DEL of every pod, daemon stopped, namespaces deleted"))
    return rows


def node_firewall_rules(ns: str) -> int:
    """How many iptables rules and nftables rules the node namespace holds."""
    from vswitch import lab
    n = 0
    if shutil.which("iptables-save"):
        out = lab.nsexec(ns, "iptables-save", check=False).stdout
        n += sum(1 for line in out.splitlines() if line.startswith("-A "))
    if shutil.which("nft"):
        out = lab.nsexec(ns, "nft", "list", "ruleset", check=False).stdout
        n += sum(1 for line in out.splitlines()
                 if line.strip() and not line.strip().startswith(("table", "chain", "type", "}", "policy")))
    return n


def subprocess_devnull():
    import subprocess
    return subprocess.DEVNULL


# ------------------------------------------------------------------ the same in simulation

def run_sim(seconds: float) -> list[tuple[str, str, str]]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from vswitch.datapath import IMPLEMENTATION
    from vswitch.sim import Simulation
    from vswitch.sim.generators import CBR

    rows = [("check", "result", "detail")]
    sim = Simulation(subnet=SUBNET, seed=0, node_ips=[NODE_IP])
    web = sim.add_pod("web")
    peer = sim.add_pod("peer")
    bw = {"egressRate": SHAPED_RATE_BPS, "egressBurst": SHAPED_BURST_BITS,
          "ingressRate": SHAPED_RATE_BPS, "ingressBurst": SHAPED_BURST_BITS}
    shaped = sim.add_pod("shaped", bandwidth=bw)
    client = sim.add_external("client", ip=CLIENT_IP)
    sim.add_port_mapping("web", host_port=HOST_PORT, container_port=CONTAINER_PORT, protocol="tcp")
    for pod in (web, peer, shaped):
        rows.append((f"pod {pod.name}", pod.ip, "simulated pod port" + (", bandwidth" if pod is shaped else "")))

    peer.send(peer.ping(web, seq=1))
    sim.run()
    replies = [p for p in peer.packets() if p.haslayer("ICMP") and p["ICMP"].type == 0]
    rows.append(("ping peer -> web", f"{len(replies)}/1", "echo reply through the switch"))

    client.send(client.tcp_syn(NODE_IP, HOST_PORT, sport=40000))
    sim.run()
    seen = Ether(web.received[-1][1])
    synack = client.packets()[-1]
    ok = synack[IP].src == NODE_IP and synack[TCP].sport == HOST_PORT and "SA" == str(synack[TCP].flags)
    rows.append((f"client -> {NODE_IP}:{HOST_PORT}", "SYN-ACK" if ok else "failed",
                 f"web saw {seen[IP].src} -> {seen[IP].dst}:{seen[TCP].dport}"))

    frame = shaped.udp_to(peer, 9, b"\0" * 1400)
    rx0 = sim.counters()["ports"]["peer"]["tx_bytes"]
    t0 = sim.now
    duration_ns = int(seconds * 1e9)
    sim.run_bulk([("shaped", CBR(frame, rate_bps=4 * SHAPED_RATE_BPS))], until_ns=t0 + duration_ns)
    got = (sim.counters()["ports"]["peer"]["tx_bytes"] - rx0) * 8 / seconds
    rows.append(("shaped egress", f"{got / 1e6:.2f} Mbit/s",
                 f"set {SHAPED_RATE_BPS / 1e6:.0f} Mbit/s (+ burst over {seconds:g} s), offered 4x"))
    rows.append(("datapath", IMPLEMENTATION, "virtual clock; the same Switch and Datapath as vswitchd"))
    return rows


# ------------------------------------------------------------------ the cluster, as root

def cluster_unavailable() -> str | None:
    """Why the cluster part cannot run here, or None."""
    from vswitch.lab.etcd import etcd_unavailable
    import importlib.util
    if importlib.util.find_spec("etcd3gw") is None:
        return "the etcd client etcd3gw is missing (pip install 'vswitch[cluster]')"
    from vswitch.datapath import Datapath
    if not hasattr(Datapath, "set_vtep"):
        return "this build's datapath has no VXLAN (issue 13): pods on different nodes cannot talk"
    return etcd_unavailable()


def run_cluster(nodes: int, seconds: float) -> list[tuple[str, str, str]]:
    from vswitch import lab
    from vswitch.lab.etcdns import MemberCluster

    rows = [("check", "result", "detail")]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        c = stack.enter_context(MemberCluster(nodes, pods_per_node=0, etcd_members=1,
                                         cluster_cidr=CLUSTER_CIDR))
        rows.append(("etcd", "1 member", f"{c.etcd.endpoints[0]} on the underlay {c.underlay_cidr}"))
        web = {}
        for n in c.nodes:
            view = n.daemon.call("nodes")
            pod = n.add_pod(f"{n.name}-web", runtime_config={"portMappings": [
                {"hostPort": HOST_PORT, "containerPort": CONTAINER_PORT, "protocol": "tcp"}]})
            docroot = Path(n.workdir) / "www"
            docroot.mkdir()
            (docroot / "index.html").write_text(pod.name)
            server = lab.nspopen(pod.ns, sys.executable, "-m", "http.server", CONTAINER_PORT, "--bind", "0.0.0.0",
                                 "--directory", str(docroot), stdout=subprocess_devnull(),
                                 stderr=subprocess_devnull())
            stack.callback(server.wait, 10)
            stack.callback(server.kill)
            web[n.name] = pod
            rows.append((f"node {n.name}", n.pod_cidr,
                         f"leased from etcd; node IP {n.underlay_ip}, VTEP MAC {view['cluster']['vtep_mac']}"))
            rows.append((f"pod {pod.name}", pod.ip, f"CNI ADD on {n.name}, usePodCidr, hostPort {HOST_PORT}"))
        rows.append(("cluster up", f"{time.perf_counter() - t0:.1f} s", f"{nodes} daemons registered, {nodes} pods"))
        # every node learns every other from etcd, and its VXLAN table resolves their next hops
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seen = [len(n.daemon.call("nodes")["nodes"]) for n in c.nodes]
            resolved = [sum(p["state"] == "resolved" for p in n.daemon.call("peers")["peers"]) for n in c.nodes]
            if all(k == nodes for k in seen) and all(k == nodes - 1 for k in resolved):
                break
            time.sleep(0.1)
        rows.append(("nodes known", f"{min(seen)}/{nodes}", "least complete view of `vswitchctl nodes` over all nodes"))
        rows.append(("VXLAN peers", f"{min(resolved)}/{nodes - 1} resolved",
                     "least complete `vswitchctl peers` table (source: cluster) over all nodes"))
        for n in c.nodes:
            lab.wait_listening(web[n.name].ns, CONTAINER_PORT)
        pairs = [(a, b) for a in c.nodes for b in c.nodes if a is not b]
        if len(pairs) > 12:                 # many nodes: each to the next two
            pairs = [(c.nodes[i], c.nodes[(i + k) % nodes]) for i in range(nodes) for k in (1, 2)]
        ok = 0
        rtts = []
        for a, b in pairs:
            p = lab.ping(web[a.name].ns, web[b.name].ip, count=2, timeout_s=10)
            ok += p["received"] == p["sent"]
            if p["rtt_avg_ms"] is not None:
                rtts.append(p["rtt_avg_ms"])
        rows.append(("ping across nodes", f"{ok}/{len(pairs)} pairs",
                     f"pod to pod on another node over VXLAN, avg rtt {sum(rtts) / len(rtts):.3f} ms" if rtts
                     else "no reply"))
        ok = 0
        for i, a in enumerate(c.nodes):
            b = c.nodes[(i + 1) % nodes]
            body = http_get(web[a.name].ns, web[b.name].ip, CONTAINER_PORT)
            ok += body == web[b.name].name
        rows.append(("TCP across nodes", f"{ok}/{nodes} fetches", "HTTP from each node's pod to the next node's pod"))
        client = c.underlay.ns
        for n in c.nodes:
            body = http_get(client, n.underlay_ip, HOST_PORT)
            rows.append((f"hostPort {n.underlay_ip}:{HOST_PORT}", body or "failed",
                         f"served by {n.name}'s own pod" if body == web[n.name].name
                         else f"expected {web[n.name].name}"))
        if nodes >= 2:
            a, b = web[c.nodes[0].name], web[c.nodes[1].name]
            try:
                res = lab.iperf3(b.ns, b.ip, a.ns, seconds=seconds)
                rate = f"{lab.received_bps(res) / 1e9:.2f} Gbit/s"
            except RuntimeError as exc:
                rate = f"failed ({exc})"
            rows.append((f"TCP {a.node} -> {b.node}", rate, "iperf3, 1 stream, pod to pod across nodes"))
    rows.append(("cleanup", "done", "daemons stopped, etcd stopped, namespaces deleted"))
    return rows


def http_get(ns: str, ip: str, port: int) -> str:
    """The body of http://ip:port/ fetched from namespace ``ns`` ('' on failure)."""
    from vswitch import lab
    r = lab.nsexec(ns, sys.executable, "-c",
                   "import urllib.request as u; print(u.urlopen('http://%s:%d/', timeout=5).read().decode())"
                   % (ip, port), check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vswitch.lab.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--sim", action="store_true", help="run the simulated scenario even as root")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each rate measurement")
    ap.add_argument("--nodes", type=int, default=3,
                    help="nodes of the cluster part (vswitchd in cluster mode on a real etcd; default 3; "
                         "0 leaves it out; at most 200)")
    args = ap.parse_args(argv)
    if not 0 <= args.nodes <= 200:
        ap.error(f"--nodes {args.nodes}: accepted is 0 .. 200")
    from vswitch import lab
    why = None if args.sim else lab.kernel_unavailable()
    if args.sim or why:
        print(f"vswitch demo: SIMULATION ({why or '--sim'}): three pods on a virtual clock\n")
        rows = run_sim(args.seconds)
        print(table(rows))
        return 0
    print("vswitch demo: real pods in network namespaces, added through the CNI plugin\n")
    rows = run_real(args.seconds)
    print(table(rows))
    if args.nodes:
        print(f"\nvswitch demo: a cluster of {args.nodes} nodes, vswitchd in cluster mode on etcd, "
              f"pods on every node\n", flush=True)
        why = cluster_unavailable()
        rows = ([("check", "result", "detail"), ("cluster", "skipped", why)] if why
                else run_cluster(args.nodes, args.seconds))
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
