"""Kernel plumbing for vswitchd: TAP devices, network namespaces, links, addresses, routes.

This is the only module that imports pyroute2 (netlink); everything else calls it.

Theory of operation
-------------------
A pod port is a TAP device opened on ``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR``: every read returns, and every write takes, a 12-byte virtio-net header
(``TUNSETVNETHDRSZ``) before the Ethernet frame. ``TUNSETOFFLOAD`` with CSUM, TSO4, TSO6
and TSO_ECN lets the pod's kernel hand us 64 KiB TCP segments with a partial checksum, and
lets us hand them back unsegmented: the switch never segments or checksums anything.
``TUNSETPERSIST`` keeps the device when our fd closes (daemon restart, kill -9).

A pod's TAP is created *inside* the pod's namespace under its final name: the calling
thread ``setns``-es into the namespace for the ``TUNSETIFF`` ioctl and back (no move and
no rename, each of which waits for an RCU grace period), then the TAP gets its MAC, MTU,
addresses and routes and is set up with the namespace's ``lo``. The fd stays valid in
the daemon's namespace (the fd names the device, not the namespace), so deleting the
pod's namespace deletes the TAP (our fd then reports EPOLLERR) instead of being kept
alive by us. A restarted daemon reopens a persistent TAP *by name inside its namespace*
the same way: TUNSETIFF attaches to an existing device of the calling thread's namespace.

**Netlink sockets of another namespace** are opened by the calling thread after
``setns`` into it (``netns_entered``), then it returns to its own namespace: a netlink
socket belongs to the namespace it was created in, for its whole life. pyroute2's
``IPRoute(netns=path)`` is never used: it forks a helper process per socket (~35 ms).

**The attach path** (``RtnlSocket``) sends requests encoded by pyroute2's message classes
(``ifinfmsg``, ``ifaddrmsg``, ``rtmsg``) on a raw ``NETLINK_ROUTE`` socket, all the
requests of one step in one ``send``, each with ``NLM_F_ACK``, and reads the acks: the
kernel runs them in order, so a step costs one round trip. pyroute2's ``IPRoute`` (an
asyncio loop per instance, ~1.4 ms to open, ~1 ms per decoded reply) serves the rare
paths that read state: CHECK, start-up, the uplink. Interface indexes on the attach path
come from ``if_nametoindex`` (an ioctl) while the thread is inside the namespace.

"Already gone" is a result, not an error: ``tap_release`` reports a TAP whose device was
deleted (its namespace removed, or ``ip link del`` behind our back: the fd is detached and
``TUNSETPERSIST`` fails with EBADFD) as gone, and ``link_delete`` does the same for a
missing link or namespace.

Two sysctl helpers live here too (``sysctl``, ``forwarding_on``): the rest of the node
plumbing the daemon does (``/proc/sys/net``). ``forwarding_on(version, saved)`` turns on
IPv4 (``net.ipv4.ip_forward``) or IPv6 (``net.ipv6.conf.all.forwarding``) forwarding and
remembers the value it found in ``saved`` (once: a value already remembered is the
node's original), so the daemon can put it back (``forwarding_restore``).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELADDR, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

__all__ = [
    "NetlinkError", "VNET_HDR_LEN", "TapError",
    "netns_entered", "tap_open", "tap_open_queues", "tap_set_persist", "ipr_for",
    "link_info", "link_delete", "pod_view",
    "addresses_of", "routes_via", "address_add_if_missing",
    "address_del", "route_add", "link_set_up", "parse_cidr", "tap_release", "RtnlSocket",
    "ifindex_in", "msg_link_set", "msg_addr", "msg_route", "sysctl", "ip_forward", "tap_unpersist", "TapCloser",
    "route_del", "FORWARDING", "forwarding_on", "forwarding_restore", "uplink_routes",
]

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
IFF_MULTI_QUEUE = 0x0100
MAX_TAP_QUEUES = 256        # the kernel's MAX_TAP_QUEUES (drivers/net/tun.c)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
VNET_HDR_LEN = 12          # struct virtio_net_hdr_mrg_rxbuf (flags, gso_type, hdr_len,
                           # gso_size, csum_start, csum_offset, num_buffers)
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class TapError(OSError):
    """A TAP or namespace operation failed; the message names the device and the step."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise TapError(err, f"setns into network namespace fd {fd} failed: {os.strerror(err)}")


