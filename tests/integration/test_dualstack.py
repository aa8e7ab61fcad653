"""Dual stack on a real node (issue 12): IPv6-only and IPv4/IPv6 pods attached through the
plugin (host-local with two ranges, as Kubernetes configures it) on a node whose uplink NIC
has IPv4 and IPv6 addresses and routes, attached with --uplink.

Expected values come from the setup and the RFCs, not from the daemon: the addresses are
host-local's first free ones of each range, the gateways the first address of each range;
a hostPort connection seen by the pod comes from the client's own address (DNAT only), a
hairpin one from the pod's gateway (the switch source-NATs it, as for IPv4); an ICMPv6 port
unreachable (RFC 4443 type 1 code 4) translated back with the flow makes the client's
connected socket fail with ECONNREFUSED. The node's addresses, routes and sysctls are read
before the daemon starts and compared after a clean exit and after kill -9 + restart +
clean exit. Namespaces are the test's own (``vt`` + pid + random) and removed in every
outcome; only the daemon's PID is signalled."""
import json
import sys
import threading
import time

import pytest

from vswitch import lab
from vswitch_cni.install import conflist, install
from tests.integration.helpers import (Daemon, iperf3, nsexec, nspopen, ping, received_bps, sh,
                                       wait_listening)

NODE4, NODE6 = "192.0.2.1", "2001:db8:1::1"
CLIENT4, CLIENT6 = "192.0.2.10", "2001:db8:1::10"
ROUTER_LL = "fe80::1"                 # the client's link-local address: the node's IPv6 router
FAR4, FAR6 = "198.51.100.1", "2001:db8:ff::1"   # on the client's lo, reached through the node's routes

# servers answering with the peer's address (both families: an AF_INET6 socket on "::"
# that also takes IPv4, as ::ffff:a.b.c.d)
TCP_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1]))); s.listen(16)
while True:
    c, peer = s.accept()
    data = c.recv(1000)
    c.sendall(b"peer=" + peer[0].removeprefix("::ffff:").encode() + b" got=" + data)
    c.close()
"""
UDP_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"peer=" + peer[0].removeprefix("::ffff:").encode() + b" got=" + data, peer)
"""
# one exchange; REFUSED when an ICMP(v6) port unreachable reached this very socket
CLIENT = r"""
import socket, sys
proto, ip, port, msg, tries = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode(), int(sys.argv[5])
fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
err = None
for attempt in range(tries):
    try:
        if proto == "tcp":
            c = socket.create_connection((ip, port), timeout=2); c.sendall(msg)
            print(c.recv(1000).decode()); break
        c = socket.socket(fam, socket.SOCK_DGRAM); c.settimeout(1); c.connect((ip, port))
        c.send(msg); print(c.recv(65535).decode()); break
    except ConnectionRefusedError:
        print("REFUSED"); break
    except OSError as e:
        err = e
else:
    print("FAILED", err)
"""


def client(ns, proto, ip, port, msg="hi", tries=10):
    return nsexec(ns, sys.executable, "-c", CLIENT, proto, ip, str(port), msg, str(tries)).stdout.strip()


def wait_dad(ns, timeout_s=10.0):
    """Until no IPv6 address in ``ns`` is tentative (duplicate address detection done)."""
    deadline = time.monotonic() + timeout_s
    while "tentative" in nsexec(ns, "ip", "-6", "addr").stdout:
        if time.monotonic() > deadline:
            raise RuntimeError(nsexec(ns, "ip", "-6", "addr").stdout)
        time.sleep(0.1)


NODE_SYSCTLS = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv6.conf.default.forwarding")
NIC_SYSCTLS = ("net.ipv4.conf.{}.rp_filter", "net.ipv4.conf.{}.arp_ignore", "net.ipv6.conf.{}.disable_ipv6",
               "net.ipv6.conf.{}.forwarding")


