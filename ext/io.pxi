# Packet I/O of vswitchd: batch reads from ready TAP / AF_PACKET fds into the datapath's
# buffer layout, and batch writes of a processed batch, both without the GIL.
#
# Theory of operation
# -------------------
# The datapath sees every packet as a 12-byte virtio-net header followed by the Ethernet
# frame (docs/datapath.md, vnet_hdr_len=12). A TAP opened with IFF_VNET_HDR and
# TUNSETVNETHDRSZ 12 reads and writes exactly that, so one read()/write() per frame.
# An AF_PACKET socket with PACKET_VNET_HDR uses the 10-byte header (no num_buffers): it is
# read with readv() into two pieces, the 10 header bytes at the slot start and the frame
# 12 bytes after it (the last two header bytes, num_buffers, are zeroed), and written with
# writev() of the same two pieces. `hdr_len` per fd / per port says which (12 or 10).
#
# Reads fill slots one after another from buffer index 0: slot = header, frame, padding to
# 8 bytes. A read is attempted only while a maximal frame still fits, so a short buffer
# never truncates a frame; each fd gives at most `per_fd_max` frames per batch (fairness),
# and EAGAIN moves on to the next fd. Writes go to `port_fds[out]` for a port id, or to
# every port with an fd except the ingress one for OUT_FLOOD; OUT_DROP / OUT_QUEUED and
# ports without an fd (-1) are skipped. A failed write is counted in `tx_errors[port]`
# (a pod whose link is down, a full socket buffer) and never stops the batch.

from posix.uio cimport iovec, readv, writev
from posix.unistd cimport read as _io_read, write as _io_write
from libc.errno cimport errno as _io_errno, EAGAIN as _IO_EAGAIN, EINTR as _IO_EINTR

cdef enum:
    IO_HDR = 12                       # virtio_net_hdr_mrg_rxbuf, the datapath's layout
    IO_MAX_FRAME = 65535 + 14 + 4     # MAX_FRAME of dpconst
    IO_SLOT_MAX = IO_HDR + IO_MAX_FRAME


cdef inline Py_ssize_t _io_read_one(int fd, int hdr_len, unsigned char *slot) noexcept nogil:
    """One frame into `slot` (header at slot, frame at slot+12); bytes read incl. header, or -errno."""
    cdef Py_ssize_t r
    cdef iovec iov[2]
    while True:
        if hdr_len == IO_HDR:
            r = _io_read(fd, slot, IO_SLOT_MAX)
        else:
            iov[0].iov_base = slot
            iov[0].iov_len = hdr_len
            iov[1].iov_base = slot + IO_HDR
            iov[1].iov_len = IO_MAX_FRAME
            r = readv(fd, iov, 2)
        if r >= 0:
            return r
        if _io_errno != _IO_EINTR:
            return -_io_errno


cdef inline int _io_write_one(int fd, int hdr_len, unsigned char *frame, Py_ssize_t length) noexcept nogil:
    """Write one frame whose 12-byte header precedes `frame`; 0 or errno."""
    cdef Py_ssize_t r
    cdef iovec iov[2]
    while True:
        if hdr_len == IO_HDR:
            r = _io_write(fd, frame - IO_HDR, length + IO_HDR)
        else:
            iov[0].iov_base = frame - IO_HDR
            iov[0].iov_len = hdr_len
            iov[1].iov_base = frame
            iov[1].iov_len = length
            r = writev(fd, iov, 2)
        if r >= 0:
            return 0
        if _io_errno != _IO_EINTR:
            return _io_errno


