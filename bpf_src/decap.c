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
//
// And `tc_reply_sport` (tc egress, at the end of this file): the backend half
// of L4 DNAT, which gives DSR replies the service port back.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

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

// ---------------------------------------------------------------------------
// Reply source-port rewrite for L4 DNAT (tc clsact egress, direct action).
//
// With `l4_dnat` the LB sends VIP:8000 to a backend serving on 8080.  With
// direct server return the reply leaves the backend from VIP:8080, which the
// client does not expect.  A real backend fixes that with a stateless
// nftables rule (`ip saddr VIP tcp sport 8080 tcp sport set 8000`); the lab
// kernel has no nftables, so the lab attaches `tc_reply_sport` to the
// backend's NIC egress instead.  For TCP / UDP packets from a VIP whose
// (family, VIP, protocol, source port) is in `reply_rewrites`, it sets the
// source port to the service port and fixes the L4 checksum incrementally
// with bpf_l4_csum_replace.  That is right whatever the skb's checksum state:
// a full checksum is updated; with CHECKSUM_PARTIAL (TCP at tc egress: the
// field holds only the pseudo-header sum, the device or
// skb_checksum_help finishes it later over the new port) the kernel leaves the
// field alone, since a port is not part of the pseudo-header.  A UDP checksum
// of 0 ("none", IPv4) stays 0 (BPF_F_MARK_MANGLED_0).
// Everything else returns TC_ACT_OK untouched.  Limits (lab tool): IPv6 only
// when TCP/UDP follows the fixed header directly (no extension headers);
// IPv4 non-first fragments are left alone (they carry no ports).

struct reply_rewrite_key {
    __u8 family;        // 4 or 6
    __u8 proto;         // IPPROTO_TCP / IPPROTO_UDP
    __be16 port;        // backend port (the reply's source port before rewrite)
    __u8 addr[16];      // VIP; IPv4 as ::ffff:a.b.c.d
};

struct reply_rewrite_val {
    __be16 port;        // service port (the reply's source port after rewrite)
    __u16 pad16;
    __u32 pad32;
    __u64 packets;      // packets rewritten by this rule (all backends sharing the object)
};

BPF_HASH(reply_rewrites, struct reply_rewrite_key, struct reply_rewrite_val, 1024);

#define L4_SPORT_OFF 0
#define TCP_CSUM_OFF 16
#define UDP_CSUM_OFF 6

static __always_inline int reply_sport_rewrite(struct __sk_buff *skb, struct reply_rewrite_key *key,
                                               __u32 l4_off)
{
    __be16 sport;
    struct reply_rewrite_val *val;
    __u32 csum_off;
    __u64 flags = sizeof(__u16);

    if (key->proto == IPPROTO_TCP) {
        csum_off = l4_off + TCP_CSUM_OFF;
    } else if (key->proto == IPPROTO_UDP) {
        csum_off = l4_off + UDP_CSUM_OFF;
        flags |= BPF_F_MARK_MANGLED_0;
    } else {
        return TC_ACT_OK;
    }
    if (bpf_skb_load_bytes(skb, l4_off + L4_SPORT_OFF, &sport, sizeof(sport)))
        return TC_ACT_OK;
    key->port = sport;
    val = reply_rewrites.lookup(key);
    if (!val)
        return TC_ACT_OK;
    __be16 to = val->port;
    // checksum first (it reads the field, not the port), then the port itself
    if (bpf_l4_csum_replace(skb, csum_off, sport, to, flags))
        return TC_ACT_OK;
    if (bpf_skb_store_bytes(skb, l4_off + L4_SPORT_OFF, &to, sizeof(to), 0))
        return TC_ACT_SHOT;     // checksum already changed for a port we could not write
    __sync_fetch_and_add(&val->packets, 1);
    return TC_ACT_OK;
}

int tc_reply_sport(struct __sk_buff *skb)
{
    struct reply_rewrite_key key = {};

    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
            return TC_ACT_OK;
        if (ip.version != 4 || ip.ihl < 5 || (ip.frag_off & bpf_htons(0x1fff)))
            return TC_ACT_OK;
        key.family = 4;
        key.proto = ip.protocol;
        key.addr[10] = 0xff;
        key.addr[11] = 0xff;
        __builtin_memcpy(&key.addr[12], &ip.saddr, 4);
        return reply_sport_rewrite(skb, &key, ETH_HLEN + ip.ihl * 4);
    }
    if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
            return TC_ACT_OK;
        if (ip6.version != 6)
            return TC_ACT_OK;
        key.family = 6;
        key.proto = ip6.nexthdr;
        __builtin_memcpy(key.addr, &ip6.saddr, 16);
        return reply_sport_rewrite(skb, &key, ETH_HLEN + sizeof(ip6));
    }
    return TC_ACT_OK;
}
