/*
 * libcow.c: start-up, the interposed mmap family, the C API of cow.h and
 * the policy of when and how changes are committed to cowd.
 *
 * Injected with LD_PRELOAD by `cowctl run`, libcow manages the MAP_SHARED
 * writable mappings of the files that COW_PATHS selects: they are mapped
 * read-only, and the SIGSEGV handler (handler.c) gives each written page a
 * private copy.  A commit (cow_commit(), msync, munmap, exit, _exit, exec)
 * collects what changed (commit.c) and sends it to cowd (rpc.c).  When
 * cowd cannot be reached the changes wait in memory, per base file, and
 * go first at the next commit.
 *
 * Start-up.  Another library's constructor may map a managed file before
 * libcow's constructor runs (the loader runs the constructors of a
 * program's libraries before those of preloaded ones); the interposed
 * mmap then starts libcow itself, so that mapping is managed like any
 * other.  A mapping made even earlier, or by a raw system call, is found
 * in /proc/self/maps at start-up and taken over: made read-only in place
 * and managed from then on, which stderr reports, since whatever was
 * written to it before went to the file.
 *
 * Aliases.  Each mapping is a private view of its own.  Two mappings of
 * the same file in one process do not see each other's writes, unlike
 * MAP_SHARED ones: each page a mapping writes is its own copy.  Both
 * are committed to the same log, as records of the bytes each changed
 * against the file, in mapping order within a batch; where both wrote
 * the same byte, the mapping committed last in the batch wins, as a
 * session overwriting its own bytes always does.  A commit of one
 * mapping never records bytes it did not change, so it never undoes what
 * another committed.
 *
 * Loaded without COW_PATHS (dlopen()ed by the Python client library, or
 * preloaded with the variable unset), libcow does nothing until its C API
 * is first called.
 */
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sysmacros.h>

#include "cow.h"
#include "cow_internal.h"

/* Where cowd listens when COWD_SOCKET is unset. */
#define COW__DEFAULT_SOCKET "/run/cowd/cowd.sock"

/*
 * glibc refuses an mmap offset that is not a multiple of 4096 with
 * EINVAL before asking the kernel, whatever the page size; so do we.
 */
#define COW__MMAP_OFFSET_MASK 4095

/*
 * Without COW_SWITCH_PAGES, a remap mapping switches to the uffd engine
 * once libcow's kernel mappings reach this fraction of vm.max_map_count:
 * each private page may split the file mapping too, and the program
 * needs room for its own mappings.
 */
#define COW__SWITCH_DIVISOR 4

/* vm.max_map_count when /proc does not tell; the kernel's default. */
#define COW__DEFAULT_MAX_MAP_COUNT 65530

bool cow__debug_on;

/* Runs cow__init once, from the constructor or from an earlier mmap. */
static pthread_once_t cow__once = PTHREAD_ONCE_INIT;

/* The COW_PATHS patterns; none means no transparent management. */
static char **cow__patterns;
static size_t cow__npatterns;

static char *cow__socket;

/* The handler is installed and the fork handlers registered. */
bool cow__ready;

/* The engine libcow says it runs in its hello to cowd. */
const char *cow__engine_name = "remap";

/* A connection was tried (the constructor's or the C API's first). */
static bool cow__tried;

/*
 * A message about cowd being unreachable was printed and cowd has not
 * been reached since: the same outage is not reported again.
 */
static bool cow__outage_reported;

static void cow__vsay(const char *fmt, va_list ap)
{
    char line[1024];
    int n = snprintf(line, sizeof(line), "libcow: ");

    n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    if (n > (int)sizeof(line) - 2)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';

    /* One write, so that lines from several threads never interleave. */
    while (write(2, line, (size_t)n) < 0 && errno == EINTR)
        ;
}

void cow__say(const char *fmt, ...)
{
    int saved_errno = errno;
    va_list ap;

    va_start(ap, fmt);
    cow__vsay(fmt, ap);
    va_end(ap);
    errno = saved_errno;
}

/*
 * The message of errno value err.  Unlike strerror it never allocates
 * (no translation is loaded), so the commit path may use it from a
 * signal handler.
 */
const char *cow__strerror(int err)
{
    const char *s = strerrordesc_np(err);

    return s != NULL ? s : "unknown error";
}

void cow__debug(const char *fmt, ...)
{
    int saved_errno = errno;
    va_list ap;

    if (!cow__debug_on)
        return;
    va_start(ap, fmt);
    cow__vsay(fmt, ap);
    va_end(ap);
    errno = saved_errno;
}

/*
 * Makes the session of a forked child its own (see process.c): it must
 * never write a frame on the connection it inherited, whose other end
 * cowd credits to the parent.  Log handles belong to that connection,
 * and the records waiting to be sent are the parent's, which commits them
 * itself.  Under cow__mutex.
 */
void cow__session_reset(void)
{
    sigset_t saved;
    int k;

    /* Taking the spinlock resets the table first, if no one has yet. */
    cow__table_lock(&saved);
    cow__table_unlock(&saved);
    cow__rpc_close();
    for (k = 0; k < COW__MAX_BASES; k++) {
        if (!cow__bases[k].used)
            continue;
        cow__bases[k].log_conn = 0;
        cow__batch_free(&cow__bases[k].batch);
        cow__batch_free(&cow__bases[k].writes);
        cow__base_maybe_drop(k);
    }
    cow__outage_reported = false;
}

