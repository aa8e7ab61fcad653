"""The multi-node lab (vswitch.lab.cluster) in the real kernel: nodes built as flannel's VXLAN
backend builds them reach each other's pods, peers come and go at run time, the underlay
carries RFC 7348 VXLAN (the wire format our core must match, issue 13), nothing is left
behind, and a vswitch node serves its own pods through the CNI plugin.

Expected values come from the spec: RFC 7348 section 5 (the 8-byte VXLAN header: flags
0x08 = I bit, VNI in bits 32..55, reserved fields zero; UDP destination port 4789 or the
configured one), the 50 bytes of encapsulation (14 + 20 + 8 + 8) under the underlay MTU,
the TCP MSS that MTU implies (MTU - 40), one routing hop per node (TTL 64 -> 63), and
flannel's per-peer entries (one route, one neighbour, one FDB entry).
"""
import json
import os
import re
import shutil
import struct
import sys

import pytest

from vswitch import lab
from vswitch.lab.cluster import (IANA_VXLAN_PORT, Cluster, KernelNode, Underlay, VswitchNode)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(lab.kernel_unavailable() is not None,
                                 reason=lab.kernel_unavailable() or "")]

PORT = 7000

# one echo server per pod: TCP (reads to EOF, then sends it all back) and UDP (each datagram)
ECHO_SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
def tcp_conn(c):
    with c:
        chunks = []
        while True:
            b = c.recv(65536)
            if not b:
                break
            chunks.append(b)
        c.sendall(b"".join(chunks))
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=tcp_conn, args=(c,), daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
while True:
    data, peer = u.recvfrom(65535)
    u.sendto(data, peer)
"""

# from one pod to each address given: a TCP echo of `size` bytes and a UDP echo; one JSON line
ECHO_CLIENT = r"""
import json, os, socket, sys
port, size, ips = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
out = {}
for ip in ips:
    res = {}
    payload = os.urandom(size)
    try:
        c = socket.create_connection((ip, port), timeout=5)
        c.sendall(payload); c.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            b = c.recv(65536)
            if not b:
                break
            got += b
        c.close()
        res["tcp"] = bytes(got) == payload
    except OSError as e:
        res["tcp"] = str(e)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1); u.connect((ip, port))
    msg = os.urandom(32)
    res["udp"] = False
    for attempt in range(3):
        u.send(msg)
        try:
            res["udp"] = u.recv(65535) == msg
            break
        except OSError:
            continue
    u.close()
    out[ip] = res
