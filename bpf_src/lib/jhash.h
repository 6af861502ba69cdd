/* Bob Jenkins' lookup3 hash (the kernel's jhash2), written out because the
 * kernel's linux/jhash.h pulls in kernel-internal headers. l4lb/flowhash.py
 * implements the same function so tests can predict the datapath's choice. */
#pragma once
#include "lib/common.h"

#define L4LB_ROL32(x, k) (((x) << (k)) | ((x) >> (32 - (k))))
#define JHASH_INITVAL 0xdeadbeef

#define JHASH_MIX(a, b, c)                          \
    do {                                            \
        a -= c; a ^= L4LB_ROL32(c, 4);  c += b;     \
        b -= a; b ^= L4LB_ROL32(a, 6);  a += c;     \
        c -= b; c ^= L4LB_ROL32(b, 8);  b += a;     \
        a -= c; a ^= L4LB_ROL32(c, 16); c += b;     \
        b -= a; b ^= L4LB_ROL32(a, 19); a += c;     \
        c -= b; c ^= L4LB_ROL32(b, 4);  b += a;     \
    } while (0)

#define JHASH_FINAL(a, b, c)                        \
    do {                                            \
        c ^= b; c -= L4LB_ROL32(b, 14);             \
        a ^= c; a -= L4LB_ROL32(c, 11);             \
        b ^= a; b -= L4LB_ROL32(a, 25);             \
        c ^= b; c -= L4LB_ROL32(b, 16);             \
        a ^= c; a -= L4LB_ROL32(c, 4);              \
        b ^= a; b -= L4LB_ROL32(a, 14);             \
        c ^= b; c -= L4LB_ROL32(b, 24);             \
    } while (0)

/* jhash2 over exactly six 32-bit words: client address (4), ports, protocol. */
L4LB_INLINE __u32 jhash_6words(const __u32 *k, __u32 initval)
{
    __u32 a, b, c;
    a = b = c = JHASH_INITVAL + (6 << 2) + initval;
    a += k[0]; b += k[1]; c += k[2];
    JHASH_MIX(a, b, c);
    a += k[3]; b += k[4]; c += k[5];
    JHASH_FINAL(a, b, c);
    return c;
}
