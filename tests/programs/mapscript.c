/*
 * mapscript: runs a script of operations on a shared mapping of a file,
 * for the tests of commit points, retries, partial unmaps and fork.
 *
 * Usage: mapscript [--mmap64] FILE STEP...
 *
 * Opens FILE read-write and maps all of it MAP_SHARED with PROT_READ |
 * PROT_WRITE (with --mmap64 through mmap64, the name the large-file
 * interface gives it, which is a symbol of its own), then runs the steps
 * in order:
 *
 *   wOFFSET:HEX     memcpy the bytes HEX (two hex digits each) to OFFSET;
 *                   the bytes may reach into the last page past the end
 *                   of the file
 *   vOFFSET:HEX     check that the mapping holds HEX at OFFSET (exit 2 if
 *                   not)
 *   nOFFSET:HEX     set errno to EXDEV, store the bytes HEX at OFFSET one
 *                   by one, and check that errno is still EXDEV (exit 2
 *                   if not): a fault taken by a store must not change it
 *   s               msync the whole mapping (a commit point)
 *   uOFFSET:LENGTH  munmap LENGTH bytes at OFFSET (page-aligned)
 *   rOFFSET:PATH    read(2) all of PATH into the mapping at OFFSET
 *   pMS             sleep MS milliseconds
 *   f               fork: the child runs the remaining steps and exits 0;
 *                   the parent waits for it, then runs them too
 *   F ... J         fork: the child runs the steps up to J and exits 0
 *                   there (through exit(), so its destructors commit);
 *                   the parent skips them, waits for the child at J and
 *                   goes on
 *   gPATH           wait until a byte can be read from PATH (a FIFO)
 *   mOFFSET:LENGTH:PROT
 *                   mprotect LENGTH bytes at OFFSET to PROT, letters of
 *                   "rwx" or "-" for none
 *   dOFFSET:LENGTH  madvise(MADV_DONTNEED) LENGTH bytes at OFFSET
 *   eKIND:PATH      exec PATH (no arguments) through KIND: execv, execve,
 *                   execvp, execvpe, execl, execlp, execle, fexecve or
 *                   execveat
 *   _               _exit(0) now; E: _Exit(0) now
 *   S               posix_spawnp "true" (found on PATH) and wait for
 *                   it; y: system("true")
 *   x               exit(0) now, leaving the rest to the exit-time commit
 *
 * Offsets and lengths are decimal.  Exit 0 on success, 2 when a check
 * fails, 1 on a usage or system error, 3 when a forked child failed.
 */
#define _GNU_SOURCE
#define _LARGEFILE64_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "hexdata.h"

extern char **environ;

static unsigned char *map;
static size_t size;
static size_t mapped; /* size rounded up to whole pages */

