/*
 * mappings.c: the table of managed mappings and of their base files, and
 * the commit-time diff that turns dirty pages into records.
 *
 * The mapping table is a fixed array so that the SIGSEGV handler can
 * search it without allocating.  Each entry owns a byte of state per page
 * (see the COW__ states) and, once one of its pages has been committed, a
 * pointer per page to a snapshot of the page as last committed: the diff
 * of the next commit compares against the snapshot, or against the base
 * file when there is none.  Both arrays come from raw anonymous mappings,
 * never from the handler.
 *
 * The table spinlock guards every field the handler uses.  Entries are
 * added and removed only with cow__mutex held as well, so code holding
 * cow__mutex may read an entry's fixed fields without the spinlock.  The
 * handler (and cow__prefault, which does its work) only ever makes pages
 * DIRTY; a page leaves DIRTY, and its snapshot is freed, only under
 * cow__mutex.  So a page a cow__mutex holder sees DIRTY stays DIRTY, with
 * the same snapshot, until that holder changes it; other page states read
 * without the spinlock are a hint, checked again under it.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "cow_internal.h"

struct cow__mapping cow__mappings[COW__MAX_MAPPINGS];
struct cow__base cow__bases[COW__MAX_BASES];
size_t cow__page;

/* Entries in use: lets calls about memory that is not managed skip all. */
static _Atomic size_t cow__nmapped;

/* One past the highest entry in use: bounds the handler's search. */
static size_t cow__high;

/*
 * The lowest start and highest end of the managed mappings.  Written
 * under the spinlock, read without it by cow__range_managed as a cheap
 * first filter: a mapping is added to the span before its address is
 * returned to the program, so no call about it can miss it; a stale
 * span that is too wide only costs the precise check.
 */
static _Atomic uintptr_t cow__span_lo = UINTPTR_MAX;
static _Atomic uintptr_t cow__span_hi;

static atomic_flag cow__spin = ATOMIC_FLAG_INIT;

/* Spins before yielding the CPU to a lock holder that was preempted. */
#define COW__SPINS_BEFORE_YIELD 1000

void cow__spin_lock(void)
{
    unsigned spins = 0;

    while (atomic_flag_test_and_set_explicit(&cow__spin,
                                             memory_order_acquire)) {
        if (++spins < COW__SPINS_BEFORE_YIELD) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            continue;
        }
        spins = 0;
        syscall(SYS_sched_yield);
    }
}

void cow__spin_unlock(void)
{
    atomic_flag_clear_explicit(&cow__spin, memory_order_release);
}

/*
 * Takes the spinlock from normal context.  Every signal is blocked first:
 * a handler run on this thread while it holds the lock would spin on it
 * forever.
 */
void cow__table_lock(sigset_t *saved)
{
    sigset_t all;

    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, saved);
    cow__spin_lock();
}

void cow__table_unlock(const sigset_t *saved)
{
    cow__spin_unlock();
    pthread_sigmask(SIG_SETMASK, saved, NULL);
}

static size_t cow__round_page(size_t n)
{
    return (n + cow__page - 1) & ~(cow__page - 1);
}

/* An anonymous read-write array of n bytes, zeroed, or NULL. */
static void *cow__array_new(size_t n)
{
    void *p = cow__sys_mmap(NULL, cow__round_page(n),
                            PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    return p == MAP_FAILED ? NULL : p;
}

static void cow__array_free(void *p, size_t n)
{
    if (p != NULL)
        cow__sys_munmap(p, cow__round_page(n));
}

/*
 * Finds the live page that holds addr.  The caller holds the spinlock.
 * GONE pages are skipped, so that an entry keeping a hole punched by a
 * partial munmap never shadows a newer mapping placed in that hole.
 */
int cow__find_page(uintptr_t addr, struct cow__mapping **mp, size_t *page)
{
    size_t k;

    for (k = 0; k < cow__high; k++) {
        struct cow__mapping *m = &cow__mappings[k];
        size_t i;

        if (!m->used || addr < m->start)
            continue;
        i = (addr - m->start) / cow__page;
        if (i >= m->npages || cow__state(m, i) == COW__GONE)
            continue;
        *mp = m;
        *page = i;
        return 0;
    }

    return -ENOENT;
}

/* The path fd was opened by, as the kernel knows it now, or NULL. */
static char *cow__fd_path(int fd)
{
    char link[64];
    char path[PATH_MAX];
    ssize_t n;

    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof(path));
    if (n < 0 || (size_t)n >= sizeof(path))
        return NULL;
    path[n] = '\0';

    return strdup(path);
}

