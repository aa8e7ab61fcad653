"""What an attach or detach reply promises, now that the daemon does part of the work off
its operation queue (issue 16): detach's TAP close runs on a closer thread, and the state
writes of attach and detach are grouped by a writer thread, while the next operations
run; each reply waits for its part.

- a detach reply goes out only once the pod's interface is gone, for many detaches at once;
- an attach of the same interface name right behind its detach succeeds (it waits for the
  close, instead of finding the name taken);
- an attach reply goes out only once the state file holds the attachment (durable: a
  daemon killed right after re-adopts the pod), also for many attaches at once;
- a failing attach still answers with its error code, and leaves nothing behind, also
  when it is the grouped state write that fails.
"""
import concurrent.futures
import json
import os
import threading

from vswitch import rpc

from cnitest import Netns, links_in


def _attach_req(node, cid, ns, i):
    net = node.subnet.rsplit(".", 1)[0]
    return {"op": "attach", "container_id": cid, "ifname": "eth0", "netns": Netns.path(ns),
            "ips": [{"address": f"{net}.{10 + i}/24", "gateway": f"{net}.1"}]}


def _state(node):
    """The state file as it is now (no file: no attachment, docs/daemon.md)."""
    try:
        with open(os.path.join(node.state_dir, "state.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"attachments": []}


def test_each_detach_reply_comes_after_its_interface_is_gone(node, pods):
    n = 8
    nss = [pods.new() for _ in range(n)]
    for i, ns in enumerate(nss):
        assert node.call(**_attach_req(node, f"dc{i}", ns, i))["ok"]
        assert "eth0" in links_in(ns)
    start = threading.Barrier(n)

    def detach(i):
        with rpc.Client(node.socket, 60) as c:
            start.wait()
            reply = c.request({"op": "detach", "container_id": f"dc{i}", "ifname": "eth0",
                               "netns": Netns.path(nss[i])})
            left = set(links_in(nss[i]))        # at once, before anything else happens
        return reply, left

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(detach, range(n)))
    for reply, left in results:
        assert reply["ok"] and reply["existed"] and reply["tap_existed"], reply
        assert left == {"lo"}, left
    assert node.attachments() == []
    assert _state(node)["attachments"] == []


def test_attach_right_behind_a_detach_of_the_same_name_succeeds(node, pods):
    ns = pods.new()
    req = _attach_req(node, "again", ns, 30)
    assert node.call(**req)["ok"]
    with rpc.Client(node.socket, 60) as a, rpc.Client(node.socket, 60) as b:
        # both queued back to back: the attach runs while the detach's TAP is still closing
        a.sock.sendall(rpc.encode({"op": "detach", "container_id": "again", "ifname": "eth0",
                                   "netns": Netns.path(ns)}))
        b.sock.sendall(rpc.encode(dict(req, container_id="again2")))
        detached = rpc.decode(a._readline(), "reply")
        attached = rpc.decode(b._readline(), "reply")
    assert detached["ok"] and detached["tap_existed"], detached
    assert attached["ok"], attached
    assert [x["container_id"] for x in node.attachments()] == ["again2"]
    assert "eth0" in links_in(ns)
    assert node.call(op="detach", container_id="again2", ifname="eth0", netns=Netns.path(ns))["ok"]
    assert set(links_in(ns)) == {"lo"}


def test_attach_reply_comes_after_the_state_file_holds_it(node, pods):
    ns = pods.new()
    reply = node.call(**_attach_req(node, "durable", ns, 40))
    saved = [a for a in _state(node)["attachments"] if a["container_id"] == "durable"]
    assert len(saved) == 1 and saved[0]["port"] == reply["port"], saved
    assert node.call(op="detach", container_id="durable", ifname="eth0", netns=Netns.path(ns))["ok"]
    assert [a for a in _state(node)["attachments"] if a["container_id"] == "durable"] == []


def test_a_failing_attach_answers_its_code_and_leaves_nothing(node, pods):
    ns = pods.new()
    for step, i in (("routes", 50), ("state_save", 51)):
        with rpc.Client(node.socket, 60) as c:
            reply = c.request(dict(_attach_req(node, f"fail-{step}", ns, i), fault=step))
        assert not reply["ok"] and reply["code"] == rpc.E_FAULT and step in reply["msg"], reply
        assert set(links_in(ns)) == {"lo"}
        assert node.attachments() == []
        assert [a for a in _state(node).get("attachments", []) if a["container_id"] == f"fail-{step}"] == []


def test_an_attach_whose_state_cannot_be_written_is_undone_and_answers_101(node, pods):
    """The state write is grouped and done after the operation; if it fails (here: the
    temp file's name is taken by a directory), the attach is undone before its error reply,
    as when the write was the operation's last step."""
    ns, ok_ns = pods.new(), pods.new()
    blocker = os.path.join(node.state_dir, "state.json.tmp")
    os.mkdir(blocker)
    try:
        with rpc.Client(node.socket, 60) as c:
            reply = c.request(_attach_req(node, "nostate", ns, 60))
        assert not reply["ok"] and reply["code"] == rpc.E_NETLINK, reply
        assert "state_save" in reply["msg"] and "nostate" in reply["msg"], reply
        assert node.attachments() == []
        assert set(links_in(ns)) == {"lo"}
    finally:
        os.rmdir(blocker)
    assert node.call(**_attach_req(node, "withstate", ok_ns, 61))["ok"]
    assert [a["container_id"] for a in _state(node)["attachments"]] == ["withstate"]
    assert node.call(op="detach", container_id="withstate", ifname="eth0", netns=Netns.path(ok_ns))["ok"]


def test_many_attaches_at_once_each_reply_finds_its_attachment_on_disk(node, pods):
    """Grouped writes: 12 attaches at once; each reply comes only once the state file lists
    that attachment (read by the client as soon as its reply arrives)."""
    n = 12
    nss = [pods.new() for _ in range(n)]
    start = threading.Barrier(n)

    def attach(i):
        with rpc.Client(node.socket, 60) as c:
            start.wait()
            reply = c.request(_attach_req(node, f"many{i}", nss[i], 70 + i))
            on_disk = {a["container_id"] for a in _state(node)["attachments"]}
        return reply, on_disk

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(attach, range(n)))
    for i, (reply, on_disk) in enumerate(results):
        assert reply["ok"], reply
        assert f"many{i}" in on_disk, (i, on_disk)
    for i in range(n):
        assert node.call(op="detach", container_id=f"many{i}", ifname="eth0", netns=Netns.path(nss[i]))["ok"]
    assert _state(node)["attachments"] == []