def node_view(ns, nic):
    """The node's addresses, routes (main table, both families) and sysctls, comparable
    (once duplicate address detection of restored IPv6 addresses is over)."""
    wait_dad(ns)
    addrs = {}
    for link in json.loads(nsexec(ns, "ip", "-j", "addr", "show").stdout):
        addrs[link["ifname"]] = sorted((a["family"], a["local"], a["prefixlen"], a.get("scope"),
                                        tuple(sorted(k for k in a if a[k] is True)))
                                       for a in link.get("addr_info", []))
    routes = {}
    for fam in ("-4", "-6"):
        routes[fam] = sorted(json.dumps(r, sort_keys=True) for r in
                             json.loads(nsexec(ns, "ip", fam, "-j", "route", "show", "table", "main").stdout))
    keys = list(NODE_SYSCTLS) + [k.format(nic) for k in NIC_SYSCTLS]
    sysctls = {k: nsexec(ns, "sysctl", "-n", k).stdout.strip() for k in keys}
    return {"addresses": addrs, "routes": routes, "sysctl": sysctls,
            "nft": nsexec(ns, "nft", "list", "ruleset").stdout.strip()}


class Node:
    """A node namespace whose NIC (a veth to a client namespace, "outside the node") has an
    IPv4 and an IPv6 address, an IPv4 route and an IPv6 default route via the client's
    link-local address; vswitchd with --uplink on that NIC; the plugin installed with a
    dual-stack conflist (host-local, two ranges)."""

    def __init__(self, nss, tmp_path):
        self.nss = nss
        self.ns = nss.new("n")
        self.client = nss.new("c")
        self.nic, peer = f"up{self.ns[-7:]}", f"cl{self.ns[-7:]}"
        sh("ip", "link", "add", self.nic, "netns", self.ns, "type", "veth", "peer", "name", peer,
           "netns", self.client)
        for ns, dev in ((self.ns, self.nic), (self.client, peer)):
            nsexec(ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.dad_transmits=0")  # no DAD wait on this wire
        nsexec(self.ns, "ip", "addr", "add", f"{NODE4}/24", "dev", self.nic)
        nsexec(self.ns, "ip", "addr", "add", f"{NODE6}/64", "dev", self.nic)
        nsexec(self.ns, "ip", "link", "set", self.nic, "up")
        nsexec(self.client, "ip", "addr", "add", f"{CLIENT4}/24", "dev", peer)
        nsexec(self.client, "ip", "addr", "add", f"{CLIENT6}/64", "dev", peer)
        nsexec(self.client, "ip", "addr", "add", f"{ROUTER_LL}/64", "dev", peer)
        nsexec(self.client, "ip", "addr", "add", f"{FAR4}/32", "dev", "lo")
        nsexec(self.client, "ip", "addr", "add", f"{FAR6}/128", "dev", "lo")
        nsexec(self.client, "ip", "link", "set", peer, "up")
        nsexec(self.ns, "ip", "route", "add", "198.51.100.0/24", "via", CLIENT4, "dev", self.nic)
        nsexec(self.ns, "ip", "-6", "route", "add", "default", "via", ROUTER_LL, "dev", self.nic)
        wait_dad(self.ns)
        wait_dad(self.client)
        self.octet = lab.uid()[-2:]
        n = int(self.octet, 16) % 200 + 20
        self.subnet4, self.subnet6 = f"10.{n}.0.0/24", f"fd00:{n:x}::/64"
        self.gw4, self.gw6 = f"10.{n}.0.1", f"fd00:{n:x}::1"
        self.work = tmp_path
        self.daemon = Daemon(self.ns, tmp_path / "d", ["--uplink", self.nic])
        bin_dir = tmp_path / "bin"
        install(str(bin_dir), str(tmp_path / "net.d"), socket_path=self.daemon.socket)
        self.cni_path = [str(bin_dir), lab.SYSTEM_CNI_PATH]
        self.servers = []

    def chain(self, *subnets, **plugin_extra):
        conf = conflist(list(subnets), self.daemon.socket, name="ds" + self.octet)
        conf["plugins"][0]["ipam"]["dataDir"] = str(self.work / "ipam")
        conf["plugins"][0].update(plugin_extra)
        return lab.CniChain(conf, self.cni_path)

    def pod(self, role, *subnets, port_mappings=None, bandwidth=None):
        """A pod namespace attached through the plugin; returns (ns, result, chain, cid)."""
        ns = self.nss.new("p" + role)
        cid = f"ds-{role}-{lab.uid()}"
        chain = self.chain(*(subnets or (self.subnet4, self.subnet6)))
        rc = {}
        if port_mappings:
            rc["portMappings"] = port_mappings
        if bandwidth:
            rc["bandwidth"] = bandwidth
        res = chain.add(cid, lab.Namespaces.path(ns), runtime_config=rc)
        return Pod(ns, res, chain, cid, rc)

    def serve(self, ns, port, udp=False):
        self.servers.append(nspopen(ns, sys.executable, "-c", UDP_SERVER if udp else TCP_SERVER, port))
        wait_listening(ns, port, "udp" if udp else "tcp")

    def close(self):
        for p in self.servers:
            p.kill()
            p.wait(10)


class Pod:
    def __init__(self, ns, result, chain, cid, rc):
        self.ns, self.result, self.chain, self.cid, self.rc = ns, result, chain, cid, rc

    def ip(self, version):
        for e in self.result["ips"]:
            a = e["address"].split("/")[0]
            if (":" in a) == (version == 6):
                return a
        return None

    def delete(self):
        self.chain.delete(self.cid, lab.Namespaces.path(self.ns), runtime_config=self.rc, result=self.result)


@pytest.fixture
def node(nss, tmp_path):
    n = Node(nss, tmp_path)
    try:
        yield n
    finally:
        n.close()
        n.daemon.stop()


def test_dual_stack_and_ipv6_only_pods_through_the_plugin_on_an_uplinked_node(node):
    n = node
    before = node_view(n.ns, n.nic)
    assert before["sysctl"]["net.ipv6.conf.all.forwarding"] == "0"     # a new namespace's default
    n.daemon.start()
    mappings = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp"},
                {"hostPort": 5354, "containerPort": 54, "protocol": "udp"},        # nothing listens
                {"hostPort": 8446, "containerPort": 80, "protocol": "tcp", "hostIP": NODE6},
                {"hostPort": 8444, "containerPort": 80, "protocol": "tcp", "hostIP": NODE4}]
    dual = n.pod("dual", port_mappings=mappings)
    only6 = n.pod("six", n.subnet6)
    # host-local: the first free address of each range, the gateway its first address
    base4, base6 = n.subnet4.split(".0/")[0], n.subnet6.split("::/")[0]
    assert [e["address"] for e in dual.result["ips"]] == [f"{base4}.2/24", f"{base6}::2/64"]
    assert [e["address"] for e in only6.result["ips"]] == [f"{base6}::3/64"]
    d4, d6, s6 = dual.ip(4), dual.ip(6), only6.ip(6)

    # the daemon programmed addresses, a default route per family, the gateways on vsw0
    assert "default via " + n.gw4 in nsexec(dual.ns, "ip", "-4", "route").stdout
    assert "default via " + n.gw6 in nsexec(dual.ns, "ip", "-6", "route").stdout
    assert "default via " + n.gw6 in nsexec(only6.ns, "ip", "-6", "route").stdout
    assert nsexec(only6.ns, "ip", "-4", "addr", "show", "dev", "eth0").stdout.strip() == ""
    vsw0 = nsexec(n.ns, "ip", "addr", "show", "dev", "vsw0").stdout
    for a in (f"{n.gw4}/24", f"{n.gw6}/64", f"{NODE4}/24", f"{NODE6}/64"):
        assert a in vsw0, vsw0
    assert nsexec(n.ns, "sysctl", "-n", "net.ipv6.conf.all.forwarding").stdout.strip() == "1"

    # ND both ways through the switch, ping6 pod<->pod, pod<->gateway (and IPv4 still)
    assert ping(dual.ns, s6)["received"] == 3
    assert ping(only6.ns, d6)["received"] == 3
    assert ping(only6.ns, n.gw6)["received"] == 3
    assert ping(n.ns, s6)["received"] == 3
    assert ping(dual.ns, n.gw4)["received"] == 3
    pod_mac = json.loads(nsexec(only6.ns, "ip", "-j", "link", "show", "eth0").stdout)[0]["address"]
    neigh = json.loads(nsexec(n.ns, "ip", "-j", "-6", "neigh", "show", "dev", "vsw0").stdout)
    assert {e["dst"]: e.get("lladdr") for e in neigh}.get(s6) == pod_mac

    # TCP and UDP pod<->pod and pod<->gateway over IPv6
    n.serve(dual.ns, 80)
    n.serve(dual.ns, 53, udp=True)
    n.serve(n.ns, 7000)
    n.serve(n.ns, 7001, udp=True)
    assert client(only6.ns, "tcp", d6, 80) == f"peer={s6} got=hi"
    assert client(only6.ns, "udp", d6, 53) == f"peer={s6} got=hi"
    assert client(dual.ns, "tcp", n.gw6, 7000) == f"peer={d6} got=hi"
    assert client(only6.ns, "udp", n.gw6, 7001) == f"peer={s6} got=hi"

    # the node keeps its reachability on both families, its moved routes included
    for ip in (CLIENT4, CLIENT6, FAR4, FAR6):
        assert ping(n.ns, ip)["received"] == 3, ip
    for ip in (NODE4, NODE6):
        assert ping(n.client, ip)["received"] == 3, ip

    # hostPorts over IPv6: from outside (the client's own address), another pod (its own),
    # hairpin (the pod's gateway); no hostIP: both families; hostIP: that family only
    assert client(n.client, "tcp", NODE6, 8080) == f"peer={CLIENT6} got=hi"
    assert client(n.client, "udp", NODE6, 5353) == f"peer={CLIENT6} got=hi"
    assert client(n.client, "tcp", NODE4, 8080) == f"peer={CLIENT4} got=hi"
    assert client(only6.ns, "tcp", NODE6, 8080) == f"peer={s6} got=hi"
    assert client(only6.ns, "udp", NODE6, 5353) == f"peer={s6} got=hi"
    assert client(dual.ns, "tcp", NODE6, 8080) == f"peer={n.gw6} got=hi"
    assert client(dual.ns, "udp", NODE6, 5353) == f"peer={n.gw6} got=hi"
    assert client(n.client, "tcp", NODE6, 8446) == f"peer={CLIENT6} got=hi"
    assert client(n.client, "tcp", NODE4, 8444) == f"peer={CLIENT4} got=hi"
    # the other family of a hostIP mapping is not mapped: the node's own stack refuses
    assert client(n.client, "tcp", NODE4, 8446, tries=1) == "REFUSED"
    assert client(n.client, "tcp", NODE6, 8444, tries=1) == "REFUSED"
    rules = {(r["host_port"], r["family"]) for r in n.daemon.call("hostports")["rules"]}
    assert rules == {(8080, 4), (8080, 6), (5353, 4), (5353, 6), (5354, 4), (5354, 6), (8446, 6), (8444, 4)}
    # ICMPv6 port unreachable from the pod goes back with the flow, per family
    for ns in (n.client, only6.ns, dual.ns):
        assert client(ns, "udp", NODE6, 5354, tries=3) == "REFUSED", ns
    assert client(n.client, "udp", NODE4, 5354, tries=3) == "REFUSED"
    ct = n.daemon.call("conntrack")["entries"]
    assert {e["orig_src"] for e in ct if e["orig_dport"] == 5354} >= {CLIENT6, s6, d6, CLIENT4}

    # no iptables/nftables rule took part
    assert n.daemon.call("status")["ok"]
    assert nsexec(n.ns, "nft", "list", "ruleset").stdout.strip() == ""

    dual.delete()
    only6.delete()
    assert n.daemon.call("list")["attachments"] == []
    assert n.daemon.stop() == 0
    after = node_view(n.ns, n.nic)
    assert after == before


