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
that find nothing yield the CPU to any task waiting for it). Its CPU cost is at most
``poll_us`` per burst of traffic (measured: ``status`` → ``loop.poll_ns``); with no
traffic the loop blocks and costs nothing. While a capture runs (and with the Python
twins) the loop is ``_step``: one ``PacketIO.poll`` per wakeup, the datapath called from
Python so the capture sees each batch before and after processing.

**The kernel thread.** ``attach``, ``detach``, ``check`` and ``gc`` run one at a time, in
arrival order, as generators: their loop-thread steps (validation, switch ports, hostPort
rules, shapers, state bookkeeping) run on the loop thread, and each kernel job they
``yield`` (netlink, TAP creation and release, the state file write with its fsync, nft)
runs on one ``KernelWorker`` thread, in submission order, while the loop keeps
forwarding; the result comes back through an eventfd. Other requests are answered at
once. Replies on one connection keep the order of its requests.

**Attach** (``docs/control.md``) runs named steps — ``tap_create``, ``netns_move``,
``link_config``, ``addresses``, ``routes`` (kernel thread), ``switch_port``,
``hostports``, ``shaper``, ``state_save`` — and undoes what was done on a failure (or an
injected fault with ``--test-faults``) before it replies with an error. The TAP is
created inside the pod's namespace under its final name, configured through one raw
rtnetlink socket of that namespace, one batch of requests per step (``vswitch.netlink``).
Attach and detach are idempotent by (container id, ifname). **Detach** releases the
switch port with its hostPort rules, shapers, MAC and conntrack entries, the state
entry, the gateways no other attachment uses and the ipMasq rule, then the TAP; a TAP
already gone (namespace deleted, link deleted behind our back: EBADFD) is success.

**State** lives in ``STATE_DIR/state.json``, written atomically (temp file, fsync,
rename, fsync of the directory; on the kernel thread, before the reply) after every
change: the host port's MAC and gateways, the uplink's original addresses and sysctls,
and every attachment with its switch port id. On start the daemon re-adopts each attachment: it reopens the persistent TAP by name
inside the pod's namespace, re-adds the switch port with the same id, hostPort rules and
shapers. Datapath tables (MAC, conntrack) start empty: flows re-learn at once; NATed TCP
connections through a hostPort do not survive a restart.

**The host port** is a persistent TAP in the daemon's namespace (``--switch``, default
``vsw0``) that holds one gateway address per pod subnet while a pod of that subnet is
attached (the bridge plugin's ``isGateway``; at most 8, the switch's limit of addresses
per port, beyond which attach fails with code 7), and IPv4 forwarding is enabled.
**The uplink** (``--uplink NIC``): vsw0 takes the NIC's MAC and MTU, the NIC's addresses and gateway routes move to vsw0 (saved in the state first),
the NIC gets ``rp_filter=1``, ``arp_ignore=8`` and ``disable_ipv6=1`` so its own stack
ignores what it receives (the switch delivers that to vsw0), and an AF_PACKET socket
becomes the uplink port. A clean exit (SIGTERM/SIGINT) moves everything back.

**ipMasq** (an attach option, ``ip_masq: true``): the daemon keeps one nftables table,
``ip vswitch_masq``, with one ``masquerade`` rule per masqueraded pod subnet for traffic
leaving that subnet (``ip saddr S ip daddr != S``), applied with ``nft -f`` when the set
of subnets changes and deleted with the last such pod. It is the only iptables/nftables
state the daemon ever creates, and only when asked.

**Shutdown** keeps the pods: TAPs are persistent, state stays. With no attachment left,
vsw0 is deleted and the state file removed, so nothing remains.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import errno
import hashlib
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

from vswitch import __version__, netlink, rpc
from vswitch import dpconst as C
from vswitch.config import Bandwidth, PortMapping, SwitchConfig, format_mac, parse_mac
from vswitch.ports import HostPort, PacketIO, TapPort, UplinkPort, open_uplink_socket
from vswitch.rpc import RpcError
from vswitch.switch import Switch

ATTACH_STEPS = ("tap_create", "netns_move", "link_config", "addresses", "routes",
                "switch_port", "hostports", "shaper", "state_save")
STATE_VERSION = 1
SWEEP_INTERVAL_NS = 10 * C.SEC_NS
SWITCH_INTERVAL_S = 0.0005      # the loop thread waits at most this long for the GIL
DEFAULT_POLL_US = 100           # --poll-us: polling window after a batch (0: always sleep)
MAX_POLL_US = 100_000           # the bound of --poll-us (0.1 s of polling per burst at most)
MAX_GATEWAYS = C.MAX_IPS_PER_PORT   # addresses of the host port in the switch (Switch.add_port)
EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP


# --------------------------------------------------------------------------- logging

class Log:
    """Structured log lines: one JSON object per line (ts, level, event, fields)."""

    def __init__(self, path: str | None = None):
        self.files = [sys.stderr]
        if path:
            self.files.append(open(path, "a", buffering=1))

    def __call__(self, event: str, level: str = "info", **fields):
        rec = {"ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
               "level": level, "event": event, **fields}
        line = json.dumps(rec, default=str) + "\n"
        for f in self.files:
            try:
                f.write(line)
                f.flush()
            except (OSError, ValueError):
                pass


# --------------------------------------------------------------------------- pcap

class PcapWriter:
    """A classic pcap file (Ethernet link type) of the frames seen on one port."""

    SNAPLEN = 262144

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "wb")
        self.f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, self.SNAPLEN, 1))
        self.packets = 0

    def write(self, frame) -> None:
        t = time.time()
        sec = int(t)
        self.f.write(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(frame), len(frame)))
        self.f.write(frame)
        self.packets += 1

    def close(self) -> int:
        self.f.close()
        return self.packets


# --------------------------------------------------------------------------- helpers

class Fault(Exception):
    pass


class StepFailed(Exception):
    """An attach step failed on the kernel thread (after undoing its own work)."""

    def __init__(self, step: str, exc: BaseException):
        super().__init__(f"{step}: {exc}")
        self.step, self.exc = step, exc


class KernelWorker:
    """One thread that runs the kernel work of control operations, in submission order.

    ``submit(fn, args)`` runs ``fn(*args)`` on the thread; its result (or exception) is
    queued and the eventfd ``fd`` (registered in the loop's epoll) becomes readable;
    ``completions()``, on the loop thread, yields them as ``(ok, value)``. The thread
    blocks in syscalls (netlink, TAP close, fsync) without the GIL, so the packet loop
    keeps forwarding; the daemon lowers the interpreter's switch interval so that the
    loop gets the GIL back quickly when the thread runs Python.
    """

    def __init__(self):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._jobs = collections.deque()
        self._cv = threading.Condition()
        self._done = collections.deque()
        self._thread = threading.Thread(target=self._run, name="vswitchd-kernel", daemon=True)
        self._thread.start()

    def submit(self, fn, args=()):
        with self._cv:
            self._jobs.append((fn, args))
            self._cv.notify()

    def _run(self):
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                job = self._jobs.popleft()
            if job is None:
                return
            fn, args = job
            try:
                res = (True, fn(*args))
            except BaseException as exc:   # handed to the operation that submitted it
                res = (False, exc)
            self._done.append(res)
            os.eventfd_write(self.fd, 1)

    def completions(self):
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        while self._done:
            yield self._done.popleft()

    def stop(self, timeout_s: float = 30.0):
        with self._cv:
            self._jobs.append(None)
            self._cv.notify()
        self._thread.join(timeout_s)
        os.close(self.fd)


def _err(code: int, msg: str) -> RpcError:
    return RpcError(code, msg)