/*
 * Returns libcow's descriptor of base k, opening the file again by its
 * path if the program closed the one libcow had (the path must still
 * name the same file), or -EBADF.  Under cow__mutex.
 */
int cow__base_fd(int k)
{
    struct cow__base *b = &cow__bases[k];
    sigset_t saved;
    int fd;

    if (cow__fd_is(b->fd, b->dev, b->ino))
        return b->fd;
    if (b->path == NULL)
        return -EBADF;
    fd = open(b->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -EBADF;
    if (!cow__fd_is(fd, b->dev, b->ino)) {
        close(fd);
        return -EBADF;
    }

    /* The handler reads the descriptor to learn the file's size. */
    cow__table_lock(&saved);
    b->fd = fd;
    cow__table_unlock(&saved);
    cow__debug("opened %s again", b->path);

    return fd;
}

/*
 * Returns the index of the base entry for the file fd refers to, adding
 * one (with a close-on-exec duplicate of fd, so the program may close its
 * own) if there is none; or a negative errno.
 */
int cow__base_get(int fd, const struct stat *st)
{
    int free_slot = -1;
    int k;
    int dup;

    for (k = 0; k < COW__MAX_BASES; k++) {
        struct cow__base *b = &cow__bases[k];

        if (!b->used) {
            if (free_slot < 0)
                free_slot = k;
            continue;
        }
        if (b->dev == st->st_dev && b->ino == st->st_ino)
            return k;
    }
    if (free_slot < 0)
        return -ENOMEM;

    dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup < 0)
        return -errno;
    memset(&cow__bases[free_slot], 0, sizeof(cow__bases[free_slot]));
    cow__bases[free_slot].path = cow__fd_path(dup);
    cow__bases[free_slot].used = true;
    cow__bases[free_slot].dev = st->st_dev;
    cow__bases[free_slot].ino = st->st_ino;
    cow__bases[free_slot].fd = dup;
    cow__bases[free_slot].batch.tail_end = UINT64_MAX;
    cow__bases[free_slot].writes.tail_end = UINT64_MAX;

    return free_slot;
}

/*
 * Forgets a base file once nothing refers to it: no mapping and no record
 * still waiting to reach cowd.  Records that failed to reach cowd keep
 * the base alive until a later commit delivers them.
 */
void cow__base_maybe_drop(int k)
{
    struct cow__base *b = &cow__bases[k];

    if (!b->used || b->nmappings > 0 || b->batch.nrecords > 0 ||
        b->writes.nrecords > 0)
        return;
    if (cow__fd_is(b->fd, b->dev, b->ino))
        close(b->fd);
    free(b->path);
    b->path = NULL;
    cow__batch_free(&b->batch);
    cow__batch_free(&b->writes);
    b->used = false;
}

/* Adds a mapping entry; returns its index or a negative errno. */
int cow__mapping_add(uintptr_t start, size_t length, uint64_t offset,
                     int prot, int base, bool api)
{
    size_t npages = cow__round_page(length) / cow__page;
    _Atomic unsigned char *state = cow__array_new(npages);
    sigset_t saved;
    size_t k;

    if (state == NULL)
        return -ENOMEM;
    memset((void *)state,
           COW__CLEAN | (prot & COW__PROT_MASK) << COW__PROT_SHIFT, npages);

    cow__table_lock(&saved);
    for (k = 0; k < COW__MAX_MAPPINGS; k++)
        if (!cow__mappings[k].used)
            break;
    if (k == COW__MAX_MAPPINGS) {
        cow__table_unlock(&saved);
        cow__array_free((void *)state, npages);
        return -ENOMEM;
    }
    cow__mappings[k] = (struct cow__mapping){
        .start = start,
        .length = length,
        .npages = npages,
        .live = npages,
        .offset = offset,
        .base = base,
        .used = true,
        .api = api,
        .state = state,
        .snap = NULL,
    };
    if (k >= cow__high)
        cow__high = k + 1;
    if (start < atomic_load(&cow__span_lo))
        atomic_store(&cow__span_lo, start);
    if (start + npages * cow__page > atomic_load(&cow__span_hi))
        atomic_store(&cow__span_hi, start + npages * cow__page);
    atomic_fetch_add(&cow__nmapped, 1);
    cow__table_unlock(&saved);

    cow__bases[base].nmappings++;
    cow__bases[base].map_offset = offset;
    cow__bases[base].map_length = length;

    return (int)k;
}

