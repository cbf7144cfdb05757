/*
 * merge_log.c: reading logs for the merge engine, and cow_merge_verify().
 *
 * A log is read through a cow__reader, a buffer of fixed size filled
 * with pread(2), so the memory spent on a log never depends on its size
 * and nothing is mapped.  cow__walk_batch() reads one batch and applies
 * the format's rules, the same ones as cowd/_logfile.py: records without
 * a marker at the end of the file are an open or torn batch; a marker
 * whose record count or CRC does not match, or an unknown tag, makes the
 * batch corrupt.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cow_merge.h"
#include "merge_internal.h"

/* Read buffer of cow_merge_verify(). */
#define COW__VERIFY_BUFFER (1u << 20)

void *cow__alloc(struct cow__mem *mem, size_t n)
{
    void *p = malloc(n == 0 ? 1 : n);

    if (p != NULL) {
        mem->now += n;
        if (mem->now > mem->peak)
            mem->peak = mem->now;
    }

    return p;
}

void *cow__zalloc(struct cow__mem *mem, size_t n)
{
    void *p = cow__alloc(mem, n);

    if (p != NULL)
        memset(p, 0, n);

    return p;
}

/* Grows (or shrinks) p from old to n bytes; NULL leaves p as it was. */
void *cow__realloc(struct cow__mem *mem, void *p, size_t old, size_t n)
{
    void *q = realloc(p, n == 0 ? 1 : n);

    if (q != NULL) {
        mem->now = mem->now - old + n;
        if (mem->now > mem->peak)
            mem->peak = mem->now;
    }

    return q;
}

void cow__free(struct cow__mem *mem, void *p, size_t n)
{
    if (p == NULL)
        return;
    free(p);
    mem->now -= n;
}

int64_t cow__pread_full(int fd, void *buf, size_t n, uint64_t off)
{
    size_t done = 0;

    while (done < n) {
        ssize_t got = pread(fd, (char *)buf + done, n - done,
                            (off_t)(off + done));

        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return -errno;
        if (got == 0)
            break;
        done += (size_t)got;
    }

    return (int64_t)done;
}

int cow__pwrite_all(int fd, const void *buf, size_t n, uint64_t off)
{
    size_t done = 0;

    while (done < n) {
        ssize_t put = pwrite(fd, (const char *)buf + done, n - done,
                             (off_t)(off + done));

        if (put < 0 && errno == EINTR)
            continue;
        if (put < 0)
            return -errno;
        /* A regular file never takes zero bytes without an error. */
        if (put == 0)
            return -EIO;
        done += (size_t)put;
    }

    return 0;
}

int cow__reader_init(struct cow__reader *r, struct cow__mem *mem, int fd,
                     size_t cap, uint64_t limit)
{
    memset(r, 0, sizeof(*r));
    r->buf = cow__alloc(mem, cap);
    if (r->buf == NULL)
        return -ENOMEM;
    r->fd = fd;
    r->cap = cap;
    r->limit = limit;

    return 0;
}

void cow__reader_free(struct cow__reader *r, struct cow__mem *mem)
{
    cow__free(mem, r->buf, r->cap);
    r->buf = NULL;
}

/*
 * Fills the buffer so that it starts at start, keeping the bytes it
 * already holds from there on.
 */
static int cow__reader_fill(struct cow__reader *r, uint64_t start)
{
    size_t kept = 0;
    size_t want;
    int64_t got;

    if (start >= r->base && start < r->base + r->len) {
        kept = (size_t)(r->base + r->len - start);
        memmove(r->buf, r->buf + (start - r->base), kept);
    }
    want = r->cap;
    if (r->limit - start < want)
        want = (size_t)(r->limit - start);
    r->base = start;
    r->len = kept;
    if (kept >= want)
        return 0;
    got = cow__pread_full(r->fd, r->buf + kept, want - kept, start + kept);
    if (got < 0)
        return (int)got;
    r->len = kept + (size_t)got;

    return 0;
}

int cow__reader_get(struct cow__reader *r, uint64_t pos, size_t n,
                    const unsigned char **p)
{
    uint64_t start;
    int rc;

    if (n > r->cap)
        return -EINVAL;
    if (pos >= r->base && pos - r->base <= r->len &&
        n <= r->len - (pos - r->base)) {
        *p = r->buf + (pos - r->base);
        return 0;
    }
    if (pos > r->limit || n > r->limit - pos)
        return COW__SHORT;

    start = pos;
    if (r->keep <= pos && pos - r->keep + n <= r->cap)
        start = r->keep;
    rc = cow__reader_fill(r, start);
    if (rc < 0)
        return rc;
    /* The file was shorter than the limit said. */
    if (pos - r->base + n > r->len)
        return COW__SHORT;
    *p = r->buf + (pos - r->base);

    return 0;
}

/* Feeds n bytes at pos through the CRC, a buffer at a time. */
static int cow__walk_data(struct cow__reader *r, uint64_t pos, uint64_t n,
                          uint32_t *crc)
{
    while (n > 0) {
        size_t step = n < r->cap ? (size_t)n : r->cap;
        const unsigned char *p;
        int rc = cow__reader_get(r, pos, step, &p);

        if (rc != 0)
            return rc;
        *crc = cow_merge_crc32c(*crc, p, step);
        pos += step;
        n -= step;
    }

    return 0;
}

