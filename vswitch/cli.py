"""vswitchctl: inspect and drive a running vswitchd over its control socket.

Theory of operation: every subcommand is one or two control requests (``vswitch/rpc.py``,
``docs/control.md``; ``fdb`` and ``conntrack`` page through the table, ``--limit`` and
``--port`` narrowing it, so a full table is listed whole); the reply is printed as a human table, or as the raw JSON with
``--json``. Subcommands are rows of the ``COMMANDS`` table (name -> (help, add_arguments,
run, text, needs the daemon)): ``run`` makes the requests and returns the reply, ``text``
renders it; a new subcommand is a new row, nothing else changes. ``install-cni`` needs no
daemon: it has ``vswitch_cni.install``'s options (cni/installopts.py, the one definition) and
runs its ``run_install`` (the relocatable plugin, ``05-vswitch.conflist`` and a manifest), with
the daemon's socket defaulting to vswitchctl's own ``--socket``;
``uninstall-cni`` removes what the manifest lists, ``build-cni OUT`` writes the plugin alone. Exit status: 0 on success,
1 on an error reply (its message on stderr), 2 on bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from vswitch import __version__, rpc


def _table(rows: list[list], headers: list[str]) -> str:
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*headers)] + [fmt.format(*r) for r in rows])


def _bw_text(bw: dict) -> str:
    if not bw:
        return "-"
    parts = []
    for d in ("ingress", "egress"):
        if bw.get(f"{d}Rate"):
            parts.append(f"{d[:2]} {bw[f'{d}Rate'] / 1e6:g}Mbit/{bw[f'{d}Burst']}b")
    return ", ".join(parts)


# --------------------------------------------------------------------------- subcommands
# Each subcommand is a ``run(client, args)`` that returns the daemon's reply, and a
# ``text(reply)`` that renders it (``--json`` prints the reply itself).

def _show(r):
    lines = [f"switch {r['switch']}  uplink {r['uplink'] or '-'}  node addresses "
             f"{', '.join(r['node_addresses']) or '-'}"]
    rows = []
    for p in r["ports"]:
        pod = f"{p.get('container_id', '')[:12]}/{p.get('ifname')}" if p.get("container_id") else "-"
        rows.append([p["port_id"], p["name"], p["kind"], "up" if p["up"] else "down", p["mac"] or "-",
                     ",".join(p["ips"]) or "-", pod, _bw_text(p["bandwidth"]),
                     ",".join(f"{m['hostPort']}->{m['containerPort']}/{m['protocol']}"
                              for m in p["port_mappings"]) or "-"])
    lines.append(_table(rows, ["ID", "PORT", "KIND", "STATE", "MAC", "IPS", "POD", "SHAPING", "HOSTPORTS"]))
    if r["hostports"]:
        lines.append("")
        lines.append(_table([[h["protocol"], h["host_ip"] or "*", h["host_port"], h["pod"], h["pod_ip"],
                              h["container_port"]] for h in r["hostports"]],
                            ["PROTO", "HOST IP", "HOST PORT", "POD PORT", "POD IP", "CONTAINER PORT"]))
    if r.get("vxlan"):
        lines += ["", _peers(r["vxlan"])]
    return "\n".join(lines)


def _fdb(r):
    return _table([[e["vlan"], e["mac"], e["port"], e["age_s"]] for e in r["entries"]],
                  ["VLAN", "MAC", "PORT", "AGE(s)"])


def _listing_args(p):
    p.add_argument("--port", help="only the entries of this port (name or id)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N entries (default: all)")


def _pages(op):
    """run for a paged listing (fdb, conntrack): pages of at most PAGE entries until the
    table (or --limit) ends; the reply holds them all, with the daemon's ``total``."""
    PAGE = 5000

    def run(c, a):
        if a.limit is not None and a.limit < 1:
            raise rpc.RpcError(rpc.E_BAD_ARGS, f"--limit {a.limit}; accepted: 1 or more")
        args = {} if a.port is None else {"port": int(a.port) if a.port.isdigit() else a.port}
        entries, cursor, total = [], None, 0
        while True:
            want = PAGE if a.limit is None else min(PAGE, a.limit - len(entries))
            r = c.call(op, limit=want, **args, **({"cursor": cursor} if cursor else {}))
            entries += r["entries"]
            cursor = r.get("next")
            total = r.get("total", len(entries))
            if not cursor or (a.limit is not None and len(entries) >= a.limit):
                return {"ok": True, "entries": entries, "total": total}
    return run


