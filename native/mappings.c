/*
 * mappings.c: the table of managed mappings and of their base files.
 *
 * The mapping table is a fixed array so that the SIGSEGV handler can
 * search it without allocating.  Each entry owns a byte of state per page
 * (see the COW__ states) and, once one of its pages has been committed, a
 * pointer per page to a snapshot of the page as last committed: the diff
 * of the next commit (commit.c) compares against the snapshot, or against
 * the base file when there is none.  Both arrays come from raw anonymous
 * mappings, never from malloc.
 *
 * The table spinlock guards every field the handler uses.  Entries are
 * added and removed only with cow__mutex held as well, so code holding
 * cow__mutex may read an entry's fixed fields without the spinlock.  The
 * handler (and cow__prefault, which does its work) only ever makes pages
 * DIRTY, or switches a whole mapping to the uffd engine; a page leaves
 * DIRTY, and its snapshot is freed, only under cow__mutex.  So a page a
 * cow__mutex holder sees DIRTY stays DIRTY, with the same snapshot, until
 * that holder changes it; other page states read without the spinlock
 * are a hint, checked again under it.
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

/* One past the highest entry in use: bounds the handler's search. */
size_t cow__high;

_Atomic size_t cow__remap_maps;
size_t cow__switch_at = SIZE_MAX;
size_t cow__max_map_count;

/* Entries in use: lets calls about memory that is not managed skip all. */
static _Atomic size_t cow__nmapped;

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

/*
 * Takes the spinlock, unless this thread holds it for a fork.  The first
 * holder in a forked child resets the table the child inherited (see
 * process.c), before anything reads it.
 */
