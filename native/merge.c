/*
 * merge.c: the merge engine: applies the committed batches of several
 * logs, in commit order, to a copy of their base file, in memory that
 * does not grow with the logs.
 *
 * What a merge computes.  The output starts as a copy of the base,
 * lengthened as far as the furthest record reaches (bytes between the
 * end of the base and a record are zero).  Every committed batch of
 * every log whose seq is above that log's min_seq is applied, in global
 * commit order: by seq, and for two batches with the same seq (which
 * cowd never stamps) in the order of the logs.  The records of a batch
 * are applied in the order they were logged.  An open or torn batch at
 * the end of a log is never applied.  A batch that fails its checks, or
 * whose seq is not above the previous batch's in the same log, makes
 * the log corrupt from that batch's first byte, and the whole merge is
 * refused before anything is written.
 *
 * Conflicts are defined in that order, byte by byte.  A byte has an
 * owner, the session that last wrote it (none at first), and a value.
 * When session t writes value v to a byte:
 *
 *   - if nobody or t owns the byte, it takes v and t owns it;
 *   - if another session o owns it and it holds v already, t owns it;
 *   - if o owns it and it holds another value, o and t conflict there,
 *     and the policy decides: LAST stores v and gives the byte to t;
 *     FIRST ignores the write, so o keeps the byte (and o's later writes
 *     still apply, while t's later different writes conflict again);
 *     FAIL goes on as LAST does, so as to find every conflict, and the
 *     merge fails at the end, its output incomplete.
 *
 * So a session never conflicts with its own earlier writes (nor two logs
 * given the same session number with each other) and equal bytes never
 * conflict.  Conflicting bytes are reported as ranges [start, end) with
 * the two sessions, the lower number first: adjacent bytes in conflict
 * between the same two sessions make one range, whichever of them wrote
 * first and however often.  A byte in conflict between several pairs
 * belongs to one range per pair; conflict_bytes counts it once.
 *
 * How, in bounded memory.  The output is cut into windows of W bytes.
 *
 *   1. Scan: each log is read once, front to back, through one buffer;
 *      every batch's CRC and record count are checked.  For each batch to
 *      apply, its records are walked again (from the buffer when the
 *      batch fits in it) to count, per window, the bytes of the spill
 *      entries they will become: a record crossing windows becomes one
 *      piece per window.  These counters, 8 bytes per window, are the
 *      only memory that grows with the output; nothing grows with the
 *      logs.
 *   2. Spill: prefix sums turn the counters into the start of each
 *      window's region of the spill file.  Consecutive windows are cut
 *      into groups whose pieces fit in the apply pass's buffer (a window
 *      with more is a group alone); a group's region is its windows'
 *      regions together.  The logs' batches are then taken in commit
 *      order, a k-way merge over one cursor per log (each log's batches
 *      are already in order), and every piece is written at its group's
 *      cursor, which then advances.  So each group's region holds its
 *      pieces in commit order.  Pieces are gathered in a buffer and
 *      written a group at a time, so the spill file is written in a few
 *      long writes rather than one short one per window; a piece too
 *      large for the buffer is copied straight from the log.
 *   3. Apply: windows are done in order, into an output that has the
 *      final size (ftruncate(2)) and, unless it was cloned from the base
 *      (FICLONE), blocks allocated wherever the base has data, so that
 *      no write has to allocate while the output is written back.  The
 *      base's holes stay holes, and past its end there is nothing to
 *      copy, as the bytes there are zeros already.
 *      Unless cloned, the base is copied into the output in the kernel
 *      with copy_file_range(2), by a second thread that starts when the
 *      scan is done and copies, front to back, while the spill pass
 *      runs.  When the apply pass starts, the thread stops copying and
 *      the apply pass copies the rest itself as it reaches it, and only
 *      what no piece covers: a window with pieces is written whole from
 *      its buffer where they are, so those bytes are not copied first.
 *      A window with no pieces is only copied.  Otherwise its group
 *      is read whole, unless it is the group read last or a window
 *      alone, and its pieces sorted by window into the buffer, each
 *      moved to its window's region, in the order they come.  Then the
 *      headers of the window's region mark the blocks (COW__BLOCK
 *      bytes) that pieces touch, and short gaps between marked blocks
 *      are marked too; the base's bytes of the marked blocks are read
 *      into a buffer and the others copied where the copy has not been
 *      (a window dense with pieces is read whole instead, ahead, by the
 *      second thread, into a second buffer that is then swapped in);
 *      the region is read front to back and each piece applied with the
 *      rules above, using an owner array of one 32-bit tag per byte of
 *      the window (when every piece of the window is from one session,
 *      none can conflict and pieces are plain copies); and the marked
 *      blocks are written, a dense window in one write.
 *      Behind the windows applied, the output is final, and the second
 *      thread, between the windows it reads ahead, hands it to writeback
 *      as it grows (sync_file_range(2)), so that the disk writes it while
 *      the merge goes on and the caller's fsync(2) has little left.
 *
 * An owner tag is a slot, the caller's sessions numbered densely from 1,
 * in its low COW__SLOT_BITS bits, and an epoch above them.  Each pass
 * over (part of) a window takes a new epoch, and a tag from any other
 * epoch means "no owner", so the array never needs clearing between
 * windows; it is zeroed once every COW__EPOCHS - 1 passes, when epochs
 * wrap around.
 *
 * Conflict ranges of a window are gathered as runs in a fixed array,
 * compacted (sorted by pair, adjacent runs joined) when it fills, and at
 * the window's end sorted by offset and reported, except those reaching
 * the window's end, which are carried into the next window to be joined
 * with what continues there.  If a window has more separate ranges than
 * the array can hold, the window is written anyway, then applied again
 * for its ranges only, in halves (recursively) small enough: a byte's
 * fate depends only on the pieces that cover it, so any part of a window
 * can be redone alone.  Ranges are reported in the order they are
 * completed, which is by offset within a window; the caller sorts.
 *
 * Memory: in the apply pass, two window-sized value buffers, the 4-byte
 * owner tags and a conflict bit per byte of a window, plus about 4.4 MiB
 * of fixed buffers (see the sizes below); in the spill pass, about 3.5
 * MiB of staging buffers and a read buffer per log (4 MiB shared by the
 * logs, at least 16 KiB each); from the spill pass on, the copy's 256
 * KiB buffer and its thread's 64 KiB stack; throughout, 8 bytes per
 * window of output, at most 40 more per window for the groups, and a
 * few dozen bytes per log.  With the default 1 MiB window that is about
 * 11.6 MiB at most, for up to 256 logs, whatever their size.  Nothing
 * else is mapped, so the resident size is that.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cow_merge.h"
#include "merge_internal.h"

/* Read buffer of the scan pass, reused for every log. */
#define COW__SCAN_BUFFER (1u << 20)

/*
 * Read buffers of the spill pass: the budget is shared among the logs,
 * each getting at least the minimum (so a merge of many logs uses more)
 * and at most the maximum.
 */
#define COW__SPILL_READ_BUDGET (4u << 20)
#define COW__SPILL_READ_MIN (16u << 10)
#define COW__SPILL_READ_MAX (1u << 20)

/*
 * Pieces waiting to be written to the spill file.  A piece larger than a
 * quarter of it is written directly, so that one piece never empties the
 * buffer on its own.
 */
#define COW__STAGE_BUFFER (1u << 20)

/*
 * Read buffer over the spill file in the apply pass, which holds a whole
 * group of windows: consecutive windows are grouped as long as their
 * pieces fit in it, and no more than COW__GROUP_WINDOWS of them.
 */
#define COW__APPLY_BUFFER (2u << 20)
#define COW__GROUP_WINDOWS 4096u

/* Conflict runs held at once (24 bytes each). */
#define COW__RUNS (1u << 14)

/*
 * A spill entry's header: slot u32 | offset in window u32 | length u32 |
 * window, counted from its group's first, u32.
 */
#define COW__ENTRY_HEAD 16

/* Smallest stride between two progress reports, in bytes of the phase. */
#define COW__TICK (1u << 20)

/* Most progress reports per phase, on top of the first and last. */
#define COW__TICKS 1024

/*
 * A window whose spill entries take at least 1/COW__DENSE of it is read
 * whole from the base, ahead, by the second thread: most of its blocks
 * would be read anyway.
 */
#define COW__DENSE 64

/*
 * Unit in which a window with pieces is written: only blocks that pieces
 * touch are written from the window's buffer; the others are copied from
 * the base.  A window smaller than this is one block.
 */
#define COW__BLOCK 4096u

/*
 * Untouched blocks between two touched ones are read and written with
 * them when the gap is at most this long: a syscall costs more than
 * moving a few pages through the buffer, so a dense window goes out as
 * one span, a sparse one as a few small writes.
 */
#define COW__GAP (64u << 10)

/*
 * The base is copied into the output in the kernel this far at a time:
 * the second thread, copying beside the spill pass, looks between steps
 * whether the apply pass wants to take the copy over.
 */
#define COW__COPY_STEP (8u << 20)

/*
 * The output below the windows applied so far is final; it is handed to
 * the kernel's writeback this much at a time, so that the disk writes it
 * while the merge goes on and the caller's fsync(2) finds little left.
 */
#define COW__WRITEBACK_STEP (16u << 20)

/* Buffer of the copy when copy_file_range(2) cannot be used. */
#define COW__COPY_BUFFER (256u << 10)

/* Stack of the copying thread, which calls little more than the kernel. */
#define COW__COPY_STACK (64u << 10)

/* Owner tags: the slot below, the epoch above; see the top comment. */
#define COW__SLOT_BITS 20
#define COW__SLOT_MASK ((1u << COW__SLOT_BITS) - 1)
#define COW__EPOCHS (1u << (32 - COW__SLOT_BITS))

