/* vxfloor: the least work a TAP + AF_PACKET VXLAN data path can do, to measure the floor
 * under vswitchd's cross-node figures (bench/floor.py builds and drives it; it is a
 * measuring instrument, not part of the switch).
 *
 *   vxfloor pair TAP_A TAP_B
 *       two pod TAPs cross-connected: every frame read from one is written to the other,
 *       virtio-net header and all (the same-node floor).
 *   vxfloor vxlan TAP UPLINK LOCAL_IP REMOTE_IP REMOTE_MAC VNI PORT [--csum] [--tx-ring]
 *       one pod TAP and a packet socket on UPLINK, an L2 VXLAN tunnel between them: frames
 *       from the pod leave encapsulated to REMOTE_IP/REMOTE_MAC (a TSO segment as UDP GSO
 *       packets of wire-size VXLAN datagrams, one sendmsg per packet of at most 64 (44
 *       at MTU 1500), as vswitchd's D54 does); VXLAN datagrams for PORT arrive decapsulated, a UDP GSO packet's TCP
 *       segments merged back into one TSO frame, one writev (vswitchd's D52).
 *
 * --tx-ring (vxlan) sends TSO segments from a PACKET_TX_RING instead, read straight into
 * its frames (ring_from_tap). SIGUSR1 prints "tso ring N copy M" on stdout: the TSO
 * segments sent each way.
 *
 * The TAPs are made here (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, 12-byte header, CSUM/TSO4/
 * TSO6 offloads, as vswitchd opens pod ports) in the caller's namespace; "ready" on stdout
 * says the caller may move them into pod namespaces. The loop sleeps in ppoll(), then
 * reads each fd until EAGAIN, one frame at a time. SIGUSR1 is blocked except inside
 * ppoll, so a report never waits for traffic.
 *
 * What it leaves out, so its figures are a bound, not a rival: no MAC table, no routing,
 * no VNI, address or malformed-frame checks beyond the few that keep it from writing
 * garbage, no shaping, no counters, no batching of reads (recvmmsg), and by default no
 * inner TCP checksums: vswitchd completes each segment's checksum in software, as a wire
 * that may cut the packet needs; --csum does that too. IPv4 pods only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>
#include <net/ethernet.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define TAP_HDR 12              /* virtio_net_hdr_mrg_rxbuf */
#define PKT_HDR 10              /* virtio_net_hdr: PACKET_VNET_HDR */
#define OUTER 42                /* Ethernet + IPv4 + UDP */
#define VXLAN 8
#define MAX_SEGS 64             /* UDP_GSO_MAX_SEGS */
#define MAX_INNER_HDR 128
#define BUF (TAP_HDR + 65536 + 256)
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#ifndef VIRTIO_NET_HDR_GSO_UDP_L4
#define VIRTIO_NET_HDR_GSO_UDP_L4 5     /* Debian 12's headers predate it; the kernel takes it */
#endif

static int want_csum, tx_ring, port;
static volatile sig_atomic_t report;        /* SIGUSR1: print the counts below on stdout */
static unsigned long sent_ring, sent_copy;  /* TSO segments sent from the ring, by sendmsg */
static uint32_t vni, local_ip, remote_ip;   /* network order */
static uint8_t local_mac[6], remote_mac[6];

static void die(const char *what) { perror(what); exit(1); }

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 255; }
static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }
static void put32(uint8_t *p, uint32_t v) { put16(p, v >> 16); put16(p + 2, v & 0xffff); }

/* the one's complement sum of native 32-bit words in four accumulators, as vswitchd's
 * _csum_be (ext/io.pxi), so the floor's checksums cost what ours do */
static uint64_t sum_bytes(const uint8_t *p, size_t n, uint64_t s) {
    uint64_t a1 = 0, a2 = 0, a3 = 0;
    uint32_t w0, w1, w2, w3;
    for (; n >= 16; p += 16, n -= 16) {
        memcpy(&w0, p, 4); memcpy(&w1, p + 4, 4); memcpy(&w2, p + 8, 4); memcpy(&w3, p + 12, 4);
        s += w0; a1 += w1; a2 += w2; a3 += w3;
    }
    s += a1 + a2 + a3;
    while (n >= 2) { uint16_t w; memcpy(&w, p, 2); s += w; p += 2; n -= 2; }
    if (n) s += *p;                                 /* little-endian host: odd byte is low */
    return s;
}
static uint16_t fold(uint64_t s) {                  /* one's complement sum, host order of bytes */
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}
static void ip_csum(uint8_t *ip, int ihl) {
    ip[10] = ip[11] = 0;
    uint16_t c = ~fold(sum_bytes(ip, ihl, 0));
    memcpy(ip + 10, &c, 2);
}
/* the pseudo-header sum for a partial checksum (not inverted), or the full one */
static uint64_t pseudo(const uint8_t *ip, int proto, unsigned len) {
    uint64_t s = sum_bytes(ip + 12, 8, 0);
    return s + htons((uint16_t)proto) + htons((uint16_t)len);
}

