/* Map layouts of the health-check encapsulator (bpf_src/hc_encap.c). Kept
 * apart from maps.h: these maps have their own pin directory, so changing
 * them never costs the XDP program its flow table. Python reads and writes
 * them through BCC's generated ctypes only. */
#pragma once
#include "lib/common.h"

#ifndef HC_MAX_TARGETS
#define HC_MAX_TARGETS 65536
#endif

/* What a probe socket's SO_MARK names: the backend its packets are
 * encapsulated to. Addresses as four network-order words; IPv4 uses word 0. */
struct hc_target {
    __u32 addr[4];
    __u8 family;      /* FAMILY_V4 / FAMILY_V6 */
    __u8 pad[3];
};

/* Why a packet went where it went. Python reads the names from this enum. */
enum hc_reason {
    HC_DROP_NOT_PROBE = 0,   /* no mark, or one that names no target (the device is ours: never leaks) */
    HC_TX,                   /* encapsulated, next hop known: redirected to the NIC */
    HC_TX_NEIGH,             /* encapsulated, neighbour unresolved: the kernel resolves it */
    HC_DROP_FAMILY,          /* inner family differs from the target's */
    HC_DROP_TOO_BIG,         /* larger than HC_MAX_LEN: probes are small */
    HC_DROP_NO_ROUTE,        /* no route to the backend */
    HC_DROP_ERROR,           /* a helper refused (headroom, store) */
    HC_MAX,
};

BPF_TABLE_PINNED("hash", __u32, struct hc_target, hc_targets, HC_MAX_TARGETS, PIN_DIR "/hc_targets");
BPF_TABLE_PINNED("percpu_array", __u32, __u64, hc_stats, HC_MAX, PIN_DIR "/hc_stats");
