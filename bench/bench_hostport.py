"""The hostPort path: a client outside the node reaches a pod through node-IP:hostPort,
vswitch against the reference portmap plugin, same run.

Theory of operation
-------------------
Per subject, a node namespace of our own (``bench.podnet.Node``) with a veth to a
client namespace (the node's end ``up0`` holds the node IP 192.0.2.1/24, the client is
192.0.2.10/24 and has no route to the pod subnet), and one pod added through a CNI chain
with ``runtimeConfig.portMappings``:

- ``vswitch``: vswitchd started with ``--uplink up0`` (the node IP moves to its host
  port; the uplink is read with AF_PACKET) and the vswitch CNI plugin: the switch does the
  DNAT and its reverse, with no iptables rule;
- ``portmap``: the reference chain bridge (isGateway, hairpin) + host-local + portmap
  (``snat``, as Kubernetes configures it): iptables DNAT in the node namespace, the kernel
  routing between ``up0`` and the bridge.

Mappings: hostPort 15201 → 5201 (iperf3), 18080 → 80 (TCP request/response), 15353 → 53
(UDP echo). The pod runs iperf3 and a small Python server (TCP: read a request, answer
``ok``, close; UDP: echo); a Python client in the client namespace times each exchange.
Figures, group ``real-hostport``, parameter ``traffic``:

- ``tcp-stream``: iperf3 from the pod to the client (client with ``-R``, counted by the
  receiver, omitted seconds excluded), Gbit/s per run;
- ``tcp-crr``: connect + request + response + close, sequentially, one TCP connection
  each; ms per request, every request a sample (the connection rate is 1000 / median);
- ``udp-rr``: a 18-byte UDP request and its echo, sequentially; ms per round trip, every
  exchange a sample. Each request carries its sequence number and a reply counts only for
  its own request: one not back within 1 s is lost (counted in ``info``, not sampled), and
  its reply, if it comes later, is discarded and counted (``late_discarded``), never timed
  as the answer to a later request.
- ``udp-rr-4000B``: the same with 4000-byte datagrams, bigger than the 1500-byte MTU, so
  each crosses as three IP fragments each way: portmap's kernel reassembles them before
  its NAT; vswitch translates each fragment as it comes (docs/datapath.md, *Fragments*).

Every traffic has an IPv6 row too (parameter ``family=6``; the IPv4 rows keep their
parameters): the pod is dual-stack (``podnet.Node(ipv6=True)``: host-local with two
ranges), the node's uplink also holds 2001:db8:1::1/64 and the client 2001:db8:1::10/64,
and the client dials the node's IPv6 address: vswitch translates IPv6 in the switch,
portmap with ip6tables (the bridge node gets ``net.ipv6.conf.all.forwarding=1``, as
vswitchd sets it for an IPv6 gateway). The pod's server has IPv6-only sockets beside its
IPv4 ones, so the IPv4 rows measure the same sockets as before.

Both pod servers are the same code for both subjects, so their own cost (Python's) is in
both figures alike; the difference is the path. Everything is removed at the end
whatever happens (the node and client namespaces with the pod's); skips with the reason
when not root or iperf3, iptables or the reference plugins are missing.

    python -m bench --files bench_hostport.py
"""
from __future__ import annotations

import json
import statistics
import sys

import pytest

from . import nettools, podnet
from .report import quick_mode, record
from vswitch import lab

pytestmark = pytest.mark.integration

QUICK = quick_mode()
TCP_SECONDS, TCP_OMIT_S, TCP_ROUNDS = (2, 0, 1) if QUICK else (8, 1, 3)
CRR_COUNT, RR_COUNT, WARMUP = (200, 500, 20) if QUICK else (2000, 5000, 50)
SUBJECTS = ("vswitch", "portmap")
NODE_IP, CLIENT_IP = "192.0.2.1", "192.0.2.10"
NODE_IP6, CLIENT_IP6 = "2001:db8:1::1", "2001:db8:1::10"
NODE_IPS = {4: NODE_IP, 6: NODE_IP6}
FAMILIES = (4, 6)
UPLINK = "up0"
IPERF_HOSTPORT, IPERF_PORT = 15201, 5201
CRR_HOSTPORT, CRR_PORT = 18080, 80
RR_HOSTPORT, RR_PORT = 15353, 53
PORT_MAPPINGS = [
    {"hostPort": IPERF_HOSTPORT, "containerPort": IPERF_PORT, "protocol": "tcp"},
    {"hostPort": CRR_HOSTPORT, "containerPort": CRR_PORT, "protocol": "tcp"},
    {"hostPort": RR_HOSTPORT, "containerPort": RR_PORT, "protocol": "udp"},
]

