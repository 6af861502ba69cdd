/* Floor programs for the benches (bench/datapath.py, bench/recorder.py), measured in the same run as l4lb:
 * what XDP_TX alone costs, and what a bare IPIP / IP6IP6 encapsulator costs
 * (no parsing, lookup or hashing). With -DBENCH_UNDO the encapsulators take
 * their header off again so repeat>1 keeps feeding them the same packet; the
 * *_next ones first step the flow as l4lb's BENCH_NEXT_FLOW build does
 * (lib/bench.h): the floor of the new-connection rows. bench/traffic.py's
 * floor (MAC swap) lives with its receiver in bench/c/traffic_xdp.c. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
/* The datapath's own flow cache (and so its maps, pinned in a bench-only
 * PIN_DIR): compiled by PacketEnv.compile_floors (l4lb/lab/pktenv.py). */
#include "lib/flowcache.h"
#include "lib/bench.h"

int floor_tx(struct xdp_md *ctx)
{
    return XDP_TX;
}

static __always_inline int encap(struct xdp_md *ctx, int hlen, __u16 proto)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr orig;
    if (data + sizeof(orig) > data_end)
        return XDP_ABORTED;
    __builtin_memcpy(&orig, data, sizeof(orig));
    if (bpf_xdp_adjust_head(ctx, -hlen))
        return XDP_ABORTED;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    if (data + sizeof(struct ethhdr) + sizeof(struct ipv6hdr) > data_end)
        return XDP_ABORTED;
    struct ethhdr *eth = data;
    __builtin_memcpy(eth, &orig, sizeof(orig));
    eth->h_proto = proto;
    if (hlen == sizeof(struct iphdr)) {
        struct iphdr *ip = (void *)(eth + 1);
        ip->version = 4;
        ip->ihl = 5;
        ip->tos = 0;
        ip->tot_len = bpf_htons((__u16)(data_end - data - sizeof(*eth)));
        ip->id = 0;
        ip->frag_off = 0;
        ip->ttl = 64;
        ip->protocol = IPPROTO_IPIP;
        ip->saddr = 0x010200c0;
        ip->daddr = 0x0a0200c0;
        __u32 sum = 0;
        __u16 *w = (__u16 *)ip;
        ip->check = 0;
#pragma unroll
        for (int i = 0; i < 10; i++)
            sum += w[i];
        sum = (sum & 0xffff) + (sum >> 16);
        ip->check = ~((sum & 0xffff) + (sum >> 16));
    } else {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        ip6->version = 6;
        ip6->priority = 0;
        ip6->payload_len = bpf_htons((__u16)(data_end - data - sizeof(*eth) - sizeof(*ip6)));
        ip6->nexthdr = IPPROTO_IPV6;
        ip6->hop_limit = 64;
        __builtin_memset(&ip6->saddr, 0x20, 16);
        __builtin_memset(&ip6->daddr, 0x20, 16);
    }
#ifdef BENCH_UNDO
    if (bpf_xdp_adjust_head(ctx, hlen))
        return XDP_ABORTED;
    data = (void *)(long)ctx->data;
    data_end = (void *)(long)ctx->data_end;
    if (data + sizeof(orig) > data_end)
        return XDP_ABORTED;
    __builtin_memcpy(data, &orig, sizeof(orig));
#endif
    return XDP_TX;
}

int floor_ipip(struct xdp_md *ctx)
{
    return encap(ctx, sizeof(struct iphdr), bpf_htons(ETH_P_IP));
}

int floor_ip6ip6(struct xdp_md *ctx)
{
    return encap(ctx, sizeof(struct ipv6hdr), bpf_htons(ETH_P_IPV6));
}

int floor_ipip_next(struct xdp_md *ctx)
{
    if (bench_next_flow(ctx))
        return XDP_ABORTED;
    return encap(ctx, sizeof(struct iphdr), bpf_htons(ETH_P_IP));
}

