/*
 * merge_internal.h: interfaces shared by the sources of libcowmerge.
 *
 * merge_log.c reads logs: a buffered reader over a descriptor, the walk
 * that checks one batch, and cow_merge_verify().  merge.c is the engine
 * proper.  crc32c.c computes the format's checksum.  Every allocation
 * goes through cow__alloc() so that a merge can report the most memory
 * its buffers held.
 */
#ifndef COW_MERGE_INTERNAL_H
#define COW_MERGE_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define COW__MERGE_EXPORT __attribute__((visibility("default")))

/* Sizes of the entries of the log format (see cowd/_logfile.py). */
#define COW__RECORD_HEAD 13 /* "R" | offset u64 | length u32 */
#define COW__COMMIT_BODY 13 /* "C" | seq u64 | count u32 */
#define COW__COMMIT_SIZE 17 /* the body, then crc u32 */

/*
 * Why a batch is refused when its seq is not above the one before it in
 * the same log: the commit order the merge relies on would be wrong.
 */
#define COW__OUT_OF_ORDER "commit sequence not increasing"

/* Returned by cow__reader_get() when the data ends before the request. */
#define COW__SHORT 1

/* What cow__walk_batch() found at an offset. */
enum cow__walk {
    COW__BATCH_OK,      /* a whole batch whose checks pass */
    COW__BATCH_END,     /* nothing at all: the log ends here */
    COW__BATCH_TORN,    /* an open or torn batch: the log ends inside it */
    COW__BATCH_CORRUPT, /* a batch that fails its checks */
};

/* Counts the bytes held by the buffers of one merge or verification. */
struct cow__mem {
    size_t now;
    size_t peak;
};

/*
 * A read buffer over part of a file, filled with pread(2).  It holds the
 * bytes [base, base + len) and never reads at or past limit.  When a
 * request misses, the buffer is filled again from keep if that still
 * leaves room for the request, else from the requested offset: a walk
 * over a batch sets keep to the batch's start, so that a batch smaller
 * than the buffer can be walked again without reading it twice.
 */
struct cow__reader {
    int fd;
    unsigned char *buf;
    size_t cap;
    uint64_t base;
    size_t len;
    uint64_t limit;
    uint64_t keep;
};

/* One batch as cow__walk_batch() found it. */
struct cow__batch {
    uint64_t start;  /* offset of its first record, or of its marker */
    uint64_t marker; /* offset of its commit marker */
    uint64_t end;    /* offset just past the marker */
    uint64_t seq;
    uint64_t records;
    uint64_t bytes; /* bytes of record data */
};

static inline uint32_t cow__le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static inline uint64_t cow__le64(const unsigned char *p)
{
    return (uint64_t)cow__le32(p) | (uint64_t)cow__le32(p + 4) << 32;
}

static inline void cow__put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

void *cow__alloc(struct cow__mem *mem, size_t n);
void *cow__zalloc(struct cow__mem *mem, size_t n);
void *cow__realloc(struct cow__mem *mem, void *p, size_t old, size_t n);
void cow__free(struct cow__mem *mem, void *p, size_t n);

/* Reads exactly n bytes at off unless the file ends first: the count. */
int64_t cow__pread_full(int fd, void *buf, size_t n, uint64_t off);

/* Writes all n bytes at off: 0 or a negative errno. */
int cow__pwrite_all(int fd, const void *buf, size_t n, uint64_t off);

int cow__reader_init(struct cow__reader *r, struct cow__mem *mem, int fd,
                     size_t cap, uint64_t limit);
void cow__reader_free(struct cow__reader *r, struct cow__mem *mem);

/*
 * Points *p at the n bytes (n <= the reader's capacity) at offset pos of
 * the file.  Returns 0, COW__SHORT when the limit or the end of the file
 * comes first, or a negative errno.
 */
int cow__reader_get(struct cow__reader *r, uint64_t pos, size_t n,
                    const unsigned char **p);

/*
 * Reads the batch starting at pos and checks its commit marker: the
 * count of records and the CRC over the records and the marker.  Returns
 * an enum cow__walk value with b filled for COW__BATCH_OK (and b->start
 * for the others), *reason set for COW__BATCH_CORRUPT; or a negative
 * errno.
 */
int cow__walk_batch(struct cow__reader *r, uint64_t pos,
                    struct cow__batch *b, char *reason, size_t reason_len);

#endif