print(json.dumps(out))
"""


def _start_servers(pods):
    procs = []
    try:
        for p in pods:
            procs.append(lab.nspopen(p.ns, sys.executable, "-c", ECHO_SERVER, PORT))
        for p in pods:
            lab.wait_listening(p.ns, PORT)
            lab.wait_listening(p.ns, PORT, "udp")
    except BaseException:
        _stop(procs)
        raise
    return procs


def _stop(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _echo_from(pod, ips, size=256 * 1024):
    r = lab.nsexec(pod.ns, sys.executable, "-c", ECHO_CLIENT, PORT, size, *ips, timeout=120)
    return json.loads(r.stdout)


def _ping_ok(src, dst_ip):
    return lab.ping(src.ns, dst_ip, count=2, interval_s=0.05)["received"] == 2


def _unreachable(src, dst_ip):
    return lab.ping(src.ns, dst_ip, count=2, interval_s=0.05)["received"] == 0


def _expected_state(peers):
    """flannel's entries for ``peers`` (one route, neighbour and FDB entry each), as
    ``ip``/``bridge`` print them for the vxlan device."""
    return {"routes": sorted(f"{p.pod_cidr} via {p.vtep_ip} onlink" for p in peers),
            "neighbours": sorted(f"{p.vtep_ip} lladdr {p.vtep_mac} PERMANENT" for p in peers),
            "fdb": sorted(f"{p.vtep_mac} dst {p.underlay_ip} self permanent" for p in peers)}


def _state(node):
    return {k: sorted(" ".join(l.split()) for l in v) for k, v in node.forwarding_state().items()}


# --------------------------------------------------------------------------- kernel nodes


def test_three_kernel_nodes_every_pod_reaches_every_other_pod():
    """3 nodes x 2 pods, flannel's own defaults (VNI 1, the kernel's port 8472): ICMP, TCP
    (256 KiB echoed back intact) and UDP between all 30 ordered pairs of pods."""
    with Cluster(3, pods_per_node=2, vni=1, port=8472) as c:
        for node in c.nodes:
            others = [n for n in c.nodes if n is not node]
            want = _expected_state(others)
            assert _state(node) == want
        pods = c.pods
        assert len(pods) == 6 and len({p.ip for p in pods}) == 6
        for src in pods:
            for dst in pods:
                if dst is not src:
                    assert _ping_ok(src, dst.ip), (src, dst)
        servers = _start_servers(pods)
        try:
            for src in pods:
                res = _echo_from(src, [d.ip for d in pods if d is not src])
                assert res == {d.ip: {"tcp": True, "udp": True} for d in pods if d is not src}, \
                    (src, res)
        finally:
            _stop(servers)


def test_a_node_removed_from_peers_is_unreachable_and_comes_back_when_re_added():
    with Cluster(3, pods_per_node=2) as c:
        n1, n2, n3 = c.nodes
        a, b, gone = n1.pods[0], n2.pods[1], n3.pods[0]
        assert _ping_ok(a, gone.ip) and _ping_ok(a, b.ip)

        c.isolate(n3)
        # flannel's lease-removed: the three entries for n3 are gone, n2's remain
        want = _expected_state([n2])
        assert _state(n1) == want
        assert _state(n3) == {"routes": [], "neighbours": [], "fdb": []}
        assert _unreachable(a, gone.ip) and _unreachable(gone, b.ip)
        assert _ping_ok(a, b.ip) and _ping_ok(b, a.ip)          # the others go on
        c.isolate(n3)                                           # removing twice is harmless

        c.rejoin(n3)
        want = _expected_state([n2, n3])
        assert _state(n1) == want
        n1.add_peer(n3)                                         # adding twice: still one of each
        assert _state(n1) == want
        for src, dst in ((a, gone), (gone, a), (gone, b), (b, gone)):
            assert _ping_ok(src, dst.ip), (src, dst)
        servers = _start_servers([gone])
        try:
            assert _echo_from(a, [gone.ip]) == {gone.ip: {"tcp": True, "udp": True}}
        finally:
            _stop(servers)


VNI = 0x123456          # all 24 bits of the field in use, no byte alike


def _ones_sum(data):
    """RFC 1071: the 16-bit one's complement sum (folded, not complemented)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _l4_checksums(src, dst, proto, seg):
    """(the RFC 768/793 checksum of the TCP or UDP segment ``seg``, its pseudo-header's sum
    alone). A sender leaving the checksum to the device (CHECKSUM_PARTIAL, as the kernel
    does towards a veth) puts the second in the field, uncomplemented, for the device to
    complete."""
    off = {6: 16, 17: 6}[proto]
    pseudo = (bytes(map(int, src.split("."))) + bytes(map(int, dst.split("."))) +
              struct.pack("!BBH", 0, proto, len(seg)))
    full = ~_ones_sum(pseudo + seg[:off] + b"\0\0" + seg[off + 2:]) & 0xFFFF
    return (full or 0xFFFF) if proto == 17 else full, _ones_sum(pseudo)