int floor_ip6ip6_next(struct xdp_md *ctx)
{
    if (bench_next_flow(ctx))
        return XDP_ABORTED;
    return encap(ctx, sizeof(struct ipv6hdr), bpf_htons(ETH_P_IPV6));
}

/* What one bpf_fib_lookup (to backend 192.0.2.10) costs on its own. */
int floor_fib(struct xdp_md *ctx)
{
    struct bpf_fib_lookup fib = {};
    fib.family = 2; /* AF_INET */
    fib.ifindex = ctx->ingress_ifindex;
    fib.ipv4_dst = 0x0a0200c0;
    fib.tot_len = 100;
    int rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
    return rc == BPF_FIB_LKUP_RET_SUCCESS ? XDP_TX : XDP_ABORTED;
}

/* The flow of the flow-table floors: l4lb's 40-byte flow_key, its client
 * address salted so that a pass can write a new key. The salt comes from a map
 * so the compiler cannot fold the hash. */
BPF_PERCPU_ARRAY(floor_seq, __u32, 1);

static __always_inline void floor_key(struct flow_key *k, __u32 salt)
{
    k->src[0] = 0x0700710cb ^ salt;
    k->dst[0] = 0x016433c6;
    k->sport = 33333;
    k->dport = 80;
    k->proto = 6;
    k->family = 4;
}

/* floor_seq's value, bumped first when `bump` (a new key every pass). */
static __always_inline int floor_salt(int bump, __u32 *salt)
{
    __u32 zero = 0;
    __u32 *seq = floor_seq.lookup(&zero);
    if (!seq)
        return -1;
    if (bump)
        *seq += 1;
    *salt = *seq;
    return 0;
}

/* What one flow-table write costs on its own: the key into an LRU hash of
 * the flow table's size, as the flow table was before flowcache.h. floor_lru
 * rewrites one key (what repeat>1 does to l4lb's SYN row); floor_lru_new
 * inserts a new key every pass (a stream of new flows, with eviction). */
struct floor_val { __u32 backend_id; __u32 gen; };
BPF_TABLE("lru_hash", struct flow_key, struct floor_val, floor_flows, FLOW_TABLE_SIZE);

static __always_inline int lru_write(int bump)
{
    __u32 salt;
    if (floor_salt(bump, &salt))
        return XDP_ABORTED;
    struct flow_key k = {};
    floor_key(&k, salt);
    struct floor_val v = { .backend_id = 7, .gen = 1 };
    floor_flows.update(&k, &v);
    return XDP_TX;
}

int floor_lru(struct xdp_md *ctx)
{
    return lru_write(0);
}

int floor_lru_new(struct xdp_md *ctx)
{
    return lru_write(1);
}

/* What one flow-cache write costs on its own: a 6-word jhash of the key
 * (l4lb's Maglev hash, which the cache reuses; counted here so the floor is
 * comparable with floor_lru, whose kernel hash covers the key), flow_locate
 * and flow_cache_put (bucket lookup, lock, 8-way scan, write), on a table of
 * the loader's size. floor_flow rewrites one key (l4lb's SYN row under
 * repeat>1); floor_flow_new writes a new key every pass (new flows, each in
 * a random bucket: cache misses, like floor_lru_new). */
static __always_inline int flow_write(int bump)
{
    __u32 salt;
    if (floor_salt(bump, &salt))
        return XDP_ABORTED;
    struct flow_key k = {};
    floor_key(&k, salt);
    __u32 w[6] = { k.src[0], k.src[1], k.src[2], k.src[3], ((__u32)k.sport << 16) | k.dport, k.proto };
    struct flow_pos pos;
    flow_locate(&k, jhash_6words(w, 0), &pos);
    flow_cache_put(&pos, &k, 7, 1);
    return XDP_TX;
}

int floor_flow(struct xdp_md *ctx)
{
    return flow_write(0);
}

int floor_flow_new(struct xdp_md *ctx)
{
    return flow_write(1);
}
