/* The flow table: a global, set-associative cache of flow -> (backend slot,
 * gen), FLOW_WAYS ways per bucket (layout in maps.h).
 *
 * Why not the kernel's LRU hash: every SYN was an LRU update (node allocation,
 * list moves, freeing the replaced node), 140-270 ns alone. Here a SYN is a
 * hash, one bucket lock and a write into that bucket.
 *
 * Eviction, per bucket: the same key is overwritten; else an empty way; else
 * the least recently used way that no non-SYN packet has hit yet (embryonic:
 * what a SYN flood leaves); only then the least recently used established
 * way. So a SYN flood cannot push established flows out while embryonic ones
 * are there.
 *
 * Locking: a bucket's lock word is taken with cmpxchg and released with xchg
 * (both fully ordered BPF atomics, ~3 ns here) rather than bpf_spin_lock,
 * which bench/datapath.py measured at ~43 ns per lock+unlock on this kernel
 * (a helper call that also saves and restores interrupts) -- more than the
 * LRU lookup it replaces on the hit path. The lock is never held across a
 * helper call or a return, so it cannot leak. A CPU that finds a bucket busy
 * for FLOW_LOCK_TRIES attempts (its holder interrupted, say) does not spin
 * on: a lookup reads the bucket unlocked (a torn read can only pair a key
 * being written with the previous entry's backend, which the caller's
 * gen/service checks mostly catch) and refreshes nothing; an insert is
 * skipped (the flow's next packet inserts it). Each attempt costs the
 * verifier ~550 instructions, hence few; the program verifies in ~81k of
 * its 1M. The clock is bpf_jiffies64()
 * (inlined by the verifier; bpf_ktime_get_coarse_ns() cost ~13 ns more per
 * packet). */
#pragma once
#include "lib/maps.h"
#include "lib/jhash.h"

#define FLOW_LOCK_TRIES 16

_Static_assert((FLOW_BUCKETS & (FLOW_BUCKETS - 1)) == 0, "FLOW_BUCKETS must be a power of two");
_Static_assert((FLOW_WAYS & (FLOW_WAYS - 1)) == 0 && FLOW_WAYS <= 8, "FLOW_WAYS must be 1, 2, 4 or 8");
_Static_assert(__builtin_offsetof(struct flow_bucket, way) <= 64, "bucket header must fit one cache line");
_Static_assert(sizeof(struct flow_key) == 40, "flow_key is compared as five u64s");

/* Where a flow lives: computed once per packet, before the bucket is locked. */
struct flow_pos {
    __u32 bucket;
    __u32 now;        /* jiffies, truncated */
    __u16 tag;        /* FLOW_TAG_USED | FLOW_TAG_EST | hash bits */
};

/* Bucket and tag of a flow: jhash of its key hash (client address, client
 * port, service port, protocol: flow_key_hash() in lookup.h, for most
 * services the Maglev hash already computed) with the VIP and family, so the
 * whole key counts. Never the Maglev hash alone: it leaves out the client
 * port for client-IP-affinity services, which would pile all of one client's
 * connections into one bucket. A 10-word jhash of the key cost ~25 ns per
 * packet (bench/datapath.py), this final mix a third of that. The bucket
 * comes from c, the tag from b, so they are independent bits. */
L4LB_INLINE void flow_locate(const struct flow_key *fk, __u32 key_hash, struct flow_pos *pos)
{
    __u32 a, b, c;
    a = b = c = JHASH_INITVAL + (3 << 2);
    a += key_hash;
    b += fk->dst[0] ^ fk->dst[1] ^ fk->dst[2] ^ fk->dst[3];
    c += fk->family;
    JHASH_FINAL(a, b, c);
    pos->bucket = c & (FLOW_BUCKETS - 1);
    pos->tag = (__u16)(b >> 16) | FLOW_TAG_USED | FLOW_TAG_EST;
    pos->now = (__u32)bpf_jiffies64();
}