/* Parses "OFFSET:REST"; returns REST or NULL. */
static const char *parse_offset(const char *arg, size_t *offset)
{
    char *end;

    *offset = strtoull(arg, &end, 10);
    if (end == arg || *end != ':')
        return NULL;

    return end + 1;
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

static int wait_on(const char *path)
{
    char byte;
    int fd = open(path, O_RDONLY);

    if (fd < 0 || read(fd, &byte, 1) != 1) {
        perror("mapscript: wait");
        return 1;
    }
    close(fd);

    return 0;
}

static int prot_of(const char *letters)
{
    int prot = PROT_NONE;

    prot |= strchr(letters, 'r') != NULL ? PROT_READ : 0;
    prot |= strchr(letters, 'w') != NULL ? PROT_WRITE : 0;
    prot |= strchr(letters, 'x') != NULL ? PROT_EXEC : 0;

    return prot;
}

static int range_step(const char *s)
{
    size_t offset;
    const char *rest = parse_offset(s + 1, &offset);
    char *end;
    size_t length;

    if (rest == NULL)
        return -1;
    length = strtoull(rest, &end, 10);
    if (s[0] == 'd')
        return madvise(map + offset, length, MADV_DONTNEED);
    if (*end != ':')
        return -1;

    return mprotect(map + offset, length, prot_of(end + 1));
}

static int exec_step(const char *s)
{
    char kind[16];
    const char *path = strchr(s, ':');
    char *const argv[] = { (char *)"true", NULL };
    int fd;

    if (path == NULL || (size_t)(path - s) >= sizeof(kind))
        return 1;
    memcpy(kind, s, (size_t)(path - s));
    kind[path - s] = '\0';
    path++;
    if (strcmp(kind, "execv") == 0)
        execv(path, argv);
    else if (strcmp(kind, "execve") == 0)
        execve(path, argv, environ);
    else if (strcmp(kind, "execvp") == 0)
        execvp(path, argv);
    else if (strcmp(kind, "execvpe") == 0)
        execvpe(path, argv, environ);
    else if (strcmp(kind, "execl") == 0)
        execl(path, "true", (char *)NULL);
    else if (strcmp(kind, "execlp") == 0)
        execlp(path, "true", (char *)NULL);
    else if (strcmp(kind, "execle") == 0)
        execle(path, "true", (char *)NULL, environ);
    else if (strcmp(kind, "execveat") == 0)
        execveat(AT_FDCWD, path, argv, environ, 0);
    else if (strcmp(kind, "fexecve") == 0 &&
             (fd = open(path, O_RDONLY)) >= 0)
        fexecve(fd, argv, environ);
    else
        fprintf(stderr, "mapscript: unknown exec kind %s\n", kind);
    perror("mapscript: exec");

    return 1;
}

static int spawn_true(void)
{
    char *const argv[] = { (char *)"true", NULL };
    pid_t pid;
    int status;

    if (posix_spawnp(&pid, "true", NULL, NULL, argv, environ) != 0 ||
        waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) ||
        WEXITSTATUS(status) != 0) {
        fprintf(stderr, "mapscript: posix_spawnp true failed\n");
        return 1;
    }

    return 0;
}

/*
 * Stores data at offset under a distinctive errno.  The stores are
 * volatile so that each one happens, and faults, between setting errno
 * and reading it back.
 */
static int errno_kept(size_t offset, const unsigned char *data, size_t len)
{
    volatile unsigned char *to = map + offset;
    int seen;
    size_t i;

    errno = EXDEV;
    for (i = 0; i < len; i++)
        to[i] = data[i];
    seen = errno;
    if (seen != EXDEV) {
        fprintf(stderr, "mapscript: errno was %d after the stores, not %d\n",
                seen, EXDEV);
        return 2;
    }

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
    case 'n':
        rest = parse_offset(s + 1, &offset);
        if (rest == NULL || (len = hexdata_decode(rest, &data)) < 0 ||
            offset + (size_t)len > mapped)
            break;
        if (s[0] == 'w') {
            memcpy(map + offset, data, (size_t)len);
        } else if (s[0] == 'n') {
            int rc = errno_kept(offset, data, (size_t)len);

            free(data);
            return rc;
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
    case 'F':
        *forked = 2;
        return 0;
    case 'J':
        /* Reached only by the child of F. */
        fflush(NULL);
        exit(0);
    case 'g':
        return wait_on(s + 1);
    case 'm':
    case 'd':
        if (range_step(s) == 0)
            return 0;
        perror("mapscript: mprotect/madvise");
        return 1;
    case 'e':
        return exec_step(s + 1);
    case '_':
        _exit(0);
    case 'E':
        _Exit(0);
    case 'S':
        return spawn_true();
    case 'y':
        return system("true") == 0 ? 0 : 1;
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
    int use_mmap64 = argc > 1 && strcmp(argv[1], "--mmap64") == 0;
    int fd;
    int i;

    if (use_mmap64) {
        argv++;
        argc--;
    }
    if (argc < 2) {
        fprintf(stderr, "usage: mapscript [--mmap64] FILE STEP...\n");
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
    if (use_mmap64)
        map = mmap64(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    else
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
        if (forked == 2)
            while (i < argc && strcmp(argv[i], "J") != 0)
                i++;
        if (waitpid(child, &status, 0) < 0 || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0)
            return 3;
    }

    return 0;
}
