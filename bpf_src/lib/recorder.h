/* The n-tuple PCAP recorder: observation points, filter matching, perf output.
 *
 * Always compiled in (a recording is armed by map writes alone: no compile, no
 * program swap). -DNO_RECORDER leaves every hook empty: only the bench builds
 * it, to show what the idle recorder costs. The hooks:
 *
 *  RECORD_IN(ctx, p, svc_id)       inbound, after the service lookup, before
 *                                  the LB touches the packet; declares the
 *                                  local `rec_` (the match) that RECORD_OUT
 *                                  reuses; a function that records outbound
 *                                  packets takes it as REC_PARAM, its caller
 *                                  passes REC_ARG (both empty without the recorder)
 *  RECORD_OUT(ctx, verdict, be_id, ifindex) outbound: the encapsulated packet,
 *                                  leaving by `ifindex` (the ingress NIC for
 *                                  XDP_TX and XDP_PASS, the target of XDP_REDIRECT)
 *  RECORD_OUT_REPLY(ctx, p, verdict, kind) outbound: a reply the LB
 *                                  generated (enum l4lb_reply: too-big, reject,
 *                                  echo), matched again on the original tuple
 *                                  `p`; flags = REC_F_REPLY + kind; it leaves
 *                                  by the ingress NIC (XDP_TX)
 *
 * Matching. A mask (prefix lengths and wildcard fields) is data: rec_masks
 * holds 64 slots, IPv4 masks in 0-31, IPv6 masks in 32-63. A slot is a
 * struct rec_key used as a template: its header (family, lengths, wild) is
 * the key's, its address, port and protocol fields are the bits to keep, so
 * the masked key is one AND per word, no branch (family 0: a free slot).
 * Mask slot i owns bit i of a u64. rec_filters holds every
 * filter under its masked key (struct rec_key, the layout of
 * recfilter.KEY_STRUCT; the mask is part of the key, so probing a packet with
 * any mask only ever finds filters the packet matches); its value is the
 * bitmap of recordings (slots 0-63) owning that filter. A packet goes to the
 * union of the recordings of every filter it matches, so recordings never
 * steal packets from each other.
 *
 * Early reject. rec_bits holds, per value of each tuple field, the bitmap of
 * mask slots that have at least one filter admitting that value; rec_wild,
 * per field, the slots with a filter admitting every value (a wildcard field,
 * a short prefix: one word, not 65536 bitmap entries to write when a filter
 * is armed). The packet's candidate masks are the AND over its fields of
 * (bits of its value | wild); 0 (the usual case for traffic nobody records,
 * and always when no recording runs) ends the work after two to six array
 * look-ups. Only
 * surviving masks cost a bounded loop step: their rec_masks slot and a hash
 * look-up. Addresses are bucketed: IPv4 by the top 16 bits, IPv6 by a fold of
 * the top 32 bits (l4lb/datapath/recorder.py computes the same buckets).
 *
 * User space writes a new mask's slot before the filters and bits that lead
 * to it, and clears bits before the filters they led to; a freed slot is
 * written again only after an RCU grace period (no packet still reads the old
 * template, so a slot is never seen half old, half new). These maps
 * are pinned with the program (loader.py pin_program), so a restarted daemon
 * adopts them; it clears what a dead daemon left in them before arming.
 */
#pragma once
#include "lib/maps.h"
#include "lib/parse.h"

#ifdef NO_RECORDER
#define REC_PARAM
#define REC_ARG
#define RECORD_IN(ctx, p, svc_id) do { } while (0)
#define RECORD_OUT(ctx, verdict, be_id, ifindex) do { } while (0)
#define RECORD_OUT_REPLY(ctx, p, verdict, kind) do { } while (0)
#else

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
#define REC_MASK_SLOTS 64  /* IPv4 0-31, IPv6 32-63 */

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
    __u8 pad;
    __u32 ifindex;      /* the NIC the packet came in by (inbound) or leaves by (outbound) */
};

/* Per field, in the order of the REC_BM_* tables: slots admitting every value;
 * then the slots in use (0: nothing armed, the one look-up idle traffic pays). */
