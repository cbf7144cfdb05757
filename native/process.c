/*
 * process.c: what a process does to its image as a whole (fork, exec,
 * _exit) and the lock that must come through it.
 *
 * Commit points.  exit() commits through libcow's destructor; _exit(),
 * _Exit() and the exec family skip destructors, so their wrappers commit
 * first.  posix_spawn(), system() and popen() leave the caller's image in
 * place and need nothing: the spawned child shares the caller's memory
 * only until it execs, through glibc's internal execve, and libcow never
 * commits from a process that shares its parent's memory.
 *
 * Fork.  A forked child that keeps writing is a session of its own.  Its
 * table is reset by cow__after_fork_baseline (mappings.c) and its
 * session (connection, log handles, records waiting for cowd) by
 * cow__session_reset (libcow.c).  Both run in libcow's atfork child
 * handler, the first to run in the child; but _Fork() and a raw clone()
 * run none, so every entry into libcow checks first whether it runs in a
 * forked copy of the process that set up the state, and resets it then.
 * The check is a page the kernel empties in a forked child
 * (MADV_WIPEONFORK), so it costs no system call.
 *
 * From the atfork prepare handler to the parent or child handler the
 * forking thread holds cow__mutex and the table spinlock, so that no
 * other thread is in the middle of a change when the address space is
 * copied.  libcow's handlers are kept the first registered (see
 * __register_atfork), so that this hold covers only the fork itself.
 * Code that still runs on the forking thread during the hold (a signal
 * handler, or atfork handlers when libcow was loaded too late to come
 * first) may write to managed pages or unmap them: that thread keeps the
 * synchronous fault signals unblocked and uses the state without taking
 * the locks it already holds (cow__fork_hold).
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cow_internal.h"

static pthread_mutex_t cow__mutex = PTHREAD_MUTEX_INITIALIZER;

/* This thread holds cow__mutex. */
static COW__TLS bool cow__mutex_mine;

/* This thread holds both locks on behalf of a fork in progress. */
COW__TLS bool cow__fork_hold;

/* The signal mask of the forking thread, from prepare to parent/child. */
static sigset_t cow__fork_mask;

/*
 * Words the kernel zeroes in a forked child.  table and session are set
 * once the process that holds them has made the table and the session
 * its own.  When the kernel cannot wipe a page on fork (before Linux
 * 4.14) they hold the owner's pid instead, compared with getpid().
 */
struct cow__owner {
    volatile uint64_t table;
    volatile uint64_t session;
};

static struct cow__owner *cow__owner;
static bool cow__owner_wiped;

/* The process whose session this is; getpid() differs in a vfork child. */
static pid_t cow__session_pid;

static uint64_t cow__owner_mark(void)
{
    return cow__owner_wiped ? 1 : (uint64_t)getpid();
}

static bool cow__stale(const volatile uint64_t *word)
{
    return cow__owner_wiped ? *word == 0 : *word != (uint64_t)getpid();
}

bool cow__table_forked(void)
{
    return cow__owner != NULL && cow__stale(&cow__owner->table);
}

static bool cow__session_forked(void)
{
    return cow__owner != NULL && cow__stale(&cow__owner->session);
}

/* Makes the session this process's own: see cow__session_reset. */
static void cow__session_adopt(void)
{
    cow__session_reset();
    cow__session_pid = getpid();
    cow__owner->session = cow__owner_mark();
}

void cow__table_adopted(void)
{
    if (cow__owner != NULL)
        cow__owner->table = cow__owner_mark();
}

/*
 * Whether this process owns the session: false in a vfork child (or any
 * child sharing the parent's memory), which must never commit the
 * parent's pages in the parent's name.  A forked child that has not yet
 * made itself a session counts: the lock will make it one.
 */
static bool cow__owns_session(void)
{
    return cow__owner != NULL &&
           (getpid() == cow__session_pid || cow__session_forked());
}

void cow__lock(void)
{
    if (!cow__fork_hold) {
        pthread_mutex_lock(&cow__mutex);
        cow__mutex_mine = true;
    }
    if (cow__session_forked())
        cow__session_adopt();
}

void cow__unlock(void)
{
    if (cow__fork_hold)
        return;
    cow__mutex_mine = false;
    pthread_mutex_unlock(&cow__mutex);
}

