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
# Reads fill slots one after another from buffer index 0: slot = ENCAP_HEADROOM (64) free
# bytes (where the core writes VXLAN's outer headers and moves the vnet header,
# docs/datapath.md "VXLAN"), header, frame, padding to 8 bytes; so offsets[0] = 76 and each
# header is 8-byte aligned. A read is attempted only while a maximal frame still fits, so a short buffer
# never truncates a frame; each fd gives at most `per_fd_max` frames per batch (fairness),
# and EAGAIN moves on to the next fd. Writes go to `port_fds[out]` for a port id, or to
# every port with an fd except the ingress one whose flood class (`port_flood`, the
# datapath's flood_classes() once `set_flood_classes` gave it: docs/datapath.md D41) has
# FLOOD_MEMBER for OUT_FLOOD, FLOOD_UNKNOWN_MEMBER for OUT_FLOOD_UNKNOWN (host and uplink
# only: unknown unicast never reaches a pod); OUT_DROP / OUT_QUEUED and
# ports without an fd (-1) are skipped. A failed write is counted in `tx_errors[port]`
# (a pod whose link is down, a full socket buffer) and never stops the batch. A frame whose
# vnet header has gso_type & VNET_GSO_UDP_TUNNEL_IPV4 (a TSO frame the core encapsulated) is
# written to an AF_PACKET port as UDP GSO packets of up to 64 ready wire segments, one
# sendmsg each ("UDP GSO" below, D54), or (--tunnel-gso segments, a 12-byte-header port, a
# kernel that refuses UDP GSO) as its wire segments, each an iovec triple (vnet header,
# rebuilt headers, payload slice) without copying the payload, up to 64 of them per sendmmsg
# ("tunnel GSO" below, spec vswitch/datapath/gso.py); one it cannot segment is a tx error,
# nothing written. A UDP GSO frame read from an AF_PACKET port is cut into its datagrams
# in the read slots (D54).
#
# `BatchIO.poll(timeout_ms)` is the daemon's whole wait-and-read step in one call without
# the GIL: BatchIO owns an epoll instance holding every port fd (`watch`, the event's
# data is port id + 1) and one "control" fd (`watch_control`, data 0: the daemon's own
# epoll of sockets, timers and the kernel thread's eventfd). It waits, reads a batch from
# the ports that are readable, and leaves in `failed[:n_failed]` the ports whose fd
# reported an error or hang-up without data (a TAP whose device was deleted), and in
# `control_ready` whether the control fd is readable. Python then runs once per wakeup,
# not once per ready fd.
#
# `BatchIO.run(dp, deadline_ns, poll_ns)` is the daemon's whole packet loop without the
# GIL: per round it reads CLOCK_MONOTONIC, drains the datapath's due shaping queues into
# dbuf and writes them, waits (epoll_pwait2: ns timeout up to the deadline or the next
# departure), reads a batch, runs it through `process_batch_c` (the body of
# Datapath.process, same checks and state) and writes it. It returns only for Python's
# work: the control fd readable, a port failed, the deadline, a signal (EINTR). After a
# batch it polls (timeout 0, sched_yield between empty polls) for `poll_ns` before it
# blocks again: bounded polling per burst, none when idle. `loop_*` count what it did.
#
# Adaptive window: the window after a batch is `poll_ns`, widened to 1.25 × the longest gap
# between two batches that fell in (poll_ns, poll_max_ns] within the last second (at most
# `poll_max_ns`, default 4 × poll_ns). A pod's answer to a frame we wrote arrives inside the
# write itself, but an answer from another node (VXLAN: the peer daemon wakes, forwards,
# the pod answers, the peer sends it back) takes 100-200 µs; with a fixed 100 µs window it
# came just after we slept and paid a wakeup (issue 13). Traffic without such gaps (a TCP
# stream, a ping every 5 ms between local pods) keeps the window at poll_ns.
#
# Bulk batches (opt-in, vswitchd --poll-bulk-kib): a batch whose frames from or to an
# AF_PACKET port (the uplink: `port_hdr_lens` 10) add up to at least `poll_bulk_bytes` is a
# stream across the wire: after it the loop blocks at once (a frame already waiting makes
# the wait return at once, so nothing is delayed), and the adaptive window does not see it
# (gaps are measured between the other batches). Whether that pays depends on who needs
# the cores the window spins on: between two vswitch nodes on 2 vCPUs (two daemons, two
# iperf3) one TCP stream went from 8.12 / 8.68 to 8.88 / 9.07 Gbit/s with 32 KiB; a
# hostPort stream to a client on the uplink (one daemon) went from 20.2 / 20.6 to 17.4 / 17.6.
# So it is off by default (docs/daemon.md "--poll-us").
#
# First frame first: the first read after an empty poll (so after idle: a blocking wait
# follows one) takes one frame per ready fd (no second read() that ends in EAGAIN before
# the frame is forwarded), so a lone frame (a request after idle) goes out one syscall
# sooner; the frames behind it are read by the next, non-blocking wait (level-triggered
# epoll reports the fd again), in full batches while traffic lasts. Without polling
# (poll_ns 0, where a wait right after a batch may find more) every read is a full one.
#
# Loop trace (`trace_start`, docs/daemon.md "Where a ping's microseconds go"): each step of
# run() (blocking wait, wakeup, read, datapath, write) with its CLOCK_MONOTONIC time into a
# preallocated ring, for `python -m bench.ping_path`; off by default, one branch per step.
#
# Packet workers (vswitchd --workers N, docs/daemon.md "Packet workers"): N threads each
# run `run(dp, ..., lock=L)` on their own BatchIO (own buffers, own epoll of their own
# queue fds: one queue of each multi-queue TAP, one PACKET_FANOUT socket of the uplink) and
# one shared Datapath. The LoopLock L serializes what touches shared state: each round of a
# worker holds L's rwlock shared (read, process, write: the fd table and the tables cannot
# change under it) and L's mutex only around the datapath's table work (process_batch_c,
# next_departure_c + drain_c, with the clock read under the mutex so the datapath's time
# never goes backwards); the syscalls (reads, writes: the receivers' stacks run inside them)
# run in parallel. The daemon's control work (ports, rules, shapers, sweeps, counters) holds
# the rwlock exclusive (`with lock:`), writer-preferring, so it waits at most for the
# batches in flight. With `lock=None` run() is the single-threaded loop above, unchanged.
# `busy=True` polls without ever blocking (--busy-poll). A worker with `unwatch_failed`
# removes a failed fd from its own epoll itself (worker 0, the daemon's thread, returns
# RUN_FAILED as before and the daemon drops the port from every worker).

from posix.uio cimport iovec, readv, writev
from posix.unistd cimport read as _io_read, write as _io_write, close as _io_close
from libc.errno cimport errno as _io_errno, EAGAIN as _IO_EAGAIN, EINTR as _IO_EINTR, EINVAL

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events           # EPOLLIN, EPOLLERR, EPOLLHUP, ...
        epoll_data_t data         # u32: port id + 1, or 0 for the control fd
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from *:
    """
    #include <time.h>
    #include <errno.h>
    #include <sys/epoll.h>
    /* CLOCK_MONOTONIC in ns: the clock of time.monotonic_ns(), read through the vDSO. */
    static inline long long vsw_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }
    /* epoll_wait with a timeout in ns (-1: forever, 0: do not block): epoll_pwait2 where
       glibc and the kernel have it (5.11+), else epoll_wait in ms rounded up. */
    static int vsw_epoll_wait_ns(int epfd, struct epoll_event *evs, int max, long long timeout_ns) {
        if (timeout_ns <= 0)
            return epoll_wait(epfd, evs, max, timeout_ns < 0 ? -1 : 0);
        if (timeout_ns > 3600LL * 1000000000LL)
            timeout_ns = 3600LL * 1000000000LL;
    #if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
        static int no_pwait2 = 0;
        if (!no_pwait2) {
            struct timespec ts;
            int r;
            ts.tv_sec = timeout_ns / 1000000000LL;
            ts.tv_nsec = timeout_ns % 1000000000LL;
            r = epoll_pwait2(epfd, evs, max, &ts, NULL);
            if (r >= 0 || errno != ENOSYS)
                return r;
            no_pwait2 = 1;
        }
    #endif
        return epoll_wait(epfd, evs, max, (int)((timeout_ns + 999999LL) / 1000000LL));
    }
    """
    long long vsw_now_ns() noexcept nogil

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_rwlockattr_init(pthread_rwlockattr_t *attr)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t *attr, int pref)
    int pthread_rwlockattr_destroy(pthread_rwlockattr_t *attr)
    int pthread_rwlock_init(pthread_rwlock_t *rw, const pthread_rwlockattr_t *attr)
    int pthread_rwlock_destroy(pthread_rwlock_t *rw)
    int pthread_rwlock_rdlock(pthread_rwlock_t *rw)
    int pthread_rwlock_wrlock(pthread_rwlock_t *rw)
    int pthread_rwlock_unlock(pthread_rwlock_t *rw)
    int pthread_mutex_init(pthread_mutex_t *mu, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mu)
    int pthread_mutex_lock(pthread_mutex_t *mu)
    int pthread_mutex_trylock(pthread_mutex_t *mu)
    int pthread_mutex_unlock(pthread_mutex_t *mu)
    enum:
        PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP

cdef extern from "<sched.h>" nogil:
    int sched_yield()
    int vsw_epoll_wait_ns(int epfd, epoll_event *evs, int maxevents, long long timeout_ns) noexcept nogil

cdef enum:
    RUN_CONTROL = 1                   # BatchIO.run returned: the control fd is readable
    RUN_FAILED = 2                    # ... a port fd reported an error or hang-up
    RUN_DEADLINE = 4                  # ... the deadline passed
    RUN_SIGNAL = 8                    # ... epoll_wait was interrupted by a signal (EINTR)
    RUN_ERROR = 16                    # ... epoll_wait failed (errno in run_errno)

cdef long long RUN_BUSY_UNTIL = 1LL << 62     # poll_until of busy polling: never reached

cdef enum:
    IO_HDR = 12                       # virtio_net_hdr_mrg_rxbuf, the datapath's layout
    IO_SLOT_MAX = IO_HDR + C_MAX_FRAME
    IO_SLOT_SPAN = C_ENCAP_HEADROOM + IO_SLOT_MAX    # a read slot: headroom, header, frame


# ---------------------------------------------------------------- tunnel GSO (VXLAN TSO frames)
# The C twin of vswitch/datapath/gso.py (its docstring is the theory of operation): a frame
# whose vnet header has gso_type & VNET_GSO_UDP_TUNNEL_IPV4 is written as its wire-size
# segments, each with writev(own vnet header, rebuilt headers, payload slice of the buffer).

