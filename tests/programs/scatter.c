/*
 * scatter: writes to many scattered pages of one shared mapping, for the
 * test that the number of written pages is not bounded by the kernel's
 * limit on mappings (vm.max_map_count).
 *
 * Usage: scatter FILE COUNT STRIDE
 *
 * Maps all of FILE MAP_SHARED read-write and, for k from 0 to COUNT - 1,
 * stores the 8 bytes of the value value(k) (below, little-endian) at
 * offset (k % 512) * 8 of page k * STRIDE, so that no two written pages
 * are neighbours when STRIDE > 1.  Then it reads every value back, and
 * exits, leaving the commit to exit.  Exit 0, 2 when a value reads back
 * wrong, 1 on a usage or system error.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static uint64_t value(uint64_t k)
{
    return (k + 1) * 0x9e3779b97f4a7c15ULL;
}

static unsigned char *slot(unsigned char *map, size_t page, uint64_t k,
                           uint64_t stride)
{
    return map + k * stride * page + (k % 512) * 8;
}

int main(int argc, char **argv)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    unsigned char *map;
    uint64_t count;
    uint64_t stride;
    uint64_t k;
    struct stat st;
    int fd;

    if (argc != 4) {
        fprintf(stderr, "usage: scatter FILE COUNT STRIDE\n");
        return 1;
    }
    count = strtoull(argv[2], NULL, 10);
    stride = strtoull(argv[3], NULL, 10);
    fd = open(argv[1], O_RDWR);
    if (fd < 0 || fstat(fd, &st) != 0 ||
        (count - 1) * stride * page + page > (uint64_t)st.st_size) {
        fprintf(stderr, "scatter: FILE is missing or too small\n");
        return 1;
    }
    map = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
               fd, 0);
    if (map == MAP_FAILED) {
        perror("scatter: mmap");
        return 1;
    }
    close(fd);
    for (k = 0; k < count; k++) {
        uint64_t v = value(k);

        memcpy(slot(map, page, k, stride), &v, sizeof(v));
    }
    for (k = 0; k < count; k++) {
        uint64_t v;

        memcpy(&v, slot(map, page, k, stride), sizeof(v));
        if (v != value(k)) {
            fprintf(stderr, "scatter: page %llu reads back wrong\n",
                    (unsigned long long)(k * stride));
            return 2;
        }
    }

    return 0;
}
