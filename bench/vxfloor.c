/* vxfloor: the least work a TAP + AF_PACKET VXLAN data path can do, to measure the floor
 * under vswitchd's cross-node figures (bench/floor.py builds and drives it; it is a
 * measuring instrument, not part of the switch).
 *
 *   vxfloor pair TAP_A TAP_B [--busy]
 *       two pod TAPs cross-connected: every frame read from one is written to the other,
 *       virtio-net header and all (the same-node floor).
 *   vxfloor vxlan TAP UPLINK LOCAL_IP REMOTE_IP REMOTE_MAC VNI PORT [--busy] [--csum]
 *       one pod TAP and a packet socket on UPLINK, an L2 VXLAN tunnel between them: frames
 *       from the pod leave encapsulated to REMOTE_IP/REMOTE_MAC (a TSO segment as UDP GSO
 *       packets of wire-size VXLAN datagrams, one sendmsg per 64 datagrams, as vswitchd's
 *       D54 does); VXLAN datagrams for PORT arrive decapsulated, a UDP GSO packet's TCP
 *       segments merged back into one TSO frame, one writev (vswitchd's D52).
 *
 * The TAPs are made here (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, 12-byte header, CSUM/TSO4/
 * TSO6 offloads, as vswitchd opens pod ports) in the caller's namespace; "ready" on stdout
 * says the caller may move them into pod namespaces. The loop sleeps in poll() (or spins
 * with --busy), then reads each fd until EAGAIN, one frame at a time.
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
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
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

static int busy, want_csum, port;
static uint32_t vni, local_ip, remote_ip;   /* network order */
static uint8_t local_mac[6], remote_mac[6];

static void die(const char *what) { perror(what); exit(1); }

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 255; }
static uint32_t be32(const uint8_t *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }
static void put32(uint8_t *p, uint32_t v) { put16(p, v >> 16); put16(p + 2, v & 0xffff); }

