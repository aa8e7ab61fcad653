"""L2 isolation on a real node (issue 11, findings 1-3): vswitchd with --uplink, pods attached
through the control API, traffic between namespaces this test creates.

(a) After a daemon restart (tables empty) a third pod's interface sees none of the UDP frames
    between two pods (the issue saw 201 of 201): pod MACs are static entries from attach.
(b) A pod shaped to 10 Mbit/s ingress, flooded with broadcasts and unicast right after a
    restart, receives no more than burst + rate * t (flood copies pass its shaper).
(c) A MAC flood of random source MACs from outside through the uplink: learning is limited
    and counted, the pods' static entries stay, a pod attached afterwards gets its unicast
    and no other pod sees a copy; the daemon lives.
Each is bounded in time and prints its figures.
"""
import sys
import time

import pytest

from tests.integration.helpers import (UPLINK_CLIENT_IP, UPLINK_NODE_IP, uplinked_node,
                                       nsexec, nspopen, ping)

NODE_IP, CLIENT_IP = UPLINK_NODE_IP, UPLINK_CLIENT_IP
RATE_BPS = 10_000_000
BURST_BITS = 100_000
MAC_FLOOD_FRAMES = 200_000
MAC_FLOOD_MAX_S = 20

UDP_RECEIVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2])); n = 0
try:
    while True:
        s.recvfrom(100); n += 1
except socket.timeout:
    pass
print(n)
"""
UDP_SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"%d" % i, (sys.argv[1], int(sys.argv[2]))); time.sleep(0.002)
"""
# counts frames (and their bytes) an interface sees: UDP to one port, or one EtherType
SNIFFER = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)); s.bind((sys.argv[1], 0))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.settimeout(0.2); what = sys.argv[2]; end = time.monotonic() + float(sys.argv[3]); n = nbytes = 0
print("ready", flush=True)
while time.monotonic() < end:
    try: f = s.recv(4000)
    except socket.timeout: continue
    if what.startswith("udp:"):
        hit = (f[12:14] == b"\x08\x00" and f[23] == 17
               and struct.unpack("!H", f[14 + (f[14] & 15) * 4 + 2:][:2])[0] == int(what[4:]))
    else:
        hit = f[12:14] == bytes.fromhex(what)
    if hit:
        n += 1; nbytes += len(f)
