/* Parsing: Ethernet, IPv4 (with options), IPv6 (skipping hop-by-hop, routing
 * and destination-options headers), TCP, UDP. Every access is bounds-checked;
 * anything odd is reported, never guessed. */
#pragma once
#include "lib/common.h"

#define PARSE_OK 0
#define PARSE_NOT_IP 1       /* not for us at all */
#define PARSE_MALFORMED 2    /* truncated or inconsistent */
#define PARSE_NOT_L4 3       /* IP but not TCP/UDP */

#define IPV6_MAX_EXT_HDRS 4

struct pkt {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;         /* network order */
    __u16 dport;         /* network order */
    __u8 proto;
    __u8 family;
    __u8 tos;            /* IPv4 TOS / IPv6 traffic class */
    __u8 tcp_flags;      /* byte 13 of the TCP header */
    __u8 fragment;       /* IPv4 MF/offset set, or an IPv6 fragment header */
    __u8 df;             /* IPv4 DF set */
    __u16 l3_off;        /* offset of the IP header from data */
    __u16 l4_off;        /* offset of the L4 header from data */
    __u16 l3_len;        /* IPv4 total length / IPv6 40 + payload length */
    __u16 ip_id;         /* IPv4 identification, network order */
};

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

L4LB_INLINE int parse_l4(void *data, void *data_end, struct pkt *p)
{
    void *l4 = data + p->l4_off;
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return PARSE_MALFORMED;
        if (th->doff < 5)
            return PARSE_MALFORMED;
        p->sport = th->source;
        p->dport = th->dest;
        p->tcp_flags = ((__u8 *)th)[13];
        return PARSE_OK;
    }
    if (p->proto == IPPROTO_UDP) {
        struct udphdr *uh = l4;
        if ((void *)(uh + 1) > data_end)
            return PARSE_MALFORMED;
        p->sport = uh->source;
        p->dport = uh->dest;
        return PARSE_OK;
    }
    return PARSE_NOT_L4;
}

L4LB_INLINE int parse_ipv4(void *data, void *data_end, struct pkt *p)
{
    struct iphdr *iph = data + p->l3_off;
    if ((void *)(iph + 1) > data_end)
        return PARSE_MALFORMED;
    __u32 ihl = iph->ihl * 4;
    if (iph->version != 4 || ihl < sizeof(*iph))
        return PARSE_MALFORMED;
    if (data + p->l3_off + ihl > data_end)
        return PARSE_MALFORMED;
    __u16 tot_len = bpf_ntohs(iph->tot_len);
    if (tot_len < ihl || data + p->l3_off + tot_len > data_end)
        return PARSE_MALFORMED;
    p->family = FAMILY_V4;
    p->src[0] = iph->saddr;
    p->dst[0] = iph->daddr;
    p->proto = iph->protocol;
    p->tos = iph->tos;
    p->l3_len = tot_len;
    p->ip_id = iph->id;
    __u16 frag = bpf_ntohs(iph->frag_off);
    p->df = !!(frag & L4LB_IP_DF);
    p->fragment = !!(frag & (L4LB_IP_MF | L4LB_IP_OFFMASK));
    p->l4_off = p->l3_off + ihl;
    return PARSE_OK;
}

L4LB_INLINE int parse_ipv6(void *data, void *data_end, struct pkt *p)
{
    struct ipv6hdr *ip6h = data + p->l3_off;
    if ((void *)(ip6h + 1) > data_end)
        return PARSE_MALFORMED;
    if (ip6h->version != 6)
        return PARSE_MALFORMED;
    __u16 plen = bpf_ntohs(ip6h->payload_len);
    if (data + p->l3_off + sizeof(*ip6h) + plen > data_end)
        return PARSE_MALFORMED;
    p->family = FAMILY_V6;
    __builtin_memcpy(p->src, &ip6h->saddr, 16);
    __builtin_memcpy(p->dst, &ip6h->daddr, 16);
    p->tos = (ip6h->priority << 4) | (ip6h->flow_lbl[0] >> 4);
    p->l3_len = sizeof(*ip6h) + plen;

    __u8 nexthdr = ip6h->nexthdr;
    __u32 off = p->l3_off + sizeof(*ip6h);
#pragma unroll
    for (int i = 0; i < IPV6_MAX_EXT_HDRS; i++) {
        if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_DSTOPTS) {
            __u8 *ext = data + off;
            if ((void *)(ext + 2) > data_end)
                return PARSE_MALFORMED;
            nexthdr = ext[0];
            off += ((__u32)ext[1] + 1) * 8;
            if (off > 0xffff)
                return PARSE_MALFORMED;
        } else if (nexthdr == IPPROTO_FRAGMENT) {
            __u8 *ext = data + off;
            if ((void *)(ext + 8) > data_end)
                return PARSE_MALFORMED;
            p->fragment = 1;
            nexthdr = ext[0];
            off += 8;
        } else {
            break;
        }
    }
    p->proto = nexthdr;
    p->l4_off = off;
    return PARSE_OK;
}

/* Parse up to L4. Fills p; returns PARSE_*. */
L4LB_INLINE int parse_packet(struct xdp_md *ctx, struct pkt *p)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return PARSE_NOT_IP;
    __u16 proto = eth->h_proto;
    p->l3_off = sizeof(*eth);
    int rc;
    if (proto == bpf_htons(ETH_P_IP))
        rc = parse_ipv4(data, data_end, p);
    else if (proto == bpf_htons(ETH_P_IPV6))
        rc = parse_ipv6(data, data_end, p);
    else
        return PARSE_NOT_IP;
    if (rc != PARSE_OK)
        return rc;
    if (p->fragment)
        return PARSE_OK;   /* ports may be absent: the caller decides */
    return parse_l4(data, data_end, p);
}