def test_ipv6_masquerade_table_only_while_a_masq_pod_exists(node):
    n = node
    n.daemon.start()
    plain = n.pod("plain", n.subnet4, n.subnet6)
    # the client has no route to the pod subnets: without masquerade nothing comes back
    assert ping(plain.ns, CLIENT6, count=2)["received"] == 0
    ns = n.nss.new("pm")
    chain = n.chain(n.subnet4, n.subnet6, ipMasq=True)
    res = chain.add("ds-masq", lab.Namespaces.path(ns))
    assert ping(ns, CLIENT6)["received"] == 3
    assert ping(ns, CLIENT4)["received"] == 3
    table6 = nsexec(n.ns, "nft", "list", "table", "ip6", "vswitch_masq").stdout
    assert f"ip6 saddr {n.subnet6} ip6 daddr != {n.subnet6} masquerade" in table6
    assert f"ip saddr {n.subnet4}" in nsexec(n.ns, "nft", "list", "table", "ip", "vswitch_masq").stdout
    chain.delete("ds-masq", lab.Namespaces.path(ns), result=res)
    assert nsexec(n.ns, "nft", "list", "tables").stdout.strip() == ""
    plain.delete()


def test_node_is_restored_after_kill9_restart_and_clean_exit(node):
    n = node
    before = node_view(n.ns, n.nic)
    n.daemon.start()
    pod = n.pod("k", port_mappings=[{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])
    n.serve(pod.ns, 80)
    assert client(n.client, "tcp", NODE6, 8080) == f"peer={CLIENT6} got=hi"
    n.daemon.kill9()
    n.daemon.start()
    assert client(n.client, "tcp", NODE6, 8080) == f"peer={CLIENT6} got=hi"
    for ip in (CLIENT4, CLIENT6, FAR4, FAR6):
        assert ping(n.ns, ip)["received"] == 3, ip
    pod.delete()
    assert n.daemon.stop() == 0
    assert node_view(n.ns, n.nic) == before
    # a clean exit with nothing attached restores the same way
    n.daemon.start()
    assert n.daemon.stop() == 0
    assert node_view(n.ns, n.nic) == before


def test_bad_dual_stack_input_is_refused_clearly(node):
    n = node
    n.daemon.start()
    # an IPv6 hostIP on an IPv4-only pod: the control API refuses it (code 4, naming it) and
    # attaches nothing; the plugin, like portmap, leaves a mapping of a family the pod has not out
    ns = n.nss.new("p4")
    bad = n.daemon.request({"op": "attach", "container_id": "ds-v4", "ifname": "eth0",
                            "netns": lab.Namespaces.path(ns),
                            "ips": [{"address": f"{n.gw4[:-1]}9/24", "gateway": n.gw4}],
                            "port_mappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp",
                                               "hostIP": NODE6}]})
    assert bad["ok"] is False and bad["code"] == 4, bad
    assert f"hostIP {NODE6} is IPv6 but the pod has no IPv6 address" in bad["msg"], bad
    assert n.daemon.call("list")["attachments"] == [] and n.daemon.call("hostports")["rules"] == []
    assert nsexec(ns, "ip", "link", "show", "eth0", check=False).returncode != 0
    v4 = n.pod("v4", n.subnet4, port_mappings=[{"hostPort": 8080, "containerPort": 80, "protocol": "tcp",
                                                "hostIP": NODE6}])
    assert n.daemon.call("hostports")["rules"] == []
    v4.delete()
    # a range overlapping the node's own (uplink) addresses
    with pytest.raises(lab.CniError) as err:
        n.pod("ov", "2001:db8:1::/64")
    assert err.value.code == 7 and "2001:db8:1::1/64" in err.value.msg, err.value.msg
    assert n.daemon.call("list")["attachments"] == []
    # host-local's reservations were released by the plugin (only its lock/last files remain)
    left = [p.name for p in (n.work / "ipam").rglob("*") if p.is_file()
            and p.name[0].isalnum() and not p.name.startswith(("last_reserved", "lock"))]
    assert left == []
    assert n.daemon.call("status")["ok"]