/* The entry whose mapping starts at start, or -ENOENT.  Under cow__mutex. */
int cow__mapping_at(uintptr_t start)
{
    size_t k;

    for (k = 0; k < cow__high; k++)
        if (cow__mappings[k].used && cow__mappings[k].start == start)
            return (int)k;

    return -ENOENT;
}

/*
 * Whether [start, start + length) touches a live page of m; the pages of
 * m it touches are [*first, *last).  A hole that a partial munmap left in
 * m does not count.
 */
static bool cow__overlaps(const struct cow__mapping *m, uintptr_t start,
                          size_t length, size_t *first, size_t *last)
{
    uintptr_t end = m->start + m->npages * cow__page;
    uintptr_t stop = start + length < start ? UINTPTR_MAX : start + length;
    size_t i;

    if (!m->used || start >= end || stop <= m->start)
        return false;
    *first = start > m->start ? (start - m->start) / cow__page : 0;
    *last = stop < end ? cow__round_page(stop - m->start) / cow__page
                       : m->npages;
    for (i = *first; i < *last; i++)
        if (cow__state(m, i) != COW__GONE)
            return true;

    return false;
}

/*
 * Tells whether [start, start + length) touches a managed mapping.  Cheap
 * when nothing is managed, which is the common case for the munmap and
 * mmap calls of programs that map no managed file.
 */
bool cow__range_managed(uintptr_t start, size_t length)
{
    uintptr_t end = start + length < start ? UINTPTR_MAX : start + length;
    sigset_t saved;
    bool found = false;
    size_t first;
    size_t last;
    size_t k;

    if (atomic_load(&cow__nmapped) == 0 || length == 0 ||
        start >= atomic_load_explicit(&cow__span_hi, memory_order_relaxed) ||
        end <= atomic_load_explicit(&cow__span_lo, memory_order_relaxed))
        return false;
    cow__table_lock(&saved);
    for (k = 0; k < cow__high && !found; k++)
        found = cow__overlaps(&cow__mappings[k], start, length, &first,
                              &last);
    cow__table_unlock(&saved);

    return found;
}

/* Lists the distinct bases of the mappings a range touches. */
int cow__range_bases(uintptr_t start, size_t length, int *bases, int max)
{
    size_t first;
    size_t last;
    int n = 0;
    int j;
    size_t k;

    for (k = 0; k < cow__high; k++) {
        const struct cow__mapping *m = &cow__mappings[k];

        if (!cow__overlaps(m, start, length, &first, &last))
            continue;
        for (j = 0; j < n; j++)
            if (bases[j] == m->base)
                break;
        if (j == n && n < max)
            bases[n++] = m->base;
    }

    return n;
}

/* Recomputes the span of the live entries.  Under the spinlock. */
static void cow__span_update(void)
{
    uintptr_t lo = UINTPTR_MAX;
    uintptr_t hi = 0;
    size_t k;

    for (k = 0; k < cow__high; k++) {
        const struct cow__mapping *m = &cow__mappings[k];

        if (!m->used)
            continue;
        if (m->start < lo)
            lo = m->start;
        if (m->start + m->npages * cow__page > hi)
            hi = m->start + m->npages * cow__page;
    }
    atomic_store(&cow__span_lo, lo);
    atomic_store(&cow__span_hi, hi);
}

