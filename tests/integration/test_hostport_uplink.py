"""Acceptance 3: hostPort from outside the node through --uplink, with no iptables/nftables
rule in the node namespace; hairpin; pod-to-pod via node-IP:hostPort; addresses go back
to the NIC on a clean exit."""
import sys

import pytest

from tests.integration.helpers import (UPLINK_CLIENT_IP, UPLINK_NODE_IP, uplinked_cluster,
                                       nsexec, nspopen, ping, wait_listening)

NODE_IP, CLIENT_IP = UPLINK_NODE_IP, UPLINK_CLIENT_IP

# a TCP server that answers each connection with the peer's address, and a UDP one alike
TCP_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
while True:
    c, peer = s.accept()
    data = c.recv(1000)
    c.sendall(b"peer=" + peer[0].encode() + b" got=" + data)
    c.close()
"""
UDP_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"peer=" + peer[0].encode() + b" got=" + data, peer)
"""
CLIENT = r"""
import socket, sys
proto, ip, port, msg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
for attempt in range(20):
    try:
        if proto == "tcp":
            c = socket.create_connection((ip, port), timeout=3); c.sendall(msg)
            print(c.recv(1000).decode()); break
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(1); c.connect((ip, port))
        c.send(msg); print(c.recv(65535).decode()); break
    except OSError as e:
        err = e
else:
    print("FAILED", err); sys.exit(1)
"""


def _client(ns, proto, ip, port, msg):
    return nsexec(ns, sys.executable, "-c", CLIENT, proto, ip, str(port), msg).stdout.strip()


@pytest.fixture
def uplinked(nss, tmp_path):
    c = uplinked_cluster(nss, tmp_path, ())
    servers = []
    c.servers = servers
    try:
        yield c
    finally:
        for p in servers:
            p.kill()
            p.wait(10)
        c.daemon.stop()


def test_hostport_from_outside_hairpin_and_pod_to_pod_via_node_ip(uplinked):
    c = uplinked
    node = c.node
    # the NIC's address moved to the host port
    assert NODE_IP not in nsexec(node, "ip", "-4", "addr", "show", "dev", c.nic).stdout
    assert NODE_IP in nsexec(node, "ip", "-4", "addr", "show", "dev", "vsw0").stdout
    a = c.add_pod("a", 2, port_mappings=[{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                                         {"hostPort": 5353, "containerPort": 53, "protocol": "udp"}])
    b = c.add_pod("b", 3)
    c.servers.append(nspopen(a.ns, sys.executable, "-c", TCP_SERVER, "80"))
    c.servers.append(nspopen(a.ns, sys.executable, "-c", UDP_SERVER, "53"))
    wait_listening(a.ns, 80)
    wait_listening(a.ns, 53, "udp")

    # the node itself still reaches the outside through the switch
    assert ping(node, CLIENT_IP)["received"] == 3
    # from outside: TCP and UDP, the server sees the client's own address
    assert _client(c.client, "tcp", NODE_IP, 8080, "hello") == f"peer={CLIENT_IP} got=hello"
    assert _client(c.client, "udp", NODE_IP, 5353, "hi-udp") == f"peer={CLIENT_IP} got=hi-udp"
    # hairpin: pod A to its own hostPort via the node IP (source NATed to the gateway)
    assert _client(a.ns, "tcp", NODE_IP, 8080, "self") == f"peer={c.gateway} got=self"
    # pod B to pod A via node-IP:hostPort
    assert _client(b.ns, "tcp", NODE_IP, 8080, "from-b") == f"peer={b.ip} got=from-b"
    assert _client(b.ns, "udp", NODE_IP, 5353, "udp-b") == f"peer={b.ip} got=udp-b"
    # a datagram bigger than the MTU crosses as IP fragments both ways (D39)
    big = "x" * 4000
    assert _client(c.client, "udp", NODE_IP, 5353, big) == f"peer={CLIENT_IP} got={big}"
    assert _client(b.ns, "udp", NODE_IP, 5353, big) == f"peer={b.ip} got={big}"

    ct = c.daemon.call("conntrack")["entries"]
    assert any(e["orig_src"] == CLIENT_IP and e["orig_dport"] == 8080 for e in ct)
    # no iptables or nftables rule in the node namespace
    ruleset = nsexec(node, "nft", "list", "ruleset").stdout
    assert "rule" not in ruleset and "chain" not in ruleset, ruleset
    for tool in ("iptables-save", "ip6tables-save"):
        out = nsexec(node, tool, check=False).stdout
        assert not [l for l in out.splitlines() if l.startswith("-A")], out

    c.detach_all()
    assert c.daemon.stop() == 0
    # clean exit: the address is back on the NIC, vsw0 is gone
    assert NODE_IP in nsexec(node, "ip", "-4", "addr", "show", "dev", c.nic).stdout
    assert nsexec(node, "ip", "link", "show", "vsw0", check=False).returncode != 0


def test_ip_masq_lets_a_pod_reach_beyond_the_node_and_goes_away_with_it(uplinked):
    c = uplinked
    plain = c.add_pod("plain", 3)
    # the client has no route to the pod subnet: without masquerading, no answer comes back
    assert ping(plain.ns, CLIENT_IP, count=2)["received"] == 0
    masq = c.add_pod("masq", 2, ip_masq=True)
    assert ping(masq.ns, CLIENT_IP)["received"] == 3
    table = nsexec(c.node, "nft", "list", "table", "ip", "vswitch_masq").stdout
    assert f"ip saddr 10.{c.octet}.0.0/24" in table and "masquerade" in table
    c.daemon.call("detach", container_id=masq.cid, ifname="eth0")
    assert nsexec(c.node, "nft", "list", "tables").stdout.strip() == ""


# a connected UDP socket that reports what became of one datagram: an answer, "port
# unreachable" (ECONNREFUSED: the kernel matched an ICMP error to this very socket, so
# the error came from the address the socket is connected to, quoting what it sent,
# with valid checksums), or nothing
UNREACHABLE_PROBE = r"""
import socket, sys
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(1)
c.connect((sys.argv[1], int(sys.argv[2])))
for attempt in range(5):
    try:
        c.send(b"anyone?")
        c.recv(100)
        print("ANSWERED"); break
    except ConnectionRefusedError:
        print("REFUSED"); break
    except socket.timeout:
        continue
else:
    print("NO ANSWER")
"""


def test_port_unreachable_from_a_pod_comes_back_through_node_hostport(uplinked):
    """A hostPort whose pod has nothing listening: the pod's ICMP port unreachable is
    translated with the flow (like conntrack's RELATED), so the client's socket, connected
    to node:hostPort, is refused instead of waiting; the same from a pod via the node IP
    and on its own hostPort (hairpin)."""
    c = uplinked
    a = c.add_pod("a", 2, port_mappings=[{"hostPort": 5354, "containerPort": 54, "protocol": "udp"}])
    b = c.add_pod("b", 3)

    def probe(ns):
        return nsexec(ns, sys.executable, "-c", UNREACHABLE_PROBE, NODE_IP, "5354").stdout.strip()

    assert ping(c.client, NODE_IP)["received"] == 3
    assert probe(c.client) == "REFUSED"
    assert probe(b.ns) == "REFUSED"
    assert probe(a.ns) == "REFUSED"
    m = c.daemon.call("conntrack")["entries"]
    assert {e["orig_src"] for e in m if e["orig_dport"] == 5354} == {CLIENT_IP, b.ip, a.ip}
    c.detach_all()
