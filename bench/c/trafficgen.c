/* Frame generator for bench/traffic.py: TCP frames to one VIP through an
 * AF_PACKET socket, as fast as one core can, for a fixed time.
 *
 * Why our own: BPF_F_TEST_XDP_LIVE_FRAMES answers EPERM on the bench VM and
 * Debian's xdp-trafficgen fails on its kernel (NOTES.md); a Python sender
 * makes a few hundred thousand frames a second. This one writes a fresh
 * header and fresh IPv4/TCP checksums into every frame (so every frame can be
 * a new flow, and a same-flow run costs the sender exactly as much), sends
 * them with sendmmsg in batches of 256 and bypasses the qdisc
 * (PACKET_QDISC_BYPASS), as a NIC's driver would see them.
 *
 * Flow number j is client port 1 + j % 65535 with the last byte of the client
 * address (j / 65535) % 256: the numbering of l4lb/lab/flows.py.
 *
 *   trafficgen -i IFACE -s SRC_MAC -d DST_MAC -c CLIENT -v VIP [-p PORT]
 *              [-n FLOWS] [-f FIRST] [-F S|A] [-t SECONDS] [-C CPU] [-l LEN] [-Y]
 *
 * -Y: sched_yield() after a batch the interface did not take whole (its ring
 * full), so that a NAPI kernel thread on the same CPU (threaded NAPI) gets
 * to drain it rather than wait for the end of the sender's time slice.
 *
 * -n 1: every frame is flow FIRST; -n 0: flow FIRST, FIRST+1, ... (a new flow
 * every frame). Prints one line: sent=N failed=N seconds=S cpu_seconds=C next=J
 * (cpu_seconds: this thread's CPU time, which also holds the softirq work
 * (veth NAPI, both XDP programs) the kernel ran in its context). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/ip6.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 256
#define MAX_LEN 256
#define FLOWS_PER_BYTE 65535u
#define FLOW_SPACE (FLOWS_PER_BYTE * 256u)

struct gen {
    unsigned char tmpl[MAX_LEN];  /* the frame with flow 0's fields */
    size_t len, l4, last;         /* frame length, TCP offset, offset of the client address's last byte */
    int v6;
};

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static uint32_t sum16(const unsigned char *p, size_t n, uint32_t sum)
{
    for (size_t i = 0; i + 1 < n; i += 2)
        sum += (uint32_t)p[i] << 8 | p[i + 1];
    if (n & 1)
        sum += (uint32_t)p[n - 1] << 8;
    return sum;
}

static uint16_t fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void parse_mac(const char *s, unsigned char *mac)
{
    if (sscanf(s, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) != 6) {
        fprintf(stderr, "bad MAC address %s\n", s);
        exit(2);
    }
}

/* The template: Ethernet + IPv4/IPv6 + TCP (flags, window, no options) + zero payload. */
static void build(struct gen *g, const unsigned char *src_mac, const unsigned char *dst_mac, const char *client,
                  const char *vip, uint16_t dport, uint8_t flags, size_t len)
{
    struct ether_header *eth = (void *)g->tmpl;
    g->v6 = strchr(vip, ':') != NULL;
    size_t l3 = sizeof(*eth), ip_len = g->v6 ? sizeof(struct ip6_hdr) : sizeof(struct ip);
    g->l4 = l3 + ip_len;
    if (len < g->l4 + sizeof(struct tcphdr))
        len = g->l4 + sizeof(struct tcphdr);
    if (len > MAX_LEN) {
        fprintf(stderr, "frame length %zu > %d\n", len, MAX_LEN);
        exit(2);
    }
    g->len = len;
    memcpy(eth->ether_shost, src_mac, ETH_ALEN);
    memcpy(eth->ether_dhost, dst_mac, ETH_ALEN);
    if (g->v6) {
        struct ip6_hdr *ip6 = (void *)(g->tmpl + l3);
        eth->ether_type = htons(ETHERTYPE_IPV6);
        ip6->ip6_flow = htonl(6u << 28);
        ip6->ip6_plen = htons((uint16_t)(len - g->l4));
        ip6->ip6_nxt = IPPROTO_TCP;
        ip6->ip6_hlim = 64;
        if (inet_pton(AF_INET6, client, &ip6->ip6_src) != 1 || inet_pton(AF_INET6, vip, &ip6->ip6_dst) != 1)
            goto bad;
        g->last = l3 + offsetof(struct ip6_hdr, ip6_src) + 15;
    } else {
        struct ip *ip = (void *)(g->tmpl + l3);
        eth->ether_type = htons(ETHERTYPE_IP);
        ip->ip_v = 4;
        ip->ip_hl = 5;
        ip->ip_len = htons((uint16_t)(len - l3));
        ip->ip_off = htons(IP_DF);
        ip->ip_ttl = 64;
        ip->ip_p = IPPROTO_TCP;
        if (inet_pton(AF_INET, client, &ip->ip_src) != 1 || inet_pton(AF_INET, vip, &ip->ip_dst) != 1)
            goto bad;
        g->last = l3 + offsetof(struct ip, ip_src) + 3;
    }
    struct tcphdr *tcp = (void *)(g->tmpl + g->l4);
    tcp->th_dport = htons(dport);
    tcp->th_seq = htonl(1);
    tcp->th_off = 5;
    tcp->th_flags = flags;
    tcp->th_win = htons(65535);
    return;
bad:
    fprintf(stderr, "bad address %s or %s (both IPv4 or both IPv6)\n", client, vip);
    exit(2);
}

