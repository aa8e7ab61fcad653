"""A shaping curve: delivered bytes against burst + rate·t, for a pod's ingress shaper.

A pod with ingressRate 10 Mbit/s and ingressBurst 200 kbit receives 30 Mbit/s of UDP for
50 ms of virtual time. The script prints the delivered bits against the token-bucket
bound at a few instants and, if matplotlib is installed (the `plot` extra), saves the
curve as a PNG; without matplotlib it says so and skips the plot.

    python examples/shaping_curve.py [--impl py|c] [--out shaping.png]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vswitch.sim import CBR, Simulation  # noqa: E402

RATE_BPS, BURST_BITS = 10_000_000, 200_000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", choices=["py", "c"], default=None)
    ap.add_argument("--out", default="shaping_curve.png")
    args = ap.parse_args(argv)

    sim = Simulation(seed=0, impl=args.impl)
    src = sim.add_pod("src")
    dst = sim.add_pod("dst", bandwidth={"ingressRate": RATE_BPS, "ingressBurst": BURST_BITS})
    dst.send(dst.ping(src))                       # the switch learns dst
    sim.run()
    sim.advance(10 ** 9)                          # let the bucket fill again
    dst.clear()
    frame = src.udp_to(dst, 9, b"\0" * 1200)
    t0 = sim.now
    sim.generate("src", CBR(frame, rate_bps=3 * RATE_BPS, duration_ns=50_000_000))
    sim.run()

    times_ms, delivered_bits, excess_bit_ns = [], [], []
    total = 0
    for t, f in dst.received:
        total += len(f) * 8
        times_ms.append((t - t0) / 1e6)
        delivered_bits.append(total)
        # exact integers: delivered·10^9 − (burst·10^9 + rate·(t − t0)), in bit·ns
        excess_bit_ns.append(total * 10 ** 9 - (BURST_BITS * 10 ** 9 + RATE_BPS * (t - t0)))
    bound = [BURST_BITS + RATE_BPS * ms / 1e3 for ms in times_ms]
    worst = max(excess_bit_ns) / 1e9
    print(f"{len(times_ms)} frames delivered; max(delivered − (burst + rate·t)) = {worst:.0f} bits (≤ 0)")
    for i in range(0, len(times_ms), max(1, len(times_ms) // 8)):
        print(f"  t={times_ms[i]:7.3f} ms  delivered {delivered_bits[i]:>9} bits  bound {bound[i]:>11.0f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'vswitch[plot]'): plot skipped")
        return 0 if worst <= 0 else 1
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(times_ms, [b / 1e3 for b in delivered_bits], where="post", label="delivered")
    ax.plot(times_ms, [b / 1e3 for b in bound], "--", label="burst + rate·t")
    ax.set_xlabel("virtual time (ms)")
    ax.set_ylabel("kbit")
    ax.set_title(f"ingress shaper {RATE_BPS / 1e6:g} Mbit/s, burst {BURST_BITS / 1e3:g} kbit, 3× offered")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"plot saved to {args.out}")
    return 0 if worst <= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