/* Reads vm.max_map_count, or returns the kernel's default. */
static size_t cow__read_max_map_count(void)
{
    char text[32];
    ssize_t n;
    int fd = open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC);
    unsigned long v;

    if (fd < 0)
        return COW__DEFAULT_MAX_MAP_COUNT;
    n = read(fd, text, sizeof(text) - 1);
    close(fd);
    if (n <= 0)
        return COW__DEFAULT_MAX_MAP_COUNT;
    text[n] = '\0';
    v = strtoul(text, NULL, 10);

    return v > 0 ? (size_t)v : COW__DEFAULT_MAX_MAP_COUNT;
}

/*
 * Sets when remap mappings switch to the uffd engine: COW_SWITCH_PAGES
 * (libcow's kernel mappings; 0 switches a mapping at its first write)
 * or a fraction of vm.max_map_count.  COW_UFFD=off makes the engine
 * unavailable, as on a kernel without it.
 */
static void cow__switch_setup(void)
{
    const char *pages = getenv("COW_SWITCH_PAGES");
    const char *uffd = getenv("COW_UFFD");
    char *end;
    unsigned long v;

    cow__max_map_count = cow__read_max_map_count();
    cow__switch_at = cow__max_map_count / COW__SWITCH_DIVISOR;
    if (pages != NULL && *pages != '\0') {
        v = strtoul(pages, &end, 10);
        if (*end == '\0')
            cow__switch_at = (size_t)v;
    }
    cow__uffd_off = uffd != NULL && strcmp(uffd, "off") == 0;
}

/*
 * Prepares what any managed mapping needs: the page size, the socket
 * path, the handler and the fork handlers.  Under cow__mutex.
 */
static int cow__runtime(void)
{
    const char *path = getenv("COWD_SOCKET");
    int rc;

    if (cow__ready)
        return 0;
    cow__page = (size_t)sysconf(_SC_PAGESIZE);
    if (path == NULL || *path == '\0')
        path = COW__DEFAULT_SOCKET;
    cow__socket = strdup(path);
    if (cow__socket == NULL)
        return -ENOMEM;
    cow__switch_setup();
    rc = cow__handler_install();
    if (rc == 0)
        rc = cow__process_init();
    if (rc != 0)
        return rc;
    cow__ready = true;

    return 0;
}

/* Connects to cowd; on failure prints the outage line once. */
static int cow__connect(void)
{
    int rc;

    cow__tried = true;
    rc = cow__rpc_connect(cow__socket);
    if (rc == 0) {
        cow__outage_reported = false;
        cow__debug("connected to cowd at %s", cow__socket);
        return 0;
    }
    if (!cow__outage_reported)
        cow__say("cannot reach cowd at %s: %s; writes stay private and "
                 "will be committed when it is back",
                 cow__socket, cow__rpc_error());
    cow__outage_reported = true;

    return rc;
}

/* Gets base k a log handle on the current connection if it has none. */
static int cow__ensure_log(int k)
{
    struct cow__base *b = &cow__bases[k];
    int rc;

    if (b->log_conn == cow__rpc_conn())
        return 0;
    if (cow__base_fd(k) < 0)
        return cow__rpc_fail(-EBADF, "the program closed libcow's "
                                     "descriptor of a mapped file");
    rc = cow__rpc_map(b->fd, b->map_offset, b->map_length, &b->log);
    if (rc != 0)
        return rc;
    b->log_conn = cow__rpc_conn();
    cow__debug("log handle %lld", (long long)b->log);

    return 0;
}

/*
 * Sends base k's batch, connecting and getting a log handle first if
 * needed.  On failure the batch stays for the next commit.
 */
static int cow__flush(int k)
{
    struct cow__base *b = &cow__bases[k];
    int64_t seq;
    int rc = 0;

    if (b->batch.nrecords == 0)
        return 0;
    if (!cow__rpc_connected())
        rc = cow__connect();
    if (rc == 0)
        rc = cow__ensure_log(k);
    if (rc == 0)
        rc = cow__rpc_commit(b->log, &b->batch, &seq);
    if (rc != 0) {
        if (!cow__outage_reported)
            cow__say("commit to cowd at %s failed: %s; the changes stay in "
                     "memory and will be retried",
                     cow__socket, cow__rpc_error());
        cow__outage_reported = true;
        return rc;
    }
    cow__debug("committed %zu records as batch %lld", b->batch.nrecords,
               (long long)seq);
    cow__outage_reported = false;
    cow__batch_clear(&b->batch);

    return 0;
}

/*
 * Commits base k: collects its changes, then sends them.  final says the
 * process is ending.  Under cow__mutex.
 */
static int cow__commit_base(int k, bool final)
{
    int rc = cow__collect(k, final);
    int sent;

    if (rc != 0)
        cow__say("cannot collect the changes of a mapped file: %s",
                 cow__strerror(-rc));
    sent = cow__flush(k);

    return rc != 0 ? rc : sent;
}

/* Commits every base that has a mapping in the range.  Under mutex. */
void cow__commit_range(uintptr_t start, size_t length)
{
    int bases[COW__MAX_BASES];
    int n = cow__range_bases(start, length, bases, COW__MAX_BASES);
    int j;

    for (j = 0; j < n; j++)
        cow__commit_base(bases[j], false);
}

/*
 * Commits every base, dropping those left with nothing, unless this is
 * the final commit: the process is ending, and dropping one would call
 * free(), which a commit made from a signal handler must not.  Under
 * cow__mutex.
 */
