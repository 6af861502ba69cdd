/* Every map layout of the datapath. These structs are the single source of
 * truth: Python reads and writes them through BCC's generated ctypes
 * (table.Key / table.Leaf), never through a hand-kept mirror. */
#pragma once
#include "lib/common.h"

/* Addresses are stored as four network-order words; IPv4 uses word 0. */
struct svc_key {
    __u32 vip[4];
    __u16 port;       /* network order */
    __u8 proto;       /* IPPROTO_TCP / IPPROTO_UDP */
    __u8 family;      /* FAMILY_V4 / FAMILY_V6 */
};

#define SVC_F_DNAT     (1U << 0)  /* rewrite the inner destination port */
#define SVC_F_NO_SPORT (1U << 1)  /* hash without the client port (client-IP affinity) */
#define SVC_F_NO_BACKEND_DROP (1U << 2)  /* no usable backend: drop silently (else reject, lib/reject.h) */
#define SVC_F_PING     (1U << 3)  /* answer_ping: echo replies look at the VIP's entry in `vips`
                                   * (VIP_F_PING); here so the entry holds all of its service's options */
#define SVC_F_SRC_RANGES (1U << 4)  /* new flows only from the service's source ranges (lib/srcrange.h) */
#define SVC_F_AFFINITY_PREFIX (1U << 5)  /* hash the client address cut to affinity_prefix bits */

struct svc_info {
    __u32 id;         /* index into svc_stats; backends name their owner by it */
    __u32 flags;      /* SVC_F_* */
    __u32 ring;       /* maglev_outer index of the table in force */
    __u32 gen;        /* of the source ranges (0: none): a flow entry holds its backend's gen plus
                       * this, so a change of the ranges has every flow checked again */
    __u32 affinity_prefix;  /* SVC_F_AFFINITY_PREFIX: leading bits of the client address hashed */
};

#define BE_F_DOWN (1U << 0)  /* maintenance: existing flows are not honoured */

struct backend_info {
    __u32 addr[4];
    __u16 port;       /* network order, DNAT target */
    __u8 family;      /* 0 = free slot */
    __u8 flags;       /* BE_F_* */
    __u32 svc_id;     /* owning service */
    __u32 gen;        /* bumped on every allocation; flow entries must match it */
};

/* 8-byte aligned: the flow cache compares and copies keys as five u64s. */
struct flow_key {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;
    __u16 dport;
    __u8 proto;
    __u8 family;
    __u16 pad;
} __attribute__((aligned(8)));

/* The flow table is a set-associative cache of our own (lib/flowcache.h), not
 * a kernel LRU hash: a SYN costs one bucket write instead of an LRU node
 * allocation. FLOW_TABLE_SIZE = FLOW_BUCKETS * FLOW_WAYS, both powers of two
 * (the loader passes them). It is global, not per-CPU (veth runs XDP on the
 * sender's CPU, so flows move between CPUs): each bucket has a lock word. */
#ifndef FLOW_WAYS
#define FLOW_WAYS 8
#endif
#ifndef FLOW_BUCKETS
#define FLOW_BUCKETS (FLOW_TABLE_SIZE / FLOW_WAYS)
#endif

/* Way tags: 0 = empty; else bits 15..2 of the key hash | FLOW_TAG_USED, plus
 * FLOW_TAG_EST once a non-SYN packet hit the way (else it is embryonic). */
#define FLOW_TAG_USED 1U
#define FLOW_TAG_EST 2U

struct flow_way {
    struct flow_key key;
    __u32 backend_id;
    __u32 gen;        /* backend_info.gen the entry was made for */
};

/* Everything an eviction scan reads sits in the first 64 bytes: lock, tags
 * and last-used times of all ways; then the ways (48 bytes each: 56 bytes per
 * entry with the header). Tags are 16 bits so that 8 ways fit that line; a
 * tag only filters, the full key decides. */