cdef enum:
    GSO_MIN_SIZE = 48                 # gso.GSO_MIN_SIZE
    GSO_MAX_HDR_BYTES = 512           # gso.GSO_MAX_HDR_BYTES: the rebuilt headers' buffer
    GSO_SEND_BATCH = 64               # segments per sendmmsg: a 64 KiB frame in one call (~40 KiB of stack)
    GSO_TCPV4 = 1
    GSO_TCPV6 = 4
    GSO_ECN = 0x80

cdef struct GsoLayout:
    Py_ssize_t udp                    # outer UDP header offset (from the outer frame start)
    Py_ssize_t il3                    # inner IP header offset
    Py_ssize_t l4                     # inner TCP header offset = each segment's csum_start
    Py_ssize_t hdr_end                # end of the inner TCP header: the headers every segment repeats
    Py_ssize_t length                 # the whole frame's length
    int v6                            # inner IPv6
    int gso_size                      # payload bytes per segment (the last may be shorter)
    int segs                          # number of segments


cdef int _gso_layout(const uint8_t *vh, Py_ssize_t vh_len, const uint8_t *f, Py_ssize_t n,
                     GsoLayout *g) noexcept nogil:
    """gso.layout(): 0, or the index of the reason in gso.GSO_ERRORS."""
    cdef int gso_type, inner_type, nh, i, frag
    cdef Py_ssize_t il3, l4, ie, payload
    if vh_len < 10:
        return 1
    gso_type = vh[1]
    if not gso_type & C_VNET_GSO_UDP_TUNNEL_IPV4:
        return 2
    inner_type = gso_type & ~(C_VNET_GSO_UDP_TUNNEL_IPV4 | GSO_ECN)
    if inner_type != GSO_TCPV4 and inner_type != GSO_TCPV6:
        return 3
    g.gso_size = vh[4] | (vh[5] << 8)
    if g.gso_size < GSO_MIN_SIZE:
        return 4
    if n < 14 + 20 or f[12] != 0x08 or f[13] != 0x00 or (f[14] >> 4) != 4 or (f[14] & 15) < 5:
        return 5
    g.udp = 14 + (f[14] & 15) * 4
    if f[14 + 9] != 17 or g.udp + 8 + 8 + 14 > n:
        return 5
    ie = g.udp + 16
    il3 = ie + 14
    g.v6 = inner_type == GSO_TCPV6
    if g.v6:
        if f[ie + 12] != 0x86 or f[ie + 13] != 0xDD:
            return 6
        if il3 + 40 > n or (f[il3] >> 4) != 6:
            return 7
        nh = f[il3 + 6]
        l4 = il3 + 40
        for i in range(C_MAX_IPV6_EXT_HEADERS):
            if nh != 0 and nh != 43 and nh != 60:
                break
            if l4 + 8 > n:
                return 7
            nh = f[l4]
            l4 += (<Py_ssize_t>f[l4 + 1] + 1) * 8
        if nh != 6:
            return 7
    else:
        if f[ie + 12] != 0x08 or f[ie + 13] != 0x00:
            return 6
        if il3 + 20 > n or (f[il3] >> 4) != 4 or (f[il3] & 15) < 5:
            return 7
        l4 = il3 + (f[il3] & 15) * 4
        frag = ((f[il3 + 6] << 8) | f[il3 + 7]) & 0x3FFF
        if l4 > n or f[il3 + 9] != 6 or frag:
            return 7
    if l4 + 20 > n or (f[l4 + 12] >> 4) < 5:
        return 8
    g.hdr_end = l4 + (f[l4 + 12] >> 4) * 4
    if g.hdr_end > n:
        return 8
    if g.hdr_end > GSO_MAX_HDR_BYTES:
        return 9
    payload = n - g.hdr_end
    g.segs = <int>((payload + g.gso_size - 1) // g.gso_size) if payload > 0 else 1
    if g.hdr_end + (payload if payload < g.gso_size else g.gso_size) - 14 > 65535:
        return 10
    g.il3 = il3
    g.l4 = l4
    g.length = n
    return 0


cdef inline uint32_t _gso_sum16(const uint8_t *p, Py_ssize_t n, uint32_t s) noexcept nogil:
    """One's complement sum (unfolded) of n (even) bytes as big-endian words, added to s."""
    cdef Py_ssize_t i
    for i in range(0, n, 2):
        s += (<uint32_t>p[i] << 8) | p[i + 1]
    return s


cdef inline uint16_t _gso_fold(uint32_t s) noexcept nogil:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return <uint16_t>s


cdef Py_ssize_t _gso_segment_headers(const uint8_t *f, const GsoLayout *g, int k, uint8_t *h,
                                     uint8_t *vh) noexcept nogil:
    """Segment k's headers into h (which holds a copy of f[:hdr_end]; every field written
    here is rewritten from f for each k) and its 12-byte vnet header into vh; returns the
    segment's payload length (its payload is f[hdr_end + k*gso_size:][:that])."""
    cdef Py_ssize_t start = g.hdr_end + <Py_ssize_t>k * g.gso_size
    cdef Py_ssize_t plen = g.length - start
    cdef Py_ssize_t seg_len, udp = g.udp, il3 = g.il3, l4 = g.l4
    cdef uint32_t s
    cdef int flags
    if plen > g.gso_size:
        plen = g.gso_size
    seg_len = g.hdr_end + plen
    store_be16(h + 16, <uint16_t>(seg_len - 14))
    store_be16(h + 18, <uint16_t>(load_be16(f + 18) + k))
    h[24] = 0
    h[25] = 0
    store_be16(h + 24, <uint16_t>(~_gso_fold(_gso_sum16(h + 14, udp - 14, 0)) & 0xFFFF))
    store_be16(h + udp + 4, <uint16_t>(seg_len - udp))
    h[udp + 6] = 0
    h[udp + 7] = 0
    if g.v6:
        store_be16(h + il3 + 4, <uint16_t>(seg_len - il3 - 40))
        s = _gso_sum16(h + il3 + 8, 32, <uint32_t>(seg_len - l4) + 6)
    else:
        store_be16(h + il3 + 2, <uint16_t>(seg_len - il3))
        store_be16(h + il3 + 4, <uint16_t>(load_be16(f + il3 + 4) + k))
        h[il3 + 10] = 0
        h[il3 + 11] = 0
        store_be16(h + il3 + 10, <uint16_t>(~_gso_fold(_gso_sum16(h + il3, l4 - il3, 0)) & 0xFFFF))
        s = _gso_sum16(h + il3 + 12, 8, <uint32_t>(seg_len - l4) + 6)
    cdef uint32_t seq = load_be32(f + l4 + 4) + <uint32_t>k * <uint32_t>g.gso_size
    h[l4 + 4] = <uint8_t>(seq >> 24)
    h[l4 + 5] = <uint8_t>(seq >> 16)
    h[l4 + 6] = <uint8_t>(seq >> 8)
    h[l4 + 7] = <uint8_t>seq
    flags = f[l4 + 13]
    if k > 0:
        flags &= ~0x80                # CWR: the first segment only
    if k < g.segs - 1:
        flags &= ~0x09                # FIN, PSH: the last segment only
    h[l4 + 13] = <uint8_t>flags
    store_be16(h + l4 + 16, _gso_fold(s))
    memset(vh, 0, IO_HDR)
    vh[0] = C_VNET_F_NEEDS_CSUM
    vh[6] = <uint8_t>l4
    vh[7] = <uint8_t>(l4 >> 8)
    vh[8] = 16
    return plen


cdef extern from "<sys/socket.h>" nogil:
    cdef struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    Py_ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    Py_ssize_t recv(int fd, void *buf, size_t n, int flags)
    enum:
        MSG_PEEK
        MSG_DONTWAIT

cdef extern from "<errno.h>" nogil:
    enum:
        ENOTSOCK


cdef int _io_write_tunnel_gso(int fd, int hdr_len, const uint8_t *frame, Py_ssize_t length) noexcept nogil:
    """Write a tunnel GSO frame (its 12-byte header precedes `frame`) as its segments; 0 or
    errno (EINVAL: not segmentable, nothing written; a failed write stops the frame).
    Segments go GSO_SEND_BATCH at a time in one sendmmsg (the uplink is a socket); an fd
    that is no socket (ENOTSOCK before anything was sent) gets them one writev each."""
    cdef GsoLayout g
    cdef uint8_t h[GSO_SEND_BATCH][GSO_MAX_HDR_BYTES]
    cdef uint8_t vh[GSO_SEND_BATCH][IO_HDR]
    cdef iovec iov[GSO_SEND_BATCH][3]
    cdef mmsghdr msgs[GSO_SEND_BATCH]
    cdef Py_ssize_t plen, r
    cdef int k, j, cnt, sent
    if _gso_layout(frame - IO_HDR, hdr_len, frame, length, &g) != 0:
        return EINVAL
    memset(msgs, 0, sizeof(msgs))
    k = 0
    while k < g.segs:
        cnt = g.segs - k
        if cnt > GSO_SEND_BATCH:
            cnt = GSO_SEND_BATCH
        for j in range(cnt):
            memcpy(h[j], frame, g.hdr_end)
            plen = _gso_segment_headers(frame, &g, k + j, h[j], vh[j])
            iov[j][0].iov_base = vh[j]
            iov[j][0].iov_len = hdr_len
            iov[j][1].iov_base = h[j]
            iov[j][1].iov_len = g.hdr_end
            iov[j][2].iov_base = <void *>(frame + g.hdr_end + <Py_ssize_t>(k + j) * g.gso_size)
            iov[j][2].iov_len = plen
            msgs[j].msg_hdr.msg_iov = iov[j]
            msgs[j].msg_hdr.msg_iovlen = 3 if plen > 0 else 2
        sent = 0
        while sent < cnt:
            r = sendmmsg(fd, msgs + sent, cnt - sent, 0)
            if r > 0:
                sent += <int>r
                continue
            if r == 0:
                return _IO_EAGAIN
            if _io_errno == _IO_EINTR:
                continue
            if _io_errno == ENOTSOCK:              # not a socket: one writev per segment
                for j in range(sent, cnt):
                    while True:
                        r = writev(fd, iov[j], <int>msgs[j].msg_hdr.msg_iovlen)
                        if r >= 0:
                            break
                        if _io_errno != _IO_EINTR:
                            return _io_errno
                break
            return _io_errno
        k += cnt
    return 0


# ---------------------------------------------------------------- UDP GSO (D54)
# The C twin of gso.pack_udp_gso / split_udp_gso (their comment is the theory): a tunnel GSO
# frame leaves an AF_PACKET port (10-byte header) as UDP GSO packets of up to
# UDP_GSO_MAX_SEGS ready segments each (inner TCP checksums completed here, the outer UDP one
# left to the kernel), one sendmsg per packet; a UDP GSO frame read whole from an AF_PACKET
# port is cut into its datagrams in the read slots (_io_split_udp_gso). `_io_udp_gso` is the
# process-wide switch (set_tunnel_gso): 0 keeps D51's one write per segment; a kernel that
# refuses the UDP_L4 gso_type (EINVAL on the first packet) turns it off for good.

cdef enum:
    IO_GSO_UDP_L4 = C_VNET_GSO_UDP_L4
    UDP_GSO_MAX_SEGS = C_UDP_GSO_MAX_SEGS
    IO_USO_REFUSED = -1               # _io_write_udp_gso: the kernel refused the gso_type
    IO_SPLIT_SLOT_EXTRA = C_UDP_GSO_SPLIT_SLOT_EXTRA

cdef int _io_udp_gso = 1


cdef inline uint32_t _csum_be(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """The one's complement sum of n bytes as big-endian 16-bit words (an odd last byte
    padded with zero), folded to 16 bits. Sums native 32-bit words in four 64-bit
    accumulators (RFC 1071: the sum is byte-order independent; the folded result is
    stored natively and read back big-endian)."""
    cdef uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0
    cdef uint32_t w0, w1, w2, w3
    cdef uint16_t w16
    cdef uint8_t tail[2]
    cdef Py_ssize_t i = 0
    while i + 16 <= n:
        memcpy(&w0, p + i, 4)
        memcpy(&w1, p + i + 4, 4)
        memcpy(&w2, p + i + 8, 4)
        memcpy(&w3, p + i + 12, 4)
        a0 += w0
        a1 += w1
        a2 += w2
        a3 += w3
        i += 16
    a0 += a1 + a2 + a3
    while i + 4 <= n:
        memcpy(&w0, p + i, 4)
        a0 += w0
        i += 4
    if i + 2 <= n:
        memcpy(&w16, p + i, 2)
        a0 += w16
        i += 2
    if i < n:
        tail[0] = p[i]
        tail[1] = 0
        memcpy(&w16, tail, 2)
        a0 += w16
    a0 = <uint64_t><uint32_t>a0 + (a0 >> 32)
    a0 = <uint64_t><uint32_t>a0 + (a0 >> 32)
    a0 = (a0 & 0xFFFF) + (a0 >> 16)
    a0 = (a0 & 0xFFFF) + (a0 >> 16)
    w16 = <uint16_t>a0
    memcpy(tail, &w16, 2)
    return (<uint32_t>tail[0] << 8) | tail[1]


cdef inline void _io_ipv4_csum(uint8_t *ip, Py_ssize_t ihl_bytes) noexcept nogil:
    ip[10] = 0
    ip[11] = 0
    store_be16(ip + 10, <uint16_t>(~_gso_fold(_gso_sum16(ip, ihl_bytes, 0)) & 0xFFFF))


cdef inline uint16_t _io_udp4_pseudo(const uint8_t *f, Py_ssize_t udp_len) noexcept nogil:
    """gso._udp_pseudo: the IPv4 UDP pseudo-header sum (folded) of frame f for a UDP length."""
    return _gso_fold(_gso_sum16(f + 26, 8, <uint32_t>(17 + udp_len)))


cdef Py_ssize_t _udp_gso_packet(const uint8_t *frame, const GsoLayout *g, int k, int cnt,
                                uint8_t (*h)[GSO_MAX_HDR_BYTES], uint8_t *oh, uint8_t *vh,
                                iovec *iov) noexcept nogil:
    """gso.pack_udp_gso's packet of segments k .. k+cnt-1: the segment headers into h[j], the
    packet's outer headers into oh and its 12-byte vnet header into vh, the iovecs from
    iov[1] (outer headers, then per segment its headers past the UDP header and its payload
    slice); returns the number of iovecs used from iov[1]."""
    cdef Py_ssize_t udp = g.udp, l4 = g.l4, inner = g.hdr_end - (g.udp + 8), plen, body = 0
    cdef uint8_t dummy[IO_HDR]
    cdef const uint8_t *payload
    cdef uint32_t s
    cdef int j
    for j in range(cnt):
        memcpy(h[j], frame, g.hdr_end)
        plen = _gso_segment_headers(frame, g, k + j, h[j], dummy)
        payload = frame + g.hdr_end + <Py_ssize_t>(k + j) * g.gso_size
        s = _gso_sum16(h[j] + l4, g.hdr_end - l4, 0) + _csum_be(payload, plen)
        store_be16(h[j] + l4 + 16, <uint16_t>(~_gso_fold(s) & 0xFFFF))
        iov[2 + 2 * j].iov_base = h[j] + udp + 8
        iov[2 + 2 * j].iov_len = inner
        iov[3 + 2 * j].iov_base = <void *>payload
        iov[3 + 2 * j].iov_len = plen
        body += inner + plen
    memcpy(oh, h[0], udp + 8)
    store_be16(oh + 16, <uint16_t>(udp - 14 + 8 + body))
    _io_ipv4_csum(oh + 14, udp - 14)
    store_be16(oh + udp + 4, <uint16_t>(8 + body))
    store_be16(oh + udp + 6, _io_udp4_pseudo(oh, 8 + body))
    iov[1].iov_base = oh
    iov[1].iov_len = udp + 8
    memset(vh, 0, IO_HDR)
    vh[0] = C_VNET_F_NEEDS_CSUM
    store_le16(vh + 2, <uint16_t>(udp + 8))
    if cnt > 1:
        vh[1] = IO_GSO_UDP_L4
        store_le16(vh + 4, <uint16_t>(inner + g.gso_size))
    store_le16(vh + 6, <uint16_t>udp)
    store_le16(vh + 8, 6)
    return 1 + 2 * cnt


cdef inline int _udp_gso_per_packet(const GsoLayout *g) noexcept nogil:
    cdef Py_ssize_t per = (65535 - (g.udp - 14) - 8) // (g.hdr_end - (g.udp + 8) + g.gso_size)
    if per > UDP_GSO_MAX_SEGS:
        per = UDP_GSO_MAX_SEGS
    return <int>per if per > 1 else 1


cdef int _io_write_udp_gso(int fd, int hdr_len, const uint8_t *frame, Py_ssize_t length) noexcept nogil:
    """Write a tunnel GSO frame as UDP GSO packets, one sendmsg each; 0, an errno (EINVAL:
    not segmentable, nothing written; a failed write stops the frame), or IO_USO_REFUSED
    (the first packet refused with EINVAL: nothing written)."""
    cdef GsoLayout g
    cdef uint8_t h[UDP_GSO_MAX_SEGS][GSO_MAX_HDR_BYTES]
    cdef uint8_t oh[GSO_MAX_HDR_BYTES]
    cdef uint8_t vh[IO_HDR]
    cdef iovec iov[2 + 2 * UDP_GSO_MAX_SEGS]
    cdef msghdr m
    cdef Py_ssize_t r
    cdef int k = 0, cnt, per
    if _gso_layout(frame - IO_HDR, hdr_len, frame, length, &g) != 0:
        return EINVAL
    per = _udp_gso_per_packet(&g)
    memset(&m, 0, sizeof(m))
    m.msg_iov = iov
    while k < g.segs:
        cnt = g.segs - k
        if cnt > per:
            cnt = per
        m.msg_iovlen = 1 + _udp_gso_packet(frame, &g, k, cnt, h, oh, vh, iov)
        iov[0].iov_base = vh
        iov[0].iov_len = hdr_len
        while True:
            r = sendmsg(fd, &m, 0)
            if r >= 0:
                break
            if _io_errno == _IO_EINTR:
                continue
            if _io_errno == EINVAL and k == 0 and cnt > 1:
                return IO_USO_REFUSED
            return _io_errno
        k += cnt
    return 0


cdef int _io_split_udp_gso(unsigned char *base, Py_ssize_t pos, Py_ssize_t length, Py_ssize_t buflen,
                           unsigned int *offsets, unsigned int *lengths, unsigned short *in_ports,
                           int room, unsigned short port) noexcept nogil:
    """Cut the UDP GSO frame read into the slot at `pos` (frame of `length` bytes at
    pos + ENCAP_HEADROOM + IO_HDR) into its datagrams (gso.split_udp_gso), each in a read
    slot of its own from `pos` on (D50's layout; the pieces move back to front, so nothing
    is overwritten before it moved); fills offsets/lengths/in_ports[:count]. Returns the
    count, or -1 (cannot be cut, more datagrams than `room` or than the buffer holds:
    nothing is taken)."""
    cdef unsigned char *vh0 = base + pos + C_ENCAP_HEADROOM
    cdef unsigned char *f0 = vh0 + IO_HDR
    cdef Py_ssize_t udp, gso, span, plen, dst
    cdef int segs, k, partial, dv
    cdef uint16_t ip_id
    cdef unsigned char *f
    cdef unsigned char *vh
    if length < 14 + 20 or f0[12] != 0x08 or f0[13] != 0x00 or (f0[14] >> 4) != 4 or (f0[14] & 15) < 5:
        return -1
    udp = 14 + (f0[14] & 15) * 4
    if f0[23] != 17 or (load_be16(f0 + 20) & 0x3FFF) or udp + 8 > length:
        return -1
    gso = le16(vh0 + 4)
    if gso == 0:
        return -1
    segs = <int>((length - udp - 8 + gso - 1) // gso) if length > udp + 8 else 1
    if segs > UDP_GSO_MAX_SEGS or segs > room:
        return -1
    span = (C_ENCAP_HEADROOM + IO_HDR + udp + 8 + gso + 7) & ~(<Py_ssize_t>7)
    if pos + <Py_ssize_t>(segs - 1) * span + C_ENCAP_HEADROOM + IO_HDR + udp + 8 + gso > buflen:
        return -1
    partial = vh0[0] & C_VNET_F_NEEDS_CSUM
    dv = vh0[0] & C_VNET_F_DATA_VALID
    ip_id = load_be16(f0 + 18)
    k = segs - 1
    while k >= 0:                      # back to front: segment 0 stays in place, fixed last
        plen = length - udp - 8 - <Py_ssize_t>k * gso
        if plen > gso:
            plen = gso
        if plen < 0:
            plen = 0
        dst = pos + <Py_ssize_t>k * span
        vh = base + dst + C_ENCAP_HEADROOM
        f = vh + IO_HDR
        if k > 0:
            memmove(f + udp + 8, f0 + udp + 8 + <Py_ssize_t>k * gso, plen)
            memcpy(f, f0, udp + 8)
        store_be16(f + 16, <uint16_t>(udp - 14 + 8 + plen))
        store_be16(f + 18, <uint16_t>(ip_id + k))
        _io_ipv4_csum(f + 14, udp - 14)
        store_be16(f + udp + 4, <uint16_t>(8 + plen))
        if partial:
            store_be16(f + udp + 6, _io_udp4_pseudo(f, 8 + plen))
            memset(vh, 0, IO_HDR)
            vh[0] = C_VNET_F_NEEDS_CSUM
            store_le16(vh + 6, <uint16_t>udp)
            store_le16(vh + 8, 6)
        else:
            f[udp + 6] = 0
            f[udp + 7] = 0
            memset(vh, 0, IO_HDR)
            vh[0] = <unsigned char>dv
        offsets[k] = <unsigned int>(dst + C_ENCAP_HEADROOM + IO_HDR)
        lengths[k] = <unsigned int>(udp + 8 + plen)
        in_ports[k] = port
        k -= 1
    return segs


def segment_vxlan(hdr, frame):
    """The C segmentation for tests (vswitch.datapath.gso.segment_vxlan is its spec):
    [(vnet header as long as hdr, wire frame)], or ValueError (gso.GSO_ERRORS)."""
    hb, fb = bytes(hdr), bytes(frame)
    cdef const uint8_t[::1] vhv = hb
    cdef const uint8_t[::1] fv = fb
    cdef GsoLayout g
    cdef uint8_t h[GSO_MAX_HDR_BYTES]
    cdef uint8_t vh[IO_HDR]
    cdef Py_ssize_t plen, start
    cdef int err, k
    if vhv.shape[0] < 10 or fv.shape[0] == 0:
        err = 1 if vhv.shape[0] < 10 else 5
    else:
        err = _gso_layout(&vhv[0], vhv.shape[0], &fv[0], fv.shape[0], &g)
    if err:
        from vswitch.datapath.gso import GSO_ERRORS
        raise ValueError(f"segment_vxlan: {GSO_ERRORS[err]}")
    out = []
    memcpy(h, &fv[0], g.hdr_end)
    for k in range(g.segs):
        plen = _gso_segment_headers(&fv[0], &g, k, h, vh)
        start = g.hdr_end + <Py_ssize_t>k * g.gso_size
        out.append(((<char *>vh)[:vhv.shape[0] if vhv.shape[0] < IO_HDR else IO_HDR],
                    (<char *>h)[:g.hdr_end] + fb[start:start + plen]))
    return out


def set_tunnel_gso(mode):
    """How tunnel GSO frames leave an AF_PACKET port, process-wide: "udp" (UDP GSO packets,
    D54) or "segments" (one write per segment, D51)."""
    global _io_udp_gso
    if mode not in ("udp", "segments"):
        raise ValueError(f"tunnel GSO mode {mode!r}; accepted: 'udp', 'segments'")
    _io_udp_gso = 1 if mode == "udp" else 0


def tunnel_gso():
    """The current mode: "udp", or "segments" (set so, or the kernel refused UDP GSO)."""
    return "udp" if _io_udp_gso else "segments"


def pack_udp_gso(hdr, frame):
    """The C packing for tests (vswitch.datapath.gso.pack_udp_gso is its spec): [(vnet header
    as long as hdr, packet)], or ValueError (gso.GSO_ERRORS)."""
    hb, fb = bytes(hdr), bytes(frame)
    cdef const uint8_t[::1] vhv = hb
    cdef const uint8_t[::1] fv = fb
    cdef GsoLayout g
    cdef uint8_t h[UDP_GSO_MAX_SEGS][GSO_MAX_HDR_BYTES]
    cdef uint8_t oh[GSO_MAX_HDR_BYTES]
    cdef uint8_t vh[IO_HDR]
    cdef iovec iov[2 + 2 * UDP_GSO_MAX_SEGS]
    cdef int err, k = 0, cnt, per, used, i
    if vhv.shape[0] < 10 or fv.shape[0] == 0:
        err = 1 if vhv.shape[0] < 10 else 5
    else:
        err = _gso_layout(&vhv[0], vhv.shape[0], &fv[0], fv.shape[0], &g)
    if err:
        from vswitch.datapath.gso import GSO_ERRORS
        raise ValueError(f"pack_udp_gso: {GSO_ERRORS[err]}")
    per = _udp_gso_per_packet(&g)
    out = []
    while k < g.segs:
        cnt = min(per, g.segs - k)
        used = _udp_gso_packet(&fv[0], &g, k, cnt, h, oh, vh, iov)
        packet = b"".join([(<char *>iov[1 + i].iov_base)[:iov[1 + i].iov_len] for i in range(used)])
        out.append(((<char *>vh)[:vhv.shape[0] if vhv.shape[0] < IO_HDR else IO_HDR], packet))
        k += cnt
    return out


def split_udp_gso(hdr, frame):
    """The C cut for tests (vswitch.datapath.gso.split_udp_gso is its spec): [(12-byte vnet
    header, frame)], or ValueError."""
    import numpy
    hb, fb = bytes(hdr), bytes(frame)
    if len(hb) < 10 or len(hb) > IO_HDR or hb[1] != IO_GSO_UDP_L4:
        raise ValueError("split_udp_gso: a 10..12-byte vnet header with gso_type UDP_L4 is needed")
    buf = numpy.zeros(UDP_GSO_MAX_SEGS * (IO_SPLIT_SLOT_EXTRA + len(fb)) + IO_SLOT_SPAN, numpy.uint8)
    buf[C_ENCAP_HEADROOM:C_ENCAP_HEADROOM + len(hb)] = numpy.frombuffer(hb, numpy.uint8)
    buf[C_ENCAP_HEADROOM + IO_HDR:C_ENCAP_HEADROOM + IO_HDR + len(fb)] = numpy.frombuffer(fb, numpy.uint8)
    cdef unsigned char[::1] b = buf
    cdef unsigned int offs[UDP_GSO_MAX_SEGS]
    cdef unsigned int lens[UDP_GSO_MAX_SEGS]
    cdef unsigned short ports[UDP_GSO_MAX_SEGS]
    cdef int n = _io_split_udp_gso(&b[0], 0, len(fb), b.shape[0], offs, lens, ports, UDP_GSO_MAX_SEGS, 0)
    if n < 0:
        raise ValueError("split_udp_gso: cannot be cut (see gso.SPLIT_ERRORS)")
    return [(bytes(buf[offs[i] - IO_HDR:offs[i]]), bytes(buf[offs[i]:offs[i] + lens[i]])) for i in range(n)]


# ---------------------------------------------------------------- receive coalescing
# The C twin of vswitch/datapath/gso.py's coalesce_info / coalesce_count / coalesced (its
# comment is the theory): a run of one TCP flow's frames to a TAP port goes out as one GSO
# frame, one writev(vnet header, merged headers, each frame's payload): no copy.

cdef enum:
    CO_MAX_FRAMES = 64                # gso.COALESCE_MAX_FRAMES
    CO_HDR_MAX = 54 + 60              # IPv6 + TCP with 40 bytes of options
    VNET_F_DATA_VALID = 2

cdef struct CoSeg:
    Py_ssize_t l4                     # TCP header offset (34 or 54)
    Py_ssize_t hend                   # end of the TCP header
    Py_ssize_t payload                # payload bytes
    uint32_t seq
    int v6
    int psh


cdef int _co_info(const uint8_t *f, Py_ssize_t n, CoSeg *s) noexcept nogil:
    """gso.coalesce_info: 1 when the frame (12-byte header before f) may be coalesced."""
    cdef const uint8_t *vh = f - IO_HDR
    cdef int doff
    if vh[1] != 0 or not (vh[0] & (C_VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID)) or n < 54:
        return 0
    if f[12] == 0x08 and f[13] == 0x00:
        if f[14] != 0x45 or f[23] != 6 or (((f[20] << 8) | f[21]) & 0x3FFF) or load_be16(f + 16) != n - 14:
            return 0
        s.l4 = 34
        s.v6 = 0
    elif f[12] == 0x86 and f[13] == 0xDD:
        if n < 74 or (f[14] >> 4) != 6 or f[20] != 6 or load_be16(f + 18) != n - 54:
            return 0
        s.l4 = 54
        s.v6 = 1
    else:
        return 0
    doff = f[s.l4 + 12] >> 4
    s.hend = s.l4 + doff * 4
    if doff < 5 or s.hend >= n or (f[s.l4 + 13] & ~0x08) != 0x10:
        return 0
    s.psh = f[s.l4 + 13] & 0x08
    s.payload = n - s.hend
    s.seq = load_be32(f + s.l4 + 4)
    return 1


cdef inline int _co_same(const uint8_t *a, const uint8_t *b, const CoSeg *s) noexcept nogil:
    """gso._flow_bytes(a) == gso._flow_bytes(b) for frames of the layout s."""
    cdef Py_ssize_t l4 = s.l4
    if s.v6:
        if memcmp(a, b, 18) or memcmp(a + 20, b + 20, l4 - 20):
            return 0
    elif memcmp(a, b, 16) or memcmp(a + 20, b + 20, 4) or memcmp(a + 26, b + 26, l4 - 26):
        return 0
    return not (memcmp(a + l4, b + l4, 4) or memcmp(a + l4 + 8, b + l4 + 8, 5)
                or memcmp(a + l4 + 14, b + l4 + 14, 2) or memcmp(a + l4 + 18, b + l4 + 18, s.hend - l4 - 18))


cdef int _io_write_coalesced(int fd, unsigned char *base, Py_ssize_t buflen, const unsigned int *offsets,
                             const unsigned int *lengths, const int *out_ports, int i, int n,
                             int *merged, int *err) noexcept nogil:
    """Entries i, i+1, ... of the batch (to out_ports[i]; dropped / queued entries skipped) of
    one TCP flow merged into one GSO frame and written with one writev. Returns the index
    after the run's last entry and sets *merged (frames in it) and *err (0 or errno); or
    returns i when fewer than 2 frames merge (nothing written)."""
    cdef CoSeg s0, sp, s
    cdef uint8_t h[CO_HDR_MAX]
    cdef uint8_t vh[IO_HDR]
    cdef iovec iov[2 + CO_MAX_FRAMES]
    cdef int j, m = 1, last = i, out = out_ports[i]
    cdef Py_ssize_t total, off, length, r, tcp_len
    cdef const uint8_t *f0 = base + offsets[i]
    cdef const uint8_t *f
    cdef uint32_t sum
    if not _co_info(f0, lengths[i], &s0) or s0.psh:
        return i
    total = s0.payload
    sp = s0
    iov[2].iov_base = <void *>(f0 + s0.hend)
    iov[2].iov_len = s0.payload
    j = i + 1
    while j < n and m < CO_MAX_FRAMES:
        if out_ports[j] == C_OUT_DROP or out_ports[j] == C_OUT_QUEUED:
            j += 1
            continue
        if out_ports[j] != out:
            break
        off = offsets[j]
        length = lengths[j]
        if off < IO_HDR or off + length > buflen:
            break
        f = base + off
        if (not _co_info(f, length, &s) or s.v6 != s0.v6 or s.hend != s0.hend or sp.payload != s0.payload
                or s.payload > s0.payload or s.seq != sp.seq + <uint32_t>sp.payload
                or s0.hend - 14 + total + s.payload > 65535 or not _co_same(f0, f, &s0)):
            break
        iov[2 + m].iov_base = <void *>(f + s.hend)
        iov[2 + m].iov_len = s.payload
        total += s.payload
        m += 1
        last = j
        sp = s
        j += 1
        if s.psh:
            break
    if m < 2:
        return i
    memcpy(h, f0, s0.hend)
    tcp_len = s0.hend - s0.l4 + total
    if s0.v6:
        store_be16(h + 18, <uint16_t>(s0.hend - 54 + total))
        sum = _gso_sum16(h + 22, 32, <uint32_t>tcp_len + 6)
    else:
        store_be16(h + 16, <uint16_t>(s0.hend - 14 + total))
        h[24] = 0
        h[25] = 0
        store_be16(h + 24, <uint16_t>(~_gso_fold(_gso_sum16(h + 14, 20, 0)) & 0xFFFF))
        sum = _gso_sum16(h + 26, 8, <uint32_t>tcp_len + 6)
    h[s0.l4 + 13] = <uint8_t>(0x10 | sp.psh)
    store_be16(h + s0.l4 + 16, _gso_fold(sum))
    memset(vh, 0, IO_HDR)
    vh[0] = C_VNET_F_NEEDS_CSUM
    vh[1] = GSO_TCPV6 if s0.v6 else GSO_TCPV4
    vh[2] = <uint8_t>s0.hend
    vh[4] = <uint8_t>s0.payload
    vh[5] = <uint8_t>(s0.payload >> 8)
    vh[6] = <uint8_t>s0.l4
    vh[8] = 16
    iov[0].iov_base = vh
    iov[0].iov_len = IO_HDR
    iov[1].iov_base = h
    iov[1].iov_len = s0.hend
    err[0] = 0
    while True:
        r = writev(fd, iov, 2 + m)
        if r >= 0:
            break
        if _io_errno != _IO_EINTR:
            err[0] = _io_errno
            break
    merged[0] = m
    return last + 1


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
            iov[1].iov_len = C_MAX_FRAME
            r = readv(fd, iov, 2)
        if r >= 0:
            return r
        if _io_errno != _IO_EINTR:
            return -_io_errno


cdef inline int _io_write_one(int fd, int hdr_len, unsigned char *frame, Py_ssize_t length) noexcept nogil:
    """Write one frame whose 12-byte header precedes `frame`; 0 or errno. A tunnel GSO
    frame (gso_type & VNET_GSO_UDP_TUNNEL_IPV4) is written as UDP GSO packets to an
    AF_PACKET port (D54), else as its segments (D51)."""
    global _io_udp_gso
    cdef Py_ssize_t r
    cdef iovec iov[2]
    cdef int err
    if frame[1 - IO_HDR] & C_VNET_GSO_UDP_TUNNEL_IPV4:
        if _io_udp_gso and hdr_len != IO_HDR:        # an AF_PACKET port: UDP GSO packets (D54)
            err = _io_write_udp_gso(fd, hdr_len, frame, length)
            if err != IO_USO_REFUSED:
                return err
            _io_udp_gso = 0                         # this kernel refuses them: D51 from now on
        return _io_write_tunnel_gso(fd, hdr_len, frame, length)
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


cdef int _io_read_all(const int *fds, const unsigned short *fd_ports, const unsigned char *fd_hdrs,
                      int nfds, unsigned char *base, Py_ssize_t buflen, unsigned int *offsets,
                      unsigned int *lengths, unsigned short *in_ports, int max_pkts, int per_fd_max,
                      unsigned long long *rx_errors, Py_ssize_t nerr) noexcept nogil:
    """The read loop of BatchIO.poll and run; returns the number of frames read."""
    cdef Py_ssize_t pos = 0, r
    cdef int n = 0, j, k, hdr, port, cut
    cdef unsigned char peek[2]
    for j in range(nfds):
        hdr = fd_hdrs[j]
        port = fd_ports[j]
        for k in range(per_fd_max):
            if n >= max_pkts or pos + IO_SLOT_SPAN > buflen:
                break
            if hdr != IO_HDR and n > 0 and (n + UDP_GSO_MAX_SEGS > max_pkts
                    or pos + IO_SLOT_SPAN + UDP_GSO_MAX_SEGS * IO_SPLIT_SLOT_EXTRA > buflen):
                # short of room for a cut of UDP_GSO_MAX_SEGS (D54): a UDP GSO frame waits for
                # the next batch (the fd stays readable), anything else is read
                r = recv(fds[j], peek, 2, MSG_PEEK | MSG_DONTWAIT)
                if r < 2 or peek[1] == IO_GSO_UDP_L4:
                    break
            r = _io_read_one(fds[j], hdr, base + pos + C_ENCAP_HEADROOM)
            if r < 0:
                if r != -_IO_EAGAIN and port < nerr:
                    rx_errors[port] += 1
                break
            if r < hdr:             # no header: nothing usable
                if port < nerr:
                    rx_errors[port] += 1
                continue
            if hdr != IO_HDR:
                base[pos + C_ENCAP_HEADROOM + hdr] = 0     # num_buffers, absent in the 10-byte header
                base[pos + C_ENCAP_HEADROOM + hdr + 1] = 0
                if base[pos + C_ENCAP_HEADROOM + 1] == IO_GSO_UDP_L4:   # D54: cut into its datagrams
                    cut = _io_split_udp_gso(base, pos, r - hdr, buflen, offsets + n, lengths + n,
                                            in_ports + n, max_pkts - n, <unsigned short>port)
                    if cut < 0:
                        if port < nerr:
                            rx_errors[port] += 1
                        continue
                    n += cut
                    pos = (offsets[n - 1] + lengths[n - 1] + 7) & ~(<Py_ssize_t>7)
                    continue
            offsets[n] = <unsigned int>(pos + C_ENCAP_HEADROOM + IO_HDR)
            lengths[n] = <unsigned int>(r - hdr)
            in_ports[n] = <unsigned short>port
            pos += (C_ENCAP_HEADROOM + IO_HDR + (r - hdr) + 7) & ~(<Py_ssize_t>7)
            n += 1
        if n >= max_pkts or pos + IO_SLOT_SPAN > buflen:
            break
    return n


cdef int _io_write_all(unsigned char *base, Py_ssize_t buflen, const unsigned int *offsets,
                       const unsigned int *lengths, const unsigned short *in_ports, const int *out_ports,
                       int n, const int *port_fds, const unsigned char *port_hdrs,
                       unsigned long long *tx_errors, int nports, const unsigned char *flood) noexcept nogil:
    """The write loop of BatchIO.write, write_drained and run; returns the number of frames written."""
    cdef int i = 0, p, out, fd, err, member, written = 0, nxt, merged
    cdef Py_ssize_t off, length
    while i < n:
        out = out_ports[i]
        off = offsets[i]
        length = lengths[i]
        i += 1
        if off < IO_HDR or off + length > buflen:
            continue                # never write outside the buffer
        if out >= 0:
            if out < nports:
                fd = port_fds[out]
                if fd >= 0 and port_hdrs[out] == IO_HDR:      # a TAP: coalesce a TCP run
                    nxt = _io_write_coalesced(fd, base, buflen, offsets, lengths, out_ports, i - 1, n,
                                              &merged, &err)
                    if nxt != i - 1:
                        if err:
                            tx_errors[out] += 1
                        else:
                            written += merged
                        i = nxt
                        continue
                if fd >= 0:
                    err = _io_write_one(fd, port_hdrs[out], base + off, length)
                    if err:
                        tx_errors[out] += 1
                    else:
                        written += 1
        elif out == C_OUT_FLOOD or out == C_OUT_FLOOD_UNKNOWN:
            member = C_FLOOD_MEMBER if out == C_OUT_FLOOD else C_FLOOD_UNKNOWN_MEMBER
            for p in range(nports):
                fd = port_fds[p]
                if fd < 0 or p == in_ports[i - 1] or not (flood[p] & member):
                    continue
                err = _io_write_one(fd, port_hdrs[p], base + off, length)
                if err:
                    tx_errors[p] += 1
                else:
                    written += 1
    return written


cdef class LoopLock:
    """What N packet workers sharing one Datapath serialize (header comment "Packet workers").

    `rw`: a writer-preferring rwlock; each worker round holds it shared, the daemon's
    control work exclusive (`with lock:` / acquire() / release(), the wait without the
    GIL). `mu`: a mutex around the datapath's table work inside a round (process, drain).
    `dp_sections` counts the mutex sections entered, `dp_waits` those that found the mutex
    taken by another worker (contention; both counted under the mutex, so exact).
    """
    cdef pthread_rwlock_t rw
    cdef pthread_mutex_t mu
    cdef readonly unsigned long long dp_sections
    cdef readonly unsigned long long dp_waits
    cdef bint ready

    def __cinit__(self):
        cdef pthread_rwlockattr_t attr
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        if pthread_rwlock_init(&self.rw, &attr) != 0:
            pthread_rwlockattr_destroy(&attr)
            raise OSError("pthread_rwlock_init failed")
        pthread_rwlockattr_destroy(&attr)
        if pthread_mutex_init(&self.mu, NULL) != 0:
            pthread_rwlock_destroy(&self.rw)
            raise OSError("pthread_mutex_init failed")
        self.ready = True

    def __dealloc__(self):
        if self.ready:
            pthread_rwlock_destroy(&self.rw)
            pthread_mutex_destroy(&self.mu)

    cdef inline void dp_enter(self) noexcept nogil:
        if pthread_mutex_trylock(&self.mu) != 0:
            pthread_mutex_lock(&self.mu)
            self.dp_waits += 1
        self.dp_sections += 1

    def acquire(self):
        """Hold the lock exclusive: every worker is between rounds (waits without the GIL)."""
        with nogil:
            pthread_rwlock_wrlock(&self.rw)

    def release(self):
        pthread_rwlock_unlock(&self.rw)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


cdef long long POLL_GROW = 4                  # run()'s default poll_max_ns: POLL_GROW × poll_ns
cdef long long POLL_LEARN_NS = 1000000000LL   # a late gap widens the window for this long
cdef long long POLL_BULK_BYTES = 0             # run()'s default poll_bulk_bytes: off ("Bulk batches")

# The loop trace (BatchIO.trace_start, docs/daemon.md "Where a ping's microseconds go"): one
# row of 4 int64 per step of run(), [CLOCK_MONOTONIC ns, step, a, b], in a ring allocated
# once; off (the default) it costs one predictable branch per step.
cdef enum:
    TR_SLEEP = 1                      # a blocking wait begins: a = timeout in µs (-1: none), b = 0
    TR_WAKE = 2                       # the wait returned ready fds: a = 1 after a blocking wait, 0 a poll; b = events
    TR_READ = 3                       # the batch is read: a = first frame's in_port, b = frames
    TR_DP = 4                         # process_batch_c returned: a = first frame's out_port, b = frames
    TR_WRITE = 5                      # the batch's writes returned: a = first frame's out_port, b = frames written
    TR_COLS = 4

TRACE_STEPS = {TR_SLEEP: "sleep", TR_WAKE: "wake", TR_READ: "read", TR_DP: "datapath", TR_WRITE: "write"}


cdef class BatchIO:
    """The daemon's batch buffers and port table with their pointers taken once.

    The arrays (attributes, numpy) are allocated here and never replaced; Python fills
    `port_fds`, `port_hdr_lens` and the ready list (`rfds`, `rports`, `rhdrs`) by index and
    passes `buf`, `offsets`, ... to the datapath. `poll`, `write` and `write_drained` then
    cost one call each, with no argument conversion (memoryview arguments would cost
    microseconds per batch).
    """
    cdef readonly object buf, offsets, lengths, in_ports, out_ports
    cdef readonly object dbuf, doffsets, dlengths, din_ports, dout_ports
    cdef readonly object port_fds, port_hdr_lens, rx_errors, tx_errors, rfds, rports, rhdrs, failed
    cdef readonly object port_flood      # flood classes per port (set_flood_classes; default: every class)
    cdef const unsigned char *p_flood
    cdef readonly int max_batch, per_fd_max, max_ports
    cdef readonly int n_failed             # ports in failed[:n_failed] after poll()
    cdef readonly bint control_ready       # the control fd was readable in poll()
    cdef readonly unsigned long long loop_batches    # batches processed by run()
    cdef readonly unsigned long long loop_frames     # frames read by run()
    cdef readonly unsigned long long loop_sleeps     # blocking waits of run()
    cdef readonly unsigned long long loop_polls      # non-blocking waits of run() in its polling window
    cdef readonly unsigned long long loop_poll_hits  # ... that found a ready fd (a sleep and wakeup saved)
    cdef readonly unsigned long long loop_poll_ns    # time in polls that found nothing: the polling's CPU cost
    cdef readonly unsigned long long loop_bulk       # batches of >= poll_bulk_bytes across the wire: no polling after them
    cdef readonly long long poll_bulk_bytes          # run's poll_bulk_bytes (0: every batch opens a window)
    cdef readonly unsigned long long loop_drained    # frames released from shaping queues by run()
    cdef readonly int run_errno                      # errno of epoll_wait when run() returned RUN_ERROR
    cdef readonly unsigned long long loop_unwatched  # failed fds a worker removed from its epoll (unwatch_failed)
    cdef readonly long long loop_window_ns           # the polling window after the last batch (adaptive)
    cdef readonly long long poll_max_ns              # its bound (run's poll_max_ns)
    cdef long long last_batch_ns                     # when the last batch was read
    cdef long long late_gap_ns                       # the longest recent gap in (poll_ns, poll_max_ns]
    cdef long long late_gap_t                        # ... seen at this time (forgotten after POLL_LEARN_NS)
    cdef int epfd                          # epoll of the port fds and the control fd
    cdef epoll_event *evs
    cdef unsigned short *p_failed
    cdef unsigned char *p_buf
    cdef unsigned char *p_dbuf
    cdef Py_ssize_t buflen, dbuflen
    cdef unsigned int *p_off
    cdef unsigned int *p_len
    cdef unsigned short *p_in
    cdef int *p_out
    cdef unsigned int *p_doff
    cdef unsigned int *p_dlen
    cdef unsigned short *p_din
    cdef int *p_dout
    cdef int *p_fds
    cdef unsigned char *p_hdrs
    cdef unsigned long long *p_rxe
    cdef unsigned long long *p_txe
    cdef int *p_rfds
    cdef unsigned short *p_rports
    cdef unsigned char *p_rhdrs
    cdef readonly object trace_ring        # int64[capacity, 4] once trace_start() ran (the loop trace)
    cdef long long *p_trace
    cdef long long trace_cap
    cdef readonly unsigned long long trace_n          # rows recorded since trace_start (the ring keeps the last)
    cdef readonly bint tracing

    def __init__(self, int max_ports, int max_batch=64, Py_ssize_t buf_bytes=4 << 20,
                 Py_ssize_t out_buf_bytes=4 << 20, int per_fd_max=32):
        import numpy
        if max_ports < 1 or max_batch < 1 or per_fd_max < 1:
            raise ValueError(f"max_ports={max_ports}, max_batch={max_batch}, per_fd_max={per_fd_max}: "
                             f"each must be at least 1")
        self.max_ports, self.max_batch, self.per_fd_max = max_ports, max_batch, per_fd_max
        self.buf = numpy.zeros(max(buf_bytes, 2 * IO_SLOT_SPAN), numpy.uint8)
        self.dbuf = numpy.zeros(max(out_buf_bytes, 2 * IO_SLOT_SPAN), numpy.uint8)
        self.offsets = numpy.zeros(max_batch, numpy.uint32)
        self.lengths = numpy.zeros(max_batch, numpy.uint32)
        self.in_ports = numpy.zeros(max_batch, numpy.uint16)
        self.out_ports = numpy.zeros(max_batch, numpy.int32)
        self.doffsets = numpy.zeros(max_batch, numpy.uint32)
        self.dlengths = numpy.zeros(max_batch, numpy.uint32)
        self.din_ports = numpy.zeros(max_batch, numpy.uint16)
        self.dout_ports = numpy.zeros(max_batch, numpy.int32)
        self.port_fds = numpy.full(max_ports, -1, numpy.int32)
        self.port_hdr_lens = numpy.full(max_ports, IO_HDR, numpy.uint8)
        self.rx_errors = numpy.zeros(max_ports, numpy.uint64)
        self.tx_errors = numpy.zeros(max_ports, numpy.uint64)
        self.rfds = numpy.zeros(max_ports, numpy.int32)
        self.rports = numpy.zeros(max_ports, numpy.uint16)
        self.rhdrs = numpy.zeros(max_ports, numpy.uint8)
        self.failed = numpy.zeros(max_ports + 1, numpy.uint16)
        self.evs = <epoll_event *>calloc(max_ports + 1, sizeof(epoll_event))
        if self.evs == NULL:
            raise MemoryError()
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(_io_errno, "epoll_create1 failed")
        cdef unsigned char[::1] u8
        cdef unsigned int[::1] u32
        cdef unsigned short[::1] u16
        cdef int[::1] i32
        cdef unsigned long long[::1] u64
        u8 = self.buf; self.p_buf = &u8[0]; self.buflen = u8.shape[0]
        u8 = self.dbuf; self.p_dbuf = &u8[0]; self.dbuflen = u8.shape[0]
        u32 = self.offsets; self.p_off = &u32[0]
        u32 = self.lengths; self.p_len = &u32[0]
        u16 = self.in_ports; self.p_in = &u16[0]
        i32 = self.out_ports; self.p_out = &i32[0]
        u32 = self.doffsets; self.p_doff = &u32[0]
        u32 = self.dlengths; self.p_dlen = &u32[0]
        u16 = self.din_ports; self.p_din = &u16[0]
        i32 = self.dout_ports; self.p_dout = &i32[0]
        i32 = self.port_fds; self.p_fds = &i32[0]
        u8 = self.port_hdr_lens; self.p_hdrs = &u8[0]
        self.port_flood = numpy.full(max_ports, C_FLOOD_MEMBER | C_FLOOD_UNKNOWN_MEMBER, numpy.uint8)
        u8 = self.port_flood; self.p_flood = &u8[0]
        u64 = self.rx_errors; self.p_rxe = &u64[0]
        u64 = self.tx_errors; self.p_txe = &u64[0]
        i32 = self.rfds; self.p_rfds = &i32[0]
        u16 = self.rports; self.p_rports = &u16[0]
        u8 = self.rhdrs; self.p_rhdrs = &u8[0]
        u16 = self.failed; self.p_failed = &u16[0]

    def __dealloc__(self):
        if self.epfd >= 0:
            _io_close(self.epfd)
            self.epfd = -1
        free(self.evs)
        self.evs = NULL

    def trace_start(self, int capacity=4096):
        """Record run()'s steps (TR_*: blocking wait, wakeup, read, datapath, write) with their
        CLOCK_MONOTONIC time into a ring of `capacity` rows, from now on. The ring is allocated
        by the first call and kept (a packet worker may be writing into it): a later call
        clears it, and must ask for the same capacity."""
        import numpy
        cdef long long[:, ::1] v
        if capacity < 1:
            raise ValueError(f"capacity={capacity}; accepted: at least 1")
        if self.trace_ring is None:
            self.trace_ring = numpy.zeros((capacity, TR_COLS), numpy.int64)
            v = self.trace_ring
            self.p_trace = &v[0, 0]
            self.trace_cap = capacity
        elif capacity != self.trace_cap:
            raise ValueError(f"capacity={capacity}: this BatchIO's trace ring has {self.trace_cap} rows")
        self.tracing = False
        self.trace_n = 0
        self.tracing = True

    def trace_stop(self):
        """Stop recording (the rows stay until the next trace_start)."""
        self.tracing = False

    def trace_rows(self):
        """The recorded rows, oldest first: int64[k, 4] (a copy), [t_ns, step, a, b]."""
        import numpy
        if self.trace_ring is None:
            return numpy.zeros((0, TR_COLS), numpy.int64)
        n = self.trace_n
        if n <= <unsigned long long>self.trace_cap:
            return self.trace_ring[:n].copy()
        k = n % self.trace_cap
        return numpy.concatenate((self.trace_ring[k:], self.trace_ring[:k]))

    cdef inline void _tr(self, int step, long long a, long long b) noexcept nogil:
        cdef long long *r = self.p_trace + <long long>(self.trace_n % <unsigned long long>self.trace_cap) * TR_COLS
        r[0] = vsw_now_ns()
        r[1] = step
        r[2] = a
        r[3] = b
        self.trace_n += 1

    def _epoll_ctl(self, int op, int fd, uint32_t data):
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = (<uint64_t><uint32_t>fd) << 32   # the fd in the high half (unwatch_failed)
        ev.data.u32 = data
        if epoll_ctl(self.epfd, op, fd, &ev) != 0:
            err = _io_errno
            raise OSError(err, f"epoll_ctl({'add' if op == EPOLL_CTL_ADD else 'del'}, fd {fd}) failed")

    def set_flood_classes(self, classes):
        """Write floods by `classes` (uint8[max_ports], C-contiguous, kept alive here): the
        datapath's flood_classes(), a live view, so a port's kind, up state and ingress shaper
        decide where OUT_FLOOD / OUT_FLOOD_UNKNOWN go (docs/datapath.md D41)."""
        cdef const unsigned char[::1] v = classes
        if v.shape[0] < self.max_ports:
            raise ValueError(f"flood classes of {v.shape[0]} ports; accepted: at least max_ports {self.max_ports}")
        self.port_flood = classes
        self.p_flood = &v[0]

    def watch(self, int fd, int port_id):
        """Poll `fd` as port `port_id` (whose port_fds / port_hdr_lens entries are set)."""
        if port_id < 0 or port_id >= self.max_ports:
            raise ValueError(f"port_id={port_id}; accepted: 0 .. {self.max_ports - 1}")
        self._epoll_ctl(EPOLL_CTL_ADD, fd, <uint32_t>(port_id + 1))

    def watch_control(self, int fd):
        """Poll `fd` as the control fd (poll() sets control_ready when it is readable)."""
        self._epoll_ctl(EPOLL_CTL_ADD, fd, 0)

    def unwatch(self, int fd):
        """Stop polling `fd` (no error if it was not polled or is closed)."""
        cdef epoll_event ev
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, &ev)

    def poll(self, int timeout_ms):
        """Wait up to `timeout_ms` (-1: forever) and read a batch from the ready ports.

        Returns the number of frames read into buf/offsets/lengths/in_ports (as read());
        sets n_failed / failed and control_ready. Runs without the GIL.
        """
        cdef int r, i, k = 0, nf = 0, n = 0, pid
        cdef bint ctl = False
        cdef uint32_t evbits
        with nogil:
            r = epoll_wait(self.epfd, self.evs, self.max_ports + 1, timeout_ms)
            for i in range(r):
                if self.evs[i].data.u32 == 0:
                    ctl = True
                    continue
                pid = <int>self.evs[i].data.u32 - 1
                if pid >= self.max_ports or self.p_fds[pid] < 0:
                    continue
                evbits = self.evs[i].events
                if evbits & (EPOLLERR | EPOLLHUP) and not evbits & EPOLLIN:
                    self.p_failed[nf] = <unsigned short>pid
                    nf += 1
                    continue
                self.p_rfds[k] = self.p_fds[pid]
                self.p_rports[k] = <unsigned short>pid
                self.p_rhdrs[k] = self.p_hdrs[pid]
                k += 1
            if k:
                n = _io_read_all(self.p_rfds, self.p_rports, self.p_rhdrs, k, self.p_buf, self.buflen,
                                 self.p_off, self.p_len, self.p_in, self.max_batch, self.per_fd_max,
                                 self.p_rxe, self.max_ports)
        self.n_failed = nf
        self.control_ready = ctl
        return n

    def run(self, Datapath dp, long long deadline_ns, long long poll_ns=0, bint busy=False,
            LoopLock lock=None, bint unwatch_failed=False, long long poll_max_ns=-1,
            long long poll_bulk_bytes=POLL_BULK_BYTES):
        """The daemon's packet loop, without the GIL, until there is work for Python.

        Each round: read the monotonic clock (the `now_ns` of the datapath); release the
        shaping queues' due packets (dp's drain into dbuf, written at once); wait on the
        epoll for the ports and the control fd, at most until `deadline_ns` (monotonic) or
        the next departure of a queued packet; read a batch from the ready ports; run it
        through `dp` (the code of `Datapath.process`); write it (flood included). After a
        batch the wait does not block for `poll_ns` nanoseconds (adaptive polling: the
        answer to a just-forwarded request is caught without a sleep and a wakeup); with
        no traffic it blocks, so idle costs nothing and a burst costs at most `poll_ns`
        of polling after its last batch.

        Returns (a bit set of RUN_*) when the control fd is readable (control_ready), a
        port fd failed (failed[:n_failed]), the deadline passed, a signal interrupted the
        wait, or epoll_wait failed (run_errno). `dp` must be the Datapath of this
        buffer layout (12-byte vnet header, at least max_ports ports).

        `poll_max_ns` (-1: POLL_GROW × poll_ns; poll_ns: a fixed window): how far the window
        may grow when batches keep arriving just after it (an answer from another node, the
        header comment's "Adaptive window"); `loop_window_ns` is the window in use.
        `poll_bulk_bytes` (0: off): a batch with at least this many bytes from or to AF_PACKET
        ports opens no window and teaches it no gap (the header comment's "Bulk batches";
        counted in `loop_bulk`).

        `busy`: poll without blocking, always (--busy-poll). `lock`: run as one of several
        packet workers sharing `dp` (the LoopLock of all of them; the header comment says
        what it serializes); the caller holds no lock and must hold `lock` exclusive for
        anything it does to `dp` or the port tables meanwhile. `unwatch_failed` (with
        `lock`): a failed fd leaves this BatchIO's epoll and run() does not return for it.
        """
        if dp.vnet_hdr_len != IO_HDR:
            raise ValueError(f"run: the datapath's vnet_hdr_len is {dp.vnet_hdr_len}; BatchIO needs {IO_HDR}")
        if <uint32_t>self.max_ports > dp.max_ports:
            raise ValueError(f"run: BatchIO has {self.max_ports} ports, the datapath only {dp.max_ports}")
        if poll_ns < 0:
            raise ValueError(f"poll_ns={poll_ns}; accepted: 0 (no polling) or more")
        if poll_max_ns < 0:
            poll_max_ns = POLL_GROW * poll_ns
        if poll_max_ns < poll_ns:
            raise ValueError(f"poll_max_ns={poll_max_ns}; accepted: at least poll_ns ({poll_ns}), or -1")
        if poll_bulk_bytes < 0:
            raise ValueError(f"poll_bulk_bytes={poll_bulk_bytes}; accepted: 0 (off) or more")
        self.poll_max_ns = poll_max_ns
        self.poll_bulk_bytes = poll_bulk_bytes
        cdef int reason
        if lock is not None:
            with nogil:
                reason = self._run_locked(dp.c, lock, deadline_ns, poll_ns, busy, unwatch_failed)
            return reason
        dp._idle()
        cdef Core *c = dp.c
        dp.busy = True
        try:
            with nogil:
                reason = self._run(c, deadline_ns, poll_ns, busy)
        finally:
            dp.busy = False
        return reason

    cdef inline long long _window(self, long long now, long long poll_ns, int n) noexcept nogil:
        """The polling window after a batch of `n` frames read at `now` (header comment
        "Adaptive window"); 0 after a bulk batch ("Bulk batches")."""
        cdef long long gap = now - self.last_batch_ns, win, wire_bytes = 0
        cdef int i, out
        if self.poll_bulk_bytes > 0:
            for i in range(n):
                out = self.p_out[i]
                if self.p_hdrs[self.p_in[i]] != IO_HDR or (       # an AF_PACKET port's 10 bytes
                        0 <= out < self.max_ports and self.p_hdrs[out] != IO_HDR):
                    wire_bytes += self.p_len[i]
            if wire_bytes >= self.poll_bulk_bytes:   # a stream across the wire: no window, no gap
                self.loop_bulk += 1
                return 0
        self.last_batch_ns = now
        if now - self.late_gap_t > POLL_LEARN_NS:
            self.late_gap_ns = 0
        if poll_ns < gap <= self.poll_max_ns:
            if gap > self.late_gap_ns:
                self.late_gap_ns = gap
            self.late_gap_t = now
        win = self.late_gap_ns + self.late_gap_ns // 4
        if win < poll_ns:
            win = poll_ns
        elif win > self.poll_max_ns:
            win = self.poll_max_ns
        self.loop_window_ns = win
        return win

    cdef void _drain_due(self, Core *c, uint64_t now) noexcept nogil:
        """Release the due packets of the shaping queues and write them."""
        cdef Py_ssize_t k
        c.last_now_ns = now
        c.have_now = 1
        while True:
            k = drain_c(c, now, self.p_dbuf, self.dbuflen, <uint8_t *>self.p_doff, 4,
                        <uint8_t *>self.p_dlen, 4, <uint8_t *>self.p_din, 2, <uint8_t *>self.p_dout, 4,
                        self.max_batch)
            if k <= 0:
                return
            _io_write_all(self.p_dbuf, self.dbuflen, self.p_doff, self.p_dlen, self.p_din, self.p_dout,
                          <int>k, self.p_fds, self.p_hdrs, self.p_txe, self.max_ports, self.p_flood)
            self.loop_drained += <unsigned long long>k
            if k < self.max_batch:
                return

    cdef int _run(self, Core *c, long long deadline, long long poll_ns, bint busy) noexcept nogil:
        cdef long long now, nd, timeout, t_poll, poll_until = RUN_BUSY_UNTIL if busy else 0
        cdef int r, i, k, nf, n, pid, why, w
        cdef bint ctl, polling, fresh = True
        cdef uint32_t evbits
        cdef Py_ssize_t bad
        self.n_failed = 0
        self.control_ready = False
        fresh = busy or poll_ns > 0         # without polling (poll_ns 0) every read is a full one
        while True:
            now = vsw_now_ns()
            if c.have_now and <uint64_t>now < c.last_now_ns:
                now = <long long>c.last_now_ns     # never backwards for the datapath
            nd = next_departure_c(c)
            if 0 <= nd <= now:
                self._drain_due(c, <uint64_t>now)
                nd = next_departure_c(c)
            if now >= deadline:
                return RUN_DEADLINE
            polling = now < poll_until
            if polling:
                timeout = 0
            else:
                timeout = deadline - now
                if nd >= 0 and nd - now < timeout:
                    timeout = nd - now
            if self.tracing and not polling:
                self._tr(TR_SLEEP, timeout // 1000 if timeout >= 0 else -1, 0)
            r = vsw_epoll_wait_ns(self.epfd, self.evs, self.max_ports + 1, timeout)
            if self.tracing and r > 0:
                self._tr(TR_WAKE, 0 if polling else 1, r)
            if r < 0:
                if _io_errno == _IO_EINTR:
                    return RUN_SIGNAL
                self.run_errno = _io_errno
                return RUN_ERROR
            if polling:
                self.loop_polls += 1
                if r == 0:
                    fresh = True
                    sched_yield()           # a task woken on this CPU (the peer of the traffic) runs first
                    t_poll = vsw_now_ns()
                    self.loop_poll_ns += <unsigned long long>(t_poll - now)
                    continue
                self.loop_poll_hits += 1
            else:
                self.loop_sleeps += 1
            k = 0
            nf = 0
            ctl = False
            for i in range(r):
                if self.evs[i].data.u32 == 0:
                    ctl = True
                    continue
                pid = <int>self.evs[i].data.u32 - 1
                if pid >= self.max_ports or self.p_fds[pid] < 0:
                    continue
                evbits = self.evs[i].events
                if evbits & (EPOLLERR | EPOLLHUP) and not evbits & EPOLLIN:
                    self.p_failed[nf] = <unsigned short>pid
                    nf += 1
                    continue
                self.p_rfds[k] = self.p_fds[pid]
                self.p_rports[k] = <unsigned short>pid
                self.p_rhdrs[k] = self.p_hdrs[pid]
                k += 1
            if k:
                n = _io_read_all(self.p_rfds, self.p_rports, self.p_rhdrs, k, self.p_buf, self.buflen,
                                 self.p_off, self.p_len, self.p_in, self.max_batch,
                                 1 if fresh else self.per_fd_max, self.p_rxe, self.max_ports)
                fresh = False
                if self.tracing:
                    self._tr(TR_READ, self.p_in[0] if n else -1, n)
                if n:
                    now = vsw_now_ns()
                    if <uint64_t>now < c.last_now_ns:
                        now = <long long>c.last_now_ns
                    why = 0
                    bad = process_batch_c(c, self.p_buf, <uint64_t>self.buflen, <uint8_t *>self.p_off, 4,
                                          <uint8_t *>self.p_len, 4, <uint8_t *>self.p_in, 2,
                                          <uint8_t *>self.p_out, 4, n, <uint64_t>now, &why)
                    if self.tracing:
                        self._tr(TR_DP, self.p_out[0], n)
                    if bad < 0:             # reads never make an invalid batch; if so, nothing is sent
                        w = _io_write_all(self.p_buf, self.buflen, self.p_off, self.p_len, self.p_in, self.p_out,
                                          n, self.p_fds, self.p_hdrs, self.p_txe, self.max_ports, self.p_flood)
                        if self.tracing:
                            self._tr(TR_WRITE, self.p_out[0], w)
                    self.loop_batches += 1
                    self.loop_frames += <unsigned long long>n
                    if not busy:
                        poll_until = now + self._window(now, poll_ns, n)
            if ctl or nf:
                self.n_failed = nf
                self.control_ready = ctl
                return (RUN_CONTROL if ctl else 0) | (RUN_FAILED if nf else 0)

    cdef int _run_locked(self, Core *c, LoopLock lk, long long deadline, long long poll_ns, bint busy,
                         bint own_failed) noexcept nogil:
        """_run as one of several workers on `c`: each round holds lk.rw shared, the table
        work lk.mu (the clock read under it); the waits hold nothing."""
        cdef long long now, nd, timeout, t_poll, poll_until = RUN_BUSY_UNTIL if busy else 0
        cdef int r, i, k, nf, n, pid, why, fd, w
        cdef bint ctl, polling, fresh = True
        cdef uint32_t evbits
        cdef Py_ssize_t bad, kd
        cdef epoll_event dev
        self.n_failed = 0
        self.control_ready = False
        fresh = busy or poll_ns > 0         # without polling (poll_ns 0) every read is a full one
        while True:
            nd = -1
            if c.n_active:                  # shapers exist (set only under the exclusive lock)
                pthread_rwlock_rdlock(&lk.rw)
                while True:
                    lk.dp_enter()
                    now = vsw_now_ns()
                    if c.have_now and <uint64_t>now < c.last_now_ns:
                        now = <long long>c.last_now_ns
                    nd = next_departure_c(c)
                    kd = 0
                    if 0 <= nd <= now:
                        c.last_now_ns = <uint64_t>now
                        c.have_now = 1
                        kd = drain_c(c, <uint64_t>now, self.p_dbuf, self.dbuflen, <uint8_t *>self.p_doff, 4,
                                     <uint8_t *>self.p_dlen, 4, <uint8_t *>self.p_din, 2, <uint8_t *>self.p_dout,
                                     4, self.max_batch)
                        nd = next_departure_c(c)
                    pthread_mutex_unlock(&lk.mu)
                    if kd <= 0:
                        break
                    _io_write_all(self.p_dbuf, self.dbuflen, self.p_doff, self.p_dlen, self.p_din, self.p_dout,
                                  <int>kd, self.p_fds, self.p_hdrs, self.p_txe, self.max_ports, self.p_flood)
                    self.loop_drained += <unsigned long long>kd
                    if kd < self.max_batch:
                        break
                pthread_rwlock_unlock(&lk.rw)
            now = vsw_now_ns()
            if now >= deadline:
                return RUN_DEADLINE
            polling = now < poll_until
            if polling:
                timeout = 0
            else:
                timeout = deadline - now
                if nd >= 0 and nd - now < timeout:
                    timeout = nd - now if nd > now else 0
            if self.tracing and not polling:
                self._tr(TR_SLEEP, timeout // 1000 if timeout >= 0 else -1, 0)
            r = vsw_epoll_wait_ns(self.epfd, self.evs, self.max_ports + 1, timeout)
            if self.tracing and r > 0:
                self._tr(TR_WAKE, 0 if polling else 1, r)
            if r < 0:
                if _io_errno == _IO_EINTR:
                    return RUN_SIGNAL
                self.run_errno = _io_errno
                return RUN_ERROR
            if polling:
                self.loop_polls += 1
                if r == 0:
                    fresh = True
                    sched_yield()
                    t_poll = vsw_now_ns()
                    self.loop_poll_ns += <unsigned long long>(t_poll - now)
                    continue
                self.loop_poll_hits += 1
            else:
                self.loop_sleeps += 1
            k = 0
            nf = 0
            ctl = False
            pthread_rwlock_rdlock(&lk.rw)
            for i in range(r):
                if self.evs[i].data.u32 == 0:
                    ctl = True
                    continue
                pid = <int>self.evs[i].data.u32 - 1
                if pid >= self.max_ports or self.p_fds[pid] < 0:
                    continue
                evbits = self.evs[i].events
                if evbits & (EPOLLERR | EPOLLHUP) and not evbits & EPOLLIN:
                    if own_failed:
                        fd = <int>(self.evs[i].data.u64 >> 32)
                        if fd == self.p_fds[pid]:
                            epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, &dev)
                            self.loop_unwatched += 1
                        continue
                    self.p_failed[nf] = <unsigned short>pid
                    nf += 1
                    continue
                self.p_rfds[k] = self.p_fds[pid]
                self.p_rports[k] = <unsigned short>pid
                self.p_rhdrs[k] = self.p_hdrs[pid]
                k += 1
            if k:
                n = _io_read_all(self.p_rfds, self.p_rports, self.p_rhdrs, k, self.p_buf, self.buflen,
                                 self.p_off, self.p_len, self.p_in, self.max_batch,
                                 1 if fresh else self.per_fd_max, self.p_rxe, self.max_ports)
                fresh = False
                if self.tracing:
                    self._tr(TR_READ, self.p_in[0] if n else -1, n)
                if n:
                    lk.dp_enter()
                    now = vsw_now_ns()
                    if c.have_now and <uint64_t>now < c.last_now_ns:
                        now = <long long>c.last_now_ns
                    why = 0
                    bad = process_batch_c(c, self.p_buf, <uint64_t>self.buflen, <uint8_t *>self.p_off, 4,
                                          <uint8_t *>self.p_len, 4, <uint8_t *>self.p_in, 2,
                                          <uint8_t *>self.p_out, 4, n, <uint64_t>now, &why)
                    pthread_mutex_unlock(&lk.mu)
                    if self.tracing:
                        self._tr(TR_DP, self.p_out[0], n)
                    if bad < 0:
                        w = _io_write_all(self.p_buf, self.buflen, self.p_off, self.p_len, self.p_in, self.p_out,
                                          n, self.p_fds, self.p_hdrs, self.p_txe, self.max_ports, self.p_flood)
                        if self.tracing:
                            self._tr(TR_WRITE, self.p_out[0], w)
                    self.loop_batches += 1
                    self.loop_frames += <unsigned long long>n
                    if not busy:
                        poll_until = now + self._window(now, poll_ns, n)
            pthread_rwlock_unlock(&lk.rw)
            if ctl or nf:
                self.n_failed = nf
                self.control_ready = ctl
                return (RUN_CONTROL if ctl else 0) | (RUN_FAILED if nf else 0)

    def write(self, int n):
        """Write the first `n` outputs of the read batch (out_ports as the datapath set them)."""
        if n < 0 or n > self.max_batch:
            raise ValueError(f"n={n}; accepted: 0 .. {self.max_batch}")
        cdef int w
        with nogil:
            w = _io_write_all(self.p_buf, self.buflen, self.p_off, self.p_len, self.p_in, self.p_out, n,
                              self.p_fds, self.p_hdrs, self.p_txe, self.max_ports, self.p_flood)
        return w

    def write_drained(self, int n):
        """Write the first `n` outputs of a drain into dbuf."""
        if n < 0 or n > self.max_batch:
            raise ValueError(f"n={n}; accepted: 0 .. {self.max_batch}")
        cdef int w
        with nogil:
            w = _io_write_all(self.p_dbuf, self.dbuflen, self.p_doff, self.p_dlen, self.p_din, self.p_dout, n,
                              self.p_fds, self.p_hdrs, self.p_txe, self.max_ports, self.p_flood)
        return w

