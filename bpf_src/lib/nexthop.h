/* Next hop of the encapsulated packet.
 *
 * NEXTHOP_CACHE builds first look in `nexthops`, which the daemon fills from
 * the kernel's routes and neighbours (l4lb/datapath/nexthop.py) and keeps
 * fresh; an entry is used only while it belongs to the backend slot's current
 * generation. Everything else (no entry, the FIB-only build) asks the kernel's
 * FIB with bpf_fib_lookup, which also sees ECMP and reports NO_NEIGH. Both
 * paths fill the same struct bpf_fib_lookup fields (ifindex, smac, dmac,
 * mtu_result) and return BPF_FIB_LKUP_RET_* codes, so callers see one API.
 * tot_len lets either path check the egress MTU for the encapsulated size. */
#pragma once
#include "lib/maps.h"

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

L4LB_INLINE int next_hop(struct xdp_md *ctx, __u32 be_id, struct backend_info *be, __u32 outer_len,
                         struct bpf_fib_lookup *fib)
{
#ifdef NEXTHOP_CACHE
    struct nh_info *nh = nexthops.lookup(&be_id);
    if (nh && nh->gen && nh->gen == be->gen) {
        if (outer_len > nh->mtu) {
            fib->mtu_result = nh->mtu;
            return BPF_FIB_LKUP_RET_FRAG_NEEDED;
        }
        fib->ifindex = nh->ifindex;
        __builtin_memcpy(fib->smac, nh->smac, ETH_ALEN);
        __builtin_memcpy(fib->dmac, nh->dmac, ETH_ALEN);
        return BPF_FIB_LKUP_RET_SUCCESS;
    }
#endif
    return fib_next_hop(ctx, be, outer_len, fib);
}
