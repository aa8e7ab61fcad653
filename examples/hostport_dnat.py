"""Two pods and a hostPort, followed through DNAT and back.

Pod "web" publishes container port 80 as hostPort 8080. A client beyond the node's uplink,
pod "other" on the same node, and "web" itself (hairpin) each open a connection to
node-IP:8080; the script prints every frame at each step, as the sender sent it, as the
pod saw it, and as the reply came back, plus the conntrack table.

    python examples/hostport_dnat.py [--impl py|c] [--pcap-dir DIR]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import scapy.layers.inet  # noqa: E402,F401  (binds IP/TCP under Ether)
from scapy.layers.l2 import Ether  # noqa: E402

from vswitch.sim import Simulation  # noqa: E402


def show(label, frame):
    print(f"  {label:<22} {Ether(frame).summary()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", choices=["py", "c"], default=None, help="datapath (default: the build)")
    ap.add_argument("--pcap-dir", help="write one pcap per port there")
    args = ap.parse_args(argv)

    sim = Simulation(subnet="10.0.0.0/24", seed=1, impl=args.impl, node_ips=["192.0.2.1"])
    web = sim.add_pod("web")
    other = sim.add_pod("other")
    client = sim.add_external("client", ip="192.0.2.10")
    sim.add_port_mapping("web", {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})
    print(f"node {sim.node_ip}, gateway {sim.gateway}; web {web.ip}, other {other.ip}, client {client.ip}")

    for who, sport in ((client, 50000), (other, 50001), (web, 50002)):
        syn = client.tcp_syn(sim.node_ip, 8080, sport=sport) if who is client else \
            who.tcp_syn(sim.node_ip, 8080, sport=sport)
        n_web, n_who = len(web.received), len(who.received)
        who.send(syn)
        sim.run()
        print(f"\n{who.name} -> {sim.node_ip}:8080")
        show("sent", syn)
        for _, f in web.received[n_web:]:
            flags = str(Ether(f)["TCP"].flags)
            show("web saw (DNAT)" if flags == "S" else "web got (reply)", f)
        if who is not web:
            for _, f in who.received[n_who:]:
                show(f"{who.name} got (reply)", f)

    print("\nconntrack:")
    for e in sim.conntrack():
        print(f"  {e['proto']} {e['orig_src']}:{e['orig_sport']} -> {e['orig_dst']}:{e['orig_dport']}"
              f"  reply {e['reply_src']}:{e['reply_sport']} -> {e['reply_dst']}:{e['reply_dport']}"
              f"  {e['state']}{' hairpin' if e['hairpin'] else ''}")
    g = sim.counters()["global"]
    print(f"\nnat_translated={g['nat_translated']} ct_created={g['ct_created']}")
    if args.pcap_dir:
        os.makedirs(args.pcap_dir, exist_ok=True)
        for port in ("web", "other", "host", "uplink"):
            sim.write_pcap(port, os.path.join(args.pcap_dir, f"{port}.pcap"))
        print(f"pcaps in {args.pcap_dir}")
    return 0 if g["ct_created"] == 3 else 1


if __name__ == "__main__":
    sys.exit(main())