static int cow__commit_every_base(bool final)
{
    int first = 0;
    int k;

    for (k = 0; k < COW__MAX_BASES; k++) {
        int rc;

        if (!cow__bases[k].used)
            continue;
        rc = cow__commit_base(k, final);
        if (rc != 0 && first == 0)
            first = rc;
        if (!final)
            cow__base_maybe_drop(k);
    }

    return first;
}

/*
 * Commits everything before the image goes (what names the call that
 * ends it).  Records that cannot reach cowd now are lost with the image,
 * and that is said.  Under cow__mutex.
 */
void cow__commit_before(const char *what, bool final)
{
    size_t lost = 0;
    int k;

    if (!cow__ready || cow__commit_every_base(final) == 0)
        return;
    for (k = 0; k < COW__MAX_BASES; k++)
        if (cow__bases[k].used)
            lost += cow__bases[k].batch.nrecords;
    if (lost > 0)
        cow__say("%zu records could not be committed at %s: %s", lost, what,
                 cow__rpc_error());
}

/*
 * Registers the mapping at p, made read-only from the file open on fd
 * (described by st), as a managed mapping whose program asked for prot.
 * Returns 0 or a negative errno.  Under cow__mutex.
 */
static int cow__register(void *p, size_t length, int prot, off_t offset,
                         int fd, const struct stat *st, bool api)
{
    int k = cow__base_get(fd, st);
    int rc;

    if (k < 0)
        return k;
    rc = cow__mapping_add((uintptr_t)p, length, (uint64_t)offset,
                         prot | PROT_READ, k, api);
    if (rc < 0) {
        cow__base_maybe_drop(k);
        return rc;
    }
    cow__debug("managing %zu bytes at offset %lld of inode %llu", length,
               (long long)offset, (unsigned long long)st->st_ino);

    /* The log can wait for the first commit if cowd is not there now. */
    if (cow__rpc_connected() && cow__ensure_log(k) != 0)
        cow__debug("no log yet: %s", cow__rpc_error());

    return 0;
}

bool cow__path_matches(int fd)
{
    char link[64];
    char path[PATH_MAX];
    ssize_t n;
    size_t k;

    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof(path));
    if (n < 0 || (size_t)n >= sizeof(path))
        return false;
    path[n] = '\0';
    for (k = 0; k < cow__npatterns; k++)
        if (fnmatch(cow__patterns[k], path, 0) == 0)
            return true;

    return false;
}

/*
 * Whether a mapping could be one libcow manages, judged from the
 * arguments alone: a shared, writable mapping of a descriptor.
 */
static bool cow__candidate(int prot, int flags, int fd)
{
    int type = flags & MAP_TYPE;

    return fd >= 0 && (prot & PROT_WRITE) && !(flags & MAP_ANONYMOUS) &&
           (type == MAP_SHARED || type == MAP_SHARED_VALIDATE);
}

/*
 * Whether mmap should manage this mapping: a shared, writable mapping of
 * a regular file open for reading and writing whose path matches
 * COW_PATHS.  A descriptor not open for writing is left to the kernel,
 * which refuses it as it would without libcow.
 */
static bool cow__wanted(int prot, int flags, int fd, struct stat *st)
{
    int fl;

    if (cow__npatterns == 0 || !cow__candidate(prot, flags, fd))
        return false;
    if (fstat(fd, st) != 0 || !S_ISREG(st->st_mode))
        return false;
    fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_ACCMODE) != O_RDWR)
        return false;

    return cow__path_matches(fd);
}

static void cow__init(void);

COW__EXPORT
void *mmap(void *addr, size_t length, int prot, int flags, int fd,
           off_t offset)
{
    struct stat st;
    bool wanted;
    bool replaces;
    int map_prot = prot;
    void *p;
    int rc;

    if (offset & COW__MMAP_OFFSET_MASK) {
        errno = EINVAL;
        return MAP_FAILED;
    }

    /* A library's constructor may get here before libcow's has run. */
    if (cow__candidate(prot, flags, fd))
        pthread_once(&cow__once, cow__init);
    wanted = cow__wanted(prot, flags, fd, &st);
    replaces = (flags & MAP_FIXED) &&
               cow__range_managed((uintptr_t)addr, length);
    if (!wanted && !replaces)
        return cow__sys_mmap(addr, length, prot, flags, fd, offset);

    cow__lock();

    /*
     * A MAP_FIXED mapping over managed pages unmaps them: commit them and
     * forget them before the new mapping exists, so that no fault on the
     * new mapping can be taken for one on the old.
     */
    if (replaces) {
        cow__commit_range((uintptr_t)addr, length);
        cow__pte_release_range((uintptr_t)addr, length);
        cow__range_gone((uintptr_t)addr, length);
    }
    if (wanted)
        map_prot = (prot & ~PROT_WRITE) | PROT_READ;
    p = cow__sys_mmap(addr, length, map_prot, flags, fd, offset);
    if (p != MAP_FAILED && wanted) {
        rc = cow__register(p, length, prot, offset, fd, &st, false);
        if (rc != 0) {
            cow__sys_munmap(p, length);
            cow__debug("cannot manage a mapping: %s", cow__strerror(-rc));
            p = MAP_FAILED;
            errno = -rc;
        }
    }
    rc = errno;
    cow__unlock();
    errno = rc;

    return p;
}

