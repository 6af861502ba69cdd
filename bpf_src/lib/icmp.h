/* PMTU: answer an oversize packet with ICMP frag-needed (v4) / packet-too-big
 * (v6) from the VIP, quoting the *original* client->VIP packet so the client
 * stack matches the error to its socket. Rate-limited per CPU. */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/csum.h"

#define NSEC 1000000000ULL

/* Token bucket: icmp_rate tokens/s, at most icmp_burst banked. */
L4LB_INLINE int icmp_allowed(struct lb_config *cfg)
{
    __u32 zero = 0;
    struct icmp_bucket *b = icmp_buckets.lookup(&zero);
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

/* Rebuild the frame in place: [eth][ip][icmp][quote of the original]. */
L4LB_INLINE int icmp_prepare(struct xdp_md *ctx, int hdr_len, int quote)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if (data + sizeof(*eth) + quote > data_end)
        return -2;  /* nothing sensible to quote */
    unsigned char mac[ETH_ALEN * 2];
    __builtin_memcpy(mac, eth->h_source, ETH_ALEN);       /* reply goes back to it */
    __builtin_memcpy(mac + ETH_ALEN, eth->h_dest, ETH_ALEN);
    __u16 proto = eth->h_proto;
    if (bpf_xdp_adjust_head(ctx, -hdr_len))
        return -1;
    int want = sizeof(*eth) + hdr_len + quote;
    int have = (long)ctx->data_end - (long)ctx->data;
    if (bpf_xdp_adjust_tail(ctx, want - have))
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

L4LB_INLINE int icmp4_too_big(struct xdp_md *ctx, struct pkt *p, __u16 mtu)
{
    int rc = icmp_prepare(ctx, IPV4_HLEN + sizeof(struct icmphdr), ICMP4_QUOTE);
    if (rc)
        return rc;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct iphdr *ip = data + sizeof(struct ethhdr);
    struct icmphdr *icmp = (void *)(ip + 1);
    __u8 *quote = (void *)(icmp + 1);
    if (quote + ICMP4_QUOTE > (__u8 *)data_end)
        return -1;
    ip->version = 4;
    ip->ihl = 5;
    ip->tos = 0;
    ip->tot_len = bpf_htons(IPV4_HLEN + sizeof(*icmp) + ICMP4_QUOTE);
    ip->id = 0;
    ip->frag_off = 0;
    ip->ttl = OUTER_TTL;
    ip->protocol = IPPROTO_ICMP;
    ip->check = 0;
    ip->saddr = p->dst[0];
    ip->daddr = p->src[0];
    ip->check = l4lb_ipv4_csum(ip);
    icmp->type = ICMP_DEST_UNREACH;
    icmp->code = ICMP_FRAG_NEEDED;
    icmp->checksum = 0;
    icmp->un.frag.__unused = 0;
    icmp->un.frag.mtu = bpf_htons(mtu);
    __s64 sum = bpf_csum_diff(0, 0, (void *)icmp, sizeof(*icmp), 0);
    sum = bpf_csum_diff(0, 0, (void *)quote, ICMP4_QUOTE, sum);
    icmp->checksum = l4lb_csum_fold((__u32)sum);
    return 0;
}

L4LB_INLINE int icmp6_too_big(struct xdp_md *ctx, struct pkt *p, __u32 mtu)
{
    int rc = icmp_prepare(ctx, IPV6_HLEN + sizeof(struct icmp6hdr), ICMP6_QUOTE);
    if (rc)
        return rc;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
    struct icmp6hdr *icmp6 = (void *)(ip6 + 1);
    __u8 *quote = (void *)(icmp6 + 1);
    if (quote + ICMP6_QUOTE > (__u8 *)data_end)
        return -1;
    __u32 plen = sizeof(*icmp6) + ICMP6_QUOTE;
    ip6->version = 6;
    ip6->priority = 0;
    ip6->flow_lbl[0] = 0;
    ip6->flow_lbl[1] = 0;
    ip6->flow_lbl[2] = 0;
    ip6->payload_len = bpf_htons(plen);
    ip6->nexthdr = IPPROTO_ICMPV6;
    ip6->hop_limit = OUTER_TTL;
    __builtin_memcpy(&ip6->saddr, p->dst, 16);
    __builtin_memcpy(&ip6->daddr, p->src, 16);
    icmp6->icmp6_type = ICMPV6_PKT_TOOBIG;
    icmp6->icmp6_code = 0;
    icmp6->icmp6_cksum = 0;
    icmp6->icmp6_mtu = bpf_htonl(mtu);
    /* Pseudo-header: addresses, upper-layer length, next header. */
    __u32 tail[2] = { bpf_htonl(plen), bpf_htonl(IPPROTO_ICMPV6) };
    __s64 sum = bpf_csum_diff(0, 0, (void *)&ip6->saddr, 32, 0);
    sum = bpf_csum_diff(0, 0, tail, sizeof(tail), sum);
    sum = bpf_csum_diff(0, 0, (void *)icmp6, sizeof(*icmp6), sum);
    sum = bpf_csum_diff(0, 0, (void *)quote, 512, sum);
    sum = bpf_csum_diff(0, 0, (void *)(quote + 512), ICMP6_QUOTE - 512, sum);
    icmp6->icmp6_cksum = l4lb_csum_fold((__u32)sum);
    return 0;
}
