/*
 * writer: writes bytes into a shared mapping of a file, as an ordinary
 * program would, for the tests of transparent management.
 *
 * Usage: writer FILE [--msync] [--keep] OFFSET:HEXDATA...
 *
 * Opens FILE read-write, maps all of it MAP_SHARED with PROT_READ |
 * PROT_WRITE and copies each HEXDATA (hex digits, two per byte, so that
 * tests can write newlines, NUL bytes and runs that cross a page) to its
 * decimal OFFSET with memcpy.  With --msync it then msyncs the mapping.
 * It checks that the mapping reads back what it wrote (exit 2 if not),
 * then unmaps it, unless --keep leaves the mapping for exit.  Exit 0 on
 * success, 1 on a usage or system error.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hexdata.h"

struct edit {
    size_t offset;
    unsigned char *data;
    size_t len;
};

/* Parses OFFSET:HEXDATA into e; returns 0 or -1. */
static int parse_edit(const char *arg, struct edit *e)
{
    const char *colon = strchr(arg, ':');
    char *end;
    long len;

    if (colon == NULL)
        return -1;
    e->offset = strtoull(arg, &end, 10);
    if (end != colon)
        return -1;
    len = hexdata_decode(colon + 1, &e->data);
    if (len < 0)
        return -1;
    e->len = (size_t)len;

    return 0;
}

int main(int argc, char **argv)
{
    struct edit *edits = calloc((size_t)argc, sizeof(*edits));
    size_t nedits = 0;
    int do_msync = 0;
    int keep = 0;
    struct stat st;
    unsigned char *map;
    size_t k;
    int fd;
    int i;

    if (argc < 2 || edits == NULL) {
        fprintf(stderr, "usage: writer FILE [--msync] [--keep] "
                        "OFFSET:HEXDATA...\n");
        return 1;
    }
    for (i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--msync") == 0)
            do_msync = 1;
        else if (strcmp(argv[i], "--keep") == 0)
            keep = 1;
        else if (parse_edit(argv[i], &edits[nedits++]) != 0) {
            fprintf(stderr, "writer: bad edit %s\n", argv[i]);
            return 1;
        }
    }

    fd = open(argv[1], O_RDWR);
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size == 0) {
        perror("writer: open");
        return 1;
    }
    map = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
               fd, 0);
    if (map == MAP_FAILED) {
        perror("writer: mmap");
        return 1;
    }
    close(fd);

    for (k = 0; k < nedits; k++) {
        if (edits[k].offset + edits[k].len > (size_t)st.st_size) {
            fprintf(stderr, "writer: edit past the end of the file\n");
            return 1;
        }
        memcpy(map + edits[k].offset, edits[k].data, edits[k].len);
    }
    if (do_msync && msync(map, (size_t)st.st_size, MS_SYNC) != 0) {
        perror("writer: msync");
        return 1;
    }

    /* Later edits win where edits overlap, so check only the last one. */
    for (k = 0; k < nedits; k++) {
        size_t j;

        for (j = 0; j < edits[k].len; j++) {
            size_t at = edits[k].offset + j;
            size_t later;
            int shadowed = 0;

            for (later = k + 1; later < nedits; later++)
                if (at >= edits[later].offset &&
                    at < edits[later].offset + edits[later].len)
                    shadowed = 1;
            if (!shadowed && map[at] != edits[k].data[j]) {
                fprintf(stderr, "writer: byte %zu reads back wrong\n", at);
                return 2;
            }
        }
    }
    if (!keep && munmap(map, (size_t)st.st_size) != 0) {
        perror("writer: munmap");
        return 1;
    }

    return 0;
}