COW__EXPORT
void *mmap64(void *addr, size_t length, int prot, int flags, int fd,
             off_t offset)
{
    return mmap(addr, length, prot, flags, fd, offset);
}

COW__EXPORT
int munmap(void *addr, size_t length)
{
    int rc;
    int saved_errno;

    if (!cow__range_managed((uintptr_t)addr, length))
        return cow__sys_munmap(addr, length);

    cow__lock();
    cow__commit_range((uintptr_t)addr, length);
    cow__pte_release_range((uintptr_t)addr, length);
    rc = cow__sys_munmap(addr, length);
    saved_errno = errno;
    if (rc == 0)
        cow__range_gone((uintptr_t)addr, length);
    cow__unlock();
    errno = saved_errno;

    return rc;
}

/*
 * A program may change the protection of a managed mapping; libcow must
 * not let that make a file page writable, or its writes would reach the
 * base file.
 */
COW__EXPORT
int mprotect(void *addr, size_t length, int prot)
{
    int rc;
    int saved_errno;

    if (!cow__range_managed((uintptr_t)addr, length))
        return cow__sys_mprotect(addr, length, prot);

    cow__lock();
    rc = cow__range_protect((uintptr_t)addr, length, prot);
    saved_errno = errno;
    cow__unlock();
    errno = saved_errno;

    return rc;
}

COW__EXPORT
int msync(void *addr, size_t length, int flags)
{
    if (cow__range_managed((uintptr_t)addr, length)) {
        cow__lock();
        cow__commit_range((uintptr_t)addr, length);
        cow__unlock();
    }

    return cow__sys_msync(addr, length, flags);
}

static void *cow__fail(int err)
{
    errno = err;
    return MAP_FAILED;
}

/*
 * The move of a remap mapping, for mremap: the kernel cannot do it,
 * since the private pages make the range several kernel mappings.  The
 * destination is mapped read-only from the file, each private page is
 * moved onto it with its own mremap, what remains of the old range is
 * unmapped, and a new table entry takes over the pages.  Pages past the
 * old end are the file's, with the protection of the old last page.  The
 * table lock is held throughout, so the handler never sees a page half
 * moved.  Under cow__mutex.
 */
static void *cow__move_remap(int k, size_t first, uintptr_t old,
                             size_t oldlen, size_t new_size, uintptr_t dest,
                             int fd)
{
    struct cow__mapping *m = &cow__mappings[k];
    size_t n_old = oldlen / cow__page;
    size_t newlen = cow__round_page(new_size);
    size_t n = n_old < newlen / cow__page ? n_old : newlen / cow__page;
    int ext_prot = cow__page_prot(m, first + n_old - 1);
    off_t off = (off_t)(m->offset + first * cow__page);
    struct cow__mapping d;
    sigset_t saved;
    void *p;
    size_t i;
    int j;

    p = cow__sys_mmap((void *)dest, newlen, ext_prot & ~PROT_WRITE,
                      MAP_SHARED | (dest != 0 ? MAP_FIXED : 0), fd, off);
    if (p == MAP_FAILED)
        return MAP_FAILED;
    dest = (uintptr_t)p;
    if (cow__move_prepare(k, first, dest, new_size, &d) != 0) {
        cow__sys_munmap(p, newlen);
        return cow__fail(ENOMEM);
    }

    cow__table_lock(&saved);
    cow__pte_unswap(m, first, first + n_old);
    for (i = 0; i < n; i++) {
        unsigned st = cow__state(m, first + i);

        if (st != COW__DIRTY && st != COW__COMMITTED)
            continue;
        if (cow__sys_mremap((void *)(old + i * cow__page), cow__page,
                            cow__page, MREMAP_MAYMOVE | MREMAP_FIXED,
                            (void *)(dest + i * cow__page)) == MAP_FAILED)
            break;
    }
    j = i == n ? cow__mapping_move(k, first, n_old, &d, ext_prot) : -ENOMEM;
    if (j < 0) {
        /* Put back what was moved; the old range is intact again. */
        while (i-- > 0) {
            unsigned st = cow__state(m, first + i);

            if (st == COW__DIRTY || st == COW__COMMITTED)
                cow__sys_mremap((void *)(dest + i * cow__page), cow__page,
                                cow__page, MREMAP_MAYMOVE | MREMAP_FIXED,
                                (void *)(old + i * cow__page));
        }
        if (d.state != NULL)
            cow__move_abandon(&d);
        cow__sys_munmap((void *)dest, newlen);
        cow__pte_reswap(m, first, first + n_old);
        cow__table_unlock(&saved);
        return cow__fail(ENOMEM);
    }
    cow__apply_prots(&cow__mappings[j], 0, cow__mappings[j].npages);
    cow__pte_reswap(&cow__mappings[j], 0, cow__mappings[j].npages);
    cow__sys_munmap((void *)old, oldlen);
    cow__table_unlock(&saved);
    cow__release_gone();

    return (void *)dest;
}

/*
 * Grows a remap mapping in place, for mremap, when the pages after it are
 * free: they are mapped read-only from the file and join the entry.
 * Returns the mapping, or MAP_FAILED when the room is taken.  Under
 * cow__mutex.
 */
