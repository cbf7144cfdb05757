/*
 * libearly: a library whose constructor runs before libcow's, as the
 * constructors of a program's own libraries do, for the tests of what a
 * program does before libcow has started.
 *
 * EARLY_FILE names a file and EARLY_DO what the constructor does, a
 * comma-separated list of:
 *
 *   mmap    map EARLY_FILE MAP_SHARED read-write with mmap() and write
 *           "early" at offset 0
 *   raw     the same with a raw mmap system call, which no library sees,
 *           writing "rawly" at offset 0
 *   segv    install a SIGSEGV handler that early_guard() relies on
 *   atfork  register fork handlers that write to the mapping: "E" at 100
 *           before a fork, "P" at one page in the parent after it, "c"
 *           at 200 in the child
 *
 * The mapping is early_map, early_size bytes long.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

unsigned char *early_map;
size_t early_size;

static sigjmp_buf early_back;
static volatile int early_caught;

static void early_on_segv(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)si;
    (void)uc;
    early_caught++;
    siglongjmp(early_back, 1);
}

/* Runs fn; returns 1 if it faulted and the early handler caught it. */
int early_guard(void (*fn)(void))
{
    int before = early_caught;

    if (sigsetjmp(early_back, 1) == 0)
        fn();

    return early_caught - before;
}

static void early_prepare(void)
{
    early_map[100] = 'E';
}

static void early_parent(void)
{
    early_map[sysconf(_SC_PAGESIZE)] = 'P';
}

static void early_child(void)
{
    early_map[200] = 'c';
}

static void early_mmap(const char *path, int raw)
{
    struct stat st;
    int fd = open(path, O_RDWR);

    if (fd < 0 || fstat(fd, &st) != 0)
        abort();
    early_size = (size_t)st.st_size;
    if (raw)
        early_map = (unsigned char *)syscall(SYS_mmap, NULL, early_size,
                                             PROT_READ | PROT_WRITE,
                                             MAP_SHARED, fd, 0L);
    else
        early_map = mmap(NULL, early_size, PROT_READ | PROT_WRITE,
                         MAP_SHARED, fd, 0);
    if (early_map == MAP_FAILED)
        abort();
    close(fd);
    memcpy(early_map, raw ? "rawly" : "early", 5);
}

__attribute__((constructor))
static void early_init(void)
{
    const char *what = getenv("EARLY_DO");
    const char *path = getenv("EARLY_FILE");
    struct sigaction sa;

    if (what == NULL || path == NULL)
        return;
    if (strstr(what, "segv") != NULL) {
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = early_on_segv;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigaction(SIGSEGV, &sa, NULL);
    }
    if (strstr(what, "atfork") != NULL)
        pthread_atfork(early_prepare, early_parent, early_child);
    if (strstr(what, "raw") != NULL)
        early_mmap(path, 1);
    else if (strstr(what, "mmap") != NULL)
        early_mmap(path, 0);
}