/* Frees what a mapping entry owns once the table no longer shows it. */
static void cow__mapping_release(struct cow__mapping *m)
{
    size_t i;

    if (m->snap != NULL) {
        for (i = 0; i < m->npages; i++)
            if (m->snap[i] != NULL)
                cow__sys_munmap(m->snap[i], cow__page);
        cow__array_free(m->snap, m->npages * sizeof(void *));
    }
    cow__array_free((void *)m->state, m->npages);
    cow__bases[m->base].nmappings--;
    cow__base_maybe_drop(m->base);
    memset(m, 0, sizeof(*m));
}

/*
 * Marks the pages of [start, start + length) GONE, once the program has
 * unmapped them, and drops the entries left without live pages.  Under
 * cow__mutex, which also keeps a dropped entry (unused, but still holding
 * its arrays) from being reused before it is released here.
 */
void cow__range_gone(uintptr_t start, size_t length)
{
    size_t high = cow__high;
    sigset_t saved;
    size_t k;
    size_t i;

    cow__table_lock(&saved);
    for (k = 0; k < high; k++) {
        struct cow__mapping *m = &cow__mappings[k];
        size_t first;
        size_t last;

        if (!cow__overlaps(m, start, length, &first, &last))
            continue;
        for (i = first; i < last; i++) {
            if (cow__state(m, i) == COW__GONE)
                continue;
            cow__set_state(m, i, COW__GONE);
            m->live--;
        }
        if (m->live == 0) {
            m->used = false;
            atomic_fetch_sub(&cow__nmapped, 1);
        }
    }
    while (cow__high > 0 && !cow__mappings[cow__high - 1].used)
        cow__high--;
    cow__span_update();
    cow__table_unlock(&saved);

    /*
     * The handler ignores GONE pages and unused entries, and only
     * cow__mutex holders free snapshots, so no lock is needed from here.
     */
    for (k = 0; k < high; k++) {
        struct cow__mapping *m = &cow__mappings[k];

        if (m->state == NULL)
            continue;
        if (!m->used) {
            cow__mapping_release(m);
            continue;
        }
        for (i = 0; m->snap != NULL && i < m->npages; i++) {
            if (m->snap[i] != NULL && cow__state(m, i) == COW__GONE) {
                cow__sys_munmap(m->snap[i], cow__page);
                m->snap[i] = NULL;
            }
        }
    }
}

/*
 * The entry with a live page at addr, and that page in *page; or NULL,
 * and in *next where the next managed page may be: the page after addr
 * when addr is in a hole of an entry, else the lowest entry start above
 * addr (UINTPTR_MAX if none).  Spinlock held.
 */
static struct cow__mapping *cow__entry_at(uintptr_t addr, size_t *page,
                                          uintptr_t *next)
{
    size_t k;

    *next = UINTPTR_MAX;
    for (k = 0; k < cow__high; k++) {
        struct cow__mapping *m = &cow__mappings[k];
        size_t i;

        if (!m->used)
            continue;
        if (addr >= m->start && addr - m->start < m->npages * cow__page) {
            i = (addr - m->start) / cow__page;
            if (cow__state(m, i) != COW__GONE) {
                *page = i;
                return m;
            }
            if (addr + cow__page < *next)
                *next = addr + cow__page;
        } else if (m->start > addr && m->start < *next) {
            *next = m->start;
        }
    }

    return NULL;
}

/* Records prot as the program's protection of the range's live pages. */
static void cow__range_set_prot(uintptr_t start, size_t length, int prot)
{
    size_t first;
    size_t last;
    size_t k;
    size_t i;

    for (k = 0; k < cow__high; k++) {
        struct cow__mapping *m = &cow__mappings[k];

        if (!cow__overlaps(m, start, length, &first, &last))
            continue;
        for (i = first; i < last; i++)
            if (cow__state(m, i) != COW__GONE)
                cow__set_page(m, i, cow__state(m, i), prot);
    }
}

/*
 * Changes the protection of [start, start + length) as mprotect(2) would,
 * without ever making a managed page that is not private writable: its
 * write access would reach the base file.  Such pages get prot without
 * PROT_WRITE and remember that the program may write them, so that a
 * write makes them private as usual; the other pages (not managed, or
 * managed and dirty) get prot.  The range is changed in runs of pages that
 * get the same protection, in address order, so no page is ever left
 * more restricted than the program asked for.  A managed page the program
 * makes read-only is no longer the handler's to open: writing it crashes,
 * as it would without libcow.  Under cow__mutex; returns like mprotect.
 */
