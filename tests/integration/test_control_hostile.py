"""Hostile control clients against a real vswitchd in its own node namespace (issue 11,
findings 5 and 6): each test plays one attacker or careless client and asserts the
invariant that must hold meanwhile — the daemon lives, the connections it has keep being
served, new clients are served (or refused with a clear code-11 reply), memory stays
bounded, pods still reach each other, and no request is answered with code 999 (a bug).

Limits are daemon flags (``docs/daemon.md``); the tests pass small ones so that each
case ends within seconds. Every wait is bounded; only the daemon's own PID is touched.
"""
import json
import os
import resource
import socket
import threading
import time

import pytest

from tests.integration.helpers import Cluster, ping, running_cluster, sh
from vswitch import rpc

IDLE_S, LINE_S = 2, 1
FAST_LIMITS = ["--ctl-idle-timeout-s", IDLE_S, "--ctl-line-timeout-s", LINE_S]


def _connect(path: str, timeout_s: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    s.connect(path)
    return s


def _read_line(s: socket.socket, timeout_s: float = 10.0) -> bytes:
    """One reply line, or b"" at EOF (the daemon closed the connection)."""
    s.settimeout(timeout_s)
    buf = b""
    while not buf.endswith(b"\n"):
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            return buf
        if not chunk:
            return buf
        buf += chunk
    return buf


def _ask(s: socket.socket, req: dict) -> dict:
    s.sendall(rpc.encode(req))
    line = _read_line(s)
    assert line, f"the daemon closed the connection instead of answering {req}"
    return json.loads(line)


def _raw(path: str, line: bytes) -> dict:
    with _connect(path) as s:
        s.sendall(line + b"\n")
        out = _read_line(s)
    assert out, f"no reply to {line[:80]!r}"
    return json.loads(out)


def _eof_within(s: socket.socket, timeout_s: float) -> bytes:
    """What the daemon sent before closing; fails if it did not close within timeout_s."""
    deadline = time.monotonic() + timeout_s
    got = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"the daemon kept the connection open for {timeout_s} s (got {got[:200]!r})"
        s.settimeout(left)
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            return got
        except socket.timeout:
            continue
        if not chunk:
            return got
        got += chunk


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _daemon_pid(c: Cluster) -> int:
    pid = c.daemon.proc.pid            # `ip netns exec` execs python: the same pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"vswitch.daemon" in f.read()
    return pid


def _control_stats(c: Cluster) -> dict:
    return c.daemon.call("status")["control"]


def _crashes(c: Cluster) -> list[str]:
    return [line for line in c.daemon.logs().splitlines() if "request_crashed" in line]


@pytest.fixture
def hostile(nss, tmp_path):
    """A daemon with short control timeouts and two pods, a and b."""
    with running_cluster(nss, tmp_path, daemon_args=FAST_LIMITS) as c:
        c.add_pod("a", 2)
        c.add_pod("b", 3)
        yield c


def test_fd_exhaustion_refuses_new_clients_and_keeps_serving_the_old_ones(hostile):
    c = hostile
    pid = _daemon_pid(c)
    limit = len(os.listdir(f"/proc/{pid}/fd")) + 8
    sh("prlimit", "--pid", pid, f"--nofile={limit}:{limit}")
    conns, served, refused = [], [], []
    try:
        for _ in range(40):             # far more connections than free fds
            s = _connect(c.daemon.socket)
            conns.append(s)
            try:
                s.sendall(rpc.encode({"op": "status"}))
            except BrokenPipeError:
                pass        # refused and closed before the request went out: its reply is read below
        for s in conns:
            line = _read_line(s)
            assert line, "a connection was closed without a reply"
            r = json.loads(line)
            if r["ok"]:
                served.append(s)
            else:
                assert r["code"] == rpc.E_TRY_AGAIN and "file descriptors" in r["msg"], r
                refused.append(s)
        assert served and refused, (len(served), len(refused))
        # while its fds stay exhausted the daemon does not spin on its listening socket
        cpu0 = _cpu_s(pid)
        more = []
        for _ in range(10):
            s = _connect(c.daemon.socket)
            more.append(s)
        time.sleep(2.0)
        assert _cpu_s(pid) - cpu0 < 1.0, "the daemon spun while it could not accept"
        for s in more:
            s.close()
        for s in served:                # the connections it has are still served
            assert _ask(s, {"op": "status"})["ok"]
        assert ping(c.pods["a"].ns, c.pods["b"].ip, count=3)["received"] == 3
    finally:
        for s in conns:
            s.close()
    deadline = time.monotonic() + 10
    while True:                         # the fds come back; new clients are served
        try:
            st = _control_stats(c)
            break
        except rpc.RpcError:
            assert time.monotonic() < deadline, "no new client served after the fds came back"
            time.sleep(0.2)
    assert st["refused"] >= len(refused) and st["accept_errors"] >= 1
    assert c.daemon.proc.poll() is None
    assert "control_accept_failed" in c.daemon.logs()


def test_connection_cap_refuses_with_code_11_and_serves_the_admitted(nss, tmp_path):
    with running_cluster(nss, tmp_path, daemon_args=["--ctl-max-conns", 8]) as c:
        held = [_connect(c.daemon.socket) for _ in range(8)]
        try:
            for s in held:
                assert _ask(s, {"op": "status"})["ok"]
            extra = _connect(c.daemon.socket)
            r = json.loads(_read_line(extra))
            assert r["ok"] is False and r["code"] == rpc.E_TRY_AGAIN and "8" in r["msg"], r
            assert _eof_within(extra, 5) == b""
            extra.close()
            held.pop().close()
            deadline = time.monotonic() + 5
            while True:                 # the freed slot is taken by a new client
                s = _connect(c.daemon.socket)
                s.sendall(rpc.encode({"op": "status"}))
                r = json.loads(_read_line(s))
                if r["ok"]:
                    held.append(s)
                    break
                s.close()
                assert time.monotonic() < deadline, r
                time.sleep(0.1)
            for s in held:
                assert _ask(s, {"op": "status"})["ok"]
            st = json.loads(rpc.encode(_ask(held[0], {"op": "status"})))["control"]
            assert st["refused"] >= 1 and st["conns"] == 8
        finally:
            for s in held:
                s.close()


def test_idle_and_partial_line_clients_are_closed_and_active_ones_kept(hostile):
    c = hostile
    idle = _connect(c.daemon.socket)
    partial = _connect(c.daemon.socket)
    partial.sendall(b'{"op": "sta')
    slow = _connect(c.daemon.socket)
    stop = threading.Event()

    def trickle():                      # one byte at a time, never a newline
        try:
            while not stop.wait(0.3):
                slow.send(b" ")
        except OSError:
            pass
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    active = _connect(c.daemon.socket)
    try:
        deadline = time.monotonic() + 2 * IDLE_S + 2
        while time.monotonic() < deadline:   # a client that keeps asking is not idle
            assert _ask(active, {"op": "status"})["ok"]
            time.sleep(0.4)
        assert _eof_within(idle, 2) == b""
        for s in (partial, slow):
            got = _eof_within(s, 2)
            r = json.loads(got)
            assert r["code"] == rpc.E_BAD_REQUEST and f"{LINE_S} s" in r["msg"], r
        assert _ask(active, {"op": "status"})["ok"]
        st = _control_stats(c)
        assert st["closed_idle"] >= 1 and st["closed_line_timeout"] >= 2, st
    finally:
        stop.set()
        t.join(5)
        for s in (idle, partial, slow, active):
            s.close()


def _flood(path: str, stop: threading.Event, out: dict):
    """Requests as fast as the daemon takes them, never reading a reply."""
    s = _connect(path)
    s.setblocking(False)
    chunk = rpc.encode({"op": "show"}) * 256
    sent = 0
    try:
        while not stop.is_set():
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
    except OSError as exc:              # the daemon dropped us
        out["error"] = exc
    finally:
        out["sent"] = sent
        s.close()


def test_non_reading_flooder_and_many_connections_change_nothing(hostile):
    c = hostile
    a, b = c.pods["a"], c.pods["b"]
    pid = _daemon_pid(c)
    base = ping(a.ns, b.ip, count=20, interval_s=0.05)
    assert base["received"] == 20
    rss0 = _rss_bytes(pid)
    idle = [_connect(c.daemon.socket) for _ in range(50)]
    stop, out = threading.Event(), {}
    flooder = threading.Thread(target=_flood, args=(c.daemon.socket, stop, out), daemon=True)
    flooder.start()
    try:
        time.sleep(0.5)
        loaded = ping(a.ns, b.ip, count=40, interval_s=0.05)
        assert loaded["received"] == 40                 # pods still reach each other
        with rpc.Client(c.daemon.socket, timeout_s=5) as cl:
            assert cl.call("status")["pods"] == 2       # a new client is served meanwhile
        flooder.join(IDLE_S + 8)                        # the flooder is dropped
        assert not flooder.is_alive(), "the daemon never dropped the client that does not read"
        assert isinstance(out.get("error"), (BrokenPipeError, ConnectionResetError)), out
        growth = _rss_bytes(pid) - rss0
        assert growth < 32 << 20, f"RSS grew by {growth} bytes"
        st = _control_stats(c)
        assert st["dropped_slow"] >= 1, json.dumps(st)
        print(f"\nping RTT avg: idle {base['rtt_avg_ms']} ms, under the hostile load "
              f"{loaded['rtt_avg_ms']} ms; flooder sent {out['sent']} bytes; RSS growth {growth} bytes")
    finally:
        stop.set()
        flooder.join(5)
        for s in idle:
            s.close()
    assert c.daemon.proc.poll() is None


def test_deeply_nested_json_is_a_protocol_error(hostile):
    c = hostile
    path = c.daemon.socket
    deep = 100_000
    r = _raw(path, b'{"op":"status","x":' + b"[" * deep + b"]" * deep + b"}")
    assert r["ok"] is False and r["code"] == rpc.E_BAD_REQUEST and "nest" in r["msg"], r
    r = _raw(path, b"[" * deep + b"]" * deep)
    assert r["code"] == rpc.E_BAD_REQUEST, r
    r = _raw(path, b'{"op":"status","x":"' + b"[" * deep + b'"}')   # brackets inside a string
    assert r["ok"] is True, r
    limit = 32                          # docs/control.md: at most 32 levels of nesting
    ok = b'{"op":"status","x":' + b"[" * (limit - 1) + b"]" * (limit - 1) + b"}"
    assert _raw(path, ok)["ok"] is True
    over = b'{"op":"status","x":' + b"[" * limit + b"]" * limit + b"}"
    assert _raw(path, over)["code"] == rpc.E_BAD_REQUEST
    assert not _crashes(c)


BAD_VALUES = [[], {}, [[]], [{}], {"a": {"b": []}}, 1.5, True, None, -1, "x", "", 2 ** 70]
NESTED = {
    "attach": [{"ips": [[]]}, {"ips": [{"address": []}]}, {"ips": [{"address": "10.9.0.5/24", "gateway": []}]},
               {"routes": [{"dst": [], "gw": 1}]}, {"routes": [{"dst": "0.0.0.0/0", "gw": {}}]},
               {"port_mappings": [[]]}, {"port_mappings": [{"hostPort": [], "containerPort": {}}]},
               {"port_mappings": [{"hostPort": 80, "containerPort": 80, "protocol": []}]},
               {"bandwidth": {"ingressRate": []}}, {"bandwidth": {"ingressRate": 1e6, "ingressBurst": {}}},
               {"pod": {"name": []}}, {"mac": [1, 2]}],
    "check": [{"ips": [[]]}, {"ips": [{"address": {}}]}, {"routes": [[]]}, {"routes": [{"dst": {}}]},
              {"port_mappings": [[]]}, {"bandwidth": []}, {"mac": {}}],
    "gc": [{"valid": [[]]}, {"valid": [{"containerID": [], "ifname": {}}]}, {"valid": [{"container_id": 1}]}],
    "trace": [{"in_port": "vsw0", "packet": {"src_ip": [], "dst_ip": "10.0.0.1"}},
              {"in_port": "vsw0", "packet": {"src_ip": "10.0.0.2", "dst_ip": "10.0.0.1", "sport": []}},
              {"in_port": "vsw0", "packet": []}, {"in_port": "vsw0", "frame_hex": []}],
}
ARGS = {   # every op's arguments (docs/control.md)
    "attach": ["container_id", "ifname", "netns", "ips", "mac", "routes", "mtu", "port_mappings", "bandwidth",
               "ip_masq", "network", "pod", "fault"],
    "detach": ["container_id", "ifname", "netns"],
    "check": ["container_id", "ifname", "netns", "mac", "ips", "routes", "port_mappings", "bandwidth"],
    "gc": ["valid", "network"],
    "counters": ["port"], "fdb": ["port", "limit", "cursor"], "conntrack": ["port", "limit", "cursor"],
    "capture_start": ["port", "path"], "capture_stop": ["port"],
    "trace": ["in_port", "frame_hex", "packet", "src_mac", "dst_mac", "src_ip", "dst_ip", "proto", "sport",
              "dport"],
    "status": ["x"], "list": ["x"], "show": ["x"], "hostports": ["x"], "metrics": ["x"],
}
BASE = {   # an otherwise valid request of each op, harmless here (no pod in this daemon)
    "attach": {"container_id": "fuzz", "ifname": "eth0", "netns": "/nonexistent/netns",
               "ips": [{"address": "10.9.0.5/24", "gateway": "10.9.0.1"}]},
    "detach": {"container_id": "fuzz", "ifname": "eth0"},
    "check": {"container_id": "fuzz", "ifname": "eth0"},
    "gc": {"valid": []},
    "trace": {"in_port": "vsw0", "src_ip": "10.0.0.2", "dst_ip": "10.0.0.1"},
    "capture_start": {"port": "vsw0"},
    "capture_stop": {"port": "vsw0"},
}


def test_wrong_types_anywhere_get_a_protocol_error_never_999(nss, tmp_path):
    with running_cluster(nss, tmp_path) as c, rpc.Client(c.daemon.socket) as cl:
        bad = []
        cases = [(op, {**BASE.get(op, {}), arg: v}) for op, args in ARGS.items() for arg in args
                 for v in BAD_VALUES]
        cases += [(op, {**BASE.get(op, {}), **extra}) for op, extras in NESTED.items() for extra in extras]
        cases += [("status", {"op": ["status"]}), ("status", {"op": {"a": 1}})]
        for op, args in cases:
            if op == "capture_start" and args.get("path") is None:
                args["path"] = os.devnull + "/not-a-dir/x.pcap"      # never a real capture
            r = cl.request({"op": op, **args})
            assert r.get("ok") in (True, False), r
            if not r["ok"] and r["code"] == rpc.E_INTERNAL:
                bad.append((op, args, r["msg"]))
        assert not bad, f"{len(bad)} requests answered 999, e.g. {bad[:5]}"
        for key in ("port", "in_port"):
            for v in ([], {}, [1], {"a": 1}):
                op = "counters" if key == "port" else "trace"
                r = cl.request({"op": op, **BASE.get(op, {}), key: v})
                assert r["ok"] is False and r["code"] == rpc.E_BAD_ARGS and key in r["msg"], r
        assert cl.call("status")["pods"] == 0
        assert not _crashes(c)


def test_rlimit_nofile_soft_limit_is_raised_to_the_hard_limit(nss, tmp_path):
    soft0, hard0 = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard0)
    assert low < hard0, "this machine's hard limit is too low to tell"
    c = Cluster(nss, tmp_path)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard0))      # the daemon inherits a low soft limit
    try:
        c.daemon.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft0, hard0))
    try:
        with open(f"/proc/{_daemon_pid(c)}/limits") as f:
            row = next(line for line in f if line.startswith("Max open files")).split()
        assert (int(row[3]), int(row[4])) == (hard0, hard0), row
    finally:
        c.daemon.stop()
