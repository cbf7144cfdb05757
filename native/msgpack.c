/*
 * msgpack.c: the subset of msgpack that libcow's RPC frames use.
 *
 * The encoder appends to a growable buffer and always picks the shortest
 * form.  The decoder reads from a buffer it never trusts: every length is
 * checked against what is left before anything is touched, a value cut
 * short by the end of the buffer is reported as -EAGAIN (the caller reads
 * more bytes and tries again) and anything malformed as -EBADMSG.  Values
 * libcow has no use for (floats, exts, nested containers) can be skipped,
 * so a reply may carry keys this library does not know.
 */
#include <errno.h>
#include <string.h>

#include "cow_internal.h"

/* What a value's header says, before its payload is consumed. */
enum cow__mp_kind {
    COW__MP_NIL,
    COW__MP_BOOL,
    COW__MP_UINT,
    COW__MP_INT,
    COW__MP_FLOAT,
    COW__MP_STR,
    COW__MP_BIN,
    COW__MP_EXT,
    COW__MP_ARRAY,
    COW__MP_MAP,
};

struct cow__mp_item {
    enum cow__mp_kind kind;
    uint64_t u;           /* UINT value, BOOL value */
    int64_t i;            /* INT value (always negative) */
    uint32_t n;           /* STR/BIN/EXT payload length, ARRAY/MAP count */
    const unsigned char *payload;
    size_t size;          /* bytes to consume; header only for containers */
};

/* The smallest buffer: one page on most machines. */
#define COW__BUF_MIN 4096