void cow__spin_lock(void)
{
    unsigned spins = 0;

    while (!cow__fork_hold &&
           atomic_flag_test_and_set_explicit(&cow__spin,
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
    if (cow__table_forked()) {
        cow__after_fork_baseline();
        cow__table_adopted();
    }
}

void cow__spin_unlock(void)
{
    if (!cow__fork_hold)
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

size_t cow__round_page(size_t n)
{
    return (n + cow__page - 1) & ~(cow__page - 1);
}

/*
 * An anonymous read-write array of n bytes, zeroed, or NULL.  Memory is
 * committed only where it is written, so large sparse arrays are cheap.
 */
void *cow__array_new(size_t n)
{
    void *p = cow__sys_mmap(NULL, cow__round_page(n),
                            PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
                            0);

    return p == MAP_FAILED ? NULL : p;
}

void cow__array_free(void *p, size_t n)
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

/* Takes a free entry and makes it visible.  Spinlock held. */
static int cow__entry_put(const struct cow__mapping *init)
{
    size_t k;

    for (k = 0; k < COW__MAX_MAPPINGS; k++)
        if (!cow__mappings[k].used && cow__mappings[k].state == NULL)
            break;
    if (k == COW__MAX_MAPPINGS)
        return -ENOMEM;
    cow__mappings[k] = *init;
    if (k >= cow__high)
        cow__high = k + 1;
    if (init->start < atomic_load(&cow__span_lo))
        atomic_store(&cow__span_lo, init->start);
    if (init->start + init->npages * cow__page > atomic_load(&cow__span_hi))
        atomic_store(&cow__span_hi, init->start + init->npages * cow__page);
    atomic_fetch_add(&cow__nmapped, 1);
    cow__bases[init->base].nmappings++;

    return (int)k;
}

/* Adds a mapping entry; returns its index or a negative errno. */
int cow__mapping_add(uintptr_t start, size_t length, uint64_t offset,
                     int prot, int base, bool api)
{
    size_t npages = cow__round_page(length) / cow__page;
    _Atomic unsigned char *state = cow__array_new(npages);
    void **pcopy = NULL;
    sigset_t saved;
    int k;

    if (state == NULL)
        return -ENOMEM;
    if (cow__pte_on) {
        pcopy = cow__array_new(npages * sizeof(void *));
        if (pcopy == NULL) {
            cow__array_free((void *)state, npages);
            return -ENOMEM;
        }
    }
    memset((void *)state,
           COW__CLEAN | (prot & COW__PROT_MASK) << COW__PROT_SHIFT, npages);

    cow__table_lock(&saved);
    k = cow__entry_put(&(struct cow__mapping){
        .start = start,
        .length = length,
        .npages = npages,
        .live = npages,
        .offset = offset,
        .base = base,
        .used = true,
        .api = api,
        .engine = COW__ENGINE_REMAP,
        .state = state,
        .pcopy = pcopy,
    });
    cow__table_unlock(&saved);
    if (k < 0) {
        cow__array_free((void *)state, npages);
        if (pcopy != NULL)
            cow__array_free(pcopy, npages * sizeof(void *));
        return k;
    }
    cow__bases[base].map_offset = offset;
    cow__bases[base].map_length = length;

    return k;
}

/*
 * The entry whose mapping starts at start, with its first page live, or
 * -ENOENT.  Under cow__mutex.
 */
int cow__mapping_at(uintptr_t start)
{
    size_t k;

    for (k = 0; k < cow__high; k++)
        if (cow__mappings[k].used && cow__mappings[k].start == start &&
            cow__state(&cow__mappings[k], 0) != COW__GONE)
            return (int)k;

    return -ENOENT;
}

/*
 * The entry that holds every page of [start, start + length) live, and
 * the first of those pages in *first; -EFAULT when the range is not
 * wholly inside one entry's live pages.  Under cow__mutex.
 */
int cow__mapping_holding(uintptr_t start, size_t length, size_t *first)
{
    size_t n = cow__round_page(length) / cow__page;
    size_t k;
    size_t i;

    for (k = 0; k < cow__high; k++) {
        struct cow__mapping *m = &cow__mappings[k];

        if (!m->used || start < m->start ||
            (start - m->start) / cow__page >= m->npages)
            continue;
        *first = (start - m->start) / cow__page;
        if (n > m->npages - *first)
            return -EFAULT;
        for (i = *first; i < *first + n; i++)
            if (cow__state(m, i) == COW__GONE)
                return -EFAULT;
        return (int)k;
    }

    return -EFAULT;
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

/*
 * Frees the snapshot of page i, if any.  A remap snapshot is a kernel
 * mapping of its own; the snapshots a forked child took of a uffd
 * mapping live in one area, freed with the entry.
 */
static void cow__snap_drop(struct cow__mapping *m, size_t i)
{
    if (m->snap == NULL || m->snap[i] == NULL)
        return;
    if (m->engine == COW__ENGINE_REMAP) {
        cow__sys_munmap(m->snap[i], cow__page);
        m->nprivate--;
        atomic_fetch_sub(&cow__remap_maps, 1);
    }
    m->snap[i] = NULL;
}

/*
 * Frees the remap snapshots of a mapping the handler switched to uffd.
 * Under cow__mutex.
 */
void cow__drop_old_snaps(struct cow__mapping *m)
{
    sigset_t saved;
    void **old;
    size_t i;

    cow__table_lock(&saved);
    old = m->old_snap;
    m->old_snap = NULL;
    cow__table_unlock(&saved);
    if (old == NULL)
        return;
    for (i = 0; i < m->npages; i++)
        if (old[i] != NULL)
            cow__sys_munmap(old[i], cow__page);
    cow__array_free(old, m->npages * sizeof(void *));
}

/* Frees what a mapping entry owns once the table no longer shows it. */
static void cow__mapping_release(struct cow__mapping *m)
{
    size_t i;

    cow__drop_old_snaps(m);
    if (m->snap != NULL) {
        for (i = 0; i < m->npages; i++)
            cow__snap_drop(m, i);
        cow__array_free(m->snap, m->npages * sizeof(void *));
    }
    if (m->snap_area != NULL)
        cow__sys_munmap(m->snap_area, m->npages * cow__page);
    cow__delta_forget(m);
    cow__pte_forget(m);
    atomic_fetch_sub(&cow__remap_maps, m->nprivate);
    cow__array_free((void *)m->state, m->npages);
    cow__bases[m->base].nmappings--;
    cow__base_maybe_drop(m->base);
    memset(m, 0, sizeof(*m));
}

/*
 * Marks pages [first, last) of m GONE, counting the private pages of a
 * remap mapping that go with them.  Spinlock held.
 */
static void cow__pages_gone(struct cow__mapping *m, size_t first,
                            size_t last)
{
    size_t i;

    for (i = first; i < last; i++) {
        unsigned st = cow__state(m, i);

        if (st == COW__GONE)
            continue;
        if (m->engine == COW__ENGINE_REMAP && st != COW__CLEAN) {
            m->nprivate--;
            atomic_fetch_sub(&cow__remap_maps, 1);
        }
        cow__set_state(m, i, COW__GONE);
        m->live--;
    }
    if (m->live == 0 && m->used) {
        m->used = false;
        atomic_fetch_sub(&cow__nmapped, 1);
    }
}

/*
 * Frees the snapshots of GONE pages and releases the entries left with
 * no live page.  The handler ignores GONE pages and unused entries, and
 * only cow__mutex holders free snapshots, so no lock is needed.
 */
void cow__release_gone(void)
{
    size_t k;
    size_t i;

    for (k = 0; k < COW__MAX_MAPPINGS; k++) {
        struct cow__mapping *m = &cow__mappings[k];

        if (m->state == NULL)
            continue;
        if (!m->used) {
            cow__mapping_release(m);
            continue;
        }
        for (i = 0; m->snap != NULL && i < m->npages; i++)
            if (cow__state(m, i) == COW__GONE)
                cow__snap_drop(m, i);
    }
}

/*
 * Marks the pages of [start, start + length) GONE, once the program has
 * unmapped them, and drops the entries left without live pages.  Under
 * cow__mutex, which also keeps a dropped entry (unused, but still holding
 * its arrays) from being reused before it is released here.
 */
void cow__range_gone(uintptr_t start, size_t length)
{
    sigset_t saved;
    size_t k;

    cow__table_lock(&saved);
    for (k = 0; k < cow__high; k++) {
        struct cow__mapping *m = &cow__mappings[k];
        size_t first;
        size_t last;

        if (cow__overlaps(m, start, length, &first, &last))
            cow__pages_gone(m, first, last);
    }
    while (cow__high > 0 && !cow__mappings[cow__high - 1].used)
        cow__high--;
    cow__span_update();
    cow__table_unlock(&saved);
    cow__release_gone();
}

/*
 * Marks every page of entry k GONE, once the program has unmapped all of
 * it, and drops the entry; unlike cow__range_gone, it leaves alone any
 * other mapping that a hole of the entry may hold.  Under cow__mutex.
 */
void cow__entry_gone(int k)
{
    struct cow__mapping *m = &cow__mappings[k];
    sigset_t saved;

    cow__table_lock(&saved);
    cow__pages_gone(m, 0, m->npages);
    while (cow__high > 0 && !cow__mappings[cow__high - 1].used)
        cow__high--;
    cow__span_update();
    cow__table_unlock(&saved);
    cow__release_gone();
}

/*
 * Copies what pages [first, first + n) of m hold into the same pages of
 * the new entry d (the program moved them with mremap): page states,
 * snapshots and deltas.  Remap snapshots are pointers and move; a forked
 * child's snapshots of a uffd mapping live in m's area and are copied
 * into d's.  Returns 0 or -ENOMEM.  Spinlock held.
 */
static int cow__carry_pages(struct cow__mapping *m, size_t first, size_t n,
                            struct cow__mapping *d)
{
    size_t i;
    int rc = 0;

    for (i = 0; i < n && i < d->npages; i++) {
        unsigned st = cow__state(m, first + i);

        /*
         * The page leaves m as CLEAN so that marking it GONE there does
         * not count its private copy as unmapped: it lives on in d.
         */
        cow__set_page(d, i, st, cow__page_prot(m, first + i));
        cow__set_state(m, first + i, COW__CLEAN);
        if (m->engine == COW__ENGINE_REMAP && st != COW__CLEAN) {
            m->nprivate--;
            d->nprivate++;
        }
        if (m->pcopy != NULL && d->pcopy != NULL) {
            d->pcopy[i] = m->pcopy[first + i];
            m->pcopy[first + i] = NULL;
        }
        if (rc == 0)
            rc = cow__delta_copy(m, first + i, d, i);
        if (m->snap == NULL || m->snap[first + i] == NULL)
            continue;
        if (m->snap_area == NULL) {
            d->snap[i] = m->snap[first + i];
            m->snap[first + i] = NULL;
            m->nprivate--;
            d->nprivate++;
            continue;
        }
        d->snap[i] = d->snap_area + i * cow__page;
        memcpy(d->snap[i], m->snap[first + i], cow__page);
    }

    return rc;
}

/*
 * Allocates the arrays of a new entry like m with npages pages: states,
 * and the snapshot pointers and snapshot area m has.  Returns 0 or
 * -ENOMEM (and then allocates nothing).
 */
static int cow__entry_arrays(const struct cow__mapping *m,
                             struct cow__mapping *d)
{
    d->state = cow__array_new(d->npages);
    if (m->snap != NULL)
        d->snap = cow__array_new(d->npages * sizeof(void *));
    if (m->snap_area != NULL)
        d->snap_area = cow__array_new(d->npages * cow__page);
    if (m->pcopy != NULL)
        d->pcopy = cow__array_new(d->npages * sizeof(void *));
    if (d->state != NULL && (m->snap == NULL || d->snap != NULL) &&
        (m->snap_area == NULL || d->snap_area != NULL) &&
        (m->pcopy == NULL || d->pcopy != NULL))
        return 0;
    cow__array_free(d->pcopy, d->npages * sizeof(void *));
    cow__array_free((void *)d->state, d->npages);
    cow__array_free(d->snap, d->npages * sizeof(void *));
    cow__array_free(d->snap_area, d->npages * cow__page);

    return -ENOMEM;
}

/*
 * Prepares in d the entry that will hold pages of entry k from page
 * first on once the program has moved them to dest, where they start a
 * mapping of length bytes (mremap).  Its arrays are allocated now,
 * before any page moves: memory freed by the move could otherwise be
 * handed out for them and then unmapped with the rest of the old range.
 * Returns 0 or -ENOMEM (and then allocates nothing).  Under cow__mutex.
 */
int cow__move_prepare(int k, size_t first, uintptr_t dest, size_t length,
                      struct cow__mapping *d)
{
    const struct cow__mapping *m = &cow__mappings[k];

    *d = (struct cow__mapping){
        .start = dest,
        .length = length,
        .npages = cow__round_page(length) / cow__page,
        .offset = m->offset + first * cow__page,
        .base = m->base,
        .used = true,
        .api = m->api,
        .engine = m->engine,
    };
    d->live = d->npages;

    return cow__entry_arrays(m, d);
}

/* Frees what cow__move_prepare allocated, when the move did not happen. */
void cow__move_abandon(struct cow__mapping *d)
{
    cow__array_free(d->pcopy, d->npages * sizeof(void *));
    d->pcopy = NULL;
    cow__array_free((void *)d->state, d->npages);
    cow__array_free(d->snap, d->npages * sizeof(void *));
    cow__array_free(d->snap_area, d->npages * cow__page);
    cow__delta_forget(d);
    d->state = NULL;
}

/*
 * Records that the program moved pages [first, first + n_old) of entry k
 * to where d, prepared by cow__move_prepare, says: d takes over their
 * states, snapshots and deltas, its pages past n_old are the file's
 * with the protection ext_prot, and the old pages are GONE from entry k.
 * The memory must already be where the table will say it is.  Returns
 * the new entry, or -ENOMEM when the table is full (d is freed then, and
 * nothing changed).  Under cow__mutex, with the spinlock held.
 */
int cow__mapping_move(int k, size_t first, size_t n_old,
                      struct cow__mapping *d, int ext_prot)
{
    struct cow__mapping *m = &cow__mappings[k];
    size_t i;
    int j;

    for (i = 0; i < d->npages; i++)
        cow__set_page(d, i, COW__CLEAN, ext_prot);
    j = cow__entry_put(d);
    if (j < 0) {
        cow__move_abandon(d);
        return j;
    }
    if (cow__carry_pages(m, first, n_old, &cow__mappings[j]) != 0) {
        /*
         * Out of memory for the deltas: without one, a page's reference
         * is the base, so its next commit records again the bytes that
         * differ from the base, unchanged ones too, but loses none.
         */
        cow__delta_forget(&cow__mappings[j]);
    }
    cow__pages_gone(m, first, first + n_old);
    while (cow__high > 0 && !cow__mappings[cow__high - 1].used)
        cow__high--;
    cow__span_update();

    return j;
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
 * The protection page i of m really gets for the program's prot: a
 * remap page that is not private and writable never gets PROT_WRITE,
 * whose writes would reach the base file; a uffd page is private and
 * gets prot as is, unless it waits for a forked child's first write.
 */
static int cow__real_prot(const struct cow__mapping *m, size_t i, int prot)
{
    /* Under pteditor, entries cowd writes make pages writable. */
    if (cow__pte_on && m->engine == COW__ENGINE_REMAP)
        return prot & ~PROT_WRITE;
    if (m->engine == COW__ENGINE_UFFD ? !m->child_pending
                                      : cow__state(m, i) == COW__DIRTY)
        return prot;

    return prot & ~PROT_WRITE;
}

/*
 * Gives live pages [first, last) of m the protection their states call
 * for, in runs of pages that get the same.  Spinlock held; returns like
 * mprotect.
 */
int cow__apply_prots(struct cow__mapping *m, size_t first, size_t last)
{
    size_t run = first;
    int run_prot = -1;
    size_t i;

    for (i = first; i <= last; i++) {
        int want = -1;

        if (i < last && cow__state(m, i) != COW__GONE)
            want = cow__real_prot(m, i, cow__page_prot(m, i));
        if (want == run_prot)
            continue;
        if (run_prot >= 0 &&
            cow__sys_mprotect((void *)(m->start + run * cow__page),
                              (i - run) * cow__page, run_prot) != 0)
            return -1;
        run = i;
        run_prot = want;
    }

    return 0;
}

/*
 * Changes the protection of [start, start + length) as mprotect(2) would,
 * without ever making a remap page that is not private writable: its
 * write access would reach the base file.  Such pages get prot without
 * PROT_WRITE and remember that the program may write them, so that a
 * write makes them private as usual; the other pages (not managed, or
 * private) get prot.  The range is changed in runs of pages that get the
 * same protection, in address order, so no page is ever left more
 * restricted than the program asked for.  A managed page the program
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
            want = cow__real_prot(m, i, prot);
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

/*
 * In a forked child, with the spinlock held and signals blocked: the
 * pages the parent had made private become the child's starting point,
 * so the child's log holds only what the child changed (the parent
 * commits its own pages in its own session).  Remap pages the parent had
 * dirtied turn COMMITTED without being recorded, so the child's first
 * write to one snapshots it.  uffd mappings lost the parent's userfaultfd
 * registration in the fork; cow__uffd_child_baseline gives them the
 * child's own.
 */
void cow__after_fork_baseline(void)
{
    size_t k;
    size_t i;

    cow__uffd_forget();
    for (k = 0; k < cow__high; k++) {
        struct cow__mapping *m = &cow__mappings[k];

        if (!m->used)
            continue;
        if (m->engine == COW__ENGINE_UFFD) {
            cow__uffd_child_defer(m);
            continue;
        }
        if (m->pcopy != NULL) {
            for (i = 0; i < m->npages; i++)
                cow__snap_drop(m, i);
            cow__pte_child(m);
            continue;
        }
        if (m->snap == NULL)
            m->snap = cow__array_new(m->npages * sizeof(void *));
        for (i = 0; i < m->npages; i++) {
            void *page = (void *)(m->start + i * cow__page);

            if (cow__state(m, i) != COW__DIRTY ||
                cow__sys_mprotect(page, cow__page,
                                  cow__page_prot(m, i) & ~PROT_WRITE) != 0)
                continue;
            cow__set_state(m, i, COW__COMMITTED);
            cow__snap_drop(m, i);
        }
    }
}