/* What the engine knows of one log. */
struct cow__log {
    struct cow_merge_log *in;
    uint32_t slot;
    /* The file's size when the merge began; nothing after it is read. */
    uint64_t size;
    /* Offset of the first batch to apply, valid once live is set. */
    uint64_t first;
    bool live;
    /* Spill pass: this log's buffer and the batch it will apply next. */
    struct cow__reader reader;
    struct cow__batch next;
};

/*
 * A group of windows [first, next group's first): its pieces share one
 * region of the spill file, in commit order; see the top comment.
 */
struct cow__group {
    uint64_t first;
    /* Spill pass: where its next piece goes; bytes of it staged. */
    uint64_t cursor;
    uint32_t staged;
    /* Where its staged pieces go in the stage's output buffer. */
    uint32_t at;
};

/* Pieces gathered for the spill file; see cow__stage_piece(). */
struct cow__item {
    uint32_t at;
    uint32_t len;
    uint64_t group;
};

struct cow__stage {
    unsigned char *data;
    unsigned char *out;
    size_t used;
    struct cow__item *items;
    size_t nitems;
    size_t maxitems;
    /* Groups with staged pieces, in the order they got their first. */
    uint64_t *touched;
    size_t ntouched;
};

/* State of the apply pass. */
struct cow__apply {
    unsigned char *val;
    uint32_t *owner;
    /* One bit per byte of the window: it conflicted at least once. */
    uint64_t *hit;
    bool hits;
    uint32_t epoch;
    struct cow__reader reader;

    /* The window: its offset in the output and its length. */
    uint64_t wstart;
    uint32_t wlen;
    /*
     * The group in the buffer, sorted by window (ngroups if none), and
     * what sorting it takes: its region as read, and a cursor per window.
     */
    uint64_t loaded;
    unsigned char *unsorted;
    uint32_t *cursors;
    /* The part of it being applied. */
    uint32_t lo;
    uint32_t hi;
    /* One bit per block of the window: pieces touch it. */
    uint64_t *blocks;
    uint32_t block;
    /* First pass over the window: count conflicting bytes. */
    bool count;
    /*
     * Every piece of the window is from one slot, so none can conflict:
     * they are copied, and the owner tags are left as they are.
     */
    bool single;
    /* Runs are still being gathered: the array has not overflowed. */
    bool collect;

    /*
     * The run being extended, then the array of runs: the first ncarry
     * came from the windows before and reach this window's start.
     */
    struct cow_merge_conflict run;
    bool has_run;
    struct cow_merge_conflict *runs;
    size_t nruns;
    size_t ncarry;
};

/*
 * The merge's second thread, from the spill pass on: it copies the base
 * into the output while the spill pass runs, and from the apply pass on
 * reads dense windows of the base ahead and hands the output to
 * writeback behind the windows applied.  Without it (no thread could be
 * started) the apply pass copies, reads and starts writeback itself.
 */
struct cow__copier {
    pthread_mutex_t lock;
    pthread_cond_t moved;
    pthread_t thread;
    bool threaded;
    /*
     * Guarded by lock while the thread runs: the output holds the base's
     * bytes below copied (all of them when cloned); the copy's error;
     * a request to stop copying and start writing back, and whether the
     * thread still copies; the output below final is final; no more
     * output comes; and a request to stop at once.
     */
    uint64_t copied;
    int error;
    bool handover;
    bool copying;
    uint64_t final;
    bool done;
    bool stop;
    /*
     * Also guarded by lock: the apply pass wants window ahead_window of
     * the base read into ahead, a buffer of a window, and it is, with
     * this result.  Only the thread touches ahead while it is wanted and
     * not ready; the apply pass swaps it with its own buffer after.
     */
    unsigned char *ahead;
    uint64_t ahead_window;
    bool ahead_wanted;
    bool ahead_ready;
    int ahead_error;
    /* Used by whoever copies. */
    unsigned char *buf;
    bool no_copy_range;
};

struct cow__merge {
    struct cow__log *logs;
    size_t nlogs;
    /* sessions[slot] is the caller's number of slot's session. */
    uint32_t *sessions;
    size_t nslots;
    int base_fd;
    int out_fd;
    int spill_fd;
    int policy;
    /* COW_MERGE_WRITE_BACK was given. */
    bool write_back;
    uint64_t window;
    uint64_t base_size;
    uint64_t out_size;
    uint64_t nwin;
    /*
     * Per window: bytes of spill entries (scan), then where its entries
     * start once sorted by window, with the spill's size after the last.
     */
    uint64_t *counts;
    uint64_t ncounts;
    uint64_t spill_size;
    struct cow__group *groups;
    uint64_t ngroups;
    /* Per window, the group it belongs to. */
    uint64_t *group_of;
    bool conflicted;
    struct cow__copier copier;
    /*
     * Output below this was handed to writeback, ~0 once that failed;
     * guarded by the copier's lock while its thread runs.
     */
    uint64_t written_back;
    struct cow_merge_conflict *conflicts;
    size_t max_conflicts;
    struct cow_merge_stats *stats;
    struct cow__mem mem;

    struct cow_merge_progress *progress;
    int phase;
    uint64_t total;
    uint64_t ticked;
};

/* -- progress -------------------------------------------------------- */

/*
 * Publishes how far the merge is, calls the caller's function if there
 * is one, and stops the merge if the caller asked.
 */
static int cow__report(struct cow__merge *m, uint64_t done)
{
    struct cow_merge_progress *p = m->progress;

    m->ticked = done;
    if (p == NULL)
        return 0;
    __atomic_store_n(&p->phase, m->phase, __ATOMIC_RELAXED);
    __atomic_store_n(&p->total, m->total, __ATOMIC_RELAXED);
    __atomic_store_n(&p->done, done, __ATOMIC_RELAXED);
    if (p->fn != NULL && p->fn(p->arg, m->phase, done, m->total) != 0)
        return -ECANCELED;

    return __atomic_load_n(&p->cancel, __ATOMIC_RELAXED) ? -ECANCELED : 0;
}

static int cow__phase(struct cow__merge *m, int phase, uint64_t total)
{
    m->phase = phase;
    m->total = total;

    return cow__report(m, 0);
}

/* Reports progress when enough was done since the last report. */
static int cow__tick(struct cow__merge *m, uint64_t done)
{
    uint64_t stride = m->total / COW__TICKS;

    if (stride < COW__TICK)
        stride = COW__TICK;
    if (done - m->ticked >= stride || (done == m->total && m->ticked < done))
        return cow__report(m, done);

    return 0;
}

/* -- scan pass ------------------------------------------------------- */

