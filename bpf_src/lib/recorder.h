/* The n-tuple PCAP recorder: observation points, filter matching, perf output.
 *
 * Without -DRECORDER every hook is empty (the daemon compiles it in only
 * while recordings exist). With it:
 *
 *  RECORD_IN(ctx, p, svc_id)       inbound, after the service lookup, before
 *                                  the LB touches the packet; declares the
 *                                  local `rec_` (the match) that RECORD_OUT
 *                                  reuses; a function that records outbound
 *                                  packets takes it as REC_PARAM, its caller
 *                                  passes REC_ARG (both empty without RECORDER)
 *  RECORD_OUT(ctx, verdict, be_id) outbound: the encapsulated packet
 *  RECORD_OUT_REPLY(ctx, p, verdict, kind) outbound: a reply the LB
 *                                  generated (enum l4lb_reply: too-big, reject,
 *                                  echo), matched again on the original tuple
 *                                  `p`; flags = REC_F_REPLY + kind
 *
 * Matching. Masks are compiled in by user space (l4lb.recfilter
 * render_mask_cflags: REC_MASKS_V4(X)/REC_MASKS_V6(X), at most 32 each). Mask
 * number i of IPv4 owns bit i of a u64, mask i of IPv6 bit 32+i. rec_filters
 * holds every filter under its masked key (struct rec_key, the layout of
 * recfilter.KEY_STRUCT); its value is the bitmap of recordings (slots 0-63)
 * owning that filter. A packet goes to the union of the recordings of every
 * filter it matches, so recordings never steal packets from each other.
 *
 * Early reject. rec_bits holds, per value of each tuple field, the bitmap of
 * masks that have at least one filter admitting that value (a wildcard field
 * admits every value). The packet's candidate masks are the AND over its
 * fields; 0 (the usual case for traffic nobody records, and always when no
 * recording runs) ends the work after one to five array look-ups, which the
 * verifier inlines. Only surviving masks cost a hash look-up. Addresses are
 * bucketed: IPv4 by the top 16 bits, IPv6 by a fold of the top 32 bits
 * (l4lb/datapath/recorder.py computes the same buckets).
 *
 * Nothing here is pinned: the daemon refills these maps after every (re)load,
 * and a new mask set is a new program swapped in atomically.
 */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"

#ifndef RECORDER
#define REC_PARAM
#define REC_ARG
#define RECORD_IN(ctx, p, svc_id) do { } while (0)
#define RECORD_OUT(ctx, verdict, be_id) do { } while (0)
#define RECORD_OUT_REPLY(ctx, p, verdict, kind) do { } while (0)
#else

#ifndef REC_MASKS_V4
#define REC_MASKS_V4(X)
#endif
#ifndef REC_MASKS_V6
#define REC_MASKS_V6(X)
#endif
#ifndef REC_MAX_FILTERS
#define REC_MAX_FILTERS 65536
#endif
/* Largest packet prefix copied into the ring (a perf record is < 64 KiB). */
#define REC_MAX_CAP 16384
#define REC_CAP_WHOLE 0xffff

#define REC_DIR_IN 1
#define REC_DIR_OUT 2
#define REC_F_REPLY 1      /* + enum l4lb_reply: a generated too-big (1), reject (2), echo reply (3) */
#define REC_VERDICT_NONE 0xff  /* inbound: the verdict is not known yet */

/* rec_bits layout: one u64 per value of each field. */
#define REC_BM_SRC4 0
#define REC_BM_DST4 (REC_BM_SRC4 + 65536)
#define REC_BM_SRC6 (REC_BM_DST4 + 65536)
#define REC_BM_DST6 (REC_BM_SRC6 + 65536)
#define REC_BM_DPORT (REC_BM_DST6 + 65536)
#define REC_BM_SPORT (REC_BM_DPORT + 65536)
#define REC_BM_PROTO (REC_BM_SPORT + 65536)
#define REC_BM_SIZE (REC_BM_PROTO + 256)

struct rec_key {
    __u8 family;
    __u8 src_len;
    __u8 dst_len;
    __u8 wild;          /* bit 0 sport, 1 dport, 2 proto are wildcards */
    __u32 src[4];       /* network order, masked */
    __u32 dst[4];
    __u16 sport;        /* network order, 0 if wildcard */
    __u16 dport;
    __u8 proto;
    __u8 pad[3];
};