bool cow__lock_held_here(void)
{
    return cow__mutex_mine || cow__fork_hold;
}

/* Blocks every signal but the ones a fault raises on this thread. */
static void cow__block_async(sigset_t *saved)
{
    sigset_t mask;

    sigfillset(&mask);
    sigdelset(&mask, SIGSEGV);
    sigdelset(&mask, SIGBUS);
    sigdelset(&mask, SIGILL);
    sigdelset(&mask, SIGFPE);
    sigdelset(&mask, SIGTRAP);
    pthread_sigmask(SIG_SETMASK, &mask, saved);
}

/*
 * The atfork handlers.  prepare takes the locks only when libcow runs
 * (they may be registered before it starts, see __register_atfork) and
 * not from inside libcow (a fork from a signal handler that interrupted
 * it on this thread, when the state may be half-changed: the child then
 * starts from whatever it inherits); parent and child release what
 * prepare took.
 */
static COW__TLS bool cow__fork_took;

static void cow__fork_prepare(void)
{
    cow__fork_took = cow__ready && !cow__mutex_mine && !cow__fork_hold;
    if (!cow__fork_took)
        return;
    pthread_mutex_lock(&cow__mutex);
    cow__block_async(&cow__fork_mask);
    cow__spin_lock();
    cow__fork_hold = true;
}

static void cow__fork_parent(void)
{
    if (!cow__fork_took)
        return;
    cow__fork_took = false;
    cow__fork_hold = false;
    cow__spin_unlock();
    pthread_sigmask(SIG_SETMASK, &cow__fork_mask, NULL);
    pthread_mutex_unlock(&cow__mutex);
}

static void cow__fork_child(void)
{
    if (!cow__fork_took)
        return;
    cow__fork_took = false;
    if (cow__table_forked()) {
        cow__after_fork_baseline();
        cow__table_adopted();
    }
    cow__fork_hold = false;
    cow__spin_unlock();
    pthread_sigmask(SIG_SETMASK, &cow__fork_mask, NULL);

    /*
     * The child's only thread took the mutex in the parent's prepare
     * handler; a default mutex is released by whoever unlocks it.
     */
    cow__mutex_mine = true;
    if (cow__session_forked())
        cow__session_adopt();
    cow__unlock();
}

/*
 * Keeps libcow's atfork handlers the first registered.  Prepare handlers
 * run in the reverse order of registration and child handlers in order,
 * so libcow's prepare handler then runs last, just before the fork, and
 * its child handler first.  Were it otherwise, libcow would hold its
 * locks while other prepare handlers run, and one that waits for a lock
 * held by a thread that is itself waiting in libcow's handler (it wrote
 * to a managed page) would wait forever; and a child handler that ran
 * before libcow's would write to pages the child has not made its own
 * yet.  glibc's pthread_atfork registers through __register_atfork,
 * which libcow wraps: the first registration of the process, by anyone,
 * registers libcow's handlers first.  (When libcow is loaded with dlopen
 * it comes too late for that; the fork hold then lets handlers that run
 * inside it use libcow's state.)
 */
typedef int (*cow__register_atfork_fn)(void (*)(void), void (*)(void),
                                       void (*)(void), void *);

extern void *__dso_handle;

static cow__register_atfork_fn cow__real_register_atfork;
static atomic_bool cow__atfork_done;

static int cow__register_own(cow__register_atfork_fn real)
{
    if (atomic_exchange(&cow__atfork_done, true))
        return 0;

    return real(cow__fork_prepare, cow__fork_parent, cow__fork_child,
                &__dso_handle);
}

COW__EXPORT
int __register_atfork(void (*prepare)(void), void (*parent)(void),
                      void (*child)(void), void *dso)
{
    cow__register_atfork_fn real =
        COW__NEXT(cow__real_register_atfork, "__register_atfork");
    int rc;

    if (real == NULL)
        return ENOSYS;
    rc = cow__register_own(real);
    if (rc != 0)
        return rc;

    return real(prepare, parent, child, dso);
}

/*
 * Sets up the fork handling once: the wiped page and the atfork
 * handlers.  Under cow__mutex, from cow__runtime.
 */