def _conntrack(r):
    return _table([[e["proto"], e["state"], f"{e['orig_src']}:{e['orig_sport']}",
                    f"{e['orig_dst']}:{e['orig_dport']}", f"{e['reply_src']}:{e['reply_sport']}",
                    "yes" if e["hairpin"] else "", e["in_port"], e["out_port"], e["packets"],
                    e["expires_in_s"]] for e in r["entries"]],
                  ["PROTO", "STATE", "SRC", "DST", "TO POD", "HAIRPIN", "IN", "OUT", "PKTS", "EXPIRES(s)"])


def _counters_args(p):
    p.add_argument("port", nargs="?", help="one port only")


def _counters_run(c, a):
    return c.call("counters", **({"port": a.port} if a.port else {}))


def _counters(r):
    g = r["global"]
    out = ["global: " + "  ".join(f"{k}={v}" for k, v in g.items())]
    cols = ["rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "queued", "rx_errors", "tx_errors"]
    drops = [k for k in next(iter(r["ports"].values()), {}) if k.startswith("drop_")]
    rows = [[name] + [row.get(k, 0) for k in cols + drops] for name, row in r["ports"].items()]
    out.append(_table(rows, ["PORT"] + cols + [d[5:] for d in drops]))
    return "\n".join(out)


def _trace_args(p):
    p.add_argument("in_port", help="the port the frame arrives on (name or id)")
    p.add_argument("--frame-hex", help="the whole Ethernet frame as hex")
    p.add_argument("--src-mac")
    p.add_argument("--dst-mac")
    p.add_argument("--src-ip")
    p.add_argument("--dst-ip")
    p.add_argument("--proto", choices=["tcp", "udp", "icmp"], default="icmp")
    p.add_argument("--sport", type=int, default=12345)
    p.add_argument("--dport", type=int, default=80)


def _trace_run(c, a):
    in_port = int(a.in_port) if a.in_port.isdigit() else a.in_port
    if a.frame_hex:
        return c.call("trace", in_port=in_port, frame_hex=a.frame_hex)
    if not (a.src_ip and a.dst_ip):
        raise rpc.RpcError(rpc.E_BAD_ARGS, "trace: give --frame-hex, or --src-ip and --dst-ip")
    desc = {k: v for k, v in dict(src_mac=a.src_mac, dst_mac=a.dst_mac, src_ip=a.src_ip, dst_ip=a.dst_ip,
                                  proto=a.proto, sport=a.sport, dport=a.dport).items() if v is not None}
    return c.call("trace", in_port=in_port, packet=desc)


def _capture_args(p):
    p.add_argument("port", help="the switch port to capture (name or id)")
    p.add_argument("-w", "--write", required=True, metavar="FILE", help="pcap file to write")
    p.add_argument("-d", "--duration", type=float, help="stop after this many seconds (default: Ctrl-C)")


def _capture_run(c, a):
    port = int(a.port) if a.port.isdigit() else a.port
    c.call("capture_start", port=port, path=os.path.abspath(a.write))
    done = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait(a.duration)
    finally:
        signal.signal(signal.SIGINT, old)
        # a new connection: the first may have been closed as idle (--ctl-idle-timeout-s)
        r = rpc.call(a.socket, "capture_stop", timeout_s=a.timeout, port=port)
    return r


def _status(r):
    return "  ".join(f"{k}={v}" for k, v in r.items() if k != "ok")


def _list(r):
    return _table([[x["container_id"][:12], x["ifname"], x["netns"], x["port"], x["mac"],
                    ",".join(e["address"] for e in x["ips"])] for x in r["attachments"]],
                  ["CONTAINER", "IFNAME", "NETNS", "PORT", "MAC", "IPS"])


def _nodes(r):
    c = r.get("cluster")
    if c is None:
        return "vswitchd does not run in cluster mode (no --cluster-cidr)"
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(c["since"])) if c.get("since") else "-"
    head = (f"node {c['node_name']}  etcd {'connected' if c['connected'] else 'DISCONNECTED'} since {since}  "
            f"lease {c['lease_id']} ttl {c['lease_ttl_s']}s  revision {c['last_revision']}  "
            f"cluster {','.join(c['cluster_cidrs'])}")
    if c.get("last_error") and not c["connected"]:
        head += f"\nlast error: {c['last_error']}"
    rows = [[("* " if n["self"] else "  ") + n["name"], n["node_ip"], n["vtep_mac"], ",".join(n["pod_cidrs"]) or "-",
             n.get("mod_revision", "-"),
             time.strftime("%H:%M:%S", time.localtime(n["since"])) if n.get("since") else "-"]
            for n in r["nodes"]]
    return head + "\n" + _table(rows, ["NODE", "NODE IP", "VTEP MAC", "POD CIDRS", "REVISION", "SEEN SINCE"])


