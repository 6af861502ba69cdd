/* IP fragments of service traffic.
 *
 * Fragments take a rare path of their own (l4lb_fragment, a tail call).
 * Only a datagram's first fragment carries the L4 header, and with it the
 * ports the flow hash and the flow table need. So the first fragment of a
 * datagram to a service, balanced like any packet, leaves its ports in
 * `frags` (maps.h), keyed by what
 * identifies the datagram for the host that reassembles it (addresses,
 * identification, protocol: RFC 791, RFC 8200 4.5); later fragments take the
 * ports from there and go the same way as the first: the same service, the
 * same flow-table entry (flow_owner: the first fragment made or refreshed
 * it; a later one never inserts), the same backend, whose kernel
 * reassembles them. Without a usable backend a later fragment is dropped:
 * there is nothing to reject it with (no ports to quote).
 *
 * The map is an LRU of FRAG_TABLE_SIZE (8192) datagrams and an entry is
 * honoured for FRAG_LIFETIME_NS (1 s) after its first fragment: fragments of
 * a datagram leave the sender back to back, and a short life keeps a later
 * fragment from matching an older datagram that reused the identification.
 *
 * A later fragment whose first was not seen (reordered before it, or first
 * lost or evicted) cannot be placed: like Cilium (DROP_FRAG_NOT_FOUND) it is
 * dropped when it is addressed to a VIP (drop_frag_no_first; the datagram
 * could not be reassembled anywhere anyway, and the LB's kernel has no use
 * for it), and passed to the kernel otherwise (pass_fragment), so fragments
 * for the box itself still arrive. */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/stats.h"
#include "lib/lookup.h"
#include "lib/forward.h"

L4LB_INLINE void frag_key_of(struct pkt *p, struct frag_key *k)
{
    __builtin_memcpy(k->src, p->src, 16);
    __builtin_memcpy(k->dst, p->dst, 16);
    k->id = p->id;
    k->proto = p->proto;
    k->family = p->family;
    k->pad = 0;
}

/* First fragment of a datagram to a service: remember its ports. */
L4LB_INLINE void frag_remember(struct pkt *p)
{
    struct frag_key k;
    frag_key_of(p, &k);
    struct frag_ports v = {};
    v.sport = p->sport;
    v.dport = p->dport;
    v.expires_ns = bpf_ktime_get_ns() + FRAG_LIFETIME_NS;
    frags.update(&k, &v);
}

/* Later fragment: its datagram's ports into p. 0 if known, -1 if not. */
L4LB_INLINE int frag_ports_of(struct pkt *p)
{
    struct frag_key k;
    frag_key_of(p, &k);
    struct frag_ports *v = frags.lookup(&k);
    if (!v || bpf_ktime_get_ns() > v->expires_ns)
        return -1;
    p->sport = v->sport;
    p->dport = v->dport;
    return 0;
}

/* A later fragment whose first was not seen. */
L4LB_INLINE int frag_unknown(struct pkt *p, __u64 len)
{
    if (vip_lookup(p))
        return VERDICT(XDP_DROP, REASON_DROP_FRAG_NO_FIRST, len);
    return VERDICT(XDP_PASS, REASON_PASS_FRAGMENT, len);
}

/* A later fragment (FRAG_LATER, TCP/UDP): to its first fragment's backend. */
L4LB_INLINE int later_fragment(struct xdp_md *ctx, struct pkt *p, __u64 len)
{
    if (frag_ports_of(p))
        return frag_unknown(p, len);
    __u32 zero = 0;
    struct lb_config *cfg = config.lookup(&zero);
    if (!cfg)
        return VERDICT(XDP_PASS, REASON_PASS_FIB, len);
    return forward_to_owner(ctx, p, p, cfg, len, FWD_FLOW, 0);
}