static uint64_t cow__min(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* Makes the counter array hold at least n windows, zeroed. */
static int cow__grow_counts(struct cow__merge *m, uint64_t n)
{
    uint64_t want = n + n / 8;
    uint64_t *p;

    if (n <= m->ncounts)
        return 0;
    if (want > SIZE_MAX / sizeof(uint64_t))
        return -ENOMEM;
    p = cow__realloc(&m->mem, m->counts, m->ncounts * sizeof(uint64_t),
                     want * sizeof(uint64_t));
    if (p == NULL)
        return -ENOMEM;
    memset(p + m->ncounts, 0, (want - m->ncounts) * sizeof(uint64_t));
    m->counts = p;
    m->ncounts = want;

    return 0;
}

/* Counts the spill bytes of a record of len bytes at off. */
static int cow__count_record(struct cow__merge *m, uint64_t off,
                             uint64_t len)
{
    uint64_t end, w, last;
    int rc;

    if (len == 0)
        return 0;
    if (off > (uint64_t)INT64_MAX - len)
        return -EFBIG;
    end = off + len;
    last = (end - 1) / m->window;
    rc = cow__grow_counts(m, last + 1);
    if (rc < 0)
        return rc;
    if (end > m->out_size)
        m->out_size = end;

    for (w = off / m->window; w <= last; w++) {
        uint64_t ws = w * m->window;
        uint64_t lo = off > ws ? off : ws;
        uint64_t hi = cow__min(end, ws + m->window);

        m->counts[w] += COW__ENTRY_HEAD + (hi - lo);
    }

    return 0;
}

/* Counts the records of a batch to apply, and takes note of it. */
static int cow__count_batch(struct cow__merge *m, struct cow__log *lg,
                            struct cow__reader *r,
                            const struct cow__batch *b)
{
    uint64_t pos = b->start;
    const unsigned char *p;
    int rc;

    while (pos < b->marker) {
        rc = cow__reader_get(r, pos, COW__RECORD_HEAD, &p);
        if (rc != 0)
            return rc < 0 ? rc : -EIO;
        rc = cow__count_record(m, cow__le64(p + 1), cow__le32(p + 9));
        if (rc < 0)
            return rc;
        pos += COW__RECORD_HEAD + (uint64_t)cow__le32(p + 9);
    }

    if (!lg->live) {
        lg->live = true;
        lg->first = b->start;
    }
    lg->in->last_seq = b->seq;
    lg->in->applied_end = b->end;
    lg->in->batches++;
    lg->in->records += b->records;
    m->stats->batches++;
    m->stats->records += b->records;
    m->stats->bytes_applied += b->bytes;

    return 0;
}

static int cow__refuse(struct cow__merge *m, size_t k, uint64_t offset)
{
    m->stats->corrupt_log = (int)k;
    m->stats->corrupt_offset = offset;

    return -EBADMSG;
}

/* Scans log k; done is the progress of the phase before it. */
static int cow__scan_log(struct cow__merge *m, size_t k,
                         struct cow__reader *r, uint64_t done)
{
    struct cow__log *lg = &m->logs[k];
    char *reason = m->stats->corrupt_reason;
    size_t reason_len = sizeof(m->stats->corrupt_reason);
    uint64_t pos = lg->in->data_start;
    uint64_t prev = 0;
    struct cow__batch b;
    int rc;

    r->fd = lg->in->fd;
    r->limit = lg->size;
    r->base = 0;
    r->len = 0;
    for (;;) {
        rc = cow__walk_batch(r, pos, &b, reason, reason_len);
        if (rc == COW__BATCH_OK && pos > lg->in->data_start && b.seq <= prev) {
            snprintf(reason, reason_len, COW__OUT_OF_ORDER);
            rc = COW__BATCH_CORRUPT;
        }
        if (rc < 0)
            return rc;
        if (rc == COW__BATCH_CORRUPT)
            return cow__refuse(m, k, pos);
        if (rc == COW__BATCH_TORN)
            lg->in->pending_bytes = lg->size - pos;
        if (rc != COW__BATCH_OK)
            return 0;

        prev = b.seq;
        if (b.seq > lg->in->min_seq) {
            rc = cow__count_batch(m, lg, r, &b);
            if (rc < 0)
                return rc;
        }
        pos = b.end;
        rc = cow__tick(m, done + (pos - lg->in->data_start));
        if (rc < 0)
            return rc;
    }
}

static int cow__scan(struct cow__merge *m)
{
    struct cow__reader r;
    uint64_t total = 0, done = 0;
    size_t k;
    int rc;

    for (k = 0; k < m->nlogs; k++)
        total += m->logs[k].size - m->logs[k].in->data_start;
    rc = cow__phase(m, COW_MERGE_SCAN, total);
    if (rc < 0)
        return rc;
    rc = cow__reader_init(&r, &m->mem, -1, COW__SCAN_BUFFER, 0);
    if (rc < 0)
        return rc;

    for (k = 0; k < m->nlogs && rc == 0; k++) {
        rc = cow__scan_log(m, k, &r, done);
        done += m->logs[k].size - m->logs[k].in->data_start;
    }
    cow__reader_free(&r, &m->mem);
    if (rc < 0)
        return rc;

    m->nwin = m->out_size / m->window + (m->out_size % m->window != 0);
    rc = cow__grow_counts(m, m->nwin + 1);
    if (rc < 0)
        return rc;
    m->stats->out_size = m->out_size;
    m->stats->windows = m->nwin;

    return cow__tick(m, total);
}

/* -- spill pass ------------------------------------------------------ */

/*
 * Writes the staged pieces, one write per group: a group's staged pieces
 * follow each other in the spill file, ending at its cursor, as pieces
 * written directly never come between them (the stage is written first).
 */
static int cow__stage_flush(struct cow__merge *m, struct cow__stage *st)
{
    size_t used = 0, i;
    int rc = 0;

    for (i = 0; i < st->ntouched; i++) {
        struct cow__group *g = &m->groups[st->touched[i]];

        g->at = (uint32_t)used;
        used += g->staged;
    }
    for (i = 0; i < st->nitems; i++) {
        const struct cow__item *it = &st->items[i];
        struct cow__group *g = &m->groups[it->group];

        memcpy(st->out + g->at, st->data + it->at, it->len);
        g->at += it->len;
    }
    for (i = 0; i < st->ntouched; i++) {
        struct cow__group *g = &m->groups[st->touched[i]];

        if (rc == 0)
            rc = cow__pwrite_all(m->spill_fd, st->out + g->at - g->staged,
                                 g->staged, g->cursor - g->staged);
        g->staged = 0;
    }
    st->nitems = 0;
    st->ntouched = 0;
    st->used = 0;

    return rc;
}

/* Copies n bytes at src of the log into dst. */
static int cow__copy_out(struct cow__reader *r, uint64_t src,
                         unsigned char *dst, uint64_t n)
{
    while (n > 0) {
        size_t step = (size_t)cow__min(n, r->cap);
        const unsigned char *p;
        int rc = cow__reader_get(r, src, step, &p);

        if (rc != 0)
            return rc < 0 ? rc : -EIO;
        memcpy(dst, p, step);
        dst += step;
        src += step;
        n -= step;
    }

    return 0;
}

/* Writes a large piece straight from the log to the spill file. */
static int cow__spill_direct(struct cow__merge *m, struct cow__reader *r,
                             const unsigned char *head, uint64_t dest,
                             uint64_t src, uint64_t n)
{
    int rc = cow__pwrite_all(m->spill_fd, head, COW__ENTRY_HEAD, dest);

    dest += COW__ENTRY_HEAD;
    while (rc == 0 && n > 0) {
        size_t step = (size_t)cow__min(n, r->cap);
        const unsigned char *p;

        rc = cow__reader_get(r, src, step, &p);
        if (rc > 0)
            return -EIO;
        if (rc == 0)
            rc = cow__pwrite_all(m->spill_fd, p, step, dest);
        dest += step;
        src += step;
        n -= step;
    }

    return rc;
}

/*
 * Places a piece: n bytes at src in the log, for offset woff of window
 * w, written by slot.  Its place in the spill file is fixed now, at its
 * group's cursor, even if the bytes are written later.
 */
static int cow__stage_piece(struct cow__merge *m, struct cow__stage *st,
                            struct cow__log *lg, uint64_t w, uint32_t woff,
                            uint64_t src, uint32_t n)
{
    uint64_t size = COW__ENTRY_HEAD + (uint64_t)n;
    uint64_t g = m->group_of[w];
    struct cow__group *gr = &m->groups[g];
    uint64_t dest = gr->cursor;
    unsigned char head[COW__ENTRY_HEAD];
    struct cow__item *it;
    int rc;

    /* The scan counted these very pieces; anything else is a change. */
    if (dest + size > m->counts[m->groups[g + 1].first])
        return -EIO;
    cow__put32(head, lg->slot);
    cow__put32(head + 4, woff);
    cow__put32(head + 8, n);
    cow__put32(head + 12, (uint32_t)(w - gr->first));
    if (size > COW__STAGE_BUFFER / 4) {
        rc = cow__stage_flush(m, st);
        gr->cursor += size;
        if (rc < 0)
            return rc;
        return cow__spill_direct(m, &lg->reader, head, dest, src, n);
    }

    if (st->used + size > COW__STAGE_BUFFER || st->nitems == st->maxitems) {
        rc = cow__stage_flush(m, st);
        if (rc < 0)
            return rc;
    }
    gr->cursor += size;
    if (gr->staged == 0)
        st->touched[st->ntouched++] = g;
    gr->staged += (uint32_t)size;
    it = &st->items[st->nitems++];
    it->at = (uint32_t)st->used;
    it->len = (uint32_t)size;
    it->group = g;
    memcpy(st->data + st->used, head, COW__ENTRY_HEAD);
    st->used += size;

    return cow__copy_out(&lg->reader, src,
                         st->data + it->at + COW__ENTRY_HEAD, n);
}

/* Cuts a record (len bytes at off, data at src) into window pieces. */
static int cow__spill_record(struct cow__merge *m, struct cow__stage *st,
                             struct cow__log *lg, uint64_t off,
                             uint64_t len, uint64_t src)
{
    uint64_t end = off + len;
    uint64_t cur = off;
    int rc;

    while (cur < end) {
        uint64_t w = cur / m->window;
        uint64_t ws = w * m->window;
        uint64_t hi = cow__min(end, ws + m->window);

        rc = cow__stage_piece(m, st, lg, w, (uint32_t)(cur - ws),
                              src + (cur - off), (uint32_t)(hi - cur));
        if (rc < 0)
            return rc;
        cur = hi;
    }

    return 0;
}

static int cow__spill_batch(struct cow__merge *m, struct cow__stage *st,
                            struct cow__log *lg)
{
    const struct cow__batch *b = &lg->next;
    uint64_t pos = b->start;
    const unsigned char *p;
    uint64_t off, len;
    int rc;

    while (pos < b->marker) {
        rc = cow__reader_get(&lg->reader, pos, COW__RECORD_HEAD, &p);
        if (rc != 0)
            return rc < 0 ? rc : -EIO;
        off = cow__le64(p + 1);
        len = cow__le32(p + 9);
        pos += COW__RECORD_HEAD;
        rc = cow__spill_record(m, st, lg, off, len, pos);
        if (rc < 0)
            return rc;
        pos += len;
    }

    return 0;
}

/*
 * Reads the batch of lg at pos, to be applied next.  The scan checked it
 * already; checking it again (the CRC is cheap) is what guarantees that
 * the pieces written are the ones counted.
 */
static int cow__peek(struct cow__log *lg, uint64_t pos)
{
    char reason[64];
    int rc = cow__walk_batch(&lg->reader, pos, &lg->next, reason,
                             sizeof(reason));

    if (rc < 0)
        return rc;

    return rc == COW__BATCH_OK ? 0 : -EIO;
}

/* The k-way merge's heap of logs, ordered by next seq, then log index. */
static bool cow__before(struct cow__merge *m, size_t a, size_t b)
{
    uint64_t sa = m->logs[a].next.seq, sb = m->logs[b].next.seq;

    return sa < sb || (sa == sb && a < b);
}

static void cow__heap_push(struct cow__merge *m, size_t *heap, size_t *n,
                           size_t k)
{
    size_t i = (*n)++;

    while (i > 0 && cow__before(m, k, heap[(i - 1) / 2])) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = k;
}

static size_t cow__heap_pop(struct cow__merge *m, size_t *heap, size_t *n)
{
    size_t top = heap[0];
    size_t last = heap[--(*n)];
    size_t i = 0;

    for (;;) {
        size_t c = 2 * i + 1;

        if (c >= *n)
            break;
        if (c + 1 < *n && cow__before(m, heap[c + 1], heap[c]))
            c++;
        if (!cow__before(m, heap[c], last))
            break;
        heap[i] = heap[c];
        i = c;
    }
    if (*n > 0)
        heap[i] = last;

    return top;
}

static size_t cow__spill_read_size(size_t nlogs)
{
    size_t size = COW__SPILL_READ_BUDGET / (nlogs > 0 ? nlogs : 1);

    if (size < COW__SPILL_READ_MIN)
        size = COW__SPILL_READ_MIN;
    if (size > COW__SPILL_READ_MAX)
        size = COW__SPILL_READ_MAX;

    return size;
}

/* Opens a cursor on every log with batches to apply, into the heap. */
static int cow__spill_open(struct cow__merge *m, size_t *heap, size_t *n,
                           uint64_t *total)
{
    size_t size = cow__spill_read_size(m->nlogs);
    size_t k;
    int rc;

    for (k = 0; k < m->nlogs; k++) {
        struct cow__log *lg = &m->logs[k];

        if (!lg->live)
            continue;
        rc = cow__reader_init(&lg->reader, &m->mem, lg->in->fd, size,
                              lg->in->applied_end);
        if (rc < 0)
            return rc;
        rc = cow__peek(lg, lg->first);
        if (rc < 0)
            return rc;
        *total += lg->in->applied_end - lg->first;
        cow__heap_push(m, heap, n, k);
    }

    return 0;
}

/* Takes every batch to apply in commit order, writing its pieces. */
static int cow__spill_all(struct cow__merge *m, struct cow__stage *st,
                          size_t *heap, size_t n)
{
    uint64_t done = 0;
    int rc;

    while (n > 0) {
        size_t k = cow__heap_pop(m, heap, &n);
        struct cow__log *lg = &m->logs[k];
        uint64_t end = lg->next.end;

        rc = cow__spill_batch(m, st, lg);
        if (rc < 0)
            return rc;
        done += end - lg->next.start;
        if (end < lg->in->applied_end) {
            rc = cow__peek(lg, end);
            if (rc < 0)
                return rc;
            cow__heap_push(m, heap, &n, k);
        }
        rc = cow__tick(m, done);
        if (rc < 0)
            return rc;
    }

    return cow__stage_flush(m, st);
}

/* Most groups that can have pieces staged at once. */
static size_t cow__stage_groups(const struct cow__merge *m,
                                const struct cow__stage *st)
{
    return (size_t)cow__min(m->ngroups + 1, st->maxitems);
}

static int cow__stage_init(struct cow__merge *m, struct cow__stage *st)
{
    memset(st, 0, sizeof(*st));
    /* Every piece staged holds at least its header and one byte. */
    st->maxitems = COW__STAGE_BUFFER / (COW__ENTRY_HEAD + 1) + 1;
    st->data = cow__alloc(&m->mem, COW__STAGE_BUFFER);
    st->out = cow__alloc(&m->mem, COW__STAGE_BUFFER);
    st->items = cow__alloc(&m->mem, st->maxitems * sizeof(*st->items));
    st->touched =
        cow__alloc(&m->mem, cow__stage_groups(m, st) * sizeof(uint64_t));
    if (st->data == NULL || st->out == NULL || st->items == NULL ||
        st->touched == NULL)
        return -ENOMEM;

    return 0;
}

static void cow__stage_free(struct cow__merge *m, struct cow__stage *st)
{
    cow__free(&m->mem, st->data, COW__STAGE_BUFFER);
    cow__free(&m->mem, st->out, COW__STAGE_BUFFER);
    cow__free(&m->mem, st->items, st->maxitems * sizeof(*st->items));
    cow__free(&m->mem, st->touched,
              cow__stage_groups(m, st) * sizeof(uint64_t));
}

/*
 * Cuts the windows into groups, front to back, writing them into groups
 * unless it is NULL, and returns how many: a group takes windows while
 * their pieces fit in the apply pass's buffer, and at least one, so a
 * window with more pieces than that is a group of its own.  Every group
 * starts on a window, so there are never more groups than windows.
 */
static uint64_t cow__cut_groups(const struct cow__merge *m,
                                struct cow__group *groups)
{
    uint64_t bytes = 0, count = 0, n = 0, w;

    for (w = 0; w < m->nwin; w++) {
        uint64_t c = m->counts[w + 1] - m->counts[w];

        if (count > 0 &&
            (bytes + c > COW__APPLY_BUFFER || count == COW__GROUP_WINDOWS))
            count = 0;
        if (count == 0) {
            if (groups != NULL) {
                groups[n].first = w;
                groups[n].cursor = m->counts[w];
            }
            bytes = 0;
            n++;
        }
        bytes += c;
        count++;
    }

    return n;
}

static int cow__make_groups(struct cow__merge *m)
{
    uint64_t g, w;

    m->ngroups = cow__cut_groups(m, NULL);
    m->groups = cow__zalloc(&m->mem, (m->ngroups + 1) * sizeof(*m->groups));
    m->group_of = cow__alloc(&m->mem, m->nwin * sizeof(uint64_t));
    if (m->groups == NULL || m->group_of == NULL)
        return -ENOMEM;
    cow__cut_groups(m, m->groups);
    /* A last group, empty, marks where the others end. */
    m->groups[m->ngroups].first = m->nwin;
    m->groups[m->ngroups].cursor = m->spill_size;
    for (g = 0; g < m->ngroups; g++)
        for (w = m->groups[g].first; w < m->groups[g + 1].first; w++)
            m->group_of[w] = g;
    m->stats->groups = m->ngroups;

    return 0;
}

static int cow__spill(struct cow__merge *m)
{
    struct cow__stage st;
    uint64_t sum = 0, total = 0, w;
    size_t *heap;
    size_t n = 0, k;
    int rc;

    for (w = 0; w < m->nwin; w++) {
        uint64_t c = m->counts[w];

        m->counts[w] = sum;
        sum += c;
    }
    m->counts[m->nwin] = sum;
    m->spill_size = sum;
    m->stats->spill_bytes = sum;
    rc = cow__make_groups(m);
    if (rc < 0)
        return rc;

    heap = cow__alloc(&m->mem, m->nlogs * sizeof(*heap));
    rc = heap == NULL ? -ENOMEM : cow__stage_init(m, &st);
    if (rc == 0)
        rc = cow__spill_open(m, heap, &n, &total);
    if (rc == 0)
        rc = cow__phase(m, COW_MERGE_SPILL, total);
    if (rc == 0)
        rc = cow__spill_all(m, &st, heap, n);

    for (k = 0; k < m->nlogs; k++)
        cow__reader_free(&m->logs[k].reader, &m->mem);
    if (heap != NULL)
        cow__stage_free(m, &st);
    cow__free(&m->mem, heap, m->nlogs * sizeof(*heap));

    return rc;
}

/* -- conflict runs --------------------------------------------------- */

static int cow__run_pair_cmp(const void *a, const void *b)
{
    const struct cow_merge_conflict *x = a, *y = b;

    if (x->session_a != y->session_a)
        return x->session_a < y->session_a ? -1 : 1;
    if (x->session_b != y->session_b)
        return x->session_b < y->session_b ? -1 : 1;
    if (x->start != y->start)
        return x->start < y->start ? -1 : 1;

    return (x->end > y->end) - (x->end < y->end);
}

static int cow__run_start_cmp(const void *a, const void *b)
{
    const struct cow_merge_conflict *x = a, *y = b;

    if (x->start != y->start)
        return x->start < y->start ? -1 : 1;
    if (x->session_a != y->session_a)
        return x->session_a < y->session_a ? -1 : 1;

    return (x->session_b > y->session_b) - (x->session_b < y->session_b);
}

/*
 * Joins the runs of v that overlap or touch and have the same pair of
 * sessions; returns how many are left, at the front of v.
 */
static size_t cow__runs_compact(struct cow_merge_conflict *v, size_t n)
{
    size_t out = 0, i;

    qsort(v, n, sizeof(*v), cow__run_pair_cmp);
    for (i = 0; i < n; i++) {
        struct cow_merge_conflict *last = out > 0 ? &v[out - 1] : NULL;

        if (last != NULL && last->session_a == v[i].session_a &&
            last->session_b == v[i].session_b && v[i].start <= last->end) {
            if (v[i].end > last->end)
                last->end = v[i].end;
            continue;
        }
        v[out++] = v[i];
    }

    return out;
}

static void cow__emit(struct cow__merge *m, const struct cow_merge_conflict *c)
{
    struct cow_merge_stats *s = m->stats;

    s->nconflicts++;
    if (s->conflicts_stored < m->max_conflicts)
        m->conflicts[s->conflicts_stored++] = *c;
}

/* Reports every run carried so far. */
static void cow__runs_flush(struct cow__merge *m, struct cow__apply *ap)
{
    size_t i;

    qsort(ap->runs, ap->nruns, sizeof(*ap->runs), cow__run_start_cmp);
    for (i = 0; i < ap->nruns; i++)
        cow__emit(m, &ap->runs[i]);
    ap->nruns = 0;
    ap->ncarry = 0;
}

/*
 * Appends the finished run.  When the array is full it is compacted, and
 * if that frees less than half of the room past the carried runs, this
 * part of the window stops gathering runs: it will be redone in halves.
 */
static void cow__run_push(struct cow__apply *ap)
{
    size_t room;

    ap->has_run = false;
    if (!ap->collect)
        return;
    if (ap->nruns == COW__RUNS) {
        ap->nruns = ap->ncarry + cow__runs_compact(ap->runs + ap->ncarry,
                                                   ap->nruns - ap->ncarry);
        room = COW__RUNS - ap->ncarry;
        if (ap->nruns == COW__RUNS || ap->nruns - ap->ncarry > room / 2) {
            ap->collect = false;
            return;
        }
    }
    ap->runs[ap->nruns++] = ap->run;
}

static void cow__run_add(struct cow__apply *ap, uint64_t pos, uint32_t a,
                         uint32_t b)
{
    struct cow_merge_conflict *r = &ap->run;

    if (ap->has_run && r->end == pos && r->session_a == a &&
        r->session_b == b) {
        r->end++;
        return;
    }
    if (ap->has_run)
        cow__run_push(ap);
    r->start = pos;
    r->end = pos + 1;
    r->session_a = a;
    r->session_b = b;
    ap->has_run = true;
}

/*
 * Ends the runs of a part of a window that ends at hi: reports those
 * that end before it, keeps those that reach it.
 */
static void cow__runs_close(struct cow__merge *m, struct cow__apply *ap)
{
    uint64_t end = ap->wstart + ap->hi;
    size_t keep = 0, i;

    ap->nruns = cow__runs_compact(ap->runs, ap->nruns);
    qsort(ap->runs, ap->nruns, sizeof(*ap->runs), cow__run_start_cmp);
    for (i = 0; i < ap->nruns; i++) {
        if (ap->runs[i].end == end)
            ap->runs[keep++] = ap->runs[i];
        else
            cow__emit(m, &ap->runs[i]);
    }
    ap->nruns = keep;
    ap->ncarry = keep;
}

/* -- apply pass ------------------------------------------------------ */

/* A conflict at byte at of the window: count, note and resolve it. */
static void cow__conflict(struct cow__merge *m, struct cow__apply *ap,
                          uint32_t at, uint32_t owner, uint32_t tag,
                          unsigned char v)
{
    uint32_t a = m->sessions[owner & COW__SLOT_MASK];
    uint32_t b = m->sessions[tag & COW__SLOT_MASK];
    uint64_t bit = (uint64_t)1 << (at % 64);

    m->conflicted = true;
    if (ap->count && !(ap->hit[at / 64] & bit)) {
        ap->hit[at / 64] |= bit;
        ap->hits = true;
        m->stats->conflict_bytes++;
    }
    if (ap->collect)
        cow__run_add(ap, ap->wstart + at, a < b ? a : b, a < b ? b : a);
    if (m->policy != COW_MERGE_FIRST) {
        ap->val[at] = v;
        ap->owner[at] = tag;
    }
}

/*
 * Applies n bytes d written by tag's slot at offset at of the window.
 * The common case, bytes nobody else owns, is a plain copy.
 */
static void cow__apply_bytes(struct cow__merge *m, struct cow__apply *ap,
                             uint32_t tag, uint32_t at,
                             const unsigned char *d, uint32_t n)
{
    uint32_t *own = ap->owner + at;
    unsigned char *val = ap->val + at;
    uint32_t epoch = ap->epoch;
    uint32_t i = 0, j, k;

    if (ap->single) {
        memcpy(val, d, n);
        return;
    }
    while (i < n) {
        for (j = i; j < n; j++)
            if (own[j] != tag && own[j] >> COW__SLOT_BITS == epoch)
                break;
        memcpy(val + i, d + i, j - i);
        for (k = i; k < j; k++)
            own[k] = tag;
        if (j == n)
            break;
        if (val[j] == d[j])
            own[j] = tag;
        else
            cow__conflict(m, ap, at + j, own[j], tag, d[j]);
        i = j + 1;
    }
}

/* Applies the part [a, b) of the window of a piece whose data is at src. */
static int cow__apply_piece(struct cow__merge *m, struct cow__apply *ap,
                            uint32_t slot, uint32_t a, uint32_t b,
                            uint64_t src)
{
    uint32_t tag = ap->epoch << COW__SLOT_BITS | slot;

    while (a < b) {
        uint32_t step = (uint32_t)cow__min(b - a, ap->reader.cap);
        const unsigned char *p;
        int rc = cow__reader_get(&ap->reader, src, step, &p);

        if (rc != 0)
            return rc < 0 ? rc : -EIO;
        cow__apply_bytes(m, ap, tag, a, p, step);
        a += step;
        src += step;
    }

    return 0;
}

/* Starts a pass with a fresh epoch: every byte is owned by nobody. */
static void cow__next_epoch(struct cow__apply *ap, uint64_t window)
{
    if (++ap->epoch == COW__EPOCHS) {
        memset(ap->owner, 0, window * sizeof(*ap->owner));
        ap->epoch = 1;
    }
}

/*
 * Applies the pieces of region [pos, end) of the spill file that fall in
 * [lo, hi) of the window.  Returns 0, 1 when conflict runs overflowed
 * (and were dropped), or a negative errno.
 */
static int cow__apply_part(struct cow__merge *m, struct cow__apply *ap,
                           uint64_t pos, uint64_t end, uint32_t lo,
                           uint32_t hi)
{
    const unsigned char *p;
    int rc;

    /* Carried runs join this part only if it starts where they end. */
    if (ap->nruns > 0 && ap->runs[0].end != ap->wstart + lo)
        cow__runs_flush(m, ap);
    ap->ncarry = ap->nruns;
    ap->lo = lo;
    ap->hi = hi;
    ap->collect = true;
    ap->has_run = false;
    cow__next_epoch(ap, m->window);

    while (pos < end) {
        uint32_t slot, woff, n, a, b;

        rc = cow__reader_get(&ap->reader, pos, COW__ENTRY_HEAD, &p);
        if (rc != 0)
            return rc < 0 ? rc : -EIO;
        slot = cow__le32(p);
        woff = cow__le32(p + 4);
        n = cow__le32(p + 8);
        pos += COW__ENTRY_HEAD;
        if (slot == 0 || slot > m->nslots || woff > ap->wlen ||
            n > ap->wlen - woff || n > end - pos)
            return -EIO;
        a = woff > lo ? woff : lo;
        b = woff + n < hi ? woff + n : hi;
        if (a < b) {
            rc = cow__apply_piece(m, ap, slot, a, b, pos + (a - woff));
            if (rc < 0)
                return rc;
        }
        pos += n;
    }

    if (ap->has_run)
        cow__run_push(ap);
    if (!ap->collect) {
        ap->nruns = ap->ncarry;
        return 1;
    }
    cow__runs_close(m, ap);

    return 0;
}

/*
 * Applies [lo, hi) of the window again, for its conflict runs only, in
 * halves as long as they overflow.  A single byte that conflicts between
 * more pairs than the array holds loses the runs that do not fit.
 */
static int cow__redo(struct cow__merge *m, struct cow__apply *ap,
                     uint64_t pos, uint64_t end, uint32_t lo, uint32_t hi)
{
    uint32_t mid = lo + (hi - lo) / 2;
    int rc = cow__apply_part(m, ap, pos, end, lo, hi);

    if (rc <= 0)
        return rc;
    if (hi - lo == 1) {
        m->stats->conflicts_truncated = 1;
        return 0;
    }
    rc = cow__redo(m, ap, pos, end, lo, mid);
    if (rc < 0)
        return rc;

    return cow__redo(m, ap, pos, end, mid, hi);
}

/* Whether anything should still be written to the output. */
static bool cow__writing(const struct cow__merge *m)
{
    return !(m->policy == COW_MERGE_FAIL && m->conflicted);
}

/* Copies [start, end) of the base with plain reads and writes. */
static int cow__copy_plain(struct cow__merge *m, uint64_t start, uint64_t end)
{
    unsigned char *buf = m->copier.buf;

    while (start < end) {
        size_t step = (size_t)cow__min(end - start, COW__COPY_BUFFER);
        int64_t got = cow__pread_full(m->base_fd, buf, step, start);
        int rc;

        if (got <= 0)
            return (int)got;
        rc = cow__pwrite_all(m->out_fd, buf, (size_t)got, start);
        if (rc < 0)
            return rc;
        start += (uint64_t)got;
    }

    return 0;
}

/*
 * Copies [start, end) of the base, all of it data, to the same place in
 * the output, in the kernel when it can, which saves moving the bytes
 * through a buffer of ours.
 */
static int cow__copy_data(struct cow__merge *m, uint64_t start, uint64_t end)
{
    while (start < end && !m->copier.no_copy_range) {
        loff_t in = (loff_t)start, out = (loff_t)start;
        ssize_t n = copy_file_range(m->base_fd, &in, m->out_fd, &out,
                                    (size_t)(end - start), 0);

        if (n > 0) {
            start += (uint64_t)n;
            continue;
        }
        if (n == 0)
            return 0;
        if (errno == EINTR)
            continue;
        if (errno != EXDEV && errno != EINVAL && errno != ENOSYS &&
            errno != EOPNOTSUPP)
            return -errno;
        m->copier.no_copy_range = true;
    }

    return cow__copy_plain(m, start, end);
}

/*
 * Finds the first extent of the base's data in [start, end), as
 * [*data, *hole); false when there is none, the rest being a hole.  A
 * file system that cannot tell holes says all of the file is data.
 */
static bool cow__next_data(struct cow__merge *m, uint64_t start,
                           uint64_t end, uint64_t *data, uint64_t *hole)
{
    off_t d, h;

    if (start >= end)
        return false;
    d = lseek(m->base_fd, (off_t)start, SEEK_DATA);
    if (d < 0 && errno == ENXIO)
        return false;
    if (d < 0)
        d = (off_t)start;
    if ((uint64_t)d >= end)
        return false;
    h = lseek(m->base_fd, d, SEEK_HOLE);
    if (h < 0 || (uint64_t)h > end)
        h = (off_t)end;
    *data = (uint64_t)d;
    *hole = (uint64_t)h;

    return true;
}

/*
 * Copies [start, end) of the base to the same place in the output,
 * extent by extent.  The base's holes are skipped, so they stay holes in
 * the output, which starts as one hole of its full size: a sparse base
 * merges into a sparse output.  If the base got shorter meanwhile, the
 * rest stays zero, as the output's size was set before.  Only the copy
 * and cow__preallocate(), never at once, move base_fd's file offset (in
 * cow__next_data()); everything else reads at given offsets.
 */
static int cow__copy(struct cow__merge *m, uint64_t start, uint64_t end)
{
    uint64_t data, hole;

    end = cow__min(end, m->base_size);
    for (; cow__next_data(m, start, end, &data, &hole); start = hole) {
        int rc = cow__copy_data(m, data, hole);

        if (rc < 0)
            return rc;
    }

    return 0;
}

/*
 * Starts writeback of the output that became final since the last time,
 * if that is a step of COW__WRITEBACK_STEP or the output is done, and
 * returns whether it did.  Either thread may, whichever has nothing else
 * to do: it claims the range with the lock held (when the second thread
 * runs), and drops the lock meanwhile.  Only a hint: a file system that
 * refuses it gets the whole output synced by the caller's fsync(2), as
 * it would anyway, and an I/O error shows there too.
 */
static bool cow__write_back(struct cow__merge *m)
{
    struct cow__copier *c = &m->copier;
    uint64_t from = m->written_back, to = c->final;
    int rc;

    if (from == UINT64_MAX || to <= from ||
        (to < from + COW__WRITEBACK_STEP && !c->done))
        return false;
    m->written_back = to;
    if (c->threaded)
        pthread_mutex_unlock(&c->lock);
    rc = sync_file_range(m->out_fd, (off64_t)from, (off64_t)(to - from),
                         SYNC_FILE_RANGE_WRITE);
    if (c->threaded)
        pthread_mutex_lock(&c->lock);
    if (rc != 0)
        m->written_back = UINT64_MAX;

    return true;
}

/* Reads n bytes of the base at start into buf, zeros past its end. */
static int cow__read_base_at(struct cow__merge *m, unsigned char *buf,
                             uint64_t start, size_t n)
{
    uint64_t have = 0;
    int64_t got = 0;

    if (m->base_size > start)
        have = cow__min(n, m->base_size - start);
    if (have > 0)
        got = cow__pread_full(m->base_fd, buf, (size_t)have, start);
    if (got < 0)
        return (int)got;
    memset(buf + got, 0, n - (size_t)got);

    return 0;
}

/* Reads the base's bytes of window w whole into the spare buffer. */
static int cow__read_ahead(struct cow__merge *m, uint64_t w)
{
    uint64_t start = w * m->window;

    return cow__read_base_at(m, m->copier.ahead, start,
                             (size_t)cow__min(m->window, m->out_size - start));
}

/* The second thread: it copies, then reads ahead and writes back. */
static void *cow__copier_main(void *arg)
{
    struct cow__merge *m = arg;
    struct cow__copier *c = &m->copier;
    uint64_t at, stop;
    int rc;

    pthread_mutex_lock(&c->lock);
    at = c->copied;
    while (at < m->base_size && !c->handover && !c->stop) {
        pthread_mutex_unlock(&c->lock);
        stop = cow__min(at + COW__COPY_STEP, m->base_size);
        rc = cow__copy(m, at, stop);
        pthread_mutex_lock(&c->lock);
        if (rc < 0) {
            c->error = rc;
            break;
        }
        c->copied = at = stop;
    }
    c->copying = false;
    pthread_cond_broadcast(&c->moved);

    /*
     * Then it reads windows ahead when asked, first, and writes back
     * what became final, until the output is done.
     */
    while (!c->stop && c->error == 0) {
        if (c->ahead_wanted && !c->ahead_ready) {
            uint64_t w = c->ahead_window;

            pthread_mutex_unlock(&c->lock);
            rc = cow__read_ahead(m, w);
            pthread_mutex_lock(&c->lock);
            c->ahead_error = rc;
            c->ahead_ready = true;
            pthread_cond_broadcast(&c->moved);
        } else if (!cow__write_back(m)) {
            if (c->done)
                break;
            pthread_cond_wait(&c->moved, &c->lock);
        }
    }
    pthread_mutex_unlock(&c->lock);

    return NULL;
}

/*
 * Allocates the output's blocks under the base's data, extent by extent,
 * so that the copy and the windows written need not allocate while the
 * output is being written back, and a disk too full for the output fails
 * the merge before anything is written.  The base's holes stay holes.
 * A file system without fallocate(2) allocates as the output is written.
 */
static int cow__preallocate(struct cow__merge *m)
{
    uint64_t start = 0, data, hole;

    for (; cow__next_data(m, start, m->base_size, &data, &hole); start = hole)
        while (fallocate(m->out_fd, 0, (off_t)data, (off_t)(hole - data)) < 0) {
            if (errno == EOPNOTSUPP || errno == ENOSYS)
                return 0;
            if (errno != EINTR)
                return -errno;
        }

    return 0;
}

/*
 * Gives the output its size and starts the second thread, which copies
 * the base into it unless the output could be cloned from the base.
 * Called once the scan found every log sound, so nothing is written to
 * the output of a merge that is refused.  The thread runs with every
 * signal blocked: they are the caller's to handle.
 */
static int cow__copy_start(struct cow__merge *m)
{
    struct cow__copier *c = &m->copier;
    pthread_attr_t attr;
    sigset_t all, saved;

    if (m->base_size > 0 && ioctl(m->out_fd, FICLONE, m->base_fd) == 0) {
        m->stats->cloned = 1;
        c->copied = m->base_size;
    } else if (ftruncate(m->out_fd, 0) < 0) {
        return -errno;
    }
    if (ftruncate(m->out_fd, (off_t)m->out_size) < 0)
        return -errno;
    if (!m->stats->cloned) {
        int rc = cow__preallocate(m);

        if (rc < 0)
            return rc;
    }

    c->buf = cow__alloc(&m->mem, COW__COPY_BUFFER);
    if (c->buf == NULL)
        return -ENOMEM;
    if (pthread_mutex_init(&c->lock, NULL) != 0)
        return 0;
    if (pthread_cond_init(&c->moved, NULL) != 0) {
        pthread_mutex_destroy(&c->lock);
        return 0;
    }
    c->copying = true;
    sigfillset(&all);
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, COW__COPY_STACK);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    c->threaded = pthread_create(&c->thread, &attr, cow__copier_main, m) == 0;
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    pthread_attr_destroy(&attr);
    if (!c->threaded) {
        c->copying = false;
        pthread_cond_destroy(&c->moved);
        pthread_mutex_destroy(&c->lock);
    }

    return 0;
}