@contextlib.contextmanager
def netns_entered(netns: str | None):
    """Run the calling thread inside the network namespace at path ``netns`` (None: stay)."""
    if netns is None:
        yield
        return
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TapError(exc.errno, f"cannot open network namespace {netns!r}: {exc.strerror}") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def tap_open(name: str, create: bool = True, persist: bool = True, netns: str | None = None) -> int:
    """Open (creating it when ``create``) the TAP ``name`` with a vnet header and offloads.

    Returns a non-blocking fd. ``create=True`` fails if a device of that name exists
    (IFF_TUN_EXCL); ``create=False`` attaches to an existing persistent TAP (in ``netns``).
    """
    if not name or len(name) > 15:
        raise TapError(errno.EINVAL, f"TAP name {name!r} must be 1..15 characters")
    with netns_entered(netns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_TUN_EXCL if create else 0)
            ifr = struct.pack("16sH22x", name.encode(), flags)
            try:
                fcntl.ioctl(fd, TUNSETIFF, ifr)
            except OSError as exc:
                what = "create" if create else "reopen"
                raise TapError(exc.errno, f"cannot {what} TAP {name!r}"
                               f"{' in ' + netns if netns else ''}: {exc.strerror}") from None
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
            if persist:
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
        except BaseException:
            os.close(fd)
            raise
    return fd


def tap_open_queues(name: str, queues: int, create: bool = True, persist: bool = True,
                    netns: str | None = None) -> list[int]:
    """``tap_open`` with ``queues`` queues: one non-blocking fd per queue, queue 0 first.

    ``queues > 1`` creates the TAP with ``IFF_MULTI_QUEUE`` and attaches one more fd per
    queue (each a TUNSETIFF of the same name: the kernel's TUNSETQUEUE semantics, every fd
    a queue that reads and writes on its own). Reopening (``create=False``) asks for the
    device's own kind: a TAP made without IFF_MULTI_QUEUE (by an older daemon) refuses a
    multi-queue attach (EINVAL) and gives one fd, its only queue; a multi-queue TAP
    reopened with ``queues=1`` gives one fd, one of its queues. Fewer fds than ``queues``
    is therefore a result, not an error; the caller shares fd 0 for the missing queues.
    """
    if not isinstance(queues, int) or not 1 <= queues <= MAX_TAP_QUEUES:
        raise TapError(errno.EINVAL, f"TAP {name!r}: queues={queues!r}; accepted: 1 .. {MAX_TAP_QUEUES}")
    if not name or len(name) > 15:
        raise TapError(errno.EINVAL, f"TAP name {name!r} must be 1..15 characters")
    fds: list[int] = []
    made = False
    with netns_entered(netns):
        try:
            mq = queues > 1
            while len(fds) < queues:
                first = not fds
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                fds.append(fd)
                flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if mq else 0)
                try:
                    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                                           flags | (IFF_TUN_EXCL if create and first else 0)))
                except OSError as exc:
                    if first and not create and exc.errno == errno.EINVAL:
                        # the device is of the other kind (multi-queue or not): attach as it is
                        mq = not mq
                        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
                                                               | (IFF_MULTI_QUEUE if mq else 0)))
                    elif first:
                        what = "create" if create else "reopen"
                        raise TapError(exc.errno, f"cannot {what} TAP {name!r}"
                                       f"{' in ' + netns if netns else ''}: {exc.strerror}") from None
                    else:
                        raise TapError(exc.errno, f"TAP {name!r}: cannot attach queue {len(fds) - 1}: "
                                                  f"{exc.strerror}") from None
                if first:
                    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
                    if persist:
                        fcntl.ioctl(fd, TUNSETPERSIST, 1)
                        made = create
                    if not mq:
                        break           # a single-queue TAP (or queues=1): one fd
        except BaseException:
            if made:                    # created here: it goes with our fds
                try:
                    fcntl.ioctl(fds[0], TUNSETPERSIST, 0)
                except OSError:
                    pass
            for fd in fds:
                os.close(fd)
            raise
    return fds


def tap_set_persist(fd: int, persist: bool) -> None:
    """Clear persistence before closing the last fd to make the TAP disappear."""
    fcntl.ioctl(fd, TUNSETPERSIST, 1 if persist else 0)


