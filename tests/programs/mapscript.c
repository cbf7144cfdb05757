/*
 * mapscript: runs a script of operations on a shared mapping of a file,
 * for the tests of commit points, retries, partial unmaps and fork.
 *
 * Usage: mapscript FILE STEP...
 *
 * Opens FILE read-write and maps all of it MAP_SHARED with PROT_READ |
 * PROT_WRITE, then runs the steps in order:
 *
 *   wOFFSET:HEX     memcpy the bytes HEX (two hex digits each) to OFFSET;
 *                   the bytes may reach into the last page past the end
 *                   of the file
 *   vOFFSET:HEX     check that the mapping holds HEX at OFFSET (exit 2 if
 *                   not)
 *   s               msync the whole mapping (a commit point)
 *   uOFFSET:LENGTH  munmap LENGTH bytes at OFFSET (page-aligned)
 *   rOFFSET:PATH    read(2) all of PATH into the mapping at OFFSET
 *   pMS             sleep MS milliseconds
 *   f               fork: the child runs the remaining steps and exits 0;
 *                   the parent waits for it, then runs them too
 *   x               exit(0) now, leaving the rest to the exit-time commit
 *
 * Offsets and lengths are decimal.  Exit 0 on success, 2 when a check
 * fails, 1 on a usage or system error, 3 when a forked child failed.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static unsigned char *map;
static size_t size;
static size_t mapped; /* size rounded up to whole pages */

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Parses "OFFSET:REST"; returns REST or NULL. */
static const char *parse_offset(const char *arg, size_t *offset)
{
    char *end;

    *offset = strtoull(arg, &end, 10);
    if (end == arg || *end != ':')
        return NULL;

    return end + 1;
}

/* Decodes hex into a new buffer; returns its length or -1. */
static long decode(const char *hex, unsigned char **out)
{
    size_t n = strlen(hex) / 2;
    size_t k;

    if (strlen(hex) % 2 != 0 || (*out = malloc(n + 1)) == NULL)
        return -1;
    for (k = 0; k < n; k++) {
        int hi = hex_digit(hex[2 * k]);
        int lo = hex_digit(hex[2 * k + 1]);

        if (hi < 0 || lo < 0)
            return -1;
        (*out)[k] = (unsigned char)(hi << 4 | lo);
    }

    return (long)n;
}

static int read_into(size_t offset, const char *path)
{
    int fd = open(path, O_RDONLY);
    size_t got = 0;

    if (fd < 0) {
        perror("mapscript: open");
        return 1;
    }
    for (;;) {
        ssize_t n = read(fd, map + offset + got, size - offset - got);

        if (n < 0) {
            perror("mapscript: read");
            return 1;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    close(fd);

    return 0;
}

static int step(const char *s, int *forked)
{
    unsigned char *data;
    const char *rest;
    size_t offset;
    long len;
    struct timespec ts;

    switch (s[0]) {
    case 'w':
    case 'v':
        rest = parse_offset(s + 1, &offset);
        if (rest == NULL || (len = decode(rest, &data)) < 0 ||
            offset + (size_t)len > mapped)
            break;
        if (s[0] == 'w') {
            memcpy(map + offset, data, (size_t)len);
        } else if (memcmp(map + offset, data, (size_t)len) != 0) {
            fprintf(stderr, "mapscript: %s does not hold\n", s);
            return 2;
        }
        free(data);
        return 0;
    case 's':
        if (msync(map, size, MS_SYNC) != 0) {
            perror("mapscript: msync");
            return 1;
        }
        return 0;
    case 'u':
        rest = parse_offset(s + 1, &offset);
        if (rest == NULL)
            break;
        if (munmap(map + offset, strtoull(rest, NULL, 10)) != 0) {
            perror("mapscript: munmap");
            return 1;
        }
        return 0;
    case 'r':
        rest = parse_offset(s + 1, &offset);
        if (rest == NULL || offset > size)
            break;
        return read_into(offset, rest);
    case 'p':
        ts.tv_sec = atol(s + 1) / 1000;
        ts.tv_nsec = atol(s + 1) % 1000 * 1000000;
        nanosleep(&ts, NULL);
        return 0;
    case 'f':
        *forked = 1;
        return 0;
    case 'x':
        exit(0);
    default:
        break;
    }
    fprintf(stderr, "mapscript: bad step %s\n", s);

    return 1;
}

int main(int argc, char **argv)
{
    struct stat st;
    int fd;
    int i;

    if (argc < 2) {
        fprintf(stderr, "usage: mapscript FILE STEP...\n");
        return 1;
    }
    fd = open(argv[1], O_RDWR);
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size == 0) {
        perror("mapscript: open");
        return 1;
    }
    size = (size_t)st.st_size;
    mapped = (size + (size_t)sysconf(_SC_PAGESIZE) - 1) &
             ~((size_t)sysconf(_SC_PAGESIZE) - 1);
    map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        perror("mapscript: mmap");
        return 1;
    }
    close(fd);

    for (i = 2; i < argc; i++) {
        int forked = 0;
        int rc = step(argv[i], &forked);
        pid_t child;
        int status;

        if (rc != 0)
            return rc;
        if (!forked)
            continue;
        fflush(NULL);
        child = fork();
        if (child < 0) {
            perror("mapscript: fork");
            return 1;
        }
        if (child == 0)
            continue;
        if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0)
            return 3;
    }

    return 0;
}
