/* No usable backend: the service has none, or all are drained, down or in
 * maintenance (an empty Maglev table and no valid flow entry). What happens
 * is the service's policy (options.no_backend, SVC_F_NO_BACKEND_DROP):
 *
 * reject (default): answer like a host with nothing listening on the port,
 * so clients fail at once instead of waiting out their timeouts. TCP gets a
 * RST (RFC 9293 3.10.7.1, a segment for a CLOSED connection): it refuses a
 * connect() and also ends an established connection whose backend went
 * away, where an ICMP error would only be a soft error (RFC 1122 4.2.3.9).
 * UDP gets ICMP port unreachable (v4 type 3 code 3, RFC 792 and RFC 1122
 * 4.1.3.1; v6 type 1 code 4, RFC 4443 3.1), which a connected socket reports
 * as ECONNREFUSED. Replies come from the VIP, are rate-limited in their own
 * bucket (REPLY_REJECT) and are never sent where reply_allowed() forbids,
 * in answer to a RST (RFC 9293), or about a later fragment (it has no ports
 * to quote).
 *
 * drop: drop silently (drop_no_backend), like Cilium's
 * service-no-backend-response=drop. */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/icmp.h"
#include "lib/slow.h"

/* Turn the TCP segment into the RST that answers it, in place:
 * <SEQ=SEG.ACK><CTL=RST> if it had ACK, else
 * <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>. */
L4LB_INLINE int tcp_reset(struct xdp_md *ctx, struct pkt *p)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 off = p->l4_off;
    if (off > 0x3ff)
        return -1;
    struct tcphdr *th = data + off;
    if ((void *)(th + 1) > data_end)
        return -1;
    __u32 seg_len = l3_end(p) - off - th->doff * 4;
    seg_len += !!(p->tcp_flags & TCP_FLAG_SYN) + !!(p->tcp_flags & TCP_FLAG_FIN);
    __u32 seq = 0, ack = 0;
    __u8 flags = TCP_FLAG_RST;
    if (p->tcp_flags & TCP_FLAG_ACK) {
        seq = th->ack_seq;
    } else {
        ack = bpf_htonl(bpf_ntohl(th->seq) + seg_len);
        flags |= TCP_FLAG_ACK;
    }
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return -1;
    unsigned char mac[ETH_ALEN * 2];
    __builtin_memcpy(mac, eth->h_source, ETH_ALEN);
    __builtin_memcpy(mac + ETH_ALEN, eth->h_dest, ETH_ALEN);
    /* [eth][ip][tcp], no options: never longer than the segment was (its
     * IP header is at least as long, its TCP header at least 20 bytes). */
    int iph = p->family == FAMILY_V4 ? IPV4_HLEN : IPV6_HLEN;
    int want = sizeof(*eth) + iph + sizeof(*th);
    if (bpf_xdp_adjust_tail(ctx, want - frame_len(ctx)))
        return -1;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    eth = data;
    if ((void *)(eth + 1) + IPV4_HLEN + sizeof(*th) > data_end)
        return -1;
    __builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, mac + ETH_ALEN, ETH_ALEN);
    __u32 csum_off;
    __u64 sum;
    if (p->family == FAMILY_V4) {
        struct iphdr *ip = (void *)(eth + 1);
        reply_ip4(ip, p, IPPROTO_TCP, IPV4_HLEN + sizeof(*th), 1);
        th = (void *)(ip + 1);
        csum_off = sizeof(*eth) + 12;        /* pseudo-header addresses, then the TCP header */
        sum = bpf_htonl((IPPROTO_TCP << 16) | sizeof(*th));
    } else {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) + sizeof(*th) > data_end)
            return -1;
        reply_ip6(ip6, p, IPPROTO_TCP, sizeof(*th));
        th = (void *)(ip6 + 1);
        csum_off = sizeof(*eth) + 8;
        sum = (__u64)bpf_htonl(sizeof(*th)) + bpf_htonl(IPPROTO_TCP);
    }
    __builtin_memset(th, 0, sizeof(*th));
    th->source = p->dport;
    th->dest = p->sport;
    th->seq = seq;
    th->ack_seq = ack;
    th->doff = 5;
    ((__u8 *)th)[13] = flags;
    sum += sum_words(ctx, csum_off, (iph - (csum_off - sizeof(*eth))) + sizeof(*th));
    data = (void *)(long)ctx->data;
    th = data + sizeof(*eth) + iph;
    if ((void *)(th + 1) > (void *)(long)ctx->data_end)
        return -1;
    th->check = l4lb_csum_fold(sum);
    return 0;
}

/* Hot path: no usable backend for p. */
L4LB_INLINE int no_backend(struct xdp_md *ctx, struct pkt *p, __u32 svc_flags, __u64 len)
{
    if ((svc_flags & SVC_F_NO_BACKEND_DROP) || p->fragment == FRAG_LATER ||
        (p->proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_RST)))
        return VERDICT(XDP_DROP, REASON_DROP_NO_BACKEND, len);
    return reply_to(ctx, REPLY_REJECT, 0, len);
}

/* l4lb_reply: the reject itself. */
L4LB_INLINE int reject(struct xdp_md *ctx, struct pkt *p, struct lb_config *cfg, __u64 len)
{
    if (!reply_allowed(ctx, p, 0))
        return VERDICT(XDP_DROP, REASON_DROP_REPLY_FORBIDDEN, len);
    if (!icmp_allowed(cfg, REPLY_REJECT))
        return VERDICT(XDP_DROP, REASON_DROP_REJECT_RATELIMIT, len);
    int rc;
    if (p->proto == IPPROTO_TCP)
        rc = tcp_reset(ctx, p);
    else if (p->family == FAMILY_V4)
        rc = icmp4_error(ctx, p, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0);
    else
        rc = icmp6_error(ctx, p, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, 0);
    if (rc)
        return VERDICT(XDP_DROP, REASON_DROP_HEADROOM, len);
    RECORD_OUT_REPLY(ctx, p, XDP_TX, REPLY_REJECT);
    return VERDICT(XDP_TX, REASON_TX_REJECT, len);
}