def _peers_args(p):
    p.add_argument("action", nargs="?", default="list", choices=("list", "reload", "replace"),
                   help="list (default); reload: read vswitchd's --peers file again; replace FILE: the "
                        "control source's peers := FILE's JSON list (- for stdin)")
    p.add_argument("file", nargs="?", help="for replace: a JSON list of {name, node_ip, pod_cidrs, vtep_mac}")


def _peers_run(c, a):
    if a.action == "replace":
        if not a.file:
            raise rpc.RpcError(rpc.E_BAD_ARGS, "peers replace needs a FILE (- for stdin)")
        try:
            text = sys.stdin.read() if a.file == "-" else open(a.file).read()
            peers = json.loads(text)
        except (OSError, ValueError) as exc:
            raise rpc.RpcError(rpc.E_BAD_ARGS, f"peers replace {a.file}: {exc}") from None
        return c.call("peers", action="replace", peers=peers)
    return c.call("peers", action=a.action)


def _peers(r):
    v = r.get("vtep") or {}
    head = (f"vtep {v.get('ip')}  vni {v.get('vni')}  port {v.get('udp_port')}  vtep mac {v.get('vtep_mac')}  "
            f"mtu {v.get('mtu')}  sources " + ", ".join(f"{k} {n}" for k, n in r.get("sources", {}).items()))
    rows = [[p["name"], p["node_ip"], p["vtep_mac"], p["underlay_mac"] or "-", p["state"], ",".join(p["pod_cidrs"]),
             p["source"], f"{p['tx_packets']}/{p['tx_bytes']}", f"{p['rx_packets']}/{p['rx_bytes']}",
             p["drop_unresolved"]] for p in r["peers"]]
    out = head + "\n" + _table(rows, ["PEER", "NODE IP", "VTEP MAC", "UNDERLAY MAC", "STATE", "POD CIDRS", "SOURCE",
                                      "TX PKTS/BYTES", "RX PKTS/BYTES", "DROP UNRESOLVED"])
    why = [f"{p['name']}: {p['reason']}" for p in r["peers"] if p["state"] != "resolved" and p.get("reason")]
    return out + ("\n" + "\n".join(why) if why else "")


def _install_cni_args(p):
    from vswitch_cni import installopts
    installopts.add_install_arguments(p, socket_dest="cni_socket", socket_default=None,
                                  socket_help="vswitchd's control socket written into the network list "
                                              "(default: vswitchctl's --socket)")


def _install_cni(c, a):
    """vswitch_cni.install.run_install with the daemon's socket; its exit status is vswitchctl's."""
    from vswitch_cni import install
    if not a.subnet and not a.use_pod_cidr:
        # cluster mode: one usePodCidr range per family of the daemon's cluster CIDR
        try:
            cl = rpc.call(a.socket, "status", timeout_s=min(a.timeout, 3.0)).get("cluster")
        except rpc.RpcError:
            cl = None
        if cl or a.use_pod_cidr is not None:
            fams = sorted({6 if ":" in c else 4 for c in (cl or {}).get("cluster_cidrs", [])}) or [4]
            a.use_pod_cidr = ",".join(map(str, fams))
    return install.run_install(a, a.cni_socket or a.socket)


def _uninstall_cni_args(p):
    from vswitch_cni import installopts
    installopts.add_uninstall_arguments(p)