int cow__range_protect(uintptr_t start, size_t length, int prot)
{
    uintptr_t end = start + cow__round_page(length);
    uintptr_t run = start;
    uintptr_t p = start;
    int run_prot = -1;
    sigset_t saved;
    int saved_errno;
    int rc = 0;

    if ((start & (cow__page - 1)) != 0 || end < start)
        return cow__sys_mprotect((void *)start, length, prot);

    cow__table_lock(&saved);
    if (!(prot & PROT_WRITE)) {
        rc = cow__sys_mprotect((void *)start, length, prot);
        if (rc == 0)
            cow__range_set_prot(start, length, prot);
        p = end;
    }
    while (rc == 0 && p < end) {
        uintptr_t next;
        uintptr_t step;
        size_t i;
        struct cow__mapping *m = cow__entry_at(p, &i, &next);
        int want = prot;

        if (m == NULL) {
            step = next < end ? next : end;
        } else {
            cow__set_page(m, i, cow__state(m, i), prot);
            if (cow__state(m, i) != COW__DIRTY)
                want = prot & ~PROT_WRITE;
            step = p + cow__page;
        }
        if (want != run_prot) {
            if (run_prot >= 0)
                rc = cow__sys_mprotect((void *)run, p - run, run_prot);
            run = p;
            run_prot = want;
        }
        p = step;
    }
    if (rc == 0 && run_prot >= 0)
        rc = cow__sys_mprotect((void *)run, end - run, run_prot);
    saved_errno = errno;
    cow__table_unlock(&saved);
    errno = saved_errno;

    return rc;
}

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

