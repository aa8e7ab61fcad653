"""Port kinds of vswitchd and the packet I/O that moves their frames in batches.

Theory of operation
-------------------
Each switch port of the daemon has one file descriptor:

- ``TapPort``: a pod's TAP (in the pod's namespace), 12-byte virtio-net header.
- ``HostPort``: the node-side TAP (``vsw0``) holding the gateway address, 12-byte header.
- ``UplinkPort``: an AF_PACKET socket bound to a NIC with ``PACKET_VNET_HDR`` (10-byte
  header, so offloaded GSO frames come in and go out whole), ``PACKET_IGNORE_OUTGOING``
  (we do not read back what we send) and a promiscuous membership (dropped by the kernel
  when the socket closes).

:class:`PacketIO` owns the batch buffers (one preallocated numpy buffer, the datapath's
layout: ENCAP_HEADROOM free bytes, header, frame per slot; docs/datapath.md D50), the
per-port fd table and the epoll of the port fds (``set_port`` adds and removes them).
``poll(timeout_ms)`` waits, reads a batch from the ready ports and reports failed ports
and whether the daemon's control epoll (one fd,
``watch_control``) is readable, in one call of the Cython ``BatchIO`` of
``vswitch.datapath._core`` (``ext/io.pxi``, no GIL), or with the pure-Python datapath
(``VSWITCH_PURE_PYTHON=1``, decided in ``vswitch.datapath``) of the pure-Python twin
below with the same methods. A missing build is an error, never a fallback.
``run(datapath, deadline_ns, poll_ns)`` (BatchIO only) is the daemon's whole packet loop in
Cython: wait, read, process, write, drain shaping queues, poll briefly after a batch, and
return only when Python has work (``ext/io.pxi``).

Both writers (C and the twin here) write a VXLAN TSO frame (vnet gso_type with
VNET_GSO_UDP_TUNNEL_IPV4) to an AF_PACKET port as UDP GSO packets of its wire segments
(D54; ``set_tunnel_gso("segments")`` or a kernel that refuses them: one write per wire
segment, D51; spec ``vswitch.datapath.gso``) and merge a run of one TCP flow's frames to a
TAP port into one GSO frame (receive coalescing, D52); both readers cut a UDP GSO frame
read from an AF_PACKET port into its datagrams (D54).

:class:`PortTable` is the daemon's view of its ports with an fd: by switch port name
(what detach and ``show`` look up) and by port id while the fd is polled (what a failed
fd reported by the loop maps back to).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import select
import socket
import struct

import numpy as np

from vswitch import datapath
from vswitch.datapath import gso
from vswitch.datapath.consts import (ENCAP_HEADROOM, FLOOD_MEMBER, FLOOD_UNKNOWN_MEMBER, MAX_FRAME, OUT_DROP,
                                     OUT_FLOOD, OUT_FLOOD_UNKNOWN, OUT_QUEUED, UDP_GSO_SPLIT_SLOT_EXTRA,
                                     VNET_GSO_UDP_TUNNEL_IPV4)

VNET_HDR_LEN = 12
MAX_WORKERS = 64                            # --workers: packet worker threads at most
# vswitchd's frames per batch (PacketIO max_batch): a UDP GSO frame from the uplink is cut into
# up to 64 entries (D54) and a read is tried only with room for them, so 128 keeps the uplink
# and the pods sharing a batch (and a 64 KiB segment's two packets coalescing into one TAP write)
DAEMON_MAX_BATCH = 128
SLOT_MAX = VNET_HDR_LEN + MAX_FRAME
SLOT_SPAN = ENCAP_HEADROOM + SLOT_MAX      # a read slot: headroom for VXLAN's outer headers, header, frame
_py_udp_gso = True                         # the twin's ext/io.pxi _io_udp_gso (set_tunnel_gso)

# linux/if_packet.h
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_FANOUT = 18
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
ETH_P_ALL = 0x0003


@dataclasses.dataclass
class Port:
    """One switch port with an fd. ``name`` is the switch port name. ``queue_fds``: the
    fds of packet workers 1.. (a multi-queue TAP's other queues; empty: every worker
    shares ``fd``, which only worker 0 reads)."""
    name: str
    port_id: int
    fd: int
    hdr_len: int = VNET_HDR_LEN
    kind: str = "pod"
    queue_fds: list = dataclasses.field(default_factory=list)

    def worker_fd(self, k: int) -> tuple[int, bool]:
        """(the fd worker ``k`` reads and writes, whether it is its own to poll)."""
        if k == 0:
            return self.fd, True
        if k - 1 < len(self.queue_fds):
            return self.queue_fds[k - 1], True
        return self.fd, False

    def close_queues(self):
        """Close the fds of workers 1.. (no longer polled by anyone)."""
        q, self.queue_fds = self.queue_fds, []
        for fd in q:
            os.close(fd)

    def close(self):
        self.close_queues()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclasses.dataclass
class TapPort(Port):
    netns: str = ""
    ifname: str = ""


@dataclasses.dataclass
class HostPort(Port):
    kind: str = "host"


@dataclasses.dataclass
class UplinkPort(Port):
    kind: str = "uplink"
    hdr_len: int = 10
    sock: socket.socket | None = None
    queue_socks: list = dataclasses.field(default_factory=list)     # workers 1..: PACKET_FANOUT members

    def close_queues(self):
        q, self.queue_socks, self.queue_fds = self.queue_socks, [], []
        for s in q:
            s.close()

    def close(self):
        self.close_queues()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.fd = -1


def uplink_fanout(port: UplinkPort, ifname: str, workers: int):
    """Give packet workers 1..``workers``-1 their own AF_PACKET socket on the uplink: the
    port's socket and the new ones join one PACKET_FANOUT group (hash: a flow's frames go
    to one socket, so to one worker, in order; the group's id is unique, chosen by the
    kernel). Each worker writes on its own socket."""
    if workers <= 1:
        return
    port.sock.setsockopt(SOL_PACKET, PACKET_FANOUT, (PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_UNIQUEID) << 16)
    group = port.sock.getsockopt(SOL_PACKET, PACKET_FANOUT) & 0xFFFF
    try:
        for _ in range(workers - 1):
            s = open_uplink_socket(ifname, promisc=False)
            port.queue_socks.append(s)
            s.setsockopt(SOL_PACKET, PACKET_FANOUT, group | (PACKET_FANOUT_HASH << 16))
            port.queue_fds.append(s.fileno())
    except BaseException:
        port.close_queues()
        raise


def open_uplink_socket(ifname: str, promisc: bool = True) -> socket.socket:
    """A non-blocking AF_PACKET socket on ``ifname`` with a vnet header, promiscuous."""
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        raise ValueError(f"uplink: no interface {ifname!r} in the daemon's namespace") from None
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.bind((ifname, ETH_P_ALL))
        if promisc:
            mreq = struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b"")
            s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


# --------------------------------------------------------------------------- pure-Python I/O

def py_read_batch(fds, fd_ports, fd_hdr_lens, nfds, buf, offsets, lengths, in_ports,
                  max_pkts, per_fd_max, rx_errors):
    """The Python twin of ``_io_read_all`` (ext/io.pxi): same layout, same result."""
    mv = memoryview(buf)
    pos = n = 0
    for j in range(nfds):
        fd, port, hdr = int(fds[j]), int(fd_ports[j]), int(fd_hdr_lens[j])
        for _ in range(per_fd_max):
            if n >= max_pkts or pos + SLOT_SPAN > len(buf):
                break
            if hdr != VNET_HDR_LEN and n > 0 and (n + gso.UDP_GSO_MAX_SEGS > max_pkts
                                                  or pos + SLOT_SPAN + gso.UDP_GSO_MAX_SEGS * UDP_GSO_SPLIT_SLOT_EXTRA > len(buf)):
                # short of room for a cut (D54): a UDP GSO frame waits for the next batch
                if _py_peek2(fd)[1:2] in (b"", bytes([gso.VNET_GSO_UDP_L4])):
                    break
            slot = pos + ENCAP_HEADROOM
            try:
                if hdr == VNET_HDR_LEN:
                    r = os.readv(fd, [mv[slot:slot + SLOT_MAX]])
                else:
                    r = os.readv(fd, [mv[slot:slot + hdr], mv[slot + VNET_HDR_LEN:slot + SLOT_MAX]])
            except BlockingIOError:
                break
            except OSError:
                rx_errors[port] += 1
                break
            if r < hdr:
                rx_errors[port] += 1
                continue
            if hdr != VNET_HDR_LEN:
                buf[slot + hdr:slot + VNET_HDR_LEN] = 0
                if buf[slot + 1] == gso.VNET_GSO_UDP_L4:        # D54: cut into its datagrams
                    cut = _py_split(buf, pos, r - hdr, max_pkts - n)
                    if cut is None:
                        rx_errors[port] += 1
                        continue
                    for vh, f in cut:
                        s = pos + ENCAP_HEADROOM
                        buf[s:s + VNET_HDR_LEN] = np.frombuffer(vh, np.uint8)
                        buf[s + VNET_HDR_LEN:s + VNET_HDR_LEN + len(f)] = np.frombuffer(f, np.uint8)
                        offsets[n], lengths[n], in_ports[n] = s + VNET_HDR_LEN, len(f), port
                        pos += (ENCAP_HEADROOM + VNET_HDR_LEN + len(f) + 7) & ~7
                        n += 1
                    continue
            offsets[n] = slot + VNET_HDR_LEN
            lengths[n] = r - hdr
            in_ports[n] = port
            pos += (ENCAP_HEADROOM + VNET_HDR_LEN + r - hdr + 7) & ~7
            n += 1
        if n >= max_pkts or pos + SLOT_SPAN > len(buf):
            break
    return n


def _py_peek2(fd) -> bytes:
    """The first two bytes of the next message of socket `fd`, not consumed (b"": none)."""
    s = socket.socket(fileno=fd)
    try:
        return s.recv(2, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return b""
    finally:
        s.detach()


def _py_split(buf, pos, length, room):
    """gso.split_udp_gso of the frame read into the slot at pos, or None (cannot be cut, or
    more datagrams than `room` or than the buffer holds after pos)."""
    slot = pos + ENCAP_HEADROOM
    vh, frame = bytes(buf[slot:slot + VNET_HDR_LEN]), bytes(buf[slot + VNET_HDR_LEN:slot + VNET_HDR_LEN + length])
    err, g = gso.split_layout(vh, frame)
    if err or g[2] > room:
        return None
    udp, gso_size, segs = g
    span = (ENCAP_HEADROOM + VNET_HDR_LEN + udp + 8 + gso_size + 7) & ~7
    if pos + (segs - 1) * span + ENCAP_HEADROOM + VNET_HDR_LEN + udp + 8 + gso_size > len(buf):
        return None
    return gso.split_udp_gso(vh, frame)


def set_tunnel_gso(mode: str, impl: str | None = None):
    """How tunnel GSO frames leave an AF_PACKET port, process-wide, for one implementation
    (None: both that are loaded): "udp" (UDP GSO packets, D54) or "segments" (D51)."""
    global _py_udp_gso
    if mode not in ("udp", "segments"):
        raise ValueError(f"tunnel GSO mode {mode!r}; accepted: 'udp', 'segments'")
    if impl in (None, "py"):
        _py_udp_gso = mode == "udp"
    if impl in (None, "c"):
        if impl == "c" or datapath.implementation() == "c":
            datapath.module("c").set_tunnel_gso(mode)


def tunnel_gso(impl: str) -> str:
    """The current mode of an implementation ("udp" or "segments")."""
    if impl == "py":
        return "udp" if _py_udp_gso else "segments"
    return datapath.module("c").tunnel_gso()


def _py_write_one(fd, hdr, mv, off, length):
    global _py_udp_gso
    if mv[off - VNET_HDR_LEN + 1] & VNET_GSO_UDP_TUNNEL_IPV4 and _py_udp_gso and hdr != VNET_HDR_LEN:
        # a VXLAN TSO frame to an AF_PACKET port: UDP GSO packets (D54)
        try:
            packets = gso.pack_udp_gso(mv[off - VNET_HDR_LEN:off], mv[off:off + length])
        except ValueError as e:
            raise OSError(errno.EINVAL, str(e)) from None
        for j, (vh, packet) in enumerate(packets):
            try:
                os.writev(fd, [vh[:hdr], packet])
            except OSError as e:
                if not (e.errno == errno.EINVAL and j == 0 and vh[1] == gso.VNET_GSO_UDP_L4):
                    raise
                _py_udp_gso = False             # this kernel refuses them: D51 from now on
                break
        else:
            return
    if mv[off - VNET_HDR_LEN + 1] & VNET_GSO_UDP_TUNNEL_IPV4:
        # a VXLAN TSO frame: its wire segments (gso.py); not segmentable: EINVAL, a tx error
        try:
            segments = gso.segment_vxlan(mv[off - VNET_HDR_LEN:off], mv[off:off + length])
        except ValueError as e:
            raise OSError(errno.EINVAL, str(e)) from None
        for vh, seg in segments:
            os.writev(fd, [vh[:hdr], seg])
        return
    if hdr == VNET_HDR_LEN:
        os.write(fd, mv[off - VNET_HDR_LEN:off + length])
    else:
        os.writev(fd, [mv[off - VNET_HDR_LEN:off - VNET_HDR_LEN + hdr], mv[off:off + length]])


def _py_coalesce_items(buf, offsets, lengths, out_ports, i, n):
    """The candidates of a coalesced run from batch entry i (its out port's, in order; dropped
    or queued entries skipped): [(batch index, vnet header, frame)]."""
    out = int(out_ports[i])
    items = []
    for j in range(i, n):
        o = int(out_ports[j])
        if o in (OUT_DROP, OUT_QUEUED) and j > i:
            continue
        off, length = int(offsets[j]), int(lengths[j])
        if o != out or off < VNET_HDR_LEN or off + length > len(buf) or len(items) == gso.COALESCE_MAX_FRAMES:
            break
        items.append((j, bytes(buf[off - VNET_HDR_LEN:off]), bytes(buf[off:off + length])))
    return items


def py_write_batch(buf, offsets, lengths, in_ports, out_ports, n, port_fds, port_hdr_lens, tx_errors,
                   port_flood=None):
    """The Python twin of ``_io_write_all`` (ext/io.pxi); port_flood: the flood classes
    (None: every port is in every class). Runs of one TCP flow to a TAP port (12-byte
    header) are written as one GSO frame (gso.coalesce_count / coalesced)."""
    mv = memoryview(buf)
    written = 0
    nports = len(port_fds)
    i = 0
    while i < n:
        out, off, length = int(out_ports[i]), int(offsets[i]), int(lengths[i])
        i += 1
        if off < VNET_HDR_LEN or off + length > len(buf):
            continue
        if 0 <= out < nports and port_fds[out] >= 0 and port_hdr_lens[out] == VNET_HDR_LEN \
                and gso.coalesce_info(mv[off - VNET_HDR_LEN:off], mv[off:off + length]) is not None:
            items = _py_coalesce_items(buf, offsets, lengths, out_ports, i - 1, n)
            m = gso.coalesce_count([(vh, f) for _, vh, f in items])
            if m >= 2:
                vh, frame = gso.coalesced([(vh, f) for _, vh, f in items[:m]])
                try:
                    os.write(int(port_fds[out]), vh + frame)
                    written += m
                except OSError:
                    tx_errors[out] += 1
                i = items[m - 1][0] + 1
                continue
        if out >= 0:
            targets = [out] if out < nports and port_fds[out] >= 0 else []
        elif out in (OUT_FLOOD, OUT_FLOOD_UNKNOWN):
            member = FLOOD_MEMBER if out == OUT_FLOOD else FLOOD_UNKNOWN_MEMBER
            targets = [p for p in range(nports) if port_fds[p] >= 0 and p != in_ports[i - 1]
                       and (port_flood is None or port_flood[p] & member)]
        else:
            continue
        for p in targets:
            try:
                _py_write_one(int(port_fds[p]), int(port_hdr_lens[p]), mv, off, length)
                written += 1
            except OSError:
                tx_errors[p] += 1
    return written


class _PyBatchIO:
    """The pure-Python twin of ``BatchIO`` (ext/io.pxi): same arrays, same methods."""

    impl = "py"

    def __init__(self, max_ports, max_batch=64, buf_bytes=4 << 20, out_buf_bytes=4 << 20, per_fd_max=32):
        self.max_ports, self.max_batch, self.per_fd_max = max_ports, max_batch, per_fd_max
        self.buf = np.zeros(max(buf_bytes, 2 * SLOT_SPAN), np.uint8)
        self.dbuf = np.zeros(max(out_buf_bytes, 2 * SLOT_SPAN), np.uint8)
        self.offsets, self.doffsets = np.zeros(max_batch, np.uint32), np.zeros(max_batch, np.uint32)
        self.lengths, self.dlengths = np.zeros(max_batch, np.uint32), np.zeros(max_batch, np.uint32)
        self.in_ports, self.din_ports = np.zeros(max_batch, np.uint16), np.zeros(max_batch, np.uint16)
        self.out_ports, self.dout_ports = np.zeros(max_batch, np.int32), np.zeros(max_batch, np.int32)
        self.port_fds = np.full(max_ports, -1, np.int32)
        self.port_hdr_lens = np.full(max_ports, VNET_HDR_LEN, np.uint8)
        self.port_flood = np.full(max_ports, FLOOD_MEMBER | FLOOD_UNKNOWN_MEMBER, np.uint8)
        self.rx_errors = np.zeros(max_ports, np.uint64)
        self.tx_errors = np.zeros(max_ports, np.uint64)
        self.rfds = np.zeros(max_ports, np.int32)
        self.rports = np.zeros(max_ports, np.uint16)
        self.rhdrs = np.zeros(max_ports, np.uint8)
        self.failed = np.zeros(max_ports + 1, np.uint16)
        self.n_failed = 0
        self.control_ready = False
        self._ep = select.epoll()
        self._fd_port = {}                   # fd -> port id, -1 for the control fd

    def set_flood_classes(self, classes):
        if len(classes) < self.max_ports:
            raise ValueError(f"flood classes of {len(classes)} ports; accepted: at least max_ports {self.max_ports}")
        self.port_flood = classes

    def watch(self, fd, port_id):
        if not 0 <= port_id < self.max_ports:
            raise ValueError(f"port_id={port_id}; accepted: 0 .. {self.max_ports - 1}")
        self._ep.register(fd, select.EPOLLIN)
        self._fd_port[fd] = port_id

    def watch_control(self, fd):
        self._ep.register(fd, select.EPOLLIN)
        self._fd_port[fd] = -1

    def unwatch(self, fd):
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass
        self._fd_port.pop(fd, None)

    def poll(self, timeout_ms):
        events = self._ep.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1, self.max_ports + 1)
        k = nf = 0
        ctl = False
        for fd, ev in events:
            pid = self._fd_port.get(fd)
            if pid is None:
                continue
            if pid < 0:
                ctl = True
                continue
            if self.port_fds[pid] < 0:
                continue
            if ev & (select.EPOLLERR | select.EPOLLHUP) and not ev & select.EPOLLIN:
                self.failed[nf] = pid
                nf += 1
                continue
            self.rfds[k], self.rports[k], self.rhdrs[k] = self.port_fds[pid], pid, self.port_hdr_lens[pid]
            k += 1
        self.n_failed, self.control_ready = nf, ctl
        return self.read(k) if k else 0

    def read(self, nfds):
        return py_read_batch(self.rfds, self.rports, self.rhdrs, nfds, self.buf, self.offsets, self.lengths,
                             self.in_ports, self.max_batch, self.per_fd_max, self.rx_errors)

    def write(self, n):
        return py_write_batch(self.buf, self.offsets, self.lengths, self.in_ports, self.out_ports, n,
                              self.port_fds, self.port_hdr_lens, self.tx_errors, self.port_flood)

    def write_drained(self, n):
        return py_write_batch(self.dbuf, self.doffsets, self.dlengths, self.din_ports, self.dout_ports, n,
                              self.port_fds, self.port_hdr_lens, self.tx_errors, self.port_flood)


def _batch_io_class(impl=None):
    # vswitch.datapath decides (VSWITCH_PURE_PYTHON); a missing or partial build raises
    # its BuildError: the Python loop runs only with the twin, asked for explicitly
    impl = datapath.implementation() if impl is None else impl
    if impl == "py":
        return _PyBatchIO, "py"
    return datapath.module(impl).BatchIO, impl


class PacketIO:
    """Batch buffers and the port fd table of the daemon's I/O loop.

    Uses ``BatchIO`` of the Cython module (``ext/io.pxi``), or its pure-Python twin when
    the implementation is ``"py"``: ``impl`` (``"c"``, ``"py"``; None: as
    ``vswitch.datapath.implementation()`` decides, ``VSWITCH_PURE_PYTHON=1`` for the twin).
    """

    def __init__(self, max_ports: int, max_batch: int = 64, buf_bytes: int = 4 << 20,
                 out_buf_bytes: int = 4 << 20, per_fd_max: int = 32, impl: str | None = None,
                 workers: int = 1):
        cls, self.impl = _batch_io_class(impl)
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers={workers!r}; accepted: an integer 1 .. {MAX_WORKERS}")
        if workers > 1 and self.impl != "c":
            raise ValueError(f"workers={workers}: packet workers need the Cython core (the pure-Python "
                             f"twin runs one loop); accepted with it: workers=1")
        # one BatchIO per packet worker: own buffers, own epoll, own fd table (its queues)
        self.bs = [cls(max_ports, max_batch, buf_bytes, out_buf_bytes, per_fd_max) for _ in range(workers)]
        b = self.b = self.bs[0]          # worker 0: the daemon's own thread
        self.workers = workers
        self.lock = datapath.module(self.impl).LoopLock() if workers > 1 else None
        self.max_batch = max_batch
        for name in ("buf", "offsets", "lengths", "in_ports", "out_ports", "dbuf", "doffsets", "dlengths",
                     "din_ports", "dout_ports", "port_fds", "port_hdr_lens",
                     "rfds", "rports", "rhdrs", "failed"):
            setattr(self, name, getattr(b, name))
        self.write = b.write
        self.write_drained = b.write_drained
        self.poll = b.poll                   # wait + read: n frames; then n_failed, control_ready
        self.run = getattr(b, "run", None)   # the whole loop in Cython (BatchIO only)
        self.watch_control = b.watch_control

    def set_flood_classes(self, classes):
        """The datapath's flood_classes() (D41), for every worker."""
        for b in self.bs:
            b.set_flood_classes(classes)

    @property
    def rx_errors(self):
        """Failed reads per port: worker 0's array (live) with one worker, else the sum."""
        return self.b.rx_errors if len(self.bs) == 1 else sum(b.rx_errors for b in self.bs)

    @property
    def tx_errors(self):
        """Failed writes per port: worker 0's array (live) with one worker, else the sum."""
        return self.b.tx_errors if len(self.bs) == 1 else sum(b.tx_errors for b in self.bs)

    LOOP_STATS = ("batches", "frames", "sleeps", "polls", "poll_hits", "poll_ns", "bulk", "drained")

    def loop_stats(self) -> dict:
        """Counters of ``run``, summed over the workers (zero for the Python twin, which has
        no ``run``); with workers, ``workers``: each one's, and the lock's contention."""
        per = [{k: int(getattr(b, "loop_" + k, 0)) for k in self.LOOP_STATS} for b in self.bs]
        out = {k: sum(p[k] for p in per) for k in self.LOOP_STATS}
        if self.lock is not None:
            out["workers"] = per
            out["dp_sections"] = int(self.lock.dp_sections)
            out["dp_waits"] = int(self.lock.dp_waits)
        return out

    @property
    def n_failed(self) -> int:
        return self.b.n_failed

    @property
    def control_ready(self) -> bool:
        return self.b.control_ready

    def set_port(self, port: Port | None, port_id: int):
        """Add (and poll) a port's fd, or (None) forget the port's fd and stop polling it.
        With workers: worker k gets the port's queue k (``Port.worker_fd``) and polls it if
        it is its own; a port without that queue is written by worker k on fd 0 and read by
        worker 0 only. The caller holds the workers' lock exclusive."""
        for k, b in enumerate(self.bs):
            if port is None:
                fd = int(b.port_fds[port_id])
                if fd >= 0:
                    b.unwatch(fd)
                b.port_fds[port_id] = -1
            else:
                fd, own = port.worker_fd(k)
                b.port_fds[port_id] = fd
                b.port_hdr_lens[port_id] = port.hdr_len
                b.rx_errors[port_id] = 0
                b.tx_errors[port_id] = 0
                if own:
                    b.watch(fd, port_id)


