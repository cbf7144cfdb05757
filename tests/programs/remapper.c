/*
 * remapper: moves, grows and shrinks a shared mapping of a file with
 * mremap(2) while writing to it, for the test of libcow's mremap.
 *
 * Usage: remapper FILE
 *
 * FILE must hold at least eight pages.  With P the page size:
 *
 *   1. maps 4 pages, writes 'a' at 10, commits (msync), writes 'b' at
 *      2P + 20, so the written pages are in different states;
 *   2. grows the mapping to 8 pages (MREMAP_MAYMOVE), checks that both
 *      bytes moved along and that page 6 shows the file, writes 'c' at
 *      6P + 30 and 'd' at 11;
 *   3. shrinks it to 5 pages, which unmaps (and commits) page 6;
 *   4. moves it to a fixed address (MREMAP_FIXED) and writes 'e' at
 *      4P + 40, checking the earlier bytes again;
 *   5. maps pages 0-1 again (a second mapping of them) where two more
 *      pages are free after them, grows that in place (no
 *      MREMAP_MAYMOVE) and writes 'f' at 3P + 50;
 *   6. checks that growing it further, where the next page is taken,
 *      without MREMAP_MAYMOVE, fails with ENOMEM as the kernel's would;
 *   7. exits, which commits the rest.
 *
 * Exit 0, 2 when a check fails, 1 on a system error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static size_t page;
static unsigned char file_byte[8];

static int check(const unsigned char *m, size_t at, unsigned char want,
                 const char *what)
{
    if (m[at] == want)
        return 0;
    fprintf(stderr, "remapper: %s: byte %zu is %02x, not %02x\n", what, at,
            m[at], want);

    return 2;
}

int main(int argc, char **argv)
{
    unsigned char *m;
    unsigned char *fixed;
    unsigned char *n;
    int fd;
    int rc = 0;
    int i;

    page = (size_t)sysconf(_SC_PAGESIZE);
    fd = argc == 2 ? open(argv[1], O_RDWR) : -1;
    if (fd < 0) {
        fprintf(stderr, "usage: remapper FILE\n");
        return 1;
    }
    for (i = 0; i < 8; i++)
        if (pread(fd, &file_byte[i], 1, (off_t)(i * page + 30)) != 1)
            return 1;

    m = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        return 1;
    m[10] = 'a';
    if (msync(m, page, MS_SYNC) != 0)
        return 1;
    m[2 * page + 20] = 'b';

    m = mremap(m, 4 * page, 8 * page, MREMAP_MAYMOVE);
    if (m == MAP_FAILED) {
        perror("remapper: grow");
        return 1;
    }
    rc |= check(m, 10, 'a', "after growing");
    rc |= check(m, 2 * page + 20, 'b', "after growing");
    rc |= check(m, 6 * page + 30, file_byte[6], "new page");
    m[6 * page + 30] = 'c';
    m[11] = 'd';

    m = mremap(m, 8 * page, 5 * page, 0);
    if (m == MAP_FAILED) {
        perror("remapper: shrink");
        return 1;
    }

    fixed = mmap(NULL, 5 * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                 0);
    if (fixed == MAP_FAILED)
        return 1;
    m = mremap(m, 5 * page, 5 * page, MREMAP_MAYMOVE | MREMAP_FIXED, fixed);
    if (m != fixed) {
        perror("remapper: move");
        return 1;
    }
    m[4 * page + 40] = 'e';
    rc |= check(m, 10, 'a', "after moving");
    rc |= check(m, 11, 'd', "after moving");
    rc |= check(m, 2 * page + 20, 'b', "after moving");
    rc |= check(m, 4 * page + 30, file_byte[4], "after moving");

    /*
     * A two-page mapping in a reserved area, then two free pages right
     * after it (freed just before growing: any allocation may take free
     * address space), then a reserved page.
     */
    n = mmap(NULL, 5 * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (n == MAP_FAILED ||
        mmap(n, 2 * page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
             0) != n ||
        munmap(n + 2 * page, 2 * page) != 0)
        return 1;
    if (mremap(n, 2 * page, 4 * page, 0) != n) {
        perror("remapper: grow in place");
        return 1;
    }
    n[3 * page + 50] = 'f';
    rc |= check(n, 3 * page + 30, file_byte[3], "grown in place");

    /* The page after n is taken: growing without moving must fail. */
    if (mremap(n, 4 * page, 5 * page, 0) != MAP_FAILED || errno != ENOMEM) {
        fprintf(stderr, "remapper: growing into a taken page did not fail "
                        "with ENOMEM\n");
        rc |= 2;
    }

    return rc;
}
