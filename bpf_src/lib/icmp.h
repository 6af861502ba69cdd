/* Replies the datapath generates, sourced from the VIP and sent back with
 * XDP_TX: ICMP errors that quote the original client->VIP packet so the
 * client's stack matches them to its socket (frag-needed / packet-too-big
 * here, port unreachable in lib/reject.h), the rule on whom a reply may go
 * to, and the per-CPU token buckets that rate-limit each kind. */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/stats.h"
#include "lib/recorder.h"

#define NSEC 1000000000ULL

/* Type of the ICMP / ICMPv6 message p is (PARSE_ICMP), -1 if its header is
 * cut short by the frame or the IP length. */
L4LB_INLINE int icmp_type(struct xdp_md *ctx, struct pkt *p)
{
    __u32 off = p->l4_off;
    if (off > 0x3ff || off + 8 > l3_end(p))
        return -1;
    __u8 *h = (void *)(long)ctx->data + off;
    if ((void *)(h + 8) > (void *)(long)ctx->data_end)
        return -1;
    return h[0];
}

/* Token bucket of one kind of reply (enum l4lb_reply, one bucket each, so a
 * flood of one kind cannot use up another's): icmp_rate tokens/s per CPU,
 * at most icmp_burst banked. */
L4LB_INLINE int icmp_allowed(struct lb_config *cfg, __u32 kind)
{
    struct icmp_bucket *b = icmp_buckets.lookup(&kind);
    if (!b || !cfg->icmp_rate)
        return 0;
    __u64 now = bpf_ktime_get_ns();
    __u64 elapsed = now - b->last_ns;
    if (elapsed > 10 * NSEC)
        elapsed = 10 * NSEC;
    __u64 cap = (__u64)cfg->icmp_burst * NSEC;
    __u64 tokens = b->tokens_x1e9 + elapsed * cfg->icmp_rate;
    if (tokens > cap)
        tokens = cap;
    b->last_ns = now;
    if (tokens < NSEC) {
        b->tokens_x1e9 = tokens;
        return 0;
    }
    b->tokens_x1e9 = tokens - NSEC;
    return 1;
}

/* Whether the packet's source may be sent a reply at all. Never to an
 * address that names no single host: 0/8, 127/8, multicast and 240/4 (which
 * holds 255.255.255.255); ::, ::1 and ff00::/8 (RFC 1812 4.3.2.7, RFC 4443
 * 2.4(e.6), RFC 1122 3.2.2). Not for a frame sent to a link-layer multicast or
 * broadcast address, except a packet-too-big (RFC 4443 2.4(e.4/e.5)). Not
 * about a later IPv4 fragment (RFC 1812 4.3.2.7). */
L4LB_INLINE int reply_allowed(struct xdp_md *ctx, struct pkt *p, int packet_too_big)
{
    __u8 first = ((__u8 *)p->src)[0];
    if (p->family == FAMILY_V4) {
        if (first == 0 || first == 127 || first >= 224 || p->fragment == FRAG_LATER)
            return 0;
    } else {
        if (first == 0xff)
            return 0;
        if (!(p->src[0] | p->src[1] | p->src[2]) && (!p->src[3] || p->src[3] == bpf_htonl(1)))
            return 0;
    }
    if (packet_too_big && p->family == FAMILY_V6)
        return 1;
    __u8 *dmac = (void *)(long)ctx->data;
    if ((void *)(dmac + 1) > (void *)(long)ctx->data_end)
        return 0;
    return !(dmac[0] & 1);
}

/* Ones'-complement partial sum (32-bit words, native order) of `n` bytes at
 * data + off, n a multiple of 4 up to SUM_WORDS_MAX (an ICMPv6 error with its
 * pseudo-header addresses). A bounded loop: the quote length varies, and
 * bpf_csum_diff wants a size the verifier knows. */
#define SUM_WORDS_MAX (32 + 8 + ICMP6_QUOTE)
L4LB_INLINE __u64 sum_words(struct xdp_md *ctx, __u32 off, __u32 n)
{
    void *w = (void *)(long)ctx->data + off;
    void *data_end = (void *)(long)ctx->data_end;
    __u64 sum = 0;
#pragma clang loop unroll(disable)
    for (__u32 i = 0; i < SUM_WORDS_MAX / 4; i++) {
        void *next = w + 4;
        /* Keep the bounds check a packet-pointer comparison: clang would
         * otherwise move the constant onto data_end, which the verifier
         * refuses. */
        asm volatile("" : "+r"(next));
        if (i * 4 >= n || next > data_end)
            break;
        sum += *(__u32 *)w;
        w = next;
    }
    return sum;
}

/* Rebuild the frame in place: [eth][ip][icmp][quote of the original], the
 * quote starting at the original IP header (l3_off is always 14). */
L4LB_INLINE int icmp_prepare(struct xdp_md *ctx, int hdr_len, __u32 quote)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || data + sizeof(*eth) + quote > data_end)
        return -1;
    unsigned char mac[ETH_ALEN * 2];
    __builtin_memcpy(mac, eth->h_source, ETH_ALEN);       /* reply goes back to it */
    __builtin_memcpy(mac + ETH_ALEN, eth->h_dest, ETH_ALEN);
    __u16 proto = eth->h_proto;
    if (bpf_xdp_adjust_head(ctx, -hdr_len))
        return -1;
    int want = sizeof(*eth) + hdr_len + quote;
    if (bpf_xdp_adjust_tail(ctx, want - frame_len(ctx)))
        return -1;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    eth = data;
    if ((void *)(eth + 1) > data_end)
        return -1;
    __builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, mac + ETH_ALEN, ETH_ALEN);
    eth->h_proto = proto;
    return 0;
}