static void *cow__grow_remap(int k, size_t first, uintptr_t old,
                             size_t oldlen, size_t new_size, int fd)
{
    struct cow__mapping *m = &cow__mappings[k];
    size_t grow = cow__round_page(new_size) - oldlen;
    int ext_prot = cow__page_prot(m, first + oldlen / cow__page - 1);
    off_t off = (off_t)(m->offset + first * cow__page + oldlen);
    struct cow__mapping d;
    sigset_t saved;
    void *p;
    int j;

    p = cow__sys_mmap((void *)(old + oldlen), grow, ext_prot & ~PROT_WRITE,
                      MAP_SHARED | MAP_FIXED_NOREPLACE, fd, off);
    if (p == MAP_FAILED)
        return MAP_FAILED;
    if (p != (void *)(old + oldlen)) {
        /* A kernel before 4.17 took MAP_FIXED_NOREPLACE as a hint. */
        cow__sys_munmap(p, grow);
        return MAP_FAILED;
    }
    j = cow__move_prepare(k, first, old, new_size, &d);
    if (j == 0) {
        cow__table_lock(&saved);
        j = cow__mapping_move(k, first, oldlen / cow__page, &d, ext_prot);
        cow__table_unlock(&saved);
    }
    if (j < 0) {
        cow__sys_munmap(p, grow);
        return MAP_FAILED;
    }
    cow__release_gone();

    return (void *)old;
}

/*
 * The move of a uffd mapping, for mremap: one kernel mapping, which the
 * kernel moves, but a move drops its userfaultfd registration and the
 * record of which pages were written.  Those pages are noted in the
 * table first, and the moved range is registered again with all other
 * pages write-protected.  A write racing with the move itself may go
 * unrecorded, as it could be lost without libcow.  Under cow__mutex.
 */
static void *cow__move_uffd(int k, size_t first, uintptr_t old,
                            size_t oldlen, size_t new_size, int flags,
                            uintptr_t want)
{
    struct cow__mapping *m = &cow__mappings[k];
    struct cow__region vec[64];
    uintptr_t from = old;
    int ext_prot = cow__page_prot(m, first + oldlen / cow__page - 1);
    struct cow__mapping d;
    sigset_t saved;
    void *p = MAP_FAILED;
    long n = 0;
    int j;

    if (cow__move_prepare(k, first, 0, new_size, &d) != 0)
        return cow__fail(ENOMEM);
    cow__table_lock(&saved);
    while (from < old + oldlen && n >= 0) {
        long r;

        n = cow__uffd_scan(&from, old + oldlen, false, vec, 64);
        for (r = 0; r < n; r++) {
            uintptr_t a;

            for (a = vec[r].start; a < vec[r].end; a += cow__page)
                cow__set_state(m, (a - m->start) / cow__page, COW__DIRTY);
        }
    }
    if (n >= 0)
        p = cow__sys_mremap((void *)old, oldlen, cow__round_page(new_size),
                            flags, (void *)want);
    if (p == MAP_FAILED) {
        int err = n < 0 ? (int)-n : errno;

        cow__uffd_arm(m, first, first + oldlen / cow__page);
        cow__table_unlock(&saved);
        cow__move_abandon(&d);
        return cow__fail(err);
    }
    d.start = (uintptr_t)p;
    j = cow__mapping_move(k, first, oldlen / cow__page, &d, ext_prot);
    if (j < 0 ||
        cow__uffd_arm(&cow__mappings[j], 0, cow__mappings[j].npages) != 0) {
        cow__say("cannot track a moved mapping; stopping rather than lose "
                 "writes");
        abort();
    }
    cow__table_unlock(&saved);
    cow__release_gone();

    return p;
}

/*
 * mremap of a managed mapping.  Shrinking unmaps the tail, which is
 * committed first as munmap would.  Moving or growing keeps every page
 * what it was: private pages stay private, with their snapshots, pages
 * past the old end show the file.  The old range must be wholly inside
 * one mapping's live pages, as the kernel requires of a kernel mapping.
 * Duplicating a mapping (an old size of 0) and MREMAP_DONTUNMAP are not
 * supported for managed mappings: EINVAL.  Under cow__mutex.
 */
static void *cow__remap_managed(uintptr_t old, size_t old_size,
                                size_t new_size, int flags, uintptr_t want)
{
    size_t oldlen = cow__round_page(old_size);
    size_t newlen = cow__round_page(new_size);
    bool fixed = (flags & MREMAP_FIXED) != 0;
    sigset_t saved;
    size_t first;
    void *p;
    int fd;
    int k;

    if ((old & (cow__page - 1)) != 0 || old_size == 0 || new_size == 0 ||
        (flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED)) != 0 ||
        (fixed && (!(flags & MREMAP_MAYMOVE) ||
                   (want & (cow__page - 1)) != 0 ||
                   (want < old + oldlen && old < want + newlen))))
        return cow__fail(EINVAL);
    k = cow__mapping_holding(old, oldlen, &first);
    if (k < 0)
        return cow__fail(EFAULT);
    fd = cow__base_fd(cow__mappings[k].base);
    if (fd < 0)
        return cow__fail(EBADF);
    if (newlen < oldlen) {
        cow__commit_range(old + newlen, oldlen - newlen);
        cow__pte_release_range(old + newlen, oldlen - newlen);
        if (cow__sys_munmap((void *)(old + newlen), oldlen - newlen) != 0)
            return MAP_FAILED;
        cow__range_gone(old + newlen, oldlen - newlen);
        oldlen = newlen;
    }
    if (fixed && cow__range_managed(want, newlen)) {
        cow__commit_range(want, newlen);
        cow__pte_release_range(want, newlen);
        cow__range_gone(want, newlen);
    }
    if (cow__mappings[k].engine == COW__ENGINE_UFFD) {
        cow__table_lock(&saved);
        cow__uffd_child_baseline(&cow__mappings[k]);
        cow__table_unlock(&saved);
        return cow__move_uffd(k, first, old, oldlen, new_size, flags, want);
    }
    if (!fixed && newlen == oldlen)
        return (void *)old;
    if (!fixed) {
        p = cow__grow_remap(k, first, old, oldlen, new_size, fd);
        if (p != MAP_FAILED || !(flags & MREMAP_MAYMOVE))
            return p != MAP_FAILED ? p : cow__fail(ENOMEM);
    }

    return cow__move_remap(k, first, old, oldlen, new_size,
                           fixed ? want : 0, fd);
}