static int open_tap(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK);
    if (fd < 0) die("/dev/net/tun");
    struct ifreq ifr = {0};
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    int sz = TAP_HDR;
    if (ioctl(fd, TUNSETVNETHDRSZ, &sz) < 0) die("TUNSETVNETHDRSZ");
    if (ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) < 0) die("TUNSETOFFLOAD");
    return fd;
}

static int open_uplink(const char *name) {
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK, htons(ETH_P_ALL)), one = 1, buf = 4 << 20;
    if (fd < 0) die("socket");
    if (setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0) die("PACKET_VNET_HDR");
    if (setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one) < 0) die("PACKET_IGNORE_OUTGOING");
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0) die("SIOCGIFINDEX");
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                              .sll_ifindex = ifr.ifr_ifindex};
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) die("bind");
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) die("SIOCGIFHWADDR");
    memcpy(local_mac, ifr.ifr_hwaddr.sa_data, 6);
    return fd;
}

/* outer Ethernet + IPv4 + UDP for `udp_payload` bytes; the UDP checksum field holds the
 * pseudo-header sum when `partial` (the kernel completes it), else 0 (RFC 7348 allows it) */
static void outer(uint8_t *h, unsigned udp_payload, uint16_t sport, int partial) {
    static uint16_t id;
    memcpy(h, remote_mac, 6);
    memcpy(h + 6, local_mac, 6);
    put16(h + 12, ETH_P_IP);
    uint8_t *ip = h + 14, *udp = h + 34;
    memset(ip, 0, 20);
    ip[0] = 0x45;
    put16(ip + 2, (uint16_t)(20 + 8 + udp_payload));
    put16(ip + 4, id++);
    put16(ip + 6, 0x4000);                          /* DF */
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    memcpy(ip + 12, &local_ip, 4);
    memcpy(ip + 16, &remote_ip, 4);
    ip_csum(ip, 20);
    put16(udp, sport);
    put16(udp + 2, (uint16_t)port);
    put16(udp + 4, (uint16_t)(8 + udp_payload));
    udp[6] = udp[7] = 0;
    if (partial) {
        uint16_t c = fold(pseudo(ip, IPPROTO_UDP, 8 + udp_payload));
        memcpy(udp + 6, &c, 2);
    }
}

static void vxlan_hdr(uint8_t *v) {
    memset(v, 0, 8);
    v[0] = 0x08;
    v[4] = vni >> 16; v[5] = vni >> 8; v[6] = vni;
}

static ssize_t sendv(int fd, struct iovec *iov, int n) {
    struct msghdr m = {.msg_iov = iov, .msg_iovlen = n};
    ssize_t r;
    while ((r = sendmsg(fd, &m, 0)) < 0 && errno == EINTR) {}
    return r;
}

static uint8_t tbuf[BUF], ubuf[BUF];
static uint8_t seghdr[MAX_SEGS][VXLAN + MAX_INNER_HDR];

/* --tx-ring: a PACKET_TX_RING whose frames the TAP read fills directly (readv at the
 * places the segments take in the UDP GSO packets, the headers of the next TSO segment
 * predicted from the last one's: pred_hl, pred_mss), sent without a copy (the kernel
 * attaches the ring's pages to the skb) */
#define RING_FRAME (1 << 17)
#define RING_FRAMES 32
#define RING_DATA TPACKET_ALIGN(sizeof(struct tpacket2_hdr))
static uint8_t *ring;
static unsigned ring_next, pred_hl, pred_mss;

static struct tpacket2_hdr *ring_frame(unsigned i) {
    return (struct tpacket2_hdr *)(ring + (size_t)(i % RING_FRAMES) * RING_FRAME);
}

static int ring_fd;

/* the ring lives on a send-only socket of its own (protocol 0: it receives nothing): a
 * socket with a TX ring sends only from the ring, and the copying way needs sendmsg */
