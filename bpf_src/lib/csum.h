/* Checksum helpers, prefixed so they never clash with kernel headers. */
#pragma once
#include "lib/common.h"

L4LB_INLINE __u16 l4lb_csum_fold(__u64 sum)
{
#pragma unroll
    for (int i = 0; i < 4; i++)
        sum = (sum & 0xffff) + (sum >> 16);
    return ~sum & 0xffff;
}

/* Header checksum of a 20-byte IPv4 header (check field must be 0). */
L4LB_INLINE __u16 l4lb_ipv4_csum(struct iphdr *iph)
{
    __u16 *w = (__u16 *)iph;
    __u64 sum = 0;
#pragma unroll
    for (int i = 0; i < IPV4_HLEN / 2; i++)
        sum += w[i];
    return l4lb_csum_fold(sum);
}

/* RFC 1624 incremental update of a 16-bit field. */
L4LB_INLINE __u16 l4lb_csum_replace16(__u16 check, __u16 old, __u16 new)
{
    __u32 sum = (~check & 0xffff) + (~old & 0xffff) + new;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum & 0xffff;
}
