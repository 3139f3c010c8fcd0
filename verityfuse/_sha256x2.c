/*
 * SHA-256 of fs-verity blocks with the x86 SHA extensions, two blocks at a time.
 *
 * Included by _hashblocks.c (one translation unit, everything static).
 *
 * Every message hashed here but sha256ni_oneshot's (one short message, on one
 * stream) has the same shape: padded_salt || one B-byte block, B a multiple of
 * 64.  Three consequences shape the code:
 *  - the salted prefix is compressed once into a starting state;
 *  - the data ends on a 64-byte boundary, so the SHA padding is always one
 *    whole extra block holding only 0x80 and the bit length, which is the
 *    same for every block: its message schedule (W[t] + K[t] for all 64
 *    rounds) is computed once per call, not per block;
 *  - two blocks can be compressed side by side.  One SHA-256 compression is
 *    a single long dependency chain of SHA256RNDS2 instructions (latency ~4
 *    cycles on Zen, while the unit accepts a new one every ~2 cycles), so one
 *    stream leaves the unit half idle.  Interleaving two independent streams
 *    in the same instruction window fills it: the "2-way" path.
 *
 * State layout.  SHA256RNDS2 keeps the eight working variables in two
 * registers, "ABEF" (lanes 3..0 = A, B, E, F) and "CDGH" (C, D, G, H); the
 * state is kept in that form from the initial value to the final addition
 * and converted to the usual A..H big-endian digest only when stored.
 *
 * Only the functions marked SHANI_TARGET use SHA/SSE4.1/SSSE3 instructions,
 * and they are called only after sha256ni_cpu_ok() said the CPU has them, so
 * the module still loads and works (through OpenSSL) on CPUs without them,
 * e.g. a QEMU TCG guest.
 */
#if defined(__x86_64__) || defined(__i386__)
#define HAVE_SHANI_CODE 1
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define SHANI_TARGET __attribute__((target("sha,sse4.1,ssse3")))

