/*
 * crc32c.c: CRC-32C (Castagnoli), the checksum of the log format.
 *
 * Two implementations give the same values.  The portable one uses eight
 * tables of 256 entries ("slicing by 8"): each step folds eight input
 * bytes into the running value with eight table lookups.  On x86-64
 * processors with SSE4.2 the crc32 instruction does the same work in
 * hardware, eight bytes at a time; it is chosen once, at the first call,
 * by asking the processor.  The instruction's result comes three cycles
 * after its input, but a new one can start every cycle, so long inputs
 * are cut into three streams that run side by side and are joined after.
 *
 * Joining rests on the register being linear in its start value and the
 * data: the register after a start value r and data D is the register
 * after r and as many zero bytes as D has, XOR the register after 0 and
 * D.  The first part is a fixed linear map of r for a given length, kept
 * in four tables of 256 entries, one per byte of r.
 *
 * Both keep the register inverted between calls the way the usual
 * definition does (start from all ones, invert at the end), so a value
 * returned for one buffer continues correctly over the next.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "cow_merge.h"
#include "merge_internal.h"

/* The CRC-32C polynomial, bit-reversed, as the reflected CRC uses it. */
#define COW__CRC32C_POLY 0x82f63b78u

/*
 * cow__crc_table[k][b] is the CRC of byte b followed by k zero bytes:
 * what byte b contributes when it sits k bytes before the end of an
 * eight-byte step.
 */
static uint32_t cow__crc_table[8][256];

/* Bytes of each of the three streams. */
#define COW__CRC_STREAM 1024

/*
 * cow__crc_skip[k][b] is the register that b << 8k becomes after
 * COW__CRC_STREAM zero bytes.
 */
static uint32_t cow__crc_skip[4][256];

static bool cow__crc_hw;

static pthread_once_t cow__crc_once = PTHREAD_ONCE_INIT;

static void cow__crc_init(void)
{
    uint32_t b, c;
    int k;

    for (b = 0; b < 256; b++) {
        c = b;
        for (k = 0; k < 8; k++)
            c = (c >> 1) ^ (COW__CRC32C_POLY & (0u - (c & 1)));
        cow__crc_table[0][b] = c;
    }
    for (b = 0; b < 256; b++) {
        c = cow__crc_table[0][b];
        for (k = 1; k < 8; k++) {
            c = (c >> 8) ^ cow__crc_table[0][c & 0xff];
            cow__crc_table[k][b] = c;
        }
    }

    /* Each bit of the register, through the zeros; then every byte. */
    for (k = 0; k < 32; k++) {
        uint32_t bit = 1u << k, i;

        c = bit;
        for (i = 0; i < COW__CRC_STREAM; i++)
            c = (c >> 8) ^ cow__crc_table[0][c & 0xff];
        for (b = 0; b < 256; b++)
            if (b & 1u << (k % 8))
                cow__crc_skip[k / 8][b] ^= c;
    }

#if defined(__x86_64__)
    __builtin_cpu_init();
    cow__crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

/* The register c after COW__CRC_STREAM zero bytes. */
static uint32_t cow__crc_skip_stream(uint32_t c)
{
    return cow__crc_skip[0][c & 0xff] ^ cow__crc_skip[1][(c >> 8) & 0xff] ^
           cow__crc_skip[2][(c >> 16) & 0xff] ^ cow__crc_skip[3][c >> 24];
}

static uint32_t cow__crc_tables(uint32_t c, const unsigned char *p, size_t n)
{
    while (n >= 8) {
        uint64_t w = cow__le64(p) ^ c;

        c = cow__crc_table[7][w & 0xff] ^
            cow__crc_table[6][(w >> 8) & 0xff] ^
            cow__crc_table[5][(w >> 16) & 0xff] ^
            cow__crc_table[4][(w >> 24) & 0xff] ^
            cow__crc_table[3][(w >> 32) & 0xff] ^
            cow__crc_table[2][(w >> 40) & 0xff] ^
            cow__crc_table[1][(w >> 48) & 0xff] ^
            cow__crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n-- > 0)
        c = (c >> 8) ^ cow__crc_table[0][(c ^ *p++) & 0xff];

    return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t cow__crc_sse42(uint32_t c, const unsigned char *p, size_t n)
{
    uint64_t c64;

    /* Single bytes until p is aligned, so the wide loads are too. */
    while (n > 0 && ((uintptr_t)p & 7) != 0) {
        c = __builtin_ia32_crc32qi(c, *p++);
        n--;
    }
    while (n >= 3 * COW__CRC_STREAM) {
        uint64_t a = c, b = 0, d = 0;
        size_t i;

        for (i = 0; i < COW__CRC_STREAM; i += 8) {
            uint64_t wa, wb, wd;

            memcpy(&wa, p + i, 8);
            memcpy(&wb, p + COW__CRC_STREAM + i, 8);
            memcpy(&wd, p + 2 * COW__CRC_STREAM + i, 8);
            a = __builtin_ia32_crc32di(a, wa);
            b = __builtin_ia32_crc32di(b, wb);
            d = __builtin_ia32_crc32di(d, wd);
        }
        c = cow__crc_skip_stream(cow__crc_skip_stream((uint32_t)a) ^
                                 (uint32_t)b) ^
            (uint32_t)d;
        p += 3 * COW__CRC_STREAM;
        n -= 3 * COW__CRC_STREAM;
    }
    c64 = c;
    while (n >= 8) {
        uint64_t w;

        memcpy(&w, p, 8);
        c64 = __builtin_ia32_crc32di(c64, w);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n-- > 0)
        c = __builtin_ia32_crc32qi(c, *p++);

    return c;
}
#endif

COW__MERGE_EXPORT
uint32_t cow_merge_crc32c_portable(uint32_t crc, const void *data,
                                   size_t len)
{
    pthread_once(&cow__crc_once, cow__crc_init);

    return ~cow__crc_tables(~crc, data, len);
}

COW__MERGE_EXPORT
uint32_t cow_merge_crc32c(uint32_t crc, const void *data, size_t len)
{
    pthread_once(&cow__crc_once, cow__crc_init);
#if defined(__x86_64__)
    if (cow__crc_hw)
        return ~cow__crc_sse42(~crc, data, len);
#endif

    return ~cow__crc_tables(~crc, data, len);
}
