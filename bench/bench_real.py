"""Real-kernel benchmark: pods on vswitch (TAP + vswitchd) against the same pods on a Linux
bridge with veths (the reference bridge plugin's data path), side by side in one run.

Measures, for each path: iperf3 TCP throughput between two pods with 1 and 4 streams,
ping RTT (100 pings, 10 ms apart), and 64-byte UDP frames per second received
(iperf3 -u -l 18 -b 0: 14 + 20 + 8 + 18 = 60 bytes + FCS). Needs root, /dev/net/tun,
iperf3. Every namespace it creates is removed at the end, whatever happens.

    python bench/bench_real.py [--seconds 5] [--json out.json]

Prints a Markdown table with the ratios vswitch / bridge (aims: TCP >= 0.9, RTT <= 1.5,
UDP >= 0.25 Mpps) and which datapath and I/O implementation the daemon used.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.helpers import (Cluster, Namespaces, iperf3, nsexec, nspopen,  # noqa: E402
                                       received_bps, sh, skip_reason, uid, wait_listening)


def _ping_rtt_ms(ns, ip, count=100):
    r = nsexec(ns, "ping", "-q", "-c", str(count), "-i", "0.01", ip, timeout=60)
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", r.stdout)
    return float(m.group(2))


def _udp_pps(server_ns, server_ip, client_ns, seconds):
    srv = nspopen(server_ns, "iperf3", "-s", "-1", "-p", "5301")
    try:
        wait_listening(server_ns, 5301)
        r = nsexec(client_ns, "iperf3", "-u", "-c", server_ip, "-p", "5301", "-l", "18", "-b", "0",
                   "-t", str(seconds), "--json", timeout=seconds + 60)
        res = json.loads(r.stdout)
        s = res["end"]["sum"]
        received = s["packets"] - s["lost_packets"]
        return received / s["seconds"]
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(10)


def measure(a_ns, b_ip, b_ns, a_ip, seconds):
    out = {}
    for streams in (1, 4):
        out[f"tcp_{streams}_gbps"] = received_bps(iperf3(b_ns, b_ip, a_ns, seconds=seconds,
                                                         streams=streams, omit=1)) / 1e9
    _ping_rtt_ms(a_ns, b_ip, count=5)          # ARP and MAC learning settled
    out["rtt_ms"] = _ping_rtt_ms(a_ns, b_ip)
    out["udp64_mpps"] = _udp_pps(b_ns, b_ip, a_ns, seconds) / 1e6
    return out


def run_bridge(nss, seconds):
    node = nss.new("bn")
    br = "br" + uid()
    nsexec(node, "ip", "link", "add", br, "type", "bridge")
    nsexec(node, "ip", "addr", "add", "10.250.0.1/24", "dev", br)
    nsexec(node, "ip", "link", "set", br, "up")
    pods = []
    for i, host in ((0, 2), (1, 3)):
        ns = nss.new(f"bp{i}")
        h, p = f"vh{uid()}", f"vc{uid()}"
        sh("ip", "link", "add", h, "netns", node, "type", "veth", "peer", "name", p, "netns", ns)
        nsexec(node, "ip", "link", "set", h, "master", br, "up")
        nsexec(ns, "ip", "link", "set", p, "name", "eth0")
        nsexec(ns, "ip", "addr", "add", f"10.250.0.{host}/24", "dev", "eth0")
        nsexec(ns, "ip", "link", "set", "eth0", "up")
        nsexec(ns, "ip", "route", "add", "default", "via", "10.250.0.1")
        pods.append((ns, f"10.250.0.{host}"))
    (a_ns, a_ip), (b_ns, b_ip) = pods
    return measure(a_ns, b_ip, b_ns, a_ip, seconds)


def run_vswitch(nss, seconds, workdir):
    c = Cluster(nss, workdir, subnet_octet=251)
    c.daemon.start()
    try:
        a = c.add_pod("a", 2)
        b = c.add_pod("b", 3)
        status = c.daemon.call("status")
        out = measure(a.ns, b.ip, b.ns, a.ip, seconds)
        out["datapath"], out["io"] = status["datapath"], status["io"]
        c.detach_all()
        return out
    finally:
        c.daemon.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"bench_real: {reason}", file=sys.stderr)
        return 2
    nss = Namespaces()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = {"bridge": run_bridge(nss, a.seconds), "vswitch": run_vswitch(nss, a.seconds, Path(tmp))}
    finally:
        nss.cleanup()
    br, vs = results["bridge"], results["vswitch"]
    rows = [("TCP 1 stream (Gbit/s)", "tcp_1_gbps", ">= 0.9"), ("TCP 4 streams (Gbit/s)", "tcp_4_gbps", ">= 0.9"),
            ("ping RTT (ms)", "rtt_ms", "<= 1.5"), ("UDP 64 B (Mpps received)", "udp64_mpps", "")]
    print(f"vswitch datapath: {vs['datapath']}, I/O: {vs['io']}\n")
    print("| metric | Linux bridge | vswitch | vswitch / bridge | aim |")
    print("|---|---|---|---|---|")
    for label, key, aim in rows:
        print(f"| {label} | {br[key]:.3f} | {vs[key]:.3f} | {vs[key] / br[key]:.2f} | {aim} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
