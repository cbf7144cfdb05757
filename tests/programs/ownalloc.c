/*
 * ownalloc: a program that brings its own allocator, for the test that
 * libcow starts up and runs under one.
 *
 * Usage: ownalloc FILE OFFSET:HEXDATA...
 *
 * The program defines malloc, calloc, realloc, free and the aligned
 * forms, so every allocation of the loader, libc and libcow comes here
 * from the first one on, libcow's start-up (dlsym, strdup, calloc)
 * included.  The allocator is a bump allocator over chunks it maps with
 * mmap, libc's symbol, which libcow interposes: a libcow mmap that
 * allocated, or that started libcow while libcow's start-up allocated,
 * would come back here.  Like real allocators it holds its lock across
 * that mmap, and on its first call it reads a /proc file with read(2),
 * which libcow wraps too (jemalloc reads overcommit_memory so); coming
 * back into the allocator on the same thread is reported and aborts
 * rather than deadlocking.
 *
 * Then it maps FILE MAP_SHARED, copies each HEXDATA to its decimal
 * OFFSET, checks the mapping reads back what it wrote (exit 2 if not)
 * and unmaps it.  It prints how many allocations were made before main,
 * so that a test can tell the allocator was used at start-up.  Exit 0 on
 * success, 1 on a usage or system error.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hexdata.h"

/* Each block starts with its size, keeping what follows 16-aligned. */
#define OWN_HEADER 16
#define OWN_CHUNK (1u << 20)

static char *own_next;
static char *own_end;
static size_t own_count;
static char own_lock;
static __thread int own_inside;

static void own_die(const char *msg)
{
    ssize_t unused = write(2, msg, strlen(msg));

    (void)unused;
    abort();
}

/* What a first call of the allocator reads, as jemalloc's does. */
static void own_setup(void)
{
    char buf[16];
    int fd = open("/proc/sys/vm/overcommit_memory", O_RDONLY | O_CLOEXEC);

    if (fd >= 0) {
        ssize_t unused = read(fd, buf, sizeof(buf));

        (void)unused;
        close(fd);
    }
}

static void *own_alloc(size_t size, size_t align)
{
    static int set_up;
    uintptr_t at;
    size_t need;
    void *p = NULL;

    if (align < OWN_HEADER)
        align = OWN_HEADER;
    if (size > SIZE_MAX / 2 || align > OWN_CHUNK)
        return NULL;
    if (own_inside)
        own_die("ownalloc: the allocator was entered again from within\n");
    own_inside = 1;
    while (__atomic_test_and_set(&own_lock, __ATOMIC_ACQUIRE))
        ;
    if (!set_up) {
        set_up = 1;
        own_setup();
    }
    need = size + OWN_HEADER + align;
    if (own_next == NULL || (size_t)(own_end - own_next) < need) {
        size_t len = need > OWN_CHUNK ? need : OWN_CHUNK;
        char *chunk = mmap(NULL, len, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

        if (chunk == MAP_FAILED)
            goto out;
        own_next = chunk;
        own_end = chunk + len;
    }
    at = ((uintptr_t)own_next + OWN_HEADER + align - 1) & ~(align - 1);
    *(size_t *)(at - OWN_HEADER) = size;
    own_next = (char *)(at + size);
    own_count++;
    p = (void *)at;
out:
    __atomic_clear(&own_lock, __ATOMIC_RELEASE);
    own_inside = 0;

    return p;
}

void *malloc(size_t size)
{
    return own_alloc(size, OWN_HEADER);
}

void *calloc(size_t n, size_t size)
{
    /* Fresh anonymous memory is zero, and a bump never reuses a block. */
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;

    return own_alloc(n * size, OWN_HEADER);
}

void *realloc(void *old, size_t size)
{
    size_t had = old != NULL ? *(size_t *)((char *)old - OWN_HEADER) : 0;
    void *p = own_alloc(size, OWN_HEADER);

    if (p != NULL && old != NULL)
        memcpy(p, old, had < size ? had : size);

    return p;
}

void free(void *p)
{
    (void)p;
}

void *memalign(size_t align, size_t size)
{
    return own_alloc(size, align);
}

void *aligned_alloc(size_t align, size_t size)
{
    return own_alloc(size, align);
}

int posix_memalign(void **out, size_t align, size_t size)
{
    void *p = own_alloc(size, align);

    if (p == NULL)
        return ENOMEM;
    *out = p;

    return 0;
}

size_t malloc_usable_size(void *p)
{
    return p != NULL ? *(size_t *)((char *)p - OWN_HEADER) : 0;
}

int main(int argc, char **argv)
{
    size_t before_main = own_count;
    unsigned char *map;
    struct stat st;
    int fd;
    int i;

    if (argc < 3) {
        fprintf(stderr, "usage: ownalloc FILE OFFSET:HEXDATA...\n");
        return 1;
    }
    fd = open(argv[1], O_RDWR);
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size == 0) {
        perror("ownalloc: open");
        return 1;
    }
    map = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
               fd, 0);
    if (map == MAP_FAILED) {
        perror("ownalloc: mmap");
        return 1;
    }
    close(fd);
    for (i = 2; i < argc; i++) {
        char *end;
        size_t offset = strtoull(argv[i], &end, 10);
        unsigned char *data;
        long len;

        if (*end != ':' || (len = hexdata_decode(end + 1, &data)) < 0 ||
            offset + (size_t)len > (size_t)st.st_size) {
            fprintf(stderr, "ownalloc: bad edit %s\n", argv[i]);
            return 1;
        }
        memcpy(map + offset, data, (size_t)len);
        if (memcmp(map + offset, data, (size_t)len) != 0) {
            fprintf(stderr, "ownalloc: %s does not read back\n", argv[i]);
            return 2;
        }
        free(data);
    }
    if (munmap(map, (size_t)st.st_size) != 0) {
        perror("ownalloc: munmap");
        return 1;
    }
    printf("allocations before main: %zu\n", before_main);

    return 0;
}