struct flow_bucket {
    __u64 lock;               /* odd while a CPU holds the bucket; +2 per hold (cmpxchg/xchg) */
    __u16 tag[FLOW_WAYS];
    __u32 used[FLOW_WAYS];    /* bpf_jiffies64() when last written or hit; ages compare mod 2^32 */
    __u32 scratch;            /* flow_cache_put's choice, while it holds the lock */
    __u32 pad;
    struct flow_way way[FLOW_WAYS];
};

#define CFG_F_SRC_PREFIX4 (1U << 0)  /* outer v4 source = prefix | flow-hash bits */
#define CFG_F_SRC_PREFIX6 (1U << 1)
#define CFG_F_ICMP_FWD    (1U << 2)  /* ICMP errors about VIP flows go to the flow's backend (lib/icmp_err.h) */

struct lb_config {
    __u32 hash_seed;
    __u32 flags;             /* CFG_F_* */
    __u32 src4_prefix;       /* network order, already masked */
    __u32 src4_hostmask;     /* network order: the bits taken from the flow hash */
    __u32 src6_prefix[4];
    __u32 src6_hostmask[4];
    __u32 icmp_rate;         /* generated replies per second per CPU and kind (0 = none) */
    __u32 icmp_burst;
};

/* Per attached/egress interface: our outer source addresses and devmap slot. */
#define IF_F_V4 (1U << 0)
#define IF_F_V6 (1U << 1)
struct if_info {
    __u32 v4;
    __u32 v6[4];
    __u32 tx_slot;           /* index in tx_ports */
    __u32 flags;             /* IF_F_* */
};

/* Next hop of a backend, resolved by the daemon from the kernel's routes and
 * neighbours (NEXTHOP_CACHE builds). Valid only while gen equals the backend
 * slot's gen, so a reused slot never inherits a stale next hop. */
struct nh_info {
    __u32 ifindex;           /* egress NIC */
    __u32 gen;               /* backend_info.gen it was resolved for; 0 = none */
    __u32 mtu;               /* egress MTU (route MTU if smaller) */
    __u8 smac[6];
    __u8 dmac[6];
};

struct counter {
    __u64 packets;
    __u64 bytes;
};

struct icmp_bucket {
    __u64 last_ns;
    __u64 tokens_x1e9;       /* tokens scaled by 1e9 to refill without floats */
};

/* Generated replies, each kind with its own token bucket (lib/icmp.h): a SYN
 * flood to a service without backends or a ping flood must not use up the
 * replies path-MTU discovery depends on. */
enum l4lb_reply {
    REPLY_TOO_BIG = 0,       /* ICMP frag-needed / packet-too-big */
    REPLY_REJECT,            /* TCP RST / ICMP port unreachable: no usable backend */
    REPLY_ECHO,              /* ICMP echo reply from a VIP */
    REPLY_KINDS,
};

/* Per-CPU caches of the two hash maps every forwarded packet needs,
 * `services` and `ifaces` (lib/hotcache.h): an array lookup is inlined by the
 * verifier, a hash-map lookup is a call (~20-40 ns each here, bench/datapath.py).
 * An entry is valid while its epoch equals `cache_epoch`, which user space
 * bumps after every write to either map (Tables.tables_changed). */
#define SVC_CACHE_SLOTS 256
#define IF_CACHE_SLOTS 16

struct svc_cache_entry {
    struct svc_key key;
    struct svc_info info;
    __u64 epoch;              /* 64 bits: never wraps back onto a stale entry */
};

struct if_cache_entry {
    __u64 epoch;
    __u32 ifindex;
    struct if_info info;
};

/* Rare paths are programs of their own, reached by tail call (lib/slow.h). */
enum l4lb_slow {
    SLOW_ICMP = 0,           /* ICMP to a VIP: echo, errors about its flows */
    SLOW_FRAGMENT,           /* a later fragment */
    SLOW_REPLY,              /* a generated reply: too big, reject */
    SLOW_MAX,
};

/* What the hot path hands a tail-called program beside the packet (per CPU:
 * a tail call runs on the same CPU, at once). */