static void open_ring(const char *ifname) {
    int fd = socket(AF_PACKET, SOCK_RAW, 0), one = 1, v = TPACKET_V2;
    if (fd < 0) die("socket");
    if (setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0) die("PACKET_VNET_HDR");
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0) die("SIOCGIFINDEX");
    struct sockaddr_ll sll = {.sll_family = AF_PACKET, .sll_protocol = 0, .sll_ifindex = ifr.ifr_ifindex};
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) die("bind");
    ring_fd = fd;
    if (setsockopt(fd, SOL_PACKET, PACKET_VERSION, &v, sizeof v) < 0) die("PACKET_VERSION");
    struct tpacket_req req = {.tp_block_size = RING_FRAME, .tp_block_nr = RING_FRAMES,
                              .tp_frame_size = RING_FRAME, .tp_frame_nr = RING_FRAMES};
    if (setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &req, sizeof req) < 0) die("PACKET_TX_RING");
    ring = mmap(NULL, (size_t)RING_FRAME * RING_FRAMES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ring == MAP_FAILED) die("mmap");
}

/* the layout of a TSO segment's UDP GSO packets: segments per packet, datagram size */
static int per_packet(unsigned hl, unsigned mss, unsigned *dsz) {
    *dsz = VXLAN + hl + mss;
    int per = (65535 - 28) / *dsz;
    return per > MAX_SEGS ? MAX_SEGS : per;
}

/* segment s of `segs` (payload `plen` at `data`): its VXLAN header and inner headers at
 * `h`, from the TSO segment's headers `f` (hl bytes) */
static void seg_headers(uint8_t *h, const uint8_t *f, int hl, int s, int segs, size_t plen,
                        unsigned mss, const uint8_t *data) {
    int ihl = (f[14] & 15) * 4, doff = hl - 14 - ihl;
    uint8_t *ip = h + VXLAN + 14, *tcp = ip + ihl, flags = f[14 + ihl + 13];
    vxlan_hdr(h);
    memcpy(h + VXLAN, f, hl);
    put16(ip + 2, (uint16_t)(ihl + doff + plen));
    put16(ip + 4, (uint16_t)(be16(f + 18) + s));
    ip_csum(ip, ihl);
    put32(tcp + 4, be32(f + 14 + ihl + 4) + (uint32_t)s * mss);
    tcp[13] = s == segs - 1 ? flags : flags & ~(TCP_FIN | TCP_PSH);
    tcp[16] = tcp[17] = 0;
    if (want_csum) {
        uint64_t sum = pseudo(ip, IPPROTO_TCP, doff + plen);
        sum = sum_bytes(tcp, doff, sum);
        uint16_t c = ~fold(sum_bytes(data, plen, sum));
        memcpy(tcp + 16, &c, 2);
    }
}

/* a UDP GSO packet's packet-socket header and outer headers, `cnt` datagrams of `total` bytes */
static void packet_headers(uint8_t *vnet, uint8_t *oh, int cnt, unsigned total, unsigned dsz, uint16_t sport) {
    outer(oh, total, sport, 1);
    memset(vnet, 0, PKT_HDR);
    struct virtio_net_hdr *vh = (struct virtio_net_hdr *)vnet;
    vh->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    vh->csum_start = 34;
    vh->csum_offset = 6;
    if (cnt > 1) {
        vh->gso_type = VIRTIO_NET_HDR_GSO_UDP_L4;
        vh->hdr_len = OUTER;
        vh->gso_size = dsz;
    }
}

static int tso_headers(const uint8_t *f, size_t len, unsigned mss) {
    if (len < 14 + 20 || f[14 + 9] != IPPROTO_TCP) return -1;
    int ihl = (f[14] & 15) * 4;
    if ((size_t)14 + ihl + 20 > len) return -1;
    int hl = 14 + ihl + (f[14 + ihl + 12] >> 4) * 4;
    return hl > MAX_INNER_HDR || (size_t)hl >= len || mss == 0 ? -1 : hl;
}