def _completed(ip_packet):
    """The IPv4 packet's TCP/UDP checksum as the device completes it: ``ip_packet`` with a
    partial (pseudo-header) checksum replaced by the full one; asserts it was one of the
    two."""
    ihl = (ip_packet[0] & 0x0F) * 4
    proto = ip_packet[9]
    if proto not in (6, 17):
        return ip_packet
    src, dst = ".".join(map(str, ip_packet[12:16])), ".".join(map(str, ip_packet[16:20]))
    seg = ip_packet[ihl:]
    off = {6: 16, 17: 6}[proto]
    field = struct.unpack("!H", seg[off:off + 2])[0]
    if proto == 17 and field == 0:
        return ip_packet
    full, partial = _l4_checksums(src, dst, proto, seg)
    assert field in (full, partial), (field, full, partial)
    return ip_packet[:ihl + off] + struct.pack("!H", full) + seg[off + 2:]


def _vxlan(udp_payload):
    """RFC 7348 section 5: flags (I bit 0x08), 24 reserved bits, VNI (24), 8 reserved."""
    assert len(udp_payload) >= 8 + 14
    flags, r1, vni_r2 = udp_payload[0], udp_payload[1:4], struct.unpack("!I", udp_payload[4:8])[0]
    return flags, r1, vni_r2 >> 8, vni_r2 & 0xFF, udp_payload[8:]


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump (Debian package tcpdump)")
def test_the_underlay_carries_rfc7348_vxlan_with_the_configured_vni_and_port(tmp_path):
    """What node 1 puts on the underlay while its pod pings, opens TCP (1 MiB echoed) and
    sends UDP to a pod on node 2: only VXLAN to the configured port, every frame wire-size
    under the 1500-byte MTU, the outer addresses the nodes' underlay ones, the VXLAN header
    with the configured VNI, and inside the pod's packet routed once (TTL 63) between the
    two VTEP MACs; the TCP SYN's MSS is what the pod MTU 1450 implies."""
    from scapy.all import IP, TCP, UDP, Ether, rdpcap
    mtu = 1500
    with Cluster(2, pods_per_node=1, vni=VNI, port=IANA_VXLAN_PORT, mtu=mtu) as c:
        n1, n2 = c.nodes
        a, b = n1.pods[0], n2.pods[0]
        for n in c.nodes:
            n.wire_size_segments(True)
        assert lab.nsexec(a.ns, "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450"
        mac = {n.name: lab.nsexec(n.ns, "cat", "/sys/class/net/eth0/address").stdout.strip()
               for n in c.nodes}
        servers = _start_servers([b])
        pcap = tmp_path / "n1.pcap"
        try:
            with c.underlay.capture(n1, pcap, snaplen_bytes=mtu + 14) as cap:   # all, not only VXLAN
                assert _ping_ok(a, b.ip)
                assert _echo_from(a, [b.ip], size=1 << 20) == {b.ip: {"tcp": True, "udp": True}}
            assert cap.dropped == 0, cap.stderr
        finally:
            _stop(servers)
        frames = rdpcap(str(pcap))

    sent = [f for f in frames if IP in f and f[IP].src == n1.underlay_ip]
    assert len(sent) > 700            # 1 MiB of TCP in 1398-byte segments, at least
    inner_seen = {"icmp": 0, "tcp": 0, "udp": 0, "syn_mss": None}
    sports = set()
    for f in sent:
        assert f[Ether].src == mac["n1"] and f[Ether].dst == mac["n2"]
        assert f[IP].dst == n2.underlay_ip and f[IP].proto == 17
        assert UDP in f and f[UDP].dport == IANA_VXLAN_PORT, f.summary()
        assert len(f) <= mtu + 14, len(f)                     # wire-size, no GSO packet
        assert f[IP].len == len(bytes(f[IP]))
        # RFC 7348: zero or correct. On a veth the kernel leaves checksums to the device:
        # the inner TCP/UDP one partial, the outer UDP one either partial or computed over
        # the inner packet as the device completes it (local checksum offload); so the
        # inner one is completed first, then the outer must be correct or partial
        if f[UDP].chksum:
            inner_ip = bytes(f[UDP].payload)[8 + 14:]
            udp = bytes(f[UDP])[:8 + 8 + 14] + _completed(inner_ip)
            assert f[UDP].chksum in _l4_checksums(f[IP].src, f[IP].dst, 17, udp)
        sports.add(f[UDP].sport)
        flags, r1, vni, r2, inner = _vxlan(bytes(f[UDP].payload))
        assert (flags, r1, vni, r2) == (0x08, b"\0\0\0", VNI, 0)
        e = Ether(inner)
        assert (e.src, e.dst) == (n1.vtep_mac, n2.vtep_mac)
        assert (e[IP].src, e[IP].dst, e[IP].ttl) == (a.ip, b.ip, 63)
        assert len(inner) <= 1450 + 14
        if e[IP].proto == 1:
            inner_seen["icmp"] += 1
        elif TCP in e:
            inner_seen["tcp"] += 1
            if e[TCP].flags.S:
                inner_seen["syn_mss"] = dict(o for o in e[TCP].options if o[0] == "MSS")["MSS"]
        elif UDP in e:
            inner_seen["udp"] += 1
    assert inner_seen["icmp"] == 2 and inner_seen["udp"] >= 1 and inner_seen["tcp"] > 700
    assert inner_seen["syn_mss"] == 1450 - 40
    # the outer source port comes from the inner flow (ICMP, TCP, UDP): more than one
    assert len(sports) > 1
    # no pod packet crossed the underlay unencapsulated
    assert not [f for f in frames if IP in f and f[IP].src in (a.ip, b.ip)]


# --------------------------------------------------------------------------- clean-up


OUR_LINK_NAMES = re.compile(r"^(n\d+|veth\d+|flannel\.\d+|vxlan\d+|cni0|br0|vsw0|eth0)$")


def _root_links():
    """Links in this machine's own namespace named as the cluster names its links (all of
    which it makes inside namespaces of its own)."""
    names = {l.split(":")[1].strip().split("@")[0]
             for l in lab.sh("ip", "-o", "link", "show").stdout.splitlines()}
    return {n for n in names if OUR_LINK_NAMES.match(n)}


def test_nothing_is_left_after_a_cluster():
    links_before = _root_links()
    with Cluster(3, pods_per_node=2) as c:
        names = c.namespaces()
        assert len(names) == 1 + 3 + 6
        listed = lab.sh("ip", "netns", "list").stdout
        assert all(n in listed for n in names)
    listed = lab.sh("ip", "netns", "list").stdout
    assert not [n for n in names if n in listed]
    assert _root_links() - links_before == set()


HAS_HOST_LOCAL = os.access(os.path.join(lab.SYSTEM_CNI_PATH, "host-local"), os.X_OK)
needs_host_local = pytest.mark.skipif(not HAS_HOST_LOCAL,
                                      reason="needs containernetworking-plugins (host-local)")


@needs_host_local
def test_a_build_that_fails_half_way_removes_what_it_made(monkeypatch):
    """A cluster whose wiring fails half way (a vswitch node's peer programming raises after
    its daemon started) fails loudly, and its daemon, work dir and every namespace are gone
    afterwards."""
    links_before = _root_links()
    made = []
    orig_open = VswitchNode.open

    def spy(self):
        made.append(self)
        return orig_open(self)

    def broken_add_peer(self, peer):
        raise RuntimeError(f"{self.name}: injected failure while adding {peer.name}")
    monkeypatch.setattr(VswitchNode, "open", spy)
    monkeypatch.setattr(VswitchNode, "add_peer", broken_add_peer)
    c = Cluster(2, kinds=["kernel", "vswitch"], pods_per_node=1)
    with pytest.raises(RuntimeError, match="injected failure"):
        c.open()
    vs = made[0]
    assert vs.ns is not None and vs.workdir is not None      # it was built before the wiring
    assert vs.daemon is None and not vs.workdir.exists()
    assert c.nodes == [] and c.namespaces() == []
    listed = lab.sh("ip", "netns", "list").stdout
    assert vs.ns not in listed and c.underlay.ns not in listed
    assert _root_links() - links_before == set()


def test_bad_values_are_refused_with_what_is_accepted():
    with pytest.raises(ValueError, match="vni=16777216: accepted is an integer 0..16777215"):
        KernelNode(Underlay(), 1, pod_cidr="10.244.1.0/24", vni=2 ** 24)
    with pytest.raises(ValueError, match="port=0: accepted"):
        KernelNode(Underlay(), 1, pod_cidr="10.244.1.0/24", port=0)
    with pytest.raises(ValueError, match="pod_cidr='10.244.1.1/24'"):
        KernelNode(Underlay(), 1, pod_cidr="10.244.1.1/24")
    with pytest.raises(ValueError, match="kinds='calico'"):
        Cluster(2, kinds="calico")
    with pytest.raises(ValueError, match="mtu=100"):
        Underlay(mtu=100)


# --------------------------------------------------------------------------- vswitch node


@needs_host_local
def test_a_vswitch_node_serves_its_pods_and_keeps_the_underlay():
    """A vswitch node on the underlay beside a kernel node: vswitchd owns its underlay NIC,
    pods attached through the CNI plugin reach each other, their gateway and their node's
    underlay address; the node still reaches the other node over the underlay through the
    switch; the pod MTU leaves room for VXLAN; a peer is added and removed through the
    daemon (cross-node traffic itself: tests/integration/test_crossnode*.py)."""
    with Underlay() as u:
        kernel = KernelNode(u, 1, pod_cidr="10.244.1.0/24")
        vs = VswitchNode(u, 2, pod_cidr="10.244.2.0/24")
        try:
            kernel.open()
            vs.open()
            a, b = vs.add_pod(), vs.add_pod()
            assert {a.ip, b.ip} == {"10.244.2.2", "10.244.2.3"}
            assert vs.pod_ip(0) == a.ip
            assert "tun" in lab.nsexec(a.ns, "ip", "-d", "link", "show", "eth0").stdout
            assert lab.nsexec(a.ns, "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450"
            # the underlay address moved from eth0 to the switch's host port
            assert vs.underlay_ip in lab.nsexec(vs.ns, "ip", "-4", "addr", "show", "vsw0").stdout
            assert vs.underlay_ip not in lab.nsexec(vs.ns, "ip", "-4", "addr", "show",
                                                    "eth0").stdout
            for src, dst in ((a, b.ip), (b, a.ip), (a, vs.gateway_ip), (a, vs.underlay_ip),
                             (b, vs.underlay_ip)):
                assert _ping_ok(src, dst), (src, dst)
            assert lab.ping(vs.ns, kernel.underlay_ip, count=2, interval_s=0.05)["received"] == 2
            servers = _start_servers([b])
            try:
                assert _echo_from(a, [b.ip]) == {b.ip: {"tcp": True, "udp": True}}
            finally:
                _stop(servers)
            assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", vs.vtep_mac), vs.vtep_mac
            vs.add_peer(kernel)
            listed = vs.daemon.call("peers")
            assert [p["name"] for p in listed["peers"]] == [kernel.name], listed
            vs.remove_peer(kernel)
            assert vs.daemon.call("peers")["peers"] == []
            daemon = vs.daemon
        finally:
            vs.close()
            kernel.close()
        assert daemon.proc.returncode == 0          # stopped cleanly by SIGTERM


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump (Debian package tcpdump)")
def test_the_example_of_docs_cluster_md_runs(tmp_path, monkeypatch):
    """docs/cluster.md stays true: its python block runs (in a scratch directory)."""
    text = (lab.REPO / "docs" / "cluster.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/cluster.md", "exec"), {})
    assert (tmp_path / "n1.pcap").stat().st_size > 24          # more than the pcap header
