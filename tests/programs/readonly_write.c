/*
 * readonly_write: writes to a read-only shared mapping, a program's own
 * bug that must crash it with or without libcow.
 *
 * Usage: readonly_write FILE
 *
 * Maps FILE MAP_SHARED with PROT_READ only, reads its first byte, then
 * stores into it.  The store must kill the process with SIGSEGV; exit 0
 * ("survived") would mean libcow made a read-only mapping writable.
 * Exit 1 on a usage or system error.
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    volatile unsigned char *map;
    int fd;

    if (argc != 2) {
        fprintf(stderr, "usage: readonly_write FILE\n");
        return 1;
    }
    fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        perror("readonly_write: open");
        return 1;
    }
    map = mmap(NULL, 1, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        perror("readonly_write: mmap");
        return 1;
    }
    printf("first byte %u\n", map[0]);
    fflush(stdout);
    map[0] = (unsigned char)(map[0] + 1);
    fprintf(stderr, "readonly_write: survived a store to a read-only "
                    "mapping\n");

    return 0;
}