/* A torn batch when the data ran out (rc == COW__SHORT), else rc. */
static int cow__walk_short(int rc)
{
    return rc == COW__SHORT ? COW__BATCH_TORN : rc;
}

/*
 * Walks the batch at pos by its tags and lengths to its commit marker,
 * then checks the CRC over all of it at once: records are often a few
 * dozen bytes, and the CRC runs far faster over long inputs.
 */
int cow__walk_batch(struct cow__reader *r, uint64_t pos,
                    struct cow__batch *b, char *reason, size_t reason_len)
{
    const unsigned char *p;
    uint32_t crc = 0;
    int rc;

    memset(b, 0, sizeof(*b));
    b->start = pos;
    r->keep = pos;
    for (;;) {
        rc = cow__reader_get(r, pos, 1, &p);
        if (rc == COW__SHORT)
            return pos == b->start ? COW__BATCH_END : COW__BATCH_TORN;
        if (rc < 0)
            return rc;

        if (p[0] == 'R') {
            uint32_t len;

            rc = cow__reader_get(r, pos, COW__RECORD_HEAD, &p);
            if (rc != 0)
                return cow__walk_short(rc);
            len = cow__le32(p + 9);
            pos += COW__RECORD_HEAD + (uint64_t)len;
            b->records++;
            b->bytes += len;
        } else if (p[0] == 'C') {
            uint64_t seq;
            uint32_t want, count;

            rc = cow__reader_get(r, pos, COW__COMMIT_SIZE, &p);
            if (rc != 0)
                return cow__walk_short(rc);
            /* Read before the walk, which may move the buffer. */
            seq = cow__le64(p + 1);
            count = cow__le32(p + 9);
            want = cow__le32(p + 13);
            rc = cow__walk_data(r, b->start, pos + COW__COMMIT_BODY - b->start,
                                &crc);
            if (rc != 0)
                return cow__walk_short(rc);
            if (crc != want || count != b->records) {
                snprintf(reason, reason_len, "batch checksum mismatch");
                return COW__BATCH_CORRUPT;
            }
            b->seq = seq;
            b->marker = pos;
            b->end = pos + COW__COMMIT_SIZE;
            return COW__BATCH_OK;
        } else {
            snprintf(reason, reason_len, "unknown entry tag 0x%02x", p[0]);
            return COW__BATCH_CORRUPT;
        }
    }
}

/* Takes note of a good batch, in the caller's array if there is one. */
static void cow__verify_keep(struct cow_merge_verify_result *res,
                             const struct cow__batch *b,
                             struct cow_merge_batch *batches,
                             size_t max_batches)
{
    if (res->batches < max_batches) {
        struct cow_merge_batch *out = &batches[res->batches];

        out->seq = b->seq;
        out->start = b->start;
        out->end = b->end;
        out->records = b->records;
        out->bytes = b->bytes;
    }
    res->batches++;
    res->records += b->records;
    res->end = b->end;
    res->last_seq = b->seq;
}

/* Walks the log from res->end on, filling res; see cow_merge_verify(). */
static int cow__verify_walk(struct cow__reader *r,
                            struct cow_merge_verify_result *res,
                            bool ordered, uint64_t after,
                            struct cow_merge_batch *batches,
                            size_t max_batches)
{
    struct cow__batch b;
    int rc;

    for (;;) {
        if (max_batches > 0 && res->batches == max_batches) {
            res->status = COW_MERGE_MORE;
            return 0;
        }
        rc = cow__walk_batch(r, res->end, &b, res->reason,
                             sizeof(res->reason));
        if (rc == COW__BATCH_OK && ordered && b.seq <= after) {
            snprintf(res->reason, sizeof(res->reason), COW__OUT_OF_ORDER);
            rc = COW__BATCH_CORRUPT;
        }
        if (rc < 0 || rc == COW__BATCH_END)
            return rc < 0 ? rc : 0;
        if (rc == COW__BATCH_TORN) {
            res->status = COW_MERGE_TORN;
            res->pending_bytes = res->size - res->end;
            return 0;
        }
        if (rc == COW__BATCH_CORRUPT) {
            res->status = COW_MERGE_CORRUPT;
            res->corrupt_offset = res->end;
            return 0;
        }
        cow__verify_keep(res, &b, batches, max_batches);
        ordered = true;
        after = b.seq;
    }
}

COW__MERGE_EXPORT
int cow_merge_verify(int fd, uint64_t start, const uint64_t *after_seq,
                     struct cow_merge_batch *batches, size_t max_batches,
                     struct cow_merge_verify_result *result)
{
    /* Read first: the caller may pass &result->last_seq. */
    uint64_t after = after_seq != NULL ? *after_seq : 0;
    struct cow__mem mem = { 0 };
    struct cow__reader r;
    struct stat st;
    int rc;

    memset(result, 0, sizeof(*result));
    if (batches == NULL && max_batches > 0)
        return -EINVAL;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (st.st_size < 0 || start > (uint64_t)st.st_size)
        return -EINVAL;
    result->size = (uint64_t)st.st_size;
    result->end = start;

    rc = cow__reader_init(&r, &mem, fd, COW__VERIFY_BUFFER, result->size);
    if (rc < 0)
        return rc;
    rc = cow__verify_walk(&r, result, after_seq != NULL, after, batches,
                          max_batches);
    cow__reader_free(&r, &mem);

    return rc;
}