/*
 * Takes the copy over from the second thread, once its current step is
 * done: from here on the apply pass copies, and only what no piece
 * covers, so the bytes it writes over are never copied first.
 */
static int cow__copy_handover(struct cow__merge *m)
{
    struct cow__copier *c = &m->copier;
    int rc;

    if (!c->threaded)
        return 0;
    pthread_mutex_lock(&c->lock);
    c->handover = true;
    while (c->copying)
        pthread_cond_wait(&c->moved, &c->lock);
    rc = c->error;
    pthread_mutex_unlock(&c->lock);

    return rc;
}

/*
 * Says that the output below end is final, for writeback to start on,
 * or that all of it is when last is set.
 */
static void cow__finished(struct cow__merge *m, uint64_t end, bool last)
{
    struct cow__copier *c = &m->copier;

    if (!cow__writing(m) || !m->write_back)
        return;
    if (!c->threaded) {
        c->final = end;
        c->done = last;
        cow__write_back(m);
        return;
    }
    pthread_mutex_lock(&c->lock);
    c->final = end;
    c->done = last;
    pthread_cond_broadcast(&c->moved);
    pthread_mutex_unlock(&c->lock);
}

/*
 * Waits for the second thread to end: at once if the merge failed,
 * after its last writeback otherwise.
 */
