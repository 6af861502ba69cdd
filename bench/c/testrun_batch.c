/* Method B of bench/datapath.py: many BPF_PROG_TEST_RUN calls (repeat 1) in a
 * C loop, so the caller's per-call cost is a few hundred ns of syscall instead
 * of ~1 us of Python ctypes (measured by the bench and printed). Built by
 * scripts/setup.sh as build/testrun_batch.so; loaded with ctypes by
 * l4lb/lab/testrun.py. No libbpf: the UAPI union bpf_attr is all it needs.
 *
 * The kernel times only its repeat loop (bpf_test_run() in
 * net/bpf/test_run.c): the syscall, the frame copy-in and the xdp_buff set-up
 * are outside the reported duration, whatever the caller costs. */
#include <errno.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct batch_result {
    uint64_t duration_ns;  /* sum of the kernel-reported durations */
    uint64_t wall_ns;      /* the whole loop, by CLOCK_MONOTONIC */
    uint64_t verdicts[8];  /* XDP verdict -> calls (XDP_ABORTED..XDP_REDIRECT) */
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Run prog_fd once on each of `calls` frames: frames[i % n], `size` bytes
 * each, laid out one after the other. Returns 0, or -errno of the first
 * failing call (the result then covers the calls before it). */
int run_frames(int prog_fd, const unsigned char *frames, uint32_t n, uint32_t size,
               uint32_t ingress_ifindex, uint64_t calls, struct batch_result *out)
{
    struct xdp_md ctx = { .data_end = size, .ingress_ifindex = ingress_ifindex };
    union bpf_attr attr;

    memset(out, 0, sizeof(*out));
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < calls; i++) {
        memset(&attr, 0, sizeof(attr));
        attr.test.prog_fd = prog_fd;
        attr.test.data_in = (uintptr_t)(frames + (i % n) * size);
        attr.test.data_size_in = size;
        attr.test.ctx_in = (uintptr_t)&ctx;
        attr.test.ctx_size_in = sizeof(ctx);
        attr.test.repeat = 1;
        if (syscall(__NR_bpf, BPF_PROG_TEST_RUN, &attr, sizeof(attr)) < 0) {
            out->wall_ns = now_ns() - t0;
            return -errno;
        }
        out->duration_ns += attr.test.duration;
        out->verdicts[attr.test.retval & 7]++;
    }
    out->wall_ns = now_ns() - t0;
    return 0;
}
