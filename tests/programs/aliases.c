/*
 * aliases: maps one file twice in one process and writes through both
 * mappings, for the test of what libcow makes of aliases.
 *
 * Usage: aliases FILE
 *
 * FILE must hold at least three pages.  A maps all of it, B maps it
 * from its second page on, both MAP_SHARED read-write, so both show the
 * file's second page.  Then, with P the page size:
 *
 *   1. A writes "AAAA" at P + 16 and is committed (msync);
 *   2. B writes "BBBB" at file offset P + 64;
 *   3. the program prints what each mapping shows of the other's bytes:
 *      "B at P+16: HEX" and "A at P+64: HEX";
 *   4. A writes "aaaa" at 16;
 *   5. B is committed (msync);
 *   6. B writes "ZZ" at file offset P + 16, over the first half of A's
 *      committed bytes, and the program exits, which commits the rest.
 *
 * Exit 0, or 1 on a system error.
 */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void show(const char *what, const unsigned char *p)
{
    printf("%s: %02x%02x%02x%02x\n", what, p[0], p[1], p[2], p[3]);
}

int main(int argc, char **argv)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    unsigned char *a;
    unsigned char *b;
    struct stat st;
    int fd;

    if (argc != 2) {
        fprintf(stderr, "usage: aliases FILE\n");
        return 1;
    }
    fd = open(argv[1], O_RDWR);
    if (fd < 0 || fstat(fd, &st) != 0 || (size_t)st.st_size < 3 * page) {
        perror("aliases: open");
        return 1;
    }
    a = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
             fd, 0);
    b = mmap(NULL, (size_t)st.st_size - page, PROT_READ | PROT_WRITE,
             MAP_SHARED, fd, (off_t)page);
    if (a == MAP_FAILED || b == MAP_FAILED) {
        perror("aliases: mmap");
        return 1;
    }
    memcpy(a + page + 16, "AAAA", 4);
    if (msync(a, (size_t)st.st_size, MS_SYNC) != 0) {
        perror("aliases: msync");
        return 1;
    }
    memcpy(b + 64, "BBBB", 4);
    show("B at P+16", b + 16);
    show("A at P+64", a + page + 64);
    memcpy(a + 16, "aaaa", 4);
    if (msync(b, (size_t)st.st_size - page, MS_SYNC) != 0) {
        perror("aliases: msync");
        return 1;
    }
    memcpy(b + 16, "ZZ", 2);

    return 0;
}
