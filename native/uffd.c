/*
 * uffd.c: the userfaultfd engine, which a remap mapping switches to
 * before the remap engine runs out of kernel mappings.
 *
 * The remap engine gives each written page a private copy of its own,
 * and each costs a kernel mapping (two, where the copy splits the file
 * mapping); the kernel refuses more than vm.max_map_count of them.  A
 * uffd mapping is one MAP_PRIVATE mapping of the file: the kernel copies
 * a page on its first write, whatever the number of pages.  To find the
 * written pages again, the range is registered with a userfaultfd in
 * asynchronous write-protect mode (UFFD_FEATURE_WP_ASYNC): the kernel
 * resolves a write to a write-protected page by itself, with no signal
 * and no message, and clears the page's write-protect bit.  A commit
 * lists the pages whose bit is clear with the PAGEMAP_SCAN ioctl of
 * /proc/self/pagemap (PAGE_IS_WRITTEN), which sets the bit again on each
 * page it reports (PM_SCAN_WP_MATCHING), atomically with the report.
 * Both need Linux 6.7.  The userfaultfd is opened with
 * UFFD_USER_MODE_ONLY, which unprivileged processes may use whatever
 * vm.unprivileged_userfaultfd says: only faults from user space are
 * write-protect faults here, and those the kernel resolves.
 *
 * Switching a mapping (cow__uffd_switch) copies it, page for page, into
 * a private mapping of the file, moves that over it with mremap, and
 * write-protects every page but those written since the last commit.
 * It runs in the handler, under the spinlock, with only system calls and
 * memcpy.  Faults the switch's own copies cause are resolved by the
 * kernel; other threads that fault meanwhile wait on the spinlock, and
 * the range stays read-only until it is write-protected, so no write can
 * escape tracking.
 *
 * The userfaultfd and the pagemap descriptor belong to the process that
 * opened them (they name its address space), so a forked child opens its
 * own (cow__uffd_forget, cow__uffd_child_baseline).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "cow_internal.h"

/*
 * Debian 12's kernel headers (Linux 6.1) lack these.  The values are
 * those of the kernel's include/uapi/linux/userfaultfd.h and
 * include/uapi/linux/fs.h; the structures carry libcow's names so that
 * newer headers, which define the originals, do not clash.
 */
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#define COW__UFFD_FEATURE_WP_ASYNC (1ULL << 15)

struct cow__pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

#define COW__PAGEMAP_SCAN _IOWR('f', 16, struct cow__pm_scan_arg)
#define COW__PM_SCAN_WP_MATCHING (1ULL << 0)
#define COW__PM_SCAN_CHECK_WPASYNC (1ULL << 1)
#define COW__PAGE_IS_WRITTEN (1ULL << 1)
#define COW__PAGE_IS_FILE (1ULL << 2)
#define COW__PAGE_IS_PRESENT (1ULL << 3)
#define COW__PAGE_IS_SWAPPED (1ULL << 4)

_Static_assert(sizeof(struct cow__region) == 24,
               "struct cow__region must be the kernel's page_region");

bool cow__uffd_off;

/* The descriptors, with their identities for a child to check. */
static int cow__uffd = -1;
static int cow__pagemap = -1;
static dev_t cow__uffd_dev;
static ino_t cow__uffd_ino;
static dev_t cow__pagemap_dev;
static ino_t cow__pagemap_ino;

/* 0 not tried yet, 1 ready, -1 unavailable for cow__uffd_why. */
static int cow__uffd_status;
static const char *cow__uffd_why;

static int cow__unavailable(const char *why, const char **out)
{
    cow__uffd_status = -1;
    cow__uffd_why = why;
    *out = why;

    return -ENOTSUP;
}

static int cow__ioctl(int fd, unsigned long req, void *arg)
{
    int rc;

    do
        rc = ioctl(fd, req, arg);
    while (rc < 0 && errno == EINTR);

    return rc;
}