/* a TSO segment (IPv4/TCP) from the pod: UDP GSO packets of VXLAN datagrams */
static void encap_tso(int up, const uint8_t *f, size_t len, unsigned mss) {
    int hl = tso_headers(f, len, mss);
    if (hl < 0) return;
    sent_copy++;
    pred_hl = hl;
    pred_mss = mss;
    size_t payload = len - hl;
    int segs = (int)((payload + mss - 1) / mss);
    unsigned dsz;
    int per = per_packet(hl, mss, &dsz), ihl = (f[14] & 15) * 4;
    uint16_t sport = 0xC000 | (be16(f + 14 + ihl) ^ be16(f + 14 + ihl + 2));
    uint8_t vnet[PKT_HDR], oh[OUTER];
    struct iovec iov[2 + 2 * MAX_SEGS];
    for (int k = 0; k < segs; k += per) {
        int cnt = segs - k < per ? segs - k : per, n = 2;
        unsigned total = 0;
        for (int j = 0; j < cnt; j++) {
            int s = k + j;
            size_t plen = payload - (size_t)s * mss < mss ? payload - (size_t)s * mss : mss;
            const uint8_t *data = f + hl + (size_t)s * mss;
            seg_headers(seghdr[j], f, hl, s, segs, plen, mss, data);
            iov[n].iov_base = seghdr[j];
            iov[n++].iov_len = VXLAN + hl;
            iov[n].iov_base = (void *)data;
            iov[n++].iov_len = plen;
            total += VXLAN + hl + plen;
        }
        packet_headers(vnet, oh, cnt, total, dsz, sport);
        iov[0].iov_base = vnet; iov[0].iov_len = PKT_HDR;
        iov[1].iov_base = oh; iov[1].iov_len = OUTER;
        sendv(up, iov, n);
    }
}

static void encap_frame(int out, ssize_t n);

/* --tx-ring: one read from the TAP into the ring's free frames; 1 (a frame was read), 0
 * (nothing to read) or -1 (not enough free frames: read the copying way) */
static int ring_from_tap(int tap, int up) {
    unsigned hl = pred_hl, mss = pred_mss, dsz;
    int per = per_packet(hl, mss, &dsz), maxsegs = (int)((65536 + mss - 1) / mss);
    int frames = (maxsegs + per - 1) / per;
    if (maxsegs > 1024 - 2 || frames > RING_FRAMES) return -1;
    for (int k = 0; k < frames; k++)
        if (((volatile struct tpacket2_hdr *)ring_frame(ring_next + k))->tp_status != TP_STATUS_AVAILABLE)
            return -1;
#define SEG(s) ((uint8_t *)ring_frame(ring_next + (s) / per) + RING_DATA + PKT_HDR + OUTER + ((s) % per) * dsz)
    uint8_t vh12[TAP_HDR];
    struct iovec iov[1024];
    iov[0].iov_base = vh12; iov[0].iov_len = TAP_HDR;
    iov[1].iov_base = SEG(0) + VXLAN; iov[1].iov_len = hl;
    for (int s = 0; s < maxsegs; s++) {
        iov[2 + s].iov_base = SEG(s) + VXLAN + hl;
        iov[2 + s].iov_len = mss;
    }
    ssize_t n = readv(tap, iov, 2 + maxsegs);
    if (n < 0) return 0;
    if (n < TAP_HDR + 14) return 1;
    struct virtio_net_hdr *th = (struct virtio_net_hdr *)vh12;
    const uint8_t *f = SEG(0) + VXLAN;
    size_t len = n - TAP_HDR;
    int fits = (th->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) == VIRTIO_NET_HDR_GSO_TCPV4
               && be16(f + 12) == ETH_P_IP && th->gso_size == mss && tso_headers(f, len, mss) == (int)hl;
    if (!fits) {                        /* not as predicted: gather it and take the copying way */
        memcpy(tbuf, vh12, TAP_HDR);
        size_t got = 0;
        for (int k = 1; k < 2 + maxsegs && got < len; k++) {
            size_t c = len - got < iov[k].iov_len ? len - got : iov[k].iov_len;
            memcpy(tbuf + TAP_HDR + got, iov[k].iov_base, c);
            got += c;
        }
        encap_frame(up, n);
        return 1;
    }
    uint8_t orig[MAX_INNER_HDR];
    memcpy(orig, f, hl);
    size_t payload = len - hl;
    int segs = (int)((payload + mss - 1) / mss), ihl = (orig[14] & 15) * 4;
    uint16_t sport = 0xC000 | (be16(orig + 14 + ihl) ^ be16(orig + 14 + ihl + 2));
    for (int k = 0; k * per < segs; k++) {
        int cnt = segs - k * per < per ? segs - k * per : per;
        unsigned total = 0;
        for (int j = 0; j < cnt; j++) {
            int s = k * per + j;
            size_t plen = payload - (size_t)s * mss < mss ? payload - (size_t)s * mss : mss;
            seg_headers(SEG(s), orig, hl, s, segs, plen, mss, SEG(s) + VXLAN + hl);
            total += VXLAN + hl + plen;
        }
        struct tpacket2_hdr *fr = ring_frame(ring_next + k);
        uint8_t *d = (uint8_t *)fr + RING_DATA;
        packet_headers(d, d + PKT_HDR, cnt, total, dsz, sport);
        fr->tp_len = PKT_HDR + OUTER + total;
        __sync_synchronize();
        fr->tp_status = TP_STATUS_SEND_REQUEST;
    }
#undef SEG
    ring_next += (segs + per - 1) / per;
    sent_ring++;
    while (send(ring_fd, NULL, 0, MSG_DONTWAIT) < 0 && errno == EINTR) {}
    return 1;
}


