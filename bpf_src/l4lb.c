/* l4lb XDP entry, one packet (README: "The datapath, per packet"):
 * parse -> fragments, ICMP to a VIP: rare paths -> service -> recorder(in)
 * -> flow table / new flow: source ranges, Maglev (no backend: reject or
 * drop) -> next hop -> too big:
 * ICMP, or the kernel fragments -> DNAT + encapsulation -> recorder(out) ->
 * TX / REDIRECT.
 * Everything that is not for a service or a VIP goes to the kernel.
 *
 * The rare paths are programs of their own below, reached by tail call
 * (lib/slow.h); each parses the packet again. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/lookup.h"
#include "lib/csum.h"
#include "lib/encap.h"
#include "lib/nexthop.h"
#include "lib/recorder.h"
#include "lib/bench.h"
#include "lib/slow.h"
#include "lib/icmp.h"
#include "lib/forward.h"
#include "lib/frag.h"
#include "lib/reject.h"
#include "lib/echo.h"
#include "lib/icmp_err.h"

/* Not TCP/UDP to a service: ICMP may be for a VIP, the rest is the kernel's. */
L4LB_INLINE int other_packet(struct xdp_md *ctx, struct pkt *p, int rc, __u64 len)
{
    if (rc == PARSE_NOT_IP)
        return VERDICT(XDP_PASS, REASON_PASS_NOT_IP, len);
    if (rc == PARSE_MALFORMED)
        return VERDICT(XDP_PASS, REASON_PASS_MALFORMED, len);
    if (rc == PARSE_EXT_LIMIT)
        return VERDICT(XDP_PASS, REASON_PASS_EXT_HEADERS, len);
    if (p->fragment)
        return VERDICT(XDP_PASS, REASON_PASS_FRAGMENT, len);
    if (rc == PARSE_ICMP)
        slow_path(ctx, SLOW_ICMP);
    return VERDICT(XDP_PASS, REASON_PASS_NOT_SERVICE, len);
}

/* A TCP/UDP packet with its ports: service, backend, on to it. `first_fragment`
 * is a constant at each call: the hot path never tests for fragments again. */
L4LB_INLINE int balance(struct xdp_md *ctx, struct pkt *p, __u64 len, int first_fragment)
{
    struct svc_info *svc = service_lookup(p);
    if (!svc)
        return VERDICT(XDP_PASS, REASON_PASS_NOT_SERVICE, len);
    RECORD_IN(ctx, p, svc->id);
    __u32 svc_id = svc->id;
    __u32 svc_flags = svc->flags;
    count_service(svc_id, len);
    if (first_fragment)
        frag_remember(p);

    __u32 zero = 0;
    struct lb_config *cfg = config.lookup(&zero);
    if (!cfg)
        return VERDICT(XDP_PASS, REASON_PASS_FIB, len);
    __u32 hash = flow_hash(p, svc_flags, svc->affinity_prefix, cfg->hash_seed);
    __u32 be_id = 0;
    int refused = 0;
    struct backend_info *be = choose_backend(p, svc, hash, cfg->hash_seed, &be_id, &refused);
    if (refused)
        return VERDICT(XDP_DROP, REASON_DROP_SOURCE_RANGE, len);
    if (!be)
        return no_backend(ctx, p, svc_flags, len);
    count_backend(be_id, len);
    return forward(ctx, p, cfg, be, be_id, hash, svc_flags, len, FWD_FLOW REC_ARG);
}

int l4lb_xdp(struct xdp_md *ctx)
{
#ifdef BENCH_NEXT_FLOW
    if (bench_next_flow(ctx))
        return XDP_ABORTED;
#endif
    __u64 len = ctx->data_end - ctx->data;
    struct pkt p = {};
    int rc = parse_packet(ctx, &p);
    if (rc != PARSE_OK)
        return other_packet(ctx, &p, rc, len);
    if (p.fragment) {
        slow_path(ctx, SLOW_FRAGMENT);
        return VERDICT(XDP_PASS, REASON_PASS_FRAGMENT, len);
    }
    return balance(ctx, &p, len, 0);
}

/* ICMP to a VIP: echo requests (lib/echo.h), errors about its flows
 * (lib/icmp_err.h). */
int l4lb_icmp(struct xdp_md *ctx)
{
    __u64 len = ctx->data_end - ctx->data;
    struct pkt p = {};
    if (parse_packet(ctx, &p) != PARSE_ICMP || p.fragment)
        return VERDICT(XDP_PASS, REASON_PASS_NOT_SERVICE, len);
    int type = icmp_type(ctx, &p);
    if (type == (p.family == FAMILY_V4 ? ICMP_ECHO : ICMPV6_ECHO_REQUEST))
        return echo_reply(ctx, &p, len);
    if (icmp_is_error(p.family, type))
        return icmp_error_to_backend(ctx, &p, len);
    return VERDICT(XDP_PASS, REASON_PASS_NOT_SERVICE, len);
}

/* A fragment of TCP/UDP: the first is balanced and leaves its ports for the
 * later ones, which follow it to its backend (lib/frag.h). */
int l4lb_fragment(struct xdp_md *ctx)
{
    __u64 len = ctx->data_end - ctx->data;
    struct pkt p = {};
    if (parse_packet(ctx, &p) != PARSE_OK || !p.fragment)
        return VERDICT(XDP_PASS, REASON_PASS_FRAGMENT, len);
    if (p.fragment == FRAG_FIRST)
        return balance(ctx, &p, len, 1);
    return later_fragment(ctx, &p, len);
}

/* A reply the hot path asked for (slow_args): too big (lib/icmp.h), or no
 * usable backend (lib/reject.h). */
int l4lb_reply(struct xdp_md *ctx)
{
    __u64 len = ctx->data_end - ctx->data;
    __u32 zero = 0;
    struct slow_args *a = slow_args.lookup(&zero);
    struct lb_config *cfg = config.lookup(&zero);
    struct pkt p = {};
    if (!a || !cfg || parse_packet(ctx, &p) != PARSE_OK)
        return VERDICT(XDP_DROP, REASON_DROP_HEADROOM, len);
    if (a->reply == REPLY_TOO_BIG)
        return too_big(ctx, &p, cfg, a->mtu, len);
    return reject(ctx, &p, cfg, len);
}
