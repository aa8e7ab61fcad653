"""Pcap replay through the switch: as captured, and retimed.

Records a short exchange (pings and UDP between two pods) to a pcap, then replays the
frames pod "a" sent into a fresh simulation, first at their captured spacing, then
retimed to 1,000 frames/s in bulk, and prints what arrived where. Give --pcap to replay
your own capture of frames entering one pod port (--port, default "a").

    python examples/pcap_replay.py [--impl py|c] [--pcap FILE] [--port NAME]
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scapy.layers.l2 import Ether  # noqa: E402
from scapy.utils import wrpcap  # noqa: E402

from vswitch.sim import PcapReplay, Simulation  # noqa: E402


def record(path, impl):
    """A capture of what pod a sends: 5 pings and 5 UDP datagrams, 2 ms apart."""
    sim = Simulation(seed=0, impl=impl)
    a, b = sim.add_pod("a"), sim.add_pod("b")
    frames = []
    for i in range(5):
        for f in (a.ping(b, seq=i), a.udp_to(b, 7, f"datagram {i}".encode())):
            p = Ether(f)
            p.time = 1000 + len(frames) * 0.002
            frames.append(p)
    wrpcap(path, frames)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", choices=["py", "c"], default=None)
    ap.add_argument("--pcap")
    ap.add_argument("--port", default="a")
    args = ap.parse_args(argv)
    path = args.pcap
    if path is None:
        path = os.path.join(tempfile.mkdtemp(), "a-sent.pcap")
        record(path, args.impl)

    # the same seed gives the same MACs and IPs as the recording, so the frames pass anti-spoofing
    sim = Simulation(seed=0, impl=args.impl)
    a, b = sim.add_pod("a"), sim.add_pod("b")
    b.listen(7, "udp")
    replay = PcapReplay(path)
    print(f"{len(replay.frames)} frames in {path}, spanning {replay.captured_ns[-1] / 1e6:.1f} ms")
    n = sim.generate(args.port, replay)
    sim.run()
    print(f"as captured: {n} frames sent; b received {len(b.received)} at "
          f"{[round(t / 1e6, 1) for t, _ in b.received]} ms; a got {len(a.received)} replies")

    res = sim.run_bulk([(args.port, PcapReplay(path, rate_pps=1000, loops=100))])
    print(f"retimed, bulk: {res.frames} frames over {(res.end_ns - res.start_ns) / 1e6:.1f} ms of "
          f"virtual time, delivered {res.delivered}, {res.frames_per_s:,.0f} frames/s of wall time")
    c = sim.counters()["ports"]
    print(f"counters: a rx {c['a']['rx_packets']} (spoofed {c['a']['drop_spoofed']}), b tx {c['b']['tx_packets']}")
    return 0 if c["a"]["drop_spoofed"] == 0 and len(b.received) == n else 1


if __name__ == "__main__":
    sys.exit(main())