/* Opens the userfaultfd and checks its features.  Signals blocked. */
static int cow__uffd_open_fd(const char **why)
{
    struct uffdio_api api = {
        .api = UFFD_API,
        .features = COW__UFFD_FEATURE_WP_ASYNC,
    };
    struct stat st;
    int fd;

    fd = (int)syscall(SYS_userfaultfd,
                      O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0 && errno == EINVAL)
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return cow__unavailable("the kernel refuses userfaultfd", why);
    if (cow__ioctl(fd, UFFDIO_API, &api) != 0 ||
        !(api.features & COW__UFFD_FEATURE_WP_ASYNC) ||
        !(api.ioctls & (1ULL << _UFFDIO_REGISTER)) || fstat(fd, &st) != 0) {
        close(fd);
        return cow__unavailable("no asynchronous userfaultfd "
                                "write-protection (Linux 6.7 or later)",
                                why);
    }
    cow__uffd = fd;
    cow__uffd_dev = st.st_dev;
    cow__uffd_ino = st.st_ino;

    return 0;
}

/*
 * Opens what the engine needs, once per process: the userfaultfd and
 * /proc/self/pagemap.  Returns 0, or -ENOTSUP with the reason in *why.
 * Signals blocked.
 */
static int cow__uffd_open(const char **why)
{
    struct stat st;
    int fd;

    if (cow__uffd_status > 0)
        return 0;
    if (cow__uffd_status < 0) {
        *why = cow__uffd_why;
        return -ENOTSUP;
    }
    if (cow__uffd_off)
        return cow__unavailable("COW_UFFD=off", why);
    if (cow__uffd_open_fd(why) != 0)
        return -ENOTSUP;
    fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) != 0) {
        if (fd >= 0)
            close(fd);
        close(cow__uffd);
        cow__uffd = -1;
        return cow__unavailable("cannot open /proc/self/pagemap", why);
    }
    cow__pagemap = fd;
    cow__pagemap_dev = st.st_dev;
    cow__pagemap_ino = st.st_ino;
    cow__uffd_status = 1;

    return 0;
}

/*
 * Whether the engine can run here; *why says why not.  Normal context.
 */
int cow__uffd_available(const char **why)
{
    sigset_t saved;
    int rc;

    cow__table_lock(&saved);
    rc = cow__uffd_open(why);
    cow__table_unlock(&saved);

    return rc;
}

static int cow__uffd_register(uintptr_t start, size_t len)
{
    struct uffdio_register reg = {
        .range = { .start = start, .len = len },
        .mode = UFFDIO_REGISTER_MODE_WP,
    };

    return cow__ioctl(cow__uffd, UFFDIO_REGISTER, &reg) == 0 ? 0 : -errno;
}

static int cow__uffd_unregister(uintptr_t start, size_t len)
{
    struct uffdio_range range = { .start = start, .len = len };

    return cow__ioctl(cow__uffd, UFFDIO_UNREGISTER, &range) == 0 ? 0
                                                                  : -errno;
}

static int cow__uffd_protect(uintptr_t start, size_t len)
{
    struct uffdio_writeprotect wp = {
        .range = { .start = start, .len = len },
        .mode = UFFDIO_WRITEPROTECT_MODE_WP,
    };

    return cow__ioctl(cow__uffd, UFFDIO_WRITEPROTECT, &wp) == 0 ? 0
                                                                 : -errno;
}

/*
 * Registers the live pages of m in [first, last) and write-protects those
 * not DIRTY (written since the last commit), so that the next scan
 * reports exactly the pages written since the last commit; then every
 * live page is CLEAN.  Spinlock held, signals blocked.  Returns 0 or a
 * negative errno.
 */
int cow__uffd_arm(struct cow__mapping *m, size_t first, size_t last)
{
    size_t a = first;
    size_t e;
    int rc;

    while (a < last) {
        unsigned st = cow__state(m, a);
        bool dirty = st == COW__DIRTY;

        if (st == COW__GONE) {
            a++;
            continue;
        }
        for (e = a + 1; e < last && cow__state(m, e) != COW__GONE &&
                        (cow__state(m, e) == COW__DIRTY) == dirty;
             e++)
            ;
        rc = cow__uffd_register(m->start + a * cow__page,
                                (e - a) * cow__page);
        if (rc == 0 && !dirty)
            rc = cow__uffd_protect(m->start + a * cow__page,
                                   (e - a) * cow__page);
        if (rc != 0)
            return rc;
        for (; a < e; a++)
            cow__set_state(m, a, COW__CLEAN);
    }

    return 0;
}