class PortTable:
    """The daemon's ports with an fd: by switch port name, and by id while polled.

    ``add`` starts polling a port's fd (``PacketIO.set_port``); ``drop`` stops it, forgets
    the port and calls ``on_drop(port_id)`` (the daemon closes that port's capture). A
    port whose fd failed (``failed``) is no longer polled but stays known by name until
    detach closes it.
    """

    def __init__(self, io: PacketIO, on_drop=lambda port_id: None):
        self.io = io
        self.on_drop = on_drop
        self.by_name: dict[str, Port] = {}
        self.polled: dict[int, Port] = {}

    def get(self, name: str) -> Port | None:
        return self.by_name.get(name)

    def add(self, port: Port):
        self.by_name[port.name] = port
        self.polled[port.port_id] = port
        self.io.set_port(port, port.port_id)

    def drop(self, port: Port):
        if self.polled.get(port.port_id) is port:
            del self.polled[port.port_id]
            self.io.set_port(None, port.port_id)
        port.close_queues()             # the workers' queues: no worker has them any more
        self.by_name.pop(port.name, None)
        self.on_drop(port.port_id)

    def failed(self, port: Port):
        self.drop(port)
        self.by_name[port.name] = port

    def close_taps(self):
        """Close every pod TAP's fd (persistent: the pods keep their interfaces)."""
        for p in list(self.by_name.values()):
            if isinstance(p, TapPort):
                p.close()