RATE_BPS = 20_000_000
BURST_BITS = 1_000_000
# MTU 1500, TCP with timestamps: IPv6 1428 payload bytes per 1514-byte frame (14+40+32+1428),
# IPv4 1448 (14+20+32+1448)
SHARE6, SHARE4 = 1428 / 1514, 1448 / 1514


def test_shaping_ipv6_accuracy_and_one_bucket_for_both_families(node):
    n = node
    n.daemon.start()
    eg = n.pod("eg", bandwidth={"egressRate": RATE_BPS, "egressBurst": BURST_BITS})
    ig = n.pod("ig", bandwidth={"ingressRate": RATE_BPS, "ingressBurst": BURST_BITS})
    sink = n.pod("sink")
    r_eg = received_bps(iperf3(sink.ns, sink.ip(6), eg.ns, seconds=5, omit=1)) / (RATE_BPS * SHARE6)
    r_ig = received_bps(iperf3(ig.ns, ig.ip(6), sink.ns, seconds=5, omit=1)) / (RATE_BPS * SHARE6)
    print(f"IPv6 egress {r_eg:.4f}, ingress {r_ig:.4f} of the rate on the wire")
    # the bounds of test_shaping.py (IPv4): above 1.02 the shaper let too much through; the
    # lower bound is the sender's, not the shaper's (a loaded machine that leaves iperf3
    # unscheduled for longer than the burst's 50 ms loses that credit: CI saw 0.977)
    assert 0.95 <= r_eg <= 1.02 and 0.95 <= r_ig <= 1.02, (r_eg, r_ig)
    # both families at once from the egress-shaped pod: one bucket. Two iperf3 reports cover
    # slightly different windows (the flows start apart), so the sum is read where the bucket
    # acts: the bytes the switch sent to the sink port, sampled while both flows run. Frame
    # bytes never exceed what the bucket charged (GSO frames are charged their segments' wire
    # bytes, D36), so over dt they stay within rate*dt + burst; two buckets would give ~2x.
    att = {a["container_id"]: a["port"] for a in n.daemon.call("list")["attachments"]}
    sink_port = att[sink.cid]

    def sent_to_sink():
        return n.daemon.call("counters", port=sink_port)["ports"][sink_port]["tx_bytes"]

    res = {}
    t = threading.Thread(target=lambda: res.__setitem__(4, iperf3(sink.ns, sink.ip(4), eg.ns, seconds=7,
                                                                  omit=1, port=5202)))
    t.start()
    th6 = threading.Thread(target=lambda: res.__setitem__(6, iperf3(sink.ns, sink.ip(6), eg.ns,
                                                                    seconds=7, omit=1)))
    th6.start()
    time.sleep(2.5)
    b0, t0 = sent_to_sink(), time.monotonic()
    time.sleep(3.0)
    b1, t1 = sent_to_sink(), time.monotonic()
    t.join()
    th6.join()
    measured_bps = (b1 - b0) * 8 / (t1 - t0)
    print(f"IPv4 + IPv6 at once: {measured_bps / RATE_BPS:.4f} of the rate in frame bytes at the switch "
          f"({received_bps(res[4]):.0f} + {received_bps(res[6]):.0f} bit/s goodput)")
    assert (b1 - b0) * 8 <= RATE_BPS * (t1 - t0) + BURST_BITS
    assert measured_bps >= 0.9 * RATE_BPS
    for p in (eg, ig, sink):
        p.delete()


