"""vswitchd: owns the pods' TAP devices and moves their packets through the datapath.

Theory of operation
-------------------
**The loop thread.** ``PacketIO.run`` (Cython, ``ext/io.pxi``, no GIL) is the packet
loop: it waits on an epoll holding every port fd (pod TAPs, the host TAP ``vsw0``, the
uplink's AF_PACKET socket) and one more fd, the daemon's control epoll (control socket
and connections, metrics socket, signal wake-up, the kernel thread's eventfd); reads a
batch from the ready ports, runs it through the datapath (the C code of
``Datapath.process``, the monotonic clock read once per batch and passed in), writes it
(FLOOD to every port with an fd except the ingress one), and releases the shaping queues'
packets when due (the wait's timeout is the next departure, in ns). It returns to Python
only when the control epoll is readable, a port fd failed, a signal arrived, or the
conntrack/MAC sweep is due, so Python runs per control request and timer, never per
packet or per batch. **Adaptive polling** (``--poll-us``, default 100 µs): after a
batch the loop polls the ports without blocking for that long before it sleeps, so the
answer to a just-forwarded request is read without a sleep and a thread wakeup (polls
that find nothing yield the CPU to any task waiting for it). The window grows, up to
``--poll-max-us`` (default 4 x ``--poll-us``), while batches keep arriving just after it
(an answer from another node: ext/io.pxi "Adaptive window"). Its CPU cost is at most the
window per burst of traffic (measured: ``status`` → ``loop.poll_ns``); with no traffic
the loop blocks and costs nothing. ``loop_trace`` records the loop's steps with their
times (docs/daemon.md "Where a ping's microseconds go"). While a capture runs (and with the Python
twins) the loop is ``_step``: one ``PacketIO.poll`` per wakeup, the datapath called from
Python so the capture sees each batch before and after processing.

**The parts** (each module opens with its own theory of operation):

- ``control``  the control socket: connections, dispatch to the ops table below, kernel
  operations one at a time with their jobs on ``worker.KernelWorker``;
- ``pods``     attach, detach, check, gc, re-adoption (``attachment``: the record);
- ``state``    the state file, written atomically after every change;
- ``gateways`` the host port ``vsw0`` and its gateway addresses; the Switch;
- ``uplink``   a node NIC as switch port 1 (addresses, routes, sysctls moved and back);
- ``masq``     the nftables table of ipMasq;
- ``metrics``  counters and Prometheus text; ``debug``: captures and traces;
- ``ports``    port kinds, the fd table, and the batch I/O the loop runs on.

**Start** reads the state, opens the host port (and the uplink), re-adopts the saved
attachments (datapath tables — MAC, conntrack — start empty: flows re-learn at once;
NATed TCP connections through a hostPort do not survive a restart), prunes unused
gateways, saves the state and listens. **Shutdown** (SIGTERM/SIGINT) finishes the running
operation, keeps the pods (TAPs are persistent, state stays) and gives the uplink NIC
its addresses back. With no attachment left, vsw0 is deleted, the forwarding sysctls the
daemon turned on get their old values and the state file is removed, so nothing remains. ``docs/daemon.md`` is the operator's page.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
import traceback

from vswitch import __version__, rpc
from vswitch.daemon import metrics
from vswitch.daemon import netlink
from vswitch import datapath
from vswitch.datapath import consts as C
from vswitch.daemon.attachment import need_str, public
from vswitch.daemon.cluster import FATAL_EXIT_STATUS, ClusterConfig, ClusterMode
from vswitch.daemon.cniexec import CniExec
from vswitch.daemon.control import ControlServer, Limits
from vswitch.daemon.debug import Captures, conntrack_page, fdb_page, trace
from vswitch.daemon.gateways import Gateways
from vswitch.daemon.log import LOG_LEVELS, Log
from vswitch.daemon.masq import Masq
from vswitch.daemon.pods import Pods
from vswitch.daemon.ports import DAEMON_MAX_BATCH, MAX_WORKERS, PacketIO, PortTable, set_tunnel_gso, tunnel_gso, uplink_fanout
from vswitch.rpc import RpcError
from vswitch.daemon.state import State
from vswitch.switch import Switch
from vswitch.daemon.uplink import Uplink, restore as uplink_restore
from vswitch.daemon.vxlan import VtepConfig, Vxlan
from vswitch.daemon.worker import KernelWorker

SWEEP_INTERVAL_NS = 10 * C.SEC_NS
SWITCH_INTERVAL_S = 0.0005      # the loop thread waits at most this long for the GIL
DEFAULT_POLL_US = 100           # --poll-us: polling window after a batch (0: always sleep)
DEFAULT_POLL_BULK_KIB = 0       # --poll-bulk-kib: off (ext/io.pxi "Bulk batches")
MAX_POLL_BULK_KIB = 1 << 20
POLL_GROW = 4                   # --poll-max-us default: the window may grow to POLL_GROW x --poll-us
MAX_POLL_US = 100_000           # the bound of --poll-us (0.1 s of polling per burst at most)
KERNEL_OPS = frozenset({"attach", "detach", "check", "gc", "peers"})
DEFAULT_WORKERS = 1             # --workers: packet worker threads (docs/daemon.md "Packet workers")
NEVER_NS = 1 << 62


class Daemon:
    def __init__(self, socket_path: str, state_dir: str, switch: str = "vsw0", uplink: str | None = None,
                 log_file: str | None = None, metrics_port: int | None = None, test_faults: bool = False,
                 max_ports: int = 256, poll_us: int = DEFAULT_POLL_US, log_level: str = "info",
                 log_group: str | None = None, control_limits: Limits = Limits(),
                 cluster: ClusterConfig | None = None, conntrack_size: int | None = None,
                 mac_learn_rate_per_s: int | None = None, vtep: VtepConfig | None = None,
                 cluster_cidrs: tuple = (), metrics_address: str = "127.0.0.1", workers: int = DEFAULT_WORKERS,
                 busy_poll: bool = False, poll_max_us: int | None = None,
                 poll_bulk_kib: int = DEFAULT_POLL_BULK_KIB):
        if isinstance(poll_us, bool) or not isinstance(poll_us, int) or not 0 <= poll_us <= MAX_POLL_US:
            raise ValueError(f"poll_us={poll_us!r}; accepted: an integer 0 .. {MAX_POLL_US} (microseconds)")
        if poll_max_us is None:
            poll_max_us = min(POLL_GROW * poll_us, MAX_POLL_US)
        if (isinstance(poll_max_us, bool) or not isinstance(poll_max_us, int)
                or not poll_us <= poll_max_us <= MAX_POLL_US):
            raise ValueError(f"poll_max_us={poll_max_us!r}; accepted: an integer poll_us ({poll_us}) .. "
                             f"{MAX_POLL_US} (microseconds)")
        if (isinstance(poll_bulk_kib, bool) or not isinstance(poll_bulk_kib, int)
                or not 0 <= poll_bulk_kib <= MAX_POLL_BULK_KIB):
            raise ValueError(f"poll_bulk_kib={poll_bulk_kib!r}; accepted: an integer 0 .. {MAX_POLL_BULK_KIB} "
                             f"(KiB; 0: poll after every batch)")
        self.poll_bulk_bytes = poll_bulk_kib * 1024   # no window after such a batch (ext/io.pxi "Bulk batches")
        self.workers = workers          # packet workers: this thread (worker 0) and workers - 1 threads
        self.busy_poll = bool(busy_poll)
        self._worker_threads: list[threading.Thread] = []
        self._workers_stop = False
        self._workers_fd = -1           # eventfd: readable = the workers return (stop)
        self.worker_exits: list[str] = []   # a worker thread that ended by an error (status shows it)
        self.socket_path = socket_path
        self.host_name = switch
        self.uplink_name = uplink
        self.metrics_port = metrics_port
        self.metrics_address = metrics_address
        self.test_faults = test_faults
        self.max_ports = max_ports
        self.conntrack_size = conntrack_size     # None: the datapath's default
        self.mac_learn_rate_per_s = mac_learn_rate_per_s     # None: the datapath's default (D44)
        self.poll_ns = poll_us * 1000
        self.poll_max_ns = poll_max_us * 1000     # the adaptive window's bound (ext/io.pxi "Adaptive window")
        self.log = Log(log_file, level=log_level, group=log_group)
        self.control_limits = control_limits
        self.reopen_log = False         # SIGHUP: the log file is reopened (rotation)
        self.started = time.monotonic()
        self.state = State(state_dir)
        self.io = PacketIO(max_ports, max_batch=DAEMON_MAX_BATCH, workers=workers)   # ValueError: bad workers
        self.captures = Captures(self.log)
        self.ports = PortTable(self.io, on_drop=self.captures.close)
        self.gateways = Gateways(switch, self.state, self.log)
        # ipMasq leaves the cluster's pod CIDRs alone (--cluster-cidr, with or without etcd)
        self.masq = Masq(self.log, exclude=list(cluster_cidrs) or (cluster.cluster_cidrs if cluster else []))
        self.vtep_conf = vtep           # --vxlan (vswitch.daemon.vxlan); needs the uplink
        self.vxlan: Vxlan | None = None
        self.reload_peers = False       # SIGHUP: the --peers file is read again
        self.host_port = None           # ports.HostPort
        self.uplink_port = None         # ports.UplinkPort
        self.switch: Switch | None = None
        self.pods: Pods | None = None
        self.kernel: KernelWorker | None = None
        self.control: ControlServer | None = None
        self.stop = False
        self.exit_status = 0            # main's exit status when the loop ends by itself
        # cluster mode (--cluster-cidr): subnet lease and peers from etcd (vswitch.daemon.cluster)
        self.cluster = ClusterMode(cluster, self.state, self.log) if cluster is not None else None
        self.batches = 0                # batches of the Python loop (_step)
        self.last_sweep_ns = 0

    # ----------------------------------------------------------------- start-up

    def start(self):
        self.state.load()
        nofile = raise_nofile_limit()
        self.ep = select.epoll()       # control: sockets, signals, the kernel thread (ports: self.io)
        self.io.watch_control(self.ep.fileno())
        self._signals()
        self.kernel = KernelWorker()
        self.ep.register(self.kernel.fd, select.EPOLLIN)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        uplink = Uplink(self.uplink_name, self.host_name, self.state, self.log) if self.uplink_name else None
        self.host_port = self.gateways.open(self.max_ports, nic=uplink.nic() if uplink else None,
                                            conntrack_size=self.conntrack_size,
                                            mac_learn_rate_per_s=self.mac_learn_rate_per_s,
                                            queues=self.workers)
        self.switch = self.gateways.switch
        self.io.set_flood_classes(self.switch.dp.flood_classes())   # floods by port kind and shaper (D41)
        self.ports.add(self.host_port)
        if uplink:
            self.uplink_port = uplink.up(self.switch)
            uplink_fanout(self.uplink_port, self.uplink_name, self.workers)   # one socket per worker
            self.ports.add(self.uplink_port)
        elif self.state.uplink:
            # started without --uplink but a crashed run had one: give the NIC its addresses back
            uplink_restore(self.state.uplink, self.host_name, self.log)
            self.state.uplink = None
        if self.vtep_conf is not None:
            if self.uplink_port is None:
                raise SystemExit("vswitchd: --vxlan needs --uplink (the VTEP sends on it)")
            nic = uplink.nic()
            self.vxlan = Vxlan(self.vtep_conf, self.switch, self.state, self.log, self.host_name,
                               uplink_port_id=self.uplink_port.port_id)
            # the VTEP MAC: the uplink NIC's own, as in cluster mode (the host port took it)
            self.vxlan.start(self.state.uplink["addresses"], outer_mac=nic["mac"], vtep_mac=self.state.host["mac"],
                             mtu=nic["mtu"])
        if self.cluster is not None:
            self.cluster.vxlan = self.vxlan     # the membership's peers go to vxlan.replace("cluster", ...)
            # the VTEP MAC: the uplink NIC's own (the host port took it), else one of the node name
            self.cluster.start(vtep_mac=self.state.host["mac"] if self.uplink_port is not None else None)
        self.pods = Pods(switch=self.switch, state=self.state, ports=self.ports, gateways=self.gateways,
                         masq=self.masq, log=self.log, test_faults=self.test_faults)
        self.pods.queues = self.workers         # a TAP queue per packet worker
        if self.vxlan is not None:
            self.pods.default_mtu = self.vxlan.vtep["mtu"] - C.ENCAP_LEN    # pods without a configured mtu
        self.pods.readopt()
        self.gateways.prune()
        self.state.adopted = True
        self.state.save()
        self.control = ControlServer(self.ep, self.log, self._handlers(), KERNEL_OPS, self.kernel,
                                     stopping=lambda: self.stop, metrics_text=self.metrics_text,
                                     limits=self.control_limits, cniexec=CniExec(self.log))
        self.control.listen(self.socket_path)
        if self.metrics_port is not None:
            self.control.listen_metrics(self.metrics_port, self.metrics_address)
        if self.vxlan is not None:
            self.vxlan.submit = self.control.submit_internal
            self.vxlan.request_sync()
        if self.cluster is not None:
            self.cluster.set_wake(self.control.wake_fd)
            try:
                self.cluster.wait_start()
            except SystemExit:
                self.exit_status = FATAL_EXIT_STATUS
                raise
        self._start_workers()
        self.log("started", version=__version__, socket=self.socket_path, switch=self.host_name,
                 uplink=self.uplink_name, pods=len(self.state.attachments), io=self.io.impl,
                 datapath=type(self.switch.dp).__module__, nofile=nofile, workers=self.workers,
                 busy_poll=self.busy_poll)

    # ----------------------------------------------------------------- packet workers

    def _start_workers(self):
        """Workers 1..N-1: a thread each running ``BatchIO.run`` on its own queues with the
        shared LoopLock (ext/io.pxi); worker 0 is the loop of ``run`` below."""
        if self.workers <= 1:
            return
        self._workers_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        for k in range(1, self.workers):
            self.io.bs[k].watch_control(self._workers_fd)
            t = threading.Thread(target=self._worker, args=(k,), name=f"vswitchd-worker-{k}", daemon=True)
            self._worker_threads.append(t)
            t.start()

    def _worker(self, k: int):
        """Worker k's thread: the GIL-free loop until stopped; Python only to stop."""
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        b, dp, lock = self.io.bs[k], self.switch.dp, self.io.lock
        try:
            while not self._workers_stop:
                b.run(dp, NEVER_NS, self.poll_ns, self.busy_poll, lock, True, self.poll_max_ns,
                      self.poll_bulk_bytes)
        except BaseException as exc:    # never silent: logged, shown by status
            self.worker_exits.append(f"worker {k}: {exc!r}")
            self.log("worker_failed", level="error", worker=k, error=repr(exc), tb=traceback.format_exc())

    def _stop_workers(self):
        if not self._worker_threads:
            return
        self._workers_stop = True
        os.eventfd_write(self._workers_fd, 1)
        for t in self._worker_threads:
            t.join(10)
        self._worker_threads = []
        os.close(self._workers_fd)
        self._workers_fd = -1

    def _signals(self):
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._sig_r, self._sig_w = r, w
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)

        def on_signal(signum, frame):
            self.stop = True
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        def on_hup(signum, frame):
            self.reopen_log = True
            self.reload_peers = True
        signal.signal(signal.SIGHUP, on_hup)
        self.ep.register(r.fileno(), select.EPOLLIN)

    # ----------------------------------------------------------------- the ops table

    def _handlers(self) -> dict:
        """op name -> fn(req) -> reply fields; the KERNEL_OPS are generators (vswitch.daemon.control)."""
        return {"attach": self.pods.attach, "detach": self.pods.detach, "check": self.pods.check, "gc": self.pods.gc,
                "status": self.op_status, "list": self.op_list, "show": self.op_show,
                "counters": self.op_counters, "fdb": self.op_fdb, "conntrack": self.op_conntrack,
                "hostports": self.op_hostports, "capture_start": self.op_capture_start,
                "capture_stop": self.op_capture_stop, "trace": self.op_trace, "metrics": self.op_metrics,
                "pod_cidr": self.op_pod_cidr, "nodes": self.op_nodes, "peers": self.op_peers,
                "loop_trace": self.op_loop_trace}

    def op_peers(self, req):
        """Generator (a kernel op): the VXLAN peer table (vswitch.daemon.vxlan)."""
        if self.vxlan is None:
            raise RpcError(rpc.E_INVALID_CONFIG, "vswitchd runs without --vxlan: it has no VXLAN peers")
        return (yield from self.vxlan.op_peers(req))

    def op_pod_cidr(self, req):
        if self.cluster is None:
            raise RpcError(rpc.E_INVALID_CONFIG, "vswitchd does not run in cluster mode (no --cluster-cidr): "
                                                 "it leases no pod subnet; give the IPAM a subnet instead of usePodCidr")
        return self.cluster.op_pod_cidr(req)

    def op_nodes(self, req):
        return self.cluster.op_nodes(req) if self.cluster is not None else {"cluster": None, "nodes": []}

    def op_status(self, req):
        return {"pods": len(self.state.attachments), "uptime_s": round(time.monotonic() - self.started, 3),
                "version": __version__, "switch": self.host_name, "uplink": self.uplink_name,
                "datapath": type(self.switch.dp).__module__, "io": self.io.impl,
                "poll_us": self.poll_ns // 1000, "poll_max_us": self.poll_max_ns // 1000,
                "poll_bulk_kib": self.poll_bulk_bytes // 1024,
                "poll_window_us": getattr(self.io.b, "loop_window_ns", 0) // 1000, "loop": self.io.loop_stats(), "control": self.control.status(),
                "workers": self.workers, "busy_poll": self.busy_poll, "worker_exits": list(self.worker_exits),
                "tunnel_gso": tunnel_gso(self.io.impl),
                "cluster": self.cluster.status() if self.cluster is not None else None,
                "vxlan": self.vxlan.status() if self.vxlan is not None else None}

    def op_list(self, req):
        return {"attachments": [public(a) for a in self.state.attachments.values()]}

    def op_show(self, req):
        by_port = {a["port"]: a for a in self.state.attachments.values()}
        ports = []
        for p in self.switch.ports():
            d = p.to_dict()
            fdp = self.ports.get(p.name)
            d["fd"] = fdp.fd if fdp else -1
            rec = by_port.get(p.name)
            if rec:
                d.update(container_id=rec["container_id"], ifname=rec["ifname"], netns=rec["netns"])
            ports.append(d)
        return {"switch": self.host_name, "uplink": self.uplink_name, "node_addresses": list(self.switch.node_addresses),
                "gateways": self.state.host.get("gateways", []), "ports": ports,
                "hostports": self.switch.hostports(), "captures": self.captures.paths(self.switch),
                "vxlan": self.vxlan.listing() if self.vxlan is not None else None}

    def op_counters(self, req):
        try:
            return metrics.counters(self.switch, self.io, req.get("port"), self.batches)
        except KeyError as exc:
            raise RpcError(rpc.E_BAD_ARGS, str(exc.args[0])) from None

    def op_fdb(self, req):
        return fdb_page(self.switch, req, time.monotonic_ns())

    def op_conntrack(self, req):
        return conntrack_page(self.switch, req, time.monotonic_ns())

    def op_hostports(self, req):
        return {"rules": self.switch.hostports()}

    def _port_arg(self, value):
        """A switch port named by a request (name or id); code 4 naming it if unknown."""
        try:
            return self.switch.port(value)
        except KeyError as exc:
            raise RpcError(rpc.E_BAD_ARGS, str(exc.args[0])) from None

    def op_capture_start(self, req):
        path = need_str(req, "path")
        if self.workers > 1:
            raise RpcError(rpc.E_INVALID_CONFIG, f"capture: vswitchd runs {self.workers} packet workers "
                                                 f"(--workers); captures need --workers 1 (one loop sees every batch)")
        return self.captures.start(self._port_arg(req.get("port")), path)

    def op_capture_stop(self, req):
        return self.captures.stop(self._port_arg(req.get("port")))

    def op_trace(self, req):
        return trace(self.switch, self._port_arg(req.get("in_port")), req, time.monotonic_ns())

    def op_loop_trace(self, req):
        """The packet loop's step trace (BatchIO.trace_start, docs/daemon.md "Where a ping's
        microseconds go"): action "start" (capacity rows per worker, default 4096), "stop",
        or "rows": each worker's rows [t_ns, step, a, b], oldest first, and the step names."""
        action = req.get("action", "rows")
        bs = [b for b in self.io.bs if hasattr(b, "trace_start")]
        if not bs:
            raise RpcError(rpc.E_INVALID_CONFIG, "loop_trace: the packet loop is the Python twin's (no trace)")
        if action == "start":
            cap = req.get("capacity", 4096)
            if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= 1 << 20:
                raise RpcError(rpc.E_BAD_ARGS, f"capacity={cap!r}; accepted: an integer 1 .. {1 << 20}")
            try:
                for b in bs:
                    b.trace_start(cap)
            except ValueError as exc:
                raise RpcError(rpc.E_BAD_ARGS, str(exc)) from None
            return {"tracing": True}
        if action == "stop":
            for b in bs:
                b.trace_stop()
            return {"tracing": False}
        if action == "rows":
            steps = sys.modules[type(bs[0]).__module__].TRACE_STEPS
            return {"steps": {str(k): v for k, v in steps.items()},
                    "workers": [b.trace_rows().tolist() for b in bs]}
        raise RpcError(rpc.E_BAD_ARGS, f"action={action!r}; accepted: start, stop, rows")

    def op_metrics(self, req):
        return {"text": self.metrics_text()}

    def metrics_text(self) -> str:
        return metrics.prometheus_text(metrics.counters(self.switch, self.io, None, self.batches),
                                       len(self.state.attachments), time.monotonic() - self.started,
                                       (self.cluster.metrics_lines() if self.cluster is not None else [])
                                       + (self.vxlan.metrics_lines() if self.vxlan is not None else []))

    # ----------------------------------------------------------------- the loop

    def run(self):
        """The loop: while no capture runs, ``io.run`` (Cython, no GIL) forwards, drains
        the shaping queues and polls until Python has work (a control event, a failed
        port, the sweep timer); else one ``io.poll`` per wakeup with the datapath called
        from here (captures see each batch; the Python twins use this path)."""
        io, dp = self.io, self.switch.dp
        fast = io.impl == "c"           # vswitch.datapath chose the core for both (one selection)
        run, poll_ns, busy, lock, poll_max_ns = io.run, self.poll_ns, self.busy_poll, io.lock, self.poll_max_ns
        bulk = self.poll_bulk_bytes
        monotonic_ns = time.monotonic_ns
        ctl = self.control
        vx = self.vxlan
        never = NEVER_NS
        while True:
            if self.stop:
                if self.cluster is not None:
                    # leave the cluster (revoke the lease) while we still forward: etcd is
                    # reached through our own switch; the leave thread wakes the loop when done
                    self.cluster.begin_leave(len(self.state.attachments))
                if not ctl.busy and not (self.cluster is not None and self.cluster.leave_pending()):
                    break
            if fast and not self.captures:
                run(dp, min(self.last_sweep_ns + SWEEP_INTERVAL_NS, ctl.timer_ns, vx.timer_ns if vx else never),
                    poll_ns, busy, lock, False, poll_max_ns, bulk)
                now = monotonic_ns()
            else:
                now = self._step()
            if lock is None:
                self._loop_work(now)
            else:
                with lock:              # the other workers are between rounds: tables and fds are ours
                    self._loop_work(now)

    def _loop_work(self, now):
        """Python's part of a loop round: timers, failed ports, control events, sweeps."""
        io, dp, ctl, vx = self.io, self.switch.dp, self.control, self.vxlan
        if now >= ctl.timer_ns:
            ctl.tick(now)
        if vx is not None and now >= vx.timer_ns and not self.stop:
            vx.tick(now)
        if io.n_failed:
            for pid in io.failed[:io.n_failed].tolist():
                p = self.ports.polled.get(pid)
                if p is not None:
                    self._port_failed(p)
        if io.control_ready:
            self._control_events()
        if now - self.last_sweep_ns >= SWEEP_INTERVAL_NS:
            self.last_sweep_ns = now
            dp.conntrack_sweep(now)
            dp.mac_sweep(now)

    def _step(self) -> int:
        """One wakeup in Python: wait and read (``io.poll``), process, capture, write,
        drain when due; returns the clock it passed to the datapath."""
        io, dp = self.io, self.switch.dp
        nd = dp.next_departure_ns()
        now = time.monotonic_ns()
        until = min(self.last_sweep_ns + SWEEP_INTERVAL_NS, self.control.timer_ns,
                    self.vxlan.timer_ns if self.vxlan is not None else 1 << 62)
        if 0 <= nd < until:
            until = nd
        n = io.poll(max(0, -((now - until) // 1_000_000)))       # ms, rounded up
        now = time.monotonic_ns()
        if n:
            buf, offsets, lengths, in_ports, out_ports = io.buf, io.offsets, io.lengths, io.in_ports, io.out_ports
            if self.captures:
                self.captures.frames(buf, offsets, lengths, in_ports, None, n, io.port_fds)
            dp.process(buf, offsets, lengths, in_ports, out_ports, n, now)
            if self.captures:
                self.captures.frames(buf, offsets, lengths, in_ports, out_ports, n, io.port_fds,
                                     io.b.port_flood)
            io.write(n)
            self.batches += 1
        nd = dp.next_departure_ns()
        if 0 <= nd <= now:
            self._drain(now)
        return now

    def _drain(self, now):
        """Write the shaping queues' due packets (``Switch.drain_due``; captures see them)."""
        io = self.io

        def write(k):
            if self.captures:
                self.captures.frames(io.dbuf, io.doffsets, io.dlengths, io.din_ports, io.dout_ports, k, io.port_fds,
                                     io.b.port_flood)
            io.write_drained(k)

        self.switch.drain_due(now, io.dbuf, io.doffsets, io.dlengths, io.din_ports, io.dout_ports,
                              io.max_batch, write)

    def _control_events(self):
        """One round of control work (bounded: ``vswitch.daemon.control``)."""
        self.control.round_start()
        for fd, ev in self.ep.poll(0):
            if fd == self.kernel.fd:
                self.control.kernel_done()
            elif fd == self._sig_r.fileno():
                try:
                    self._sig_r.recv(64)
                except BlockingIOError:
                    pass
            else:
                self.control.event(fd, ev)
        if self.reopen_log:
            self.reopen_log = False
            self.log.reopen()
        if self.reload_peers:
            self.reload_peers = False
            if self.vxlan is not None and self.vxlan.conf.peers_file:
                try:
                    self.vxlan.reload_file()
                except (ValueError, RpcError) as exc:       # the previous table stays
                    self.log("peers_reload_failed", level="error", error=str(exc))
        if self.cluster is not None:
            fatal = self.cluster.service(kernel_idle=not self.control.busy)
            if fatal and not self.stop:
                self.log("fatal", level="error", msg=fatal)
                self.exit_status = FATAL_EXIT_STATUS
                self.stop = True
        self.control.round_end()

    def _port_failed(self, port):
        """A TAP whose device vanished (link deleted behind our back): stop polling it."""
        self.log("port_failed", level="warning", port=port.name)
        self.ports.failed(port)         # keep it known; detach closes it
        if port.name in self.switch:
            self.switch.set_port_up(port.name, False)

    # ----------------------------------------------------------------- shutdown

    def shutdown(self):
        self._stop_workers()            # before any port or table goes
        if self.control is not None:
            self.control.drop_queued()
        if self.kernel is not None:
            self.kernel.stop()
        if self.cluster is not None:
            self.cluster.close(pods_left=len(self.state.attachments))
        self.captures.close_all()
        if self.control is not None:
            self.control.close_conns()
        self.ports.close_taps()        # persistent: the pods keep their interfaces
        st = self.state
        if self.vxlan is not None:
            self.vxlan.stop()           # our routes and neighbours on the host port go
        if self.uplink_port is not None:
            self.uplink_port.close()
            uplink_restore(st.uplink, self.host_name, self.log)
            st.uplink = None
        if self.host_port is not None:
            if not st.attachments and st.adopted:
                netlink.tap_set_persist(self.host_port.fd, False)
                st.host["gateways"] = []
                self.gateways.restore_forwarding()   # the node's forwarding sysctls as they were
            self.host_port.close()
        if not st.adopted:
            pass                       # start failed early: leave the state as it was
        elif st.attachments:
            st.save()
        else:
            self.masq.apply([])
            st.remove()
        if self.control is not None:
            self.control.close_listeners()
        self.log("stopped", pods=len(st.attachments))


def raise_nofile_limit() -> int:
    """RLIMIT_NOFILE's soft limit raised to the hard one (as many daemons do); the new limit.
    Running out is still handled (``vswitch.daemon.control``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vswitchd", description="vswitch daemon: pods on TAP devices")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    ap.add_argument("--socket", default=rpc.DEFAULT_SOCKET, help="control socket path")
    ap.add_argument("--state-dir", default="/var/lib/vswitch", help="where state.json lives")
    ap.add_argument("--switch", default="vsw0", help="name of the host port TAP (default vsw0)")
    ap.add_argument("--uplink", help="NIC to attach with AF_PACKET; its addresses move to the host port")
    ap.add_argument("--log-file", help="also append the structured log lines to this file")
    ap.add_argument("--metrics-port", type=int, help="serve Prometheus text on ADDRESS:PORT/metrics")
    ap.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDRESS",
                    help="the metrics endpoint's address (default 127.0.0.1): the node's IPv4 or IPv6 "
                         "address so a cluster's Prometheus can scrape it, 0.0.0.0 or :: for all")
    ap.add_argument("--max-ports", type=int, default=256,
                    help="switch ports, host port and uplink included (default 256)")
    ap.add_argument("--conntrack-size", type=int, default=None, metavar="ENTRIES",
                    help="hostPort connections tracked at once (1 .. 2**26; default "
                         "65536); a full table evicts unestablished entries first")
    ap.add_argument("--mac-learn-rate", type=int, default=None, metavar="PER_S",
                    help="new MACs learned per second per port (burst 1000; 0 = no limit; "
                         "default 1000); beyond it a MAC is not learned, mac_learn_limited")
    ap.add_argument("--poll-us", type=int, default=DEFAULT_POLL_US,
                    help=f"after forwarding a batch, poll the ports without sleeping for this many "
                         f"microseconds before blocking (0 .. {MAX_POLL_US}; 0 disables; default "
                         f"{DEFAULT_POLL_US}): catches a reply without a thread wakeup, at the cost of "
                         f"at most this much CPU per burst of traffic; idle costs nothing")
    ap.add_argument("--poll-max-us", type=int, default=None,
                    help=f"the polling window grows up to this many microseconds while batches keep arriving "
                         f"just after it (an answer from another node; default {POLL_GROW} x --poll-us; "
                         f"--poll-us itself: a fixed window)")
    ap.add_argument("--poll-bulk-kib", type=int, default=DEFAULT_POLL_BULK_KIB, metavar="KIB",
                    help=f"a batch carrying at least this many KiB through the uplink (a stream to or "
                         f"from another node) opens no polling window: the loop blocks after it, "
                         f"leaving the CPU to the stream's senders and receivers; for nodes short of "
                         f"cores (32: +5-9%% cross-node TCP on 2 vCPUs, docs/daemon.md) (0 .. "
                         f"{MAX_POLL_BULK_KIB}; default {DEFAULT_POLL_BULK_KIB}: off)")
    ap.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                    help=f"packet worker threads (1 .. {MAX_WORKERS}; default {DEFAULT_WORKERS}): each reads and "
                         f"writes its own queue of every multi-queue TAP and its own uplink socket "
                         f"(PACKET_FANOUT), the datapath's table work serialized by one lock (docs/daemon.md)")
    ap.add_argument("--busy-poll", action="store_true",
                    help="workers poll their ports without ever sleeping (lowest latency; each worker "
                         "uses a whole core even when idle); default: adaptive (--poll-us), idle costs nothing")
    ap.add_argument("--test-faults", action="store_true", help="accept 'fault' in attach (tests only)")
    ap.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                    help="the least severe events written (default info)")
    ap.add_argument("--log-group", metavar="GROUP",
                    help="the --log-file's group (name or gid): the file is then 0640, else 0600")
    lim = Limits()
    ap.add_argument("--ctl-max-conns", type=int, default=lim.max_conns,
                    help=f"control and metrics connections at once; more are told code 11 and closed "
                         f"(default {lim.max_conns})")
    ap.add_argument("--ctl-idle-timeout-s", type=float, default=lim.idle_timeout_s,
                    help=f"close a connection idle this long: nothing read or written, no operation "
                         f"running (default {lim.idle_timeout_s:g})")
    ap.add_argument("--ctl-line-timeout-s", type=float, default=lim.line_timeout_s,
                    help=f"a request line begun must end within this many seconds (default {lim.line_timeout_s:g})")
    ap.add_argument("--ctl-max-queued-bytes", type=int, default=lim.max_queued_bytes,
                    help=f"drop a client whose unsent replies exceed this (default {lim.max_queued_bytes})")
    cl = ap.add_argument_group("cluster mode (docs/daemon.md): a node subnet leased from etcd, the other nodes watched")
    cl.add_argument("--cluster-cidr", metavar="CIDR[,CIDR6]",
                    help="the cluster's pod CIDR(s): one IPv4 and/or one IPv6; never masqueraded to (ipMasq); "
                         "with --etcd-endpoints it turns cluster mode on")
    cl.add_argument("--node-subnet-size", metavar="PLEN[,PLEN6]",
                    help="prefix length of a node's subnet per cluster CIDR (e.g. 24 or 24,64)")
    cl.add_argument("--etcd-endpoints", metavar="URL,...", help="etcd v3 client URLs")
    cl.add_argument("--node-name", help="this node's name in the cluster (unique)")
    cl.add_argument("--node-ip", help="this node's underlay address (default: the uplink's first IPv4, "
                                      "else the source address of the route to the first etcd endpoint)")
    cl.add_argument("--etcd-ca", metavar="FILE", help="CA certificate to verify etcd with")
    cl.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd")
    cl.add_argument("--etcd-key", metavar="FILE", help="the client certificate's key")
    cl.add_argument("--etcd-prefix", metavar="P", help="key prefix in etcd (default /vswitch/)")
    cl.add_argument("--lease-ttl-s", type=int, metavar="N",
                    help="the lease TTL: a node silent this long is forgotten (2..3600, default 10)")
    vx = ap.add_argument_group("VXLAN (docs/daemon.md): pods on other nodes through the uplink; needs --uplink")
    vx.add_argument("--vxlan", action="store_true",
                    help="turn VXLAN on (implied by any --vtep-* option and by --peers)")
    vx.add_argument("--vtep-vni", type=int, metavar="VNI", help="the VNI (0 .. 16777215; default 1, flannel's)")
    vx.add_argument("--vtep-port", type=int, metavar="PORT",
                    help=f"the UDP destination port (default {C.VXLAN_PORT}, IANA's; Linux's default is 8472)")
    vx.add_argument("--vtep-address", metavar="IPV4", help="the VTEP's address (default: the uplink's first IPv4)")
    vx.add_argument("--peers", metavar="FILE",
                    help='a JSON list of {"name", "node_ip", "pod_cidrs": [...], "vtep_mac"}: the other nodes; '
                         "read again on SIGHUP and by 'vswitchctl peers reload'")
    vx.add_argument("--tunnel-gso", choices=("udp", "segments"), default="udp",
                    help="how a pod's TSO segment leaves encapsulated: 'udp' (default) hands the kernel one "
                         "UDP GSO packet of up to 64 ready VXLAN segments (docs/datapath.md D54); 'segments' "
                         "writes each wire segment (D51; also used when the kernel refuses UDP GSO)")
    a = ap.parse_args(argv)
    vtep = None
    if a.vxlan or any(v is not None for v in (a.vtep_vni, a.vtep_port, a.vtep_address, a.peers)):
        if not a.uplink:
            ap.error("--vxlan (and --vtep-*, --peers) need --uplink: the VTEP sends and receives on it")
        try:
            vtep = VtepConfig(1 if a.vtep_vni is None else a.vtep_vni,
                              C.VXLAN_PORT if a.vtep_port is None else a.vtep_port, a.vtep_address, a.peers)
        except ValueError as exc:
            ap.error(str(exc))
    cluster = None
    cluster_cidrs = ()
    if a.cluster_cidr is not None and a.etcd_endpoints is None:
        # no etcd: the cluster CIDR(s) only keep ipMasq from masquerading pod-to-pod traffic
        if any(v is not None for v in (a.node_subnet_size, a.node_name, a.node_ip, a.etcd_ca, a.etcd_cert,
                                       a.etcd_key, a.etcd_prefix, a.lease_ttl_s)):
            ap.error("the cluster options other than --cluster-cidr need --etcd-endpoints")
        try:
            cluster_cidrs = tuple(str(ipaddress.ip_network(c.strip(), strict=True))
                                  for c in a.cluster_cidr.split(",") if c.strip())
        except ValueError as exc:
            ap.error(f"--cluster-cidr {a.cluster_cidr!r}: {exc}; accepted: CIDR[,CIDR6] like 10.244.0.0/16")
        if not cluster_cidrs:
            ap.error(f"--cluster-cidr {a.cluster_cidr!r}: accepted: CIDR[,CIDR6] like 10.244.0.0/16")
    elif a.cluster_cidr is not None:
        missing = [f for f, v in (("--node-subnet-size", a.node_subnet_size), ("--etcd-endpoints", a.etcd_endpoints),
                                  ("--node-name", a.node_name)) if not v]
        if missing:
            ap.error(f"--cluster-cidr needs {', '.join(missing)}")
        try:
            cluster = ClusterConfig(a.cluster_cidr, a.node_subnet_size, a.etcd_endpoints, a.node_name, a.node_ip,
                                    a.etcd_ca, a.etcd_cert, a.etcd_key, a.etcd_prefix, a.lease_ttl_s)
        except ValueError as exc:
            print(f"vswitchd: cluster: {exc}", file=sys.stderr)
            return 2
        # cluster mode implies VXLAN (the membership's peers are its peer table): needs the uplink
        if not a.uplink:
            ap.error("cluster mode (--cluster-cidr with --etcd-endpoints) needs --uplink: the other "
                     "nodes' pods are reached by VXLAN through it")
        if vtep is None:
            vtep = VtepConfig()
    elif any(v is not None for v in (a.node_subnet_size, a.etcd_endpoints, a.node_name, a.node_ip, a.etcd_ca,
                                      a.etcd_cert, a.etcd_key, a.etcd_prefix, a.lease_ttl_s)):
        ap.error("the cluster options need --cluster-cidr")
    try:
        limits = Limits(a.ctl_max_conns, a.ctl_idle_timeout_s, a.ctl_line_timeout_s, a.ctl_max_queued_bytes)
    except ValueError as exc:
        ap.error(f"--ctl-*: {exc}")
    try:
        datapath.module()               # the one selection: a missing build stops here, clearly
    except datapath.BuildError as exc:
        print(f"vswitchd: {exc}", file=sys.stderr)
        return 2
    set_tunnel_gso(a.tunnel_gso)
    if os.geteuid() != 0:
        print("vswitchd: must run as root (TAP devices, namespaces)", file=sys.stderr)
        return 2
    if not 0 <= a.poll_us <= MAX_POLL_US:
        ap.error(f"--poll-us {a.poll_us}: accepted 0 .. {MAX_POLL_US} (microseconds)")
    if not 1 <= a.workers <= MAX_WORKERS:
        ap.error(f"--workers {a.workers}: accepted 1 .. {MAX_WORKERS} (packet worker threads)")
    if a.workers > 1 and datapath.implementation() != "c":
        ap.error(f"--workers {a.workers}: packet workers need the Cython core; the pure-Python twin "
                 f"(VSWITCH_PURE_PYTHON=1) runs --workers 1")
    try:
        ipaddress.ip_address(a.metrics_address)
    except ValueError:
        ap.error(f"--metrics-address {a.metrics_address!r} is not an IP address; accepted: the node's "
                 f"IPv4 or IPv6 address, 127.0.0.1 (the default), 0.0.0.0 or ::")
    try:
        d = Daemon(a.socket, a.state_dir, a.switch, a.uplink, a.log_file, a.metrics_port, a.test_faults,
                   a.max_ports, a.poll_us, log_level=a.log_level, log_group=a.log_group, control_limits=limits,
                   cluster=cluster, conntrack_size=a.conntrack_size, mac_learn_rate_per_s=a.mac_learn_rate,
                   vtep=vtep, cluster_cidrs=cluster_cidrs, metrics_address=a.metrics_address,
                   workers=a.workers, busy_poll=a.busy_poll, poll_max_us=a.poll_max_us,
                   poll_bulk_kib=a.poll_bulk_kib)
    except (OSError, ValueError, KeyError) as exc:
        print(f"vswitchd: {exc}", file=sys.stderr)
        return 2
    try:
        d.start()
        d.run()
    except SystemExit as exc:
        d.log("fatal", level="error", msg=str(exc))
        print(exc, file=sys.stderr)
        return d.exit_status or 1
    finally:
        try:
            d.shutdown()
        except Exception as exc:
            d.log("shutdown_failed", level="error", error=repr(exc), tb=traceback.format_exc())
    return d.exit_status


if __name__ == "__main__":
    sys.exit(main())