/* One PAGEMAP_SCAN call over [*from, end); advances *from. */
static long cow__pm_scan(uintptr_t *from, uintptr_t end, uint64_t flags,
                         uint64_t inverted, uint64_t mask, uint64_t anyof,
                         struct cow__region *vec, size_t n)
{
    struct cow__pm_scan_arg arg = {
        .size = sizeof(arg),
        .flags = flags,
        .start = *from,
        .end = end,
        .vec = (uintptr_t)vec,
        .vec_len = n,
        .category_inverted = inverted,
        .category_mask = mask,
        .category_anyof_mask = anyof,
        .return_mask = mask | anyof,
    };
    int rc = cow__ioctl(cow__pagemap, COW__PAGEMAP_SCAN, &arg);

    if (rc < 0)
        return -errno;
    if (arg.walk_end <= *from)
        return -EIO;
    *from = arg.walk_end;

    return rc;
}

/*
 * Lists, in vec (n entries), the regions of [*from, end) written since
 * they were last write-protected, and write-protects them again when
 * protect is set; advances *from to where the scan stopped (end once the
 * whole range was seen).  Returns the number of regions or a negative
 * errno: -EPERM when part of the range is not registered, which would
 * mean writes were not tracked.
 */
long cow__uffd_scan(uintptr_t *from, uintptr_t end, bool protect,
                    struct cow__region *vec, size_t n)
{
    uint64_t flags = COW__PM_SCAN_CHECK_WPASYNC;

    if (protect)
        flags |= COW__PM_SCAN_WP_MATCHING;

    return cow__pm_scan(from, end, flags, 0, COW__PAGE_IS_WRITTEN, 0, vec,
                        n);
}

/*
 * Makes the private copy of live pages [a, e) of m: a private mapping of
 * the file, registered once to prove the file supports it, holding every
 * private page of the range; and the deltas of what the log holds for
 * them (a COMMITTED page holds what was committed; a DIRTY one's
 * snapshot does).  Returns the copy, or NULL with *why set.
 */
static unsigned char *cow__run_copy(struct cow__mapping *m, size_t a,
                                    size_t e, int fd, const char **why)
{
    size_t len = (e - a) * cow__page;
    unsigned char *copy;
    size_t i;

    copy = cow__sys_mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd,
                         (off_t)(m->offset + a * cow__page));
    if (copy == MAP_FAILED) {
        *why = "cannot map the file privately";
        return NULL;
    }
    if (cow__uffd_register((uintptr_t)copy, len) != 0 ||
        cow__uffd_unregister((uintptr_t)copy, len) != 0) {
        cow__sys_munmap(copy, len);
        *why = "the file system does not support userfaultfd "
               "write-protection";
        return NULL;
    }
    for (i = a; i < e; i++) {
        unsigned st = cow__state(m, i);
        unsigned char *src = (unsigned char *)(m->start + i * cow__page);
        unsigned char *dst = copy + (i - a) * cow__page;
        const unsigned char *logged = NULL;

        if (st == COW__CLEAN)
            continue;
        if (st == COW__COMMITTED)
            logged = src;
        else if (m->snap != NULL)
            logged = m->snap[i];
        if (logged != NULL &&
            cow__delta_store(m, i, logged, dst, cow__page) != 0) {
            cow__sys_munmap(copy, len);
            *why = "out of memory";
            return NULL;
        }
        memcpy(dst, src, cow__page);
    }

    return copy;
}

/* Unmaps the first n copies cow__uffd_switch made, one per live run. */
static void cow__drop_copies(const struct cow__mapping *m,
                             unsigned char **copies, size_t n)
{
    size_t a;
    size_t e;
    size_t r = 0;

    for (a = 0; r < n && a < m->npages; a = e) {
        if (cow__state(m, a) == COW__GONE) {
            e = a + 1;
            continue;
        }
        for (e = a; e < m->npages && cow__state(m, e) != COW__GONE; e++)
            ;
        cow__sys_munmap(copies[r++], (e - a) * cow__page);
    }
}