static void cow__copy_finish(struct cow__merge *m, bool failed)
{
    struct cow__copier *c = &m->copier;

    if (c->threaded) {
        pthread_mutex_lock(&c->lock);
        c->done = true;
        c->stop = c->stop || failed || !cow__writing(m);
        pthread_cond_broadcast(&c->moved);
        pthread_mutex_unlock(&c->lock);
        pthread_join(c->thread, NULL);
        pthread_cond_destroy(&c->moved);
        pthread_mutex_destroy(&c->lock);
        c->threaded = false;
    }
    cow__free(&m->mem, c->buf, COW__COPY_BUFFER);
    c->buf = NULL;
    cow__free(&m->mem, c->ahead, m->window);
    c->ahead = NULL;
}

/*
 * Copies the base below end into the output, from where the copy is:
 * the apply pass calls this, in window order, once the second thread has
 * handed the copy over, so the copy never lands on bytes the merge wrote.
 */
static int cow__await_copy(struct cow__merge *m, uint64_t end)
{
    struct cow__copier *c = &m->copier;
    uint64_t stop;
    int rc = 0;

    end = cow__min(end, m->base_size);
    while (c->copied < end && rc == 0) {
        stop = cow__min(c->copied + COW__COPY_STEP, end);
        rc = cow__copy(m, c->copied, stop);
        c->copied = stop;
    }

    return rc;
}