def io_read_batch(const int[:] fds, const unsigned short[:] fd_ports, const unsigned char[:] fd_hdr_lens,
                  int nfds, unsigned char[:] buf, unsigned int[:] offsets, unsigned int[:] lengths,
                  unsigned short[:] in_ports, int max_pkts, int per_fd_max,
                  unsigned long long[:] rx_errors):
    """Read up to `max_pkts` frames from the `nfds` fds; returns how many were read.

    fds[j] belongs to port fd_ports[j] and has a fd_hdr_lens[j]-byte vnet header (12 or
    10). Fills offsets (frame start), lengths (frame length) and in_ports from index 0.
    A read error other than EAGAIN counts in rx_errors[port] and moves on.
    """
    if nfds > fds.shape[0] or nfds > fd_ports.shape[0] or nfds > fd_hdr_lens.shape[0]:
        raise ValueError(f"nfds={nfds} exceeds the fd arrays ({fds.shape[0]})")
    if max_pkts > offsets.shape[0] or max_pkts > lengths.shape[0] or max_pkts > in_ports.shape[0]:
        raise ValueError(f"max_pkts={max_pkts} exceeds the packet arrays ({offsets.shape[0]})")
    if buf.shape[0] < IO_SLOT_MAX:
        raise ValueError(f"buffer of {buf.shape[0]} bytes is smaller than one slot ({IO_SLOT_MAX})")
    cdef Py_ssize_t buflen = buf.shape[0]
    cdef unsigned char *base = &buf[0]
    cdef Py_ssize_t pos = 0, r
    cdef int n = 0, j, k, hdr, port
    cdef Py_ssize_t nerr = rx_errors.shape[0]
    with nogil:
        for j in range(nfds):
            hdr = fd_hdr_lens[j]
            port = fd_ports[j]
            for k in range(per_fd_max):
                if n >= max_pkts or pos + IO_SLOT_MAX > buflen:
                    break
                r = _io_read_one(fds[j], hdr, base + pos)
                if r < 0:
                    if r != -_IO_EAGAIN and port < nerr:
                        rx_errors[port] += 1
                    break
                if r < hdr:             # no header: nothing usable
                    if port < nerr:
                        rx_errors[port] += 1
                    continue
                if hdr != IO_HDR:
                    base[pos + hdr] = 0     # num_buffers, absent in the 10-byte header
                    base[pos + hdr + 1] = 0
                offsets[n] = <unsigned int>(pos + IO_HDR)
                lengths[n] = <unsigned int>(r - hdr)
                in_ports[n] = <unsigned short>port
                pos += (IO_HDR + (r - hdr) + 7) & ~(<Py_ssize_t>7)
                n += 1
            if n >= max_pkts or pos + IO_SLOT_MAX > buflen:
                break
    return n


def io_write_batch(unsigned char[:] buf, const unsigned int[:] offsets, const unsigned int[:] lengths,
                   const unsigned short[:] in_ports, const int[:] out_ports, int n,
                   const int[:] port_fds, const unsigned char[:] port_hdr_lens,
                   unsigned long long[:] tx_errors):
    """Write the `n` outputs of a batch; returns the number of frames written.

    out_ports[i] >= 0: to that port; -1 (OUT_FLOOD): to every port with an fd except
    in_ports[i]; anything else is skipped. port_fds[p] is -1 for a port without an fd.
    """
    if n > offsets.shape[0] or n > lengths.shape[0] or n > in_ports.shape[0] or n > out_ports.shape[0]:
        raise ValueError(f"n={n} exceeds the packet arrays ({offsets.shape[0]})")
    if port_hdr_lens.shape[0] < port_fds.shape[0] or tx_errors.shape[0] < port_fds.shape[0]:
        raise ValueError("port_hdr_lens and tx_errors must be as long as port_fds")
    cdef unsigned char *base = &buf[0]
    cdef Py_ssize_t buflen = buf.shape[0]
    cdef int nports = port_fds.shape[0]
    cdef int i, p, out, fd, err, written = 0
    cdef Py_ssize_t off, length
    with nogil:
        for i in range(n):
            out = out_ports[i]
            off = offsets[i]
            length = lengths[i]
            if off < IO_HDR or off + length > buflen:
                continue                # never write outside the buffer
            if out >= 0:
                if out < nports:
                    fd = port_fds[out]
                    if fd >= 0:
                        err = _io_write_one(fd, port_hdr_lens[out], base + off, length)
                        if err:
                            tx_errors[out] += 1
                        else:
                            written += 1
            elif out == -1:
                for p in range(nports):
                    fd = port_fds[p]
                    if fd < 0 or p == in_ports[i]:
                        continue
                    err = _io_write_one(fd, port_hdr_lens[p], base + off, length)
                    if err:
                        tx_errors[p] += 1
                    else:
                        written += 1
    return written