/* TAP -> uplink (vxlan) or TAP -> TAP (pair); 0 when the TAP had nothing */
static int from_tap(int tap, int out, int pair) {
    if (ring != NULL && pred_mss) {
        int r = ring_from_tap(tap, out);
        if (r >= 0) return r;                       /* else: no free frames, the copying way */
    }
    ssize_t n = read(tap, tbuf, sizeof tbuf);
    if (n < 0) return 0;
    if (n < TAP_HDR + 14) return 1;
    if (pair) {
        ssize_t w = write(out, tbuf, n);
        (void)w;
        return 1;
    }
    encap_frame(out, n);
    return 1;
}

/* the frame of `n` bytes (virtio-net header included) in tbuf, encapsulated to `out` */
static void encap_frame(int out, ssize_t n) {
    struct virtio_net_hdr *th = (struct virtio_net_hdr *)tbuf;
    const uint8_t *f = tbuf + TAP_HDR;
    size_t len = n - TAP_HDR;
    if ((th->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) == VIRTIO_NET_HDR_GSO_TCPV4 && be16(f + 12) == ETH_P_IP) {
        encap_tso(out, f, len, th->gso_size);
        return;
    }
    if (th->gso_type != VIRTIO_NET_HDR_GSO_NONE) return;            /* IPv6 TSO: not here */
    uint8_t vnet[PKT_HDR] = {0}, oh[OUTER], vx[VXLAN];
    struct virtio_net_hdr *vh = (struct virtio_net_hdr *)vnet;
    if (th->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {                   /* the inner checksum stays partial */
        vh->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vh->csum_start = th->csum_start + OUTER + VXLAN;
        vh->csum_offset = th->csum_offset;
    }
    outer(oh, VXLAN + len, 0xC000 | (uint16_t)len, 0);
    vxlan_hdr(vx);
    struct iovec iov[4] = {{vnet, PKT_HDR}, {oh, OUTER}, {vx, VXLAN}, {(void *)f, len}};
    sendv(out, iov, 4);
}

/* uplink -> TAP: one VXLAN datagram, or a UDP GSO packet of them (its TCP segments merged) */
static int from_uplink(int up, int tap) {
    ssize_t n = recv(up, ubuf, sizeof ubuf, 0);
    if (n < 0) return 0;
    struct virtio_net_hdr *uh = (struct virtio_net_hdr *)ubuf;
    uint8_t *f = ubuf + PKT_HDR;
    size_t len = n - PKT_HDR;
    if (len < OUTER + VXLAN + 14 || be16(f + 12) != ETH_P_IP || f[14 + 9] != IPPROTO_UDP) return 1;
    int udp = 14 + (f[14] & 15) * 4;
    if ((size_t)udp + 8 + VXLAN + 14 > len || be16(f + udp + 2) != port) return 1;
    uint8_t *first = f + udp + 8 + VXLAN;               /* the first inner frame */
    size_t flen = len - udp - 8 - VXLAN;
    uint8_t vnet[TAP_HDR] = {0};
    struct virtio_net_hdr *vh = (struct virtio_net_hdr *)vnet;
    struct iovec iov[2 + MAX_SEGS];
    if (uh->gso_type == VIRTIO_NET_HDR_GSO_UDP_L4 && uh->gso_size > VXLAN + 14 + 40
            && be16(first + 12) == ETH_P_IP && first[14 + 9] == IPPROTO_TCP) {
        int ihl = (first[14] & 15) * 4, doff = (first[14 + ihl + 12] >> 4) * 4, hl = 14 + ihl + doff;
        size_t dsz = uh->gso_size, all = len - udp - 8, pay = 0;
        int d = 0, cnt = 2;                            /* iov[0]: vnet header, iov[1]: headers */
        if ((size_t)VXLAN + hl >= dsz) return 1;
        static uint8_t hdr[MAX_INNER_HDR];
        memcpy(hdr, first, hl);
        for (size_t off = 0; off < all && d < MAX_SEGS; off += dsz, d++) {
            size_t dl = all - off < dsz ? all - off : dsz;
            if (dl <= (size_t)VXLAN + hl) return 1;
            uint8_t *inner = f + udp + 8 + off + VXLAN;
            iov[cnt].iov_base = inner + hl;
            iov[cnt++].iov_len = dl - VXLAN - hl;
            pay += dl - VXLAN - hl;
            hdr[14 + ihl + 13] |= inner[14 + ihl + 13] & TCP_PSH;
        }
        uint8_t *ip = hdr + 14, *tcp = ip + ihl;
        put16(ip + 2, (uint16_t)(ihl + doff + pay));
        ip_csum(ip, ihl);
        uint16_t c = fold(pseudo(ip, IPPROTO_TCP, doff + pay));
        memcpy(tcp + 16, &c, 2);
        vh->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vh->csum_start = 14 + ihl;
        vh->csum_offset = 16;
        if (d > 1) {
            vh->gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
            vh->gso_size = dsz - VXLAN - hl;
            vh->hdr_len = hl;
        }
        iov[0].iov_base = vnet; iov[0].iov_len = TAP_HDR;
        iov[1].iov_base = hdr; iov[1].iov_len = hl;
        while (writev(tap, iov, cnt) < 0 && errno == EINTR) {}
        return 1;
    }
    if (uh->gso_type != VIRTIO_NET_HDR_GSO_NONE) return 1;
    if ((uh->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) && uh->csum_start >= udp + 8 + VXLAN + 14) {
        vh->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;    /* the inner checksum was left partial */
        vh->csum_start = uh->csum_start - (udp + 8 + VXLAN);
        vh->csum_offset = uh->csum_offset;
    } else {
        vh->flags = VIRTIO_NET_HDR_F_DATA_VALID;
    }
    iov[0].iov_base = vnet; iov[0].iov_len = TAP_HDR;
    iov[1].iov_base = first; iov[1].iov_len = flen;
    while (writev(tap, iov, 2) < 0 && errno == EINTR) {}
    return 1;
}

static void on_usr1(int sig) { (void)sig; report = 1; }

int main(int argc, char **argv) {
    int pair;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--csum")) want_csum = 1;
        else if (!strcmp(argv[i], "--tx-ring")) tx_ring = 1;
    }
    if (argc >= 4 && !strcmp(argv[1], "pair")) pair = 1;
    else if (argc >= 9 && !strcmp(argv[1], "vxlan")) pair = 0;
    else {
        fprintf(stderr, "usage: vxfloor pair TAP_A TAP_B\n"
                        "       vxfloor vxlan TAP UPLINK LOCAL_IP REMOTE_IP REMOTE_MAC VNI PORT [--csum] [--tx-ring]\n");
        return 2;
    }
    int a = open_tap(argv[2]), b;
    if (pair) {
        b = open_tap(argv[3]);
    } else {
        b = open_uplink(argv[3]);
        if (tx_ring) open_ring(argv[3]);
        if (inet_pton(AF_INET, argv[4], &local_ip) != 1 || inet_pton(AF_INET, argv[5], &remote_ip) != 1
                || sscanf(argv[6], "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &remote_mac[0], &remote_mac[1],
                          &remote_mac[2], &remote_mac[3], &remote_mac[4], &remote_mac[5]) != 6) {
            fprintf(stderr, "vxfloor: bad address\n");
            return 2;
        }
        vni = (uint32_t)atoi(argv[7]);
        port = atoi(argv[8]);
    }
    sigset_t usr1, none;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigemptyset(&none);
    sigprocmask(SIG_BLOCK, &usr1, NULL);       /* delivered only inside ppoll: no lost report */
    signal(SIGUSR1, on_usr1);
    printf("ready\n");
    fflush(stdout);
    struct pollfd p[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
    for (;;) {
        if (ppoll(p, 2, NULL, &none) < 0 && errno != EINTR) die("ppoll");
        if (report) {
            report = 0;
            printf("tso ring %lu copy %lu\n", sent_ring, sent_copy);
            fflush(stdout);
        }
        int moved;
        do {
            moved = 0;
            for (int i = 0; i < 64 && from_tap(a, b, pair); i++) moved = 1;
            for (int i = 0; i < 64 && (pair ? from_tap(b, a, 1) : from_uplink(b, a)); i++) moved = 1;
        } while (moved);
    }
}
