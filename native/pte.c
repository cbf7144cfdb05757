/*
 * pte.c: libcow's side of the pteditor engine, the fault channel.
 *
 * With COW_ENGINE=pteditor a managed mapping is handled as by the remap
 * engine (same page states, same commits), except for how a private copy
 * gets in place: instead of moving the copy over the file page with
 * mremap, the handler asks cowd, which holds /dev/pteditor, to point the
 * page-table entry of the file page at the copy.  The file page's kernel
 * mapping stays whole and read-only; only its entries change.  So
 * protection here comes from the entries cowd writes, never from
 * mprotect: giving the file mapping PROT_WRITE would let writes reach
 * the base file once an entry is restored.
 *
 * The requests go over a connection of their own, the fault channel,
 * opened at start after the session's hello: a fault must never wait
 * behind a commit on the session's connection, and the handler cannot
 * share a connection with code that holds cow__mutex.  The channel says
 * hello with "faults": true and belongs to the process cowd sees at its
 * other end; cowd resolves both addresses in that process.  A forked
 * child, which inherits the parent's channel, opens its own on first
 * use, from the handler if need be.
 *
 * Everything here is async-signal-safe: raw socket calls on the channel,
 * frames encoded into and decoded from stack buffers by msgpack.c, which
 * allocates nothing while a frame fits.  The channel is used only with
 * the table spinlock held and every signal blocked, which serializes the
 * requests of all threads (a thread faulting meanwhile spins until the
 * reply is in).
 */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "cow_internal.h"

/* How long cowd may take to answer a fault before it counts as gone. */
#define COW__PTE_TIMEOUT_SEC 30

/* Requests and replies are a few dozen bytes; errors a line of text. */
#define COW__PTE_FRAME_MAX 512
#define COW__PTE_REPLY_MAX 2048

bool cow__pte_on;

/* The channel; guarded by the table spinlock. */
static struct {
    int fd;
    dev_t dev;
    ino_t ino;
    pid_t pid;      /* the process that opened it */
    uint32_t msgid;
} cow__chan = { .fd = -1 };

static struct sockaddr_un cow__chan_addr = { .sun_family = AF_UNIX };

/* Why the last request failed: cowd's error code and message. */
static char cow__pte_why[256];

const char *cow__pte_error(void)
{
    return cow__pte_why;
}

static void cow__pte_set_why(const char *a, size_t alen, const char *b,
                             size_t blen)
{
    size_t cap = sizeof(cow__pte_why) - 1;
    size_t n = alen < cap ? alen : cap;

    memcpy(cow__pte_why, a, n);
    if (blen > 0 && n + 2 < cap) {
        memcpy(cow__pte_why + n, ": ", 2);
        n += 2;
        if (blen > cap - n)
            blen = cap - n;
        memcpy(cow__pte_why + n, b, blen);
        n += blen;
    }
    cow__pte_why[n] = '\0';
}

static int cow__pte_fail(int rc, const char *why)
{
    cow__pte_set_why(why, strlen(why), "", 0);

    return rc;
}

static void cow__chan_close(void)
{
    if (cow__fd_is(cow__chan.fd, cow__chan.dev, cow__chan.ino))
        close(cow__chan.fd);
    cow__chan.fd = -1;
}

static int cow__send_frame(const struct cow__buf *b)
{
    size_t done = 0;

    if (b->err != 0)
        return cow__pte_fail(-EMSGSIZE, "request too large");
    while (done < b->len) {
        ssize_t n = send(cow__chan.fd, b->data + done, b->len - done,
                         MSG_NOSIGNAL);

        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return cow__pte_fail(-errno, "cannot send to cowd");
        done += (size_t)n;
    }

    return 0;
}

/* Maps cowd's stable error codes to the errno the caller acts on. */
static int cow__code_errno(const char *code, uint32_t len)
{
    if (len == 7 && memcmp(code, "no-page", 7) == 0)
        return -ENOENT;
    if (len == 4 && memcmp(code, "busy", 4) == 0)
        return -EAGAIN;
    if (len == 4 && memcmp(code, "gone", 4) == 0)
        return -ESRCH;

    return -EIO;
}

