/*
 * kernelwrite: has the kernel write into a shared mapping of a file, for
 * the tests of the calls libcow wraps because the kernel reports EFAULT
 * for them instead of faulting.
 *
 * Usage: kernelwrite FILE METHOD OFFSET SOURCE
 *
 * Maps all of FILE MAP_SHARED read-write and reads all of SOURCE into it
 * at OFFSET with METHOD: read, pread, readv, preadv, fread, or, through
 * a socket pair another thread feeds with SOURCE, recv, recvfrom or
 * recvmsg.  The vector methods split the destination in two at a page
 * boundary.  Checks that the mapping holds SOURCE's bytes, then exits,
 * leaving the commit to exit.  Exit 0 on success, 2 when the mapping
 * does not hold the bytes, 1 on a usage or system error.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

static unsigned char *source;
static size_t source_len;
static int feed_fd;

static void *feed(void *arg)
{
    size_t done = 0;

    (void)arg;
    while (done < source_len) {
        ssize_t n = write(feed_fd, source + done, source_len - done);

        if (n <= 0)
            break;
        done += (size_t)n;
    }
    close(feed_fd);

    return NULL;
}

static int load_source(const char *path)
{
    struct stat st;
    int fd = open(path, O_RDONLY);

    if (fd < 0 || fstat(fd, &st) != 0)
        return -1;
    source_len = (size_t)st.st_size;
    source = malloc(source_len + 1);
    if (source == NULL ||
        pread(fd, source, source_len, 0) != (ssize_t)source_len)
        return -1;
    close(fd);

    return 0;
}

/* One call of METHOD into dst; returns what it returned. */
static ssize_t read_once(const char *method, int fd, unsigned char *dst,
                         size_t len, off_t at, FILE *stream)
{
    size_t half = len / 2;
    struct iovec iov[2] = {
        { .iov_base = dst, .iov_len = half },
        { .iov_base = dst + half, .iov_len = len - half },
    };
    struct msghdr msg = { .msg_iov = iov, .msg_iovlen = 2 };

    if (strcmp(method, "read") == 0)
        return read(fd, dst, len);
    if (strcmp(method, "pread") == 0)
        return pread(fd, dst, len, at);
    if (strcmp(method, "readv") == 0)
        return readv(fd, iov, 2);
    if (strcmp(method, "preadv") == 0)
        return preadv(fd, iov, 2, at);
    if (strcmp(method, "fread") == 0)
        return (ssize_t)fread(dst, 1, len, stream);
    if (strcmp(method, "recv") == 0)
        return recv(fd, dst, len, 0);
    if (strcmp(method, "recvfrom") == 0)
        return recvfrom(fd, dst, len, 0, NULL, NULL);
    if (strcmp(method, "recvmsg") == 0)
        return recvmsg(fd, &msg, 0);

    return -2;
}

/* Opens what METHOD reads from: SOURCE, or a socket another thread feeds. */
static int open_source(const char *method, const char *path, FILE **stream,
                       pthread_t *feeder)
{
    int pair[2];

    if (strncmp(method, "recv", 4) != 0) {
        *stream = fopen(path, "rb");
        return *stream != NULL ? fileno(*stream) : -1;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) != 0)
        return -1;
    feed_fd = pair[1];
    if (pthread_create(feeder, NULL, feed, NULL) != 0)
        return -1;

    return pair[0];
}

int main(int argc, char **argv)
{
    pthread_t feeder;
    FILE *stream = NULL;
    unsigned char *map;
    struct stat st;
    size_t offset;
    size_t done = 0;
    int fd;

    if (argc != 5) {
        fprintf(stderr, "usage: kernelwrite FILE METHOD OFFSET SOURCE\n");
        return 1;
    }
    offset = strtoull(argv[3], NULL, 10);
    fd = open(argv[1], O_RDWR);
    if (fd < 0 || fstat(fd, &st) != 0 || load_source(argv[4]) != 0 ||
        offset + source_len > (size_t)st.st_size) {
        perror("kernelwrite: open");
        return 1;
    }
    map = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
               fd, 0);
    if (map == MAP_FAILED) {
        perror("kernelwrite: mmap");
        return 1;
    }
    close(fd);
    fd = open_source(argv[2], argv[4], &stream, &feeder);
    if (fd < 0) {
        perror("kernelwrite: source");
        return 1;
    }
    while (done < source_len) {
        ssize_t n = read_once(argv[2], fd, map + offset + done,
                              source_len - done, (off_t)done, stream);

        if (n == -2) {
            fprintf(stderr, "kernelwrite: unknown method %s\n", argv[2]);
            return 1;
        }
        if (n <= 0) {
            perror("kernelwrite: reading into the mapping");
            return 1;
        }
        done += (size_t)n;
    }
    if (memcmp(map + offset, source, source_len) != 0) {
        fprintf(stderr, "kernelwrite: the mapping does not hold the data\n");
        return 2;
    }

    return 0;
}
