/* Ping to a VIP. With DSR the VIP lives on the backends' loopbacks, not on
 * the LB, so nobody would answer an echo request, and operators lose their
 * first reachability check. The LB answers for the VIPs whose services ask
 * for it (options.answer_ping: VIP_F_PING in `vips`): the reply is the
 * request with the addresses swapped and the type changed, identifier,
 * sequence number and data unchanged (RFC 792 echo; RFC 4443 4.1-4.2),
 * checksums updated incrementally (RFC 1624). Rate-limited in its own bucket
 * (REPLY_ECHO), never to a source reply_allowed() forbids.
 *
 * Left to the kernel (pass_not_service, as any ICMP not for us): requests to
 * other addresses or to VIPs that do not answer, and requests with IPv4
 * options or IPv6 extension headers (RFC 1122 3.2.2.6 wants record-route and
 * timestamp options updated in the reply; not worth it for a ping).
 * Fragmented requests (larger than the MTU) are not answered: they would
 * have to be reassembled first. */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/stats.h"
#include "lib/lookup.h"
#include "lib/icmp.h"

L4LB_INLINE int echo_reply(struct xdp_md *ctx, struct pkt *p, __u64 len)
{
    int v4 = p->family == FAMILY_V4;
    int iph = v4 ? IPV4_HLEN : IPV6_HLEN;
    struct vip_info *vip = vip_lookup(p);
    if (!vip || !(vip->flags & VIP_F_PING) || p->l4_off != p->l3_off + iph || p->l3_len < iph + 8)
        return VERDICT(XDP_PASS, REASON_PASS_NOT_SERVICE, len);
    __u32 zero = 0;
    struct lb_config *cfg = config.lookup(&zero);
    if (!cfg)
        return VERDICT(XDP_PASS, REASON_PASS_NOT_SERVICE, len);
    if (!reply_allowed(ctx, p, 0))
        return VERDICT(XDP_DROP, REASON_DROP_REPLY_FORBIDDEN, len);
    if (!icmp_allowed(cfg, REPLY_ECHO))
        return VERDICT(XDP_DROP, REASON_DROP_ECHO_RATELIMIT, len);
    if (len > l3_end(p) && bpf_xdp_adjust_tail(ctx, (int)l3_end(p) - (int)len))
        return VERDICT(XDP_DROP, REASON_DROP_HEADROOM, len);
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) + IPV6_HLEN + 8 > data_end && !v4)
        return VERDICT(XDP_DROP, REASON_DROP_HEADROOM, len);
    if ((void *)(eth + 1) + IPV4_HLEN + 8 > data_end)
        return VERDICT(XDP_DROP, REASON_DROP_HEADROOM, len);
    unsigned char mac[ETH_ALEN];
    __builtin_memcpy(mac, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
    if (v4) {
        struct iphdr *ip = (void *)(eth + 1);
        struct icmphdr *icmp = (void *)(ip + 1);
        ip->saddr = p->dst[0];
        ip->daddr = p->src[0];
        ip->ttl = OUTER_TTL;
        ip->check = 0;
        ip->check = l4lb_ipv4_csum(ip);
        icmp->checksum = l4lb_csum_replace16(icmp->checksum, bpf_htons((ICMP_ECHO << 8) | icmp->code),
                                             bpf_htons((ICMP_ECHOREPLY << 8) | icmp->code));
        icmp->type = ICMP_ECHOREPLY;
    } else {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        struct icmp6hdr *icmp6 = (void *)(ip6 + 1);
        if ((void *)(icmp6 + 1) > data_end)
            return VERDICT(XDP_DROP, REASON_DROP_HEADROOM, len);
        __builtin_memcpy(&ip6->saddr, p->dst, 16);
        __builtin_memcpy(&ip6->daddr, p->src, 16);
        ip6->hop_limit = OUTER_TTL;
        /* The pseudo-header sums the same addresses, swapped. */
        icmp6->icmp6_cksum = l4lb_csum_replace16(icmp6->icmp6_cksum,
                                                 bpf_htons((ICMPV6_ECHO_REQUEST << 8) | icmp6->icmp6_code),
                                                 bpf_htons((ICMPV6_ECHO_REPLY << 8) | icmp6->icmp6_code));
        icmp6->icmp6_type = ICMPV6_ECHO_REPLY;
    }
    RECORD_OUT_REPLY(ctx, p, XDP_TX, REPLY_ECHO);
    return VERDICT(XDP_TX, REASON_TX_ECHO, len);
}
