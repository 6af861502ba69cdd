/* Sending a packet of a flow to the flow's backend: next hop; what to do
 * when it is too big for it; L4 DNAT; trimming; encapsulation; XDP_TX or
 * XDP_REDIRECT, or the kernel where it must take over. */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/lookup.h"
#include "lib/encap.h"
#include "lib/nexthop.h"
#include "lib/slow.h"
#include "lib/recorder.h"

#define FWD_FLOW 0          /* a packet of the flow */
#define FWD_ICMP_ERROR 1    /* an ICMP error about the flow (lib/icmp_err.h) */

#ifdef BENCH_UNDO
/* Bench-only: take our outer header off again so BPF_PROG_TEST_RUN's repeat
 * loop feeds the next pass the original packet (NOTES.md, the repeat trap). */
L4LB_INLINE int bench_undo(struct xdp_md *ctx, int overhead, struct ethhdr *orig)
{
    if (bpf_xdp_adjust_head(ctx, overhead))
        return XDP_ABORTED;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_ABORTED;
    __builtin_memcpy(eth, orig, sizeof(*eth));
    return XDP_TX;
}
#endif

/* `kind` is FWD_*, a constant at each call site. The outer header is of the
 * backend's family: IPv4 in IPv6 (4in6) for an IPv6 backend of an IPv4 VIP. */
L4LB_INLINE int forward(struct xdp_md *ctx, struct pkt *p, struct lb_config *cfg, struct backend_info *be,
                        __u32 be_id, __u32 hash, __u32 svc_flags, __u64 len, int kind REC_PARAM)
{
    int outer6 = be->family == FAMILY_V6;
    int overhead = outer6 ? IPV6_HLEN : IPV4_HLEN;
    struct bpf_fib_lookup fib;
    int rc = next_hop(ctx, be_id, be, p->l3_len + overhead, &fib);
    __u32 kernel = 0;   /* the reason, when the kernel is to send the encapsulated packet on */
    if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
        if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
            /* DF set, or an IPv6 outer header (routers never fragment it,
             * and the kernel does not fragment an IPv6 packet it forwards:
             * a DF-clear IPv4 sender of a 4in6 flow is told the MTU too,
             * which Linux applies to its route and fragments at the source
             * from then on): the sender must learn the MTU left for its
             * packet. No ICMP error about an ICMP error, though (RFC 1812
             * 4.3.2.7, RFC 4443 2.4(e.1)). */
            if (outer6 || p->df) {
                if (kind == FWD_ICMP_ERROR)
                    return VERDICT(XDP_DROP, REASON_DROP_REPLY_FORBIDDEN, len);
                return reply_to(ctx, REPLY_TOO_BIG, fib.mtu_result - overhead, len);  /* lib/icmp.h too_big */
            }
            /* DF clear: the tunnel entry fragments the outer packet instead
             * (RFC 2003 5.1), i.e. the kernel does, on its way out. A lookup
             * without the MTU check names the egress NIC (for the outer source). */
            fib_next_hop(ctx, be, 0, &fib);
            kernel = REASON_PASS_OUTER_FRAGMENT;
        } else if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
            kernel = REASON_PASS_NO_NEIGH;  /* never a silent drop: the kernel resolves it on the way */
        } else {
            return VERDICT(XDP_PASS, REASON_PASS_FIB, len);
        }
    }

    __u32 egress = fib.ifindex;
    struct if_info *ifi = iface_cached(egress);
    __u32 saddr[4] = {};
    if (outer_source(outer6, hash, cfg, ifi, saddr))
        return VERDICT(XDP_PASS, REASON_PASS_NO_TXPORT, len);

    if ((svc_flags & SVC_F_DNAT) && be->port && be->port != p->dport) {
        if (dnat_port(ctx, p, be->port))
            return VERDICT(XDP_PASS, REASON_PASS_MALFORMED, len);
    }
    /* Bytes after the IP packet (Ethernet padding, a length field that
     * lied) are not part of it: they do not travel to the backend. */
    if (len > l3_end(p) && bpf_xdp_adjust_tail(ctx, (int)l3_end(p) - (int)len))
        return VERDICT(XDP_DROP, REASON_DROP_HEADROOM, len);

    if (kernel) {
        /* The kernel must see a frame addressed to itself (PACKET_HOST): keep
         * the packet's own MACs. Only these rare paths pay for the copy. */
        struct ethhdr *eth = (void *)(long)ctx->data;
        if ((void *)(eth + 1) > (void *)(long)ctx->data_end)
            return VERDICT(XDP_PASS, REASON_PASS_MALFORMED, len);
        __builtin_memcpy(fib.dmac, eth->h_dest, ETH_ALEN);
        __builtin_memcpy(fib.smac, eth->h_source, ETH_ALEN);
    }