def test_install_cni_writes_a_dual_stack_conflist(tmp_path):
    """vswitchctl install-cni --subnet A --subnet B: two host-local ranges, a default route
    per family (the list the tests above run through the plugin); bad pairs are refused."""
    def ctl(*args):
        return sh(sys.executable, "-m", "vswitch.cli", "install-cni", "--bin-dir", tmp_path / "bin",
                  "--conf-dir", tmp_path / "net.d", *args, check=False, cwd=str(lab.REPO))
    r = ctl("--subnet", "10.244.0.0/16", "--subnet", "fd00:10:244::/56")
    assert r.returncode == 0, r.stderr
    ipam = json.loads((tmp_path / "net.d" / "05-vswitch.conflist").read_text())["plugins"][0]["ipam"]
    assert ipam["ranges"] == [[{"subnet": "10.244.0.0/16"}], [{"subnet": "fd00:10:244::/56"}]]
    assert ipam["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
    for bad, why in ((("10.1.0.0/16", "10.2.0.0/16"), "one IPv4, one IPv6"),
                     (("fd00::/64", "fd01::/64", "10.0.0.0/8"), "one IPv4, one IPv6"),
                     (("fd00::1/64",), "not a network address with prefix")):
        r = ctl(*[a for s in bad for a in ("--subnet", s)])
        assert r.returncode == 2 and why in r.stderr and bad[-1] in r.stderr, r.stderr
