"""vswitchctl fdb and conntrack on a busy node (issue 11, finding 7): a MAC table filled
through the datapath (frames from tens of thousands of source MACs sent into the host port
by the node namespace) and thousands of hostPort flows are listed whole, in pages,
filtered by port and limited — although the whole listing is far larger than the 1 MiB
request limit that used to be applied to replies."""
import json
import sys

from tests.integration.helpers import nsexec, running_cluster

N_MACS = 70_000                 # more than the MAC table holds (65,536)
REQUEST_LIMIT = 1 << 20         # docs/control.md: a request line is at most 1 MiB

# frames with source MACs 02:00:xx:xx:xx:xx (xx = i), to an unknown unicast MAC, into vsw0
FLOOD = r"""
import socket, struct, sys, time
n, dev = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
dst = bytes.fromhex("020000000099")
for i in range(n):
    s.send(dst + b"\x02\x00" + struct.pack("!I", i) + b"\x88\xb5" + bytes(46))
    if i % 256 == 255:
        time.sleep(0.002)       # the TAP's queue (1000 frames) is read, not overrun
"""

# UDP datagrams from many source ports to the gateway's hostPort
UDP_FLOWS = r"""
import socket, sys, time
ip, port = sys.argv[1], int(sys.argv[2])
sports = [int(p) for p in sys.argv[3].split(",")]
for i, sport in enumerate(sports):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", sport))
    s.sendto(b"x", (ip, port))
    s.close()
    if i == 0:
        time.sleep(0.3)         # the gateway's ARP entry first
    elif i % 200 == 0:
        time.sleep(0.005)       # the TAP's queue is read, not overrun
"""


def _ctl_json(d, *args):
    return json.loads(d.ctl("--json", *args, timeout=120).stdout)


def test_fdb_of_a_full_mac_table_is_listed_whole_in_pages(nss, tmp_path):
    # no learning limit (D44: 1000 new MACs/s per port by default): the table fills in seconds
    with running_cluster(nss, tmp_path, daemon_args=["--mac-learn-rate", "0"]) as c:
        d = c.daemon
        sent = {f"02:00:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
                for i in range(N_MACS)}
        before = -1
        for _ in range(4):              # until learning stops growing the table
            nsexec(c.node, sys.executable, "-c", FLOOD, N_MACS, "vsw0", timeout=300)
            total = d.call("fdb", limit=1)["total"]
            if total == before:
                break
            before = total
        whole = _ctl_json(d, "fdb")
        macs = [e["mac"] for e in whole["entries"]]
        assert len(macs) == whole["total"] == len(set(macs))
        assert len(json.dumps(whole["entries"])) > REQUEST_LIMIT       # the old failure
        assert len(set(macs) & sent) >= len(macs) - 16, "entries that were never sent"
        assert len(macs) >= 20_000, f"only {len(macs)} MACs learned of {N_MACS}"
        print(f"\nfdb listed whole: {len(macs)} entries, {len(json.dumps(whole))} bytes of JSON")
        # pages: every entry once, in key order, whatever the page size
        paged, cursor = [], None
        while True:
            r = d.call("fdb", limit=7777, **({"cursor": cursor} if cursor else {}))
            paged += [e["mac"] for e in r["entries"]]
            cursor = r["next"]
            if cursor is None:
                break
        assert sorted(paged) == sorted(macs) and len(paged) == len(set(paged))
        assert len(_ctl_json(d, "fdb", "--limit", "10")["entries"]) == 10
        on_host = _ctl_json(d, "fdb", "--port", "vsw0")
        assert {e["port"] for e in on_host["entries"]} == {"vsw0"}
        assert on_host["total"] == len(on_host["entries"]) >= len(macs) - 16
        table = d.ctl("fdb", "--limit", "3").stdout.splitlines()
        assert table[0].split() == ["VLAN", "MAC", "PORT", "AGE(s)"] and len(table) == 4
        bad = d.ctl("fdb", "--port", "no-such-port", check=False)
        assert bad.returncode == 1 and "no-such-port" in bad.stderr
        bad = d.request({"op": "fdb", "cursor": "zz"})
        assert bad["code"] == 4 and "cursor" in bad["msg"]
        bad = d.request({"op": "fdb", "limit": 0})
        assert bad["code"] == 4 and "limit" in bad["msg"]


def test_conntrack_with_thousands_of_flows_is_listed_whole(nss, tmp_path):
    n_flows = 6000
    with running_cluster(nss, tmp_path) as c:
        a = c.add_pod("a", 2)
        b = c.add_pod("b", 3, port_mappings=[{"hostPort": 8080, "containerPort": 80, "protocol": "udp"}])
        wanted = set(range(20000, 20000 + n_flows))
        missing = sorted(wanted)
        for _ in range(3):
            # a datagram the pod's TAP queue dropped while the machine was busy (UDP: nothing
            # resends it) is sent again: the listing, not the load, is under test
            nsexec(a.ns, sys.executable, "-c", UDP_FLOWS, c.gateway, 8080, ",".join(map(str, missing)),
                   timeout=300)
            whole = _ctl_json(c.daemon, "conntrack")
            ours = [e for e in whole["entries"] if e["orig_src"] == a.ip and e["orig_dport"] == 8080]
            missing = sorted(wanted - {e["orig_sport"] for e in ours})
            if not missing:
                break
        assert len(whole["entries"]) == whole["total"]
        assert {e["orig_sport"] for e in ours} == set(range(20000, 20000 + n_flows))
        assert all(e["reply_src"] == b.ip and e["reply_sport"] == 80 for e in ours)
        assert len(json.dumps(whole["entries"])) > REQUEST_LIMIT
        to_b = _ctl_json(c.daemon, "conntrack", "--port", b.port)
        assert to_b["total"] >= n_flows and all(b.port in (e["in_port"], e["out_port"]) for e in to_b["entries"])
        assert len(_ctl_json(c.daemon, "conntrack", "--limit", "25")["entries"]) == 25
        print(f"\nconntrack listed whole: {whole['total']} entries, {len(json.dumps(whole))} bytes of JSON")