COW__EXPORT
void *mremap(void *old, size_t old_size, size_t new_size, int flags, ...)
{
    void *want = NULL;
    void *p;
    va_list ap;
    int saved_errno;

    if (flags & MREMAP_FIXED) {
        va_start(ap, flags);
        want = va_arg(ap, void *);
        va_end(ap);
    }
    if (!cow__range_managed((uintptr_t)old, old_size > 0 ? old_size : 1) &&
        !((flags & MREMAP_FIXED) &&
          cow__range_managed((uintptr_t)want, new_size)))
        return cow__sys_mremap(old, old_size, new_size, flags, want);

    cow__lock();
    if (cow__range_managed((uintptr_t)old, old_size > 0 ? old_size : 1)) {
        p = cow__remap_managed((uintptr_t)old, old_size, new_size, flags,
                               (uintptr_t)want);
    } else {
        /* Only the destination is managed: it is unmapped, so commit it. */
        cow__commit_range((uintptr_t)want, new_size);
        cow__range_gone((uintptr_t)want, new_size);
        p = cow__sys_mremap(old, old_size, new_size, flags, want);
    }
    saved_errno = errno;
    cow__unlock();
    errno = saved_errno;

    return p;
}

/*
 * MADV_DONTNEED on a shared mapping only drops page table entries, and
 * the data stays in the file; on libcow's private pages it would throw
 * away the program's writes.  So managed pages keep their contents and
 * get no such advice, while the rest of the range gets it.  MADV_FREE,
 * which the kernel refuses for a file mapping, is refused likewise
 * (done to a private page, it would let the kernel drop the page).
 * MADV_REMOVE reaches the kernel, which refuses it for pages that are
 * not shared and writable, as managed pages never are.
 */
static bool cow__drops_pages(int advice)
{
    return advice == MADV_DONTNEED ||
#ifdef MADV_DONTNEED_LOCKED
           advice == MADV_DONTNEED_LOCKED ||
#endif
           advice == MADV_FREE;
}

COW__EXPORT
int madvise(void *addr, size_t length, int advice)
{
    uintptr_t start = (uintptr_t)addr;
    uintptr_t p;
    int rc = 0;

    if (!cow__drops_pages(advice) || !cow__range_managed(start, length))
        return (int)syscall(SYS_madvise, addr, length, advice);
    if ((start & (cow__page - 1)) != 0 || advice == MADV_FREE) {
        errno = EINVAL;
        return -1;
    }
    length = cow__round_page(length);
    for (p = start; p < start + length && rc == 0; p += cow__page)
        if (!cow__range_managed(p, cow__page))
            rc = (int)syscall(SYS_madvise, (void *)p, cow__page, advice);

    return rc;
}

/*
 * ftruncate of a file COW_PATHS selects, to the size it already has, is
 * not passed on: it would change nothing but the file's times, and cowd
 * would take the base for changed since its logs were made.  (LMDB does
 * this each time it maps its file for writing.)  Any other size goes
 * through: libcow manages what a program writes through its mappings,
 * not the size of the file.
 */
COW__EXPORT
int ftruncate(int fd, off_t length)
{
    struct stat st;

    if (cow__npatterns > 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
        st.st_size == length && cow__path_matches(fd))
        return 0;

    return (int)syscall(SYS_ftruncate, fd, length);
}

COW__EXPORT
int ftruncate64(int fd, off_t length)
{
    return ftruncate(fd, length);
}

/*
 * Prepares the C API on first use: the handler, then one attempt to reach
 * cowd (later commits retry).  Under cow__mutex.
 */
static int cow__api_ready(void)
{
    int rc = cow__runtime();

    if (rc == 0 && !cow__tried)
        cow__connect();

    return rc;
}

COW__EXPORT
void *cow_map(int fd, size_t length, off_t offset)
{
    struct stat st;
    void *p;
    int rc;

    if (length == 0 || offset < 0) {
        errno = EINVAL;
        return NULL;
    }
    if (fstat(fd, &st) != 0)
        return NULL;
    if (!S_ISREG(st.st_mode)) {
        errno = ENODEV;
        return NULL;
    }

    cow__lock();
    rc = cow__api_ready();
    if (rc == 0 && ((size_t)offset & (cow__page - 1)) != 0)
        rc = -EINVAL;
    p = NULL;
    if (rc == 0) {
        p = cow__sys_mmap(NULL, length, PROT_READ, MAP_SHARED, fd, offset);
        if (p == MAP_FAILED) {
            rc = -errno;
            p = NULL;
        }
    }
    if (p != NULL) {
        rc = cow__register(p, length, PROT_READ | PROT_WRITE, offset, fd,
                           &st, true);
        if (rc != 0) {
            cow__sys_munmap(p, length);
            p = NULL;
        }
    }
    cow__unlock();
    if (rc != 0)
        errno = -rc;

    return p;
}

