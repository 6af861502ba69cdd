/* Parsing: Ethernet, IPv4 (with options), IPv6 (skipping hop-by-hop, routing,
 * destination-options and fragment headers), TCP, UDP, and the fact that a
 * packet is ICMP. Every access is bounds-checked against the frame, and every
 * header must also lie within the IP packet's own length: bytes after it
 * (Ethernet padding, or a length field that lies) are not part of the packet
 * and are trimmed before it is sent on. Anything odd is reported, never
 * guessed. */
#pragma once
#include "lib/common.h"

#define PARSE_OK 0
#define PARSE_NOT_IP 1       /* not for us at all */
#define PARSE_MALFORMED 2    /* truncated, or length fields that disagree */
#define PARSE_NOT_L4 3       /* IP, but neither TCP/UDP nor ICMP of its family */
#define PARSE_ICMP 4         /* ICMP (v4) / ICMPv6 (v6); its header is not checked yet */
#define PARSE_EXT_LIMIT 5    /* IPv6 header chain longer than IPV6_MAX_EXT_HDRS */

/* Extension headers followed before giving up; a longer chain goes to the
 * kernel, counted as pass_ext_headers. Real traffic carries one or two
 * (RFC 8200 4.1 lists six kinds, each at most once but destination options);
 * every header more costs the verifier a walk of the rest of the program
 * (~13k instructions each, ~55k with the recorder), which it cannot spare. */
#define IPV6_MAX_EXT_HDRS 4

#define FRAG_NONE 0
#define FRAG_FIRST 1         /* offset 0, more to come: carries the L4 header */
#define FRAG_LATER 2         /* offset > 0: no L4 header; ports from lib/frag.h */

struct pkt {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;         /* network order */
    __u16 dport;         /* network order */
    __u8 proto;
    __u8 family;
    __u8 tos;            /* IPv4 TOS / IPv6 traffic class */
    __u8 tcp_flags;      /* byte 13 of the TCP header */
    __u8 fragment;       /* FRAG_* */
    __u8 df;             /* IPv4 DF set */
    __u16 l3_off;        /* offset of the IP header from data */
    __u16 l4_off;        /* offset of the L4 header from data */
    __u16 l3_len;        /* IPv4 total length / IPv6 40 + payload length */
    __u32 id;            /* IPv4 identification (network order, low 16 bits) / IPv6 fragment id */
};

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* Where the IP packet ends (offset from data), by its own length field. */
L4LB_INLINE __u32 l3_end(struct pkt *p)
{
    return (__u32)p->l3_off + p->l3_len;
}

L4LB_INLINE int parse_l4(void *data, void *data_end, struct pkt *p)
{
    void *l4 = data + p->l4_off;
    __u32 room = l3_end(p) - p->l4_off;   /* L4 bytes the IP length vouches for (l4_off <= l3_end) */
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *th = l4;
        if ((void *)(th + 1) > data_end)
            return PARSE_MALFORMED;
        if (th->doff < 5 || th->doff * 4 > room)   /* so room >= 20 too */
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
        /* RFC 768: the length covers header and data, i.e. the IP payload;
         * a first fragment carries only the start of it. */
        __u32 ulen = bpf_ntohs(uh->len);
        if (ulen < sizeof(*uh) || (p->fragment ? room < sizeof(*uh) || ulen < room : ulen != room))
            return PARSE_MALFORMED;
        p->sport = uh->source;
        p->dport = uh->dest;
        return PARSE_OK;
    }
    if (p->proto == (p->family == FAMILY_V4 ? IPPROTO_ICMP : IPPROTO_ICMPV6))
        return PARSE_ICMP;
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
    p->id = iph->id;
    __u16 frag = bpf_ntohs(iph->frag_off);
    p->df = !!(frag & L4LB_IP_DF);
    /* Two tests, not one and a select: the select doubled the verifier's work. */
    if (frag & L4LB_IP_OFFMASK)
        p->fragment = FRAG_LATER;
    else if (frag & L4LB_IP_MF)
        p->fragment = FRAG_FIRST;
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

    __u32 end = l3_end(p);
    __u8 nexthdr = ip6h->nexthdr;
    __u32 off = p->l3_off + sizeof(*ip6h);
#pragma unroll
    for (int i = 0; i < IPV6_MAX_EXT_HDRS; i++) {
        if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING || nexthdr == IPPROTO_DSTOPTS) {
            __u8 *ext = data + off;
            if ((void *)(ext + 2) > data_end || off + 2 > end)
                return PARSE_MALFORMED;
            nexthdr = ext[0];
            off += ((__u32)ext[1] + 1) * 8;
            if (off > end)
                return PARSE_MALFORMED;
        } else if (nexthdr == IPPROTO_FRAGMENT) {
            __u8 *ext = data + off;
            if ((void *)(ext + 8) > data_end || off + 8 > end)
                return PARSE_MALFORMED;
            nexthdr = ext[0];
            off += 8;
            __u16 offset_m = bpf_ntohs(*(__u16 *)(ext + 2));
            __builtin_memcpy(&p->id, ext + 4, 4);
            if (offset_m & 0xfff8) {
                /* Later fragment: what follows is payload, not headers. */
                p->fragment = FRAG_LATER;
                break;
            }
            /* Offset 0 without M is an atomic fragment, a whole packet
             * (RFC 6946); with M, the first fragment holds the whole header
             * chain (RFC 7112), so parsing goes on. */
            if (offset_m & 1)
                p->fragment = FRAG_FIRST;
        } else {
            break;
        }
    }
    if (p->fragment != FRAG_LATER && (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
                                      nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_FRAGMENT))
        return PARSE_EXT_LIMIT;
    p->proto = nexthdr;
    p->l4_off = off;
    return PARSE_OK;
}

/* Parse up to L4. Fills p; returns PARSE_*. A later fragment is PARSE_OK
 * without ports if it is TCP/UDP (lib/frag.h finds them), else PARSE_NOT_L4. */
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
    if (p->fragment == FRAG_LATER)
        return p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP ? PARSE_OK : PARSE_NOT_L4;
    return parse_l4(data, data_end, p);
}