static bool cow__marked(const struct cow__apply *ap, uint32_t b)
{
    return ap->blocks[b / 64] & (uint64_t)1 << (b % 64);
}

static size_t cow__block_words(uint64_t window)
{
    uint64_t block = cow__min(window, COW__BLOCK);

    return (size_t)((window + block - 1) / block + 63) / 64;
}

/*
 * Marks the blocks that the pieces of region [pos, end) of the spill
 * file touch, and learns whether they are all from one slot.  Only the
 * pieces' headers are read, and the region is usually still in the
 * buffer when it is applied next.
 */
static int cow__plan_window(struct cow__apply *ap, uint64_t pos,
                            uint64_t end)
{
    const unsigned char *p;
    uint32_t first = 0, woff, n, b;
    int rc;

    ap->single = true;
    while (pos < end) {
        rc = cow__reader_get(&ap->reader, pos, COW__ENTRY_HEAD, &p);
        if (rc != 0)
            return rc < 0 ? rc : -EIO;
        if (first == 0)
            first = cow__le32(p);
        ap->single = ap->single && cow__le32(p) == first;
        woff = cow__le32(p + 4);
        n = cow__le32(p + 8);
        pos += COW__ENTRY_HEAD;
        if (n == 0 || woff > ap->wlen || n > ap->wlen - woff ||
            n > end - pos)
            return -EIO;
        for (b = woff / ap->block; b <= (woff + n - 1) / ap->block; b++)
            ap->blocks[b / 64] |= (uint64_t)1 << (b % 64);
        pos += n;
    }

    return 0;
}

