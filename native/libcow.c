/*
 * libcow.c: start-up, the interposed mmap family, the C API of cow.h and
 * the policy of when and how changes are committed to cowd.
 *
 * Injected with LD_PRELOAD by `cowctl run`, libcow manages the MAP_SHARED
 * writable mappings of the files that COW_PATHS selects: they are mapped
 * read-only, and the SIGSEGV handler (handler.c) gives each written page a
 * private copy.  A commit (cow_commit(), msync, munmap, exit) collects
 * what changed (mappings.c) and sends it to cowd (rpc.c).  When cowd
 * cannot be reached the changes wait in memory, per base file, and go
 * first at the next commit.
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

#include "cow.h"
#include "cow_internal.h"

/* Where cowd listens when COWD_SOCKET is unset. */
#define COW__DEFAULT_SOCKET "/run/cowd/cowd.sock"

/*
 * glibc refuses an mmap offset that is not a multiple of 4096 with
 * EINVAL before asking the kernel, whatever the page size; so do we.
 */
#define COW__MMAP_OFFSET_MASK 4095

bool cow__debug_on;

/* Serializes all normal-context work; see cow_internal.h. */
static pthread_mutex_t cow__mutex = PTHREAD_MUTEX_INITIALIZER;

/* The COW_PATHS patterns; none means no transparent management. */
static char **cow__patterns;
static size_t cow__npatterns;

static char *cow__socket;

/* The handler is installed and the fork handlers registered. */
static bool cow__ready;

/* A connection was tried (the constructor's or the C API's first). */
static bool cow__tried;

/*
 * A message about cowd being unreachable was printed and cowd has not
 * been reached since: the same outage is not reported again.
 */
static bool cow__outage_reported;

/* The signal mask of the forking thread, from prepare to parent/child. */
static sigset_t cow__fork_mask;

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

static void cow__fork_prepare(void)
{
    pthread_mutex_lock(&cow__mutex);
    cow__table_lock(&cow__fork_mask);
}

static void cow__fork_parent(void)
{
    cow__table_unlock(&cow__fork_mask);
    pthread_mutex_unlock(&cow__mutex);
}

/*
 * The child is a session of its own: it must never write a frame on the
 * connection it inherited, whose other end cowd credits to the parent.
 * Log handles belong to that connection, and the records waiting to be
 * sent are the parent's, which commits them itself.
 */
static void cow__fork_child(void)
{
    int k;

    cow__after_fork_baseline();
    cow__table_unlock(&cow__fork_mask);
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
    pthread_mutex_unlock(&cow__mutex);
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
    rc = cow__handler_install();
    if (rc != 0)
        return rc;
    rc = pthread_atfork(cow__fork_prepare, cow__fork_parent,
                        cow__fork_child);
    if (rc != 0)
        return -rc;
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

/* Commits base k: collects its changes, then sends them.  Under mutex. */
static int cow__commit_base(int k)
{
    int rc = cow__collect(k);
    int sent;

    if (rc != 0)
        cow__say("cannot collect the changes of a mapped file: %s",
                 strerror(-rc));
    sent = cow__flush(k);

    return rc != 0 ? rc : sent;
}

/* Commits every base that has a mapping in the range.  Under mutex. */
static void cow__commit_range(uintptr_t start, size_t length)
{
    int bases[COW__MAX_BASES];
    int n = cow__range_bases(start, length, bases, COW__MAX_BASES);
    int j;

    for (j = 0; j < n; j++)
        cow__commit_base(bases[j]);
}

/* Commits every base, dropping those left with nothing.  Under mutex. */
static int cow__commit_all(void)
{
    int first = 0;
    int k;

    for (k = 0; k < COW__MAX_BASES; k++) {
        int rc;

        if (!cow__bases[k].used)
            continue;
        rc = cow__commit_base(k);
        if (rc != 0 && first == 0)
            first = rc;
        cow__base_maybe_drop(k);
    }

    return first;
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

static bool cow__path_matches(int fd)
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
 * Whether mmap should manage this mapping: a shared, writable mapping of
 * a regular file open for reading and writing whose path matches
 * COW_PATHS.  A descriptor not open for writing is left to the kernel,
 * which refuses it as it would without libcow.
 */
static bool cow__wanted(int prot, int flags, int fd, struct stat *st)
{
    int type = flags & MAP_TYPE;
    int fl;

    if (cow__npatterns == 0 || fd < 0 || !(prot & PROT_WRITE) ||
        (flags & MAP_ANONYMOUS) ||
        (type != MAP_SHARED && type != MAP_SHARED_VALIDATE))
        return false;
    if (fstat(fd, st) != 0 || !S_ISREG(st->st_mode))
        return false;
    fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_ACCMODE) != O_RDWR)
        return false;

    return cow__path_matches(fd);
}

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
    wanted = cow__wanted(prot, flags, fd, &st);
    replaces = (flags & MAP_FIXED) &&
               cow__range_managed((uintptr_t)addr, length);
    if (!wanted && !replaces)
        return cow__sys_mmap(addr, length, prot, flags, fd, offset);

    pthread_mutex_lock(&cow__mutex);

    /*
     * A MAP_FIXED mapping over managed pages unmaps them: commit them and
     * forget them before the new mapping exists, so that no fault on the
     * new mapping can be taken for one on the old.
     */
    if (replaces) {
        cow__commit_range((uintptr_t)addr, length);
        cow__range_gone((uintptr_t)addr, length);
    }
    if (wanted)
        map_prot = (prot & ~PROT_WRITE) | PROT_READ;
    p = cow__sys_mmap(addr, length, map_prot, flags, fd, offset);
    if (p != MAP_FAILED && wanted) {
        rc = cow__register(p, length, prot, offset, fd, &st, false);
        if (rc != 0) {
            cow__sys_munmap(p, length);
            cow__debug("cannot manage a mapping: %s", strerror(-rc));
            p = MAP_FAILED;
            errno = -rc;
        }
    }
    rc = errno;
    pthread_mutex_unlock(&cow__mutex);
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

    pthread_mutex_lock(&cow__mutex);
    cow__commit_range((uintptr_t)addr, length);
    rc = cow__sys_munmap(addr, length);
    saved_errno = errno;
    if (rc == 0)
        cow__range_gone((uintptr_t)addr, length);
    pthread_mutex_unlock(&cow__mutex);
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

    if (!cow__range_managed((uintptr_t)addr, length))
        return cow__sys_mprotect(addr, length, prot);

    pthread_mutex_lock(&cow__mutex);
    rc = cow__range_protect((uintptr_t)addr, length, prot);
    pthread_mutex_unlock(&cow__mutex);

    return rc;
}