int cow__process_init(void)
{
    cow__register_atfork_fn real =
        COW__NEXT(cow__real_register_atfork, "__register_atfork");
    struct cow__owner *owner;
    int rc;

    if (real == NULL)
        return -ENOSYS;
    owner = cow__sys_mmap(NULL, sizeof(*owner), PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (owner == MAP_FAILED)
        return -errno;
#ifdef MADV_WIPEONFORK
    cow__owner_wiped =
        syscall(SYS_madvise, owner, cow__page, MADV_WIPEONFORK) == 0;
#endif
    cow__session_pid = getpid();
    owner->table = cow__owner_wiped ? 1 : (uint64_t)getpid();
    owner->session = owner->table;
    rc = cow__register_own(real);
    if (rc != 0) {
        cow__sys_munmap(owner, sizeof(*owner));
        return -rc;
    }
    cow__owner = owner;

    return 0;
}

/*
 * Looks up the next definition of name, for the wrappers.  dlsym may
 * allocate, and an allocator being set up may read a file: a wrapper
 * called again while this thread is inside dlsym gets NULL and falls
 * back to the system call, instead of recursing.
 */
void *cow__next(const char *name)
{
    static COW__TLS bool resolving;
    void *p;

    if (resolving)
        return NULL;
    resolving = true;
    p = dlsym(RTLD_NEXT, name);
    resolving = false;

    return p;
}

/*
 * Commits everything before the image goes away, unless this process
 * does not own the session or the call comes from inside libcow (a
 * signal handler that interrupted it on this thread), where the state
 * may be half-changed.  The commit path takes no allocator lock, so a
 * handler that interrupted malloc and calls _exit still commits.
 */
void cow__finish(const char *what, bool final)
{
    int saved_errno = errno;

    if (!cow__ready || !cow__owns_session()) {
        errno = saved_errno;
        return;
    }
    if (cow__lock_held_here()) {
        cow__say("%s called inside libcow (from a signal handler?): "
                 "uncommitted changes are lost", what);
        errno = saved_errno;
        return;
    }
    cow__lock();
    cow__commit_before(what, final);
    /* The module's notifier is the safety net, not the plan. */
    if (final)
        cow__pte_release_all();
    cow__unlock();
    errno = saved_errno;
}

typedef void (*cow__exit_fn)(int) __attribute__((noreturn));
typedef int (*cow__execve_fn)(const char *, char *const[], char *const[]);
typedef int (*cow__execv_fn)(const char *, char *const[]);
typedef int (*cow__fexecve_fn)(int, char *const[], char *const[]);
typedef int (*cow__execveat_fn)(int, const char *, char *const[],
                                char *const[], int);

/*
 * The functions wrapped here, found before main runs: _exit and execve
 * are async-signal-safe and may be called where dlsym must not be (in a
 * signal handler, or in the child of a multithreaded fork).
 */
static cow__exit_fn cow__real_exit;
static cow__exit_fn cow__real_Exit;
static cow__execve_fn cow__real_execve;
static cow__execv_fn cow__real_execv;
static cow__execv_fn cow__real_execvp;
static cow__execve_fn cow__real_execvpe;
static cow__fexecve_fn cow__real_fexecve;
static cow__execveat_fn cow__real_execveat;

__attribute__((constructor(101)))
static void cow__process_resolve(void)
{
    COW__NEXT(cow__real_exit, "_exit");
    COW__NEXT(cow__real_Exit, "_Exit");
    COW__NEXT(cow__real_execve, "execve");
    COW__NEXT(cow__real_execv, "execv");
    COW__NEXT(cow__real_execvp, "execvp");
    COW__NEXT(cow__real_execvpe, "execvpe");
    COW__NEXT(cow__real_fexecve, "fexecve");
    COW__NEXT(cow__real_execveat, "execveat");
    COW__NEXT(cow__real_register_atfork, "__register_atfork");
}

static void cow__exit_via(cow__exit_fn real, const char *name, int status)
    __attribute__((noreturn));

static void cow__exit_via(cow__exit_fn real, const char *name, int status)
{
    cow__finish(name, true);
    if (real != NULL)
        real(status);
    for (;;)
        syscall(SYS_exit_group, status);
}

COW__EXPORT
void _exit(int status)
{
    cow__exit_via(COW__NEXT(cow__real_exit, "_exit"), "_exit", status);
}

COW__EXPORT
void _Exit(int status)
{
    cow__exit_via(COW__NEXT(cow__real_Exit, "_Exit"), "_Exit", status);
}

/*
 * The exec family.  The commit goes first; if the exec then fails the
 * program carries on with its pages committed, which changes nothing
 * for it.
 */
static int cow__no_next(void)
{
    errno = ENOSYS;
    return -1;
}

COW__EXPORT
int execve(const char *path, char *const argv[], char *const envp[])
{
    cow__execve_fn real = COW__NEXT(cow__real_execve, "execve");

    cow__finish("execve", false);

    return real != NULL ? real(path, argv, envp) : cow__no_next();
}

COW__EXPORT
int execv(const char *path, char *const argv[])
{
    cow__execv_fn real = COW__NEXT(cow__real_execv, "execv");

    cow__finish("execv", false);

    return real != NULL ? real(path, argv) : cow__no_next();
}

COW__EXPORT
int execvp(const char *file, char *const argv[])
{
    cow__execv_fn real = COW__NEXT(cow__real_execvp, "execvp");

    cow__finish("execvp", false);

    return real != NULL ? real(file, argv) : cow__no_next();
}

COW__EXPORT
int execvpe(const char *file, char *const argv[], char *const envp[])
{
    cow__execve_fn real = COW__NEXT(cow__real_execvpe, "execvpe");

    cow__finish("execvpe", false);

    return real != NULL ? real(file, argv, envp) : cow__no_next();
}

COW__EXPORT
int fexecve(int fd, char *const argv[], char *const envp[])
{
    cow__fexecve_fn real = COW__NEXT(cow__real_fexecve, "fexecve");

    cow__finish("fexecve", false);

    return real != NULL ? real(fd, argv, envp) : cow__no_next();
}

COW__EXPORT
int execveat(int dirfd, const char *path, char *const argv[],
             char *const envp[], int flags)
{
    cow__execveat_fn real = COW__NEXT(cow__real_execveat, "execveat");

    cow__finish("execveat", false);

    return real != NULL ? real(dirfd, path, argv, envp, flags)
                        : cow__no_next();
}

/* Counts the arguments of an execl call after arg, up to the NULL. */
static size_t cow__count_args(va_list ap)
{
    size_t n = 0;

    while (va_arg(ap, const char *) != NULL)
        n++;

    return n;
}

/*
 * The execl forms build the argument vector and go through the vector
 * forms above, which commit.  The vector lives on the stack, as glibc's
 * own does.
 */
COW__EXPORT
int execl(const char *path, const char *arg, ...)
{
    va_list ap;
    size_t n;
    size_t i;

    va_start(ap, arg);
    n = cow__count_args(ap);
    va_end(ap);

    const char *argv[n + 2];

    argv[0] = arg;
    va_start(ap, arg);
    for (i = 1; i <= n + 1; i++)
        argv[i] = va_arg(ap, const char *);
    va_end(ap);

    return execv(path, (char *const *)argv);
}

COW__EXPORT
int execlp(const char *file, const char *arg, ...)
{
    va_list ap;
    size_t n;
    size_t i;

    va_start(ap, arg);
    n = cow__count_args(ap);
    va_end(ap);

    const char *argv[n + 2];

    argv[0] = arg;
    va_start(ap, arg);
    for (i = 1; i <= n + 1; i++)
        argv[i] = va_arg(ap, const char *);
    va_end(ap);

    return execvp(file, (char *const *)argv);
}

COW__EXPORT
int execle(const char *path, const char *arg, ...)
{
    char *const *envp;
    va_list ap;
    size_t n;
    size_t i;

    va_start(ap, arg);
    n = cow__count_args(ap);
    va_end(ap);

    const char *argv[n + 2];

    argv[0] = arg;
    va_start(ap, arg);
    for (i = 1; i <= n + 1; i++)
        argv[i] = va_arg(ap, const char *);
    envp = va_arg(ap, char *const *);
    va_end(ap);

    return execve(path, (char *const *)argv, envp);
}