def tap_release(fd: int, what: str = "TAP") -> bool:
    """Clear persistence and close ``fd``: the TAP device goes away with it.

    Returns False when the device was already gone (the fd is detached: its namespace was
    deleted, or the link was deleted behind our back), which is success too. Any other
    failure closes the fd and raises TapError naming ``what``.
    """
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
        existed = True
    except OSError as exc:
        if exc.errno not in (errno.EBADFD, errno.ENODEV):
            os.close(fd)
            raise TapError(exc.errno, f"cannot release {what}: TUNSETPERSIST: {exc.strerror}") from None
        existed = False
    os.close(fd)
    return existed


def tap_unpersist(fd: int, what: str = "TAP") -> bool:
    """The first half of ``tap_release``: clear persistence, so the device goes when ``fd``
    (its last queue) closes. False when the device was already gone (``fd`` still open);
    any other failure closes ``fd`` and raises TapError naming ``what``."""
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EBADFD, errno.ENODEV):
            os.close(fd)
            raise TapError(exc.errno, f"cannot release {what}: TUNSETPERSIST: {exc.strerror}") from None
        return False


class TapCloser:
    """Closes released TAPs' fds on background threads, several at once.

    Closing the last fd of a non-persistent TAP unregisters the device, which waits for
    RCU grace periods (~20 ms here) in the closing thread; closes on separate threads
    overlap their waits (8 at once: ~35 ms instead of ~135 ms). ``close(fd, key, done)``
    queues the close and returns at once; ``done()`` runs on the closer thread afterwards.
    ``wait(key, timeout_s)`` blocks until a close queued under ``key`` (a pod's
    (netns, ifname)) has finished: a TAP of that name may be created again only then.
    At most ``max_threads`` threads, started on demand, kept idle (daemon threads).
    """

    def __init__(self, max_threads: int = 8):
        import threading
        self._threading = threading
        self._cv = threading.Condition()
        self._jobs: list = []
        self._pending: dict = {}        # key -> Event, set when its close is done
        self._threads = 0
        self._idle = 0
        self.max_threads = max_threads

    def close(self, fd: int, key, done=None) -> None:
        ev = self._threading.Event()
        with self._cv:
            self._pending[key] = ev
            self._jobs.append((fd, key, ev, done))
            if self._idle == 0 and self._threads < self.max_threads:
                self._threads += 1
                self._threading.Thread(target=self._run, name="vswitchd-tap-closer", daemon=True).start()
            else:
                self._cv.notify()

    def pending(self, key) -> bool:
        with self._cv:
            return key in self._pending

    def wait(self, key, timeout_s: float = 10.0) -> bool:
        """True once no close of ``key`` is pending (at once if none is), False on timeout."""
        with self._cv:
            ev = self._pending.get(key)
        return ev is None or ev.wait(timeout_s)

    def _run(self):
        while True:
            with self._cv:
                while not self._jobs:
                    self._idle += 1
                    self._cv.wait()
                    self._idle -= 1
                fd, key, ev, done = self._jobs.pop(0)
            try:
                os.close(fd)
            except OSError:
                pass                    # nothing to undo: the device goes with the fd either way
            with self._cv:
                if self._pending.get(key) is ev:
                    del self._pending[key]
            ev.set()
            if done is not None:
                done()


def ipr_for(netns: str | None = None) -> IPRoute:
    """An IPRoute socket inside ``netns`` (a path) or the daemon's own namespace.

    The socket is opened by this thread after setns into ``netns`` (no helper process).
    """
    if netns is None:
        return IPRoute()
    if not os.path.exists(netns):
        raise TapError(errno.ENOENT, f"network namespace {netns!r} does not exist")
    with netns_entered(netns):
        return IPRoute()


def ifindex_in(name: str, netns: str | None = None) -> int | None:
    """The index of link ``name`` in ``netns`` (an ioctl, no netlink dump), or None."""
    with netns_entered(netns):
        try:
            return socket.if_nametoindex(name)
        except OSError:
            return None


