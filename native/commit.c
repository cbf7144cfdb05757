/*
 * commit.c: batches of records, and the commit-time diff that turns the
 * written pages of a base file's mappings into records.
 *
 * A written page is compared with its reference, which is what the log
 * says the page holds: the bytes the page held at its last commit, or
 * the base file's where it was never committed, patched with the bytes
 * cow_write() recorded in the same batch.  The runs that differ are
 * recorded, and nothing else: a byte that did not change since it was
 * last committed is never recorded again, since merges judge conflicts
 * by who wrote a byte last.
 *
 * A remap mapping keeps the bytes of its last commit as a snapshot of
 * the page, taken when the page is written again.  A uffd mapping gets
 * no signal at that write, and it exists for mappings with too many
 * written pages to keep a page of memory each, so it keeps a delta per
 * committed page instead: the runs where the page differs from the base
 * file, packed one after the other in a buffer of the mapping.  A byte
 * changed, committed, then set back to its base value differs from its
 * delta, and is recorded.
 */
#include <errno.h>
#include <string.h>

#include "cow_internal.h"

/*
 * Regions one PAGEMAP_SCAN call may report before the next call; the
 * vector lives on the stack, which may be a signal handler's (a commit
 * made by _exit called there).
 */
#define COW__SCAN_REGIONS 64

void cow__batch_clear(struct cow__batch *b)
{
    b->buf.len = 0;
    b->buf.err = 0;
    b->nrecords = 0;
    b->tail = 0;
    b->tail_end = UINT64_MAX;
}

void cow__batch_free(struct cow__batch *b)
{
    cow__buf_free(&b->buf);
    cow__batch_clear(b);
}

void cow__batch_record(const struct cow__batch *b, size_t pos,
                       uint64_t *offset, uint32_t *len)
{
    memcpy(offset, b->buf.data + pos, sizeof(*offset));
    memcpy(len, b->buf.data + pos + sizeof(*offset), sizeof(*len));
}

/* Appends one record; the caller has checked len <= COW__RECORD_MAX. */
static void cow__batch_put(struct cow__batch *b, uint64_t offset,
                           const void *p, uint32_t len)
{
    b->tail = b->buf.len;
    cow__buf_put(&b->buf, &offset, sizeof(offset));
    cow__buf_put(&b->buf, &len, sizeof(len));
    cow__buf_put(&b->buf, p, len);
    b->nrecords++;
}

/*
 * Appends bytes written explicitly, as records of at most
 * COW__RECORD_MAX bytes.  Returns 0 or -ENOMEM (and then adds nothing).
 */
int cow__batch_add(struct cow__batch *b, uint64_t offset, const void *p,
                   size_t len)
{
    size_t pieces = len / COW__RECORD_MAX + 1;
    const unsigned char *src = p;

    if (pieces > SIZE_MAX / COW__RECORD_HEADER ||
        cow__buf_reserve(&b->buf, len + pieces * COW__RECORD_HEADER) != 0)
        return -ENOMEM;
    while (len > 0) {
        uint32_t n = len < COW__RECORD_MAX ? (uint32_t)len
                                           : COW__RECORD_MAX;

        cow__batch_put(b, offset, src, n);
        offset += n;
        src += n;
        len -= n;
    }
    b->tail_end = UINT64_MAX;

    return 0;
}

/*
 * Appends a run found by the diff, extending the previous record when the
 * run continues it (a write that crosses a page boundary stays one
 * record).  The caller reserved room, so this never allocates.
 */
static void cow__batch_run(struct cow__batch *b, uint64_t offset,
                           const unsigned char *p, size_t len)
{
    uint64_t at;
    uint32_t n;

    if (b->tail_end == offset && b->nrecords > 0) {
        cow__batch_record(b, b->tail, &at, &n);
        if ((size_t)n + len <= COW__RECORD_MAX) {
            n += (uint32_t)len;
            memcpy(b->buf.data + b->tail + sizeof(at), &n, sizeof(n));
            cow__buf_put(&b->buf, p, len);
            b->tail_end = offset + len;
            return;
        }
    }
    cow__batch_put(b, offset, p, (uint32_t)len);
    b->tail_end = offset + len;
}