struct slow_args {
    __u32 reply;             /* enum l4lb_reply, for SLOW_REPLY */
    __u32 mtu;               /* REPLY_TOO_BIG: the next hop's MTU less our outer header */
};

/* A VIP (any service on it), for what is addressed to the VIP rather than to
 * a service: pings, and fragments whose first fragment was not seen. */
struct vip_key {
    __u32 addr[4];
    __u32 family;
};

#define VIP_F_PING (1U << 0)  /* answer ICMP echo requests (a service on it has answer_ping) */

struct vip_info {
    __u32 flags;             /* VIP_F_* */
};

/* Fragments (lib/frag.h): the L4 ports of a datagram, learnt from its first
 * fragment, keyed like the reassembly queue of the receiving host (RFC 791,
 * RFC 8200 4.5): addresses, identification, protocol. */
#ifndef FRAG_TABLE_SIZE
#define FRAG_TABLE_SIZE 8192
#endif
#define FRAG_LIFETIME_NS 1000000000ULL  /* later fragments are matched for 1 s after the first */

struct frag_key {
    __u32 src[4];
    __u32 dst[4];
    __u32 id;                /* IPv4 identification (16 bits) / IPv6 fragment header's (32) */
    __u8 proto;
    __u8 family;
    __u16 pad;
};

struct frag_ports {
    __u16 sport;             /* network order */
    __u16 dport;
    __u32 pad;
    __u64 expires_ns;        /* bpf_ktime_get_ns() of the first fragment + FRAG_LIFETIME_NS */
};

/* Source ranges (a service's allowlist, lib/srcrange.h): one LPM-trie entry
 * per range, keyed by service id then address, so one trie serves every
 * service. prefixlen counts the id's 32 bits too. Addresses as four
 * network-order words; IPv4 uses word 0. */
#ifndef MAX_SOURCE_RANGES
#define MAX_SOURCE_RANGES 65536
#endif

struct src_range_key {
    __u32 prefixlen;         /* 32 + the range's prefix length */
    __u32 svc_id;
    __u32 addr[4];
};

/* Why a packet went where it went: exactly one reason per packet. Python
 * reads the names from this enum. */
enum l4lb_reason {
    REASON_PASS_NOT_IP = 0,      /* not IPv4/IPv6 */
    REASON_PASS_NOT_SERVICE,     /* no service for (dst, dport, proto); ICMP not for a VIP flow */
    REASON_PASS_MALFORMED,       /* truncated headers, or length fields that disagree */
    REASON_PASS_NO_NEIGH,        /* next hop unresolved: the kernel resolves it */
    REASON_PASS_FIB,             /* no route / fib refused: handed to the kernel */
    REASON_PASS_NO_TXPORT,       /* egress NIC has no l4lb program / source address */
    REASON_PASS_FRAGMENT,        /* fragment not to a service (or a later one not to a VIP) */
    REASON_PASS_EXT_HEADERS,     /* IPv6 with more than IPV6_MAX_EXT_HDRS extension headers */
    REASON_PASS_OUTER_FRAGMENT,  /* DF clear and too big: encapsulated, the kernel fragments the outer packet */
    REASON_DROP_NO_BACKEND,      /* no usable backend, and the service drops (or nothing may be answered) */
    REASON_DROP_HEADROOM,        /* adjust_head/tail refused */
    REASON_DROP_ICMP_RATELIMIT,  /* too big, reply suppressed by its rate limit */
    REASON_DROP_REJECT_RATELIMIT,/* no usable backend, reject suppressed by its rate limit */
    REASON_DROP_ECHO_RATELIMIT,  /* echo request to a VIP, reply suppressed by its rate limit */
    REASON_DROP_REPLY_FORBIDDEN, /* a reply was due but must not be sent (RFC 1812 4.3.2.7, RFC 4443 2.4(e)) */
    REASON_DROP_FRAG_NO_FIRST,   /* later fragment to a VIP whose first fragment was not seen */
    REASON_DROP_SOURCE_RANGE,    /* source outside the service's source ranges */
    REASON_TX_ICMP_TOO_BIG,      /* answered with frag-needed / packet-too-big */
    REASON_TX_REJECT,            /* no usable backend: answered with TCP RST / ICMP port unreachable */
    REASON_TX_ECHO,              /* echo request to a VIP: answered */
    REASON_FWD_ICMP_ERROR,       /* ICMP error about a VIP flow: encapsulated to the flow's backend */
    REASON_TX,                   /* encapsulated, XDP_TX */
    REASON_REDIRECT,             /* encapsulated, XDP_REDIRECT to another NIC */
    REASON_MAX,
};

