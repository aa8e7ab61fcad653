"""The Simulation API end to end: pods answer, hostPort DNAT and back, records, pcap, trace."""
import shutil
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6ND_NA, IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from vswitch.sim import frames as F
from vswitch.sim import Pod, Trace


def checksums_ok(frame: bytes) -> bool:
    """True if every checksum of the frame equals what scapy computes from scratch."""
    pkt = Ether(frame)
    rebuilt = pkt.copy()
    for layer in (IP, TCP, UDP, ICMP):
        if rebuilt.haslayer(layer):
            del rebuilt[layer].chksum
    if rebuilt.haslayer(IPv6):
        for lay in rebuilt[IPv6].iterpayloads():
            if hasattr(lay, "cksum"):
                del lay.cksum
    return bytes(Ether(bytes(rebuilt))) == frame


def test_pods_get_addresses_and_macs(sim):
    a, b = sim["a"], sim["b"]
    assert isinstance(a, Pod) and (a.ip, b.ip) == ("10.0.0.2", "10.0.0.3")
    assert a.mac != b.mac and int(a.mac[:2], 16) & 2       # locally administered
    assert sim.node_ip == "192.0.2.1" and sim.gateway == "10.0.0.1"
    c = sim.add_pod("c", ip="10.0.0.50", mac="02:aa:00:00:00:01")
    assert (c.ip, c.mac) == ("10.0.0.50", "02:aa:00:00:00:01")
    assert sim.add_pod("d").ip == "10.0.0.4"
    assert set(sim.pods) == {"a", "b", "c", "d"} and set(sim.externals) == {"client"}


@pytest.mark.parametrize("builder", ["ping", "udp", "syn", "arp"])
def test_frame_helpers_are_correct(sim, builder):
    a, b, client = sim["a"], sim["b"], sim["client"]
    frame = {"ping": lambda: a.ping(b, seq=7), "udp": lambda: a.udp_to(b, 53, b"q"),
             "syn": lambda: client.tcp_syn(sim.node_ip, 8080), "arp": lambda: a.arp_request(b)}[builder]()
    pkt = Ether(frame)
    assert checksums_ok(frame)
    if builder == "ping":
        assert (pkt.dst, pkt[IP].src, pkt[IP].dst, pkt[ICMP].type, pkt[ICMP].seq) == (b.mac, a.ip, b.ip, 8, 7)
    elif builder == "udp":
        assert (pkt[UDP].dport, bytes(pkt[UDP].payload)) == (53, b"q")
    elif builder == "syn":
        # an external reaches the node through the node's MAC (the gateway MAC)
        assert pkt.dst == sim.node.mac and pkt[TCP].flags == "S" and pkt[IP].dst == "192.0.2.1"
    else:
        assert pkt[ARP].op == 1 and pkt[ARP].pdst == b.ip and pkt.dst == "ff:ff:ff:ff:ff:ff"


def test_ping_between_pods(sim):
    a, b = sim["a"], sim["b"]
    a.send(a.ping(b, seq=3))
    sim.run()
    (t, reply), = a.received
    p = Ether(reply)
    assert t == 0 and p[ICMP].type == 0 and p[ICMP].seq == 3 and p[IP].src == b.ip
    assert checksums_ok(reply)
    assert [Ether(f)[ICMP].type for _, f in b.received] == [8]
    assert a.packets()[0][IP].dst == a.ip and a.packets()[0].time == 0


def test_pods_answer_arp_and_the_node_too(sim):
    a, b = sim["a"], sim["b"]
    a.send(a.arp_request(b))
    a.send(a.arp_request(sim.gateway))
    sim.run()
    replies = [Ether(f)[ARP] for _, f in a.received]
    assert sorted((r.psrc, r.hwsrc) for r in replies) == sorted([(b.ip, b.mac), (sim.gateway, sim.node.mac)])
    assert all(r.op == 2 and r.pdst == a.ip and r.hwdst == a.mac for r in replies)


