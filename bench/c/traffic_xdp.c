/* bench/traffic.py's own XDP programs, one compile for both.
 *
 * floor_macswap: the floor, in place of the LB's program on the LB's end of
 * the veth: the least a program can do to send a frame back (swap the Ethernet
 * addresses, XDP_TX).
 *
 * rx_count: the receiver, attached (native XDP) to the sending end of the
 * veth: the frames the LB under test sends back with XDP_TX arrive here (a veth
 * drops XDP_TX frames unless its peer runs an XDP program, NOTES.md). Counts
 * them per CPU by kind (IPIP, IP6IP6, anything else), keeps a copy of the first
 * SAMPLE_LEN bytes of every SAMPLE_EVERY-th frame in a ring of SAMPLES slots
 * for the bench to check against l4lb's Maglev in Python, and drops them.
 *
 * Compiled by bench/traffic.py in one object with bpf_src/bench_floor.c
 * (PacketEnv.compile_floors(extra=...): one BCC compile, not two). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#define SAMPLE_LEN 128
#define SAMPLE_EVERY 1024
#define SAMPLES 64

enum rx_kind { RX_IPIP, RX_IP6IP6, RX_OTHER, RX_KINDS };

struct rx_counts {
    __u64 kind[RX_KINDS];
    __u64 total;
};

struct rx_sample {
    __u64 len;  /* 0: empty slot (u64: BCC wants per-CPU values 8-byte aligned) */
    __u8 data[SAMPLE_LEN];
};

BPF_PERCPU_ARRAY(rx_counts, struct rx_counts, 1);
BPF_PERCPU_ARRAY(rx_samples, struct rx_sample, SAMPLES);

static __always_inline int kind_of(void *data, void *data_end)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return RX_OTHER;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) <= data_end && ip->protocol == IPPROTO_IPIP)
            return RX_IPIP;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) <= data_end && ip6->nexthdr == IPPROTO_IPV6)
            return RX_IP6IP6;
    }
    return RX_OTHER;
}

int rx_count(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    __u32 zero = 0;
    struct rx_counts *c = rx_counts.lookup(&zero);
    if (!c)
        return XDP_DROP;
    int k = kind_of(data, data_end);
    if (k == RX_IPIP)
        c->kind[RX_IPIP]++;
    else if (k == RX_IP6IP6)
        c->kind[RX_IP6IP6]++;
    else
        c->kind[RX_OTHER]++;
    __u64 n = c->total++;
    if (n % SAMPLE_EVERY == 0) {
        __u32 slot = (n / SAMPLE_EVERY) % SAMPLES;
        struct rx_sample *s = rx_samples.lookup(&slot);
        if (!s)
            return XDP_DROP;
        /* Byte by byte against data_end: a variable-length helper copy
         * (bpf_xdp_load_bytes) loses its bounds to clang's reordering. */
        __u32 i;
#pragma unroll
        for (i = 0; i < SAMPLE_LEN; i++) {
            __u8 *b = (__u8 *)data + i;
            if ((void *)(b + 1) > data_end)
                break;
            s->data[i] = *b;
        }
        s->len = i;
    }
    return XDP_DROP;
}

int floor_macswap(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return XDP_ABORTED;
    unsigned char tmp[ETH_ALEN];
    __builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
    return XDP_TX;
}