/* The IP header of a reply to p: from its destination back to its source.
 * IPv4: no options, ID 0 (and DF when `df`: an atomic datagram, RFC 6864). */
L4LB_INLINE void reply_ip4(struct iphdr *ip, struct pkt *p, __u8 proto, __u16 tot_len, int df)
{
    ip->version = 4;
    ip->ihl = 5;
    ip->tos = 0;
    ip->tot_len = bpf_htons(tot_len);
    ip->id = 0;
    ip->frag_off = df ? bpf_htons(L4LB_IP_DF) : 0;
    ip->ttl = OUTER_TTL;
    ip->protocol = proto;
    ip->check = 0;
    ip->saddr = p->dst[0];
    ip->daddr = p->src[0];
    ip->check = l4lb_ipv4_csum(ip);
}

L4LB_INLINE void reply_ip6(struct ipv6hdr *ip6, struct pkt *p, __u8 nexthdr, __u16 payload_len)
{
    ip6->version = 6;
    ip6->priority = 0;
    ip6->flow_lbl[0] = 0;
    ip6->flow_lbl[1] = 0;
    ip6->flow_lbl[2] = 0;
    ip6->payload_len = bpf_htons(payload_len);
    ip6->nexthdr = nexthdr;
    ip6->hop_limit = OUTER_TTL;
    __builtin_memcpy(&ip6->saddr, p->dst, 16);
    __builtin_memcpy(&ip6->daddr, p->src, 16);
}

/* ICMP error from the VIP to the client about packet p. `rest` is the
 * header's second word (network order): the MTU for frag-needed, else 0. */
L4LB_INLINE int icmp4_error(struct xdp_md *ctx, struct pkt *p, __u8 type, __u8 code, __u32 rest)
{
    __u32 quote = (p->l3_len < ICMP4_QUOTE ? p->l3_len : ICMP4_QUOTE) & ~3U;
    if (icmp_prepare(ctx, IPV4_HLEN + sizeof(struct icmphdr), quote))
        return -1;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct iphdr *ip = data + sizeof(struct ethhdr);
    struct icmphdr *icmp = (void *)(ip + 1);
    if ((void *)(icmp + 1) > data_end)
        return -1;
    reply_ip4(ip, p, IPPROTO_ICMP, IPV4_HLEN + sizeof(*icmp) + quote, 0);
    icmp->type = type;
    icmp->code = code;
    icmp->checksum = 0;
    icmp->un.gateway = rest;
    __u64 sum = sum_words(ctx, sizeof(struct ethhdr) + IPV4_HLEN, sizeof(*icmp) + quote);
    data = (void *)(long)ctx->data;
    icmp = data + sizeof(struct ethhdr) + IPV4_HLEN;
    if ((void *)(icmp + 1) > (void *)(long)ctx->data_end)
        return -1;
    icmp->checksum = l4lb_csum_fold(sum);
    return 0;
}

L4LB_INLINE int icmp6_error(struct xdp_md *ctx, struct pkt *p, __u8 type, __u8 code, __u32 rest)
{
    __u32 quote = (p->l3_len < ICMP6_QUOTE ? p->l3_len : ICMP6_QUOTE) & ~3U;
    if (icmp_prepare(ctx, IPV6_HLEN + sizeof(struct icmp6hdr), quote))
        return -1;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
    struct icmp6hdr *icmp6 = (void *)(ip6 + 1);
    if ((void *)(icmp6 + 1) > data_end)
        return -1;
    __u32 plen = sizeof(*icmp6) + quote;
    reply_ip6(ip6, p, IPPROTO_ICMPV6, plen);
    icmp6->icmp6_type = type;
    icmp6->icmp6_code = code;
    icmp6->icmp6_cksum = 0;
    icmp6->icmp6_dataun.un_data32[0] = rest;
    /* Pseudo-header: addresses, upper-layer length, next header. Then the
     * ICMPv6 header and the quote, which follow the addresses directly. */
    __u64 sum = (__u64)bpf_htonl(plen) + bpf_htonl(IPPROTO_ICMPV6);
    sum += sum_words(ctx, sizeof(struct ethhdr) + 8, 32 + plen);
    data = (void *)(long)ctx->data;
    icmp6 = data + sizeof(struct ethhdr) + IPV6_HLEN;
    if ((void *)(icmp6 + 1) > (void *)(long)ctx->data_end)
        return -1;
    icmp6->icmp6_cksum = l4lb_csum_fold(sum);
    return 0;
}

/* Too big for the next hop: ICMP frag-needed (type 3 code 4: DF was set,
 * RFC 792, RFC 1191) / packet-too-big (RFC 4443 3.2) carrying `mtu`, the
 * MTU left for the inner packet (the next hop's less our outer header,
 * which is 40 bytes for 4in6). */
L4LB_INLINE int too_big(struct xdp_md *ctx, struct pkt *p, struct lb_config *cfg, __u32 mtu, __u64 len)
{
    if (!reply_allowed(ctx, p, 1))
        return VERDICT(XDP_DROP, REASON_DROP_REPLY_FORBIDDEN, len);
    if (!icmp_allowed(cfg, REPLY_TOO_BIG))
        return VERDICT(XDP_DROP, REASON_DROP_ICMP_RATELIMIT, len);
    int rc;
    if (p->family == FAMILY_V4)
        rc = icmp4_error(ctx, p, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, bpf_htonl(mtu & 0xffff));
    else
        rc = icmp6_error(ctx, p, ICMPV6_PKT_TOOBIG, 0, bpf_htonl(mtu));
    if (rc)
        return VERDICT(XDP_DROP, REASON_DROP_HEADROOM, len);
    RECORD_OUT_REPLY(ctx, p, XDP_TX, REPLY_TOO_BIG);
    return VERDICT(XDP_TX, REASON_TX_ICMP_TOO_BIG, len);
}