def test_hostport_dnat_and_back(sim):
    """An external client reaches pod a via node-IP:8080; replies are translated back."""
    a, client = sim["a"], sim["client"]
    sim.add_port_mapping("a", host_port=8080, container_port=80, protocol="tcp")
    client.send(client.tcp_syn(sim.node_ip, 8080, sport=40000))
    sim.run()
    (_, seen_by_pod), = [(t, f) for t, f in a.received if Ether(f).haslayer(TCP)]
    p = Ether(seen_by_pod)
    assert (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == (client.ip, a.ip, 40000, 80)
    assert p.dst == a.mac and checksums_ok(seen_by_pod)
    (_, back), = client.received
    q = Ether(back)
    assert (q[IP].src, q[IP].dst, q[TCP].sport, q[TCP].dport) == (sim.node_ip, client.ip, 8080, 40000)
    assert q[TCP].flags == "SA" and q[TCP].ack == p[TCP].seq + 1 and checksums_ok(back)
    (ct,) = sim.conntrack()
    # the SYN-ACK went back; the client's final ACK has not been seen (D27: not established)
    assert ct["state"] == "SYN_RECV" and ct["in_port"] == "uplink" and ct["out_port"] == "a"


def test_hostport_with_cni_dict_udp_echo(sim):
    client = sim["client"]
    sim.add_port_mapping("a", {"hostPort": 5353, "containerPort": 53, "protocol": "udp"})
    client.send(client.udp_to(sim.node_ip, 5353, b"query", sport=3333))
    sim.run()
    (_, back), = client.received
    q = Ether(back)
    assert (q[IP].src, q[UDP].sport, q[UDP].dport, bytes(q[UDP].payload)) == (sim.node_ip, 5353, 3333, b"query")
    assert checksums_ok(back)
    assert sim.hostports()[0]["protocol"] == "udp"


def test_hairpin_and_pod_to_pod_via_hostport(sim):
    a, b = sim["a"], sim["b"]
    sim.add_port_mapping("a", host_port=8080, container_port=80)
    a.send(a.tcp_syn(sim.node_ip, 8080, sport=1111))      # a to its own hostPort
    b.send(b.tcp_syn(sim.node_ip, 8080, sport=2222))      # b to a via the hostPort
    sim.run()
    syns = [Ether(f) for _, f in a.received if Ether(f).haslayer(TCP) and Ether(f)[TCP].flags == "S"]
    srcs = sorted((p[IP].src, p[TCP].sport) for p in syns)
    assert srcs == sorted([(sim.gateway, 1111), (b.ip, 2222)])   # hairpin: SNAT to the gateway
    sa_a = [Ether(f) for _, f in a.received if Ether(f).haslayer(TCP) and Ether(f)[TCP].flags == "SA"]
    sa_b = [Ether(f) for _, f in b.received if Ether(f).haslayer(TCP)]
    assert [(p[IP].src, p[TCP].sport, p[TCP].dport) for p in sa_a] == [(sim.node_ip, 8080, 1111)]
    assert [(p[IP].src, p[TCP].sport, p[TCP].dport) for p in sa_b] == [(sim.node_ip, 8080, 2222)]
    assert sorted(c["hairpin"] for c in sim.conntrack()) == [False, True]


def test_closed_ports_rst_and_silence(sim):
    a, b = sim["a"], sim["b"]
    a.send(a.tcp_syn(b, 81))
    a.send(a.udp_to(b, 9, b"x"))
    sim.run()
    got = [Ether(f) for _, f in a.received]
    assert [str(p[TCP].flags) for p in got] == ["RA"]      # the UDP to a closed port: no answer


def test_listen_and_tcp_data_ack_fin(sim):
    a, b = sim["a"], sim["b"]
    b.listen(7000)
    a.send(a.tcp_to(b, 7000, b"hello", seq=100, ack=5))
    a.send(a.tcp_to(b, 7000, b"", flags=F.TCP_FIN | F.TCP_ACK, seq=105, ack=5))
    sim.run()
    flags = [(str(Ether(f)[TCP].flags), Ether(f)[TCP].ack) for _, f in a.received]
    assert flags == [("A", 105), ("FA", 106)]


def test_pod_to_external_is_routed_by_the_node(sim):
    a, client = sim["a"], sim["client"]
    client.listen(53, "udp")
    a.send(a.udp_to(client, 53, b"out"))
    sim.run()
    (_, at_client), = client.received
    p = Ether(at_client)
    assert p.src == sim.node.mac and p.dst == client.mac and p[IP].ttl == 63 and checksums_ok(at_client)
    (_, back), = a.received                # the echo came back, routed again
    q = Ether(back)
    assert q[IP].src == client.ip and q[IP].ttl == 63 and bytes(q[UDP].payload) == b"out"
    assert sim.counters()["sim"]["node_routed"] == 2


def test_ipv6_ping_and_neighbour_solicitation(make_sim):
    sim = make_sim(subnet="10.0.0.0/24", subnet6="fd00::/64")
    a, b = sim.add_pod("a"), sim.add_pod("b")
    assert (a.ip6, b.ip6) == ("fd00::2", "fd00::3")
    a.send(a.ping(b.ip6, seq=9))
    grp, gmac = F.solicited_node(F.ip_bytes(b.ip6))
    ns = F.ether(gmac, a.mac_bytes, F.ETH_IP6,
                 F.ipv6(F.ip_bytes(a.ip6), grp, 58,
                        F.icmp6(a.ip6, grp, 135, 0, F.ns_body(F.ip_bytes(b.ip6), a.mac_bytes)), 255))
    a.send(ns)
    sim.run()
    got = [Ether(f) for _, f in a.received]
    assert any(p.haslayer(ICMPv6EchoReply) and p[ICMPv6EchoReply].seq == 9 for p in got)
    na = [p for p in got if p.haslayer(ICMPv6ND_NA)]
    assert na and na[0][ICMPv6ND_NA].tgt == b.ip6 and na[0].src == b.mac


def test_clock_send_at_run_and_advance(sim):
    a, b = sim["a"], sim["b"]
    a.send(a.ping(b, seq=1), at_ns=5_000)
    a.send(a.ping(b, seq=2), at_ns=1_000)
    assert sim.now == 0
    sim.run(until_ns=2_000)
    assert sim.now == 2_000 and [t for t, _ in a.received] == [1_000]
    sim.advance(10_000)
    assert sim.now == 12_000 and [t for t, _ in a.received] == [1_000, 5_000]
    assert sim.run() == 0 and sim.now == 12_000        # idle: nothing to do, the clock stays


def test_reply_delay(make_sim):
    sim = make_sim(reply_delay_ns=30_000)
    a, b = sim.add_pod("a"), sim.add_pod("b")
    a.send(a.ping(b))
    sim.run()
    assert [t for t, _ in a.received] == [30_000]


def test_counters_shape(sim):
    a, b = sim["a"], sim["b"]
    a.send(a.ping(b))
    sim.run()
    c = sim.counters()
    assert set(c) == {"global", "ports", "sim"}
    assert set(c["ports"]) == {"host", "a", "b", "uplink"}
    assert c["ports"]["a"]["rx_packets"] == 1 and c["ports"]["a"]["tx_packets"] == 1
    assert c["global"]["packets"] == 2 and c["sim"]["frames_in"] == 2 and c["sim"]["replies"] == 1
    assert all(isinstance(v, int) for part in ("global", "sim") for v in c[part].values())


def test_trace_readable_and_stateless(sim):
    a, b = sim["a"], sim["b"]
    b.send(b.ping(a))
    sim.run()
    before = sim.counters()
    tr = sim.trace(a.ping(b), in_port="a")
    assert isinstance(tr, Trace) and tr[0][0] == "rx"
    assert tr.output == f"port {sim.switch.port_id('b')} (b)"
    assert "output" in str(tr) and "\n" in str(tr)
    assert sim.counters() == before


def test_write_pcap_read_by_scapy_and_tcpdump(sim, tmp_path):
    a, b = sim["a"], sim["b"]
    a.send(a.ping(b, seq=1), at_ns=1_500_000_123)
    sim.run()
    path = tmp_path / "a.pcap"
    assert sim.write_pcap("a", path) == 2
    pkts = rdpcap(str(path))
    assert [p[ICMP].type for p in pkts] == [8, 0]
    assert float(pkts[0].time) == pytest.approx(1.500000123, abs=1e-9)
    assert bytes(pkts[1]) == a.received[0][1]
    if shutil.which("tcpdump"):
        out = subprocess.run(["tcpdump", "-nn", "--nano", "-r", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 2 and "01.500000123" in lines[0]
        assert "ICMP echo request" in lines[0] and "ICMP echo reply" in lines[1]


def test_capture_limit_bounds_memory(make_sim):
    sim = make_sim(capture_limit=3)
    a, b = sim.add_pod("a"), sim.add_pod("b")
    for i in range(10):
        a.send(a.ping(b, seq=i))
    sim.run()
    assert len(a.received) == 3 and [Ether(f)[ICMP].seq for _, f in a.received] == [7, 8, 9]
    assert sim.counters()["sim"]["capture_dropped"] > 0


def test_remove_pod_frees_its_address(sim):
    sim.remove_pod("b")
    assert "b" not in sim.pods and "b" not in sim.switch
    assert sim.add_pod("b2", ip="10.0.0.3").ip == "10.0.0.3"


def test_bandwidth_can_be_set_later(sim):
    sim.set_bandwidth("b", {"ingressRate": 1_000_000, "ingressBurst": 8_000})
    assert sim.switch.shaper_state("b")["ingress"]["rate_bps"] == 1_000_000
