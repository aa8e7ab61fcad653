"""Counters of the running daemon, and their Prometheus exposition.

Theory of operation
-------------------
``counters`` is the ``counters`` reply: the switch's per-port and global counters (the
datapath's, one per drop reason; ``docs/datapath.md``), with each port's ``rx_errors`` /
``tx_errors`` (failed reads and writes of its fd, kept by the packet I/O) and, in
``global``, ``batches`` (the batches of both loops: the Cython one's ``loop.batches`` and
the Python one's). ``prometheus_text`` renders them with the pod count and uptime in the
Prometheus text format: ``vswitch_<name>_total`` per global counter and
``vswitch_port_<name>_total{port="..."}`` per port counter. The same text is the
``metrics`` reply and, with ``--metrics-port``, the body of ``GET /metrics`` on
127.0.0.1 (``http_reply``: HTTP/1.0, one request per connection). In cluster mode
``vswitch_cluster_*`` gauges and counters follow (``vswitch.daemon.cluster``).
"""
from __future__ import annotations


def counters(switch, io, port=None, py_batches: int = 0) -> dict:
    """{"global": {name: n}, "ports": {port name: {name: n}}}; KeyError for an unknown port."""
    out = switch.counters(port)
    for name, row in out["ports"].items():
        pid = switch.port_id(name)
        row["rx_errors"] = int(io.rx_errors[pid])
        row["tx_errors"] = int(io.tx_errors[pid])
    out["global"]["batches"] = py_batches + io.loop_stats()["batches"]
    return out


def prometheus_text(c: dict, pods: int, uptime_s: float, extra: list[str] = ()) -> str:
    """``extra``: more exposition lines (cluster mode's ``vswitch_cluster_*``)."""
    out = ["# HELP vswitch_pods Attached pods.", "# TYPE vswitch_pods gauge",
           f"vswitch_pods {pods}",
           "# HELP vswitch_uptime_seconds Seconds since the daemon started.",
           "# TYPE vswitch_uptime_seconds gauge",
           f"vswitch_uptime_seconds {uptime_s:.3f}"]
    for name, v in c["global"].items():
        out += [f"# TYPE vswitch_{name}_total counter", f"vswitch_{name}_total {v}"]
    rows = c["ports"]
    names = sorted({k for r in rows.values() for k in r})
    for k in names:
        out.append(f"# TYPE vswitch_port_{k}_total counter")
        for port, r in rows.items():
            out.append(f'vswitch_port_{k}_total{{port="{port}"}} {r.get(k, 0)}')
    out.extend(extra)
    return "\n".join(out) + "\n"


def http_request_complete(data: bytes) -> bool:
    """Whether the bytes read so far hold a whole request head (or too much of one)."""
    return b"\r\n\r\n" in data or b"\n\n" in data or len(data) > 8192


def http_reply(req: bytes, text) -> bytes:
    """The response to one HTTP request: ``text()`` for GET /metrics (or /), else 404."""
    first = req.split(b"\r\n", 1)[0].split(b" ")
    if len(first) >= 2 and first[0] == b"GET" and first[1] in (b"/metrics", b"/"):
        body = text().encode()
        status = b"200 OK"
    else:
        body, status = b"not found: GET /metrics\n", b"404 Not Found"
    return (b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