class RtnlSocket:
    """A raw NETLINK_ROUTE socket of one namespace that sends batches of requests.

    Requests are pyroute2 messages (``ifinfmsg``, ``ifaddrmsg``, ``rtmsg``) built by the
    helpers below; ``run(what, msgs)`` encodes them with consecutive sequence numbers,
    sends them in one ``send`` and reads one ack per request. The first error raises
    NetlinkError whose message names ``what``, the request and the kernel's reason.
    Used by one thread at a time.
    """

    def __init__(self, netns: str | None = None):
        if netns is not None and not os.path.exists(netns):
            raise TapError(errno.ENOENT, f"network namespace {netns!r} does not exist")
        self.netns = netns
        with netns_entered(netns):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, what: str, msgs: list) -> list[int]:
        """Send ``[(label, msg), ...]``; returns the kernel's error code per request (all 0)."""
        if not msgs:
            return []
        data = bytearray()
        first = self.seq + 1
        for _, m in msgs:
            self.seq += 1
            m["header"]["sequence_number"] = self.seq
            m["header"]["flags"] |= NLM_F_REQUEST | NLM_F_ACK
            m.encode()
            data += m.data
        self.sock.send(data)
        codes: dict[int, int] = {}
        while len(codes) < len(msgs):
            buf = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(buf):
                length, mtype, _flags, seq = struct.unpack_from("=IHHI", buf, off)
                if length < 16:
                    break
                if mtype == NLMSG_ERROR and first <= seq <= self.seq:
                    codes[seq] = -struct.unpack_from("=i", buf, off + 16)[0]
                off += (length + 3) & ~3
        for i, (label, _) in enumerate(msgs):
            code = codes[first + i]
            if code:
                where = f" in {self.netns}" if self.netns else ""
                raise NetlinkError(code, f"{what}: {label}{where}: {os.strerror(code)}")
        return [codes[first + i] for i in range(len(msgs))]


# ---- requests for RtnlSocket.run (pyroute2 message classes, encoded there)

def msg_link_set(index: int, *, mac: str | None = None, mtu: int | None = None,
                 up: bool | None = None) -> ifinfmsg:
    """Set a link's MAC, MTU, and up or down."""
    m = ifinfmsg()
    m["index"] = index
    attrs = []
    if mac:
        attrs.append(("IFLA_ADDRESS", mac))
    if mtu:
        attrs.append(("IFLA_MTU", mtu))
    m["attrs"] = attrs
    if up is not None:
        m["flags"] = 1 if up else 0      # IFF_UP
        m["change"] = 1
    m["header"]["type"] = RTM_NEWLINK
    m["header"]["flags"] = 0
    return m


def msg_addr(index: int, cidr: str, add: bool = True, replace: bool = False) -> ifaddrmsg:
    """Add (``replace``: or keep) / delete an address; IPv6 with NODAD (usable at once)."""
    iface = parse_cidr(cidr)
    m = ifaddrmsg()
    m["family"] = 10 if iface.version == 6 else 2
    m["prefixlen"] = iface.network.prefixlen
    m["index"] = index
    ip = str(iface.ip)
    m["attrs"] = [("IFA_LOCAL", ip), ("IFA_ADDRESS", ip)] if iface.version == 4 else [("IFA_ADDRESS", ip)]
    if add and iface.version == 6:
        m["flags"] = 0x02            # IFA_F_NODAD, like the bridge plugin's settle
    m["header"]["type"] = RTM_NEWADDR if add else RTM_DELADDR
    m["header"]["flags"] = (NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)) if add else 0
    return m


def msg_route(index: int, dst: str, gw: str | None = None) -> rtmsg:
    """Add or replace a main-table route to ``dst`` through link ``index``."""
    net = ipaddress.ip_network(dst, strict=False)
    m = rtmsg()
    m["family"] = 10 if net.version == 6 else 2
    m["dst_len"] = net.prefixlen
    m["table"] = 254
    m["proto"] = 3                   # RTPROT_BOOT, as `ip route add`
    m["scope"] = 0 if gw else 253    # universe via a gateway, else link
    m["type"] = 1                    # RTN_UNICAST
    attrs = [("RTA_TABLE", 254), ("RTA_OIF", index)]
    if net.prefixlen:
        attrs.insert(0, ("RTA_DST", str(net.network_address)))
    if gw:
        attrs.append(("RTA_GATEWAY", gw))
    m["attrs"] = attrs
    m["header"]["type"] = RTM_NEWROUTE
    m["header"]["flags"] = NLM_F_CREATE | NLM_F_REPLACE
    return m


@contextlib.contextmanager
def _link(name: str, netns: str | None = None):
    """An IPRoute socket in ``netns`` and the index of link ``name`` there (None: no link)."""
    with ipr_for(netns) as ipr:
        found = ipr.link_lookup(ifname=name)
        yield ipr, (found[0] if found else None)


def _no_link(name: str, netns: str | None = None) -> TapError:
    return TapError(errno.ENODEV, f"no link {name!r}{' in ' + netns if netns else ''}")