/* Moves the records of src to the end of dst, in order. */
static int cow__batch_move(struct cow__batch *dst, struct cow__batch *src)
{
    if (src->nrecords == 0)
        return 0;
    if (cow__buf_reserve(&dst->buf, src->buf.len) != 0)
        return -ENOMEM;
    cow__buf_put(&dst->buf, src->buf.data, src->buf.len);
    dst->nrecords += src->nrecords;
    dst->tail_end = UINT64_MAX;
    cow__batch_clear(src);

    return 0;
}

/*
 * Reads n bytes of the base at off; zeroes what lies past its end.  The
 * system call is made directly: libcow's own pread wrapper would look at
 * the table.
 */
static int cow__read_base(int fd, unsigned char *dst, size_t n, uint64_t off)
{
    size_t got = 0;

    while (got < n) {
        ssize_t r = syscall(SYS_pread64, fd, dst + got, n - got,
                            (off_t)(off + got));

        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            break;
        got += (size_t)r;
    }
    memset(dst + got, 0, n - got);

    return 0;
}

/*
 * Applies to ref, the reference image of the n bytes at file offset off,
 * the bytes cow_write() recorded in this batch (the records between
 * buffer positions from and to), so that the diff does not record them a
 * second time.
 */
static void cow__patch_ref(unsigned char *ref, uint64_t off, size_t n,
                           const struct cow__batch *b, size_t from,
                           size_t to)
{
    size_t pos = from;

    while (pos < to) {
        uint64_t at;
        uint32_t len;
        uint64_t lo;
        uint64_t hi;

        cow__batch_record(b, pos, &at, &len);
        lo = at > off ? at : off;
        hi = at + len < off + n ? at + len : off + n;
        if (lo < hi)
            memcpy(ref + (lo - off),
                   b->buf.data + pos + COW__RECORD_HEADER + (lo - at),
                   hi - lo);
        pos += COW__RECORD_HEADER + len;
    }
}

/* Appends the runs of now that differ from ref. */
static void cow__diff(struct cow__batch *b, uint64_t off,
                      const unsigned char *now, const unsigned char *ref,
                      size_t n)
{
    size_t i = 0;
    size_t j;

    if (memcmp(now, ref, n) == 0)
        return;
    while (i < n) {
        if (now[i] == ref[i]) {
            i++;
            continue;
        }
        for (j = i + 1; j < n && now[j] != ref[j]; j++)
            ;
        cow__batch_run(b, off + i, now + i, j - i);
        i = j;
    }
}

/*
 * Deltas.  A delta is a sequence of runs, each a header of two 32-bit
 * words (offset in the page, length) followed by the run's bytes, ended
 * by a header of length 0.  Deltas are only ever appended to the buffer;
 * one replaced is left behind until there is more dead space than live,
 * when the live ones are copied into a new buffer.  The buffer's memory
 * comes from mmap (see struct cow__buf), so the switch to uffd may make
 * deltas from the signal handler.
 */
struct cow__run_head {
    uint32_t at;
    uint32_t len;
};

/* Dead space tolerated in a delta buffer before it is compacted. */
#define COW__DELTA_SLACK (1u << 20)

/* The size of the delta at buffer position pos. */
static size_t cow__delta_size(const struct cow__buf *b, size_t pos)
{
    struct cow__run_head h;
    size_t start = pos;

    do {
        memcpy(&h, b->data + pos, sizeof(h));
        pos += sizeof(h) + h.len;
    } while (h.len != 0);

    return pos - start;
}

/* Frees what the delta store of m holds. */
void cow__delta_forget(struct cow__mapping *m)
{
    cow__array_free(m->delta_at, m->npages * sizeof(*m->delta_at));
    m->delta_at = NULL;
    cow__buf_free(&m->deltas);
    m->delta_live = 0;
}

