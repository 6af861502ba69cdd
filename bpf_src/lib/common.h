/* Shared includes, feature switches and small helpers.
 *
 * Compile-time switches (passed by l4lb/datapath/loader.py as -D...):
 *   MAGLEV_M          Maglev table size (prime)
 *   MAX_SERVICES      service slots (also Maglev outer map size)
 *   MAX_BACKENDS      (service, backend) slots; id 0 is reserved for "none"
 *   FLOW_TABLE_SIZE   flow table entries (a power of two, see maps.h);
 *   FLOW_WAYS, FLOW_BUCKETS  its ways per bucket and buckets (powers of two)
 *   MAX_IFACES        attached NICs (devmap slots)
 *   PIN_DIR           bpffs directory the maps are pinned in
 *   BENCH_UNDO        bench-only: undo our own encapsulation after XDP_TX so
 *                     BPF_PROG_TEST_RUN with repeat>1 measures forwarding
 *   BENCH_NEXT_FLOW   bench-only, with BENCH_UNDO: each pass a new flow (lib/bench.h)
 *   NO_RECORDER       bench-only: leave the recorder hooks out (lib/recorder.h)
 *   NEXTHOP_CACHE     next hops from the daemon-kept `nexthops` map first,
 *                     bpf_fib_lookup only when it has no valid entry
 */
#pragma once

/* UAPI headers only: the kernel-internal <linux/ip.h> & co. pull in most of the kernel's
 * headers and cost BCC ~2 s of CPU per compile (a daemon's first start, every test and
 * bench build); the structs and constants are the same, and so is the bytecode. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>

#ifndef MAGLEV_M
#define MAGLEV_M 16381
#endif
#ifndef MAX_SERVICES
#define MAX_SERVICES 1024
#endif
#ifndef MAX_BACKENDS
#define MAX_BACKENDS 65536
#endif
#ifndef FLOW_TABLE_SIZE
#define FLOW_TABLE_SIZE 1048576
#endif
#ifndef MAX_IFACES
#define MAX_IFACES 64
#endif
#ifndef PIN_DIR
#error "PIN_DIR must be passed by the loader"
#endif

#define L4LB_INLINE static __always_inline

/* bpf_fib_lookup's families (the UAPI headers BPF programs see lack socket.h). */
#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* Frame length as a plain number. The barrier keeps clang from folding it
 * into arithmetic on data_end (e.g. want - len as want + data - data_end),
 * which the verifier refuses. */
L4LB_INLINE long frame_len(struct xdp_md *ctx)
{
    long n = (long)ctx->data_end - (long)ctx->data;
    asm volatile("" : "+r"(n));
    return n;
}

#define FAMILY_V4 4
#define FAMILY_V6 6

#define IPV4_HLEN ((int)sizeof(struct iphdr))
#define IPV6_HLEN ((int)sizeof(struct ipv6hdr))
#define OUTER_TTL 64

/* IPv4 flags in host order of frag_off. */
#define L4LB_IP_DF 0x4000
#define L4LB_IP_MF 0x2000
#define L4LB_IP_OFFMASK 0x1fff

/* Most of the original packet an ICMP error of ours quotes, so that the whole
 * reply fits the minimum MTU: v4 20 + 8 + 548 = 576 (RFC 1812 4.3.2.3),
 * v6 40 + 8 + 1232 = 1280 (RFC 4443 2.4(c)). Multiples of 4: the checksum
 * sums 32-bit words. */
#define ICMP4_QUOTE 548
#define ICMP6_QUOTE 1232