def _link_dict(ipr: IPRoute, idx: int) -> dict:
    link = ipr.get_links(idx)[0]
    info = link.get("IFLA_LINKINFO")
    return {"index": idx, "mac": link.get("IFLA_ADDRESS"), "mtu": link.get("IFLA_MTU"),
            "up": bool(link["flags"] & 1), "kind": info.get("IFLA_INFO_KIND") if info else None}


def link_info(name: str, netns: str | None = None) -> dict | None:
    """{index, mac, mtu, up, kind} of a link, or None when it does not exist."""
    with _link(name, netns) as (ipr, idx):
        return None if idx is None else _link_dict(ipr, idx)


def link_delete(name: str, netns: str | None = None) -> bool:
    """Delete a link; True if it existed. A gone namespace or link counts as gone."""
    try:
        with _link(name, netns) as (ipr, idx):
            if idx is None:
                return False
            ipr.link("del", index=idx)
            return True
    except TapError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise


def link_set_up(name: str, netns: str | None = None, mac: str | None = None,
                mtu: int | None = None) -> None:
    with _link(name, netns) as (ipr, idx):
        if idx is None:
            raise _no_link(name, netns)
        kw = {}
        if mac:
            kw["address"] = mac
        if mtu:
            kw["mtu"] = mtu
        if kw:
            ipr.link("set", index=idx, **kw)
        ipr.link("set", index=idx, state="up")


def parse_cidr(text: str):
    """'10.0.0.5/24' -> IPv4Interface; raises ValueError naming the value."""
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise ValueError(f"not an address with prefix: {text!r} (expected like 10.0.0.5/24)") from None


def address_add_if_missing(ifname: str, cidr: str, netns: str | None = None, nodad: bool = True) -> bool:
    """Add ``cidr`` to ``ifname`` unless that address is there already; True if added.

    An IPv6 address is added with NODAD (usable at once) unless ``nodad`` is False (as
    ``ip addr add`` does: tentative until duplicate address detection passed)."""
    iface = parse_cidr(cidr)
    with _link(ifname, netns) as (ipr, idx):
        if idx is None:
            raise _no_link(ifname, netns)
        for a in ipr.get_addr(index=idx):
            if a.get("IFA_ADDRESS") == str(iface.ip):
                return False
        kw = {"flags": 0x02} if iface.version == 6 and nodad else {}
        ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **kw)
        return True


def address_del(ifname: str, cidr: str, netns: str | None = None) -> bool:
    """Remove ``cidr`` from ``ifname``; True if it was there."""
    iface = parse_cidr(cidr)
    with _link(ifname, netns) as (ipr, idx):
        if idx is None:
            return False
        try:
            ipr.addr("del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            return True
        except NetlinkError as exc:
            if exc.code in (errno.EADDRNOTAVAIL, errno.ENOENT):
                return False
            raise


def route_add(netns: str | None, ifname: str, dst: str, gw: str | None = None, metric: int | None = None,
              proto: int | None = None) -> None:
    """Add or replace a main-table route to ``dst`` through ``ifname`` (via ``gw``), with
    ``metric`` and ``proto`` when given (as ``uplink_routes`` read them)."""
    net = ipaddress.ip_network(dst, strict=False)
    with _link(ifname, netns) as (ipr, idx):
        if idx is None:
            raise _no_link(ifname, netns)
        kw = {"dst": str(net.network_address), "dst_len": net.prefixlen, "oif": idx,
              "family": 10 if net.version == 6 else 2}
        if gw:
            kw["gateway"] = gw
        if metric is not None:
            kw["priority"] = metric
        if proto is not None:
            kw["proto"] = proto
        ipr.route("replace", **kw)


def route_del(ifname: str, dst: str, gw: str | None = None, metric: int | None = None) -> bool:
    """Delete the main-table route to ``dst`` through ``ifname`` (via ``gw``); True if it
    was there (a missing route or link is not an error)."""
    net = ipaddress.ip_network(dst, strict=False)
    with _link(ifname) as (ipr, idx):
        if idx is None:
            return False
        kw = {"dst": str(net.network_address), "dst_len": net.prefixlen, "oif": idx,
              "family": 10 if net.version == 6 else 2, "table": 254}
        if gw:
            kw["gateway"] = gw
        if metric is not None:
            kw["priority"] = metric
        try:
            ipr.route("del", **kw)
            return True
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENOENT, errno.ENODEV):
                return False
            raise


