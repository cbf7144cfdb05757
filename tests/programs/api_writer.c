/*
 * api_writer: writes into a file through libcow's explicit C API.
 *
 * Usage: api_writer FILE OFFSET:HEXDATA...
 *
 * Maps all of FILE with cow_map(), writes each HEXDATA (two hex digits per
 * byte) at its decimal OFFSET with cow_write(), checks that the mapping
 * reads the bytes back (exit 2 if not), commits with cow_commit() and
 * unmaps with cow_unmap().  Exit 0 on success, 1 on a usage error or a
 * failed call (reported on stderr with its errno).
 *
 * Build: cc -O1 -o api_writer api_writer.c -I native/include -L DIR -lcow
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cow.h"
#include "hexdata.h"

int main(int argc, char **argv)
{
    struct stat st;
    unsigned char *map;
    int fd;
    int rc;
    int i;

    if (argc < 2) {
        fprintf(stderr, "usage: api_writer FILE OFFSET:HEXDATA...\n");
        return 1;
    }
    fd = open(argv[1], O_RDWR);
    if (fd < 0 || fstat(fd, &st) != 0) {
        perror("api_writer: open");
        return 1;
    }
    map = cow_map(fd, (size_t)st.st_size, 0);
    if (map == NULL) {
        perror("api_writer: cow_map");
        return 1;
    }
    close(fd);

    for (i = 2; i < argc; i++) {
        const char *colon = strchr(argv[i], ':');
        unsigned char *data;
        size_t offset;
        long len;

        if (colon == NULL || (len = hexdata_decode(colon + 1, &data)) < 0) {
            fprintf(stderr, "api_writer: bad edit %s\n", argv[i]);
            return 1;
        }
        offset = strtoull(argv[i], NULL, 10);
        rc = cow_write(map, offset, data, (size_t)len);
        if (rc != 0) {
            fprintf(stderr, "api_writer: cow_write: %s\n", strerror(-rc));
            return 1;
        }
        if (memcmp(map + offset, data, (size_t)len) != 0) {
            fprintf(stderr, "api_writer: %s reads back wrong\n", argv[i]);
            return 2;
        }
        free(data);
    }
    rc = cow_commit(map);
    if (rc != 0) {
        fprintf(stderr, "api_writer: cow_commit: %s\n", strerror(-rc));
        return 1;
    }
    rc = cow_unmap(map);
    if (rc != 0) {
        fprintf(stderr, "api_writer: cow_unmap: %s\n", strerror(-rc));
        return 1;
    }

    return 0;
}