static uint64_t sum_bytes(const uint8_t *p, size_t n, uint64_t s) {
    while (n >= 8) { uint64_t w; memcpy(&w, p, 8); s += (w & 0xffffffff) + (w >> 32); p += 8; n -= 8; }
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

/* a TSO segment (IPv4/TCP) from the pod: UDP GSO packets of VXLAN datagrams */
static void encap_tso(int up, const uint8_t *f, size_t len, unsigned mss) {
    int ihl = (f[14] & 15) * 4, doff = (f[14 + ihl + 12] >> 4) * 4, hl = 14 + ihl + doff;
    if (f[14 + 9] != IPPROTO_TCP || hl > MAX_INNER_HDR || (size_t)hl >= len || mss == 0) return;
    size_t payload = len - hl;
    int segs = (int)((payload + mss - 1) / mss);
    unsigned dsz = VXLAN + hl + mss;
    int per = (65535 - 28) / dsz;
    if (per > MAX_SEGS) per = MAX_SEGS;
    uint32_t seq0 = be32(f + 14 + ihl + 4);
    uint16_t id0 = be16(f + 18), sport = 0xC000 | (be16(f + 14 + ihl) ^ be16(f + 14 + ihl + 2));
    uint8_t tcp_flags = f[14 + ihl + 13];
    uint8_t vnet[PKT_HDR], oh[OUTER];
    struct iovec iov[2 + 2 * MAX_SEGS];
    for (int k = 0; k < segs; k += per) {
        int cnt = segs - k < per ? segs - k : per, n = 2;
        unsigned total = 0;
        for (int j = 0; j < cnt; j++) {
            int s = k + j;
            size_t plen = payload - (size_t)s * mss < mss ? payload - (size_t)s * mss : mss;
            uint8_t *h = seghdr[j], *ip = h + VXLAN + 14, *tcp = ip + ihl;
            vxlan_hdr(h);
            memcpy(h + VXLAN, f, hl);
            put16(ip + 2, (uint16_t)(ihl + doff + plen));
            put16(ip + 4, (uint16_t)(id0 + s));
            ip_csum(ip, ihl);
            put32(tcp + 4, seq0 + (uint32_t)s * mss);
            tcp[13] = s == segs - 1 ? tcp_flags : tcp_flags & ~(TCP_FIN | TCP_PSH);
            tcp[16] = tcp[17] = 0;
            const uint8_t *data = f + hl + (size_t)s * mss;
            if (want_csum) {
                uint64_t sum = pseudo(ip, IPPROTO_TCP, doff + plen);
                sum = sum_bytes(tcp, doff, sum);
                uint16_t c = ~fold(sum_bytes(data, plen, sum));
                memcpy(tcp + 16, &c, 2);
            }
            iov[n].iov_base = h;
            iov[n++].iov_len = VXLAN + hl;
            iov[n].iov_base = (void *)data;
            iov[n++].iov_len = plen;
            total += VXLAN + hl + plen;
        }
        outer(oh, total, sport, 1);
        memset(vnet, 0, sizeof vnet);
        struct virtio_net_hdr *vh = (struct virtio_net_hdr *)vnet;
        vh->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vh->csum_start = 34;
        vh->csum_offset = 6;
        if (cnt > 1) {
            vh->gso_type = VIRTIO_NET_HDR_GSO_UDP_L4;
            vh->hdr_len = OUTER;
            vh->gso_size = dsz;
        }
        iov[0].iov_base = vnet; iov[0].iov_len = PKT_HDR;
        iov[1].iov_base = oh; iov[1].iov_len = OUTER;
        sendv(up, iov, n);
    }
}

/* TAP -> uplink (vxlan) or TAP -> TAP (pair); 0 when the TAP had nothing */
static int from_tap(int tap, int out, int pair) {
    ssize_t n = read(tap, tbuf, sizeof tbuf);
    if (n < 0) return 0;
    if (n < TAP_HDR + 14) return 1;
    if (pair) {
        ssize_t w = write(out, tbuf, n);
        (void)w;
        return 1;
    }
    struct virtio_net_hdr *th = (struct virtio_net_hdr *)tbuf;
    const uint8_t *f = tbuf + TAP_HDR;
    size_t len = n - TAP_HDR;
    if ((th->gso_type & ~VIRTIO_NET_HDR_GSO_ECN) == VIRTIO_NET_HDR_GSO_TCPV4 && be16(f + 12) == ETH_P_IP) {
        encap_tso(out, f, len, th->gso_size);
        return 1;
    }
    if (th->gso_type != VIRTIO_NET_HDR_GSO_NONE) return 1;         /* IPv6 TSO: not here */
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
    return 1;
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

int main(int argc, char **argv) {
    int pair;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--busy")) busy = 1;
        else if (!strcmp(argv[i], "--csum")) want_csum = 1;
    }
    if (argc >= 4 && !strcmp(argv[1], "pair")) pair = 1;
    else if (argc >= 9 && !strcmp(argv[1], "vxlan")) pair = 0;
    else {
        fprintf(stderr, "usage: vxfloor pair TAP_A TAP_B [--busy]\n"
                        "       vxfloor vxlan TAP UPLINK LOCAL_IP REMOTE_IP REMOTE_MAC VNI PORT [--busy] [--csum]\n");
        return 2;
    }
    int a = open_tap(argv[2]), b;
    if (pair) {
        b = open_tap(argv[3]);
    } else {
        b = open_uplink(argv[3]);
        if (inet_pton(AF_INET, argv[4], &local_ip) != 1 || inet_pton(AF_INET, argv[5], &remote_ip) != 1
                || sscanf(argv[6], "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &remote_mac[0], &remote_mac[1],
                          &remote_mac[2], &remote_mac[3], &remote_mac[4], &remote_mac[5]) != 6) {
            fprintf(stderr, "vxfloor: bad address\n");
            return 2;
        }
        vni = (uint32_t)atoi(argv[7]);
        port = atoi(argv[8]);
    }
    printf("ready\n");
    fflush(stdout);
    struct pollfd p[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
    for (;;) {
        if (!busy && poll(p, 2, -1) < 0 && errno != EINTR) die("poll");
        int moved;
        do {
            moved = 0;
            for (int i = 0; i < 64 && from_tap(a, b, pair); i++) moved = 1;
            for (int i = 0; i < 64 && (pair ? from_tap(b, a, 1) : from_uplink(b, a)); i++) moved = 1;
        } while (moved);
    }
}