static const char cow__lost_msg[] =
    "libcow: cannot put a switched mapping in place; stopping rather "
    "than lose writes\n";

/*
 * Switches remap mapping m to the uffd engine.  Each run of live pages
 * (a partial munmap may have left holes, which may hold other mappings)
 * is copied first; only when every copy exists are they moved over the
 * runs, so that a failure before that changes nothing.  The snapshots
 * are handed to the next cow__mutex holder, which may be reading them.
 * Returns 0, or a negative errno with the reason in *why.  Spinlock held,
 * signals blocked.
 */
int cow__uffd_switch(struct cow__mapping *m, const char **why)
{
    int fd = cow__bases[m->base].fd;
    unsigned char **copies;
    size_t nruns = 0;
    size_t r;
    size_t a;
    size_t e;
    int rc = cow__uffd_open(why);

    if (rc != 0)
        return rc;
    if (!cow__fd_is(fd, cow__bases[m->base].dev, cow__bases[m->base].ino)) {
        *why = "the program closed libcow's descriptor of the file";
        return -EBADF;
    }
    for (a = 0; a < m->npages; a++)
        if (cow__state(m, a) != COW__GONE &&
            (a == 0 || cow__state(m, a - 1) == COW__GONE))
            nruns++;
    copies = cow__array_new(nruns * sizeof(*copies));
    if (copies == NULL) {
        *why = "out of memory";
        return -ENOMEM;
    }

    for (a = 0, r = 0; a < m->npages; a = e) {
        if (cow__state(m, a) == COW__GONE) {
            e = a + 1;
            continue;
        }
        for (e = a; e < m->npages && cow__state(m, e) != COW__GONE; e++)
            ;
        copies[r] = cow__run_copy(m, a, e, fd, why);
        if (copies[r] == NULL)
            break;
        r++;
    }
    if (r < nruns) {
        cow__drop_copies(m, copies, r);
        rc = -ENOMEM;
        goto out;
    }

    for (a = 0, r = 0; a < m->npages; a = e) {
        size_t len;

        if (cow__state(m, a) == COW__GONE) {
            e = a + 1;
            continue;
        }
        for (e = a; e < m->npages && cow__state(m, e) != COW__GONE; e++)
            ;
        len = (e - a) * cow__page;

        /* Read-only until write-protected: no write escapes tracking. */
        cow__sys_mprotect(copies[r], len, PROT_READ);
        if (cow__sys_mremap(copies[r], len, len,
                            MREMAP_MAYMOVE | MREMAP_FIXED,
                            (void *)(m->start + a * cow__page)) ==
            MAP_FAILED) {
            ssize_t unused = write(2, cow__lost_msg,
                                   sizeof(cow__lost_msg) - 1);

            (void)unused;
            abort();
        }
        r++;
    }
    m->engine = COW__ENGINE_UFFD;
    m->old_snap = m->snap;
    m->snap = NULL;
    atomic_fetch_sub(&cow__remap_maps, m->nprivate);
    m->nprivate = 0;
    if (cow__uffd_arm(m, 0, m->npages) != 0 ||
        cow__apply_prots(m, 0, m->npages) != 0) {
        ssize_t unused = write(2, cow__lost_msg, sizeof(cow__lost_msg) - 1);

        (void)unused;
        abort();
    }
    rc = 0;
out:
    cow__array_free(copies, nruns * sizeof(*copies));

    return rc;
}

/*
 * In a forked child: the parent's descriptors name the parent's address
 * space.  The child's copies are closed (if the program has not reused
 * the numbers) and the engine is opened again when needed.  Signals
 * blocked.
 */