L4LB_INLINE int flow_key_eq(const struct flow_key *x, const struct flow_key *y)
{
    const __u64 *a = (const __u64 *)x, *b = (const __u64 *)y;
    return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4])) == 0;
}

/* Take the bucket (test, then cmpxchg an even lock word to odd). Returns the
 * word to release it with, or 0 if it stayed busy. */
L4LB_INLINE __u64 flow_lock(struct flow_bucket *bk)
{
#pragma clang loop unroll(disable)
    for (int i = 0; i < FLOW_LOCK_TRIES; i++) {
        __u64 s = *(volatile __u64 *)&bk->lock;
        if (!(s & 1) && __sync_val_compare_and_swap(&bk->lock, s, s + 1) == s)
            return s + 2;
    }
    return 0;
}

L4LB_INLINE void flow_unlock(struct flow_bucket *bk, __u64 next)
{
    __sync_lock_test_and_set(&bk->lock, next);  /* xchg: orders the writes above before it */
}

/* The cached backend slot and gen of this flow: 1 on a hit, which also
 * refreshes the way and marks it established (unless the bucket was busy). */
L4LB_INLINE int flow_cache_get(const struct flow_pos *pos, const struct flow_key *fk, __u32 *id, __u32 *gen)
{
    __u32 idx = pos->bucket;
    struct flow_bucket *bk = flows.lookup(&idx);
    if (!bk)
        return 0;
    __u64 next = flow_lock(bk);  /* 0: busy, read it unlocked */
    int hit = 0;
#pragma unroll
    for (int i = 0; i < FLOW_WAYS; i++) {
        if (!hit && (bk->tag[i] | FLOW_TAG_EST) == pos->tag && flow_key_eq(&bk->way[i].key, fk)) {
            if (next) {
                bk->tag[i] = pos->tag;  /* with FLOW_TAG_EST */
                bk->used[i] = pos->now;
            }
            *id = bk->way[i].backend_id;
            *gen = bk->way[i].gen;
            hit = 1;
        }
    }
    if (next)
        flow_unlock(bk, next);
    return hit;
}

/* Remember this flow's backend (a SYN, or a packet whose entry was missing or
 * no longer valid). New and overwritten entries start embryonic.
 *
 * Each way gets a score, priority << 32 | age (same key 3, empty 2,
 * embryonic 1, established 0; the older the better within a priority), and
 * the best way is overwritten. The running best index lives in the
 * bucket's scratch word, not a register: kept in a register it tipped the
 * recorder build with 64 compiled-in masks over the 512-byte BPF stack (a spill), and
 * separate same/empty/oldest indexes took the verifier past its complexity
 * limit. */
L4LB_INLINE void flow_cache_put(const struct flow_pos *pos, const struct flow_key *fk, __u32 id, __u32 gen)
{
    __u32 idx = pos->bucket;
    struct flow_bucket *bk = flows.lookup(&idx);
    if (!bk)
        return;
    __u64 next = flow_lock(bk);
    if (!next)
        return;
    __u64 best = 0;
    bk->scratch = 0;
#pragma unroll
    for (int i = 0; i < FLOW_WAYS; i++) {
        __u16 t = bk->tag[i];
        __u64 prio;
        if (!t)
            prio = 2;
        else if ((t | FLOW_TAG_EST) == pos->tag && flow_key_eq(&bk->way[i].key, fk))
            prio = 3;
        else
            prio = !(t & FLOW_TAG_EST);
        __u64 score = (prio << 32) | (__u32)(pos->now - bk->used[i]);  /* age mod 2^32: the clock wraps */
        if (score > best) {
            best = score;
            bk->scratch = i;
        }
    }
    __u32 w = bk->scratch & (FLOW_WAYS - 1);  /* bounds for the verifier */
    bk->tag[w] = pos->tag & ~FLOW_TAG_EST;
    bk->used[w] = pos->now;
    __builtin_memcpy(&bk->way[w].key, fk, sizeof(*fk));
    bk->way[w].backend_id = id;
    bk->way[w].gen = gen;
    flow_unlock(bk, next);
}
