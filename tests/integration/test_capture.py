"""Acceptance 6: vswitchctl capture writes a pcap that scapy and tcpdump read, holding the
frames of a ping."""
import subprocess
import sys
import time

from scapy.all import ICMP, IP, rdpcap

from tests.integration.helpers import REPO, ping, sh


def test_capture_pcap_holds_the_ping_and_is_readable(cluster, tmp_path):
    a = cluster.add_pod("a", 2)
    b = cluster.add_pod("b", 3)
    assert ping(a.ns, b.ip, count=1)["received"] == 1     # ARP settled
    pcap = tmp_path / "a.pcap"
    cap = subprocess.Popen([sys.executable, "-m", "vswitch.cli", "--socket", cluster.daemon.socket,
                            "capture", a.port, "-w", str(pcap), "-d", "3"], cwd=str(REPO),
                           env=cluster.daemon.env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not cluster.daemon.call("show")["captures"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ping(a.ns, b.ip, count=3)["received"] == 3
    out, _ = cap.communicate(timeout=30)
    assert cap.returncode == 0 and "packets written" in out

    pkts = rdpcap(str(pcap))
    echo = [p for p in pkts if ICMP in p and p[ICMP].type == 8 and p[IP].dst == b.ip]
    reply = [p for p in pkts if ICMP in p and p[ICMP].type == 0 and p[IP].src == b.ip]
    assert len(echo) >= 3 and len(reply) >= 3
    r = sh("tcpdump", "-nr", str(pcap), "icmp")
    assert r.stdout.count("ICMP echo request") >= 3 and r.stdout.count("ICMP echo reply") >= 3