/* Checks a cow_write() range against the mapping and the file. */
static int cow__write_range(const struct cow__mapping *m, size_t offset,
                            size_t len)
{
    struct stat st;
    size_t i;

    if (offset > m->length || len > m->length - offset)
        return -EINVAL;
    if (fstat(cow__bases[m->base].fd, &st) != 0)
        return -errno;
    if (m->offset + offset + len > (uint64_t)st.st_size)
        return -EINVAL;

    /* Pages turn GONE only under cow__mutex, which the caller holds. */
    for (i = offset / cow__page; len > 0 && i <= (offset + len - 1) /
                                                     cow__page;
         i++)
        if (cow__state(m, i) == COW__GONE)
            return -EFAULT;

    return 0;
}

COW__EXPORT
int cow_write(void *map, size_t offset, const void *data, size_t len)
{
    struct cow__mapping *m;
    int k;
    int rc;

    cow__lock();
    k = cow__ready ? cow__mapping_at((uintptr_t)map) : -ENOENT;
    if (k < 0 || !cow__mappings[k].api) {
        cow__unlock();
        return -ENOENT;
    }
    m = &cow__mappings[k];
    rc = cow__write_range(m, offset, len);
    if (rc == 0 && len > 0) {
        /*
         * The copy faults its pages private as any store would.  The
         * record is added after it: should that fail, the bytes are
         * still in the page and the diff records them at the commit.
         */
        memmove((unsigned char *)map + offset, data, len);
        rc = cow__batch_add(&cow__bases[m->base].writes, m->offset + offset,
                            (unsigned char *)map + offset, len);
    }
    cow__unlock();

    return rc;
}

/* The base of the managed page holding addr, or -ENOENT. */
static int cow__base_of(uintptr_t addr)
{
    struct cow__mapping *m;
    sigset_t saved;
    size_t i;
    int k = -ENOENT;

    cow__table_lock(&saved);
    if (cow__find_page(addr, &m, &i) == 0)
        k = m->base;
    cow__table_unlock(&saved);

    return k;
}

COW__EXPORT
int cow_commit(void *map)
{
    int rc;
    int k;

    cow__lock();
    if (!cow__ready) {
        rc = map == NULL ? 0 : -ENOENT;
    } else if (map == NULL) {
        rc = cow__commit_every_base(false);
    } else {
        k = cow__base_of((uintptr_t)map);
        rc = k < 0 ? k : cow__commit_base(k, false);
    }
    cow__unlock();

    return rc;
}

/*
 * Unmaps the live pages of m, run by run: a hole a partial munmap left
 * may hold another mapping by now.  Returns 0 or the negative errno of
 * the first failure.
 */
static int cow__unmap_live(const struct cow__mapping *m)
{
    size_t a = 0;
    size_t e;
    int rc = 0;

    while (a < m->npages) {
        if (cow__state(m, a) == COW__GONE) {
            a++;
            continue;
        }
        for (e = a; e < m->npages && cow__state(m, e) != COW__GONE; e++)
            ;
        if (cow__sys_munmap((void *)(m->start + a * cow__page),
                            (e - a) * cow__page) != 0 &&
            rc == 0)
            rc = -errno;
        a = e;
    }

    return rc;
}

COW__EXPORT
int cow_unmap(void *map)
{
    int rc;
    int err;
    int k;

    cow__lock();
    k = cow__ready ? cow__mapping_at((uintptr_t)map) : -ENOENT;
    if (k < 0) {
        cow__unlock();
        return -ENOENT;
    }
    rc = cow__commit_base(cow__mappings[k].base, false);
    cow__pte_release_range(cow__mappings[k].start,
                           cow__mappings[k].npages * cow__page);
    err = cow__unmap_live(&cow__mappings[k]);
    cow__entry_gone(k);
    cow__unlock();

    return rc != 0 ? rc : err;
}

/* Splits COW_PATHS into its non-empty lines. */
static int cow__parse_patterns(const char *paths)
{
    char *copy = strdup(paths);
    char *line;
    char *next;
    size_t n = 1;
    const char *p;

    if (copy == NULL)
        return -ENOMEM;
    for (p = paths; *p != '\0'; p++)
        n += *p == '\n';
    cow__patterns = calloc(n, sizeof(*cow__patterns));
    if (cow__patterns == NULL) {
        free(copy);
        return -ENOMEM;
    }
    for (line = copy; line != NULL; line = next) {
        next = strchr(line, '\n');
        if (next != NULL)
            *next++ = '\0';
        if (*line != '\0')
            cow__patterns[cow__npatterns++] = line;
    }

    return 0;
}

/*
 * Reads all of /proc/self/maps into b (NUL-terminated).  Returns 0 or a
 * negative errno.
 */
static int cow__read_maps(struct cow__buf *b)
{
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0)
        return -errno;
    do {
        if (cow__buf_reserve(b, 65536) != 0) {
            close(fd);
            return -ENOMEM;
        }
        n = read(fd, b->data + b->len, b->cap - b->len - 1);
        if (n > 0)
            b->len += (size_t)n;
    } while (n > 0 || (n < 0 && errno == EINTR));
    close(fd);
    b->data[b->len] = '\0';

    return 0;
}

