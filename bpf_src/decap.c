// SPDX-License-Identifier: Apache-2.0
//
// Backend-side decapsulator (test lab only).
//
// The load balancer sends IPIP / IP6IP6 packets to backends (direct server
// return).  A real backend decapsulates with the kernel's ipip / ip6_tunnel
// modules; the lab kernel has neither, so the lab attaches this XDP program to
// each backend's NIC instead.  It
//   * looks at outer IPv4 (protocol 4 = IPv4-in-IPv4, 41 = IPv6-in-IPv4) and
//     outer IPv6 (next header 41 = IPv6-in-IPv6, 4 = IPv4-in-IPv6),
//   * decapsulates only when the outer destination is in `decap_addrs` (the
//     backend's own addresses, written by the loader),
//   * strips the outer header with bpf_xdp_adjust_head(+20 / +40), writes the
//     Ethernet header back in front with the inner packet's ethertype and
//     returns XDP_PASS: the kernel then delivers the inner packet to the VIP
//     held on `lo`.
// Everything else is XDP_PASS, untouched.
//
// Limits (deliberate, this is a lab tool): outer IPv4 must have IHL 5 (no
// options) and must not be a fragment; outer IPv6 must carry the tunnel
// directly in its fixed header (no extension headers); no VLAN tags.  Such
// packets are counted as DECAP_UNSUPPORTED and passed untouched (the kernel
// then drops them: it has no tunnel device).  The outer IPv4 header checksum
// is not verified.
//
// The same object also holds `xdp_pass`, a program that only returns
// XDP_PASS.  The lab attaches it to the bridge-side peer of the LB's veth:
// frames sent with XDP_TX / XDP_REDIRECT into a veth are dropped unless the
// peer end runs an XDP program.

#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>

#define DECAP_V4           0   // outer IPv4 stripped
#define DECAP_V6           1   // outer IPv6 stripped
#define DECAP_NOT_LOCAL    2   // tunnel packet, outer destination not ours: passed
#define DECAP_UNSUPPORTED  3   // tunnel packet we do not handle (IHL!=5, fragment, bad inner): passed
#define DECAP_ERROR        4   // bpf_xdp_adjust_head failed: passed untouched
#define DECAP_STATS_MAX    5

// Outer destination addresses this backend decapsulates.  IPv4 is stored as
// an IPv4-mapped IPv6 address (::ffff:a.b.c.d).  The value counts packets
// decapsulated for that address (per CPU).
struct decap_addr {
    __u8 addr[16];
};

BPF_PERCPU_HASH(decap_addrs, struct decap_addr, __u64, 256);
BPF_PERCPU_ARRAY(decap_stats, __u64, DECAP_STATS_MAX);

static __always_inline void decap_count(__u32 idx)
{
    __u64 *v = decap_stats.lookup(&idx);
    if (v)
        *v += 1;
}

// Strip `outer_len` bytes that follow the Ethernet header and rebuild the
// Ethernet header in front of the inner packet.  Returns XDP_PASS on success
// or when nothing was changed, XDP_DROP if the packet was already modified
// and cannot be repaired (cannot happen with a sane kernel).
static __always_inline int decap_strip(struct xdp_md *ctx, int outer_len, __u16 inner_proto)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct ethhdr saved;

    if (data + sizeof(*eth) > data_end)
        return XDP_PASS;
    __builtin_memcpy(&saved, eth, sizeof(saved));

    if (bpf_xdp_adjust_head(ctx, outer_len)) {
        decap_count(DECAP_ERROR);
        return XDP_PASS;
    }

    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    eth = data;
    if (data + sizeof(*eth) > data_end)
        return XDP_DROP;
    __builtin_memcpy(eth->h_dest, saved.h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_source, saved.h_source, ETH_ALEN);
    eth->h_proto = bpf_htons(inner_proto);
    return XDP_PASS;
}

// Checks that an inner header of the announced family fits in the packet.
static __always_inline int inner_ok(void *inner, void *data_end, __u8 tunnel_proto)
{
    if (tunnel_proto == IPPROTO_IPIP) {
        struct iphdr *ip = inner;
        if ((void *)(ip + 1) > data_end)
            return 0;
        return ip->version == 4 && ip->ihl >= 5;
    }
    struct ipv6hdr *ip6 = inner;
    if ((void *)(ip6 + 1) > data_end)
        return 0;
    return ip6->version == 6;
}

static __always_inline __u16 inner_ethertype(__u8 tunnel_proto)
{
    return tunnel_proto == IPPROTO_IPIP ? ETH_P_IP : ETH_P_IPV6;
}

static __always_inline int handle_v4(struct xdp_md *ctx, struct iphdr *ip, void *data_end)
{
    struct decap_addr key = {};
    __u64 *cnt;

    if ((void *)(ip + 1) > data_end)
        return XDP_PASS;
    if (ip->protocol != IPPROTO_IPIP && ip->protocol != IPPROTO_IPV6)
        return XDP_PASS;
    if (ip->version != 4 || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff))) {
        decap_count(DECAP_UNSUPPORTED);
        return XDP_PASS;
    }
    key.addr[10] = 0xff;
    key.addr[11] = 0xff;
    __builtin_memcpy(&key.addr[12], &ip->daddr, 4);
    cnt = decap_addrs.lookup(&key);
    if (!cnt) {
        decap_count(DECAP_NOT_LOCAL);
        return XDP_PASS;
    }
    if (!inner_ok((void *)(ip + 1), data_end, ip->protocol)) {
        decap_count(DECAP_UNSUPPORTED);
        return XDP_PASS;
    }
    __u16 proto = inner_ethertype(ip->protocol);
    *cnt += 1;
    decap_count(DECAP_V4);
    return decap_strip(ctx, sizeof(struct iphdr), proto);
}

static __always_inline int handle_v6(struct xdp_md *ctx, struct ipv6hdr *ip6, void *data_end)
{
    struct decap_addr key = {};
    __u64 *cnt;

    if ((void *)(ip6 + 1) > data_end)
        return XDP_PASS;
    if (ip6->nexthdr != IPPROTO_IPV6 && ip6->nexthdr != IPPROTO_IPIP)
        return XDP_PASS;
    if (ip6->version != 6) {
        decap_count(DECAP_UNSUPPORTED);
        return XDP_PASS;
    }
    __builtin_memcpy(key.addr, &ip6->daddr, 16);
    cnt = decap_addrs.lookup(&key);
    if (!cnt) {
        decap_count(DECAP_NOT_LOCAL);
        return XDP_PASS;
    }
    if (!inner_ok((void *)(ip6 + 1), data_end, ip6->nexthdr)) {
        decap_count(DECAP_UNSUPPORTED);
        return XDP_PASS;
    }
    __u16 proto = inner_ethertype(ip6->nexthdr);
    *cnt += 1;
    decap_count(DECAP_V6);
    return decap_strip(ctx, sizeof(struct ipv6hdr), proto);
}

int xdp_decap(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return XDP_PASS;
    if (eth->h_proto == bpf_htons(ETH_P_IP))
        return handle_v4(ctx, (void *)(eth + 1), data_end);
    if (eth->h_proto == bpf_htons(ETH_P_IPV6))
        return handle_v6(ctx, (void *)(eth + 1), data_end);
    return XDP_PASS;
}

int xdp_pass(struct xdp_md *ctx)
{
    return XDP_PASS;
}