def port_name_for(container_id: str, ifname: str) -> str:
    """The switch port name (and the TAP's name before it moves): stable per attachment."""
    return "vp" + hashlib.sha1(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


def mac_for(container_id: str, ifname: str) -> str:
    h = hashlib.sha1(f"mac/{container_id}/{ifname}".encode()).digest()
    return format_mac(bytes([(h[0] & 0xFE) | 0x02]) + h[1:6])


def _need_str(req: dict, key: str, maxlen: int = 4096) -> str:
    v = req.get(key)
    if not isinstance(v, str) or not v or len(v) > maxlen:
        raise _err(rpc.E_BAD_ARGS, f"{key}: expected a non-empty string, got {v!r}")
    return v


def _valid_ifname(name: str) -> str:
    if (not isinstance(name, str) or not 1 <= len(name) <= 15 or name in (".", "..")
            or any(c in name for c in "/:") or any(c.isspace() for c in name)):
        raise _err(rpc.E_BAD_ARGS, f"ifname: {name!r} is not a valid interface name "
                                   f"(1..15 characters, no '/', ':' or spaces)")
    return name


def normalize_attach(req: dict, test_faults: bool) -> dict:
    """Validate an attach request; returns the attachment record (without port/tap)."""
    cid = _need_str(req, "container_id", 1024)
    ifname = _valid_ifname(req.get("ifname"))
    netns = _need_str(req, "netns")
    ips_in = req.get("ips", [])
    if not isinstance(ips_in, list) or len(ips_in) > C.MAX_IPS_PER_PORT:
        raise _err(rpc.E_BAD_ARGS, f"ips: expected a list of at most {C.MAX_IPS_PER_PORT} "
                                   f"{{'address': 'a.b.c.d/len', 'gateway': ...}}, got {ips_in!r}")
    ips = []
    for e in ips_in:
        if not isinstance(e, dict) or "address" not in e:
            raise _err(rpc.E_BAD_ARGS, f"ips: entry {e!r} needs an 'address' like '10.0.0.5/24'")
        try:
            iface = netlink.parse_cidr(e["address"]) if isinstance(e["address"], str) else None
        except ValueError:
            iface = None
        if iface is None or iface.network.prefixlen == iface.max_prefixlen:
            raise _err(rpc.E_BAD_ARGS, f"ips: address {e['address']!r} must be an address with a "
                                       f"prefix shorter than the full length, like '10.0.0.5/24'")
        gw = e.get("gateway")
        if gw is not None:
            try:
                gwa = ipaddress.ip_address(gw)
            except (ValueError, TypeError):
                raise _err(rpc.E_BAD_ARGS, f"ips: gateway {gw!r} is not an IP address") from None
            if gwa not in iface.network or gwa == iface.ip:
                raise _err(rpc.E_BAD_ARGS, f"ips: gateway {gw} is not another address of {iface.network}")
            gw = str(gwa)
        ips.append({"address": str(iface), "gateway": gw})
    routes_in = req.get("routes")
    if routes_in is None:
        routes = [{"dst": "0.0.0.0/0" if ipaddress.ip_interface(e["address"]).version == 4 else "::/0",
                   "gw": e["gateway"]} for e in ips if e["gateway"]]
        routes = list({r["dst"]: r for r in reversed(routes)}.values())[::-1]   # first gateway per family
    else:
        if not isinstance(routes_in, list):
            raise _err(rpc.E_BAD_ARGS, f"routes: expected a list of {{'dst', 'gw'}}, got {routes_in!r}")
        routes = []
        for r in routes_in:
            if not isinstance(r, dict) or not isinstance(r.get("dst"), str):
                raise _err(rpc.E_BAD_ARGS, f"routes: entry {r!r} needs 'dst' like '0.0.0.0/0'")
            try:
                dst = str(ipaddress.ip_network(r["dst"], strict=False))
                gw = str(ipaddress.ip_address(r["gw"])) if r.get("gw") else None
            except (ValueError, TypeError):
                raise _err(rpc.E_BAD_ARGS, f"routes: entry {r!r} has a bad dst or gw") from None
            routes.append({"dst": dst, "gw": gw})
    mac = req.get("mac")
    if mac in (None, ""):
        mac = mac_for(cid, ifname)
    else:
        try:
            mb = parse_mac(mac)
        except ValueError as exc:
            raise _err(rpc.E_BAD_ARGS, str(exc)) from None
        if mb[0] & 1 or mb == b"\0" * 6:
            raise _err(rpc.E_BAD_ARGS, f"mac: {mac!r} is multicast or zero; a pod needs a unicast MAC")
        mac = format_mac(mb)
    mtu = req.get("mtu", 1500)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65521:
        raise _err(rpc.E_BAD_ARGS, f"mtu: {mtu!r}; accepted: an integer 68 .. 65521")
    pm_in = req.get("port_mappings") or []
    if not isinstance(pm_in, list):
        raise _err(rpc.E_BAD_ARGS, f"port_mappings: expected a list, got {pm_in!r}")
    try:
        mappings = [PortMapping.from_cni(m).to_cni() for m in pm_in]
        bandwidth = Bandwidth.from_cni(req.get("bandwidth") or None).to_cni()
    except ValueError as exc:
        raise _err(rpc.E_BAD_ARGS, str(exc)) from None
    ip_masq = req.get("ip_masq", False)
    if not isinstance(ip_masq, bool):
        raise _err(rpc.E_BAD_ARGS, f"ip_masq: expected true or false, got {ip_masq!r}")
    network = req.get("network", "")
    pod = req.get("pod", {})
    if not isinstance(network, str) or not isinstance(pod, dict):
        raise _err(rpc.E_BAD_ARGS, f"network must be a string and pod an object, got {network!r}, {pod!r}")
    fault = req.get("fault")
    if fault is not None:
        if not test_faults:
            raise _err(rpc.E_BAD_ARGS, "fault: only accepted when vswitchd runs with --test-faults")
        if fault not in ATTACH_STEPS:
            raise _err(rpc.E_BAD_ARGS, f"fault: {fault!r}; accepted: {', '.join(ATTACH_STEPS)}")
    return {"container_id": cid, "ifname": ifname, "netns": netns, "mac": mac, "ips": ips,
            "routes": routes, "mtu": mtu, "port_mappings": mappings, "bandwidth": bandwidth,
            "ip_masq": ip_masq, "network": network, "pod": pod, "_fault": fault}


_COMPARED = ("netns", "mac", "ips", "routes", "mtu", "port_mappings", "bandwidth", "ip_masq")


def _same_attach(a: dict, b: dict) -> str | None:
    for k in _COMPARED:
        if a.get(k) != b.get(k):
            return f"{k}: stored {a.get(k)!r}, requested {b.get(k)!r}"
    return None


# --------------------------------------------------------------------------- the daemon

class Daemon:
    def __init__(self, socket_path: str, state_dir: str, switch: str = "vsw0", uplink: str | None = None,
                 log_file: str | None = None, metrics_port: int | None = None, test_faults: bool = False,
                 max_ports: int = 256, poll_us: int = DEFAULT_POLL_US):
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.state_path = os.path.join(state_dir, "state.json")
        self.host_name = switch
        self.uplink_name = uplink
        self.metrics_port = metrics_port
        self.test_faults = test_faults
        self.max_ports = max_ports
        if isinstance(poll_us, bool) or not isinstance(poll_us, int) or not 0 <= poll_us <= MAX_POLL_US:
            raise ValueError(f"poll_us={poll_us!r}; accepted: an integer 0 .. {MAX_POLL_US} (microseconds)")
        self.poll_ns = poll_us * 1000
        self.log = Log(log_file)
        self.started = time.monotonic()
        self.attachments: dict[tuple, dict] = {}
        self.ports: dict[str, object] = {}          # switch port name -> ports.Port
        self.id_ports: dict[int, object] = {}       # port id -> ports.Port with a polled fd
        self.conns: dict[int, dict] = {}            # control / metrics connections
        self.captures: dict[int, PcapWriter] = {}   # port id -> writer
        self.host = None
        self.uplink = None
        self.state = {"version": STATE_VERSION, "host": {}, "uplink": None, "attachments": []}
        self.io = PacketIO(max_ports)
        self.switch: Switch | None = None
        self.stop = False
        self.masq_table_present = False
        self.batches = 0
        self.last_sweep_ns = 0
        self.lsock = None
        self.adopted = False           # the state's attachments were re-adopted (safe to rewrite it)
        self.kernel: KernelWorker | None = None
        self.ops = collections.deque()  # control operations waiting for their turn
        self.active_op = None           # (generator, op name, reply callback, t0) of the running one
        self.host_index = 0             # ifindex of the host TAP

    # ----------------------------------------------------------------- state

    def load_state(self):
        try:
            with open(self.state_path) as f:
                st = json.load(f)
        except FileNotFoundError:
            return
        if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
            raise SystemExit(f"vswitchd: state file {self.state_path} has an unknown format; "
                             f"move it away to start empty")
        self.state = st

    def state_bytes(self) -> bytes:
        """The state as it is now (taken on the loop thread; written by the kernel thread)."""
        self.state["attachments"] = [{k: v for k, v in a.items() if not k.startswith("_")}
                                     for a in self.attachments.values()]
        return json.dumps(self.state, indent=1, sort_keys=True).encode()

    def save_state(self):
        self.write_state(self.state_bytes())

    def state_job(self):
        """A kernel job writing the state as it is now (for ``yield`` in an operation)."""
        return (self.write_state, self.state_bytes())

    def write_state(self, data: bytes):
        tmp = self.state_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.state_path)
        dfd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # ----------------------------------------------------------------- start-up

    def start(self):
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.load_state()
        self.ep = select.epoll()       # control: sockets, signals, the kernel thread (ports: self.io)
        self.io.watch_control(self.ep.fileno())
        self._signals()
        self.kernel = KernelWorker()
        self.ep.register(self.kernel.fd, EPOLLIN)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._host_port_up()
        if self.uplink_name:
            self._uplink_up()
        elif self.state.get("uplink"):
            # started without --uplink but a crashed run had one: give the NIC its addresses back
            self._uplink_restore(self.state["uplink"])
            self.state["uplink"] = None
        self._readopt()
        self._prune_gateways()
        self.adopted = True
        self.save_state()
        self._listen()
        if self.metrics_port is not None:
            self._listen_metrics()
        self.log("started", version=__version__, socket=self.socket_path, switch=self.host_name,
                 uplink=self.uplink_name, pods=len(self.attachments), io=self.io.impl,
                 datapath=type(self.switch.dp).__module__)

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
        self.ep.register(r.fileno(), EPOLLIN)

    def _make_switch(self, host_mac: str, gateways: list[str]):
        v4 = [g for g in gateways if ipaddress.ip_interface(g).version == 4]
        v6 = [g for g in gateways if ipaddress.ip_interface(g).version == 6]
        kw = {"gateway_mac": host_mac, "vnet_hdr_len": netlink.VNET_HDR_LEN, "max_ports": self.max_ports}
        if v4:
            i = ipaddress.ip_interface(v4[0])
            kw.update(subnet=str(i.network), gateway=str(i.ip))
        if v6:
            i = ipaddress.ip_interface(v6[0])
            kw.update(subnet6=str(i.network), gateway6=str(i.ip))
        return Switch(SwitchConfig(**kw))

    def _host_port_up(self):
        """Create or reopen the host TAP, and the Switch with its host port (id 0)."""
        hs = self.state.setdefault("host", {})
        name = self.host_name
        info = netlink.link_info(name)
        mac = hs.get("mac") or mac_for("host", name)
        mtu = None
        if self.uplink_name:
            up = netlink.link_info(self.uplink_name)
            if up is None:
                raise SystemExit(f"vswitchd: --uplink {self.uplink_name!r}: no such interface")
            mac, mtu = up["mac"], up["mtu"]
        if info is not None and info.get("kind") != "tun":
            raise SystemExit(f"vswitchd: --switch {name!r} exists and is not a TAP ({info.get('kind')})")
        fd = netlink.tap_open(name, create=info is None, persist=True)
        netlink.link_set_up(name, mac=mac, mtu=mtu)
        self.host_index = socket.if_nametoindex(name)
        hs.update(name=name, mac=mac)
        gateways = hs.setdefault("gateways", [])
        for g in gateways:
            netlink.address_add_if_missing(name, g)
        if gateways:
            self._ip_forward()
        self.switch = self._make_switch(mac, gateways)
        self.host = HostPort(name=name, port_id=0, fd=fd)
        self.switch.add_port(name, "host", mac=mac, ips=[str(ipaddress.ip_interface(g).ip) for g in gateways]
                             or (), port_id=0)
        self._add_fd_port(self.host)

    def _ip_forward(self):
        for path in ("/proc/sys/net/ipv4/ip_forward",):
            with open(path, "w") as f:
                f.write("1")

    def _add_fd_port(self, port):
        self.ports[port.name] = port
        self.id_ports[port.port_id] = port
        self.io.set_port(port, port.port_id)     # polled by io.poll from now on

    def _drop_fd_port(self, port):
        if self.id_ports.get(port.port_id) is port:
            del self.id_ports[port.port_id]
            self.io.set_port(None, port.port_id)
        self.ports.pop(port.name, None)
        cap = self.captures.pop(port.port_id, None)
        if cap:
            cap.close()

    # ----------------------------------------------------------------- gateways
    # The host port holds one gateway address per pod subnet (``gw/prefixlen``) while an
    # attachment of that subnet exists. The bookkeeping (state, the switch's host port)
    # happens on the loop thread; the kernel side (the address on the host TAP) is a
    # job of the kernel thread, so adds and removals reach the kernel in decision order.

    @staticmethod
    def _gateways_of(rec: dict) -> list[str]:
        out = []
        for e in rec["ips"]:
            if e.get("gateway"):
                cidr = f"{e['gateway']}/{ipaddress.ip_interface(e['address']).network.prefixlen}"
                if cidr not in out:
                    out.append(cidr)
        return out

    def _gateways_in_use(self) -> set[str]:
        return {g for a in self.attachments.values() for g in self._gateways_of(a)}

    def _gateways_take(self, rec: dict) -> list[str]:
        """Add the gateways ``rec`` needs to the state and the switch; returns the new ones.

        The switch binds at most MAX_GATEWAYS addresses to the host port: one more subnet
        is refused with an error naming the limit and the subnets in use; nothing changes.
        """
        hs = self.state["host"]
        new = [g for g in self._gateways_of(rec) if g not in hs["gateways"]]
        if not new:
            return []
        if len(hs["gateways"]) + len(new) > MAX_GATEWAYS:
            raise _err(rpc.E_INVALID_CONFIG,
                       f"gateway {', '.join(new)}: the host port {self.host_name} holds at most "
                       f"{MAX_GATEWAYS} gateway addresses (one per pod subnet) and has "
                       f"{len(hs['gateways'])}: {', '.join(hs['gateways'])}; detach the pods of a "
                       f"subnet no longer used, or use fewer subnets on this node")
        old = list(hs["gateways"])
        hs["gateways"] = old + new
        try:
            self._refresh_host_port()
        except BaseException:
            hs["gateways"] = old
            raise
        return new

    def _gateways_release(self, rec: dict) -> list[str]:
        """Drop the gateways of ``rec`` that no attachment uses any more; returns them.

        Call after ``rec`` left ``self.attachments``. The caller removes them from the
        kernel (``_gateways_kernel``)."""
        hs = self.state["host"]
        used = self._gateways_in_use()
        gone = [g for g in self._gateways_of(rec) if g in hs["gateways"] and g not in used]
        if gone:
            hs["gateways"] = [g for g in hs["gateways"] if g not in gone]
            self._refresh_host_port()
        return gone

    def _prune_gateways(self):
        """At start: gateways no re-adopted attachment uses (a crash mid-detach) go away."""
        hs = self.state["host"]
        used = self._gateways_in_use()
        gone = [g for g in hs.get("gateways", []) if g not in used]
        if gone:
            hs["gateways"] = [g for g in hs["gateways"] if g in used]
            self._refresh_host_port()
            self._gateways_kernel([], gone)
            self.log("gateways_pruned", gateways=gone)

    def _gateways_kernel(self, add: list[str], remove: list[str]):
        """Kernel thread: gateway addresses on the host TAP (an uplink's address stays)."""
        keep = set((self.state.get("uplink") or {}).get("addresses") or [])
        msgs = [(f"add {g}", netlink.msg_addr(self.host_index, g, replace=True)) for g in add]
        msgs += [(f"del {g}", netlink.msg_addr(self.host_index, g, add=False)) for g in remove if g not in keep]
        if not msgs:
            return
        if add:
            self._ip_forward()
        with netlink.RtnlSocket() as nl:
            for label, m in msgs:       # one by one: a gateway already gone is not an error
                try:
                    nl.run(f"gateway on {self.host_name}", [(label, m)])
                except netlink.NetlinkError as exc:
                    if label.startswith("add") or exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                        raise

    def _refresh_host_port(self):
        """Re-add the switch's host port with the current gateways (its datapath binding)."""
        gws = [str(ipaddress.ip_interface(g).ip) for g in self.state["host"]["gateways"]]
        sw = self.switch
        old = sw.host_port
        if old is not None:
            sw.remove_port(self.host_name)
        try:
            sw.add_port(self.host_name, "host", mac=self.state["host"]["mac"], ips=gws or (), port_id=0)
        except BaseException:
            if old is not None:
                sw.add_port(self.host_name, "host", mac=old.mac, ips=old.ips or (), port_id=0)
            raise

    # ----------------------------------------------------------------- uplink

    def _uplink_up(self):
        name = self.uplink_name
        saved = self.state.get("uplink")
        if saved and saved.get("name") != name:
            self._uplink_restore(saved)
            saved = None
        if not saved:
            saved = {"name": name, "addresses": netlink.addresses_of(name), "routes": netlink.routes_via(name),
                     "sysctl": {k: self._sysctl(k, name) for k in self._UPLINK_SYSCTLS}}
            self.state["uplink"] = saved
            self.save_state()          # before anything moves: a crash now can be undone
        # addresses and gateway routes: NIC -> host port
        for cidr in saved["addresses"]:
            netlink.address_del(name, cidr)
            netlink.address_add_if_missing(self.host_name, cidr)
        for r in saved["routes"]:
            netlink.route_add(None, self.host_name, r["dst"], r["gw"])
        for k, v in self._UPLINK_SYSCTLS.items():
            self._sysctl(k, name, v)
        self._ip_forward()
        sock = open_uplink_socket(name)
        self.uplink = UplinkPort(name=name, port_id=1, fd=sock.fileno(), sock=sock)
        self.switch.add_port(name, "uplink", port_id=1)
        self._add_fd_port(self.uplink)
        self.switch.set_node_addresses([str(ipaddress.ip_interface(a).ip) for a in saved["addresses"]])
        self.log("uplink", nic=name, addresses=saved["addresses"], routes=saved["routes"])

    # the NIC's own stack must ignore what arrives on it: the switch hands that to vsw0
    _UPLINK_SYSCTLS = {"ipv4/conf/{}/rp_filter": "1", "ipv4/conf/{}/arp_ignore": "8",
                       "ipv6/conf/{}/disable_ipv6": "1"}

    @staticmethod
    def _sysctl(key: str, ifname: str, value: str | None = None) -> str | None:
        path = "/proc/sys/net/" + key.format(ifname)
        try:
            if value is None:
                with open(path) as f:
                    return f.read().strip()
            with open(path, "w") as f:
                f.write(value)
        except OSError:
            return None
        return value

    def _uplink_restore(self, saved: dict):
        name = saved["name"]
        if netlink.link_info(name) is None:
            self.log("uplink_gone", level="warning", nic=name)
            return
        for k, v in (saved.get("sysctl") or {}).items():
            if v is not None:
                self._sysctl(k, name, v)
        for cidr in saved["addresses"]:
            netlink.address_del(self.host_name, cidr)
            netlink.address_add_if_missing(name, cidr)
        for r in saved["routes"]:
            try:
                netlink.route_add(None, name, r["dst"], r["gw"])
            except netlink.NetlinkError as exc:
                self.log("route_restore_failed", level="warning", route=r, error=str(exc))
        self.log("uplink_restored", nic=name, addresses=saved["addresses"])

    # ----------------------------------------------------------------- re-adoption

    def _readopt(self):
        for rec in self.state.get("attachments", []):
            key = (rec["container_id"], rec["ifname"])
            try:
                fd = netlink.tap_open(rec["ifname"], create=False, persist=True, netns=rec["netns"])
            except OSError as exc:
                self.log("readopt_failed", level="error", container_id=key[0], ifname=key[1],
                         netns=rec["netns"], error=str(exc))
                continue
            try:
                port = self._switch_port(rec, fd)
            except (ValueError, KeyError) as exc:
                os.close(fd)
                self.log("readopt_failed", level="error", container_id=key[0], ifname=key[1], error=str(exc))
                continue
            self.attachments[key] = rec
            self.log("readopted", container_id=key[0], ifname=key[1], port=rec["port"], port_id=port.port_id)
        self._apply_masq()

    def _switch_port(self, rec: dict, fd: int, bandwidth=True, mappings=True):
        """Add the switch port of an attachment (same id as before if possible) and its fd."""
        name = rec["port"]
        pid = rec.get("port_id")
        if pid is not None and pid in {p.port_id for p in self.switch.ports()}:
            pid = None
        ips = [str(ipaddress.ip_interface(e["address"]).ip) for e in rec["ips"]]
        sp = self.switch.add_port(name, "pod", mac=rec["mac"], ips=ips, port_id=pid,
                                  bandwidth=rec["bandwidth"] if bandwidth else None,
                                  port_mappings=rec["port_mappings"] if mappings else ())
        rec["port_id"] = sp.port_id
        port = TapPort(name=name, port_id=sp.port_id, fd=fd, netns=rec["netns"], ifname=rec["ifname"])
        self._add_fd_port(port)
        return port

    # ----------------------------------------------------------------- control socket

    def _listen(self):
        d = os.path.dirname(self.socket_path)
        if d:
            os.makedirs(d, mode=0o755, exist_ok=True)
        if os.path.exists(self.socket_path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
                raise SystemExit(f"vswitchd: another daemon is listening on {self.socket_path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.socket_path)
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(self.socket_path)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        os.chown(self.socket_path, 0, 0)
        s.listen(64)
        s.setblocking(False)
        self.lsock = s
        self.ep.register(s.fileno(), EPOLLIN)

    def _listen_metrics(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.metrics_port))
        s.listen(16)
        s.setblocking(False)
        self.msock = s
        self.ep.register(s.fileno(), EPOLLIN)

    def _accept(self, lsock, kind):
        while True:
            try:
                c, _ = lsock.accept()
            except BlockingIOError:
                return
            c.setblocking(False)
            self.conns[c.fileno()] = {"sock": c, "kind": kind, "in": rpc.LineBuffer() if kind == "ctl" else bytearray(),
                                      "out": bytearray(), "waiting": False, "lines": collections.deque()}
            self.ep.register(c.fileno(), EPOLLIN)

    def _close_conn(self, fd):
        conn = self.conns.pop(fd, None)
        if conn:
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
            conn["sock"].close()

    def _conn_event(self, fd, ev):
        conn = self.conns[fd]
        sock = conn["sock"]
        if ev & EPOLLIN and not conn.get("eof"):
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                conn["eof"] = True          # answer what was asked, then close
            elif data:
                if conn["kind"] == "ctl":
                    conn["lines"].extend(conn["in"].feed(data))
                    self._serve_lines(conn)
                else:
                    conn["in"] += data
                    if b"\r\n\r\n" in conn["in"] or b"\n\n" in conn["in"] or len(conn["in"]) > 8192:
                        conn["out"] += self._http_reply(bytes(conn["in"]))
                        conn["eof"] = True
        self._flush_conn(fd, conn)

    def _serve_lines(self, conn):
        """Answer the connection's request lines in order; stop at one answered later."""
        while conn["lines"] and not conn["waiting"]:
            line = conn["lines"].popleft()
            if line is None:
                reply = RpcError(rpc.E_BAD_REQUEST, f"request line exceeds {rpc.MAX_LINE_BYTES} bytes").reply()
            else:
                reply = self.handle_line(line, lambda r, conn=conn: self._late_reply(conn, r))
            if reply is None:
                conn["waiting"] = True
            else:
                conn["out"] += rpc.encode(reply)

    def _late_reply(self, conn, reply):
        """The reply of an operation that ran on the kernel thread."""
        conn["waiting"] = False
        fd = conn["sock"].fileno()
        if fd < 0 or self.conns.get(fd) is not conn:
            return                          # the client went away
        conn["out"] += rpc.encode(reply)
        self._serve_lines(conn)
        self._flush_conn(fd, conn)

    def _flush_conn(self, fd, conn):
        sock = conn["sock"]
        if conn["out"]:
            try:
                sent = sock.send(conn["out"])
                del conn["out"][:sent]
            except BlockingIOError:
                pass
            except OSError:
                self._close_conn(fd)
                return
        if conn.get("eof") and not conn["out"] and not conn["waiting"] and not conn["lines"]:
            self._close_conn(fd)
            return
        events = (0 if conn.get("eof") else EPOLLIN) | (EPOLLOUT if conn["out"] else 0)
        if events != conn.get("events", EPOLLIN):
            self.ep.modify(fd, events)
            conn["events"] = events

    def _http_reply(self, req: bytes) -> bytes:
        first = req.split(b"\r\n", 1)[0].split(b" ")
        if len(first) >= 2 and first[0] == b"GET" and first[1] in (b"/metrics", b"/"):
            body = self.metrics_text().encode()
            status = b"200 OK"
        else:
            body, status = b"not found: GET /metrics\n", b"404 Not Found"
        return (b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)

    def handle_line(self, line: bytes, late_reply=None) -> dict | None:
        """One request line -> one reply; never raises.

        Operations that touch the kernel (attach, detach, check, gc) are generators: they
        run one at a time, in arrival order, yielding kernel jobs to the kernel thread
        between loop-thread steps. For those this returns None and ``late_reply(reply)``
        is called when the operation ends (without ``late_reply``, an error).
        """
        op = None
        try:
            req = rpc.decode(line)
            op = req.get("op")
            handler = self.OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise RpcError(rpc.E_UNKNOWN_OP, f"unknown op {op!r}; accepted: {', '.join(sorted(self.OPS))}")
            if op in self.KERNEL_OPS:
                if late_reply is None:
                    raise RpcError(rpc.E_INTERNAL, f"{op!r} needs the event loop")
                self.ops.append((handler(self, req), op, late_reply))   # started by the loop
                return None
            return {"ok": True, **handler(self, req)}
        except RpcError as exc:
            self.log("request_failed", level="warning", op=op, code=exc.code, msg=exc.msg)
            return exc.reply()
        except Exception as exc:  # a bug: report it, keep running
            self.log("request_crashed", level="error", op=op, error=repr(exc), tb=traceback.format_exc())
            return RpcError(rpc.E_INTERNAL, f"internal error in {op!r}: {exc!r}").reply()

    def _next_op(self):
        while self.active_op is None and self.ops:
            gen, op, reply = self.ops.popleft()
            if self.stop:
                gen.close()
                reply(RpcError(rpc.E_TRY_AGAIN, "vswitchd is shutting down; try again").reply())
                continue
            self.active_op = (gen, op, reply)
            self._step_op(True, None)

    def _step_op(self, ok, value):
        """Advance the running operation with a kernel job's result (or exception)."""
        gen, op, reply_cb = self.active_op
        try:
            job = gen.send(value) if ok else gen.throw(value)
        except StopIteration as done:
            reply = {"ok": True, **(done.value or {})}
        except RpcError as exc:
            self.log("request_failed", level="warning", op=op, code=exc.code, msg=exc.msg)
            reply = exc.reply()
        except Exception as exc:  # a bug: report it, keep running
            self.log("request_crashed", level="error", op=op, error=repr(exc), tb=traceback.format_exc())
            reply = RpcError(rpc.E_INTERNAL, f"internal error in {op!r}: {exc!r}").reply()
        else:
            self.kernel.submit(job[0], job[1:])
            return
        self.active_op = None
        reply_cb(reply)
        self._next_op()

    def _kernel_done(self):
        for ok, value in self.kernel.completions():
            if self.active_op is not None:
                self._step_op(ok, value)

    # ----------------------------------------------------------------- operations

    def op_attach(self, req):
        """Generator (see handle_line): the pod's kernel steps on the kernel thread, then the
        switch, hostPort rules, shapers and state; any failure undoes what was done."""
        rec = normalize_attach(req, self.test_faults)
        fault = rec.pop("_fault")
        key = (rec["container_id"], rec["ifname"])
        old = self.attachments.get(key)
        if old is not None:
            diff = _same_attach(old, rec)
            if diff:
                raise _err(rpc.E_BAD_ARGS, f"attachment {key[0]}/{key[1]} exists with other arguments ({diff}); "
                                           f"detach it first")
            return self._attach_result(old)
        for other in self.attachments.values():
            if other["netns"] == rec["netns"] and other["ifname"] == rec["ifname"]:
                raise _err(rpc.E_IF_EXISTS, f"interface {rec['ifname']!r} in {rec['netns']} belongs to "
                                            f"container {other['container_id']!r}")
        if not os.path.exists(rec["netns"]):
            raise _err(rpc.E_BAD_ARGS, f"netns: {rec['netns']!r} does not exist")
        name = port_name_for(*key)
        rec.update(port=name, tap=rec["ifname"])
        t0 = time.monotonic()
        try:
            fd = yield (self._attach_kernel, rec, fault)
        except StepFailed as failed:
            raise self._attach_error(key, failed.step, failed.exc, 1) from None
        t_kernel = time.monotonic()
        undo = ["TAP"]                  # the kernel thread releases it in the undo job
        gateways, port, step = [], None, None
        try:
            step = "switch_port"
            self._fault(fault, step)
            gateways = self._gateways_take(rec)
            if gateways:
                undo.append("gateways")
                yield (self._gateways_kernel, gateways, [])
            port = self._switch_port(rec, fd, bandwidth=False, mappings=False)
            undo.append("switch port")
            step = "hostports"
            self._fault(fault, step)
            for m in rec["port_mappings"]:
                self.switch.add_port_mapping(name, m)
            step = "shaper"
            self._fault(fault, step)
            self.switch.set_bandwidth(name, rec["bandwidth"] or None)
            step = "state_save"
            self._fault(fault, step)
            self.attachments[key] = rec
            undo.append("state entry")
            if rec["ip_masq"]:
                yield (self._masq_apply, self._masq_subnets())
            yield self.state_job()
        except BaseException as exc:
            if isinstance(exc, GeneratorExit):
                raise
            self.attachments.pop(key, None)
            if port is not None:
                self._drop_fd_port(port)
            if name in self.switch:
                self.switch.remove_port(name)
            gone = self._gateways_release(rec)
            masq = self._masq_subnets() if rec["ip_masq"] else None
            try:
                yield (self._undo_kernel, fd, gone, masq)
            except Exception as uexc:
                self.log("undo_failed", level="error", step=step, error=repr(uexc))
            raise self._attach_error(key, step, exc, len(undo)) from None
        t_end = time.monotonic()
        self.log("attached", container_id=key[0], ifname=key[1], netns=rec["netns"], port=name,
                 port_id=rec["port_id"], ips=[e["address"] for e in rec["ips"]], mac=rec["mac"],
                 ms=round((t_end - t0) * 1000, 2), kernel_ms=round((t_kernel - t0) * 1000, 2),
                 after_kernel_ms=round((t_end - t_kernel) * 1000, 2))
        return self._attach_result(rec)

    @staticmethod
    def _attach_error(key, step, exc, undone) -> RpcError:
        if isinstance(exc, Fault):
            return _err(rpc.E_FAULT, f"injected fault at step {step!r} (undone: {undone} actions)")
        if isinstance(exc, RpcError):
            return exc
        if isinstance(exc, ValueError):
            return _err(rpc.E_BAD_ARGS, f"attach {key[0]}/{key[1]} at {step}: {exc}")
        if isinstance(exc, (OSError, netlink.NetlinkError)):
            return _err(rpc.E_NETLINK, f"attach {key[0]}/{key[1]} at {step}: {exc}")
        return _err(rpc.E_INTERNAL, f"attach {key[0]}/{key[1]} at {step}: {exc!r}")

    def _attach_kernel(self, rec, fault) -> int:
        """Kernel thread: the pod's side of an attach; returns the TAP fd.

        The TAP is created *inside* the pod's namespace under its final name (the fd is
        opened there), so no move and no rename happen: each of those waits for an RCU
        grace period (10-25 ms here). The step names stay those of the protocol:
        ``netns_move`` is opening the namespace's netlink socket and finding the link.
        On a failure the TAP is released and StepFailed(step, exc) raised.
        """
        ifname, netns = rec["ifname"], rec["netns"]
        fd = None
        nl = None
        step = "tap_create"
        try:
            self._fault(fault, step)
            try:
                fd = netlink.tap_open(ifname, create=True, persist=True, netns=netns)
            except netlink.TapError as exc:
                if exc.errno == errno.EBUSY:
                    raise _err(rpc.E_IF_EXISTS, f"interface {ifname!r} already exists in {netns}") from None
                if exc.errno in (errno.ENOENT, errno.EINVAL) and "namespace" in str(exc):
                    raise _err(rpc.E_BAD_ARGS, str(exc)) from None
                raise
            step = "netns_move"
            self._fault(fault, step)
            nl = netlink.RtnlSocket(netns)
            idx = netlink.ifindex_in(ifname, netns)
            lo = netlink.ifindex_in("lo", netns)
            if idx is None:
                raise netlink.TapError(errno.ENODEV, f"TAP {ifname!r} vanished from {netns}")
            step = "link_config"
            self._fault(fault, step)
            msgs = [("mac and mtu", netlink.msg_link_set(idx, mac=rec["mac"], mtu=rec["mtu"])),
                    ("up", netlink.msg_link_set(idx, up=True))]
            if lo is not None:
                msgs.append(("lo up", netlink.msg_link_set(lo, up=True)))
            nl.run(step, msgs)
            step = "addresses"
            self._fault(fault, step)
            nl.run(step, [(e["address"], netlink.msg_addr(idx, e["address"])) for e in rec["ips"]])
            step = "routes"
            self._fault(fault, step)
            nl.run(step, [(f"{r['dst']} via {r.get('gw')}", netlink.msg_route(idx, r["dst"], r.get("gw")))
                          for r in rec["routes"]])
            return fd
        except BaseException as exc:
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
                self._gateways_kernel([], gateways_gone)
            finally:
                if masq_subnets is not None:
                    self._masq_apply(masq_subnets)

    def _fault(self, fault, step):
        if fault == step:
            raise Fault(step)

    def _attach_result(self, rec):
        host = {"name": self.host_name, "mac": self.state["host"]["mac"]}
        pod = {"name": rec["ifname"], "mac": rec["mac"], "mtu": rec["mtu"], "sandbox": rec["netns"]}
        return {"interfaces": [host, pod], "port": rec["port"], "attachment": self._public(rec)}

    @staticmethod
    def _public(rec):
        return {k: v for k, v in rec.items() if not k.startswith("_")}

    def op_detach(self, req):
        """Generator: release the attachment, then save the state. Unknown: success."""
        cid = _need_str(req, "container_id", 1024)
        ifname = _valid_ifname(req.get("ifname"))
        rec = self.attachments.get((cid, ifname))
        if rec is None:
            return {"existed": False}
        t0 = time.monotonic()
        error = None
        try:
            tap_existed = yield from self._detach(rec)
        except RpcError as exc:
            error = exc
        yield self.state_job()
        if error is not None:
            raise error
        self.log("detach_done", container_id=cid, ifname=ifname, ms=round((time.monotonic() - t0) * 1000, 2))
        return {"existed": True, "tap_existed": tap_existed}

    def _detach(self, rec):
        """Generator: release an attachment's switch port (with its hostPort rules, shapers,
        MACs and conntrack entries), state entry, gateways no one else uses, ipMasq rule,
        and its TAP. A TAP already gone (namespace deleted, link deleted behind our back) is
        success. Returns whether the TAP still existed; raises RpcError (after releasing
        everything else) only if the TAP exists and could not be removed."""
        key = (rec["container_id"], rec["ifname"])
        port = self.ports.get(rec["port"])
        if rec["port"] in self.switch:
            self.switch.remove_port(rec["port"])
        fd = -1
        if port is not None:
            self._drop_fd_port(port)
            fd, port.fd = port.fd, -1      # the kernel thread closes it
        self.attachments.pop(key, None)
        gone = self._gateways_release(rec)
        masq = self._masq_subnets() if rec.get("ip_masq") else None
        existed, errors = yield (self._detach_kernel, fd, rec["ifname"], rec["netns"], gone, masq)
        self.log("detached", container_id=key[0], ifname=key[1], port=rec["port"],
                 tap="removed" if existed else "already gone", gateways_removed=gone, errors=errors)
        if errors:
            raise _err(rpc.E_NETLINK, f"detach {key[0]}/{key[1]}: released from the switch, but: "
                                      + "; ".join(errors))
        return existed

    def _detach_kernel(self, fd, ifname, netns, gateways_gone, masq_subnets):
        """Kernel thread: remove the TAP (by fd, or by name when never re-adopted), the
        gateway addresses no one uses and the ipMasq rule; returns (tap existed, errors)."""
        errors = []
        existed = False
        try:
            if fd >= 0:
                existed = netlink.tap_release(fd, f"TAP {ifname} in {netns}")
            else:
                existed = netlink.link_delete(ifname, netns)
        except OSError as exc:
            errors.append(f"TAP {ifname} in {netns}: {exc}")
        except netlink.NetlinkError as exc:
            errors.append(f"TAP {ifname} in {netns}: {exc}")
        try:
            self._gateways_kernel([], gateways_gone)
        except (OSError, netlink.NetlinkError) as exc:
            errors.append(f"gateways {gateways_gone}: {exc}")
        if masq_subnets is not None:
            try:
                self._masq_apply(masq_subnets)
            except OSError as exc:
                errors.append(str(exc))
        return existed, errors

    def op_check(self, req):
        """Generator: read the pod's link, addresses and routes on the kernel thread."""
        cid = _need_str(req, "container_id", 1024)
        ifname = _valid_ifname(req.get("ifname"))
        rec = self.attachments.get((cid, ifname))
        if rec is None:
            raise _err(rpc.E_UNKNOWN_ATTACHMENT, f"no attachment {cid}/{ifname}")

        def fail(msg):
            raise _err(rpc.E_CHECK_FAILED, msg)
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

    def op_gc(self, req):
        """Generator: detach every attachment not in ``valid`` (of ``network`` only, if given)."""
        valid = req.get("valid", [])
        if not isinstance(valid, list):
            raise _err(rpc.E_BAD_ARGS, f"valid: expected a list of {{'containerID', 'ifname'}}, got {valid!r}")
        network = req.get("network")
        if network is not None and not isinstance(network, str):
            raise _err(rpc.E_BAD_ARGS, f"network: expected a network name (string), got {network!r}")
        keep = set()
        for v in valid:
            if not isinstance(v, dict):
                raise _err(rpc.E_BAD_ARGS, f"valid: entry {v!r} is not an object")
            keep.add((v.get("containerID", v.get("container_id")), v.get("ifname")))
        removed, errors = [], []
        for key, rec in list(self.attachments.items()):
            if key in keep or (network is not None and rec.get("network", "") != network):
                continue
            try:
                yield from self._detach(rec)
                removed.append({"container_id": key[0], "ifname": key[1]})
            except RpcError as exc:
                removed.append({"container_id": key[0], "ifname": key[1]})
                errors.append(exc.msg)
        if removed:
            yield self.state_job()
        return {"removed": removed, "errors": errors}

    def op_status(self, req):
        return {"pods": len(self.attachments), "uptime_s": round(time.monotonic() - self.started, 3),
                "version": __version__, "switch": self.host_name, "uplink": self.uplink_name,
                "datapath": type(self.switch.dp).__module__, "io": self.io.impl,
                "poll_us": self.poll_ns // 1000, "loop": self.io.loop_stats()}

    def op_list(self, req):
        return {"attachments": [self._public(a) for a in self.attachments.values()]}

    def op_show(self, req):
        ports = []
        for p in self.switch.ports():
            d = p.to_dict()
            fdp = self.ports.get(p.name)
            d["fd"] = fdp.fd if fdp else -1
            rec = next((a for a in self.attachments.values() if a["port"] == p.name), None)
            if rec:
                d.update(container_id=rec["container_id"], ifname=rec["ifname"], netns=rec["netns"])
            ports.append(d)
        return {"switch": self.host_name, "uplink": self.uplink_name, "node_addresses": list(self.switch.node_addresses),
                "gateways": self.state["host"].get("gateways", []), "ports": ports,
                "hostports": self.switch.hostports(), "captures": {self.switch.port_name(k): v.path
                                                                  for k, v in self.captures.items()}}

    def op_counters(self, req):
        port = req.get("port")
        try:
            out = self.switch.counters(port)
        except KeyError as exc:
            raise _err(rpc.E_BAD_ARGS, str(exc.args[0])) from None
        for name, row in out["ports"].items():
            pid = self.switch.port_id(name)
            row["rx_errors"] = int(self.io.rx_errors[pid])
            row["tx_errors"] = int(self.io.tx_errors[pid])
        out["global"]["batches"] = self.batches + self.io.loop_stats()["batches"]
        return out

    def op_fdb(self, req):
        now = time.monotonic_ns()
        return {"entries": [{"vlan": e["vlan"], "mac": e["mac"], "port": e["port"],
                             "age_s": round(e["age_ns"] / 1e9, 3)} for e in self.switch.fdb(now)]}

    def op_conntrack(self, req):
        now = time.monotonic_ns()
        entries = self.switch.conntrack()
        for e in entries:
            e["expires_in_s"] = round((e.pop("expires_ns") - now) / 1e9, 3)
        return {"entries": entries}

    def op_hostports(self, req):
        return {"rules": self.switch.hostports()}

    def op_capture_start(self, req):
        port = req.get("port")
        path = _need_str(req, "path")
        try:
            sp = self.switch.port(port)
        except KeyError as exc:
            raise _err(rpc.E_BAD_ARGS, str(exc.args[0])) from None
        if sp.port_id in self.captures:
            raise _err(rpc.E_BAD_ARGS, f"port {sp.name!r} is already captured to {self.captures[sp.port_id].path}")
        try:
            self.captures[sp.port_id] = PcapWriter(path)
        except OSError as exc:
            raise _err(rpc.E_BAD_ARGS, f"path: cannot write {path!r}: {exc.strerror}") from None
        self.log("capture_start", port=sp.name, path=path)
        return {"port": sp.name, "path": path}

    def op_capture_stop(self, req):
        try:
            sp = self.switch.port(req.get("port"))
        except KeyError as exc:
            raise _err(rpc.E_BAD_ARGS, str(exc.args[0])) from None
        w = self.captures.pop(sp.port_id, None)
        if w is None:
            raise _err(rpc.E_BAD_ARGS, f"port {sp.name!r} has no capture running")
        n = w.close()
        self.log("capture_stop", port=sp.name, path=w.path, packets=n)
        return {"packets": n, "path": w.path}

    def op_trace(self, req):
        in_port = req.get("in_port")
        try:
            sp = self.switch.port(in_port)
        except KeyError as exc:
            raise _err(rpc.E_BAD_ARGS, str(exc.args[0])) from None
        if "frame_hex" in req:
            try:
                frame = bytes.fromhex(req["frame_hex"])
            except (TypeError, ValueError):
                raise _err(rpc.E_BAD_ARGS, f"frame_hex: not hexadecimal: {req['frame_hex']!r:.80}") from None
        else:
            desc = req.get("packet", req)
            try:
                frame = build_frame(desc)
            except (ValueError, TypeError, KeyError) as exc:
                raise _err(rpc.E_BAD_ARGS, f"packet description: {exc}") from None
        try:
            stages = self.switch.trace(frame, sp.name, time.monotonic_ns())
        except ValueError as exc:
            raise _err(rpc.E_BAD_ARGS, str(exc)) from None
        return {"stages": [list(s) for s in stages], "frame_hex": frame.hex()}

    def op_metrics(self, req):
        return {"text": self.metrics_text()}

    KERNEL_OPS = frozenset({"attach", "detach", "check", "gc"})
    OPS = {"attach": op_attach, "detach": op_detach, "check": op_check, "gc": op_gc,
           "status": op_status, "list": op_list, "show": op_show, "counters": op_counters,
           "fdb": op_fdb, "conntrack": op_conntrack, "hostports": op_hostports,
           "capture_start": op_capture_start, "capture_stop": op_capture_stop,
           "trace": op_trace, "metrics": op_metrics}

    # ----------------------------------------------------------------- metrics

    def metrics_text(self) -> str:
        c = self.op_counters({})
        out = ["# HELP vswitch_pods Attached pods.", "# TYPE vswitch_pods gauge",
               f"vswitch_pods {len(self.attachments)}",
               "# HELP vswitch_uptime_seconds Seconds since the daemon started.",
               "# TYPE vswitch_uptime_seconds gauge",
               f"vswitch_uptime_seconds {time.monotonic() - self.started:.3f}"]
        for name, v in c["global"].items():
            out += [f"# TYPE vswitch_{name}_total counter", f"vswitch_{name}_total {v}"]
        rows = c["ports"]
        names = sorted({k for r in rows.values() for k in r})
        for k in names:
            out.append(f"# TYPE vswitch_port_{k}_total counter")
            for port, r in rows.items():
                out.append(f'vswitch_port_{k}_total{{port="{port}"}} {r.get(k, 0)}')
        return "\n".join(out) + "\n"

    # ----------------------------------------------------------------- ipMasq

    def _masq_subnets(self) -> list[str]:
        """Loop thread: the IPv4 subnets of the pods attached with ip_masq."""
        return sorted({str(ipaddress.ip_interface(e["address"]).network)
                       for a in self.attachments.values() if a.get("ip_masq")
                       for e in a["ips"] if ipaddress.ip_interface(e["address"]).version == 4})

    def _apply_masq(self):
        self._masq_apply(self._masq_subnets())

    def _masq_apply(self, subnets: list[str]):
        """Make the nftables table hold one masquerade rule per subnet (none: no table)."""
        if not subnets and not self.masq_table_present:
            if not self._masq_table_exists():
                return
        script = "table ip vswitch_masq\ndelete table ip vswitch_masq\n"
        if subnets:
            script += ("table ip vswitch_masq {\n chain postrouting {\n"
                       "  type nat hook postrouting priority srcnat; policy accept;\n")
            for s in subnets:
                script += f"  ip saddr {s} ip daddr != {s} masquerade\n"
            script += " }\n}\n"
        r = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True)
        if r.returncode != 0:
            self.log("ipmasq_failed", level="error", error=r.stderr.decode().strip(), subnets=subnets)
            raise OSError(errno.EIO, f"ipMasq: nft failed: {r.stderr.decode().strip()}")
        self.masq_table_present = bool(subnets)
        self.log("ipmasq", subnets=subnets)

    @staticmethod
    def _masq_table_exists() -> bool:
        try:
            r = subprocess.run(["nft", "list", "table", "ip", "vswitch_masq"], capture_output=True)
        except FileNotFoundError:
            return False
        return r.returncode == 0

    # ----------------------------------------------------------------- the loop

    def run(self):
        """The loop: while no capture runs, ``io.run`` (Cython, no GIL) forwards, drains
        the shaping queues and polls until Python has work (a control event, a failed
        port, the sweep timer); else one ``io.poll`` per wakeup with the datapath called
        from here (captures see each batch; the Python twins use this path)."""
        io, sw = self.io, self.switch
        dp = sw.dp
        fast = io.impl == "c" and type(dp).__module__ == "vswitch._datapath"
        run, poll_ns = io.run, self.poll_ns
        monotonic_ns = time.monotonic_ns
        while not self.stop or self.active_op is not None:
            if fast and not self.captures:
                run(dp, self.last_sweep_ns + SWEEP_INTERVAL_NS, poll_ns)
                now = monotonic_ns()
            else:
                now = self._step()
            if io.n_failed:
                for pid in io.failed[:io.n_failed].tolist():
                    p = self.id_ports.get(pid)
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
        io, sw = self.io, self.switch
        dp = sw.dp
        nd = dp.next_departure_ns()
        now = time.monotonic_ns()
        until = self.last_sweep_ns + SWEEP_INTERVAL_NS
        if 0 <= nd < until:
            until = nd
        n = io.poll(max(0, -((now - until) // 1_000_000)))       # ms, rounded up
        now = time.monotonic_ns()
        if n:
            buf, offsets, lengths, in_ports, out_ports = io.buf, io.offsets, io.lengths, io.in_ports, io.out_ports
            if self.captures:
                self._capture(buf, offsets, lengths, in_ports, None, n)
            dp.process(buf, offsets, lengths, in_ports, out_ports, n, now)
            if self.captures:
                self._capture(buf, offsets, lengths, in_ports, out_ports, n)
            io.write(n)
            self.batches += 1
        nd = dp.next_departure_ns()
        if 0 <= nd <= now:
            self._drain(now)
        return now

    def _control_events(self):
        lfd = self.lsock.fileno()
        mfd = self.msock.fileno() if self.metrics_port is not None else -2
        for fd, ev in self.ep.poll(0):
            if fd in self.conns:
                self._conn_event(fd, ev)
            elif fd == self.kernel.fd:
                self._kernel_done()
            elif fd == lfd:
                self._accept(self.lsock, "ctl")
            elif fd == mfd:
                self._accept(self.msock, "http")
            elif fd == self._sig_r.fileno():
                try:
                    self._sig_r.recv(64)
                except BlockingIOError:
                    pass
        if self.ops and self.active_op is None:
            self._next_op()

    def _drain(self, now):
        io, sw = self.io, self.switch
        while True:
            k = sw.drain(now, io.dbuf, io.doffsets, io.dlengths, io.din_ports, io.dout_ports, io.max_batch)
            if k <= 0:
                return
            if self.captures:
                self._capture(io.dbuf, io.doffsets, io.dlengths, io.din_ports, io.dout_ports, k)
            io.write_drained(k)
            if k < io.max_batch:
                return

    def _capture(self, buf, offsets, lengths, in_ports, out_ports, n):
        """rx (out_ports None: before processing) or tx frames of captured ports into pcaps."""
        for pid, w in self.captures.items():
            for i in range(n):
                if out_ports is None:
                    hit = in_ports[i] == pid
                else:
                    o = out_ports[i]
                    hit = o == pid or (o == C.OUT_FLOOD and in_ports[i] != pid and self.io.port_fds[pid] >= 0)
                if hit:
                    off = int(offsets[i])
                    w.write(bytes(buf[off:off + int(lengths[i])]))

    def _port_failed(self, port):
        """A TAP whose device vanished (link deleted behind our back): stop polling it."""
        self.log("port_failed", level="warning", port=port.name)
        self._drop_fd_port(port)
        self.ports[port.name] = port     # keep it known; detach closes it
        if port.name in self.switch:
            self.switch.set_port_up(port.name, False)

    # ----------------------------------------------------------------- shutdown

    def shutdown(self):
        while self.ops:                # never started: nothing to undo
            self.ops.popleft()[0].close()
        if self.kernel is not None:
            self.kernel.stop()
        for pid in list(self.captures):
            self.captures.pop(pid).close()
        for fd in list(self.conns):
            self._close_conn(fd)
        for p in list(self.ports.values()):
            if isinstance(p, TapPort):
                p.close()          # persistent: the pod keeps its interface
        if self.uplink is not None:
            self.uplink.close()
            self._uplink_restore(self.state["uplink"])
            self.state["uplink"] = None
        if self.host is not None:
            if not self.attachments and self.adopted:
                netlink.tap_set_persist(self.host.fd, False)
                self.state["host"]["gateways"] = []
            self.host.close()
        if not self.adopted:
            pass                   # start failed early: leave the state as it was
        elif self.attachments:
            self.save_state()
        else:
            self._apply_masq()
            for path in (self.state_path, self.state_path + ".tmp"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if self.lsock is not None:
            self.lsock.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        self.log("stopped", pods=len(self.attachments))


def build_frame(d: dict) -> bytes:
    """An Ethernet/IPv4 frame from a description (vswitchctl trace), without scapy."""
    src_mac = parse_mac(d.get("src_mac", "02:00:00:00:00:02"))
    dst_mac = parse_mac(d.get("dst_mac", "ff:ff:ff:ff:ff:ff"))
    src = ipaddress.IPv4Address(d["src_ip"])
    dst = ipaddress.IPv4Address(d["dst_ip"])
    proto = d.get("proto", "icmp")
    pnum = {"tcp": 6, "udp": 17, "icmp": 1}.get(proto)
    if pnum is None:
        raise ValueError(f"proto {proto!r}; accepted: tcp, udp, icmp")
    sport, dport = int(d.get("sport", 12345)), int(d.get("dport", 80))
    if pnum == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    elif pnum == 17:
        l4 = struct.pack("!HHHH", sport, dport, 8, 0)
    else:
        l4 = struct.pack("!BBHHH", 8, 0, 0, 1, 1)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, pnum, 0, src.packed, dst.packed))
    s = sum(struct.unpack("!10H", ip))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    ip[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return dst_mac + src_mac + b"\x08\x00" + bytes(ip) + l4


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vswitchd", description="vswitch daemon: pods on TAP devices")
    ap.add_argument("--socket", default=rpc.DEFAULT_SOCKET, help="control socket path")
    ap.add_argument("--state-dir", default="/var/lib/vswitch", help="where state.json lives")
    ap.add_argument("--switch", default="vsw0", help="name of the host port TAP (default vsw0)")
    ap.add_argument("--uplink", help="NIC to attach with AF_PACKET; its addresses move to the host port")
    ap.add_argument("--log-file", help="also append the structured log lines to this file")
    ap.add_argument("--metrics-port", type=int, help="serve Prometheus text on 127.0.0.1:PORT/metrics")
    ap.add_argument("--max-ports", type=int, default=256)
    ap.add_argument("--poll-us", type=int, default=DEFAULT_POLL_US,
                    help=f"after forwarding a batch, poll the ports without sleeping for this many "
                         f"microseconds before blocking (0 .. {MAX_POLL_US}; 0 disables; default "
                         f"{DEFAULT_POLL_US}): catches a reply without a thread wakeup, at the cost of "
                         f"at most this much CPU per burst of traffic; idle costs nothing")
    ap.add_argument("--test-faults", action="store_true", help="accept 'fault' in attach (tests only)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("vswitchd: must run as root (TAP devices, namespaces)", file=sys.stderr)
        return 2
    if not 0 <= a.poll_us <= MAX_POLL_US:
        ap.error(f"--poll-us {a.poll_us}: accepted 0 .. {MAX_POLL_US} (microseconds)")
    d = Daemon(a.socket, a.state_dir, a.switch, a.uplink, a.log_file, a.metrics_port, a.test_faults, a.max_ports,
               a.poll_us)
    try:
        d.start()
        d.run()
    except SystemExit as exc:
        d.log("fatal", level="error", msg=str(exc))
        return 1
    finally:
        try:
            d.shutdown()
        except Exception as exc:
            d.log("shutdown_failed", level="error", error=repr(exc), tb=traceback.format_exc())
    return 0


if __name__ == "__main__":
    sys.exit(main())
