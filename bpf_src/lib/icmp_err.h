/* ICMP errors about VIP flows go to the backend that owns the flow.
 *
 * With DSR, replies leave the backends with the VIP as source. A router on
 * the way back to the client that has something to report (above all a
 * smaller MTU: frag-needed / packet-too-big, RFC 1191 / RFC 8201) sends its
 * error to the VIP, i.e. to the LB, whose kernel has no socket for the flow:
 * path-MTU discovery of server->client traffic would black-hole. The socket
 * is on the backend that serves the flow, so the error goes there, chosen
 * exactly as the flow's next packet would be: the quoted packet (VIP:port ->
 * client:port) turned back into the client->VIP direction, then the same
 * service lookup, flow hash and flow table, Maglev if the flow has no entry
 * (lib/lookup.h flow_owner; nothing is inserted). The whole ICMP packet is
 * encapsulated like the flow's packets (same outer source, flow label), and
 * the backend's kernel hands it to the socket (for PMTU: lowers the path
 * MTU and sends again, smaller).
 *
 * Errors: v4 destination unreachable (every code), time exceeded, parameter
 * problem; v6 destination unreachable, packet too big, time exceeded,
 * parameter problem. The quote must be a TCP/UDP packet from the VIP the
 * error is addressed to, its ports right after its IP header (IPv4 options
 * are fine, IPv6 extension headers in the quote are not followed), and not
 * a later fragment. Anything else is the kernel's (pass_not_service). With
 * L4 DNAT the quoted source port is turned back into the backend's own port,
 * which its socket has, and the ICMP checksum updated. forward_icmp_errors =
 * false (no CFG_F_ICMP_FWD) leaves them all to the kernel, as before. */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/stats.h"
#include "lib/lookup.h"
#include "lib/forward.h"

/* Offsets are bounded so the verifier can follow them. */
#define ICMP_ERR_MAX_OFF 512

L4LB_INLINE int icmp_is_error(__u8 family, int type)
{
    if (family == FAMILY_V4)
        return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
    return type == ICMPV6_DEST_UNREACH || type == ICMPV6_PKT_TOOBIG || type == ICMPV6_TIME_EXCEED ||
           type == ICMPV6_PARAMPROB;
}

/* The flow the quoted packet belongs to, in the client->VIP direction, into
 * q; the offset of the quoted L4 header, or -1. */
L4LB_INLINE int icmp_quoted_flow(struct xdp_md *ctx, struct pkt *p, struct pkt *q)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 off = p->l4_off + 8;                  /* after the ICMP header */
    if (off > ICMP_ERR_MAX_OFF)
        return -1;
    __u32 l4;
    q->family = p->family;
    if (p->family == FAMILY_V4) {
        struct iphdr *in = data + off;
        if ((void *)(in + 1) > data_end || in->version != 4 || in->ihl < 5)
            return -1;
        if ((in->frag_off & bpf_htons(L4LB_IP_OFFMASK)) || in->saddr != p->dst[0])
            return -1;
        q->src[0] = in->daddr;
        q->dst[0] = in->saddr;
        q->proto = in->protocol;
        l4 = off + in->ihl * 4;
    } else {
        struct ipv6hdr *in6 = data + off;
        if ((void *)(in6 + 1) > data_end || in6->version != 6)
            return -1;
        __builtin_memcpy(q->src, &in6->daddr, 16);
        __builtin_memcpy(q->dst, &in6->saddr, 16);
        if ((q->dst[0] ^ p->dst[0]) | (q->dst[1] ^ p->dst[1]) | (q->dst[2] ^ p->dst[2]) | (q->dst[3] ^ p->dst[3]))
            return -1;
        q->proto = in6->nexthdr;
        l4 = off + sizeof(*in6);
    }
    if (q->proto != IPPROTO_TCP && q->proto != IPPROTO_UDP)
        return -1;
    __u16 *ports = data + l4;
    if ((void *)(ports + 2) > data_end || l4 + 4 > l3_end(p))
        return -1;
    q->dport = ports[0];                        /* the VIP's (service) port */
    q->sport = ports[1];                        /* the client's */
    return l4;
}

L4LB_INLINE int icmp_error_to_backend(struct xdp_md *ctx, struct pkt *p, __u64 len)
{
    __u32 zero = 0;
    struct lb_config *cfg = config.lookup(&zero);
    if (!cfg || !(cfg->flags & CFG_F_ICMP_FWD))
        return VERDICT(XDP_PASS, REASON_PASS_NOT_SERVICE, len);
    struct pkt q = {};
    int l4 = icmp_quoted_flow(ctx, p, &q);
    if (l4 < 0)
        return VERDICT(XDP_PASS, REASON_PASS_NOT_SERVICE, len);
    return forward_to_owner(ctx, p, &q, cfg, len, FWD_ICMP_ERROR, l4);
}