COW__EXPORT
int msync(void *addr, size_t length, int flags)
{
    if (cow__range_managed((uintptr_t)addr, length)) {
        pthread_mutex_lock(&cow__mutex);
        cow__commit_range((uintptr_t)addr, length);
        pthread_mutex_unlock(&cow__mutex);
    }

    return cow__sys_msync(addr, length, flags);
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

    pthread_mutex_lock(&cow__mutex);
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
    pthread_mutex_unlock(&cow__mutex);
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

    pthread_mutex_lock(&cow__mutex);
    k = cow__ready ? cow__mapping_at((uintptr_t)map) : -ENOENT;
    if (k < 0 || !cow__mappings[k].api) {
        pthread_mutex_unlock(&cow__mutex);
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
    pthread_mutex_unlock(&cow__mutex);

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

    pthread_mutex_lock(&cow__mutex);
    if (!cow__ready) {
        rc = map == NULL ? 0 : -ENOENT;
    } else if (map == NULL) {
        rc = cow__commit_all();
    } else {
        k = cow__base_of((uintptr_t)map);
        rc = k < 0 ? k : cow__commit_base(k);
    }
    pthread_mutex_unlock(&cow__mutex);

    return rc;
}

COW__EXPORT
int cow_unmap(void *map)
{
    uintptr_t start;
    size_t length;
    int rc;
    int k;

    pthread_mutex_lock(&cow__mutex);
    k = cow__ready ? cow__mapping_at((uintptr_t)map) : -ENOENT;
    if (k < 0) {
        pthread_mutex_unlock(&cow__mutex);
        return -ENOENT;
    }
    start = cow__mappings[k].start;
    length = cow__mappings[k].npages * cow__page;
    rc = cow__commit_base(cow__mappings[k].base);
    if (cow__sys_munmap((void *)start, length) == 0)
        cow__range_gone(start, length);
    else
        rc = -errno;
    pthread_mutex_unlock(&cow__mutex);

    return rc;
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
 * Runs when the library is loaded.  Without COW_PATHS it must do nothing
 * at all: it may be running inside the Python client library, which only
 * wants the C API.
 */
__attribute__((constructor))
static void cow__init(void)
{
    const char *paths = getenv("COW_PATHS");
    const char *engine = getenv("COW_ENGINE");
    const char *debug = getenv("COW_DEBUG");
    int rc;

    if (paths == NULL || *paths == '\0')
        return;
    cow__debug_on = debug != NULL && strcmp(debug, "1") == 0;

    /*
     * Running unmanaged would let the program write to the base file, so
     * an engine this library cannot provide stops the program instead.
     */
    if (engine != NULL && *engine != '\0' && strcmp(engine, "auto") != 0 &&
        strcmp(engine, "remap") != 0) {
        cow__say("engine %s is not available", engine);
        _exit(1);
    }

    pthread_mutex_lock(&cow__mutex);
    rc = cow__parse_patterns(paths);
    if (rc == 0)
        rc = cow__runtime();
    if (rc != 0) {
        cow__say("cannot start: %s", strerror(-rc));
        _exit(1);
    }
    cow__connect();
    pthread_mutex_unlock(&cow__mutex);
}

/*
 * Commits everything at normal exit.  Records that cannot reach cowd now
 * are lost with the process, and that is said.
 */
__attribute__((destructor))
static void cow__fini(void)
{
    size_t lost = 0;
    int k;

    pthread_mutex_lock(&cow__mutex);
    if (cow__ready && cow__commit_all() != 0) {
        for (k = 0; k < COW__MAX_BASES; k++)
            if (cow__bases[k].used)
                lost += cow__bases[k].batch.nrecords;
    }
    if (lost > 0)
        cow__say("%zu records could not be committed at exit: %s", lost,
                 cow__rpc_error());
    pthread_mutex_unlock(&cow__mutex);
}