#ifdef BENCH_UNDO
    struct ethhdr orig_eth;
    {
        void *d = (void *)(long)ctx->data;
        if (d + sizeof(orig_eth) > (void *)(long)ctx->data_end)
            return XDP_ABORTED;
        __builtin_memcpy(&orig_eth, d, sizeof(orig_eth));
    }
#endif
    if (!outer6)
        rc = encap_ipv4(ctx, p, saddr[0], be->addr[0], fib.smac, fib.dmac);
    else
        rc = encap_ipv6(ctx, p, saddr, be->addr, hash, fib.smac, fib.dmac);
    if (rc)
        return VERDICT(XDP_DROP, REASON_DROP_HEADROOM, len);

    if (kernel) {
        if (kernel == REASON_PASS_OUTER_FRAGMENT)
            encap_ipv4_fresh_id(ctx);
        RECORD_OUT(ctx, XDP_PASS, be_id, ctx->ingress_ifindex);
        return VERDICT(XDP_PASS, kernel, len);
    }
    if (egress == ctx->ingress_ifindex) {
#ifdef BENCH_UNDO
        count_reason(REASON_TX, len);
        return bench_undo(ctx, overhead, &orig_eth);
#endif
        RECORD_OUT(ctx, XDP_TX, be_id, ctx->ingress_ifindex);
        return VERDICT(XDP_TX, kind == FWD_ICMP_ERROR ? REASON_FWD_ICMP_ERROR : REASON_TX, len);
    }
    if (!ifi)
        return VERDICT(XDP_PASS, REASON_PASS_NO_TXPORT, len);
    RECORD_OUT(ctx, XDP_REDIRECT, be_id, egress);
    int act = tx_ports.redirect_map(ifi->tx_slot, XDP_PASS);
    if (act != XDP_REDIRECT)
        return VERDICT(act, REASON_PASS_NO_TXPORT, len);
    return VERDICT(XDP_REDIRECT, kind == FWD_ICMP_ERROR ? REASON_FWD_ICMP_ERROR : REASON_REDIRECT, len);
}

/* The rare paths' way to a flow's backend: `p` is the packet to send, `q` the
 * flow it belongs to (p itself for a later fragment, the quoted flow turned
 * around for an ICMP error). The backend is the one the flow's next packet
 * would get (flow_owner: nothing is inserted). For an ICMP error under L4
 * DNAT, the quoted source port at `quote_l4` becomes the backend's own again,
 * the ICMP checksum updated. */
L4LB_INLINE int forward_to_owner(struct xdp_md *ctx, struct pkt *p, struct pkt *q, struct lb_config *cfg,
                                 __u64 len, int kind, __u32 quote_l4)
{
    struct svc_info *svc = service_lookup(q);
    if (!svc)
        return VERDICT(XDP_PASS, REASON_PASS_NOT_SERVICE, len);
    RECORD_IN(ctx, q, svc->id);
    __u32 svc_id = svc->id;
    __u32 svc_flags = svc->flags;
    count_service(svc_id, len);
    __u32 hash = flow_hash(q, svc_flags, svc->affinity_prefix, cfg->hash_seed);
    __u32 be_id = 0;
    int refused = 0;
    struct backend_info *be = flow_owner(q, svc, hash, cfg->hash_seed, &be_id, &refused);
    if (refused)
        return VERDICT(XDP_DROP, REASON_DROP_SOURCE_RANGE, len);
    if (!be)
        return VERDICT(XDP_DROP, REASON_DROP_NO_BACKEND, len);
    if (kind == FWD_ICMP_ERROR && (svc_flags & SVC_F_DNAT) && be->port && be->port != q->dport) {
        void *data = (void *)(long)ctx->data;
        void *data_end = (void *)(long)ctx->data_end;
        __u32 ioff = p->l4_off;
        if (ioff > 0x3ff || quote_l4 > 0x7ff)
            return VERDICT(XDP_PASS, REASON_PASS_MALFORMED, len);
        __u16 *csum = data + ioff + 2;
        __u16 *sport = data + quote_l4;
        if ((void *)(csum + 1) > data_end || (void *)(sport + 1) > data_end)
            return VERDICT(XDP_PASS, REASON_PASS_MALFORMED, len);
        *csum = l4lb_csum_replace16(*csum, *sport, be->port);
        *sport = be->port;
    }
    count_backend(be_id, len);
    /* A later fragment has no port to rewrite; an ICMP error's was done above. */
    return forward(ctx, p, cfg, be, be_id, hash, svc_flags & ~SVC_F_DNAT, len, kind REC_ARG);
}