/* Reads n bytes of the base at off; zeroes what lies past its end. */
static int cow__read_base(int fd, unsigned char *dst, size_t n, uint64_t off)
{
    size_t got = 0;

    while (got < n) {
        ssize_t r = pread(fd, dst + got, n - got, (off_t)(off + got));

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
 * Commits one dirty page i of m into b's batch: write-protects it, then
 * diffs it.  The page must be read-only before it is read: a store that
 * landed after the diff read its byte, while the page was still writable,
 * would be neither recorded nor seen by the next diff, whose reference is
 * taken from this very page.  limit is how many of the page's bytes lie
 * inside the file.  Called with signals blocked.
 *
 * When the page cannot be write-protected (mprotect needs a kernel
 * mapping slot to split a merged range, and vm.max_map_count may be
 * reached), the page stays writable and is diffed through a copy that
 * becomes its new reference: a store racing with the copy is either in
 * the copy, and recorded now, or not, and then differs from the copy at
 * the next commit.  Returns 0 or -ENOMEM.
 */
static int cow__commit_page(struct cow__base *b, struct cow__mapping *m,
                            size_t i, const unsigned char *ref,
                            size_t limit)
{
    unsigned char *page = (unsigned char *)(m->start + i * cow__page);
    uint64_t off = m->offset + i * cow__page;
    unsigned char *copy = NULL;
    void *old;

    cow__spin_lock();
    if (cow__state(m, i) != COW__DIRTY) {
        cow__spin_unlock();
        return 0;
    }
    if (cow__sys_mprotect(page, cow__page,
                          cow__page_prot(m, i) & ~PROT_WRITE) != 0) {
        copy = cow__sys_mmap(NULL, cow__page, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (copy == MAP_FAILED) {
            cow__spin_unlock();
            return -ENOMEM;
        }
        memcpy(copy, page, cow__page);
    }
    if (limit > 0)
        cow__diff(&b->batch, off, copy != NULL ? copy : page, ref, limit);
    old = m->snap[i];
    m->snap[i] = copy;
    if (copy == NULL)
        cow__set_state(m, i, COW__COMMITTED);
    cow__spin_unlock();

    if (old != NULL)
        cow__sys_munmap(old, cow__page);

    return 0;
}

/* Commits every dirty page of m into b's batch.  Signals are blocked. */
static int cow__collect_mapping(struct cow__base *b, struct cow__mapping *m,
                                uint64_t size, unsigned char *ref,
                                size_t writes_from, size_t writes_to)
{
    void *snap;
    size_t i;
    int rc;

    for (i = 0; i < m->npages; i++) {
        uint64_t off = m->offset + i * cow__page;
        size_t limit = 0;

        if (cow__state(m, i) != COW__DIRTY)
            continue;
        if (m->snap == NULL) {
            void **array = cow__array_new(m->npages * sizeof(void *));

            if (array == NULL)
                return -ENOMEM;
            cow__spin_lock();
            m->snap = array;
            cow__spin_unlock();
        }
        if (off < size)
            limit = size - off < cow__page ? size - off : cow__page;

        /*
         * A dirty page's snapshot never changes and only cow__mutex
         * holders free it, so once its address is read (under the
         * spinlock, which orders it after the handler's store) it can be
         * copied without the lock.
         */
        cow__spin_lock();
        snap = m->snap[i];
        cow__spin_unlock();
        if (snap != NULL) {
            memcpy(ref, snap, cow__page);
        } else {
            rc = cow__read_base(b->fd, ref, limit, off);
            if (rc != 0)
                return rc;
        }
        cow__patch_ref(ref, off, limit, &b->batch, writes_from, writes_to);
        if (cow__buf_reserve(&b->batch.buf,
                             limit + (limit / 2 + 1) * COW__RECORD_HEADER))
            return -ENOMEM;
        rc = cow__commit_page(b, m, i, ref, limit);
        if (rc != 0)
            return rc;
    }

    return 0;
}

/*
 * Collects into base k's batch, after whatever an earlier failed commit
 * left there, the bytes cow_write() recorded and then the runs in which
 * every dirty page of the base's mappings differs from its reference, and
 * makes those pages COMMITTED.  Bytes past the end of the file are never
 * recorded.  Under cow__mutex.  Returns 0 or a negative errno; on error
 * the pages not yet collected stay dirty for the next commit.
 */
int cow__collect(int k)
{
    struct cow__base *b = &cow__bases[k];
    unsigned char *ref;
    struct stat st;
    sigset_t all;
    sigset_t saved;
    size_t writes_from = b->batch.buf.len;
    size_t writes_to;
    size_t j;
    int rc = 0;

    if (cow__base_fd(k) < 0 || fstat(b->fd, &st) != 0)
        return -EBADF;
    rc = cow__batch_move(&b->batch, &b->writes);
    if (rc != 0)
        return rc;
    writes_to = b->batch.buf.len;
    ref = malloc(cow__page);
    if (ref == NULL)
        return -ENOMEM;

    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    for (j = 0; j < cow__high && rc == 0; j++) {
        struct cow__mapping *m = &cow__mappings[j];

        if (m->used && m->base == k)
            rc = cow__collect_mapping(b, m, (uint64_t)st.st_size, ref,
                                      writes_from, writes_to);
    }
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    free(ref);

    return rc;
}

/*
 * In a forked child, with the spinlock held and signals blocked: the
 * pages the parent had dirtied become the child's starting point.  They
 * turn COMMITTED without being recorded (the parent commits them in its
 * own session), so the child's first write to one snapshots it and the
 * child's log holds only what the child changed.
 */
void cow__after_fork_baseline(void)
{
    size_t k;
    size_t i;

    for (k = 0; k < cow__high; k++) {
        struct cow__mapping *m = &cow__mappings[k];

        if (!m->used)
            continue;
        if (m->snap == NULL)
            m->snap = cow__array_new(m->npages * sizeof(void *));
        for (i = 0; i < m->npages; i++) {
            void *page = (void *)(m->start + i * cow__page);

            if (cow__state(m, i) != COW__DIRTY ||
                cow__sys_mprotect(page, cow__page,
                                  cow__page_prot(m, i) & ~PROT_WRITE) != 0)
                continue;
            cow__set_state(m, i, COW__COMMITTED);
            if (m->snap != NULL && m->snap[i] != NULL) {
                cow__sys_munmap(m->snap[i], cow__page);
                m->snap[i] = NULL;
            }
        }
    }
}