/* Frame `out` = the template as flow j, with its checksums. */
static void make(const struct gen *g, unsigned char *out, uint32_t j)
{
    size_t l3 = sizeof(struct ether_header);
    memcpy(out, g->tmpl, g->len);
    uint16_t port = (uint16_t)(1 + j % FLOWS_PER_BYTE);
    out[g->last] = (unsigned char)(j / FLOWS_PER_BYTE);
    out[g->l4] = port >> 8;
    out[g->l4 + 1] = port & 0xff;
    /* TCP checksum: pseudo header (addresses, protocol, length) + segment. */
    size_t seg = g->len - g->l4;
    uint32_t sum = IPPROTO_TCP + (uint32_t)seg;
    if (g->v6) {
        sum = sum16(out + l3 + offsetof(struct ip6_hdr, ip6_src), 32, sum);
    } else {
        struct ip *ip = (void *)(out + l3);
        sum = sum16(out + l3 + offsetof(struct ip, ip_src), 8, sum);
        uint16_t c = fold(sum16(out + l3, sizeof(*ip), 0));
        ip->ip_sum = htons(c);
    }
    uint16_t c = fold(sum16(out + g->l4, seg, sum));
    ((struct tcphdr *)(out + g->l4))->th_sum = htons(c);
}

static double clock_s(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now(void)
{
    return clock_s(CLOCK_MONOTONIC);
}

int main(int argc, char **argv)
{
    const char *ifname = NULL, *client = NULL, *vip = NULL;
    unsigned char src_mac[ETH_ALEN], dst_mac[ETH_ALEN];
    int have_src = 0, have_dst = 0, cpu = -1, yield = 0, opt;
    unsigned long flows = 1, first = 0, dport = 80, len = 64;
    double seconds = 1.0;
    uint8_t flags = TH_ACK;

    while ((opt = getopt(argc, argv, "i:s:d:c:v:p:n:f:F:t:C:l:Y")) != -1) {
        switch (opt) {
        case 'i': ifname = optarg; break;
        case 's': parse_mac(optarg, src_mac); have_src = 1; break;
        case 'd': parse_mac(optarg, dst_mac); have_dst = 1; break;
        case 'c': client = optarg; break;
        case 'v': vip = optarg; break;
        case 'p': dport = strtoul(optarg, NULL, 10); break;
        case 'n': flows = strtoul(optarg, NULL, 10); break;
        case 'f': first = strtoul(optarg, NULL, 10); break;
        case 'F': flags = optarg[0] == 'S' ? TH_SYN : TH_ACK; break;
        case 't': seconds = atof(optarg); break;
        case 'C': cpu = atoi(optarg); break;
        case 'l': len = strtoul(optarg, NULL, 10); break;
        case 'Y': yield = 1; break;
        default:
            fprintf(stderr, "usage: %s -i IFACE -s SRC_MAC -d DST_MAC -c CLIENT -v VIP [-p PORT] [-n FLOWS] "
                            "[-f FIRST] [-F S|A] [-t SECONDS] [-C CPU] [-l LEN] [-Y]\n", argv[0]);
            return 2;
        }
    }
    if (!ifname || !client || !vip || !have_src || !have_dst || flows > 1 || dport > 65535) {
        fprintf(stderr, "%s: -i, -s, -d, -c and -v are required; -n is 0 or 1\n", argv[0]);
        return 2;
    }
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (sched_setaffinity(0, sizeof(set), &set))
            die("sched_setaffinity");
    }

    static struct gen g;
    build(&g, src_mac, dst_mac, client, vip, (uint16_t)dport, flags, len);

    /* Protocol 0: this socket sends only, it receives nothing. */
    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0)
        die("socket(AF_PACKET)");
    int one = 1;
    if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)))
        die("PACKET_QDISC_BYPASS");
    struct sockaddr_ll sll = { .sll_family = AF_PACKET, .sll_ifindex = (int)if_nametoindex(ifname) };
    if (!sll.sll_ifindex)
        die(ifname);
    if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)))
        die("bind");

    static unsigned char frames[BATCH][MAX_LEN];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = frames[i];
        iov[i].iov_len = g.len;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }

    unsigned long long sent = 0, failed = 0;
    uint32_t j = (uint32_t)(first % FLOW_SPACE);
    double t0 = now(), t = t0, c0 = clock_s(CLOCK_THREAD_CPUTIME_ID);
    while (t - t0 < seconds) {
        for (int i = 0; i < BATCH; i++) {
            make(&g, frames[i], j);
            if (flows == 0 && ++j == FLOW_SPACE)
                j = 0;
        }
        int r = sendmmsg(fd, msgs, BATCH, 0);
        if (r < 0) {
            if (errno != ENOBUFS && errno != EAGAIN)
                die("sendmmsg");
            r = 0;
        }
        if (yield && r < BATCH)
            sched_yield();
        sent += (unsigned)r;
        failed += BATCH - (unsigned)r;
        t = now();
    }
    printf("sent=%llu failed=%llu seconds=%.6f cpu_seconds=%.6f next=%u\n", sent, failed, t - t0,
           clock_s(CLOCK_THREAD_CPUTIME_ID) - c0, j);
    return 0;
}
