/*
 * hammer: many threads writing to the same pages of a shared mapping at
 * once, while another thread commits, to check that no write is lost.
 *
 * Usage: hammer FILE PAGES ITERATIONS
 *
 * Maps the first PAGES pages of FILE (which must be at least that long)
 * MAP_SHARED read-write.  For each page in turn, 8 threads start together
 * and each stores ITERATIONS increasing 64-bit values into its own slot
 * (slot t holds page * 1000000 + t * 10000 + i, for i from 0), reading
 * each back at once; meanwhile the main thread msyncs the mapping over
 * and over, so pages are committed while they are being written.  At the
 * end every slot must hold its thread's last value.  Exit 0 when so, 2
 * when a write was lost or read back wrong, 1 on a usage or system error.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define THREADS 8

static unsigned char *map;
static size_t page_size;
static long pages;
static long iterations;
static pthread_barrier_t start;
static atomic_int failed;
static atomic_int done;

static uint64_t value(long page, int t, long i)
{
    return (uint64_t)page * 1000000 + (uint64_t)t * 10000 + (uint64_t)i;
}

static void *writer(void *arg)
{
    int t = (int)(intptr_t)arg;
    long page;
    long i;

    for (page = 0; page < pages; page++) {
        volatile uint64_t *slot =
            (volatile uint64_t *)(map + page * page_size) + t;

        pthread_barrier_wait(&start);
        for (i = 0; i < iterations; i++) {
            *slot = value(page, t, i);
            if (*slot != value(page, t, i))
                atomic_store(&failed, 1);
        }
    }
    atomic_fetch_add(&done, 1);

    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t threads[THREADS];
    long page;
    int fd;
    int t;

    if (argc != 4) {
        fprintf(stderr, "usage: hammer FILE PAGES ITERATIONS\n");
        return 1;
    }
    pages = atol(argv[2]);
    iterations = atol(argv[3]);
    page_size = (size_t)sysconf(_SC_PAGESIZE);
    fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        perror("hammer: open");
        return 1;
    }
    map = mmap(NULL, pages * page_size, PROT_READ | PROT_WRITE, MAP_SHARED,
               fd, 0);
    if (map == MAP_FAILED) {
        perror("hammer: mmap");
        return 1;
    }
    pthread_barrier_init(&start, NULL, THREADS);
    for (t = 0; t < THREADS; t++)
        pthread_create(&threads[t], NULL, writer, (void *)(intptr_t)t);

    /* Commit concurrently until the writers are done. */
    while (atomic_load(&done) < THREADS) {
        if (msync(map, pages * page_size, MS_SYNC) != 0) {
            perror("hammer: msync");
            return 1;
        }
        usleep(200);
    }
    for (t = 0; t < THREADS; t++)
        pthread_join(threads[t], NULL);

    for (page = 0; page < pages; page++)
        for (t = 0; t < THREADS; t++) {
            uint64_t v = ((uint64_t *)(map + page * page_size))[t];

            if (v != value(page, t, iterations - 1)) {
                fprintf(stderr, "hammer: page %ld slot %d lost a write\n",
                        page, t);
                return 2;
            }
        }
    if (atomic_load(&failed)) {
        fprintf(stderr, "hammer: a write read back wrong\n");
        return 2;
    }
    if (munmap(map, pages * page_size) != 0) {
        perror("hammer: munmap");
        return 1;
    }

    return 0;
}
