/* Service and VIP lookup, connection table and Maglev backend choice. */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/jhash.h"
#include "lib/flowcache.h"
#include "lib/srcrange.h"
#include "lib/hotcache.h"

L4LB_INLINE struct svc_info *service_lookup(struct pkt *p)
{
    struct svc_key key = {};
    __builtin_memcpy(key.vip, p->dst, 16);
    key.port = p->dport;
    key.proto = p->proto;
    key.family = p->family;
    return svc_cached(&key);
}

/* The VIP entry of the packet's destination (maps.h: vips), or NULL. */
L4LB_INLINE struct vip_info *vip_lookup(struct pkt *p)
{
    struct vip_key key = {};
    __builtin_memcpy(key.addr, p->dst, 16);
    key.family = p->family;
    return vips.lookup(&key);
}

/* Keep the first `bits` bits of an address (four network-order words). */
L4LB_INLINE void mask_address(__u32 *a, __u32 bits)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int left = (int)bits - 32 * i;
        if (left <= 0)
            a[i] = 0;
        else if (left < 32)
            a[i] &= bpf_htonl(~0U << (32 - left));
    }
}

/* Flow hash: client address (cut to its affinity prefix if the service has
 * one), client port (unless client-IP affinity), service port, protocol. Not
 * the VIP, so one client lands on the same backend index whichever box of an
 * ECMP group sees it. */
L4LB_INLINE __u32 flow_hash(struct pkt *p, __u32 svc_flags, __u32 affinity_prefix, __u32 seed)
{
    __u32 k[6];
    __builtin_memcpy(k, p->src, 16);
    if (svc_flags & SVC_F_AFFINITY_PREFIX)
        mask_address(k, affinity_prefix);
    __u16 sport = (svc_flags & SVC_F_NO_SPORT) ? 0 : p->sport;
    k[4] = ((__u32)sport << 16) | p->dport;
    k[5] = p->proto;
    return jhash_6words(k, seed);
}

L4LB_INLINE void flow_key_of(struct pkt *p, struct flow_key *fk)
{
    __builtin_memcpy(fk->src, p->src, 16);
    __builtin_memcpy(fk->dst, p->dst, 16);
    fk->sport = p->sport;
    fk->dport = p->dport;
    fk->proto = p->proto;
    fk->family = p->family;
    fk->pad = 0;
}

/* The flow table's key hash: flow_hash() always with the client port, so one
 * client's connections spread over buckets even with client-IP affinity. For
 * the other services that is the Maglev hash already computed: reused. */
L4LB_INLINE __u32 flow_key_hash(struct pkt *p, struct svc_info *svc, __u32 hash, __u32 seed)
{
    if (!(svc->flags & SVC_F_NO_SPORT))
        return hash;
    return flow_hash(p, 0, 0, seed);
}

/* A flow entry is honoured only if its backend slot still belongs to this
 * service, is the same allocation and not in maintenance, and the service's
 * source ranges are those the flow was checked against. The entry holds the
 * backend's gen plus the service's (a digest of its ranges, 0 without): a
 * change of either misses, unless both change by opposite amounts mod 2^32. */
L4LB_INLINE struct backend_info *flow_backend(struct flow_pos *pos, struct flow_key *fk, __u32 svc_id,
                                              __u32 svc_gen, __u32 *id_out)
{
    __u32 id = 0, gen = 0;
    if (!flow_cache_get(pos, fk, &id, &gen))
        return 0;
    struct backend_info *be = backends.lookup(&id);
    if (!be || !be->family || be->gen + svc_gen != gen || be->svc_id != svc_id || (be->flags & BE_F_DOWN))
        return 0;
    *id_out = id;
    return be;
}

L4LB_INLINE struct backend_info *maglev_backend(struct svc_info *svc, __u32 hash, __u32 *id_out)
{
    __u32 svc_id = svc->id;
    __u32 idx = svc->ring;
    void *ring = maglev_outer.lookup(&idx);
    if (!ring)
        return 0;
    __u32 slot = hash % MAGLEV_M;
    __u32 *idp = bpf_map_lookup_elem(ring, &slot);
    if (!idp || !*idp)
        return 0;
    __u32 id = *idp;
    struct backend_info *be = backends.lookup(&id);
    if (!be || !be->family || be->svc_id != svc_id)
        return 0;
    *id_out = id;
    return be;
}

/* A new flow's source, if the service has source ranges: 1 if refused. */
L4LB_INLINE int source_refused(struct pkt *p, struct svc_info *svc)
{
    return (svc->flags & SVC_F_SRC_RANGES) && !source_allowed(p, svc->id);
}

/* The backend of this packet's flow. `remember` (a constant at each call):
 * the flow's packets themselves (choose_backend): established flows keep
 * theirs (drained backends keep serving them), new flows (SYN, or unknown) go
 * by Maglev and are remembered. Without it (flow_owner), the backend the
 * flow's next packet would get, remembering nothing: for packets that belong
 * to a flow but must not create one (ICMP errors about it). Either way, a new
 * flow whose source may not reach the service gets NULL with *refused set.
 * `hash` is flow_hash() of the service, `seed` the config's (passed in: the
 * caller has the config already). */
L4LB_INLINE struct backend_info *backend_of_flow(struct pkt *p, struct svc_info *svc, __u32 hash, __u32 seed,
                                                 __u32 *id_out, int *refused, int remember)
{
    struct flow_key fk;
    flow_key_of(p, &fk);
    struct flow_pos pos;
    flow_locate(&fk, flow_key_hash(p, svc, hash, seed), &pos);
    int is_syn = p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
    struct backend_info *be;
    if (!(remember && is_syn)) {
        be = flow_backend(&pos, &fk, svc->id, svc->gen, id_out);
        if (be)
            return be;
    }
    if (source_refused(p, svc)) {
        *refused = 1;
        return 0;
    }
    be = maglev_backend(svc, hash, id_out);
    if (be && remember)
        flow_cache_put(&pos, &fk, *id_out, be->gen + svc->gen);
    return be;
}

#define choose_backend(p, svc, hash, seed, id_out, refused) backend_of_flow(p, svc, hash, seed, id_out, refused, 1)
#define flow_owner(p, svc, hash, seed, id_out, refused) backend_of_flow(p, svc, hash, seed, id_out, refused, 0)
