/*
 * handler.c: the SIGSEGV handler of the remap engine.
 *
 * A managed mapping is mapped without PROT_WRITE, so the first write to
 * each of its pages faults.  The handler copies the faulting page into a
 * fresh anonymous page and moves the copy over the file page with
 * mremap(MREMAP_FIXED); the CPU then retries the write, which lands in
 * the private copy.  A page committed since (read-only again) is
 * snapshotted and made writable in place.  Any other fault is not ours and
 * goes to whatever handled SIGSEGV before libcow, or kills the process as
 * the default action would.
 *
 * The handler runs with every signal blocked (see cow__handler_install),
 * calls only async-signal-safe functions (raw system calls, fstat, write,
 * sigaction, memcpy) and takes only the table spinlock, which no thread
 * holds with signals deliverable.  Deciding
 * what to do from the page state and changing the mapping happen under
 * that one lock, so threads faulting on the same page at once make one
 * copy between them and each retries its write on it.
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include "cow_internal.h"

/*
 * What handles SIGSEGV besides us: faults that are not ours go there.
 * First the action libcow replaced; then, once libcow is installed, what
 * the program asks for through sigaction() or signal(), which libcow
 * records here instead of letting it replace the handler.  Guarded by the
 * table spinlock.
 */
static struct sigaction cow__previous;

static atomic_bool cow__installed;

/* libc's sigaction, behind the wrapper at the end of this file. */
static int (*cow__real_sigaction)(int, const struct sigaction *,
                                  struct sigaction *);

/*
 * Finds libc's sigaction once, in normal context, before the handler can
 * need it.  Returns 0 or -1 when there is none, which cannot happen in a
 * process linked with libc.
 */
static int cow__resolve_sigaction(void)
{
    if (cow__real_sigaction == NULL)
        cow__real_sigaction = (int (*)(int, const struct sigaction *,
                                       struct sigaction *))
            dlsym(RTLD_NEXT, "sigaction");

    return cow__real_sigaction == NULL ? -1 : 0;
}

/* Outcome of cow__fault. */
enum {
    COW__NOT_OURS,
    COW__RETRY,
    COW__NO_COPY,
};

static const char cow__no_copy_msg[] =
    "libcow: cannot make a private copy of a page "
    "(vm.max_map_count reached?)\n";

/*
 * Replaces the CLEAN file page at page with a private copy of it.  The
 * page is first checked to lie inside the file: reading a page wholly
 * past the end would raise SIGBUS inside the handler, so such a write is
 * left to fail as a fault that is not ours.
 */