/*
 * Takes over one writable shared mapping found in /proc/self/maps, if
 * its file matches COW_PATHS and is still the file the mapping shows:
 * the mapping is made read-only in place and registered.  Under
 * cow__mutex.
 */
static void cow__adopt(uintptr_t start, uintptr_t end, const char *perms,
                       uint64_t offset, unsigned maj, unsigned min,
                       unsigned long ino, const char *path)
{
    int prot = PROT_READ | PROT_WRITE | (perms[2] == 'x' ? PROT_EXEC : 0);
    struct stat st;
    int fd;
    int rc;

    if (cow__range_managed(start, end - start))
        return;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_ino != ino ||
        major(st.st_dev) != maj || minor(st.st_dev) != min ||
        !cow__path_matches(fd)) {
        close(fd);
        return;
    }
    rc = cow__sys_mprotect((void *)start, end - start, prot & ~PROT_WRITE);
    if (rc == 0)
        rc = cow__register((void *)start, end - start, prot, (off_t)offset,
                           fd, &st, false);
    close(fd);
    if (rc != 0) {
        cow__sys_mprotect((void *)start, end - start, prot);
        cow__say("cannot take over the shared mapping of %s made before "
                 "libcow started: %s; its writes go to the file",
                 path, cow__strerror(rc < 0 ? -rc : errno));
        return;
    }
    cow__say("took over a writable shared mapping of %s made before libcow "
             "started; what was written to it before went to the file",
             path);
}

/*
 * Finds the writable shared mappings of matching files that exist before
 * libcow started (made by a raw system call, or before libcow was
 * loaded) and takes them over.  Under cow__mutex.
 */
static void cow__adopt_existing(void)
{
    struct cow__buf maps = { 0 };
    char *line;
    char *next;

    if (cow__read_maps(&maps) != 0) {
        cow__buf_free(&maps);
        return;
    }
    for (line = (char *)maps.data; *line != '\0'; line = next) {
        unsigned long long start;
        unsigned long long end;
        unsigned long long offset;
        unsigned long ino;
        unsigned maj;
        unsigned min;
        char perms[5];
        int used = 0;
        char *path;

        next = strchr(line, '\n');
        if (next == NULL)
            next = line + strlen(line);
        else
            *next++ = '\0';
        if (sscanf(line, "%llx-%llx %4s %llx %x:%x %lu %n", &start, &end,
                   perms, &offset, &maj, &min, &ino, &used) < 7 ||
            used == 0)
            continue;
        path = line + used;
        if (perms[1] == 'w' && perms[3] == 's' && path[0] == '/')
            cow__adopt((uintptr_t)start, (uintptr_t)end, perms, offset, maj,
                       min, ino, path);
    }
    cow__buf_free(&maps);
}

/*
 * Starts libcow for `cowctl run`, once: from its constructor, or earlier
 * from the first mmap that could be managed.  Without COW_PATHS it must
 * do nothing at all: it may be running inside the Python client library,
 * which only wants the C API.
 */
static void cow__init(void)
{
    const char *paths = getenv("COW_PATHS");
    const char *engine = getenv("COW_ENGINE");
    const char *debug = getenv("COW_DEBUG");
    bool uffd = engine != NULL && strcmp(engine, "uffd") == 0;
    bool pte = engine != NULL && strcmp(engine, "pteditor") == 0;
    const char *why = NULL;
    int rc;

    if (paths == NULL || *paths == '\0')
        return;
    cow__debug_on = debug != NULL && strcmp(debug, "1") == 0;

    /*
     * Running unmanaged would let the program write to the base file, so
     * an engine this library cannot provide stops the program instead.
     */
    if (engine != NULL && *engine != '\0' && strcmp(engine, "auto") != 0 &&
        strcmp(engine, "remap") != 0 && !uffd && !pte) {
        cow__say("engine %s is not available", engine);
        _exit(1);
    }

    cow__lock();
    rc = cow__parse_patterns(paths);
    if (rc == 0)
        rc = cow__runtime();
    if (rc != 0) {
        cow__say("cannot start: %s", cow__strerror(-rc));
        _exit(1);
    }
    if (uffd && cow__uffd_available(&why) != 0) {
        cow__say("engine uffd is not available: %s", why);
        _exit(1);
    }
    if (uffd) {
        cow__engine_name = "uffd";
        cow__switch_at = 0;
    }
    if (pte) {
        /* Swapped entries cost no kernel mapping: never switch. */
        cow__engine_name = "pteditor";
        cow__pte_on = true;
        cow__switch_at = SIZE_MAX;
    }
    /* The fault channel first: without it the program must not run. */
    if (pte && cow__pte_start(cow__socket) != 0) {
        cow__say("engine pteditor is not available from cowd at %s: %s",
                 cow__socket, cow__pte_error());
        cow__unlock();
        _exit(1);
    }
    cow__connect();
    cow__adopt_existing();
    cow__unlock();
}

__attribute__((constructor))
static void cow__start(void)
{
    pthread_once(&cow__once, cow__init);
}

/*
 * Commits everything at normal exit: exit() runs the destructors, which
 * _exit() and the exec family skip (process.c commits for those).
 */
__attribute__((destructor))
static void cow__fini(void)
{
    cow__finish("exit", true);
}