SERVER = r"""
import socket, sys, threading
tcp_port, udp_port = int(sys.argv[1]), int(sys.argv[2])
def v6only(s):
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return s
def tcp(fam, addr):
    s = socket.socket(fam)
    if fam == socket.AF_INET6:
        v6only(s)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, tcp_port))
    s.listen(256)
    while True:
        c, _ = s.accept()
        try:
            if c.recv(64):
                c.sendall(b"ok")
        except OSError:
            pass
        finally:
            c.close()
def udp(u):
    while True:
        data, peer = u.recvfrom(65535)
        u.sendto(data, peer)
threading.Thread(target=tcp, args=(socket.AF_INET, "0.0.0.0"), daemon=True).start()
threading.Thread(target=tcp, args=(socket.AF_INET6, "::"), daemon=True).start()
u6 = v6only(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
u6.bind(("::", udp_port))
threading.Thread(target=udp, args=(u6,), daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", udp_port))
udp(u)
"""

CLIENT = r"""
import json, socket, sys, time
mode, ip, port, count, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
size = int(sys.argv[6]) if len(sys.argv) > 6 else 18
clock = time.perf_counter
ms, lost, late = [], 0, 0
if mode == "tcp":
    for i in range(warmup + count):
        t0 = clock()
        c = socket.create_connection((ip, port), timeout=5)
        c.sendall(b"q")
        reply = c.recv(64)
        c.close()
        t = (clock() - t0) * 1e3
        if reply != b"ok":
            sys.exit("request %d: reply %r" % (i, reply))
        if i >= warmup:
            ms.append(t)
else:
    # every request carries its sequence number; a reply is matched to its request by it,
    # so a late reply (to a request already counted lost) is discarded and counted, never
    # timed as the answer to a later request
    import struct
    if size < 8:
        sys.exit("size %d: at least 8 bytes (the sequence number)" % size)
    u = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)
    u.connect((ip, port))
    for i in range(warmup + count):
        payload = struct.pack("!Q", i) + b"x" * (size - 8)
        t0 = clock()
        deadline = t0 + 1.0
        u.send(payload)
        while True:
            left = deadline - clock()
            if left <= 0:
                lost += 1
                break
            u.settimeout(left)
            try:
                reply = u.recv(65535)
            except socket.timeout:
                lost += 1
                break
            t = (clock() - t0) * 1e3
            seq = struct.unpack("!Q", reply[:8])[0] if len(reply) >= 8 else -1
            if seq < i and reply[8:] == payload[8:]:
                late += 1                 # the answer to an earlier request: not this one
                continue
            if reply != payload:
                sys.exit("exchange %d: %d bytes back (sequence %d), %d sent" % (i, len(reply), seq, size))
            if i >= warmup:
                ms.append(t)
            break
print(json.dumps({"ms": ms, "lost": lost, "late": late}))
"""