/*
 * Finds the run of blocks from block b that are all marked or all not,
 * as the byte range [*from, *to) of the window; returns whether marked.
 */
static bool cow__block_run(const struct cow__apply *ap, uint32_t b,
                           uint32_t *from, uint32_t *to)
{
    uint32_t nblocks = (ap->wlen + ap->block - 1) / ap->block;
    bool marked = cow__marked(ap, b);
    uint32_t next = b + 1;

    while (next < nblocks && cow__marked(ap, next) == marked)
        next++;
    *from = b * ap->block;
    *to = (uint32_t)cow__min((uint64_t)next * ap->block, ap->wlen);

    return marked;
}

/*
 * Marks the untouched blocks of every gap of at most COW__GAP bytes
 * between two runs of touched ones, so that they are read and written
 * with their neighbours.  They hold the base's bytes either way.
 */
static void cow__fill_gaps(struct cow__apply *ap)
{
    uint32_t from, to = 0, b;

    while (to < ap->wlen) {
        if (cow__block_run(ap, to / ap->block, &from, &to) || from == 0 ||
            to == ap->wlen || to - from > COW__GAP)
            continue;
        for (b = from / ap->block; b < to / ap->block; b++)
            ap->blocks[b / 64] |= (uint64_t)1 << (b % 64);
    }
}

/*
 * Copies the base's bytes of the window's blocks that are not marked,
 * where the copy has not been yet: the marked ones are written whole
 * from the window's buffer.
 */
static int cow__copy_gaps(struct cow__merge *m, struct cow__apply *ap)
{
    struct cow__copier *c = &m->copier;
    uint64_t end = cow__min(ap->wstart + ap->wlen, m->base_size);
    uint32_t from, to = 0;
    int rc;

    if (c->copied >= end)
        return 0;
    while (to < ap->wlen) {
        uint64_t a, b;

        if (cow__block_run(ap, to / ap->block, &from, &to))
            continue;
        a = ap->wstart + from;
        b = ap->wstart + to;
        rc = cow__copy(m, a > c->copied ? a : c->copied, b);
        if (rc < 0)
            return rc;
    }
    c->copied = end;

    return 0;
}

/* Reads [from, to) of the window from the base, zeros past its end. */
static int cow__read_span(struct cow__merge *m, struct cow__apply *ap,
                          uint32_t from, uint32_t to)
{
    return cow__read_base_at(m, ap->val + from, ap->wstart + from, to - from);
}

/*
 * Whether window w has pieces enough that most of its blocks are likely
 * to be read: it is then worth reading whole, ahead.
 */
static bool cow__dense(const struct cow__merge *m, uint64_t w)
{
    uint64_t len = cow__min(m->window, m->out_size - w * m->window);

    return (m->counts[w + 1] - m->counts[w]) * COW__DENSE >= len;
}

/*
 * Asks the second thread to read ahead the first window with pieces from
 * window from on, if that one is dense; windows with no pieces between
 * are passed over.
 */
static void cow__ask_ahead(struct cow__merge *m, uint64_t from)
{
    struct cow__copier *c = &m->copier;
    uint64_t w = from;

    if (!c->threaded || c->ahead == NULL)
        return;
    while (w < m->nwin && m->counts[w + 1] == m->counts[w])
        w++;
    if (w == m->nwin || !cow__dense(m, w))
        return;
    pthread_mutex_lock(&c->lock);
    c->ahead_window = w;
    c->ahead_wanted = true;
    c->ahead_ready = false;
    pthread_cond_broadcast(&c->moved);
    pthread_mutex_unlock(&c->lock);
}

/*
 * Takes the base's bytes of window w from the second thread if it was
 * asked for them, waiting for it if need be, and asks for the next
 * window.  Returns 1 when the window's buffer holds them, 0 when it
 * does not, or a negative errno.
 */
static int cow__take_ahead(struct cow__merge *m, struct cow__apply *ap,
                           uint64_t w)
{
    struct cow__copier *c = &m->copier;
    unsigned char *mine = ap->val;
    int rc = 0;

    if (!c->threaded || c->ahead == NULL)
        return 0;
    pthread_mutex_lock(&c->lock);
    if (c->ahead_wanted) {
        /* Rather than wait, start writeback in the thread's stead. */
        while (!c->ahead_ready)
            if (!cow__write_back(m))
                pthread_cond_wait(&c->moved, &c->lock);
        if (c->ahead_window == w) {
            rc = c->ahead_error < 0 ? c->ahead_error : 1;
            ap->val = c->ahead;
            c->ahead = mine;
        }
        c->ahead_wanted = false;
    }
    pthread_mutex_unlock(&c->lock);
    if (rc >= 0)
        cow__ask_ahead(m, w + 1);

    return rc;
}

/* Reads the base's bytes of the marked blocks into the window buffer. */
static int cow__read_base(struct cow__merge *m, struct cow__apply *ap)
{
    uint32_t from, to = 0;
    int rc;

    while (to < ap->wlen) {
        if (!cow__block_run(ap, to / ap->block, &from, &to))
            continue;
        rc = cow__read_span(m, ap, from, to);
        if (rc < 0)
            return rc;
    }

    return 0;
}

/*
 * Writes the marked blocks of the window from the buffer, over the copy
 * of the base if the second thread made it already.
 */
static int cow__write_window(struct cow__merge *m, struct cow__apply *ap)
{
    uint32_t from, to = 0;
    int rc;

    if (!cow__writing(m))
        return 0;
    while (to < ap->wlen) {
        if (!cow__block_run(ap, to / ap->block, &from, &to))
            continue;
        rc = cow__pwrite_all(m->out_fd, ap->val + from, to - from,
                             ap->wstart + from);
        if (rc < 0)
            return rc;
    }

    return 0;
}

/* Applies window w, whose region of the spill file is [pos, end). */
static int cow__apply_window(struct cow__merge *m, struct cow__apply *ap,
                             uint64_t w, uint64_t pos, uint64_t end)
{
    int ahead, rc;

    ap->wstart = w * m->window;
    ap->wlen = (uint32_t)cow__min(m->window, m->out_size - ap->wstart);
    ap->count = true;
    /* The region is read several times: keep it in the buffer if it fits. */
    ap->reader.keep = pos;
    ahead = cow__take_ahead(m, ap, w);
    rc = ahead < 0 ? ahead : cow__plan_window(ap, pos, end);
    cow__fill_gaps(ap);
    if (rc == 0 && cow__writing(m))
        rc = cow__copy_gaps(m, ap);
    if (rc == 0 && ahead == 0)
        rc = cow__read_base(m, ap);
    if (rc == 0)
        rc = cow__apply_part(m, ap, pos, end, 0, ap->wlen);
    if (rc >= 0) {
        int wr = cow__write_window(m, ap);

        rc = wr < 0 ? wr : rc;
    }

    ap->count = false;
    if (rc == 1)
        rc = cow__redo(m, ap, pos, end, 0, ap->wlen);
    memset(ap->blocks, 0, cow__block_words(m->window) * sizeof(uint64_t));
    if (ap->hits) {
        memset(ap->hit, 0, (m->window + 63) / 64 * sizeof(*ap->hit));
        ap->hits = false;
    }
    m->stats->windows_touched++;

    return rc;
}

/*
 * Region of window w in the spill file, once its group is sorted by
 * window; its pieces are in commit order there.
 */
static void cow__region(const struct cow__merge *m, uint64_t w,
                        uint64_t *pos, uint64_t *end)
{
    *pos = m->counts[w];
    *end = m->counts[w + 1];
}

/*
 * Makes the buffer over the spill file hold the group of window w,
 * sorted by window: its region is read whole, its pieces moved to their
 * windows' regions in the order they come, so each window's pieces stay
 * in commit order.  A group of one window is in that order already, and
 * is read as it is applied.
 */
static int cow__load_group(struct cow__merge *m, struct cow__apply *ap,
                           uint64_t w)
{
    uint64_t g = m->group_of[w];
    uint64_t first = m->groups[g].first;
    uint64_t nw = m->groups[g + 1].first - first;
    uint64_t start = m->counts[first];
    size_t len = (size_t)(m->counts[first + nw] - start);
    size_t pos = 0;
    uint64_t i;
    int64_t got;

    if (g == ap->loaded || nw == 1)
        return 0;
    /* Cut so; anything else means the counters were overwritten. */
    if (len > ap->reader.cap || nw > COW__GROUP_WINDOWS)
        return -EIO;
    got = cow__pread_full(m->spill_fd, ap->unsorted, len, start);
    if (got < 0)
        return (int)got;
    if ((size_t)got != len)
        return -EIO;
    for (i = 0; i < nw; i++)
        ap->cursors[i] = (uint32_t)(m->counts[first + i] - start);

    while (pos < len) {
        const unsigned char *p = ap->unsorted + pos;
        uint32_t in, to;
        size_t size;

        if (len - pos < COW__ENTRY_HEAD)
            return -EIO;
        size = COW__ENTRY_HEAD + (size_t)cow__le32(p + 8);
        in = cow__le32(p + 12);
        if (in >= nw || size > len - pos)
            return -EIO;
        to = ap->cursors[in];
        if (to + size > m->counts[first + in + 1] - start)
            return -EIO;
        memcpy(ap->reader.buf + to, p, size);
        ap->cursors[in] = (uint32_t)(to + size);
        pos += size;
    }
    /* The buffer now holds the group as if read so from the file. */
    ap->reader.base = start;
    ap->reader.len = len;
    ap->loaded = g;

    return 0;
}

