/* Per-CPU counters: no atomics needed, user space sums the CPUs. */
#pragma once
#include "lib/maps.h"

L4LB_INLINE void counter_add(struct counter *c, __u64 bytes)
{
    if (c) {
        c->packets += 1;
        c->bytes += bytes;
    }
}

L4LB_INLINE void count_reason(__u32 reason, __u64 bytes)
{
    struct counter *c = reason_stats.lookup(&reason);
    counter_add(c, bytes);
}

L4LB_INLINE void count_service(__u32 id, __u64 bytes)
{
    struct counter *c = svc_stats.lookup(&id);
    counter_add(c, bytes);
}

L4LB_INLINE void count_backend(__u32 id, __u64 bytes)
{
    struct counter *c = backend_stats.lookup(&id);
    counter_add(c, bytes);
}

/* Count the packet under `reason` and give its verdict. */
#define VERDICT(action, reason, bytes)     \
    ({                                     \
        count_reason((reason), (bytes));   \
        (action);                          \
    })
