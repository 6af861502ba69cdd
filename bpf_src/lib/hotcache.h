/* Per-CPU, direct-mapped caches in front of the hash maps `services` and
 * `ifaces` (maps.h): a hit is two inlined array lookups and a key compare
 * instead of a hash-map lookup, which on this kernel is a function call (the
 * verifier inlines array lookups only). bench/datapath.py measured the two
 * hash lookups at ~60 ns of a flow-table hit's ~150 ns above the IPIP floor.
 *
 * Consistency: `cache_epoch` is read before the map, and an entry filled from
 * the map carries the epoch read before it; user space bumps the epoch after
 * every write to either map. So an entry is never older than the epoch it
 * carries, and every write is seen by the packets that read the epoch after
 * it: the same guarantee a packet that looked the map up just before the
 * write has. Misses (traffic for no service) are not cached. Per CPU: no
 * locks, no shared lines; an XDP program runs to its end on one CPU. */
#pragma once
#include "lib/maps.h"
#include "lib/jhash.h"

L4LB_INLINE __u64 cache_epoch_now(void)
{
    __u32 zero = 0;
    __u64 *e = cache_epoch.lookup(&zero);
    return e ? *e : 0;   /* 0: no valid epoch (user space starts at 1), caches stay unused */
}

L4LB_INLINE int svc_key_eq(const struct svc_key *x, const struct svc_key *y)
{
    const __u32 *a = (const __u32 *)x, *b = (const __u32 *)y;
    return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4])) == 0;
}

_Static_assert(sizeof(struct svc_key) == 20, "svc_key is compared as five u32s");
_Static_assert((SVC_CACHE_SLOTS & (SVC_CACHE_SLOTS - 1)) == 0, "SVC_CACHE_SLOTS must be a power of two");
_Static_assert((IF_CACHE_SLOTS & (IF_CACHE_SLOTS - 1)) == 0, "IF_CACHE_SLOTS must be a power of two");

/* The service entry of `key`: from this CPU's cache, else from `services`
 * (then cached). The pointer is to this CPU's copy. */
L4LB_INLINE struct svc_info *svc_cached(struct svc_key *key)
{
    __u64 epoch = cache_epoch_now();
    __u32 a = key->vip[0] ^ key->vip[1], b = key->vip[2] ^ key->vip[3];
    __u32 c = ((__u32)key->port << 16) | ((__u32)key->proto << 8) | key->family;
    JHASH_FINAL(a, b, c);
    __u32 slot = c & (SVC_CACHE_SLOTS - 1);
    struct svc_cache_entry *ce = svc_cache.lookup(&slot);
    if (ce && epoch && ce->epoch == epoch && svc_key_eq(&ce->key, key))
        return &ce->info;
    if (!ce)
        return 0;   /* cannot happen: the slot is in bounds */
    struct svc_info *svc = services.lookup(key);
    if (!svc)
        return 0;
    /* Always this CPU's copy, never the map's element: one pointer type for
     * the verifier (two doubled the states it walks after the lookup). */
    __builtin_memcpy(&ce->key, key, sizeof(*key));
    __builtin_memcpy(&ce->info, svc, sizeof(*svc));
    ce->epoch = epoch;   /* 0: a copy that never matches */
    return &ce->info;
}

/* The `ifaces` entry of an interface, the same way. */
L4LB_INLINE struct if_info *iface_cached(__u32 ifindex)
{
    __u64 epoch = cache_epoch_now();
    __u32 slot = ifindex & (IF_CACHE_SLOTS - 1);
    struct if_cache_entry *ce = if_cache.lookup(&slot);
    if (ce && epoch && ce->epoch == epoch && ce->ifindex == ifindex)
        return &ce->info;
    if (!ce)
        return 0;
    struct if_info *ifi = ifaces.lookup(&ifindex);
    if (!ifi)
        return 0;
    __builtin_memcpy(&ce->info, ifi, sizeof(*ifi));
    ce->ifindex = ifindex;
    ce->epoch = epoch;
    return &ce->info;
}
