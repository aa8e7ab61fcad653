"""Where one ping's microseconds go: vswitch (adaptive polling, busy polling) against the Linux bridge.

    python -m bench.ping_path                      # as root, with perf; prints a Markdown table
    python -m bench.ping_path --count 500 --json out.json --daemon-args=--poll-us=200
    python -m bench.ping_path --subjects default --syscalls     # the wakeup and read() split further

Theory of operation
-------------------
Per subject (``default``: vswitchd as it starts by default; ``busy``: ``--busy-poll``;
``bridge``: the reference bridge plugin, veths and a Linux bridge) a node of ``bench.podnet``
with two pods; A pings B ``--count`` times at ``--interval`` while two recorders run, both on
CLOCK_MONOTONIC:

- the kernel's view: ``perf record -a -k mono`` of four tracepoints, ``net:net_dev_queue``
  (a frame handed to an interface: 98 bytes, an echo of 56 data bytes), ``net:netif_receive_skb``
  (a stack receiving it: 84 bytes, Ethernet header pulled), and for vswitch
  ``sched:sched_wakeup`` / ``sched:sched_switch`` of the daemon's packet thread;
- ours: the daemon's loop trace (op ``loop_trace``, ``BatchIO.trace_start``): the time of each
  step of ``BatchIO.run`` (blocking wait, wakeup, read, datapath, write returned).

Each ping is cut out by the kernel's four anchors, the same for every subject: the request
queued on A's eth0 by ping (``Q_A``, in ping's context), B's stack receiving it (``RX_B``), B's
reply queued on B's eth0 (``TX_B``), A's stack receiving the reply (``RX_A``, where the kernel
stamps it for ping's SO_TIMESTAMP: ping's RTT ends there). Between them sit, for vswitch, the
daemon's wakeup (sched), and our steps; every segment's median over the pings is a row.
ping's RTT minus ``RX_A - Q_A`` is ping's own send path (its clock read to the queueing).
A ping whose events do not match the expected sequence (ARP, a lost event) is left out
and counted.

perf's tracepoints cost a little on each event (about a µs on the whole path here); the
table's RTT row is ping's, measured with them on.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from vswitch import lab

from . import nettools, podnet

PING_BYTES_DEV, PING_BYTES_RX = 98, 84          # an echo of 56 data bytes at the device, at the stack
SLEEP, WAKE, READ, DP, WRITE = 1, 2, 3, 4, 5     # BatchIO's TR_* steps
MATCHED = "request queued on A → reply received by A"
_LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+(\d+)\.(\d+):\s+(\S+):\s+(.*)$")


def _perf_start(out, daemon_pid=None, syscalls=False):
    ev = ["-e", "net:net_dev_queue", "--filter", f"len == {PING_BYTES_DEV}",
          "-e", "net:netif_receive_skb", "--filter", f"len == {PING_BYTES_RX}"]
    if daemon_pid is not None:
        ev += ["-e", "sched:sched_wakeup", "--filter", f"pid == {daemon_pid}",
               "-e", "sched:sched_switch", "--filter", f"next_pid == {daemon_pid}"]
        if syscalls:
            ev += [x for name in ("sys_exit_epoll_pwait2", "sys_enter_read", "sys_exit_read")
                   for x in ("-e", f"syscalls:{name}", "--filter", f"common_pid == {daemon_pid}")]
    proc = subprocess.Popen(["perf", "record", "-q", "-a", "-k", "mono", *ev, "-o", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)                 # perf has opened its events
    if proc.poll() is not None:
        raise RuntimeError(f"perf record failed: {proc.stderr.read().decode()[-500:]}")
    return proc


def _perf_stop(proc, out):
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    txt = subprocess.run(["perf", "script", "-i", out, "--ns", "-F", "comm,tid,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    events = []
    for line in txt.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        comm, tid, sec, frac, ev, rest = m.groups()
        t = int(sec) * 10**9 + int(frac.ljust(9, "0")[:9])
        dev = re.search(r"dev=(\S+)", rest)
        events.append((t, ev.rstrip(":"), comm, int(tid), dev.group(1) if dev else None))
    events.sort()
    return events


def _ping(ns, dst, count, interval_s):
    """ping run here (its pid known: ``ip netns exec`` execs it); (pid, every reply's RTT in ms)."""
    proc = lab.nspopen(ns, "ping", "-c", count, "-i", interval_s, "-W", 2, dst)
    out, err = proc.communicate(timeout=count * interval_s + 30)
    rtts = [float(t) for t in nettools._RTT.findall(out)]
    if not rtts:
        raise RuntimeError(f"ping from {ns} to {dst} got no reply: {out[-300:]} {err[-300:]}")
    return proc.pid, rtts


def _segments(events, rows, rtts_ms, pod_if, tids):
    """Per ping, the anchors and (with rows) our steps; returns ({name: [µs, ...]}, skipped).
    Only events of the threads `tids` count (ping's, the daemon's): other work on the machine
    (another ping between other pods named eth0) is not ours to read."""
    pings, skipped = [], 0
    net = [e for e in events if e[1] in ("net:net_dev_queue", "net:netif_receive_skb") and e[4] == pod_if
           and e[3] in tids]
    sched = [e for e in events if e[1].startswith("sched:")]
    i, sent = 0, 0
    while i < len(net):
        e = net[i]
        if not (e[1] == "net:net_dev_queue" and e[2] == "ping"):
            i += 1
            continue
        sent += 1                       # the sent-th echo request: ping's reply sent-1 (none lost)
        seq = net[i:i + 4]
        kinds = [x[1] for x in seq]
        if kinds != ["net:net_dev_queue", "net:netif_receive_skb", "net:net_dev_queue", "net:netif_receive_skb"]:
            skipped += 1
            i += 1
            continue
        pings.append((sent - 1, [x[0] for x in seq]))
        i += 4
    out = {}

    def add(name, v):
        out.setdefault(name, []).append(v / 1000)
    rtts = rtts_ms if len(rtts_ms) == sent else None
    for k, (q_a, rx_b, tx_b, rx_a) in pings:
        sys_of = {name: [x[0] for x in events if x[1] == "syscalls:" + name]
                  for name in ("sys_exit_epoll_pwait2", "sys_enter_read", "sys_exit_read")}
        if rows is not None:
            # our steps: the first wakeup after Q_A, its read/datapath, the write after TX_B, then
            # the reply's wakeup/read/datapath before RX_A and its write after it
            after = [r for r in rows if q_a <= r[0] <= rx_a + 200_000 and r[1] != SLEEP]
            try:
                seq = iter(after)
                w1 = next(r for r in seq if r[1] == WAKE)
                r1 = next(r for r in seq if r[1] == READ)
                d1 = next(r for r in seq if r[1] == DP)
                wr1 = next(r for r in seq if r[1] == WRITE)
                w2 = next(r for r in seq if r[1] == WAKE)
                r2 = next(r for r in seq if r[1] == READ)
                d2 = next(r for r in seq if r[1] == DP)
                wr2 = next(r for r in seq if r[1] == WRITE)
            except StopIteration:
                skipped += 1
                continue
            if not (d1[0] <= rx_b <= tx_b <= wr1[0] <= w2[0] and d2[0] <= rx_a <= wr2[0]):
                skipped += 1
                continue
            wk = [s for s in sched if q_a <= s[0] <= w1[0]]
            wakeup = next((s[0] for s in wk if s[1] == "sched:sched_wakeup"), None)
            switch = next((s[0] for s in wk if s[1] == "sched:sched_switch"), None)
            if wakeup is not None and switch is not None:
                add("request queued → daemon woken (tun, epoll callback)", wakeup - q_a)
                add("woken → on a CPU (scheduler, the vCPU)", switch - wakeup)
                add("on a CPU → epoll_wait returned", w1[0] - switch)
                x = [t for t in sys_of["sys_exit_epoll_pwait2"] if switch <= t <= w1[0]]
                if x:           # --syscalls: the kernel's part and the return to user
                    add("  of which: on a CPU → epoll_pwait2's syscall exit (kernel)", x[-1] - switch)
                    add("  of which: syscall exit → back in our loop", w1[0] - x[-1])
            else:
                add("request queued → poll found it (busy / in the window)", w1[0] - q_a)
            add("read() of the request", r1[0] - w1[0])
            en = [t for t in sys_of["sys_enter_read"] if w1[0] <= t <= r1[0]]
            ex = [t for t in sys_of["sys_exit_read"] if en and en[0] <= t <= r1[0]]
            if en and ex:       # --syscalls
                add("  of which: our loop → read() entered", en[0] - w1[0])
                add("  of which: in read() (kernel)", ex[0] - en[0])
                add("  of which: read() exit → our loop", r1[0] - ex[0])
            add("datapath (request)", d1[0] - r1[0])
            add("write() entry → B's stack receives (tun_get_user)", rx_b - d1[0])
            add("B's stack: request in → reply queued", tx_b - rx_b)
            add("reply queued → write() to B returned", wr1[0] - tx_b)
            add("write returned → poll found the reply", w2[0] - wr1[0])
            add("read() of the reply", r2[0] - w2[0])
            add("datapath (reply)", d2[0] - r2[0])
            add("write() entry → A's stack receives the reply", rx_a - d2[0])
            add("(not in the RTT: A's stack and ping's wakeup → write() to A returned)", wr2[0] - rx_a)
        else:
            add("A's eth0 → B's stack receives (veth, bridge)", rx_b - q_a)
            add("B's stack: request in → reply queued", tx_b - rx_b)
            add("B's eth0 → A's stack receives (veth, bridge)", rx_a - tx_b)
        add("request queued on A → reply received by A", rx_a - q_a)
        if rtts is not None:
            add("ping's send path (its clock → request queued)", rtts[k] * 1e6 - (rx_a - q_a))
    if rtts_ms:
        out["RTT (ping)"] = [r * 1000 for r in rtts_ms]
    return out, skipped


def measure(subject, count, interval_s, daemon_args=(), syscalls=False):
    kind = "bridge" if subject == "bridge" else "vswitch"
    args = tuple(daemon_args) + (("--busy-poll",) if subject == "busy" else ())
    with podnet.Node(kind, tag="pp", daemon_args=args if kind == "vswitch" else ()) as node:
        a, b = node.add_pod(), node.add_pod()
        nettools.wait_reachable(a.ns, b.ip)
        nettools.wait_reachable(b.ns, a.ip)
        nettools.ping_rtts_ms(a.ns, b.ip, 20, 0.01)          # ARP, MAC learning settled
        pid = node.daemon.proc.pid if kind == "vswitch" else None
        with tempfile.TemporaryDirectory(prefix="ping-path-") as tmp:
            out = os.path.join(tmp, "perf.data")
            perf = _perf_start(out, pid, syscalls and subject == "default")
            try:
                if pid is not None:
                    node.daemon.call("loop_trace", action="start", capacity=1 << 16)
                ping_pid, rtts = _ping(a.ns, b.ip, count, interval_s)
                rows = None
                if pid is not None:
                    node.daemon.call("loop_trace", action="stop")
                    rows = node.daemon.call("loop_trace", action="rows")["workers"][0]
            finally:
                events = _perf_stop(perf, out)
        seg, skipped = _segments(events, rows, rtts, podnet.POD_IFNAME, {ping_pid, pid})
    return {"subject": subject, "count": count, "interval_s": interval_s, "daemon_args": list(args),
            "skipped": skipped, "medians_us": {k: round(statistics.median(v), 2) for k, v in seg.items()},
            "n": {k: len(v) for k, v in seg.items()}}


def table(results):
    names = []
    for r in results:
        for k in r["medians_us"]:
            if k not in names:
                names.append(k)
    head = "| step (median µs) | " + " | ".join(r["subject"] for r in results) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    for k in names:
        cells = []
        for r in results:
            if k not in r["medians_us"]:
                cells.append("–")
                continue
            n, matched = r["n"][k], r["n"].get(MATCHED, 0)
            cells.append(f"{r['medians_us'][k]:.1f}" + (f" (n={n})" if k != "RTT (ping)" and n < matched else ""))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| pings matched / left out | " + " | ".join(
        f"{r['n'].get(MATCHED, 0)} / {r['skipped']}" for r in results) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.ping_path", description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", default="default,busy,bridge", help="comma-separated: default, busy, bridge")
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between pings")
    ap.add_argument("--daemon-args", action="append", default=[], help="one more vswitchd argument (repeatable)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--syscalls", action="store_true",
                    help="default subject: also split the wakeup's return and the request's read() "
                         "into kernel and user parts (syscall tracepoints of the daemon's thread)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (namespaces, perf)")
    for tool in ("perf", "ping"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed")
    results = [measure(s, a.count, a.interval, a.daemon_args, a.syscalls) for s in a.subjects.split(",")]
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