struct rec_value {
    __u64 recordings;   /* bitmap of recording slots */
    __u32 caplen;       /* largest capture length of those recordings (REC_CAP_WHOLE = all) */
    __u32 pad;
};

/* Header of every perf sample; the first cap_len packet bytes follow. */
struct rec_sample {
    __u64 recordings;
    __u64 ts_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u32 cap_len;
    __u32 orig_len;
    __u32 svc_id;
    __u32 be_id;        /* outbound: chosen backend slot (0 = none) */
    __u8 direction;     /* REC_DIR_* */
    __u8 verdict;       /* XDP action */
    __u8 flags;         /* REC_F_* */
    __u8 pad[5];
};

/* Samples the ring refused, per recording slot (per CPU). */
struct rec_lost {
    __u64 lost[64];
};

struct rec_hit {
    __u64 recs;
    __u32 cap;
    __u32 svc_id;
};

BPF_HASH(rec_filters, struct rec_key, struct rec_value, REC_MAX_FILTERS);
BPF_ARRAY(rec_bits, __u64, REC_BM_SIZE);
BPF_PERCPU_ARRAY(rec_lost_cnt, struct rec_lost, 1);
BPF_PERF_OUTPUT(rec_events);

/* Top x bits of a 32-bit word set, x clamped to 0..32 (no over-wide shift). */
#define REC_CLAMP(x) ((x) < 0 ? 0 : (x) > 32 ? 32 : (x))
#define REC_TOP(x) ((__u32)(0xFFFFFFFF00000000ULL >> REC_CLAMP(x)))
#define REC_WILD(sw, dw, pw) ((sw) | ((dw) << 1) | ((pw) << 2))

L4LB_INLINE __u64 rec_bits_at(__u32 idx)
{
    __u64 *v = rec_bits.lookup(&idx);
    return v ? *v : 0;
}

L4LB_INLINE void rec_probe(struct rec_key *k, struct rec_hit *h)
{
    struct rec_value *v = rec_filters.lookup(k);
    if (v) {
        h->recs |= v->recordings;
        if (v->caplen > h->cap)
            h->cap = v->caplen;
    }
}

L4LB_INLINE __u32 rec_bucket6(__u32 w0)
{
    __u32 top = bpf_ntohl(w0);
    return (top >> 16) ^ (top & 0xffff);
}

/* Candidate masks of the packet: the cheap early reject. */
L4LB_INLINE __u64 rec_candidates(struct pkt *p)
{
    __u64 c;
    if (p->family == FAMILY_V4) {
        c = rec_bits_at(REC_BM_SRC4 + (bpf_ntohl(p->src[0]) >> 16));
        if (!c)
            return 0;
        c &= rec_bits_at(REC_BM_DST4 + (bpf_ntohl(p->dst[0]) >> 16));
    } else {
        c = rec_bits_at(REC_BM_SRC6 + rec_bucket6(p->src[0]));
        if (!c)
            return 0;
        c &= rec_bits_at(REC_BM_DST6 + rec_bucket6(p->dst[0]));
    }
    if (!c)
        return 0;
    c &= rec_bits_at(REC_BM_DPORT + bpf_ntohs(p->dport));
    if (!c)
        return 0;
    c &= rec_bits_at(REC_BM_SPORT + bpf_ntohs(p->sport));
    if (!c)
        return 0;
    return c & rec_bits_at(REC_BM_PROTO + p->proto);
}

#define REC_KEY_COMMON(fam, sl, dl, sw, dw, pw)      \
    struct rec_key k = {};                           \
    k.family = (fam);                                \
    k.src_len = (sl);                                \
    k.dst_len = (dl);                                \
    k.wild = REC_WILD(sw, dw, pw);                   \
    k.sport = (sw) ? 0 : p->sport;                   \
    k.dport = (dw) ? 0 : p->dport;                   \
    k.proto = (pw) ? 0 : p->proto;

#define REC_STEP4(sl, dl, sw, dw, pw)                                   \
    if (cand & (1ULL << bit)) {                                         \
        REC_KEY_COMMON(4, sl, dl, sw, dw, pw)                           \
        k.src[0] = p->src[0] & bpf_htonl(REC_TOP(sl));                  \
        k.dst[0] = p->dst[0] & bpf_htonl(REC_TOP(dl));                  \
        rec_probe(&k, h);                                               \
    }                                                                   \
    bit++;

