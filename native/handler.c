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
 * Under the pteditor engine (pte.c) the copy is not moved: cowd points
 * the file page's entry at it, and the entry, not mprotect, says whether
 * the page may be written.
 *
 * Each private page and snapshot costs the process a kernel mapping.
 * Once libcow holds cow__switch_at of them (a quarter of
 * vm.max_map_count, leaving room for the splits they cause and for the
 * program's own mappings), the next mapping to need one switches to the
 * uffd engine (uffd.c), which needs no more, and stderr says so once.
 * Where that engine is not available, stderr says that once too, and the
 * remap engine carries on until the kernel refuses a mapping: that write
 * then crashes with a message rather than being lost.
 *
 * The handler runs with every signal blocked (see cow__handler_install),
 * calls only async-signal-safe functions (raw system calls, fstat, write,
 * sigaction, memcpy), saves and restores errno, and takes only the table
 * spinlock, which no thread holds with signals deliverable.  Deciding
 * what to do from the page state and changing the mapping happen under
 * that one lock, so threads faulting on the same page at once make one
 * copy between them and each retries its write on it.
 */
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

/* libc's sigaction and signal, behind the wrappers of this file. */
static int (*cow__real_sigaction)(int, const struct sigaction *,
                                  struct sigaction *);
static sighandler_t (*cow__real_signal)(int, sighandler_t);

/*
 * Finds libc's functions before main runs, so that neither the handler
 * nor a program setting its handlers early ever needs dlsym.
 */
__attribute__((constructor(101)))
static void cow__handler_resolve(void)
{
    COW__NEXT(cow__real_sigaction, "sigaction");
    COW__NEXT(cow__real_signal, "signal");
}

/* Returns 0, or -1 when libc's sigaction cannot be found right now. */
static int cow__resolve_sigaction(void)
{
    return COW__NEXT(cow__real_sigaction, "sigaction") == NULL ? -1 : 0;
}

/*
 * Writes the concatenation of parts to stderr in one write(2), so that
 * lines from several threads never interleave; longer lines are cut.
 * Async-signal-safe.
 */
void cow__write_msg(const char *const *parts, size_t n)
{
    char line[512];
    size_t len = 0;
    size_t k;

    for (k = 0; k < n && parts[k] != NULL; k++) {
        size_t part = strlen(parts[k]);

        if (part > sizeof(line) - 1 - len)
            part = sizeof(line) - 1 - len;
        memcpy(line + len, parts[k], part);
        len += part;
    }
    line[len++] = '\n';
    while (write(2, line, len) < 0 && errno == EINTR)
        ;
}

/* Formats v in decimal at the end of buf; returns its first digit. */
char *cow__utoa(size_t v, char *buf, size_t len)
{
    char *p = buf + len - 1;

    *p = '\0';
    do
        *--p = (char)('0' + v % 10);
    while ((v /= 10) != 0 && p > buf);

    return p;
}

/* Outcome of cow__fault. */
enum {
    COW__NOT_OURS,
    COW__RETRY,
    COW__NO_COPY,
    COW__PAST_EOF,
    COW__NO_SWAP,
};

static const char cow__no_swap_msg[] =
    "libcow: cowd could not swap in a private copy of a page: ";

static const char cow__no_copy_msg[] =
    "libcow: cannot make a private copy of a page "
    "(vm.max_map_count reached?)\n";

/* The switch to uffd was announced, or found impossible; each is said once. */
static bool cow__switch_said;
static bool cow__switch_failed;

/* Says once why m's switch to the uffd engine failed. */
static void cow__say_no_switch(const struct cow__mapping *m,
                               const char *why)
{
    char count[24];
    char limit[24];
    const char *parts[] = {
        "libcow: cannot switch the mapping of ",
        cow__bases[m->base].path != NULL ? cow__bases[m->base].path : "?",
        " to userfaultfd write-protection (",
        why,
        "); new private pages will fail once ",
        cow__utoa(cow__max_map_count, limit, sizeof(limit)),
        " kernel mappings (vm.max_map_count) are in use; ",
        cow__utoa(atomic_load(&cow__remap_maps), count, sizeof(count)),
        " are libcow's",
    };

    cow__write_msg(parts, sizeof(parts) / sizeof(parts[0]));
}

static void cow__say_switch(const struct cow__mapping *m, size_t held)
{
    char count[24];
    char point[24];
    char limit[24];
    const char *parts[] = {
        "libcow: the mapping of ",
        cow__bases[m->base].path != NULL ? cow__bases[m->base].path : "?",
        " switches to userfaultfd write-protection (private pages hold ",
        cow__utoa(held, count, sizeof(count)),
        " kernel mappings; switch point ",
        cow__utoa(cow__switch_at, point, sizeof(point)),
        ", vm.max_map_count ",
        cow__utoa(cow__max_map_count, limit, sizeof(limit)),
        ")",
    };

    cow__write_msg(parts, sizeof(parts) / sizeof(parts[0]));
}

/*
 * Before the remap engine adds a kernel mapping for m: past the switch
 * point m switches to the uffd engine instead.  Returns whether it did
 * (the faulting write can then be retried).  Spinlock held.
 */
static bool cow__switched(struct cow__mapping *m)
{
    size_t held = atomic_load(&cow__remap_maps);
    const char *why = "";

    if (held < cow__switch_at || cow__switch_failed)
        return false;
    if (cow__uffd_switch(m, &why) == 0) {
        if (!cow__switch_said)
            cow__say_switch(m, held);
        cow__switch_said = true;
        return true;
    }
    cow__switch_failed = true;
    cow__say_no_switch(m, why);

    return false;
}

/* Counts a kernel mapping the remap engine added for m. */
static void cow__count_map(struct cow__mapping *m)
{
    m->nprivate++;
    atomic_fetch_add(&cow__remap_maps, 1);
}

/*
 * Consecutive refusals of a swap because the file page was not mapped
 * (or the kernel was busy with it) on this thread: the write is retried
 * after each, which maps the page again, but not forever.
 */
#define COW__PTE_RETRIES 8
static COW__TLS unsigned cow__pte_misses;

/* What a refused swap means for the faulting write. */
static int cow__pte_outcome(int rc)
{
    if (rc == 0) {
        cow__pte_misses = 0;
        return COW__RETRY;
    }
    if ((rc == -ENOENT || rc == -EAGAIN) &&
        ++cow__pte_misses < COW__PTE_RETRIES)
        return COW__RETRY;
    cow__pte_misses = 0;

    return COW__NO_SWAP;
}

/*
 * The pteditor engine's private copy: a fresh anonymous page, kept out
 * of forked children (a child sharing it copy-on-write would see our
 * later writes through the swapped entry, which the kernel does not
 * know about), filled from the file page and swapped in by cowd.  Until
 * cowd answers, other threads read the file page, whose bytes the copy
 * holds, and writers wait on the spinlock.
 */
static int cow__pte_copy(struct cow__mapping *m, size_t i, void *page)
{
    void *copy = cow__sys_mmap(NULL, cow__page, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int rc;

    if (copy == MAP_FAILED)
        return COW__NO_COPY;
    if (syscall(SYS_madvise, copy, cow__page, MADV_DONTFORK) != 0) {
        cow__sys_munmap(copy, cow__page);
        return COW__NO_COPY;
    }
    memcpy(copy, page, cow__page);
    rc = cow__pte_swap(page, copy, true);
    if (rc != 0) {
        cow__sys_munmap(copy, cow__page);
        return cow__pte_outcome(rc);
    }
    m->pcopy[i] = copy;
    cow__set_state(m, i, COW__DIRTY);
    cow__count_map(m);
    cow__pte_misses = 0;

    return COW__RETRY;
}

/*
 * Replaces the CLEAN file page at page with a private copy of it.  The
 * page is first checked to lie inside the file: reading a page wholly
 * past the end would raise SIGBUS inside the handler, and a write there
 * gets the SIGBUS the kernel gives it without libcow.
 */
static int cow__make_copy(struct cow__mapping *m, size_t i, void *page)
{
    struct stat st;
    void *copy;

    if (fstat(cow__bases[m->base].fd, &st) != 0)
        return COW__NOT_OURS;
    if (m->offset + i * cow__page >= (uint64_t)st.st_size)
        return COW__PAST_EOF;
    if (cow__pte_on)
        return cow__pte_copy(m, i, page);
    if (cow__switched(m))
        return COW__RETRY;

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
    cow__count_map(m);

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
    int err;
    int rc;

    if (cow__switched(m))
        return COW__RETRY;
    if (m->snap != NULL) {
        snap = cow__sys_mmap(NULL, cow__page, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (snap == MAP_FAILED)
            return COW__NO_COPY;
        memcpy(snap, page, cow__page);
    }
    if (cow__pte_on) {
        err = cow__pte_swap(page, page, true);
        rc = cow__pte_outcome(err);
    } else {
        err = cow__sys_mprotect(page, cow__page, cow__page_prot(m, i));
        rc = COW__NO_COPY;
    }
    if (err != 0) {
        if (snap != NULL)
            cow__sys_munmap(snap, cow__page);
        return rc;
    }
    if (snap != NULL) {
        m->snap[i] = snap;
        cow__count_map(m);
    }
    cow__set_state(m, i, COW__DIRTY);

    return COW__RETRY;
}

/*
 * Handles a write fault at addr if it falls in a managed page.  A DIRTY
 * page was made writable by another thread after this one faulted; the
 * mprotect is a no-op then, and it guarantees that retrying the write
 * cannot fault here forever should the page have been write-protected
 * behind libcow's back (under pteditor, cowd writes the entry writable
 * again instead, since a program's mprotect clears its write bit).  A
 * page of a uffd mapping that the program may
 * write is writable, or about to be: the write faulted while another
 * thread was switching the mapping, and goes through once retried (the
 * mprotect changes nothing then, and splits no kernel mapping); or it is
 * a forked child's first write to the mapping, which sets it up first.
 * Called with signals blocked: from the handler, or (faulted false) from
 * cow__prefault.
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
    if (m->engine == COW__ENGINE_UFFD) {
        if (m->child_pending)
            cow__uffd_child_baseline(m);
        if (!faulted ||
            cow__sys_mprotect(page, cow__page, cow__page_prot(m, i)) == 0)
            rc = COW__RETRY;
        goto out;
    }
    switch (cow__state(m, i)) {
    case COW__CLEAN:
        rc = cow__make_copy(m, i, page);
        break;
    case COW__COMMITTED:
        rc = cow__reopen(m, i, page);
        break;
    case COW__DIRTY:
        if (!faulted)
            rc = COW__RETRY;
        else if (cow__pte_on)
            rc = cow__pte_outcome(cow__pte_swap(page, page, true));
        else if (cow__sys_mprotect(page, cow__page,
                                   cow__page_prot(m, i)) == 0)
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

/*
 * Gives a write past the end of the file the signal the kernel gives it
 * on a shared mapping: SIGBUS, BUS_ADRERR, at the faulting address,
 * queued to this thread and delivered as this handler returns.  As for a
 * fault, a SIGBUS the program blocks or ignores kills it anyway: the
 * action is reset and the signal unblocked in the mask sigreturn
 * restores.
 */
static void cow__raise_bus(void *addr, ucontext_t *uc)
{
    struct sigaction now;
    struct sigaction dfl;
    siginfo_t info;

    memset(&info, 0, sizeof(info));
    info.si_signo = SIGBUS;
    info.si_code = BUS_ADRERR;
    info.si_addr = addr;
    if (cow__real_sigaction(SIGBUS, NULL, &now) == 0 &&
        !(now.sa_flags & SA_SIGINFO) && now.sa_handler == SIG_IGN) {
        memset(&dfl, 0, sizeof(dfl));
        dfl.sa_handler = SIG_DFL;
        cow__real_sigaction(SIGBUS, &dfl, NULL);
    }
    if (sigismember(&uc->uc_sigmask, SIGBUS) == 1) {
        memset(&dfl, 0, sizeof(dfl));
        dfl.sa_handler = SIG_DFL;
        cow__real_sigaction(SIGBUS, &dfl, NULL);
        sigdelset(&uc->uc_sigmask, SIGBUS);
    }
    syscall(SYS_rt_tgsigqueueinfo, getpid(), syscall(SYS_gettid), SIGBUS,
            &info);
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
    if (rc == COW__NO_SWAP) {
        const char *parts[] = { cow__no_swap_msg, cow__pte_error() };

        cow__write_msg(parts, 2);
    }
    if (rc == COW__PAST_EOF)
        cow__raise_bus(si->si_addr, (ucontext_t *)uc);
    else if (rc != COW__RETRY)
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
    sighandler_t (*real)(int, sighandler_t);
    struct sigaction sa;
    struct sigaction old;

    if (sig != SIGSEGV || !atomic_load(&cow__installed)) {
        real = COW__NEXT(cow__real_signal, "signal");
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
