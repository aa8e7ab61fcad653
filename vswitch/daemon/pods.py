"""Pods on the switch: attach, detach, check and gc, and re-adoption after a restart.

Theory of operation
-------------------
The four operations are generators run by the control server (``vswitch.daemon.control``) one
at a time: their loop-thread steps (validation, switch ports, hostPort rules, shapers,
gateways bookkeeping, the attachments) run between batches, and each kernel job they
``yield`` (netlink, TAP creation and release, nft, the state file) runs on the kernel
thread while the loop keeps forwarding.

**Attach** (``docs/control.md``) runs named steps — ``tap_create``, ``netns_move``,
``link_config``, ``addresses``, ``routes`` (one kernel job, ``_attach_kernel``), then
``switch_port`` (with the gateways the pod's subnets need), ``hostports``, ``shaper``,
``state_save`` (with the ipMasq rule) — and undoes what was done on a failure (or an
injected fault with ``--test-faults``) before it replies with an error. The state file's
write itself comes after the operation, grouped with those of the operations around it
(``StateWriter``); the reply waits for it, and a failed write undoes the attach (a detach
run first in the queue) before the error reply, as before. The TAP is
created inside the pod's namespace under its final name, configured through one raw
rtnetlink socket of that namespace, one batch of requests per step
(``vswitch.daemon.netlink``); the switch port is added without shaping or mappings first, so
that each of those is its own step. Attach is idempotent by (container id, ifname): the
same arguments again return the stored result, others are an error.

**Detach** releases the switch port (with its hostPort rules, shapers, MAC and conntrack
entries), the attachment, the gateways no other attachment uses and the ipMasq rule,
then the TAP: the kernel thread clears its persistence (a TAP already gone, namespace
deleted or link deleted behind our back: EBADFD, is success) and the fd's close, which
waits ~20 ms for the kernel to unregister the device, runs on a ``TapCloser`` thread while
the next operation runs; the reply waits for it (``_after``, ``vswitch.daemon.control``), and
an attach of the same (netns, ifname) waits for it before creating the TAP. Only a TAP
that exists and cannot be removed is an error, after the rest is released. An unknown
attachment is success (``existed: false``).

**Check** reads the pod's link, addresses and routes through one netlink socket in its
namespace and compares them, and the stored record, with what the runtime expects.
**GC** detaches every attachment (of one network, if named) not in the valid list.

**Re-adoption** (at start): each saved attachment's persistent TAP is reopened by name
inside the pod's namespace and its switch port re-added with the same id, hostPort rules
and shapers. One that cannot be (namespace gone) is logged and dropped from the state.

**Queues**: with ``--workers N`` a pod's TAP is multi-queue, one queue (fd) per packet
worker (``netlink.tap_open_queues``), re-adopted with its N queues; a TAP created
single-queue (by a daemon before workers) is re-adopted with its one queue, which worker
0 reads and every worker writes.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import threading
import time

from vswitch import rpc
from vswitch.daemon import netlink
from vswitch.daemon.attachment import attachment_key, normalize_attach, port_name_for, public, same_attach
from vswitch.config import Bandwidth, PortMapping, format_mac, parse_mac
from vswitch.daemon.ports import TapPort
from vswitch.rpc import RpcError


class StateWriter:
    """Group commit of the state file for attach and detach.

    ``durable(done)`` (loop thread, at the end of an operation) takes a snapshot of the
    state and returns; a writer thread writes the newest snapshot it has, and calls
    ``done(None)`` (or ``done(OSError)``) for every request that snapshot covers. While
    one write (two fsyncs, milliseconds) is under way, the next operations run and their
    requests gather: 20 attaches at once cost a few writes instead of 20. The control
    server sends each reply only after its ``done``: a reply still means the state file
    holds what it says (``vswitch.daemon.control``, ``_after``).
    """

    def __init__(self, state):
        self.state = state
        self._cv = threading.Condition()
        self._latest = None             # (seq, bytes): the newest snapshot not yet written
        self._waiters: list = []        # (seq, done)
        self._thread = None

    def durable(self, done) -> None:
        data = self.state.snapshot()
        seq = self.state.seq
        with self._cv:
            self._latest = (seq, data)
            self._waiters.append((seq, done))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vswitchd-state", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self):
        while True:
            with self._cv:
                while self._latest is None:
                    self._cv.wait()
                seq, data = self._latest
                self._latest = None
            err = None
            try:
                self.state.write(data, seq)
            except OSError as exc:
                err = exc
            with self._cv:
                ready = [d for s, d in self._waiters if s <= seq]
                self._waiters = [(s, d) for s, d in self._waiters if s > seq]
            for d in ready:
                d(err)


class Fault(Exception):
    """An injected fault (``--test-faults``) at the named step."""


class StepFailed(Exception):
    """An attach step failed on the kernel thread (after undoing its own work)."""

    def __init__(self, step: str, exc: BaseException):
        super().__init__(f"{step}: {exc}")
        self.step, self.exc = step, exc


def _fault(fault, step):
    if fault == step:
        raise Fault(step)


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1000, 2)


class Pods:
    def __init__(self, *, switch, state, ports, gateways, masq, log, test_faults: bool):
        self.switch = switch
        self.state = state              # state.attachments: (container id, ifname) -> record
        self.ports = ports              # PortTable
        self.gateways = gateways
        self.masq = masq
        self.log = log
        self.test_faults = test_faults
        self.default_mtu: int | None = None     # an attach without mtu gets it (None: 1500)
        self.queues = 1                 # TAP queues per pod: one per packet worker (--workers)
        self.closer = netlink.TapCloser()   # detach's TAP closes, off the kernel thread
        self.writer = StateWriter(state)    # attach's and detach's state writes, grouped

    @property
    def attachments(self) -> dict:
        return self.state.attachments

    def _masq_subnets(self) -> list[str]:
        return self.masq.subnets(self.attachments.values())

    # ----------------------------------------------------------------- attach

    def attach(self, req):
        """Generator: the pod's kernel steps on the kernel thread, then the switch, hostPort
        rules, shapers and state; any failure undoes what was done."""
        if "mtu" not in req and self.default_mtu is not None:
            req = {**req, "mtu": self.default_mtu}   # no mtu configured: the uplink's - 50 (VXLAN)
        rec = normalize_attach(req, self.test_faults)
        fault = rec.pop("_fault")
        key = (rec["container_id"], rec["ifname"])
        old = self.attachments.get(key)
        if old is not None:
            diff = same_attach(old, rec)
            if diff:
                raise RpcError(rpc.E_BAD_ARGS, f"attachment {key[0]}/{key[1]} exists with other arguments "
                                               f"({diff}); detach it first")
            # the first attach's state write may still be under way: this reply waits for it too
            return dict(self._attach_result(old), _after=[self.writer.durable])
        for other in self.attachments.values():
            if other["netns"] == rec["netns"] and other["ifname"] == rec["ifname"]:
                raise RpcError(rpc.E_IF_EXISTS, f"interface {rec['ifname']!r} in {rec['netns']} belongs to "
                                                f"container {other['container_id']!r}")
        if not os.path.exists(rec["netns"]):
            raise RpcError(rpc.E_BAD_ARGS, f"netns: {rec['netns']!r} does not exist")
        if _same_file(rec["netns"], "/proc/self/ns/net"):
            raise RpcError(rpc.E_BAD_ARGS, f"netns: {rec['netns']!r} is vswitchd's own network namespace "
                                           "(the node's); a pod needs its own")
        self._check_node_overlap(rec)
        name = port_name_for(*key)
        rec.update(port=name, tap=rec["ifname"])
        t0 = time.monotonic()
        steps_ms: dict = {}             # where the attach's time went (the "attached" log line)
        try:
            fds = yield (self._attach_kernel, rec, fault, steps_ms)
            fd = fds[0]
        except StepFailed as failed:
            raise _attach_error(key, failed.step, failed.exc, 1) from None
        t_kernel = time.monotonic()
        undo = ["TAP"]                  # the kernel thread releases it in the undo job
        port, step = None, None
        try:
            step = "switch_port"
            _fault(fault, step)
            gateways = self.gateways.take(rec)
            if gateways:
                undo.append("gateways")
                t = time.monotonic()
                yield (self.gateways.kernel, gateways, [])
                steps_ms["gateways"] = _ms(t, time.monotonic())
            t = time.monotonic()
            port = self._switch_port(rec, fd, bandwidth=False, mappings=False, queue_fds=fds[1:])
            undo.append("switch port")
            step = "hostports"
            _fault(fault, step)
            for m in rec["port_mappings"]:
                self.switch.add_port_mapping(name, m)
            step = "shaper"
            _fault(fault, step)
            self.switch.set_bandwidth(name, rec["bandwidth"] or None)
            steps_ms["switch"] = _ms(t, time.monotonic())
            step = "state_save"
            _fault(fault, step)
            self.attachments[key] = rec
            undo.append("state entry")
            if rec["ip_masq"]:
                yield (self.masq.apply, self._masq_subnets())
        except BaseException as exc:
            if isinstance(exc, GeneratorExit):
                raise
            self.attachments.pop(key, None)
            if port is not None:
                self.ports.drop(port)       # closes the workers' queues
            else:
                for q in fds[1:]:
                    os.close(q)
            if name in self.switch:
                self.switch.remove_port(name)
            gone = self.gateways.release(rec)
            masq = self._masq_subnets() if rec["ip_masq"] else None
            try:
                yield (self._undo_kernel, fd, gone, masq)
            except Exception as uexc:
                self.log("undo_failed", level="error", step=step, error=repr(uexc))
            raise _attach_error(key, step, exc, len(undo)) from None
        t_end = time.monotonic()
        self.log("attached", container_id=key[0], ifname=key[1], netns=rec["netns"], port=name,
                 port_id=rec["port_id"], ips=[e["address"] for e in rec["ips"]], mac=rec["mac"],
                 ms=_ms(t0, t_end), kernel_ms=_ms(t0, t_kernel), after_kernel_ms=_ms(t_kernel, t_end),
                 steps_ms=steps_ms)
        # the reply waits for the state file (StateWriter); if it cannot be written, the
        # attach is undone and answered with the error, as a failed state_save step was
        return dict(self._attach_result(rec), _after=[(self.writer.durable, self._state_failed(key))])

    def _state_failed(self, key):
        """``on_error`` of an attach's durable write: (the error reply, the undo)."""
        def on_error(exc):
            err = RpcError(rpc.E_NETLINK, f"attach {key[0]}/{key[1]} at state_save: {exc}")
            return err, self._undo_attach(key)
        return on_error

    def _undo_attach(self, key):
        """Generator: detach what an attach did whose state could not be written."""
        if key not in self.attachments:
            return {}
        return (yield from self.detach({"container_id": key[0], "ifname": key[1]}))

    def _check_node_overlap(self, rec):
        """A pod subnet must not hold the node's own addresses (the uplink's, moved to the
        host port): the node would route its own network to the pods. Code 7, naming both."""
        node = [ipaddress.ip_interface(a) for a in (self.state.uplink or {}).get("addresses") or []]
        node += [ipaddress.ip_interface(a) for a in self.switch.config.node_addresses]
        for e in rec["ips"]:
            net = ipaddress.ip_interface(e["address"]).network
            for a in node:
                if a.version == net.version and (a.network.overlaps(net) or a.ip in net):
                    raise RpcError(rpc.E_INVALID_CONFIG,
                                   f"ips: {e['address']}: the pod subnet {net} overlaps the node's own address "
                                   f"{a} (its uplink's); pods would shadow the node's network: choose a pod "
                                   f"range outside {a.network}")

    def _attach_kernel(self, rec, fault, steps_ms=None) -> list[int]:
        """Kernel thread: the pod's side of an attach; returns the TAP's fds (one per
        queue, ``self.queues`` of them: queue 0 first). ``steps_ms`` (a dict) gets the
        milliseconds of each step.

        The TAP is created *inside* the pod's namespace under its final name (the fd is
        opened there), so no move and no rename happen: each of those waits for an RCU
        grace period (10-25 ms here). The step names stay those of the protocol:
        ``netns_move`` is opening the namespace's netlink socket and finding the link.
        On a failure the TAP is released and StepFailed(step, exc) raised.
        """
        ifname, netns = rec["ifname"], rec["netns"]
        fd = None
        fds = []
        nl = None
        step = "tap_create"
        try:
            _fault(fault, step)
            t = time.monotonic()
            # a detach of this name may still be closing its TAP (TapCloser): the name is
            # free once that close is done
            self.closer.wait((netns, ifname))
            try:
                fds = netlink.tap_open_queues(ifname, self.queues, create=True, persist=True, netns=netns)
                fd = fds[0]
            except netlink.TapError as exc:
                if exc.errno == errno.EBUSY:
                    raise RpcError(rpc.E_IF_EXISTS, f"interface {ifname!r} already exists in {netns}") from None
                if exc.errno in (errno.ENOENT, errno.EINVAL) and "namespace" in str(exc):
                    raise RpcError(rpc.E_BAD_ARGS, str(exc)) from None
                raise
            if steps_ms is not None:
                steps_ms[step] = _ms(t, time.monotonic())
            step = "netns_move"
            _fault(fault, step)
            t = time.monotonic()
            nl = netlink.RtnlSocket(netns)
            idx = netlink.ifindex_in(ifname, netns)
            lo = netlink.ifindex_in("lo", netns)
            if idx is None:
                raise netlink.TapError(errno.ENODEV, f"TAP {ifname!r} vanished from {netns}")
            step = "link_config"
            _fault(fault, step)
            msgs = [("mac and mtu", netlink.msg_link_set(idx, mac=rec["mac"], mtu=rec["mtu"])),
                    ("up", netlink.msg_link_set(idx, up=True))]
            if lo is not None:
                msgs.append(("lo up", netlink.msg_link_set(lo, up=True)))
            nl.run(step, msgs)
            step = "addresses"
            _fault(fault, step)
            nl.run(step, [(e["address"], netlink.msg_addr(idx, e["address"])) for e in rec["ips"]])
            step = "routes"
            _fault(fault, step)
            nl.run(step, [(f"{r['dst']} via {r.get('gw')}", netlink.msg_route(idx, r["dst"], r.get("gw")))
                          for r in rec["routes"]])
            if steps_ms is not None:
                steps_ms["netlink"] = _ms(t, time.monotonic())
            return fds
        except BaseException as exc:
            for q in fds[1:]:
                os.close(q)
            if fd is not None:
                try:
                    netlink.tap_release(fd, f"TAP {ifname} in {netns}")
                except OSError as uexc:
                    self.log("undo_failed", level="error", step=step, error=repr(uexc))
            raise StepFailed(step, exc) from None
        finally:
            if nl is not None:
                nl.close()

    def _undo_kernel(self, fd, gateways_gone, masq_subnets):
        """Kernel thread: undo an attach after its kernel steps (TAP, gateways, ipMasq)."""
        try:
            netlink.tap_release(fd)
        finally:
            try:
                self.gateways.kernel([], gateways_gone)
            finally:
                if masq_subnets is not None:
                    self.masq.apply(masq_subnets)

    def _attach_result(self, rec):
        host = {"name": self.gateways.name, "mac": self.state.host["mac"]}
        pod = {"name": rec["ifname"], "mac": rec["mac"], "mtu": rec["mtu"], "sandbox": rec["netns"]}
        return {"interfaces": [host, pod], "port": rec["port"], "attachment": public(rec)}

    def _switch_port(self, rec: dict, fd: int, bandwidth=True, mappings=True, queue_fds=()) -> TapPort:
        """Add the switch port of an attachment (same id as before if possible) and its fd
        (and the fds of its other queues, one per packet worker 1..)."""
        name = rec["port"]
        pid = rec.get("port_id")
        if pid is not None and pid in {p.port_id for p in self.switch.ports()}:
            pid = None
        ips = [str(ipaddress.ip_interface(e["address"]).ip) for e in rec["ips"]]
        sp = self.switch.add_port(name, "pod", mac=rec["mac"], ips=ips, port_id=pid,
                                  bandwidth=rec["bandwidth"] if bandwidth else None,
                                  port_mappings=rec["port_mappings"] if mappings else ())
        rec["port_id"] = sp.port_id
        port = TapPort(name=name, port_id=sp.port_id, fd=fd, netns=rec["netns"], ifname=rec["ifname"],
                       queue_fds=list(queue_fds))
        self.ports.add(port)
        return port

    # ----------------------------------------------------------------- detach, gc

    def detach(self, req):
        """Generator: release the attachment, then save the state. Unknown: success."""
        cid, ifname = attachment_key(req)
        rec = self.attachments.get((cid, ifname))
        if rec is None:
            return {"existed": False}
        t0 = time.monotonic()
        error = None
        after = []
        try:
            try:
                tap_existed = yield from self._detach(rec, after)
            except RpcError as exc:
                error = exc
            if error is not None:
                yield self.state.job()
                raise error
        except BaseException:
            _start_now(after)           # an error reply does not wait for the closes
            raise
        self.log("detach_done", container_id=cid, ifname=ifname, ms=_ms(t0, time.monotonic()))
        # "_after": the control server replies once the TAP's close is done (TapCloser) and
        # the state file no longer holds the attachment (StateWriter)
        return {"existed": True, "tap_existed": tap_existed, "_after": after + [self.writer.durable]}

    def _detach(self, rec, after: list):
        """Generator: release an attachment's switch port (with its hostPort rules, shapers,
        MACs and conntrack entries), state entry, gateways no one else uses, ipMasq rule,
        and its TAP. A TAP already gone (namespace deleted, link deleted behind our back) is
        success. Returns whether the TAP still existed; raises RpcError (after releasing
        everything else) only if the TAP exists and could not be removed.

        The TAP's last step, closing its fd (the device is unregistered then, ~20 ms of RCU
        grace periods), is not done here: ``after`` gets a starter for it, which the
        control server calls when the operation has finished; its reply waits for the
        close, so the TAP is gone when the reply goes out, while the next operation runs."""
        key = (rec["container_id"], rec["ifname"])
        port = self.ports.get(rec["port"])
        if rec["port"] in self.switch:
            self.switch.remove_port(rec["port"])
        fd = -1
        if port is not None:
            self.ports.drop(port)
            fd, port.fd = port.fd, -1      # the kernel thread closes it
        self.attachments.pop(key, None)
        gone = self.gateways.release(rec)
        masq = self._masq_subnets() if rec.get("ip_masq") else None
        existed, errors, closing = yield (self._detach_kernel, fd, rec["ifname"], rec["netns"], gone, masq)
        if closing >= 0:
            after.append(self._close_later(closing, (rec["netns"], rec["ifname"])))
        self.log("detached", container_id=key[0], ifname=key[1], port=rec["port"],
                 tap="removed" if existed else "already gone", gateways_removed=gone, errors=errors)
        if errors:
            raise RpcError(rpc.E_NETLINK, f"detach {key[0]}/{key[1]}: released from the switch, but: "
                                          + "; ".join(errors))
        return existed

    def _close_later(self, fd, key):
        """A starter for the control server (``_after``): close ``fd`` on the TapCloser."""
        return lambda done: self.closer.close(fd, key, done)

    def _detach_kernel(self, fd, ifname, netns, gateways_gone, masq_subnets):
        """Kernel thread: remove the TAP (by fd, or by name when never re-adopted), the
        gateway addresses no one uses and the ipMasq rule; returns (tap existed, errors,
        the fd left to close: the TAP is no longer persistent and goes with it, or -1)."""
        errors = []
        existed = False
        closing = -1
        try:
            if fd >= 0:
                existed = netlink.tap_unpersist(fd, f"TAP {ifname} in {netns}")
                if existed:
                    closing = fd
                else:
                    os.close(fd)        # already gone: the fd is detached, its close is quick
            else:
                existed = netlink.link_delete(ifname, netns)
        except (OSError, netlink.NetlinkError) as exc:
            errors.append(f"TAP {ifname} in {netns}: {exc}")
        try:
            self.gateways.kernel([], gateways_gone)
        except (OSError, netlink.NetlinkError) as exc:
            errors.append(f"gateways {gateways_gone}: {exc}")
        if masq_subnets is not None:
            try:
                self.masq.apply(masq_subnets)
            except OSError as exc:
                errors.append(str(exc))
        return existed, errors, closing

    def gc(self, req):
        """Generator: detach every attachment not in ``valid`` (of ``network`` only, if given)."""
        valid = req.get("valid", [])
        if not isinstance(valid, list):
            raise RpcError(rpc.E_BAD_ARGS, f"valid: expected a list of {{'containerID', 'ifname'}}, got {valid!r}")
        network = req.get("network")
        if network is not None and not isinstance(network, str):
            raise RpcError(rpc.E_BAD_ARGS, f"network: expected a network name (string), got {network!r}")
        keep = set()
        for v in valid:
            if not isinstance(v, dict):
                raise RpcError(rpc.E_BAD_ARGS, f"valid: entry {v!r} is not an object")
            keep.add((v.get("containerID", v.get("container_id")), v.get("ifname")))
        removed, errors, after = [], [], []
        for key, rec in list(self.attachments.items()):
            if key in keep or (network is not None and rec.get("network", "") != network):
                continue
            try:
                yield from self._detach(rec, after)
            except RpcError as exc:
                errors.append(exc.msg)
            removed.append({"container_id": key[0], "ifname": key[1]})
        if removed:
            try:
                yield self.state.job()
            except BaseException:
                _start_now(after)
                raise
        return {"removed": removed, "errors": errors, "_after": after}

    # ----------------------------------------------------------------- check

    def check(self, req):
        """Generator: read the pod's link, addresses and routes on the kernel thread."""
        cid, ifname = attachment_key(req)
        rec = self.attachments.get((cid, ifname))
        if rec is None:
            raise RpcError(rpc.E_UNKNOWN_ATTACHMENT, f"no attachment {cid}/{ifname}")

        def fail(msg):
            raise RpcError(rpc.E_CHECK_FAILED, msg)
        netns = req.get("netns", rec["netns"])
        if netns != rec["netns"]:
            fail(f"netns: attached in {rec['netns']}, expected {netns}")
        try:
            view = yield (netlink.pod_view, ifname, netns)
        except (OSError, netlink.NetlinkError) as exc:
            fail(f"netns {netns}: {exc}")
        info = view["link"]
        if info is None:
            fail(f"interface {ifname} is missing in {netns}")
        if req.get("mac") and format_mac(parse_mac(req["mac"])) != info["mac"]:
            fail(f"mac: {ifname} has {info['mac']}, expected {req['mac']}")
        if info["mac"] != rec["mac"]:
            fail(f"mac: {ifname} has {info['mac']}, attached with {rec['mac']}")
        if not info["up"]:
            fail(f"interface {ifname} in {netns} is down")
        have = set(view["addresses"])
        for e in req.get("ips") or rec["ips"]:
            a = str(netlink.parse_cidr(e["address"]))
            if a not in have:
                fail(f"address {a} is missing on {ifname} (has {sorted(have)})")
        routes = view["routes"]
        for r in req.get("routes") or [r for r in rec["routes"] if r.get("gw")]:
            want = {"dst": str(ipaddress.ip_network(r["dst"], strict=False)), "gw": r.get("gw")}
            if r.get("gw") and want not in routes:
                fail(f"route {want['dst']} via {want['gw']} is missing in {netns}")
        if "port_mappings" in req:
            want = [PortMapping.from_cni(m).to_cni() for m in req["port_mappings"] or []]
            if sorted(map(json.dumps, want)) != sorted(map(json.dumps, rec["port_mappings"])):
                fail(f"port_mappings: attached {rec['port_mappings']}, expected {want}")
        if "bandwidth" in req:
            want = Bandwidth.from_cni(req["bandwidth"] or None).to_cni()
            if want != rec["bandwidth"]:
                fail(f"bandwidth: attached {rec['bandwidth']}, expected {want}")
        port = self.ports.get(rec["port"])
        if port is None or port.fd < 0:
            fail(f"switch port {rec['port']} has no TAP fd (not re-adopted)")
        return {}

    # ----------------------------------------------------------------- re-adoption

    def readopt(self):
        """At start: reopen each saved attachment's TAP and re-add its switch port."""
        for rec in self.state.saved_attachments():
            key = (rec["container_id"], rec["ifname"])
            try:
                fds = netlink.tap_open_queues(rec["ifname"], self.queues, create=False, persist=True,
                                              netns=rec["netns"])
                fd = fds[0]
            except OSError as exc:
                self.log("readopt_failed", level="error", container_id=key[0], ifname=key[1],
                         netns=rec["netns"], error=str(exc))
                continue
            try:
                port = self._switch_port(rec, fd, queue_fds=fds[1:])
            except (ValueError, KeyError) as exc:
                for q in fds:
                    os.close(q)
                self.log("readopt_failed", level="error", container_id=key[0], ifname=key[1], error=str(exc))
                continue
            self.attachments[key] = rec
            self.log("readopted", container_id=key[0], ifname=key[1], port=rec["port"], port_id=port.port_id,
                     queues=1 + len(port.queue_fds))
        self.masq.apply(self._masq_subnets())


def _start_now(after: list) -> None:
    """Start the deferred TAP closes of an operation that ends with an error (no waiting)."""
    for start in after:
        start(None)
    after.clear()


def _attach_error(key, step, exc, undone) -> RpcError:
    """The error reply of an attach that failed at ``step`` (after undoing ``undone`` actions)."""
    if isinstance(exc, Fault):
        return RpcError(rpc.E_FAULT, f"injected fault at step {step!r} (undone: {undone} actions)")
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, ValueError):
        return RpcError(rpc.E_BAD_ARGS, f"attach {key[0]}/{key[1]} at {step}: {exc}")
    if isinstance(exc, (OSError, netlink.NetlinkError)):
        return RpcError(rpc.E_NETLINK, f"attach {key[0]}/{key[1]} at {step}: {exc}")
    return RpcError(rpc.E_INTERNAL, f"attach {key[0]}/{key[1]} at {step}: {exc!r}")