/*
 * Deals with windows [w, *next) that have no pieces, which need only the
 * copy of the base to pass them.
 */
static int cow__skip_empty(struct cow__merge *m, uint64_t w, uint64_t *next)
{
    uint64_t start = w * m->window, end = start, pos, stop;

    do {
        end += m->window;
        w++;
        if (w == m->nwin)
            break;
        cow__region(m, w, &pos, &stop);
    } while (pos == stop && end - start < COW__COPY_STEP);
    *next = w;
    end = cow__min(end, m->out_size);

    if (!cow__writing(m))
        return 0;

    return cow__await_copy(m, end);
}

static int cow__apply_init(struct cow__merge *m, struct cow__apply *ap)
{
    memset(ap, 0, sizeof(*ap));
    ap->loaded = m->ngroups;
    ap->unsorted = cow__alloc(&m->mem, COW__APPLY_BUFFER);
    ap->cursors = cow__alloc(&m->mem, COW__GROUP_WINDOWS * sizeof(uint32_t));
    ap->val = cow__alloc(&m->mem, m->window);
    if (m->copier.threaded) {
        m->copier.ahead = cow__alloc(&m->mem, m->window);
        if (m->copier.ahead == NULL)
            return -ENOMEM;
    }
    ap->owner = cow__zalloc(&m->mem, m->window * sizeof(*ap->owner));
    ap->hit = cow__zalloc(&m->mem, (m->window + 63) / 64 * 8);
    ap->runs = cow__alloc(&m->mem, COW__RUNS * sizeof(*ap->runs));
    ap->blocks = cow__zalloc(&m->mem, cow__block_words(m->window) * 8);
    ap->block = (uint32_t)cow__min(m->window, COW__BLOCK);
    if (ap->unsorted == NULL || ap->cursors == NULL || ap->val == NULL ||
        ap->owner == NULL || ap->hit == NULL || ap->runs == NULL ||
        ap->blocks == NULL)
        return -ENOMEM;

    return cow__reader_init(&ap->reader, &m->mem, m->spill_fd,
                            COW__APPLY_BUFFER, m->spill_size);
}

static void cow__apply_free(struct cow__merge *m, struct cow__apply *ap)
{
    cow__free(&m->mem, ap->unsorted, COW__APPLY_BUFFER);
    cow__free(&m->mem, ap->cursors, COW__GROUP_WINDOWS * sizeof(uint32_t));
    cow__free(&m->mem, ap->val, m->window);
    cow__free(&m->mem, ap->owner, m->window * sizeof(*ap->owner));
    cow__free(&m->mem, ap->hit, (m->window + 63) / 64 * 8);
    cow__free(&m->mem, ap->runs, COW__RUNS * sizeof(*ap->runs));
    cow__free(&m->mem, ap->blocks, cow__block_words(m->window) * 8);
    cow__reader_free(&ap->reader, &m->mem);
}

static int cow__apply_all(struct cow__merge *m, struct cow__apply *ap)
{
    uint64_t w = 0, next, pos, end;
    int rc;

    while (w < m->nwin) {
        cow__region(m, w, &pos, &end);
        if (pos == end) {
            rc = cow__skip_empty(m, w, &next);
        } else {
            rc = cow__load_group(m, ap, w);
            if (rc == 0)
                rc = cow__apply_window(m, ap, w, pos, end);
            next = w + 1;
        }
        if (rc < 0)
            return rc;
        w = next;
        cow__finished(m, cow__min(w * m->window, m->out_size), false);
        rc = cow__tick(m, cow__min(w * m->window, m->out_size));
        if (rc < 0)
            return rc;
    }
    cow__runs_flush(m, ap);
    cow__finished(m, m->out_size, true);

    return 0;
}

static int cow__apply(struct cow__merge *m)
{
    struct cow__apply ap;
    int rc;

    rc = cow__copy_handover(m);
    if (rc == 0)
        rc = cow__phase(m, COW_MERGE_APPLY, m->out_size);
    if (rc < 0)
        return rc;
    rc = cow__apply_init(m, &ap);
    if (rc == 0) {
        cow__ask_ahead(m, 0);
        rc = cow__apply_all(m, &ap);
    }
    cow__apply_free(m, &ap);

    return rc;
}

/* -- set-up ---------------------------------------------------------- */

struct cow__by_session {
    uint32_t session;
    uint32_t index;
};

static int cow__session_cmp(const void *a, const void *b)
{
    const struct cow__by_session *x = a, *y = b;

    if (x->session != y->session)
        return x->session < y->session ? -1 : 1;

    return (x->index > y->index) - (x->index < y->index);
}

/* Numbers the distinct sessions from 1, in m->sessions and each slot. */
static int cow__number_sessions(struct cow__merge *m)
{
    size_t size = m->nlogs * sizeof(struct cow__by_session);
    struct cow__by_session *v = cow__alloc(&m->mem, size);
    size_t k;

    m->sessions = cow__alloc(&m->mem, (m->nlogs + 1) * sizeof(uint32_t));
    if (v == NULL || m->sessions == NULL) {
        cow__free(&m->mem, v, size);
        return -ENOMEM;
    }
    for (k = 0; k < m->nlogs; k++) {
        v[k].session = m->logs[k].in->session;
        v[k].index = (uint32_t)k;
    }
    qsort(v, m->nlogs, sizeof(*v), cow__session_cmp);

    m->nslots = 0;
    for (k = 0; k < m->nlogs; k++) {
        if (k == 0 || v[k].session != v[k - 1].session)
            m->sessions[++m->nslots] = v[k].session;
        m->logs[v[k].index].slot = (uint32_t)m->nslots;
    }
    cow__free(&m->mem, v, size);

    return m->nslots > COW_MERGE_MAX_SESSIONS ? -EINVAL : 0;
}

/* Checks the inputs and learns the sizes of the files. */
static int cow__setup(struct cow__merge *m, struct cow_merge_log *logs)
{
    struct stat st;
    size_t k;

    if (fstat(m->base_fd, &st) < 0)
        return -errno;
    m->base_size = (uint64_t)st.st_size;
    m->out_size = m->base_size;

    m->logs = cow__zalloc(&m->mem, m->nlogs * sizeof(*m->logs));
    if (m->logs == NULL)
        return -ENOMEM;
    for (k = 0; k < m->nlogs; k++) {
        struct cow__log *lg = &m->logs[k];

        lg->in = &logs[k];
        lg->in->last_seq = lg->in->min_seq;
        lg->in->applied_end = lg->in->data_start;
        lg->in->batches = 0;
        lg->in->records = 0;
        lg->in->pending_bytes = 0;
        if (fstat(lg->in->fd, &st) < 0)
            return -errno;
        if (lg->in->data_start > (uint64_t)st.st_size)
            return -EINVAL;
        lg->size = (uint64_t)st.st_size;
    }

    return cow__number_sessions(m);
}

static int cow__run(struct cow__merge *m, struct cow_merge_log *logs)
{
    int rc = cow__setup(m, logs);

    if (rc == 0)
        rc = cow__scan(m);
    if (rc == 0)
        rc = cow__copy_start(m);
    if (rc == 0)
        rc = cow__spill(m);
    if (rc == 0)
        rc = cow__apply(m);
    cow__copy_finish(m, rc != 0);
    if (rc == 0 && m->policy == COW_MERGE_FAIL && m->conflicted)
        rc = -EDEADLK;

    return rc;
}

COW__MERGE_EXPORT
int cow_merge(struct cow_merge_log *logs, size_t nlogs, int base_fd,
              int out_fd, int spill_fd, int policy, unsigned flags,
              uint64_t window,
              struct cow_merge_conflict *conflicts, size_t max_conflicts,
              struct cow_merge_stats *stats,
              struct cow_merge_progress *progress)
{
    struct cow_merge_stats scratch;
    struct cow__merge m;
    int rc;

    if (stats == NULL)
        stats = &scratch;
    memset(stats, 0, sizeof(*stats));
    stats->corrupt_log = -1;
    if (window == 0)
        window = COW_MERGE_DEFAULT_WINDOW;
    if ((logs == NULL && nlogs > 0) || base_fd < 0 || out_fd < 0 ||
        spill_fd < 0 || policy < COW_MERGE_FAIL ||
        policy > COW_MERGE_FIRST || (flags & ~COW_MERGE_WRITE_BACK) != 0 ||
        window > COW_MERGE_MAX_WINDOW ||
        (conflicts == NULL && max_conflicts > 0) || nlogs > INT32_MAX)
        return -EINVAL;

    memset(&m, 0, sizeof(m));
    m.nlogs = nlogs;
    m.base_fd = base_fd;
    m.out_fd = out_fd;
    m.spill_fd = spill_fd;
    m.policy = policy;
    m.write_back = (flags & COW_MERGE_WRITE_BACK) != 0;
    m.window = window;
    m.conflicts = conflicts;
    m.max_conflicts = max_conflicts;
    m.stats = stats;
    m.progress = progress;

    rc = cow__run(&m, logs);

    cow__free(&m.mem, m.counts, m.ncounts * sizeof(uint64_t));
    cow__free(&m.mem, m.groups, (m.ngroups + 1) * sizeof(*m.groups));
    cow__free(&m.mem, m.group_of, m.nwin * sizeof(uint64_t));
    cow__free(&m.mem, m.sessions, (m.nlogs + 1) * sizeof(uint32_t));
    cow__free(&m.mem, m.logs, m.nlogs * sizeof(*m.logs));
    stats->peak_buffer_bytes = m.mem.peak;

    return rc;
}
