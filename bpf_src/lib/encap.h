/* Encapsulation for Direct Server Return (IPIP / IP6IP6, and IPv4 in IPv6
 * for an IPv6 backend of an IPv4 VIP, RFC 2473), the outer source
 * policy, and the optional L4 DNAT of the inner destination port.
 *
 * Outer header policy: IHL 5 / no extension headers, TTL / hop limit 64,
 * TOS / traffic class copied from the inner packet, DF copied from the inner
 * packet (RFC 2003 3.1) and ID 0 when DF is set (RFC 6864: atomic datagrams),
 * else the inner ID. IPv6: the flow label carries flow-hash bits so backend
 * NICs and ECMP on the way spread flows. */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/csum.h"

#define GOLDEN32 2654435761U

/* Outer source: a configured prefix + flow-hash bits (stable per flow, spread
 * over the backends' RX queues), else the LB's address on the egress NIC. */
L4LB_INLINE int outer_source(int outer6, __u32 hash, struct lb_config *cfg, struct if_info *ifi, __u32 *src)
{
    if (!outer6) {
        if (cfg->flags & CFG_F_SRC_PREFIX4) {
            src[0] = cfg->src4_prefix | (bpf_htonl(hash) & cfg->src4_hostmask);
            return 0;
        }
        if (ifi && (ifi->flags & IF_F_V4)) {
            src[0] = ifi->v4;
            return 0;
        }
        return -1;
    }
    if (cfg->flags & CFG_F_SRC_PREFIX6) {
        __u32 h = hash;
#pragma unroll
        for (int i = 3; i >= 0; i--) {
            src[i] = cfg->src6_prefix[i] | (bpf_htonl(h) & cfg->src6_hostmask[i]);
            h *= GOLDEN32;
        }
        return 0;
    }
    if (ifi && (ifi->flags & IF_F_V6)) {
        __builtin_memcpy(src, ifi->v6, 16);
        return 0;
    }
    return -1;
}

/* Rewrite the inner destination port and fix the L4 checksum incrementally.
 * A UDP checksum of 0 means "none" (IPv4) and stays 0. */
L4LB_INLINE int dnat_port(struct xdp_md *ctx, struct pkt *p, __u16 new_port)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 off = p->l4_off;
    if (off > 0x3ff)
        return -1;
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *th = data + off;
        if ((void *)(th + 1) > data_end)
            return -1;
        th->check = l4lb_csum_replace16(th->check, th->dest, new_port);
        th->dest = new_port;
        return 0;
    }
    struct udphdr *uh = data + off;
    if ((void *)(uh + 1) > data_end)
        return -1;
    if (uh->check) {
        __u16 c = l4lb_csum_replace16(uh->check, uh->dest, new_port);
        uh->check = c ? c : 0xffff;
    }
    uh->dest = new_port;
    return 0;
}

/* Make room for the outer header and write the new Ethernet header in front
 * of it; returns the outer L3 header, or NULL. */
L4LB_INLINE void *encap_prepare(struct xdp_md *ctx, int hlen, __u16 eth_proto,
                                const unsigned char *smac, const unsigned char *dmac)
{
    if (bpf_xdp_adjust_head(ctx, -hlen))
        return 0;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) + IPV6_HLEN > data_end)  /* room for either header */
        return 0;
    __builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, smac, ETH_ALEN);
    eth->h_proto = eth_proto;
    return eth + 1;
}

L4LB_INLINE int encap_ipv4(struct xdp_md *ctx, struct pkt *p, __u32 saddr, __u32 daddr,
                           const unsigned char *smac, const unsigned char *dmac)
{
    struct iphdr *ip = encap_prepare(ctx, IPV4_HLEN, bpf_htons(ETH_P_IP), smac, dmac);
    if (!ip)
        return -1;
    ip->version = 4;
    ip->ihl = 5;
    ip->tos = p->tos;
    ip->tot_len = bpf_htons(p->l3_len + IPV4_HLEN);
    ip->id = p->df ? 0 : (__u16)p->id;
    ip->frag_off = p->df ? bpf_htons(L4LB_IP_DF) : 0;
    ip->ttl = OUTER_TTL;
    ip->protocol = IPPROTO_IPIP;
    ip->check = 0;
    ip->saddr = saddr;
    ip->daddr = daddr;
    ip->check = l4lb_ipv4_csum(ip);
    return 0;
}

L4LB_INLINE int encap_ipv6(struct xdp_md *ctx, struct pkt *p, __u32 *saddr, __u32 *daddr, __u32 hash,
                           const unsigned char *smac, const unsigned char *dmac)
{
    struct ipv6hdr *ip6 = encap_prepare(ctx, IPV6_HLEN, bpf_htons(ETH_P_IPV6), smac, dmac);
    if (!ip6)
        return -1;
    ip6->version = 6;
    ip6->priority = p->tos >> 4;
    ip6->flow_lbl[0] = ((p->tos & 0xf) << 4) | ((hash >> 16) & 0xf);
    ip6->flow_lbl[1] = (hash >> 8) & 0xff;
    ip6->flow_lbl[2] = hash & 0xff;
    ip6->payload_len = bpf_htons(p->l3_len);
    ip6->nexthdr = p->family == FAMILY_V4 ? IPPROTO_IPIP : IPPROTO_IPV6;  /* 4in6 / 6in6 */
    ip6->hop_limit = OUTER_TTL;
    __builtin_memcpy(&ip6->saddr, saddr, 16);
    __builtin_memcpy(&ip6->daddr, daddr, 16);
    return 0;
}

/* The outer IPv4 header gets an identification of its own (RFC 791, RFC 6864
 * 4.1), for an outer packet the kernel is about to fragment: the inner ID it
 * copied is not unique among outer datagrams (every fragment of one inner
 * datagram carries the same), and a backend reassembling two outer datagrams
 * with one ID would mix their fragments. */
L4LB_INLINE void encap_ipv4_fresh_id(struct xdp_md *ctx)
{
    struct iphdr *ip = (void *)(long)ctx->data + sizeof(struct ethhdr);
    if ((void *)(ip + 1) > (void *)(long)ctx->data_end)
        return;
    __u16 id = bpf_get_prandom_u32();
    ip->check = l4lb_csum_replace16(ip->check, ip->id, id);
    ip->id = id;
}