/* Copies the live deltas of m into a new buffer.  Returns 0 or -ENOMEM. */
static int cow__delta_compact(struct cow__mapping *m)
{
    struct cow__buf fresh = { 0 };
    size_t i;

    if (cow__buf_reserve(&fresh, m->delta_live + 1) != 0)
        return -ENOMEM;
    for (i = 0; i < m->npages; i++) {
        size_t pos;
        size_t size;

        if (m->delta_at[i] == 0)
            continue;
        pos = m->delta_at[i] - 1;
        size = cow__delta_size(&m->deltas, pos);
        m->delta_at[i] = fresh.len + 1;
        cow__buf_put(&fresh, m->deltas.data + pos, size);
    }
    cow__buf_free(&m->deltas);
    m->deltas = fresh;

    return 0;
}

/* Appends the runs where now differs from base (n bytes) as a delta. */
static void cow__delta_put(struct cow__buf *b, const unsigned char *now,
                           const unsigned char *base, size_t n)
{
    struct cow__run_head h = { 0, 0 };
    size_t x = 0;
    size_t e;

    while (x < n) {
        if (now[x] == base[x]) {
            x++;
            continue;
        }
        for (e = x + 1; e < n && now[e] != base[e]; e++)
            ;
        h.at = (uint32_t)x;
        h.len = (uint32_t)(e - x);
        cow__buf_put(b, &h, sizeof(h));
        cow__buf_put(b, now + x, e - x);
        x = e;
    }
    h.at = 0;
    h.len = 0;
    cow__buf_put(b, &h, sizeof(h));
}

/*
 * Makes the delta of page i of uffd mapping m say that the log's view of
 * its n first bytes is now (whose base bytes are base).  Returns 0, or
 * -ENOMEM with the page's delta dropped: its reference is then the base,
 * and its next commit may record again bytes that did not change, but
 * loses none.
 */
int cow__delta_store(struct cow__mapping *m, size_t i,
                     const unsigned char *now, const unsigned char *base,
                     size_t n)
{
    size_t pos;

    if (m->delta_at != NULL && m->delta_at[i] != 0) {
        m->delta_live -= cow__delta_size(&m->deltas, m->delta_at[i] - 1);
        m->delta_at[i] = 0;
    }
    if (memcmp(now, base, n) == 0)
        return 0;
    if (m->delta_at == NULL) {
        m->delta_at = cow__array_new(m->npages * sizeof(*m->delta_at));
        if (m->delta_at == NULL)
            return -ENOMEM;
    }
    if (m->deltas.len > 2 * m->delta_live + COW__DELTA_SLACK &&
        cow__delta_compact(m) != 0)
        return -ENOMEM;
    pos = m->deltas.len;
    cow__delta_put(&m->deltas, now, base, n);
    if (m->deltas.err != 0) {
        m->deltas.len = pos;
        m->deltas.err = 0;
        return -ENOMEM;
    }
    m->delta_at[i] = pos + 1;
    m->delta_live += m->deltas.len - pos;

    return 0;
}

/* Applies the delta of page i of m, if any, to ref (n bytes). */
static void cow__delta_apply(const struct cow__mapping *m, size_t i,
                             unsigned char *ref, size_t n)
{
    struct cow__run_head h;
    size_t pos;

    if (m->delta_at == NULL || m->delta_at[i] == 0)
        return;
    pos = m->delta_at[i] - 1;
    for (;;) {
        memcpy(&h, m->deltas.data + pos, sizeof(h));
        pos += sizeof(h);
        if (h.len == 0)
            return;
        if (h.at < n)
            memcpy(ref + h.at, m->deltas.data + pos,
                   h.len < n - h.at ? h.len : n - h.at);
        pos += h.len;
    }
}

/*
 * Gives page j of d the delta of page i of m (mremap moved the page).
 * Returns 0 or -ENOMEM.
 */
int cow__delta_copy(const struct cow__mapping *m, size_t i,
                    struct cow__mapping *d, size_t j)
{
    size_t pos;
    size_t size;

