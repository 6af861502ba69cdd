/* Bench-only: make every BPF_PROG_TEST_RUN pass a new flow.
 *
 * With repeat > 1 the kernel hands each pass the buffer the previous pass left
 * (NOTES.md, the repeat trap); the BENCH_UNDO build puts the packet back as it
 * came, so each pass would see the same flow. bench_next_flow() steps the flow
 * in place first: client (source) port + 1, and when the port wraps past 65535
 * to 1, the last byte of the client address + 1 — 65,535 x 256 flows before one
 * repeats. Checksums are not kept up to date: the datapath never checks them.
 * Used by l4lb.c (with -DBENCH_NEXT_FLOW) and bench_floor.c (the same step
 * before a bare encapsulator, the floor of that row). Expects what the bench
 * sends: Ethernet, IPv4 without options or IPv6 without extension headers,
 * then TCP or UDP (whose source port is the first 2 bytes of both). */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

static __always_inline int bench_next_flow(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    __u8 *last;
    __be16 *sport;

    if ((void *)(eth + 1) > data_end)
        return -1;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        sport = (void *)(ip + 1);
        if ((void *)(sport + 1) > data_end)
            return -1;
        last = (__u8 *)&ip->saddr + 3;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        sport = (void *)(ip6 + 1);
        if ((void *)(sport + 1) > data_end)
            return -1;
        last = &ip6->saddr.s6_addr[15];
    } else {
        return -1;
    }
    __u16 port = bpf_ntohs(*sport) + 1;
    if (!port) {
        port = 1;
        *last += 1;
    }
    *sport = bpf_htons(port);
    return 0;
}
