/* The rare paths run as programs of their own, reached by tail call: ICMP to
 * a VIP (l4lb_icmp), later fragments (l4lb_fragment), generated replies
 * (l4lb_reply). Each is verified on its own: inlined into one program beside
 * the recorder they took the verifier past its 1M-instruction budget and the
 * stack past 512 bytes. The hot path (a service packet with a backend) never
 * pays for them. A tail-called program parses the packet again, which costs
 * less than handing the parse over; what it cannot find in the packet comes
 * in `slow_args`. The loader fills `slow_paths` before attaching. */
#pragma once
#include "lib/maps.h"
#include "lib/stats.h"

/* Jump to a rare path; returns only if its slot is empty (never, once loaded). */
L4LB_INLINE void slow_path(struct xdp_md *ctx, __u32 idx)
{
    slow_paths.call(ctx, idx);
}

/* Have l4lb_reply answer the packet with `kind` (enum l4lb_reply). */
L4LB_INLINE int reply_to(struct xdp_md *ctx, __u32 kind, __u32 mtu, __u64 len)
{
    __u32 zero = 0;
    struct slow_args *a = slow_args.lookup(&zero);
    if (a) {
        a->reply = kind;
        a->mtu = mtu;
        slow_path(ctx, SLOW_REPLY);
    }
    /* What happened before replies existed: the packet is dropped. */
    return VERDICT(XDP_DROP, kind == REPLY_TOO_BIG ? REASON_DROP_ICMP_RATELIMIT : REASON_DROP_NO_BACKEND, len);
}