print(n, nbytes)
"""
# raw frames of EtherType 88b5 (local experimental), 1000 bytes, to each dst MAC in turn,
# for a given time
RAW_BLAST = r"""
import socket, sys, time
ifname, dsts, secs = sys.argv[1], [bytes.fromhex(d) for d in sys.argv[2].split(",")], float(sys.argv[3])
src = bytes.fromhex(open(f"/sys/class/net/{ifname}/address").read().strip().replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((ifname, 0))
frames = [d + src + b"\x88\xb5" + bytes(986) for d in dsts]
end = time.monotonic() + secs; n = 0
while time.monotonic() < end:
    for f in frames:
        try: s.send(f); n += 1
        except OSError: time.sleep(0.0005)
print(n)
"""
# random (unicast, locally administered) source MACs to random unknown unicast MACs
MAC_FLOOD = r"""
import os, socket, sys, time
ifname, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((ifname, 0))
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
pad = b"\x88\xb5" + bytes(46)
end = time.monotonic() + secs; sent = 0; t0 = time.monotonic()
while sent < n and time.monotonic() < end:
    r = bytearray(os.urandom(12)); r[0] = (r[0] & 0xfc) | 2; r[6] = (r[6] & 0xfc) | 2
    try: s.send(bytes(r) + pad); sent += 1
    except OSError: time.sleep(0.0005)
print(sent, round(time.monotonic() - t0, 2))
"""


@pytest.fixture
def node(nss, tmp_path):
    with uplinked_node(nss, tmp_path, ()) as c:
        yield c


def _mac(pod):
    return nsexec(pod.ns, "cat", "/sys/class/net/eth0/address").stdout.strip()


def _sniff(c, pod, what, secs):
    p = nspopen(pod.ns, sys.executable, "-c", SNIFFER, "eth0", what, str(secs), stdout=-1)
    c.procs.append(p)
    assert p.stdout.readline().strip() == "ready"
    return p


def _result(p):
    out = p.communicate(timeout=60)[0].split()
    return int(out[0]), int(out[1])


def _restart(c):
    """Restart the daemon; the entries it learned on the pods' side since (the uplink's are
    the client namespace's own frames, its IPv6 ND and MLD, which may arrive at any time)."""
    c.daemon.stop()
    c.daemon.start()
    return [e for e in c.daemon.call("fdb", limit=10000)["entries"] if not e["static"] and e["port"] != c.nic]


def _unicast_leak(c, src, dst, other, n=201):
    """n UDP datagrams src -> dst (port 9999); (received by dst, seen on other's interface)."""
    rx = nspopen(dst.ns, sys.executable, "-c", UDP_RECEIVER, "9999", "3", stdout=-1)
    c.procs.append(rx)
    sniff = _sniff(c, other, "udp:9999", 2 + n * 0.002 + 3)
    time.sleep(0.3)
    nsexec(src.ns, sys.executable, "-c", UDP_SENDER, dst.ip, "9999", str(n), timeout=60)
    return int(rx.communicate(timeout=60)[0]), _result(sniff)[0]


def test_after_a_restart_a_third_pod_sees_none_of_two_pods_unicast(node):
    c = node
    a, b, o = c.add_pod("a", 2), c.add_pod("b", 3), c.add_pod("o", 4)
    assert ping(b.ns, a.ip)["received"] == 3 and ping(a.ns, b.ip)["received"] == 3   # ARP caches filled
    learned = _restart(c)              # the switch's tables start empty; the pods' ARP caches do not
    received, leaked = _unicast_leak(c, b, a, o)
    print(f"after a restart (learned entries: {len(learned)}): a received {received}/201 UDP frames "
          f"from b; the third pod's interface saw {leaked}")
    assert learned == []
    assert received >= 195
    assert leaked == 0
    assert c.daemon.call("counters")["global"]["mac_stolen"] == 0


def test_a_shaped_pods_flooded_input_is_shaped(node):
    c = node
    bw = {"ingressRate": RATE_BPS, "ingressBurst": BURST_BITS}
    s = c.add_pod("s", 2, bandwidth=bw)
    u, x = c.add_pod("u", 3), c.add_pod("x", 4)
    _restart(c)
    secs = 3.0
    sniff_s = _sniff(c, s, "88b5", secs + 2)
    sniff_u = _sniff(c, u, "88b5", secs + 2)
    sent = int(nsexec(x.ns, sys.executable, "-c", RAW_BLAST, "eth0",
                      "ffffffffffff," + _mac(s).replace(":", ""), str(secs), timeout=60).stdout)
    n_s, bytes_s = _result(sniff_s)
    n_u, bytes_u = _result(sniff_u)
    bps_s, bps_u = bytes_s * 8 / secs, bytes_u * 8 / secs
    pc = c.daemon.call("counters", port=s.attachment["port"])["ports"][s.attachment["port"]]
    print(f"shaped pod (ingress {RATE_BPS / 1e6:g} Mbit/s, burst {BURST_BITS} bit): {secs:g} s of broadcasts "
          f"and unicast to it ({sent} frames sent): it received {n_s} frames, {bps_s / 1e6:.2f} Mbit/s; "
          f"an unshaped pod received {n_u} broadcasts, {bps_u / 1e6:.1f} Mbit/s; "
          f"the shaper dropped {pc['drop_queue_full']} (queue full)")
    # 2 s of slack: the sniffers' windows are longer than the blast, and the queue drains after it
    assert bytes_s * 8 <= BURST_BITS + RATE_BPS * (secs + 2)
    assert bps_u > 2 * RATE_BPS                       # the flood was offered well above the rate
    assert n_s > 0 and pc["drop_queue_full"] > 0


def test_a_mac_flood_through_the_uplink_changes_nothing_for_pods(node):
    c = node
    a, b, o = c.add_pod("a", 2), c.add_pod("b", 3), c.add_pod("o", 4)
    g0 = c.daemon.call("counters")["global"]
    out = nsexec(c.client, sys.executable, "-c", MAC_FLOOD, c.peer, str(MAC_FLOOD_FRAMES), str(MAC_FLOOD_MAX_S),
                 timeout=MAC_FLOOD_MAX_S + 30).stdout.split()
    sent, secs = int(out[0]), float(out[1])
    time.sleep(0.5)
    g = c.daemon.call("counters")["global"]
    d = c.add_pod("d", 5)                            # attached after the flood
    received, leaked = _unicast_leak(c, b, d, o)
    fdb = c.daemon.call("fdb", limit=1)
    static = {p.attachment["port"]: [e["mac"] for e in c.daemon.call("fdb", port=p.attachment["port"])["entries"]
                                     if e["static"]] for p in (a, b, o, d)}
    learned = g["mac_learned"] - g0["mac_learned"]
    limited = g["mac_learn_limited"] - g0["mac_learn_limited"]
    print(f"MAC flood: {sent} frames of random source MACs through the uplink in {secs} s: learned {learned}, "
          f"mac_learn_limited {limited}, mac_evicted {g['mac_evicted']}, mac_table_full {g['mac_table_full']}; "
          f"fdb {fdb['total']} entries; pod d attached afterwards received {received}/201 from b, "
          f"a third pod saw {leaked}")
    assert sent > 0
    assert limited > 0 and learned + limited >= sent * 9 // 10     # every new MAC: learned or counted
    assert learned <= 1000 + 1000 * (secs + 2)                      # 1000/s, burst 1000 (D44)
    assert static == {p.attachment["port"]: [_mac(p)] for p in (a, b, o, d)}   # each pod's MAC, static
    assert received >= 195 and leaked == 0
    assert ping(a.ns, b.ip)["received"] == 3
    assert c.daemon.proc.poll() is None