int cow__buf_reserve(struct cow__buf *b, size_t more)
{
    size_t cap;
    void *p;

    if (b->err)
        return b->err;
    if (more <= b->cap - b->len)
        return 0;
    if (more > SIZE_MAX / 4 - b->len) {
        b->err = -ENOMEM;
        return b->err;
    }
    cap = b->cap ? b->cap : COW__BUF_MIN;
    while (cap - b->len < more)
        cap *= 2;
    if (b->data == NULL)
        p = cow__sys_mmap(NULL, cap, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    else
        p = cow__sys_mremap(b->data, b->cap, cap, MREMAP_MAYMOVE, NULL);
    if (p == MAP_FAILED) {
        b->err = -ENOMEM;
        return b->err;
    }
    b->data = p;
    b->cap = cap;

    return 0;
}

void cow__buf_put(struct cow__buf *b, const void *p, size_t n)
{
    if (cow__buf_reserve(b, n) != 0)
        return;
    if (n > 0)
        memcpy(b->data + b->len, p, n);
    b->len += n;
}

void cow__buf_free(struct cow__buf *b)
{
    if (b->data != NULL)
        cow__sys_munmap(b->data, b->cap);
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->err = 0;
}

/* Appends the type byte c and the low `width` bytes of v, big-endian. */
static void cow__mp_put_head(struct cow__buf *b, unsigned char c,
                             uint64_t v, int width)
{
    unsigned char out[9];
    int k;

    out[0] = c;
    for (k = 0; k < width; k++)
        out[1 + k] = (unsigned char)(v >> (8 * (width - 1 - k)));
    cow__buf_put(b, out, (size_t)(1 + width));
}

void cow__mp_put_nil(struct cow__buf *b)
{
    cow__mp_put_head(b, 0xc0, 0, 0);
}

void cow__mp_put_bool(struct cow__buf *b, bool v)
{
    cow__mp_put_head(b, v ? 0xc3 : 0xc2, 0, 0);
}

void cow__mp_put_uint(struct cow__buf *b, uint64_t v)
{
    if (v <= 0x7f)
        cow__mp_put_head(b, (unsigned char)v, 0, 0);
    else if (v <= UINT8_MAX)
        cow__mp_put_head(b, 0xcc, v, 1);
    else if (v <= UINT16_MAX)
        cow__mp_put_head(b, 0xcd, v, 2);
    else if (v <= UINT32_MAX)
        cow__mp_put_head(b, 0xce, v, 4);
    else
        cow__mp_put_head(b, 0xcf, v, 8);
}

void cow__mp_put_int(struct cow__buf *b, int64_t v)
{
    if (v >= 0)
        cow__mp_put_uint(b, (uint64_t)v);
    else if (v >= -32)
        cow__mp_put_head(b, (unsigned char)(0xe0 | (v & 0x1f)), 0, 0);
    else if (v >= INT8_MIN)
        cow__mp_put_head(b, 0xd0, (uint64_t)v, 1);
    else if (v >= INT16_MIN)
        cow__mp_put_head(b, 0xd1, (uint64_t)v, 2);
    else if (v >= INT32_MIN)
        cow__mp_put_head(b, 0xd2, (uint64_t)v, 4);
    else
        cow__mp_put_head(b, 0xd3, (uint64_t)v, 8);
}

/*
 * msgpack lengths are 32-bit; libcow never builds a string or bin that
 * long, so a longer one is an internal error, reported through b->err
 * rather than silently truncated.
 */
static bool cow__mp_fits(struct cow__buf *b, size_t n)
{
    if (n <= UINT32_MAX)
        return true;
    if (b->err == 0)
        b->err = -EMSGSIZE;

    return false;
}

void cow__mp_put_str(struct cow__buf *b, const char *s, size_t n)
{
    if (!cow__mp_fits(b, n))
        return;
    if (n <= 31)
        cow__mp_put_head(b, (unsigned char)(0xa0 | n), 0, 0);
    else if (n <= UINT8_MAX)
        cow__mp_put_head(b, 0xd9, n, 1);
    else if (n <= UINT16_MAX)
        cow__mp_put_head(b, 0xda, n, 2);
    else
        cow__mp_put_head(b, 0xdb, n, 4);
    cow__buf_put(b, s, n);
}

void cow__mp_put_cstr(struct cow__buf *b, const char *s)
{
    cow__mp_put_str(b, s, strlen(s));
}

void cow__mp_put_bin_header(struct cow__buf *b, size_t n)
{
    if (!cow__mp_fits(b, n))
        return;
    if (n <= UINT8_MAX)
        cow__mp_put_head(b, 0xc4, n, 1);
    else if (n <= UINT16_MAX)
        cow__mp_put_head(b, 0xc5, n, 2);
    else
        cow__mp_put_head(b, 0xc6, n, 4);
}

void cow__mp_put_bin(struct cow__buf *b, const void *p, size_t n)
{
    cow__mp_put_bin_header(b, n);
    if (b->err == 0)
        cow__buf_put(b, p, n);
}

void cow__mp_put_array(struct cow__buf *b, uint32_t n)
{
    if (n <= 15)
        cow__mp_put_head(b, (unsigned char)(0x90 | n), 0, 0);
    else if (n <= UINT16_MAX)
        cow__mp_put_head(b, 0xdc, n, 2);
    else
        cow__mp_put_head(b, 0xdd, n, 4);
}

void cow__mp_put_map(struct cow__buf *b, uint32_t n)
{
    if (n <= 15)
        cow__mp_put_head(b, (unsigned char)(0x80 | n), 0, 0);
    else if (n <= UINT16_MAX)
        cow__mp_put_head(b, 0xde, n, 2);
    else
        cow__mp_put_head(b, 0xdf, n, 4);
}

/*
 * Starts a msgpack-RPC request, [0, msgid, method, [params]], whose
 * params are one map of nkeys keys, for the caller to fill.
 */
void cow__mp_put_request(struct cow__buf *b, uint32_t msgid,
                         const char *method, uint32_t nkeys)
{
    cow__mp_put_array(b, 4);
    cow__mp_put_uint(b, 0);
    cow__mp_put_uint(b, msgid);
    cow__mp_put_cstr(b, method);
    cow__mp_put_array(b, 1);
    cow__mp_put_map(b, nkeys);
}

/* Reads a big-endian number of `width` bytes at p. */
static uint64_t cow__mp_be(const unsigned char *p, int width)
{
    uint64_t v = 0;
    int k;

    for (k = 0; k < width; k++)
        v = (v << 8) | p[k];

    return v;
}

/* Sign-extends the low `width` bytes of v. */
static int64_t cow__mp_signed(uint64_t v, int width)
{
    int shift = 64 - 8 * width;

    return (int64_t)(v << shift) >> shift;
}

/*
 * Fills it with the header of the next value: a fixed-size scalar
 * described by its type byte, then its `width`-byte argument.
 */
static int cow__mp_scalar(struct cow__mp_item *it, enum cow__mp_kind kind,
                          const unsigned char *p, size_t left, int width)
{
    if (left < (size_t)(1 + width))
        return -EAGAIN;
    it->kind = kind;
    it->u = cow__mp_be(p + 1, width);
    it->size = (size_t)(1 + width);

    return 0;
}

/*
 * Fills it with a value whose payload follows a `width`-byte length (or
 * has the fixed length `fixed` when width is 0); ext values carry one
 * extra type byte before the payload.
 */
static int cow__mp_sized(struct cow__mp_item *it, enum cow__mp_kind kind,
                         const unsigned char *p, size_t left, int width,
                         uint32_t fixed)
{
    size_t head = (size_t)(1 + width) + (kind == COW__MP_EXT ? 1 : 0);
    uint32_t n = fixed;

    if (left < head)
        return -EAGAIN;
    if (width > 0)
        n = (uint32_t)cow__mp_be(p + 1, width);
    if (left - head < n)
        return -EAGAIN;
    it->kind = kind;
    it->n = n;
    it->payload = p + head;
    it->size = head + n;

    return 0;
}

/* Fills it with an array or map header of `width`-byte count. */
static int cow__mp_container(struct cow__mp_item *it,
                             enum cow__mp_kind kind,
                             const unsigned char *p, size_t left, int width)
{
    if (left < (size_t)(1 + width))
        return -EAGAIN;
    it->kind = kind;
    it->n = (uint32_t)cow__mp_be(p + 1, width);
    it->size = (size_t)(1 + width);

    return 0;
}

/* Parses the header of the next value without consuming anything. */
static int cow__mp_head(const struct cow__mpr *r, struct cow__mp_item *it)
{
    const unsigned char *p = r->p + r->pos;
    size_t left = r->len - r->pos;
    unsigned char c;
    int rc;

    if (left == 0)
        return -EAGAIN;
    memset(it, 0, sizeof(*it));
    c = p[0];
    it->size = 1;
    if (c <= 0x7f) {
        it->kind = COW__MP_UINT;
        it->u = c;
        return 0;
    }
    if (c >= 0xe0) {
        it->kind = COW__MP_INT;
        it->i = (int8_t)c;
        return 0;
    }
    if (c <= 0x8f) {
        it->kind = COW__MP_MAP;
        it->n = c & 0x0f;
        return 0;
    }
    if (c <= 0x9f) {
        it->kind = COW__MP_ARRAY;
        it->n = c & 0x0f;
        return 0;
    }
    if (c <= 0xbf)
        return cow__mp_sized(it, COW__MP_STR, p, left, 0, c & 0x1f);

    switch (c) {
    case 0xc0:
        it->kind = COW__MP_NIL;
        return 0;
    case 0xc2:
    case 0xc3:
        it->kind = COW__MP_BOOL;
        it->u = c == 0xc3;
        return 0;
    case 0xc4:
        return cow__mp_sized(it, COW__MP_BIN, p, left, 1, 0);
    case 0xc5:
        return cow__mp_sized(it, COW__MP_BIN, p, left, 2, 0);
    case 0xc6:
        return cow__mp_sized(it, COW__MP_BIN, p, left, 4, 0);
    case 0xc7:
        return cow__mp_sized(it, COW__MP_EXT, p, left, 1, 0);
    case 0xc8:
        return cow__mp_sized(it, COW__MP_EXT, p, left, 2, 0);
    case 0xc9:
        return cow__mp_sized(it, COW__MP_EXT, p, left, 4, 0);
    case 0xca:
        return cow__mp_scalar(it, COW__MP_FLOAT, p, left, 4);
    case 0xcb:
        return cow__mp_scalar(it, COW__MP_FLOAT, p, left, 8);
    case 0xcc:
        return cow__mp_scalar(it, COW__MP_UINT, p, left, 1);
    case 0xcd:
        return cow__mp_scalar(it, COW__MP_UINT, p, left, 2);
    case 0xce:
        return cow__mp_scalar(it, COW__MP_UINT, p, left, 4);
    case 0xcf:
        return cow__mp_scalar(it, COW__MP_UINT, p, left, 8);
    case 0xd0:
    case 0xd1:
    case 0xd2:
    case 0xd3:
        rc = cow__mp_scalar(it, COW__MP_INT, p, left, 1 << (c - 0xd0));
        if (rc == 0) {
            it->i = cow__mp_signed(it->u, 1 << (c - 0xd0));
            if (it->i >= 0) {
                it->kind = COW__MP_UINT;
                it->u = (uint64_t)it->i;
            }
        }
        return rc;
    case 0xd4:
    case 0xd5:
    case 0xd6:
    case 0xd7:
    case 0xd8:
        return cow__mp_sized(it, COW__MP_EXT, p, left, 0,
                             1u << (c - 0xd4));
    case 0xd9:
        return cow__mp_sized(it, COW__MP_STR, p, left, 1, 0);
    case 0xda:
        return cow__mp_sized(it, COW__MP_STR, p, left, 2, 0);
    case 0xdb:
        return cow__mp_sized(it, COW__MP_STR, p, left, 4, 0);
    case 0xdc:
        return cow__mp_container(it, COW__MP_ARRAY, p, left, 2);
    case 0xdd:
        return cow__mp_container(it, COW__MP_ARRAY, p, left, 4);
    case 0xde:
        return cow__mp_container(it, COW__MP_MAP, p, left, 2);
    case 0xdf:
        return cow__mp_container(it, COW__MP_MAP, p, left, 4);
    default:
        /* 0xc1 is the one byte msgpack never uses. */
        return -EBADMSG;
    }
}

/* Parses the next value's header and requires it to be of `kind`. */
static int cow__mp_expect(const struct cow__mpr *r, struct cow__mp_item *it,
                          enum cow__mp_kind kind)
{
    int rc = cow__mp_head(r, it);

    if (rc != 0)
        return rc;
    if (it->kind != kind)
        return -EBADMSG;

    return 0;
}

int cow__mp_get_nil(struct cow__mpr *r)
{
    struct cow__mp_item it;
    int rc = cow__mp_expect(r, &it, COW__MP_NIL);

    if (rc == 0)
        r->pos += it.size;

    return rc;
}

bool cow__mp_next_is_nil(const struct cow__mpr *r)
{
    return r->pos < r->len && r->p[r->pos] == 0xc0;
}

int cow__mp_get_bool(struct cow__mpr *r, bool *v)
{
    struct cow__mp_item it;
    int rc = cow__mp_expect(r, &it, COW__MP_BOOL);

    if (rc != 0)
        return rc;
    *v = it.u != 0;
    r->pos += it.size;

    return 0;
}

int cow__mp_get_uint(struct cow__mpr *r, uint64_t *v)
{
    struct cow__mp_item it;
    int rc = cow__mp_expect(r, &it, COW__MP_UINT);

    if (rc != 0)
        return rc;
    *v = it.u;
    r->pos += it.size;

    return 0;
}

int cow__mp_get_int(struct cow__mpr *r, int64_t *v)
{
    struct cow__mp_item it;
    int rc = cow__mp_head(r, &it);

    if (rc != 0)
        return rc;
    if (it.kind == COW__MP_UINT && it.u <= INT64_MAX)
        *v = (int64_t)it.u;
    else if (it.kind == COW__MP_INT)
        *v = it.i;
    else
        return -EBADMSG;
    r->pos += it.size;

    return 0;
}

int cow__mp_get_str(struct cow__mpr *r, const char **s, uint32_t *n)
{
    struct cow__mp_item it;
    int rc = cow__mp_expect(r, &it, COW__MP_STR);

    if (rc != 0)
        return rc;
    *s = (const char *)it.payload;
    *n = it.n;
    r->pos += it.size;

    return 0;
}

int cow__mp_get_bin(struct cow__mpr *r, const void **p, uint32_t *n)
{
    struct cow__mp_item it;
    int rc = cow__mp_expect(r, &it, COW__MP_BIN);

    if (rc != 0)
        return rc;
    *p = it.payload;
    *n = it.n;
    r->pos += it.size;

    return 0;
}

int cow__mp_get_array(struct cow__mpr *r, uint32_t *n)
{
    struct cow__mp_item it;
    int rc = cow__mp_expect(r, &it, COW__MP_ARRAY);

    if (rc != 0)
        return rc;
    *n = it.n;
    r->pos += it.size;

    return 0;
}

int cow__mp_get_map(struct cow__mpr *r, uint32_t *n)
{
    struct cow__mp_item it;
    int rc = cow__mp_expect(r, &it, COW__MP_MAP);

    if (rc != 0)
        return rc;
    *n = it.n;
    r->pos += it.size;

    return 0;
}

/*
 * Skips one complete value, however deeply nested, without recursion: it
 * counts the values still owed by the containers opened so far.  Each
 * value consumes at least one byte, so the loop ends with the buffer.
 */
int cow__mp_skip(struct cow__mpr *r)
{
    struct cow__mpr probe = *r;
    struct cow__mp_item it;
    uint64_t owed = 1;
    int rc;

    while (owed > 0) {
        rc = cow__mp_head(&probe, &it);
        if (rc != 0)
            return rc;
        probe.pos += it.size;
        owed--;
        if (it.kind == COW__MP_ARRAY)
            owed += it.n;
        else if (it.kind == COW__MP_MAP)
            owed += 2 * (uint64_t)it.n;
    }
    r->pos = probe.pos;

    return 0;
}