void cow__uffd_forget(void)
{
    if (cow__fd_is(cow__uffd, cow__uffd_dev, cow__uffd_ino))
        close(cow__uffd);
    if (cow__fd_is(cow__pagemap, cow__pagemap_dev, cow__pagemap_ino))
        close(cow__pagemap);
    cow__uffd = -1;
    cow__pagemap = -1;
    if (cow__uffd_status > 0)
        cow__uffd_status = 0;
}

/*
 * Snapshots the pages of live run [a, e) of m that the child inherited
 * private (anonymous pages: the file's are its own reference), into m's
 * snapshot area.  Returns 0 or a negative errno.
 */
static int cow__snap_inherited(struct cow__mapping *m, size_t a, size_t e)
{
    /* Small: this may run in the handler, on an alternate signal stack. */
    struct cow__region vec[16];
    uintptr_t from = m->start + a * cow__page;
    uintptr_t end = m->start + e * cow__page;

    while (from < end) {
        long n = cow__pm_scan(&from, end, 0, COW__PAGE_IS_FILE,
                              COW__PAGE_IS_FILE,
                              COW__PAGE_IS_PRESENT | COW__PAGE_IS_SWAPPED,
                              vec, sizeof(vec) / sizeof(vec[0]));
        long k;

        if (n < 0)
            return (int)n;
        for (k = 0; k < n; k++) {
            uintptr_t p;

            for (p = vec[k].start; p < vec[k].end; p += cow__page) {
                size_t i = (p - m->start) / cow__page;

                m->snap[i] = m->snap_area + i * cow__page;
                memcpy(m->snap[i], (void *)p, cow__page);
            }
        }
    }

    return 0;
}

/*
 * In a forked child, for a uffd mapping: the fork dropped the parent's
 * registration, and the child's log starts empty.  Setting the child up
 * costs a copy of every page the parent had made private, which a child
 * that only execs should not pay: the mapping is made read-only instead,
 * and the child's first write to it faults and sets it up then
 * (cow__uffd_child_baseline).  The parent's deltas, which describe the
 * parent's log, are dropped.  Spinlock held, signals blocked.
 */
void cow__uffd_child_defer(struct cow__mapping *m)
{
    cow__delta_forget(m);
    if (m->snap_area != NULL)
        cow__sys_munmap(m->snap_area, m->npages * cow__page);
    m->snap_area = NULL;
    if (m->snap != NULL)
        memset(m->snap, 0, m->npages * sizeof(void *));
    m->child_pending = true;
    cow__apply_prots(m, 0, m->npages);
}

/*
 * Sets up a uffd mapping in a forked child at its first write.  The
 * child's reference for each page is what it inherited: the pages that
 * were private in the parent are snapshotted (a diff against the base
 * would record the parent's bytes as the child's), and the range is
 * registered with the child's own userfaultfd and write-protected, then
 * given its protection back.  A child that cannot track its writes must
 * not run on untracked, so that ends it.  Spinlock held, signals blocked.
 */
int cow__uffd_child_baseline(struct cow__mapping *m)
{
    static const char msg[] =
        "libcow: a forked child cannot track its writes to a mapping; "
        "stopping rather than lose them\n";
    const char *why;
    size_t a;
    size_t e;
    int rc = cow__uffd_open(&why);

    if (!m->child_pending)
        return 0;
    m->snap_area = cow__array_new(m->npages * cow__page);
    if (m->snap == NULL)
        m->snap = cow__array_new(m->npages * sizeof(void *));
    if (rc == 0 && (m->snap_area == NULL || m->snap == NULL))
        rc = -ENOMEM;
    for (a = 0; rc == 0 && a < m->npages; a = e) {
        if (cow__state(m, a) == COW__GONE) {
            e = a + 1;
            continue;
        }
        for (e = a; e < m->npages && cow__state(m, e) != COW__GONE; e++)
            ;
        rc = cow__snap_inherited(m, a, e);
    }
    if (rc == 0)
        rc = cow__uffd_arm(m, 0, m->npages);
    m->child_pending = false;
    if (rc == 0)
        rc = cow__apply_prots(m, 0, m->npages);
    if (rc != 0) {
        ssize_t unused = write(2, msg, sizeof(msg) - 1);

        (void)unused;
        abort();
    }

    return 0;
}
