/* Next hop by the kernel's FIB (bpf_fib_lookup): routes, ECMP and neighbours
 * stay the kernel's business; the daemon keeps neighbour entries for backends
 * so lookups rarely come back NO_NEIGH. tot_len makes the kernel check the
 * egress MTU for the encapsulated size. */
#pragma once
#include "lib/maps.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

L4LB_INLINE int fib_next_hop(struct xdp_md *ctx, struct backend_info *be, __u32 outer_len,
                             struct bpf_fib_lookup *fib)
{
    __builtin_memset(fib, 0, sizeof(*fib));
    fib->ifindex = ctx->ingress_ifindex;
    fib->tot_len = outer_len;
    if (be->family == FAMILY_V4) {
        fib->family = AF_INET;
        fib->ipv4_dst = be->addr[0];
    } else {
        fib->family = AF_INET6;
        __builtin_memcpy(fib->ipv6_dst, be->addr, 16);
    }
    return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}
