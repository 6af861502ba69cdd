/* Health-check probes through the tunnel (tc egress on the LB's loopback).
 *
 * A probe socket connects to VIP:port with SO_MARK naming a target (one
 * backend address); the daemon's policy-routing rule sends marked packets
 * out of `lo`, whose egress runs this program:
 *   mark -> target -> IPIP / IP6IP6 with the probe's own source as outer
 *   source -> FIB lookup of the backend -> Ethernet header -> redirect to
 *   the NIC that leads to it (or let the kernel resolve the neighbour).
 * So the backend sees exactly what a client's packet looks like after the
 * XDP program, and answers from the VIP straight to the LB's address. The
 * mark is cleared first, so nothing routes the outer packet back here.
 * The device is the daemon's own (a NOARP veth that only the probe rule
 * routes to): anything else leaving it is dropped, so a probe can never
 * reach a VIP unencapsulated (where Maglev would pick some other backend). */
#include "lib/common.h"
#include "lib/csum.h"
#include "lib/hc_maps.h"
#include <uapi/linux/pkt_cls.h>

/* BCC 0.26's helpers.h declares bpf_redirect_neigh with three arguments; the
 * kernel's helper takes four (ifindex, params, plen, flags), and a stray
 * fourth register would be read as flags and refused. */
static long (*hc_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
    (void *)BPF_FUNC_redirect_neigh;

#ifndef HC_MAX_LEN
#define HC_MAX_LEN 1400       /* probe sockets use a smaller MSS; nothing larger is a probe */
#endif

L4LB_INLINE int hc_count(__u32 reason, int verdict)
{
    __u64 *n = hc_stats.lookup(&reason);
    if (n)
        *n += 1;
    return verdict;
}

/* Write the outer header in the room made after the Ethernet header. */
L4LB_INLINE int hc_push(struct __sk_buff *skb, void *hdr, __u32 len, __u64 encap_flag)
{
    if (bpf_skb_adjust_room(skb, len, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO | encap_flag))
        return -1;
    return bpf_skb_store_bytes(skb, ETH_HLEN, hdr, len, 0);
}

L4LB_INLINE int hc_encap4(struct __sk_buff *skb, struct hc_target *t, struct bpf_fib_lookup *fib)
{
    struct iphdr in, out = {};
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &in, sizeof(in)) || in.version != 4)
        return -1;
    out.version = 4;
    out.ihl = 5;
    out.tos = in.tos;
    out.tot_len = bpf_htons(bpf_ntohs(in.tot_len) + IPV4_HLEN);
    out.frag_off = bpf_htons(L4LB_IP_DF);
    out.ttl = OUTER_TTL;
    out.protocol = IPPROTO_IPIP;
    out.saddr = in.saddr;
    out.daddr = t->addr[0];
    out.check = l4lb_ipv4_csum(&out);
    fib->family = AF_INET;
    fib->ipv4_src = out.saddr;
    fib->ipv4_dst = out.daddr;
    return hc_push(skb, &out, sizeof(out), BPF_F_ADJ_ROOM_ENCAP_L3_IPV4);
}

L4LB_INLINE int hc_encap6(struct __sk_buff *skb, struct hc_target *t, struct bpf_fib_lookup *fib)
{
    struct ipv6hdr in, out = {};
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &in, sizeof(in)) || in.version != 6)
        return -1;
    out.version = 6;
    out.priority = in.priority;
    out.flow_lbl[0] = in.flow_lbl[0];
    out.flow_lbl[1] = in.flow_lbl[1];
    out.flow_lbl[2] = in.flow_lbl[2];
    out.payload_len = bpf_htons(bpf_ntohs(in.payload_len) + IPV6_HLEN);
    out.nexthdr = IPPROTO_IPV6;
    out.hop_limit = OUTER_TTL;
    out.saddr = in.saddr;
    __builtin_memcpy(&out.daddr, t->addr, 16);
    fib->family = AF_INET6;
    __builtin_memcpy(fib->ipv6_src, &out.saddr, 16);
    __builtin_memcpy(fib->ipv6_dst, t->addr, 16);
    return hc_push(skb, &out, sizeof(out), BPF_F_ADJ_ROOM_ENCAP_L3_IPV6);
}

int hc_encap(struct __sk_buff *skb)
{
    __u32 mark = skb->mark;
    struct hc_target *t = mark ? hc_targets.lookup(&mark) : NULL;
    if (!t)
        return hc_count(HC_DROP_NOT_PROBE, TC_ACT_SHOT);
    if (skb->len > HC_MAX_LEN)
        return hc_count(HC_DROP_TOO_BIG, TC_ACT_SHOT);
    __u16 proto = t->family == FAMILY_V4 ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);
    if (skb->protocol != proto)
        return hc_count(HC_DROP_FAMILY, TC_ACT_SHOT);

    struct bpf_fib_lookup fib = {};
    int rc = t->family == FAMILY_V4 ? hc_encap4(skb, t, &fib) : hc_encap6(skb, t, &fib);
    if (rc)
        return hc_count(HC_DROP_ERROR, TC_ACT_SHOT);
    skb->mark = 0;  /* the outer packet must not match the probe routing rule again */

    /* Looked up as if it arrived on lo: the main tables, without our mark. */
    fib.ifindex = skb->ifindex;
    rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
        return hc_count(HC_TX_NEIGH, hc_redirect_neigh(fib.ifindex, NULL, 0, 0));
    if (rc != BPF_FIB_LKUP_RET_SUCCESS)
        return hc_count(HC_DROP_NO_ROUTE, TC_ACT_SHOT);
    struct ethhdr eth;
    __builtin_memcpy(eth.h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(eth.h_source, fib.smac, ETH_ALEN);
    eth.h_proto = proto;
    if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0))
        return hc_count(HC_DROP_ERROR, TC_ACT_SHOT);
    return hc_count(HC_TX, bpf_redirect(fib.ifindex, 0));
}