def _uplinked(node):
    """The client namespace and the node's uplink veth (setup of podnet.Node)."""
    node.client = node.nss.new("cl")
    lab.veth(node.node, UPLINK, f"{NODE_IP}/24", node.client, "eth0", f"{CLIENT_IP}/24")
    lab.nsexec(node.node, "ip", "addr", "add", f"{NODE_IP6}/64", "dev", UPLINK, "nodad")
    lab.nsexec(node.client, "ip", "addr", "add", f"{CLIENT_IP6}/64", "dev", "eth0", "nodad")
    if node.subject == "bridge":
        lab.nsexec(node.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        lab.nsexec(node.node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")


class HostPortBed:
    def __init__(self, node, pod, server):
        self.node, self.pod, self.server = node, pod, server
        self.client = node.client
        self.facts = node.facts()


def _bed(subject):
    kind = "vswitch" if subject == "vswitch" else "bridge"
    podnet.require_subject(kind, portmap=True, tools=("iperf3",))
    args = ("--uplink", UPLINK) if kind == "vswitch" else ()
    with podnet.Node(kind, portmap=True, daemon_args=args, setup=_uplinked, ipv6=True,
                     tag="bhv" if kind == "vswitch" else "bhp") as node:
        pod = node.add_pod({"portMappings": PORT_MAPPINGS})
        server = lab.nspopen(pod.ns, sys.executable, "-c", SERVER, CRR_PORT, RR_PORT)
        try:
            lab.wait_listening(pod.ns, CRR_PORT)
            lab.wait_listening(pod.ns, RR_PORT, "udp")
            for family in FAMILIES:                               # the path works end to end
                _exchange(node.client, "tcp", CRR_HOSTPORT, 1, 0, family=family)
            yield HostPortBed(node, pod, server)
        finally:
            nettools.stop_process(server)     # the PID we started


@pytest.fixture(scope="module")
def bed_vswitch():
    yield from _bed("vswitch")


@pytest.fixture(scope="module")
def bed_portmap():
    yield from _bed("portmap")


def _exchange(client_ns, mode, port, count, warmup, size=18, family=4):
    """Runs CLIENT in the client namespace: {"ms": [...], "lost": n, "late": n}."""
    out = lab.nsexec(client_ns, sys.executable, "-c", CLIENT, mode, NODE_IPS[family], port, count,
                     warmup, size, timeout=60 + count * 0.05).stdout
    return json.loads(out)


def _family(family):
    """The parameters naming a row's family: none for IPv4 (its rows as they always were)."""
    return {} if family == 4 else {"family": family}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("subject", SUBJECTS)
def test_hostport_tcp_stream(benchmark, request, subject, family):
    """TCP goodput (Gbit/s) from the pod to the client through node-IP:hostPort."""
    bed = request.getfixturevalue(f"bed_{subject}")
    gbps = []
    record(benchmark, group="real-hostport", subject=subject, unit="gbps", samples=gbps,
           traffic="tcp-stream", **_family(family),
           info={"seconds": TCP_SECONDS, "omit_s": TCP_OMIT_S, "streams": 1,
                 "tool": "iperf3 -R to node-IP:hostPort", **bed.facts})

    def once():
        # the two halves apart: the server listens on IPERF_PORT, the client dials the hostPort
        server = nettools.start_iperf_server(bed.pod.ns, IPERF_PORT)
        try:
            data = nettools.iperf_client(bed.client, NODE_IPS[family], IPERF_HOSTPORT, TCP_SECONDS,
                                         ["-P", "1", "-O", str(TCP_OMIT_S)])
        finally:
            nettools.stop_process(server)
        gbps.append(nettools.goodput_bps(data) / 1e9)
    benchmark.pedantic(once, rounds=TCP_ROUNDS, iterations=1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("subject", SUBJECTS)
def test_hostport_tcp_crr(benchmark, request, subject, family):
    """TCP connect + request + response + close through node-IP:hostPort (ms each)."""
    bed = request.getfixturevalue(f"bed_{subject}")
    ms = []

    def once():
        ms.extend(_exchange(bed.client, "tcp", CRR_HOSTPORT, CRR_COUNT, WARMUP, family=family)["ms"])
    benchmark.pedantic(once, rounds=1, iterations=1)
    record(benchmark, group="real-hostport", subject=subject, unit="ms", samples=ms,
           traffic="tcp-crr", **_family(family),
           info={"requests": CRR_COUNT, "warmup": WARMUP,
                 "connections_per_s": round(1000.0 / statistics.median(ms), 1), **bed.facts})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("payload_bytes", [18, 4000])
@pytest.mark.parametrize("subject", SUBJECTS)
def test_hostport_udp_rr(benchmark, request, subject, payload_bytes, family):
    """A UDP request and its echo through node-IP:hostPort (ms each): 18 bytes, and 4000
    bytes (three IP fragments each way)."""
    bed = request.getfixturevalue(f"bed_{subject}")
    ms, lost, late = [], [], []

    def once():
        r = _exchange(bed.client, "udp", RR_HOSTPORT, RR_COUNT, WARMUP, payload_bytes, family)
        ms.extend(r["ms"])
        lost.append(r["lost"])
        late.append(r["late"])
    benchmark.pedantic(once, rounds=1, iterations=1)
    record(benchmark, group="real-hostport", subject=subject, unit="rtt_ms", samples=ms,
           traffic="udp-rr" if payload_bytes == 18 else f"udp-rr-{payload_bytes}B", **_family(family),
           info={"exchanges": RR_COUNT, "warmup": WARMUP, "payload_bytes": payload_bytes,
                 "lost": sum(lost), "late_discarded": sum(late), **bed.facts})
