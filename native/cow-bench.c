/*
 * cow-bench: times the first write to each page of a file mapping, for
 * `cowctl bench`.
 *
 * Usage: cow-bench FILE PAGES shared|private
 *
 * Maps the first PAGES pages of FILE read-write, MAP_SHARED or
 * MAP_PRIVATE, and reads a byte of every page, so that every page is in
 * the page cache and mapped before the clock starts.  Then it times one
 * store to each page in turn: the page's first byte is written back
 * unchanged, so the store costs what a first write costs (the kernel's
 * copy of a MAP_PRIVATE page, or libcow's private copy when libcow
 * manages the MAP_SHARED mapping) and a managed run has nothing to
 * commit.  Then it checks that the mapping is private: a byte changed
 * through it must not show in the file (and is changed back, so there is
 * still nothing to commit), or the timing was not of a copy at all.
 * Prints "ns_per_page N" on stdout.  Exit 0, or 1 on a usage or system
 * error or a mapping whose writes reach the file.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);

    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Whether a byte changed through map stays out of the file behind it. */
static int private_view(volatile unsigned char *map, int fd)
{
    unsigned char was = map[0];
    unsigned char seen;

    map[0] = (unsigned char)(was ^ 0xff);
    if (pread(fd, &seen, 1, 0) != 1)
        seen = map[0];
    map[0] = was;

    return seen == was;
}

int main(int argc, char **argv)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    volatile unsigned char *map;
    unsigned long pages;
    unsigned sum = 0;
    uint64_t start;
    uint64_t took;
    int shared;
    size_t i;
    int fd;

    if (argc != 4 || (strcmp(argv[3], "shared") != 0 &&
                      strcmp(argv[3], "private") != 0)) {
        fprintf(stderr, "usage: cow-bench FILE PAGES shared|private\n");
        return 1;
    }
    pages = strtoul(argv[2], NULL, 10);
    shared = strcmp(argv[3], "shared") == 0;
    fd = open(argv[1], O_RDWR);
    if (fd < 0 || pages == 0) {
        perror("cow-bench: open");
        return 1;
    }
    map = mmap(NULL, pages * page, PROT_READ | PROT_WRITE,
               shared ? MAP_SHARED : MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        perror("cow-bench: mmap");
        return 1;
    }
    for (i = 0; i < pages; i++)
        sum += map[i * page];

    start = now_ns();
    for (i = 0; i < pages; i++)
        map[i * page] = map[i * page];
    took = now_ns() - start;

    if (!private_view(map, fd)) {
        fprintf(stderr, "cow-bench: writes through the mapping reach %s:"
                " it is not a private view (is libcow managing it?)\n",
                argv[1]);
        return 1;
    }
    printf("ns_per_page %.1f\n", (double)took / (double)pages);

    /* The sum keeps the warm-up reads from being optimized away. */
    return sum == UINT32_MAX ? 1 : 0;
}
