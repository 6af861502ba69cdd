/* Source ranges: a service with SVC_F_SRC_RANGES takes new flows only from
 * clients inside one of its ranges (one LPM trie for all services, maps.h).
 *
 * XDP answers before netfilter, so the LB's own firewall never sees VIP
 * traffic: the allowlist has to be here. It is checked where a flow is
 * created (and where a rare path picks a backend without one), not on every
 * packet: a flow-table hit was allowed when it was made. A change of the
 * ranges changes the service's gen, which every flow entry of the service
 * includes (lookup.h), so each existing flow misses once and is checked
 * against the new ranges. Services without ranges never look at the trie. */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"

L4LB_INLINE int source_allowed(struct pkt *p, __u32 svc_id)
{
    struct src_range_key key = {};
    key.prefixlen = 32 + (p->family == FAMILY_V4 ? 32 : 128);
    key.svc_id = svc_id;
    __builtin_memcpy(key.addr, p->src, 16);
    return src_ranges.lookup(&key) != 0;
}