#define REC_STEP6(sl, dl, sw, dw, pw)                                   \
    if (cand & (1ULL << bit)) {                                         \
        REC_KEY_COMMON(6, sl, dl, sw, dw, pw)                           \
        k.src[0] = p->src[0] & bpf_htonl(REC_TOP((sl)));                \
        k.src[1] = p->src[1] & bpf_htonl(REC_TOP((sl) - 32));           \
        k.src[2] = p->src[2] & bpf_htonl(REC_TOP((sl) - 64));           \
        k.src[3] = p->src[3] & bpf_htonl(REC_TOP((sl) - 96));           \
        k.dst[0] = p->dst[0] & bpf_htonl(REC_TOP((dl)));                \
        k.dst[1] = p->dst[1] & bpf_htonl(REC_TOP((dl) - 32));           \
        k.dst[2] = p->dst[2] & bpf_htonl(REC_TOP((dl) - 64));           \
        k.dst[3] = p->dst[3] & bpf_htonl(REC_TOP((dl) - 96));           \
        rec_probe(&k, h);                                               \
    }                                                                   \
    bit++;

/* Fills h with the recordings (and capture length) p belongs to. */
L4LB_INLINE void rec_match(struct pkt *p, struct rec_hit *h)
{
    __u64 cand = rec_candidates(p);
    if (!cand)
        return;
    __u32 bit;
    if (p->family == FAMILY_V4) {
        bit = 0;
        REC_MASKS_V4(REC_STEP4)
    } else {
        bit = 32;
        REC_MASKS_V6(REC_STEP6)
    }
}

L4LB_INLINE void rec_emit(struct xdp_md *ctx, struct rec_hit *h, __u8 dir, __u8 verdict, __u32 be_id, __u8 flags)
{
    __u64 len = ctx->data_end - ctx->data;
    __u64 cap = h->cap;
    if (cap > len)
        cap = len;
    if (cap > REC_MAX_CAP)
        cap = REC_MAX_CAP;
    struct rec_sample s = {};
    s.recordings = h->recs;
    s.ts_ns = bpf_ktime_get_ns();
    s.cap_len = cap;
    s.orig_len = len;
    s.svc_id = h->svc_id;
    s.be_id = be_id;
    s.direction = dir;
    s.verdict = verdict;
    s.flags = flags;
    /* BCC rewrites this call into a statement: keep it one. */
    int rc = rec_events.perf_submit_skb(ctx, cap, &s, sizeof(s));
    if (rc == 0)
        return;
    /* Ring full: charge the loss to every recording that wanted the sample. */
    __u32 zero = 0;
    struct rec_lost *l = rec_lost_cnt.lookup(&zero);
    if (!l)
        return;
#pragma unroll
    for (int i = 0; i < 64; i++) {
        if (h->recs & (1ULL << i))
            l->lost[i]++;
    }
}

#define REC_PARAM , struct rec_hit *rec_
#define REC_ARG , rec_

#define RECORD_IN(ctx, p, svc)                                    \
    struct rec_hit rec_hit_ = {};                                 \
    struct rec_hit *rec_ = &rec_hit_;                             \
    rec_match((p), rec_);                                         \
    if (rec_->recs) {                                             \
        rec_->svc_id = (svc);                                     \
        rec_emit((ctx), rec_, REC_DIR_IN, REC_VERDICT_NONE, 0, 0); \
    }

#define RECORD_OUT(ctx, verdict, be_id)                                   \
    do {                                                                  \
        if (rec_->recs)                                                   \
            rec_emit((ctx), rec_, REC_DIR_OUT, (verdict), (be_id), 0);    \
    } while (0)

#define RECORD_OUT_REPLY(ctx, p, verdict, kind)                           \
    do {                                                                  \
        struct rec_hit h_ = {};                                           \
        rec_match((p), &h_);                                              \
        if (h_.recs)                                                      \
            rec_emit((ctx), &h_, REC_DIR_OUT, (verdict), 0, REC_F_REPLY + (kind)); \
    } while (0)

#endif /* RECORDER */
