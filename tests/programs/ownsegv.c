/*
 * ownsegv: a program with a SIGSEGV handler of its own, installed after
 * libcow's (main runs after libcow's constructor), for the tests that
 * faults libcow does not own still reach the program's handler.
 *
 * Usage: ownsegv FILE MODE
 *
 * MODE says how the handler is installed: "sigaction", "signal", or
 * "altstack" (sigaction with SA_ONSTACK on an alternate signal stack).
 * The program maps FILE MAP_SHARED read-write and also read-only, then:
 *
 *   - writes "ok" at offset 0 of the writable mapping;
 *   - stores through a NULL pointer;
 *   - writes to the read-only mapping;
 *   - makes the writable mapping's second page read-only (mprotect) and
 *     writes to it;
 *   - in altstack mode, overflows its stack by recursion;
 *   - writes "ok" at offset 8 of the writable mapping.
 *
 * The handler checks that each fault reports the address that faulted,
 * then jumps back (siglongjmp).  The program prints "caught N" and exits
 * 0 when every fault was caught at the right address, 2 otherwise, 1 on
 * a usage or system error.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static sigjmp_buf back;
static void *volatile expected;
static volatile int caught;
static volatile int wrong;

static void on_segv_info(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    if (expected != NULL && si->si_addr != expected)
        wrong = 1;
    caught++;
    siglongjmp(back, 1);
}

static void on_segv(int sig)
{
    (void)sig;
    caught++;
    siglongjmp(back, 1);
}

/*
 * Overflows the stack long before the bound (a terabyte of frames); the
 * volatile array keeps the compiler from turning it into a loop.
 */
static int recurse(long depth)
{
    volatile char pad[1024];

    pad[0] = (char)depth;
    if (depth > (1L << 30))
        return pad[0];

    return recurse(depth + 1) + pad[0];
}

static int install(const char *mode)
{
    struct sigaction sa;
    stack_t ss;

    if (strcmp(mode, "signal") == 0)
        return signal(SIGSEGV, on_segv) == SIG_ERR ? -1 : 0;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_segv_info;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (strcmp(mode, "altstack") == 0) {
        ss.ss_sp = malloc(1 << 16);
        ss.ss_size = 1 << 16;
        ss.ss_flags = 0;
        if (ss.ss_sp == NULL || sigaltstack(&ss, NULL) != 0)
            return -1;
        sa.sa_flags |= SA_ONSTACK;
    } else if (strcmp(mode, "sigaction") != 0) {
        return -1;
    }

    return sigaction(SIGSEGV, &sa, NULL);
}

/* Stores to p, expecting the handler to catch the fault. */
static void fault_at(volatile char *p, int check_addr)
{
    expected = check_addr ? (void *)p : NULL;
    if (sigsetjmp(back, 1) == 0) {
        *p = 'x';
        fprintf(stderr, "ownsegv: the store did not fault\n");
        wrong = 1;
    }
}

int main(int argc, char **argv)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    unsigned char *rw;
    unsigned char *ro;
    struct stat st;
    int fd;

    if (argc != 3 || install(argv[2]) != 0) {
        fprintf(stderr, "usage: ownsegv FILE sigaction|signal|altstack\n");
        return 1;
    }
    fd = open(argv[1], O_RDWR);
    if (fd < 0 || fstat(fd, &st) != 0 || (size_t)st.st_size < 2 * page)
        return 1;
    rw = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
              fd, 0);
    ro = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (rw == MAP_FAILED || ro == MAP_FAILED)
        return 1;

    memcpy(rw, "ok", 2);
    fault_at(NULL, 1);
    fault_at((volatile char *)ro + 16, 1);
    if (mprotect(rw + page, page, PROT_READ) != 0)
        return 1;
    fault_at((volatile char *)rw + page + 16, 1);
    if (strcmp(argv[2], "altstack") == 0) {
        expected = NULL;
        if (sigsetjmp(back, 1) == 0)
            recurse(0);
    }
    memcpy(rw + 8, "ok", 2);
    printf("caught %d\n", caught);

    return wrong ? 2 : 0;
}
