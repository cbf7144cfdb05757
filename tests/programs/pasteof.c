/*
 * pasteof: writes past the end of a file through a shared mapping longer
 * than the file, for the test that the write fails as it would without
 * libcow: with SIGBUS.
 *
 * Usage: pasteof FILE [catch]
 *
 * Maps two pages of FILE, which must be at most one page long,
 * MAP_SHARED read-write, writes to its first page, then to its second.
 * With "catch", a SIGBUS handler prints "SIGBUS code C at page 1" (C is
 * si_code, the page is where si_addr points) and exits 0; without, the
 * process dies of the signal.  Exit 2 if the write went through, 1 on a
 * usage or system error.
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static unsigned char *map;
static size_t page;

static void on_bus(int sig, siginfo_t *si, void *uc)
{
    char line[64];
    int n;

    (void)sig;
    (void)uc;
    n = snprintf(line, sizeof(line), "SIGBUS code %d at page %ld\n",
                 si->si_code,
                 (long)(((unsigned char *)si->si_addr - map) / (long)page));
    if (write(1, line, (size_t)n) != n)
        _exit(1);
    _exit(0);
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    int fd;

    page = (size_t)sysconf(_SC_PAGESIZE);
    fd = argc >= 2 ? open(argv[1], O_RDWR) : -1;
    if (fd < 0) {
        fprintf(stderr, "usage: pasteof FILE [catch]\n");
        return 1;
    }
    if (argc == 3 && strcmp(argv[2], "catch") == 0) {
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = on_bus;
        sa.sa_flags = SA_SIGINFO;
        sigaction(SIGBUS, &sa, NULL);
    }
    map = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        perror("pasteof: mmap");
        return 1;
    }
    map[0] = 'x';
    map[page + 1] = 'y';

    return 2;
}