    if (m->delta_at == NULL || m->delta_at[i] == 0)
        return 0;
    if (d->delta_at == NULL) {
        d->delta_at = cow__array_new(d->npages * sizeof(*d->delta_at));
        if (d->delta_at == NULL)
            return -ENOMEM;
    }
    pos = m->delta_at[i] - 1;
    size = cow__delta_size(&m->deltas, pos);
    d->delta_at[j] = d->deltas.len + 1;
    cow__buf_put(&d->deltas, m->deltas.data + pos, size);
    if (d->deltas.err != 0) {
        d->delta_at[j] = 0;
        return -ENOMEM;
    }
    d->delta_live += size;

    return 0;
}

/* Room the diff of one page may need in a batch, at worst. */
static int cow__reserve_page(struct cow__batch *b, size_t limit)
{
    return cow__buf_reserve(&b->buf,
                            limit + (limit / 2 + 1) * COW__RECORD_HEADER);
}

/*
 * What one collection works with: the base file, the batch, where this
 * batch's cow_write() records lie in it, and three pages of scratch
 * memory (the page as read, its reference, the base).
 */
struct cow__collector {
    struct cow__base *b;
    uint64_t size;
    size_t writes_from;
    size_t writes_to;
    bool final;
    unsigned char *now;
    unsigned char *ref;
    unsigned char *base;
};

/* How many bytes of the page at file offset off lie inside the file. */
static size_t cow__limit(const struct cow__collector *c, uint64_t off)
{
    if (off >= c->size)
        return 0;

    return c->size - off < cow__page ? c->size - off : cow__page;
}

/*
 * Write-protects dirty page i of remap mapping m; under the pteditor
 * engine its entry, through cowd, since the file mapping is read-only
 * already and mprotect would change nothing.
 */
static int cow__write_protect(struct cow__mapping *m, size_t i, void *page)
{
    if (cow__pte_on)
        return cow__pte_swap(page, page, false);

    return cow__sys_mprotect(page, cow__page,
                             cow__page_prot(m, i) & ~PROT_WRITE);
}

/*
 * Commits one dirty page i of remap mapping m: write-protects it, then
 * diffs it.  The page must be read-only before it is read: a store that
 * landed after the diff read its byte, while the page was still writable,
 * would be neither recorded nor seen by the next diff, whose reference is
 * taken from this very page.  Called with signals blocked.
 *
 * When the page cannot be write-protected (mprotect needs a kernel
 * mapping slot to split a merged range, and vm.max_map_count may be
 * reached), the page stays writable and is diffed through a copy that
 * becomes its new reference: a store racing with the copy is either in
 * the copy, and recorded now, or not, and then differs from the copy at
 * the next commit.  Returns 0 or -ENOMEM.
 */