def _addresses(ipr: IPRoute, idx: int) -> list[str]:
    out = []
    for a in ipr.get_addr(index=idx):
        ip = a.get("IFA_ADDRESS")
        if ip is None:
            continue
        iface = ipaddress.ip_interface(f"{ip}/{a['prefixlen']}")
        if iface.ip.is_link_local:
            continue
        out.append(str(iface))
    out.sort(key=lambda c: (":" in c, c))
    return out


def _routes(ipr: IPRoute, idx: int) -> list[dict]:
    out = []
    for family in (2, 10):
        for r in ipr.get_routes(family=family, table=254):
            if r.get("RTA_OIF") != idx or not r.get("RTA_GATEWAY"):
                continue
            dst = r.get("RTA_DST") or ("0.0.0.0" if family == 2 else "::")
            out.append({"dst": f"{dst}/{r['dst_len']}", "gw": r.get("RTA_GATEWAY")})
    return out


def addresses_of(ifname: str, netns: str | None = None) -> list[str]:
    """Global (non link-local) addresses of a link as 'a.b.c.d/len', IPv4 first."""
    with _link(ifname, netns) as (ipr, idx):
        return [] if idx is None else _addresses(ipr, idx)


def routes_via(ifname: str, netns: str | None = None) -> list[dict]:
    """Routes of the main table through ``ifname`` that have a gateway: [{dst, gw}]."""
    with _link(ifname, netns) as (ipr, idx):
        return [] if idx is None else _routes(ipr, idx)


def uplink_routes(ifname: str, netns: str | None = None) -> list[dict]:
    """Routes of the main table through ``ifname`` that have a gateway, both families, with
    what a faithful restore needs: [{dst, gw, metric, proto}]."""
    with _link(ifname, netns) as (ipr, idx):
        if idx is None:
            return []
        out = []
        for family in (2, 10):
            for r in ipr.get_routes(family=family, table=254):
                if r.get("RTA_OIF") != idx or not r.get("RTA_GATEWAY"):
                    continue
                dst = r.get("RTA_DST") or ("0.0.0.0" if family == 2 else "::")
                out.append({"dst": f"{dst}/{r['dst_len']}", "gw": r.get("RTA_GATEWAY"),
                            "metric": r.get("RTA_PRIORITY"), "proto": r["proto"]})
        return out


def pod_view(ifname: str, netns: str) -> dict:
    """What CHECK compares, read through one socket in ``netns``:
    {"link": link_info or None, "addresses": [...], "routes": [{dst, gw}]}."""
    with _link(ifname, netns) as (ipr, idx):
        if idx is None:
            return {"link": None, "addresses": [], "routes": []}
        return {"link": _link_dict(ipr, idx), "addresses": _addresses(ipr, idx), "routes": _routes(ipr, idx)}


# --------------------------------------------------------------------------- sysctls

def sysctl(key: str, value: str | None = None) -> str | None:
    """Read (``value`` None) or write ``/proc/sys/net/KEY``; None when that fails (no
    such key, as ``disable_ipv6`` without IPv6), else the value."""
    path = "/proc/sys/net/" + key
    try:
        if value is None:
            with open(path) as f:
                return f.read().strip()
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        return None
    return value


def ip_forward() -> None:
    """Enable IPv4 forwarding (the host port routes for the pods); raises if it cannot."""
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")


# the forwarding switch per IP version (``all``: IPv6 forwarding on every interface)
FORWARDING = {4: "ipv4/ip_forward", 6: "ipv6/conf/all/forwarding"}


def forwarding_on(version: int, saved: dict) -> None:
    """Enable forwarding of IP ``version`` (4 or 6); the value found before is kept in
    ``saved[key]`` unless one is kept already. Raises OSError naming the key if it cannot
    (IPv6 disabled in this kernel, /proc/sys read-only)."""
    key = FORWARDING[version]
    if key not in saved:
        saved[key] = sysctl(key)
    try:
        with open("/proc/sys/net/" + key, "w") as f:
            f.write("1")
    except OSError as exc:
        raise OSError(exc.errno, f"cannot enable IPv{version} forwarding (net.{key.replace('/', '.')}): "
                                 f"{exc.strerror}") from None


def forwarding_restore(saved: dict) -> dict:
    """Put back the forwarding values ``forwarding_on`` remembered; returns what it wrote."""
    done = {}
    for key, value in saved.items():
        if value is not None and sysctl(key, value) is not None:
            done[key] = value
    return done