/* The SHA-256 round constants (FIPS 180-4 section 4.2.2). */
static const uint32_t sha256_k[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

/* FIPS 180-4 section 5.3.3: the initial hash value H(0), A..H. */
static const uint32_t sha256_iv[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

/* What a call needs: the state after the prefix (ABEF, CDGH lane order) and
 * W[t] + K[t] of the padding block, four rounds per 16-byte row. */
struct sha256ni {
    uint32_t abef[4] __attribute__((aligned(16)));
    uint32_t cdgh[4] __attribute__((aligned(16)));
    uint32_t padwk[64] __attribute__((aligned(16)));
};

/* CPUID: SHA = leaf 7 subleaf 0 EBX bit 29; SSSE3 = leaf 1 ECX bit 9;
 * SSE4.1 = leaf 1 ECX bit 19.  __get_cpuid* check the maximum leaf first. */
static int sha256ni_cpu_ok(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    if (!(c & (1u << 9)) || !(c & (1u << 19)))
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b & (1u << 29)) != 0;
}

/* Big-endian words <-> little-endian lanes: reverse the bytes of each dword. */
static inline SHANI_TARGET __m128i bswap32x4(__m128i x)
{
    const __m128i m = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    return _mm_shuffle_epi8(x, m);
}

static inline SHANI_TARGET __m128i load_words(const uint8_t *p)
{
    return bswap32x4(_mm_loadu_si128((const __m128i *)p));  /* p may be unaligned */
}

/* Four rounds.  SHA256RNDS2 does two rounds from (CDGH, ABEF, wk[1:0]) and
 * returns the new ABEF; the new CDGH is the old ABEF, so the two registers
 * simply swap roles between the two calls. */
static inline SHANI_TARGET void rounds4(__m128i *abef, __m128i *cdgh, __m128i wk)
{
    *cdgh = _mm_sha256rnds2_epu32(*cdgh, *abef, wk);
    *abef = _mm_sha256rnds2_epu32(*abef, *cdgh, _mm_shuffle_epi32(wk, 0x0e));
}

/* W[t..t+3] from W[t-16..t-13] (m0), W[t-12..] (m1), W[t-8..] (m2), W[t-4..t-1] (m3):
 * MSG1 adds sigma0(W[t-15]) to W[t-16], the alignr supplies W[t-7], MSG2 adds
 * sigma1(W[t-2]) (feeding its own first two results back for the last two). */
static inline SHANI_TARGET __m128i schedule(__m128i m0, __m128i m1, __m128i m2, __m128i m3)
{
    __m128i t = _mm_sha256msg1_epu32(m0, m1);
    t = _mm_add_epi32(t, _mm_alignr_epi8(m3, m2, 4));
    return _mm_sha256msg2_epu32(t, m3);
}

static inline SHANI_TARGET __m128i kvec(int g)
{
    return _mm_load_si128((const __m128i *)&sha256_k[4 * g]);
}

/* One 64-byte block into one state. */
static inline SHANI_TARGET void compress1(__m128i *abef, __m128i *cdgh, const uint8_t *p)
{
    __m128i a0 = *abef, c0 = *cdgh;
    __m128i m[4];
    for (int i = 0; i < 4; i++)
        m[i] = load_words(p + 16 * i);
#pragma GCC unroll 16
    for (int g = 0; g < 16; g++) {
        rounds4(abef, cdgh, _mm_add_epi32(m[g & 3], kvec(g)));
        if (g < 12)
            m[g & 3] = schedule(m[g & 3], m[(g + 1) & 3], m[(g + 2) & 3], m[(g + 3) & 3]);
    }
    *abef = _mm_add_epi32(*abef, a0);
    *cdgh = _mm_add_epi32(*cdgh, c0);
}

/* One 64-byte block into each of two states.  Written as one loop body so
 * the two dependency chains sit next to each other in the instruction stream
 * and the out-of-order core overlaps them. */
static inline SHANI_TARGET void compress2(__m128i *abef_x, __m128i *cdgh_x, const uint8_t *px,
                                          __m128i *abef_y, __m128i *cdgh_y, const uint8_t *py)
{
    __m128i ax = *abef_x, cx = *cdgh_x, ay = *abef_y, cy = *cdgh_y;
    __m128i mx[4], my[4];
    for (int i = 0; i < 4; i++) {
        mx[i] = load_words(px + 16 * i);
        my[i] = load_words(py + 16 * i);
    }
#pragma GCC unroll 16
    for (int g = 0; g < 16; g++) {
        __m128i k = kvec(g);
        rounds4(abef_x, cdgh_x, _mm_add_epi32(mx[g & 3], k));
        rounds4(abef_y, cdgh_y, _mm_add_epi32(my[g & 3], k));
        if (g < 12) {
            mx[g & 3] = schedule(mx[g & 3], mx[(g + 1) & 3], mx[(g + 2) & 3], mx[(g + 3) & 3]);
            my[g & 3] = schedule(my[g & 3], my[(g + 1) & 3], my[(g + 2) & 3], my[(g + 3) & 3]);
        }
    }
    *abef_x = _mm_add_epi32(*abef_x, ax);
    *cdgh_x = _mm_add_epi32(*cdgh_x, cx);
    *abef_y = _mm_add_epi32(*abef_y, ay);
    *cdgh_y = _mm_add_epi32(*cdgh_y, cy);
}

/* The padding block of two states: its W + K is precomputed and shared. */
static inline SHANI_TARGET void compress_pad2(__m128i *abef_x, __m128i *cdgh_x,
                                              __m128i *abef_y, __m128i *cdgh_y,
                                              const uint32_t *padwk)
{
    __m128i ax = *abef_x, cx = *cdgh_x, ay = *abef_y, cy = *cdgh_y;
#pragma GCC unroll 16
    for (int g = 0; g < 16; g++) {
        __m128i wk = _mm_load_si128((const __m128i *)&padwk[4 * g]);
        rounds4(abef_x, cdgh_x, wk);
        rounds4(abef_y, cdgh_y, wk);
    }
    *abef_x = _mm_add_epi32(*abef_x, ax);
    *cdgh_x = _mm_add_epi32(*cdgh_x, cx);
    *abef_y = _mm_add_epi32(*abef_y, ay);
    *cdgh_y = _mm_add_epi32(*cdgh_y, cy);
}

static inline SHANI_TARGET void compress_pad1(__m128i *abef, __m128i *cdgh, const uint32_t *padwk)
{
    __m128i a0 = *abef, c0 = *cdgh;
#pragma GCC unroll 16
    for (int g = 0; g < 16; g++)
        rounds4(abef, cdgh, _mm_load_si128((const __m128i *)&padwk[4 * g]));
    *abef = _mm_add_epi32(*abef, a0);
    *cdgh = _mm_add_epi32(*cdgh, c0);
}

/* ABEF/CDGH -> the 32-byte digest (A..H, each big-endian). */
static inline SHANI_TARGET void store_digest(__m128i abef, __m128i cdgh, uint8_t *out)
{
    __m128i t = _mm_shuffle_epi32(abef, 0x1b);      /* lanes 0..3 = A B E F */
    __m128i u = _mm_shuffle_epi32(cdgh, 0xb1);      /* G H C D */
    __m128i abcd = _mm_blend_epi16(t, u, 0xf0);     /* A B C D */
    __m128i efgh = _mm_alignr_epi8(u, t, 8);        /* E F G H */
    _mm_storeu_si128((__m128i *)out, bswap32x4(abcd));
    _mm_storeu_si128((__m128i *)(out + 16), bswap32x4(efgh));
}

static uint32_t ror32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

/* The IV (A..H in lanes 0..7) in ABEF / CDGH order. */
static inline SHANI_TARGET void iv_state(__m128i *abef, __m128i *cdgh)
{
    __m128i abcd = _mm_loadu_si128((const __m128i *)&sha256_iv[0]);
    __m128i efgh = _mm_loadu_si128((const __m128i *)&sha256_iv[4]);
    __m128i t = _mm_shuffle_epi32(abcd, 0xb1);      /* B A D C */
    __m128i u = _mm_shuffle_epi32(efgh, 0x1b);      /* H G F E */
    *abef = _mm_alignr_epi8(t, u, 8);               /* F E B A */
    *cdgh = _mm_blend_epi16(u, t, 0xf0);            /* H G D C */
}

/* SHA-256 of any one message (not a block's shape: a descriptor's 256 bytes, an index
 * key's handle), on one stream: its whole 64-byte blocks, then the rest with the
 * padding, one block or two when fewer than 9 bytes of the last are left.  Sealing
 * hashes two such messages a small file: OpenSSL's one-shot call cost ~0.7 us each. */
static SHANI_TARGET void sha256ni_oneshot(const uint8_t *msg, size_t len, uint8_t *out)
{
    __m128i abef, cdgh;
    iv_state(&abef, &cdgh);
    size_t whole = len & ~(size_t)63, rest = len - whole;
    for (size_t off = 0; off < whole; off += 64)
        compress1(&abef, &cdgh, msg + off);
    uint8_t tail[128];
    size_t tail_len = rest + 9 <= 64 ? 64 : 128;
    memset(tail, 0, sizeof(tail));
    memcpy(tail, msg + whole, rest);
    tail[rest] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        tail[tail_len - 1 - i] = (uint8_t)(bits >> (8 * i));
    compress1(&abef, &cdgh, tail);
    if (tail_len == 128)
        compress1(&abef, &cdgh, tail + 64);
    store_digest(abef, cdgh, out);
}

/* Prepare a call: compress the prefix (a multiple of 64 bytes) from the IV
 * and precompute the padding block's schedule for messages of
 * prefix_len + block_size bytes. */
static SHANI_TARGET void sha256ni_setup(struct sha256ni *s, const uint8_t *prefix, size_t prefix_len,
                                        size_t block_size)
{
    __m128i abef, cdgh;
    iv_state(&abef, &cdgh);
    for (size_t off = 0; off + 64 <= prefix_len; off += 64)
        compress1(&abef, &cdgh, prefix + off);
    _mm_store_si128((__m128i *)s->abef, abef);
    _mm_store_si128((__m128i *)s->cdgh, cdgh);

    /* Padding block: 0x80, zeros, then the message length in bits (64-bit BE). */
    uint64_t bits = ((uint64_t)prefix_len + (uint64_t)block_size) * 8;
    uint32_t w[64];
    memset(w, 0, sizeof(w));
    w[0] = 0x80000000u;
    w[14] = (uint32_t)(bits >> 32);
    w[15] = (uint32_t)bits;
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror32(w[i - 15], 7) ^ ror32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror32(w[i - 2], 17) ^ ror32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    for (int i = 0; i < 64; i++)
        s->padwk[i] = w[i] + sha256_k[i];
}

/* Hash n blocks of block_size bytes at data into n 32-byte digests at out:
 * pairs through the 2-way path, an odd last block alone. */
static SHANI_TARGET void sha256ni_blocks(const struct sha256ni *s, const uint8_t *data,
                                         size_t block_size, size_t n, uint8_t *out)
{
    const __m128i abef0 = _mm_load_si128((const __m128i *)s->abef);
    const __m128i cdgh0 = _mm_load_si128((const __m128i *)s->cdgh);
    size_t i = 0;
    for (; i + 2 <= n; i += 2) {
        const uint8_t *px = data + i * block_size, *py = px + block_size;
        __m128i ax = abef0, cx = cdgh0, ay = abef0, cy = cdgh0;
        for (size_t off = 0; off < block_size; off += 64)
            compress2(&ax, &cx, px + off, &ay, &cy, py + off);
        compress_pad2(&ax, &cx, &ay, &cy, s->padwk);
        store_digest(ax, cx, out + i * 32);
        store_digest(ay, cy, out + i * 32 + 32);
    }
    if (i < n) {
        const uint8_t *p = data + i * block_size;
        __m128i a = abef0, c = cdgh0;
        for (size_t off = 0; off < block_size; off += 64)
            compress1(&a, &c, p + off);
        compress_pad1(&a, &c, s->padwk);
        store_digest(a, c, out + i * 32);
    }
}

#endif /* x86 */