/* Reads an error map into cow__pte_why; returns its errno. */
static int cow__read_refusal(struct cow__mpr *r)
{
    const char *code = "?";
    const char *message = "";
    uint32_t code_len = 1;
    uint32_t message_len = 0;
    uint32_t n;
    uint32_t k;

    if (cow__mp_get_map(r, &n) != 0)
        return cow__pte_fail(-EPROTO, "malformed error from cowd");
    for (k = 0; k < n; k++) {
        const char *key;
        uint32_t len;

        if (cow__mp_get_str(r, &key, &len) != 0)
            return cow__pte_fail(-EPROTO, "malformed error from cowd");
        if (len == 4 && memcmp(key, "code", 4) == 0 &&
            cow__mp_get_str(r, &code, &code_len) == 0)
            continue;
        if (len == 7 && memcmp(key, "message", 7) == 0 &&
            cow__mp_get_str(r, &message, &message_len) == 0)
            continue;
        if (cow__mp_skip(r) != 0)
            return cow__pte_fail(-EPROTO, "malformed error from cowd");
    }
    cow__pte_set_why(message, message_len, "", 0);

    return cow__code_errno(code, code_len);
}

/*
 * Waits for the reply to request msgid.  Returns 0, the errno of cowd's
 * refusal (the channel stays up), or -EPROTO and the like for a broken
 * channel, which the caller closes.
 */