static int cow__commit_page(struct cow__collector *c, struct cow__mapping *m,
                            size_t i, size_t limit)
{
    unsigned char *page = (unsigned char *)(m->start + i * cow__page);
    uint64_t off = m->offset + i * cow__page;
    unsigned char *copy = NULL;
    void *old;

    cow__spin_lock();
    if (cow__state(m, i) != COW__DIRTY || m->engine != COW__ENGINE_REMAP) {
        cow__spin_unlock();
        return 0;
    }
    if (cow__write_protect(m, i, page) != 0) {
        copy = cow__sys_mmap(NULL, cow__page, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (copy == MAP_FAILED) {
            cow__spin_unlock();
            return -ENOMEM;
        }
        memcpy(copy, page, cow__page);
    }
    if (limit > 0)
        cow__diff(&c->b->batch, off, copy != NULL ? copy : page, c->ref,
                  limit);
    old = m->snap[i];
    m->snap[i] = copy;
    if (copy == NULL)
        cow__set_state(m, i, COW__COMMITTED);
    if (old != NULL && copy == NULL) {
        m->nprivate--;
        atomic_fetch_sub(&cow__remap_maps, 1);
    } else if (old == NULL && copy != NULL) {
        m->nprivate++;
        atomic_fetch_add(&cow__remap_maps, 1);
    }
    cow__spin_unlock();

    if (old != NULL)
        cow__sys_munmap(old, cow__page);

    return 0;
}

/*
 * Gives remap mapping m its array of snapshot pointers if it has none.
 * Returns 0, or -ENOMEM.  Signals are blocked.
 */
static int cow__snap_array(struct cow__mapping *m)
{
    void **array;

    if (m->snap != NULL)
        return 0;
    array = cow__array_new(m->npages * sizeof(void *));
    if (array == NULL)
        return -ENOMEM;
    cow__spin_lock();
    if (m->snap == NULL && m->engine == COW__ENGINE_REMAP) {
        m->snap = array;
        array = NULL;
    }
    cow__spin_unlock();
    cow__array_free(array, m->npages * sizeof(void *));

    return 0;
}

/*
 * Commits every dirty page of remap mapping m.  Signals are blocked.
 * Another thread's handler may switch m to the uffd engine meanwhile:
 * its pages then turn CLEAN, which the checks under the spinlock see,
 * and the caller collects m again as a uffd mapping.
 */
static int cow__collect_remap(struct cow__collector *c,
                              struct cow__mapping *m)
{
    void *snap;
    size_t i;
    int rc;

    rc = cow__snap_array(m);
    if (rc != 0)
        return rc;
    for (i = 0; i < m->npages; i++) {
        uint64_t off = m->offset + i * cow__page;
        size_t limit = cow__limit(c, off);

        if (cow__state(m, i) != COW__DIRTY)
            continue;

        /*
         * A dirty page's snapshot never changes and only cow__mutex
         * holders free it (a switch to uffd hands the snapshots to them
         * too), so once its address is read (under the spinlock, which
         * orders it after the handler's store) it can be copied without
         * the lock.
         */
        cow__spin_lock();
        snap = m->snap != NULL && cow__state(m, i) == COW__DIRTY
                   ? m->snap[i]
                   : NULL;
        cow__spin_unlock();
        if (snap != NULL) {
            memcpy(c->ref, snap, cow__page);
        } else {
            rc = cow__read_base(c->b->fd, c->ref, limit, off);
            if (rc != 0)
                return rc;
        }
        cow__patch_ref(c->ref, off, limit, &c->b->batch, c->writes_from,
                       c->writes_to);
        if (cow__reserve_page(&c->b->batch, limit) != 0)
            return -ENOMEM;
        rc = cow__commit_page(c, m, i, limit);
        if (rc != 0)
            return rc;
    }

    return 0;
}

/*
 * Commits page i of uffd mapping m, which the scan reported written and
 * write-protected again.  The page is read once, into c->now: the diff
 * and the new reference must agree even if another thread writes to it
 * meanwhile (that write is reported by the next scan).  Signals are
 * blocked.
 */
static int cow__commit_uffd_page(struct cow__collector *c,
                                 struct cow__mapping *m, size_t i)
{
    uint64_t off = m->offset + i * cow__page;
    size_t limit = cow__limit(c, off);
    void *snap = m->snap != NULL ? m->snap[i] : NULL;
    int rc;

    if (limit == 0)
        return 0;
    memcpy(c->now, (void *)(m->start + i * cow__page), cow__page);
    rc = cow__read_base(c->b->fd, c->base, limit, off);
    if (rc != 0)
        return rc;
    if (snap != NULL) {
        memcpy(c->ref, snap, limit);
    } else {
        memcpy(c->ref, c->base, limit);
        cow__delta_apply(m, i, c->ref, limit);
    }
    cow__patch_ref(c->ref, off, limit, &c->b->batch, c->writes_from,
                   c->writes_to);
    if (cow__reserve_page(&c->b->batch, limit) != 0)
        return -ENOMEM;
    cow__diff(&c->b->batch, off, c->now, c->ref, limit);
    if (c->final)
        return 0;
    if (snap != NULL) {
        memcpy(snap, c->now, cow__page);
        return 0;
    }
    cow__delta_store(m, i, c->now, c->base, limit);

    return 0;
}

/*
 * Commits the pages of uffd mapping m written since the last commit.
 * Live pages are scanned in runs, since a hole a partial munmap left may
 * hold another mapping.  The scan write-protects each page it reports
 * before the page is read, so a store that lands after the read marks
 * the page written again for the next commit.  Signals are blocked.
 */
static int cow__collect_uffd(struct cow__collector *c,
                             struct cow__mapping *m)
{
    struct cow__region vec[COW__SCAN_REGIONS];
    size_t a = 0;
    size_t e;

    /* A forked child that has not written to m has nothing to commit. */
    if (m->child_pending)
        return 0;
    while (a < m->npages) {
        uintptr_t from;
        uintptr_t end;

        if (cow__state(m, a) == COW__GONE) {
            a++;
            continue;
        }
        for (e = a; e < m->npages && cow__state(m, e) != COW__GONE; e++)
            ;
        from = m->start + a * cow__page;
        end = m->start + e * cow__page;
        while (from < end) {
            long n = cow__uffd_scan(&from, end, true, vec,
                                    COW__SCAN_REGIONS);
            long r;

            if (n < 0)
                return (int)n;
            for (r = 0; r < n; r++) {
                uintptr_t p;

                for (p = vec[r].start; p < vec[r].end; p += cow__page) {
                    int rc = cow__commit_uffd_page(
                        c, m, (p - m->start) / cow__page);

                    if (rc != 0)
                        return rc;
                }
            }
        }
        a = e;
    }

    return 0;
}

/* m's engine, which a handler may switch at any time.  Signals blocked. */
static unsigned cow__engine(struct cow__mapping *m)
{
    unsigned engine;

    cow__spin_lock();
    engine = m->engine;
    cow__spin_unlock();

    return engine;
}

/*
 * Collects into base k's batch, after whatever an earlier failed commit
 * left there, the bytes cow_write() recorded and then the runs in which
 * every written page of the base's mappings differs from its reference,
 * and write-protects those pages again.  Bytes past the end of the file
 * are never recorded.  final says no commit will follow (the process is
 * ending), so no reference needs keeping.  Under cow__mutex.  Returns 0
 * or a negative errno; on error the pages not yet collected stay written
 * for the next commit.
 */
int cow__collect(int k, bool final)
{
    struct cow__collector c = { .b = &cow__bases[k], .final = final };
    unsigned char *scratch;
    struct stat st;
    sigset_t all;
    sigset_t saved;
    size_t j;
    int rc;

    if (cow__base_fd(k) < 0 || fstat(c.b->fd, &st) != 0)
        return -EBADF;
    for (j = 0; j < cow__high; j++)
        if (cow__mappings[j].used && cow__mappings[j].base == k)
            cow__drop_old_snaps(&cow__mappings[j]);
    c.size = (uint64_t)st.st_size;
    c.writes_from = c.b->batch.buf.len;
    rc = cow__batch_move(&c.b->batch, &c.b->writes);
    if (rc != 0)
        return rc;
    c.writes_to = c.b->batch.buf.len;
    scratch = cow__array_new(3 * cow__page);
    if (scratch == NULL)
        return -ENOMEM;
    c.now = scratch;
    c.ref = scratch + cow__page;
    c.base = scratch + 2 * cow__page;

    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    for (j = 0; j < cow__high && rc == 0; j++) {
        struct cow__mapping *m = &cow__mappings[j];

        if (!m->used || m->base != k)
            continue;
        if (cow__engine(m) == COW__ENGINE_REMAP)
            rc = cow__collect_remap(&c, m);
        if (rc == 0 && cow__engine(m) == COW__ENGINE_UFFD)
            rc = cow__collect_uffd(&c, m);
    }
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    cow__array_free(scratch, 3 * cow__page);

    return rc;
}
