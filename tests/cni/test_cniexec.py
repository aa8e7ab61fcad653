"""vswitchd's side of the thin CNI client (vswitch/daemon/cniexec.py, op ``cni_exec``),
driven by the reference client in thinclient.py against a real daemon, real host-local
and real pod namespaces; the C client itself is tests/cni/test_client.py's.

What is proven: an invocation run by the daemon gives the runtime byte for byte what the
Python plugin run as its own process gives (results, CNI errors, exit status), IPAM runs
on the client's side (an R frame per execution), and no client can hurt the daemon: a
wrong version, a pipelined request, more sessions than allowed, oversized or unknown
frames, a broken environment, a client that vanishes in the middle of an ADD. After
each, the daemon answers and the counters say what happened."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import thinclient as tc  # noqa: E402
from cnitest import Netns, netconf, nsexec, reservations  # noqa: E402

from vswitch.daemon import cniexec  # noqa: E402

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def python_plugin(env, stdin: bytes):
    """The Python plugin as its own process (the fallback's form): (rc, stdout, stderr)."""
    code = ("import sys; sys.path.insert(0, %r); from vswitch_cni.plugin import main; sys.exit(main())"
            % str(REPO))
    p = subprocess.run([sys.executable, "-c", code], input=stdin, env=env, capture_output=True, timeout=60)
    return p.returncode, p.stdout, p.stderr


def session_stats(node):
    return node.call("status")["control"]["cni_exec"]


def wait_stats(node, key, at_least, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        st = session_stats(node)
        if st[key] >= at_least and st["active"] == 0 or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


@pytest.fixture
def conf(node, hl_dir, net_name, subnet):
    return netconf(net_name, subnet, hl_dir, socket=node.socket)


def test_add_check_del_through_the_daemon(runner, node, conf, pods, hl_dir, net_name):
    pod = pods.new()
    env = runner.env("ADD", cid="thin1", netns=Netns.path(pod))
    rc, out, err, runs = tc.invoke(node.socket, env, json.dumps(conf).encode())
    assert rc == 0, (out, err)
    assert runs == 1                    # host-local ADD, run by the client
    result = json.loads(out)
    ip = result["ips"][0]["address"]
    assert ip.split("/")[0] in nsexec(pod, "ip", "-4", "addr", "show", "eth0").stdout
    assert reservations(hl_dir, net_name) == [ip.split("/")[0]]
    assert [a["container_id"] for a in node.attachments()].count("thin1") == 1
    rc, out, err, runs = tc.invoke(node.socket, runner.env("CHECK", cid="thin1", netns=Netns.path(pod)),
                                   json.dumps(dict(conf, prevResult=result)).encode())
    assert (rc, out) == (0, b""), err
    rc, out, err, runs = tc.invoke(node.socket, runner.env("DEL", cid="thin1", netns=Netns.path(pod)),
                                   json.dumps(dict(conf, prevResult=result)).encode())
    assert (rc, out) == (0, b""), err
    assert reservations(hl_dir, net_name) == []
    assert "thin1" not in [a["container_id"] for a in node.attachments()]


@pytest.mark.parametrize("case", ["not-json", "no-name", "no-netns", "ipam-missing", "bad-version",
                                  "own-netns", "daemon-netns"])
def test_errors_are_the_python_plugins_byte_for_byte(runner, node, conf, pods, case):
    pod = pods.new()
    env = runner.env("ADD", cid=f"err-{case}", netns=Netns.path(pod))
    stdin = dict(conf)
    if case == "no-name":
        del stdin["name"]
    elif case == "no-netns":
        del env["CNI_NETNS"]
    elif case == "ipam-missing":
        stdin["ipam"] = dict(stdin["ipam"], type="no-such-ipam")
    elif case == "bad-version":
        stdin["cniVersion"] = "9.9.9"
    elif case == "own-netns":           # the client's (this process's): refused as the plugin does
        env["CNI_NETNS"] = f"/proc/{os.getpid()}/ns/net"
    elif case == "daemon-netns":        # the node's: refused by vswitchd's attach, IPAM undone
        env["CNI_NETNS"] = f"/proc/{node.proc.pid}/ns/net"
    data = b"{not json" if case == "not-json" else json.dumps(stdin).encode()
    rc, out, err, _ = tc.invoke(node.socket, env, data)
    want = python_plugin(env, data)
    assert (rc, out) == want[:2]
    assert rc == 1 and json.loads(out)["code"] > 0
    assert [a for a in node.attachments() if a["container_id"] == f"err-{case}"] == []


def test_version_needs_no_stdin(runner, node):
    rc, out, err, runs = tc.invoke(node.socket, runner.env("VERSION"), b"")
    assert (rc, out, runs) == (0, python_plugin(runner.env("VERSION"), b"")[1], 0)


# ---------------------------------------------------------------- hostile clients

def _connect(node):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(node.socket)
    return s


def _reply(s):
    return json.loads(tc.read_line(s))


def test_wrong_version_and_pipelined_requests_are_refused(node):
    with _connect(node) as s:
        s.sendall(b'{"op":"cni_exec","v":2}\n')
        r = _reply(s)
        assert (r["ok"], r["code"]) == (False, 4) and "v=2" in r["msg"]
        s.sendall(tc.HELLO + b'{"op":"status"}\n')      # a second request behind it
        r = _reply(s)
        assert (r["ok"], r["code"]) == (False, 105)
        assert _reply(s)["ok"] is True                   # the status still answered
    assert session_stats(node)["active"] == 0


def test_sessions_are_bounded_and_freed(node):
    before = session_stats(node)
    stalled = []
    try:
        for _ in range(cniexec.MAX_SESSIONS):
            s = _connect(node)
            s.sendall(tc.HELLO)
            assert tc.read_line(s) == tc.OK_LINE
            stalled.append(s)
        with _connect(node) as s:
            s.sendall(tc.HELLO)
            r = _reply(s)
            assert (r["ok"], r["code"]) == (False, 11)
        assert session_stats(node)["active"] == cniexec.MAX_SESSIONS
    finally:
        for s in stalled:
            s.close()
    st = wait_stats(node, "failed", before["failed"] + cniexec.MAX_SESSIONS)
    assert st["active"] == 0 and st["busy"] == before["busy"] + 1
    assert st["failed"] == before["failed"] + cniexec.MAX_SESSIONS
    rc, out, _, _ = tc.invoke(node.socket, {"CNI_COMMAND": "VERSION"}, b"")
    assert rc == 0 and b"supportedVersions" in out


@pytest.mark.parametrize("attack", ["oversized", "unknown-frame", "env-without-name", "no-env-end",
                                    "short-frame"])
def test_broken_frames_end_the_session_only(node, attack):
    before = session_stats(node)["failed"]
    with _connect(node) as s:
        s.sendall(tc.HELLO)
        assert tc.read_line(s) == tc.OK_LINE
        if attack == "oversized":
            s.sendall(struct.pack(">cI", b"I", cniexec.MAX_FRAME + 1))
        elif attack == "unknown-frame":
            s.sendall(tc.frame(b"Z", b"x"))
        elif attack == "env-without-name":
            s.sendall(tc.frame(b"I", b"=x\0\0{}"))
        elif attack == "no-env-end":
            s.sendall(tc.frame(b"I", b"CNI_COMMAND=ADD\0"))
        else:
            s.sendall(struct.pack(">cI", b"I", 100) + b"abc")
            s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""         # the daemon ended the session
    assert wait_stats(node, "failed", before + 1)["failed"] == before + 1
    assert node.call("status")["ok"]


def test_client_vanishing_during_ipam_leaves_the_daemon_serving(runner, node, conf, pods, hl_dir, net_name):
    pod = pods.new()
    before = session_stats(node)["failed"]
    env = runner.env("ADD", cid="vanish1", netns=Netns.path(pod))
    with _connect(node) as s:
        s.sendall(tc.HELLO)
        assert tc.read_line(s) == tc.OK_LINE
        s.sendall(tc.frame(b"I", tc.env_block(env) + json.dumps(conf).encode()))
        kind, _ = tc.recv_frame(s)
        assert kind == b"R"             # host-local ADD asked for; the client dies instead
    assert wait_stats(node, "failed", before + 1)["failed"] == before + 1
    assert "vanish1" not in [a["container_id"] for a in node.attachments()]
    assert reservations(hl_dir, net_name) == []         # IPAM never ran
    rc, _, err, _ = tc.invoke(node.socket, runner.env("ADD", cid="vanish2", netns=Netns.path(pod)),
                              json.dumps(conf).encode())
    assert rc == 0, err
    tc.invoke(node.socket, runner.env("DEL", cid="vanish2", netns=Netns.path(pod)), json.dumps(conf).encode())