struct rec_wild {
    __u64 src4;
    __u64 dst4;
    __u64 src6;
    __u64 dst6;
    __u64 dport;
    __u64 sport;
    __u64 proto;
    __u64 used;
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
BPF_ARRAY(rec_masks, struct rec_key, REC_MASK_SLOTS);
BPF_ARRAY(rec_wild, struct rec_wild, 1);   /* key templates: see above */
BPF_PERCPU_ARRAY(rec_lost_cnt, struct rec_lost, 1);
BPF_PERF_OUTPUT(rec_events);

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
    __u32 zero = 0;
    struct rec_wild *w = rec_wild.lookup(&zero);
    if (!w || !w->used)
        return 0;
    __u64 c;
    if (p->family == FAMILY_V4) {
        c = rec_bits_at(REC_BM_SRC4 + (bpf_ntohl(p->src[0]) >> 16)) | w->src4;
        if (!c)
            return 0;
        c &= rec_bits_at(REC_BM_DST4 + (bpf_ntohl(p->dst[0]) >> 16)) | w->dst4;
    } else {
        c = rec_bits_at(REC_BM_SRC6 + rec_bucket6(p->src[0])) | w->src6;
        if (!c)
            return 0;
        c &= rec_bits_at(REC_BM_DST6 + rec_bucket6(p->dst[0])) | w->dst6;
    }
    if (!c)
        return 0;
    c &= rec_bits_at(REC_BM_DPORT + bpf_ntohs(p->dport)) | w->dport;
    if (!c)
        return 0;
    c &= rec_bits_at(REC_BM_SPORT + bpf_ntohs(p->sport)) | w->sport;
    if (!c)
        return 0;
    return c & (rec_bits_at(REC_BM_PROTO + p->proto) | w->proto);
}

/* Probe the filters with the mask in slot `slot`. */
L4LB_INLINE void rec_probe_slot(struct pkt *p, __u32 slot, struct rec_hit *h)
{
    struct rec_key *m = rec_masks.lookup(&slot);
    if (!m)
        return;
    struct rec_key k = {};
    k.family = m->family;   /* 0 (a free slot) is no filter's family: no hit */
    k.src_len = m->src_len;
    k.dst_len = m->dst_len;
    k.wild = m->wild;
#pragma unroll
    for (int w = 0; w < 4; w++) {
        k.src[w] = p->src[w] & m->src[w];
        k.dst[w] = p->dst[w] & m->dst[w];
    }
    k.sport = p->sport & m->sport;
    k.dport = p->dport & m->dport;
    k.proto = p->proto & m->proto;
    rec_probe(&k, h);
}

/* Fills h with the recordings (and capture length) p belongs to. */
L4LB_INLINE void rec_match(struct pkt *p, struct rec_hit *h)
{
    __u64 cand = rec_candidates(p);
    if (!cand)
        return;
    __u32 base = p->family == FAMILY_V4 ? 0 : 32;
    __u32 bits = (__u32)(cand >> base);   /* the family's 32 slots */
    /* Bounded: at most 32 steps, ends with the highest candidate (user space
     * fills the lowest free slots first). */
    for (__u32 i = 0; i < 32 && bits; i++, bits >>= 1) {
        if (bits & 1)
            rec_probe_slot(p, base + i, h);
    }
}

L4LB_INLINE void rec_emit(struct xdp_md *ctx, struct rec_hit *h, __u8 dir, __u8 verdict, __u32 be_id, __u8 flags,
                          __u32 ifindex)
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
    s.ifindex = ifindex;
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
        rec_emit((ctx), rec_, REC_DIR_IN, REC_VERDICT_NONE, 0, 0, (ctx)->ingress_ifindex); \
    }

#define RECORD_OUT(ctx, verdict, be_id, ifindex)                          \
    do {                                                                  \
        if (rec_->recs)                                                   \
            rec_emit((ctx), rec_, REC_DIR_OUT, (verdict), (be_id), 0, (ifindex)); \
    } while (0)

#define RECORD_OUT_REPLY(ctx, p, verdict, kind)                           \
    do {                                                                  \
        struct rec_hit h_ = {};                                           \
        rec_match((p), &h_);                                              \
        if (h_.recs)                                                      \
            rec_emit((ctx), &h_, REC_DIR_OUT, (verdict), 0, REC_F_REPLY + (kind), \
                     (ctx)->ingress_ifindex);                                    \
    } while (0)

#endif /* NO_RECORDER */