static int cow__make_copy(struct cow__mapping *m, size_t i, void *page)
{
    struct stat st;
    void *copy;

    if (fstat(cow__bases[m->base].fd, &st) != 0 ||
        m->offset + i * cow__page >= (uint64_t)st.st_size)
        return COW__NOT_OURS;

    copy = cow__sys_mmap(NULL, cow__page, cow__page_prot(m, i),
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (copy == MAP_FAILED)
        return COW__NO_COPY;
    memcpy(copy, page, cow__page);

    /*
     * Until mremap returns, other threads still read the file page, whose
     * bytes the copy holds, and writers fault and wait on the spinlock;
     * afterwards both see the copy.  No write can fall in between.
     */
    if (cow__sys_mremap(copy, cow__page, cow__page,
                        MREMAP_MAYMOVE | MREMAP_FIXED, page) == MAP_FAILED) {
        cow__sys_munmap(copy, cow__page);
        return COW__NO_COPY;
    }
    cow__set_state(m, i, COW__DIRTY);

    return COW__RETRY;
}

/*
 * Makes a COMMITTED page writable again, keeping a snapshot of it as the
 * reference for the next commit's diff.  Without a snapshot array (only
 * if allocating it failed) the diff falls back to the base file, which
 * records again the bytes already committed but loses nothing.
 */
static int cow__reopen(struct cow__mapping *m, size_t i, void *page)
{
    void *snap = NULL;

    if (m->snap != NULL) {
        snap = cow__sys_mmap(NULL, cow__page, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (snap == MAP_FAILED)
            return COW__NO_COPY;
        memcpy(snap, page, cow__page);
    }
    if (cow__sys_mprotect(page, cow__page, cow__page_prot(m, i)) != 0) {
        if (snap != NULL)
            cow__sys_munmap(snap, cow__page);
        return COW__NO_COPY;
    }
    if (m->snap != NULL)
        m->snap[i] = snap;
    cow__set_state(m, i, COW__DIRTY);

    return COW__RETRY;
}

/*
 * Handles a write fault at addr if it falls in a managed page.  A DIRTY
 * page was made writable by another thread after this one faulted; the
 * mprotect is a no-op then, and it guarantees that retrying the write
 * cannot fault here forever should the page have been write-protected
 * behind libcow's back.  Called with signals blocked: from the handler,
 * or (faulted false) from cow__prefault.
 */
static int cow__fault(uintptr_t addr, bool faulted)
{
    struct cow__mapping *m;
    size_t i;
    void *page;
    int rc = COW__NOT_OURS;

    cow__spin_lock();
    if (cow__find_page(addr, &m, &i) != 0 ||
        !(cow__page_prot(m, i) & PROT_WRITE))
        goto out;
    page = (void *)(m->start + i * cow__page);
    switch (cow__state(m, i)) {
    case COW__CLEAN:
        rc = cow__make_copy(m, i, page);
        break;
    case COW__COMMITTED:
        rc = cow__reopen(m, i, page);
        break;
    case COW__DIRTY:
        if (!faulted ||
            cow__sys_mprotect(page, cow__page, cow__page_prot(m, i)) == 0)
            rc = COW__RETRY;
        break;
    default:
        break;
    }
out:
    cow__spin_unlock();

    return rc;
}

/* Whether the fault was a write, when the CPU tells. */
static bool cow__is_write(const void *uc)
{
#if defined(__x86_64__)
    const ucontext_t *ctx = uc;

    /* Bit 1 of the page-fault error code is set for writes. */
    return (ctx->uc_mcontext.gregs[REG_ERR] & 0x2) != 0;
#else
    (void)uc;
    return true;
#endif
}

/*
 * Passes a fault that is not ours on.  When nothing handled SIGSEGV
 * before (or it was ignored, which the kernel overrides for a fault),
 * the default action is restored: returning re-runs the instruction,
 * which faults again and kills the process with SIGSEGV, core and all.
 */
static void cow__chain(int sig, siginfo_t *si, void *uc)
{
    struct sigaction dfl;
    struct sigaction copy;
    const struct sigaction *prev = &copy;

    cow__spin_lock();
    copy = cow__previous;
    cow__spin_unlock();
    if (prev->sa_flags & SA_SIGINFO) {
        if ((void *)prev->sa_sigaction != (void *)SIG_DFL &&
            (void *)prev->sa_sigaction != (void *)SIG_IGN) {
            prev->sa_sigaction(sig, si, uc);
            return;
        }
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
        return;
    }
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    cow__real_sigaction(SIGSEGV, &dfl, NULL);
}

static void cow__on_segv(int sig, siginfo_t *si, void *uc)
{
    int saved_errno = errno;
    int rc = COW__NOT_OURS;

    if (si->si_code == SEGV_ACCERR && cow__is_write(uc))
        rc = cow__fault((uintptr_t)si->si_addr, true);
    if (rc == COW__NO_COPY) {
        ssize_t unused = write(2, cow__no_copy_msg,
                               sizeof(cow__no_copy_msg) - 1);

        (void)unused;
    }
    if (rc != COW__RETRY)
        cow__chain(sig, si, uc);
    errno = saved_errno;
}

/*
 * Makes the managed pages of [addr, addr + len) private and writable, as
 * write faults on them would, for the calls through which the kernel
 * writes into user memory and reports EFAULT instead of faulting.  Pages
 * that are not managed are left alone.  Normal context.
 */
void cow__prefault(const void *addr, size_t len)
{
    uintptr_t first = (uintptr_t)addr & ~(uintptr_t)(cow__page - 1);
    uintptr_t last = (uintptr_t)addr + (len > 0 ? len - 1 : 0);
    sigset_t all;
    sigset_t saved;
    uintptr_t i;

    if (len == 0)
        return;
    if (last < (uintptr_t)addr)
        last = UINTPTR_MAX;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    for (i = 0; i <= (last - first) / cow__page; i++) {
        if (cow__fault(first + i * cow__page, false) == COW__NO_COPY) {
            ssize_t unused = write(2, cow__no_copy_msg,
                                   sizeof(cow__no_copy_msg) - 1);

            (void)unused;
            break;
        }
    }
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
}

/*
 * Installs the handler once, remembering the action it replaces.  Every
 * signal is blocked while it runs: a handler for another signal that
 * interrupted it between taking and releasing the spinlock, then wrote to
 * a managed page, would spin on the lock forever.  Under cow__mutex.
 */
int cow__handler_install(void)
{
    struct sigaction sa;

    if (atomic_load(&cow__installed))
        return 0;
    if (cow__resolve_sigaction() != 0)
        return -ENOSYS;
    if (cow__real_sigaction(SIGSEGV, NULL, &cow__previous) != 0)
        return -errno;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = cow__on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigfillset(&sa.sa_mask);
    if (cow__real_sigaction(SIGSEGV, &sa, NULL) != 0)
        return -errno;
    atomic_store(&cow__installed, true);

    return 0;
}

/*
 * Keeps libcow's handler in place when the program sets its own SIGSEGV
 * action after libcow was installed (Python's faulthandler does): the
 * program's action becomes the one faults that are not ours chain to,
 * and the program sees what it would have seen.  Other signals, and all
 * signals before libcow is installed, go straight to libc.  The
 * program's sa_mask and flags are not applied when its handler is
 * chained to: it runs inside libcow's, with every signal blocked.
 */
COW__EXPORT
int sigaction(int sig, const struct sigaction *act, struct sigaction *old)
{
    struct sigaction prev;
    sigset_t saved;

    if (sig != SIGSEGV || !atomic_load(&cow__installed)) {
        if (cow__resolve_sigaction() != 0) {
            errno = ENOSYS;
            return -1;
        }
        return cow__real_sigaction(sig, act, old);
    }
    cow__table_lock(&saved);
    prev = cow__previous;
    if (act != NULL)
        cow__previous = *act;
    cow__table_unlock(&saved);
    if (old != NULL)
        *old = prev;

    return 0;
}

/*
 * glibc's signal() calls its private sigaction, which the wrapper above
 * never sees, so SIGSEGV needs this one too.  It has glibc's semantics:
 * the handler stays installed and interrupted calls restart.
 */
COW__EXPORT
sighandler_t signal(int sig, sighandler_t handler)
{
    static sighandler_t (*real)(int, sighandler_t);
    struct sigaction sa;
    struct sigaction old;

    if (sig != SIGSEGV || !atomic_load(&cow__installed)) {
        if (real == NULL)
            real = (sighandler_t(*)(int, sighandler_t))dlsym(RTLD_NEXT,
                                                             "signal");
        if (real == NULL) {
            errno = ENOSYS;
            return SIG_ERR;
        }
        return real(sig, handler);
    }
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, sig);
    sigaction(sig, &sa, &old);

    /* sa_handler shares its storage with sa_sigaction. */
    return old.sa_handler;
}
