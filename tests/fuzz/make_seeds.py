"""Writes the seed inputs of the fuzz corpus (run once; the seeds are committed).

    python tests/fuzz/make_seeds.py

Each seed is a well-formed input of a target in ``harness``: frames a node really sees
(ARP, IPv4/IPv6 TCP/UDP/ICMP, a hostPort flow and its reply, hairpin, 802.1Q, fragments,
a spoofed source, a GSO frame with a virtio-net header), so that mutation starts from deep
inside the parser. Built with scapy, which only tests and this script use.
"""
import hashlib
import os
import struct
import sys

from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6ND_NS, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT_MAC, CLIENT4, CLIENT6 = "02:00:00:09:00:01", "192.168.7.1", "2001:db8::7:1"
NODE_MAC = "02:00:00:00:aa:01"


def mac(b):
    return ":".join(f"{x:02x}" for x in b)


def ip4(b):
    return ".".join(str(x) for x in b)


def ip6(b):
    import ipaddress
    return str(ipaddress.IPv6Address(b))


def frames():
    """(in_port, scapy frame) pairs."""
    p2, p3 = mac(H.pod_mac(2)), mac(H.pod_mac(3))
    gw = mac(H.GW_MAC)
    yield H.PODS[0], Ether(dst="ff:ff:ff:ff:ff:ff", src=p2) / ARP(
        op=1, hwsrc=p2, psrc=ip4(H.pod_ip4(2)), pdst=ip4(H.GW4))
    yield H.PODS[0], Ether(dst=p3, src=p2) / IP(src=ip4(H.pod_ip4(2)), dst=ip4(H.pod_ip4(3))) / \
        UDP(sport=1234, dport=53) / b"query"
    yield H.PODS[0], Ether(dst=p3, src=p2) / IP(src=ip4(H.pod_ip4(2)), dst=ip4(H.pod_ip4(3))) / \
        TCP(sport=40000, dport=80, flags="S")
    yield H.PODS[1], Ether(dst=p2, src=p3) / IPv6(src=ip6(H.pod_ip6(3)), dst=ip6(H.pod_ip6(2))) / \
        ICMPv6EchoRequest()
    yield H.PODS[1], Ether(dst="33:33:ff:00:00:01", src=p3) / IPv6(
        src=ip6(H.pod_ip6(3)), dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt=ip6(H.GW6))
    yield H.UPLINK, Ether(dst=NODE_MAC, src=CLIENT_MAC) / IP(src=CLIENT4, dst=ip4(H.NODE4)) / \
        TCP(sport=50000, dport=8080, flags="S")
    yield H.UPLINK, Ether(dst=NODE_MAC, src=CLIENT_MAC) / IP(src=CLIENT4, dst=ip4(H.NODE4)) / \
        UDP(sport=50001, dport=5353) / b"dns?"
    yield H.UPLINK, Ether(dst=NODE_MAC, src=CLIENT_MAC) / IPv6(src=CLIENT6, dst=ip6(H.NODE6)) / \
        UDP(sport=50002, dport=9000) / b"v6"
    yield H.PODS[0], Ether(dst=gw, src=p2) / IP(src=ip4(H.pod_ip4(2)), dst=ip4(H.NODE4)) / \
        TCP(sport=40001, dport=8080, flags="S")                       # hairpin
    yield H.PODS[0], Ether(dst=CLIENT_MAC, src=p2) / IP(src=ip4(H.pod_ip4(2)), dst=CLIENT4) / \
        TCP(sport=80, dport=50000, flags="SA")                        # the hostPort reply
    yield H.PODS[0], Ether(dst=p3, src=p2) / IP(src="10.0.0.99", dst=ip4(H.pod_ip4(3))) / \
        ICMP()                                                        # spoofed source
    yield H.PODS[0], Ether(dst=p3, src=p2) / Dot1Q(vlan=5) / IP(src=ip4(H.pod_ip4(2)),
                                                               dst=ip4(H.pod_ip4(3))) / ICMP()
    for frag in fragment(IP(src=CLIENT4, dst=ip4(H.NODE4)) / UDP(sport=50003, dport=5353) /
                         (b"x" * 3000), fragsize=1400):
        yield H.UPLINK, Ether(dst=NODE_MAC, src=CLIENT_MAC) / frag
    # VXLAN (docs/datapath.md "VXLAN"): a pod's frame to a remote pod (encapsulated), and a
    # frame from the peer for a local pod (decapsulated)
    yield H.PODS[0], Ether(dst=gw, src=p2) / IP(src=ip4(H.pod_ip4(2)), dst="10.1.3.4") / \
        TCP(sport=40002, dport=80, flags="S")
    yield H.PODS[1], Ether(dst=mac(H.VTEP_MAC), src=p3) / IPv6(src=ip6(H.pod_ip6(3)), dst="fd01::9") / \
        UDP(sport=40003, dport=53) / b"v6 remote"
    inner = Ether(dst=mac(H.VTEP_MAC), src=mac(H.PEER_VTEP_MAC)) / IP(src="10.1.3.4", dst=ip4(H.pod_ip4(2)),
                                                                      ttl=63) / UDP(sport=53, dport=40003)
    yield H.UPLINK, Ether(dst=mac(H.NODE_MAC), src=mac(H.HOP_MAC)) / IP(src=ip4(H.PEER4), dst=ip4(H.NODE4),
                                                                         flags="DF") / \
        UDP(sport=50000, dport=4789, chksum=0) / VXLAN(vni=H.VNI, flags=0x08) / inner


def record(port, frame, hdr=None, new_batch=False, step=0):
    flags = (step & 7) | (0x08 if new_batch else 0) | (0x10 if hdr else 0)
    return bytes([port, flags]) + struct.pack("!H", len(frame)) + (hdr or b"") + frame


def write(target, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


def main():
    pairs = [(port, bytes(f)) for port, f in frames()]
    for port, f in pairs:
        write("parse", bytes([port]) + f)
    # one batch of everything, then the same split over time steps with a GSO header
    write("batch", b"".join(record(p, f) for p, f in pairs))
    gso = struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 1)     # NEEDS_CSUM, TCPv4, 12 bytes
    big = bytes(Ether(dst=mac(H.pod_mac(3)), src=mac(H.pod_mac(2))) /
                IP(src=ip4(H.pod_ip4(2)), dst=ip4(H.pod_ip4(3))) / TCP(sport=1, dport=2) /
                (b"y" * 1900))
    write("batch", b"".join(record(p, f, new_batch=i % 3 == 0, step=i % 6)
                            for i, (p, f) in enumerate(pairs)) + record(2, big, hdr=gso, step=2))
    print(f"wrote {len(pairs)} parse seeds and 2 batch seeds under {HERE}/corpus")


if __name__ == "__main__":
    main()
