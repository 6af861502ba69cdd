/* l4lb XDP entry: parse -> recorder(in) -> service -> flow table / Maglev ->
 * next hop -> ICMP too-big or DNAT + encapsulation -> recorder(out) -> TX /
 * REDIRECT. Everything that is not service traffic goes to the kernel. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/lookup.h"
#include "lib/csum.h"
#include "lib/encap.h"
#include "lib/nexthop.h"
#include "lib/icmp.h"
#include "lib/recorder.h"
#include "lib/bench.h"

#define VERDICT(action, reason, bytes)     \
    ({                                     \
        count_reason((reason), (bytes));   \
        (action);                          \
    })

/* Send a too-big reply for the unmodified original packet. */
L4LB_INLINE int too_big(struct xdp_md *ctx, struct pkt *p, struct lb_config *cfg, __u32 mtu, __u64 len)
{
    if (!icmp_allowed(cfg))
        return VERDICT(XDP_DROP, REASON_DROP_ICMP_RATELIMIT, len);
    int overhead = p->family == FAMILY_V4 ? IPV4_HLEN : IPV6_HLEN;
    int rc = p->family == FAMILY_V4 ? icmp4_too_big(ctx, p, mtu - overhead) : icmp6_too_big(ctx, p, mtu - overhead);
    if (rc == -2)
        return VERDICT(XDP_DROP, REASON_DROP_TOO_BIG_SHORT, len);
    if (rc)
        return VERDICT(XDP_DROP, REASON_DROP_HEADROOM, len);
    RECORD_OUT_ICMP(ctx, p, XDP_TX);
    return VERDICT(XDP_TX, REASON_TX_ICMP_TOO_BIG, len);
}

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

int l4lb_xdp(struct xdp_md *ctx)
{
#ifdef BENCH_NEXT_FLOW
    if (bench_next_flow(ctx))
        return XDP_ABORTED;
#endif
    __u64 len = ctx->data_end - ctx->data;
    struct pkt p = {};
    int rc = parse_packet(ctx, &p);
    if (rc == PARSE_NOT_IP)
        return VERDICT(XDP_PASS, REASON_PASS_NOT_IP, len);
    if (rc == PARSE_MALFORMED)
        return VERDICT(XDP_PASS, REASON_PASS_MALFORMED, len);
    if (p.fragment)
        return VERDICT(XDP_PASS, REASON_PASS_FRAGMENT, len);
    if (rc != PARSE_OK)
        return VERDICT(XDP_PASS, REASON_PASS_NOT_SERVICE, len);

    struct svc_info *svc = service_lookup(&p);
    if (!svc)
        return VERDICT(XDP_PASS, REASON_PASS_NOT_SERVICE, len);
    RECORD_IN(ctx, &p, svc->id);
    __u32 svc_id = svc->id;
    __u32 svc_flags = svc->flags;
    count_service(svc_id, len);

    __u32 zero = 0;
    struct lb_config *cfg = config.lookup(&zero);
    if (!cfg)
        return VERDICT(XDP_PASS, REASON_PASS_FIB, len);
    __u32 hash = flow_hash(&p, svc_flags, cfg->hash_seed);
    __u32 be_id = 0;
    struct backend_info *be = choose_backend(&p, svc, hash, cfg->hash_seed, &be_id);
    if (!be)
        return VERDICT(XDP_DROP, REASON_DROP_NO_BACKEND, len);
    count_backend(be_id, len);

    int overhead = p.family == FAMILY_V4 ? IPV4_HLEN : IPV6_HLEN;
    struct bpf_fib_lookup fib;
    rc = next_hop(ctx, be_id, be, p.l3_len + overhead, &fib);
    if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
        return too_big(ctx, &p, cfg, fib.mtu_result, len);
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
        return VERDICT(XDP_PASS, REASON_PASS_FIB, len);

    __u32 egress = fib.ifindex;
    struct if_info *ifi = ifaces.lookup(&egress);
    __u32 saddr[4] = {};
    if (outer_source(&p, hash, cfg, ifi, saddr))
        return VERDICT(XDP_PASS, REASON_PASS_NO_TXPORT, len);

    if ((svc_flags & SVC_F_DNAT) && be->port && be->port != p.dport) {
        if (dnat_port(ctx, &p, be->port))
            return VERDICT(XDP_PASS, REASON_PASS_MALFORMED, len);
    }

    int no_neigh = rc == BPF_FIB_LKUP_RET_NO_NEIGH;
    if (no_neigh) {
        /* The kernel must see a frame addressed to itself (PACKET_HOST): keep
         * the packet's own MACs. Only this rare path pays for the copy. */
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
    if (p.family == FAMILY_V4)
        rc = encap_ipv4(ctx, &p, saddr[0], be->addr[0], fib.smac, fib.dmac);
    else
        rc = encap_ipv6(ctx, &p, saddr, be->addr, hash, fib.smac, fib.dmac);
    if (rc)
        return VERDICT(XDP_DROP, REASON_DROP_HEADROOM, len);

    if (no_neigh) {
        /* Never a silent drop: the kernel forwards the encapsulated packet
         * and resolves the neighbour on the way. */
        RECORD_OUT(ctx, XDP_PASS, be_id);
        return VERDICT(XDP_PASS, REASON_PASS_NO_NEIGH, len);
    }
    if (egress == ctx->ingress_ifindex) {
#ifdef BENCH_UNDO
        count_reason(REASON_TX, len);
        return bench_undo(ctx, overhead, &orig_eth);
#endif
        RECORD_OUT(ctx, XDP_TX, be_id);
        return VERDICT(XDP_TX, REASON_TX, len);
    }
    if (!ifi)
        return VERDICT(XDP_PASS, REASON_PASS_NO_TXPORT, len);
    RECORD_OUT(ctx, XDP_REDIRECT, be_id);
    int act = tx_ports.redirect_map(ifi->tx_slot, XDP_PASS);
    if (act != XDP_REDIRECT)
        return VERDICT(act, REASON_PASS_NO_TXPORT, len);
    return VERDICT(XDP_REDIRECT, REASON_REDIRECT, len);
}