def _uninstall_cni(c, a):
    """vswitch_cni.install.run_uninstall: 0 when all is removed, 1 when changed files were kept."""
    from vswitch_cni import install
    return install.run_uninstall(a)


def _build_cni_args(p):
    p.add_argument("out", metavar="OUT", help="the file to write (the plugin, one file)")
    p.add_argument("--python", metavar="PATH", help="pin this interpreter instead of python3 from PATH")
    p.add_argument("--compile-with", metavar="PYTHON", action="append", default=[],
                   help="also include this interpreter's bytecode (repeatable)")


def _build_cni(c, a):
    """vswitch_cni.build.main: the relocatable plugin alone (for images and hosts by hand)."""
    from vswitch_cni import build
    argv = [a.out] + (["--python", a.python] if a.python else [])
    for py in a.compile_with:
        argv += ["--compile-with", py]
    return build.main(argv)


def _none(p):
    pass


def _call(op):
    """run for a subcommand that is one request without arguments."""
    return lambda c, a: c.call(op)


# --------------------------------------------------------------------------- the table
# name: (help, add_arguments(parser), run(client, args) -> reply dict or exit status,
#        text(reply) -> str or None (print the reply as JSON), needs the daemon)
COMMANDS = {
    "show": ("ports, pods, IPs, shaping, hostPorts", _none, _call("show"), _show, True),
    "status": ("daemon status", _none, _call("status"), _status, True),
    "list": ("attachments", _none, _call("list"), _list, True),
    "fdb": ("the MAC table", _listing_args, _pages("fdb"), _fdb, True),
    "conntrack": ("hostPort connection tracking", _listing_args, _pages("conntrack"), _conntrack, True),
    "counters": ("packet and drop counters by reason", _counters_args, _counters_run, _counters, True),
    "trace": ("a described packet through the pipeline", _trace_args, _trace_run,
              lambda r: _table(r["stages"], ["STAGE", "DECISION"]), True),
    "capture": ("write a pcap of one port while traffic runs", _capture_args, _capture_run,
                lambda r: f"{r['packets']} packets written to {r['path']}", True),
    "metrics": ("Prometheus text", _none, _call("metrics"), lambda r: r["text"].rstrip("\n"), True),
    "nodes": ("the cluster as this node sees it (cluster mode)", _none, _call("nodes"), _nodes, True),
    "peers": ("the VXLAN peers (--vxlan): list, reload the --peers file, replace the control set",
              _peers_args, _peers_run, _peers, True),
    "install-cni": ("install the relocatable CNI plugin and a network list, atomically (cni/install.py)",
                    _install_cni_args, _install_cni, None, False),
    "uninstall-cni": ("remove exactly what install-cni installed (its manifest)",
                      _uninstall_cni_args, _uninstall_cni, None, False),
    "build-cni": ("write the relocatable CNI plugin file (cni/build.py)", _build_cni_args, _build_cni,
                  None, False),
    # ---- more subcommands go here: add a row
    # ---- "name": (help, add_arguments, run, text, needs_daemon); run(None, args) when needs_daemon
    # ---- is False; run returns a reply dict (rendered by text unless --json) or an int exit status.
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vswitchctl", description="inspect and drive vswitchd")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("--socket", default=rpc.DEFAULT_SOCKET, help=f"control socket (default {rpc.DEFAULT_SOCKET})")
    ap.add_argument("--json", action="store_true", help="print the raw JSON reply")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, (help_, add_args, _, _, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_))
    a = ap.parse_args(argv)
    _, _, run, text, needs_daemon = COMMANDS[a.cmd]
    try:
        if needs_daemon:
            with rpc.Client(a.socket, a.timeout) as c:
                out = run(c, a)
        else:
            out = run(None, a)
    except rpc.RpcError as exc:
        print(f"vswitchctl {a.cmd}: {exc.msg}" + (f" ({exc.details})" if exc.details else ""), file=sys.stderr)
        return 1
    if isinstance(out, int) and not isinstance(out, bool):
        return out
    if isinstance(out, dict) and text is not None and not a.json:
        out = text(out)
    if isinstance(out, dict):
        out = json.dumps(out, indent=1)
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