static int cow__recv_reply(uint32_t msgid)
{
    unsigned char in[COW__PTE_REPLY_MAX];
    struct cow__mpr r = { .p = in };
    uint32_t n;
    uint64_t type;
    uint64_t id;

    for (;;) {
        ssize_t got;
        struct cow__mpr probe = { .p = in, .len = r.len };

        if (r.len > 0 && cow__mp_skip(&probe) == 0)
            break;
        if (r.len == sizeof(in))
            return cow__pte_fail(-EMSGSIZE, "oversized reply from cowd");
        got = recv(cow__chan.fd, in + r.len, sizeof(in) - r.len, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return cow__pte_fail(-ETIMEDOUT, "cowd does not answer");
        if (got < 0)
            return cow__pte_fail(-errno, "cannot receive from cowd");
        if (got == 0)
            return cow__pte_fail(-EPIPE, "cowd closed the fault channel");
        r.len += (size_t)got;
    }
    if (cow__mp_get_array(&r, &n) != 0 || n != 4 ||
        cow__mp_get_uint(&r, &type) != 0 || type != 1 ||
        cow__mp_get_uint(&r, &id) != 0 || id != msgid)
        return cow__pte_fail(-EPROTO, "unexpected reply from cowd");
    if (cow__mp_next_is_nil(&r))
        return 0;

    return cow__read_refusal(&r);
}

/*
 * Sends the request in b (msgid cow__chan.msgid) and waits for its
 * reply.  Closes the channel when the transport or protocol broke.
 */
static int cow__chan_call(const struct cow__buf *b)
{
    int rc = cow__send_frame(b);

    if (rc == 0)
        rc = cow__recv_reply(cow__chan.msgid);
    if (rc != 0 && rc != -ENOENT && rc != -EAGAIN && rc != -ESRCH &&
        rc != -EIO)
        cow__chan_close();

    return rc;
}

/* connect(2) on a blocking socket, finishing it if a signal came. */
static int cow__chan_connect(int fd)
{
    struct pollfd p = { .fd = fd, .events = POLLOUT };
    socklen_t len = sizeof(int);
    int err = 0;

    if (connect(fd, (const struct sockaddr *)&cow__chan_addr,
                sizeof(cow__chan_addr)) == 0)
        return 0;
    if (errno != EINTR)
        return -errno;
    while (poll(&p, 1, -1) < 0)
        if (errno != EINTR)
            return -errno;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
        return -errno;

    return -err;
}

/* Opens the channel and says hello on it.  Spinlock held. */
static int cow__chan_open(void)
{
    struct timeval tv = { .tv_sec = COW__PTE_TIMEOUT_SEC };
    unsigned char frame[COW__PTE_FRAME_MAX];
    struct cow__buf b = { .data = frame, .cap = sizeof(frame) };
    struct stat st;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int rc;

    if (fd < 0)
        return cow__pte_fail(-errno, "cannot make a socket");
    rc = cow__chan_connect(fd);
    if (rc != 0 || fstat(fd, &st) != 0) {
        close(fd);
        return cow__pte_fail(rc != 0 ? rc : -errno, "cannot reach it");
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    cow__chan.fd = fd;
    cow__chan.dev = st.st_dev;
    cow__chan.ino = st.st_ino;
    cow__chan.pid = getpid();

    cow__mp_put_request(&b, ++cow__chan.msgid, "hello", 3);
    cow__mp_put_cstr(&b, "pid");
    cow__mp_put_uint(&b, (uint64_t)cow__chan.pid);
    cow__mp_put_cstr(&b, "engine");
    cow__mp_put_cstr(&b, "pteditor");
    cow__mp_put_cstr(&b, "faults");
    cow__mp_put_bool(&b, true);
    rc = cow__chan_call(&b);
    if (rc != 0)
        cow__chan_close();

    return rc;
}

/*
 * The channel of this process, opened if it has none: a forked child
 * must not speak on its parent's, and a program may have closed it.
 */
static int cow__chan_ready(void)
{
    if (cow__chan.fd >= 0 &&
        (cow__chan.pid != getpid() ||
         !cow__fd_is(cow__chan.fd, cow__chan.dev, cow__chan.ino))) {
        if (cow__chan.pid != getpid() &&
            cow__fd_is(cow__chan.fd, cow__chan.dev, cow__chan.ino))
            close(cow__chan.fd); /* our copy only; the parent keeps its */
        cow__chan.fd = -1;
    }
    if (cow__chan.fd >= 0)
        return 0;

    return cow__chan_open();
}

/*
 * Opens the fault channel to cowd at path, before any fault.  Returns 0,
 * or a negative errno with the reason in cow__pte_error().  Normal
 * context, under cow__mutex.
 */
int cow__pte_start(const char *path)
{
    sigset_t saved;
    size_t len = strlen(path);
    int rc;

    if (len >= sizeof(cow__chan_addr.sun_path))
        return cow__pte_fail(-ENAMETOOLONG, "socket path too long");
    memcpy(cow__chan_addr.sun_path, path, len + 1);
    cow__table_lock(&saved);
    rc = cow__chan_ready();
    cow__table_unlock(&saved);

    return rc;
}

/*
 * Has cowd point this process's entry for target at the page mapped at
 * copy, writable or not; copy may be target itself, to change only the
 * permission of a swapped entry.  Returns 0 or a negative errno: -ENOENT
 * when a page was not mapped (the kernel may have dropped the file page
 * since it was read), -EAGAIN when the kernel kept it busy.  Spinlock
 * held, signals blocked.
 */
int cow__pte_swap(const void *target, const void *copy, bool writable)
{
    unsigned char frame[COW__PTE_FRAME_MAX];
    struct cow__buf b = { .data = frame, .cap = sizeof(frame) };
    int rc = cow__chan_ready();

    if (rc != 0)
        return rc;
    cow__mp_put_request(&b, ++cow__chan.msgid, "pte_swap", 3);
    cow__mp_put_cstr(&b, "target");
    cow__mp_put_uint(&b, (uintptr_t)target);
    cow__mp_put_cstr(&b, "copy");
    cow__mp_put_uint(&b, (uintptr_t)copy);
    cow__mp_put_cstr(&b, "writable");
    cow__mp_put_bool(&b, writable);

    return cow__chan_call(&b);
}

/*
 * Has cowd put back the original entries of the pages [start, start +
 * pages pages) that are swapped.  Spinlock held, signals blocked.
 */
int cow__pte_restore(uintptr_t start, size_t pages)
{
    unsigned char frame[COW__PTE_FRAME_MAX];
    struct cow__buf b = { .data = frame, .cap = sizeof(frame) };
    int rc = cow__chan_ready();

    if (rc != 0)
        return rc;
    cow__mp_put_request(&b, ++cow__chan.msgid, "pte_restore", 2);
    cow__mp_put_cstr(&b, "target");
    cow__mp_put_uint(&b, start);
    cow__mp_put_cstr(&b, "pages");
    cow__mp_put_uint(&b, pages);

    return cow__chan_call(&b);
}

/*
 * Says once that restores fail.  cowd's own module then restores the
 * entries when the range goes; PTEditor's does not, and the kernel's
 * page accounting of the range is damaged.
 */
static void cow__pte_say_unrestored(void)
{
    static bool said;
    const char *parts[] = {
        "libcow: cannot restore page-table entries through cowd (",
        cow__pte_error(),
        "); cowd's pteditor module restores them when the range goes,"
        " PTEditor's does not",
    };

    if (said)
        return;
    said = true;
    cow__write_msg(parts, sizeof(parts) / sizeof(parts[0]));
}

/*
 * Puts back the original entries of the swapped pages of m in [first,
 * last), one request per run of swapped pages, and unmaps their copies;
 * the pages turn CLEAN.  The copies go even when cowd could not be
 * asked: the device holds a reference on each page it swapped in, and
 * its notifier puts the original back before the kernel unmaps or tears
 * down the range.  Spinlock held.
 */
static void cow__pte_restore_pages(struct cow__mapping *m, size_t first,
                                   size_t last)
{
    size_t i = first;

    while (i < last) {
        size_t run = i;
        size_t j;

        if (m->pcopy[i] == NULL) {
            i++;
            continue;
        }
        while (i < last && m->pcopy[i] != NULL)
            i++;
        if (cow__pte_restore(m->start + run * cow__page, i - run) != 0)
            cow__pte_say_unrestored();
        for (j = run; j < i; j++) {
            cow__sys_munmap(m->pcopy[j], cow__page);
            m->pcopy[j] = NULL;
            cow__set_state(m, j, COW__CLEAN);
            m->nprivate--;
            atomic_fetch_sub(&cow__remap_maps, 1);
        }
    }
}

/*
 * Before [start, start + length) is unmapped, and at exit: the original
 * entries of its swapped pages are put back through cowd, and the pages
 * turn CLEAN (they show the file again).  The caller has committed them.
 * Under cow__mutex.
 */
void cow__pte_release_range(uintptr_t start, size_t length)
{
    uintptr_t end = start + cow__round_page(length);
    sigset_t saved;
    size_t k;

    if (!cow__pte_on || end < start)
        return;
    cow__table_lock(&saved);
    for (k = 0; k < cow__high; k++) {
        struct cow__mapping *m = &cow__mappings[k];
        uintptr_t m_end = m->start + m->npages * cow__page;
        size_t first;
        size_t last;

        if (!m->used || m->pcopy == NULL || m->start >= end ||
            m_end <= start)
            continue;
        first = start > m->start ? (start - m->start) / cow__page : 0;
        last = end < m_end ? (end - m->start) / cow__page : m->npages;
        cow__pte_restore_pages(m, first, last);
    }
    cow__table_unlock(&saved);
}

/* At the end of the process: every swapped page goes back.  Mutex held. */
void cow__pte_release_all(void)
{
    cow__pte_release_range(0, UINTPTR_MAX - cow__page);
}

/*
 * Frees m's array of copies.  Copies still listed are unmapped: their
 * entries are no longer swapped (the range is gone).  Spinlock or
 * cow__mutex held, as for the entry's other arrays.
 */
void cow__pte_forget(struct cow__mapping *m)
{
    size_t i;

    if (m->pcopy == NULL)
        return;
    for (i = 0; i < m->npages; i++)
        if (m->pcopy[i] != NULL)
            cow__sys_munmap(m->pcopy[i], cow__page);
    cow__array_free(m->pcopy, m->npages * sizeof(void *));
    m->pcopy = NULL;
}

/*
 * Before the program moves pages [first, last) of m (mremap): their
 * original entries go back, so the kernel moves file pages it knows
 * about; the copies stay, for cow__pte_reswap at the destination.
 * Spinlock held.
 */
void cow__pte_unswap(struct cow__mapping *m, size_t first, size_t last)
{
    size_t i = first;

    if (m->pcopy == NULL)
        return;
    while (i < last) {
        size_t run = i;

        if (m->pcopy[i] == NULL) {
            i++;
            continue;
        }
        while (i < last && m->pcopy[i] != NULL)
            i++;
        if (cow__pte_restore(m->start + run * cow__page, i - run) != 0)
            cow__pte_say_unrestored();
    }
}

/*
 * Swaps in again the copies of m's pages [first, last), where they now
 * are: writable when DIRTY, read-only when COMMITTED.  A page cowd
 * cannot swap shows the file again: it turns CLEAN and its copy goes,
 * so that a write to it makes a new copy (its last committed bytes are
 * in the log, but the program no longer sees them there; stderr says
 * so).  Spinlock held.
 */
void cow__pte_reswap(struct cow__mapping *m, size_t first, size_t last)
{
    static const char lost[] =
        "libcow: a moved page could not be swapped in again; it shows the"
        " file";
    size_t i;

    if (m->pcopy == NULL)
        return;
    for (i = first; i < last; i++) {
        void *page = (void *)(m->start + i * cow__page);
        unsigned st = cow__state(m, i);

        if (m->pcopy[i] == NULL)
            continue;
        if (cow__pte_swap(page, m->pcopy[i], st == COW__DIRTY) == 0)
            continue;
        cow__write_msg((const char *[]){ lost, cow__pte_error() }, 2);
        cow__sys_munmap(m->pcopy[i], cow__page);
        m->pcopy[i] = NULL;
        cow__set_state(m, i, COW__CLEAN);
        m->nprivate--;
        atomic_fetch_sub(&cow__remap_maps, 1);
    }
}

/*
 * In a forked child, spinlock held: the copies were not inherited
 * (MADV_DONTFORK) and the kernel does not copy the entries of a shared
 * file mapping into a child, so every page of m shows the file again.
 * Its pages turn CLEAN and their copies are forgotten (their addresses
 * are free in the child).  Snapshots are left to the caller.
 */
void cow__pte_child(struct cow__mapping *m)
{
    size_t i;

    if (m->pcopy == NULL)
        return;
    for (i = 0; i < m->npages; i++) {
        if (m->pcopy[i] == NULL)
            continue;
        m->pcopy[i] = NULL;
        cow__set_state(m, i, COW__CLEAN);
        m->nprivate--;
        atomic_fetch_sub(&cow__remap_maps, 1);
    }
}