BPF_TABLE_PINNED("hash", struct svc_key, struct svc_info, services, MAX_SERVICES, PIN_DIR "/services");
/* Maglev: inner arrays of MAGLEV_M backend ids, used as buffers (rings.py).
 * User space fills a buffer no service uses, then rewrites the service entry's
 * `ring`: a packet reads either the whole old table or the whole new one, and
 * no outer-map write (for which the kernel waits an RCU grace period) is
 * needed on a change. Up to two buffers per service. */
BPF_F_TABLE("array", int, __u32, maglev_inner, MAGLEV_M, BPF_F_MMAPABLE); /* filled through mmap: a memcpy */
BPF_TABLE_PINNED("array_of_maps$maglev_inner", int, int, maglev_outer, 2 * MAX_SERVICES, PIN_DIR "/maglev_outer");
BPF_TABLE_PINNED("array", __u32, struct backend_info, backends, MAX_BACKENDS, PIN_DIR "/backends");
BPF_TABLE_PINNED("array", __u32, struct nh_info, nexthops, MAX_BACKENDS, PIN_DIR "/nexthops");
BPF_TABLE_PINNED("array", __u32, struct flow_bucket, flows, FLOW_BUCKETS, PIN_DIR "/flows");
BPF_TABLE_PINNED("array", __u32, struct lb_config, config, 1, PIN_DIR "/config");
BPF_TABLE_PINNED("hash", __u32, struct if_info, ifaces, MAX_IFACES, PIN_DIR "/ifaces");
/* Not pinned: rebuilt from the configured interfaces before every attach. */
BPF_DEVMAP(tx_ports, MAX_IFACES);
/* Not pinned: filled by the loader with the program's own tail-call targets. */
BPF_PROG_ARRAY(slow_paths, SLOW_MAX);
BPF_PERCPU_ARRAY(slow_args, struct slow_args, 1);
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, svc_stats, MAX_SERVICES, PIN_DIR "/svc_stats");
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, backend_stats, MAX_BACKENDS, PIN_DIR "/backend_stats");
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, reason_stats, REASON_MAX, PIN_DIR "/reason_stats");
BPF_TABLE_PINNED("percpu_array", __u32, struct icmp_bucket, icmp_buckets, REPLY_KINDS, PIN_DIR "/icmp_buckets");
BPF_TABLE_PINNED("hash", struct vip_key, struct vip_info, vips, MAX_SERVICES, PIN_DIR "/vips");
/* Pinned: a daemon that adopts the program (no compile) must bump it. The
 * caches themselves are not: a new program starts with empty ones. */
BPF_TABLE_PINNED("array", __u32, __u64, cache_epoch, 1, PIN_DIR "/cache_epoch");
BPF_PERCPU_ARRAY(svc_cache, struct svc_cache_entry, SVC_CACHE_SLOTS);
BPF_PERCPU_ARRAY(if_cache, struct if_cache_entry, IF_CACHE_SLOTS);
/* LRU: a flood of first fragments evicts the oldest datagrams, never fails. */
/* Allocated per entry (an LPM trie must be BPF_F_NO_PREALLOC): sized for the
 * whole box, costing only what is used. */
BPF_TABLE_PINNED("lpm_trie", struct src_range_key, __u32, src_ranges, MAX_SOURCE_RANGES, PIN_DIR "/src_ranges",
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct frag_key, struct frag_ports, frags, FRAG_TABLE_SIZE, PIN_DIR "/frags");
