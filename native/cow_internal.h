/*
 * cow_internal.h: interfaces shared by the source files of libcow.
 *
 * libcow is split by concern: libcow.c holds the start-up, the interposed
 * mmap family, the C API and the commit policy; mappings.c the table of
 * managed mappings and base files and the diff that turns dirty pages into
 * records; handler.c the SIGSEGV handler that makes pages private (and
 * the sigaction wrappers that keep it installed); io.c the wrappers of
 * the calls through which the kernel writes into user memory; rpc.c the
 * connection to cowd; msgpack.c the wire encoding.
 *
 * Locking.  Two locks protect libcow's state, always taken in this order:
 *
 *   - cow__mutex (a pthread mutex, libcow.c) serializes everything done in
 *     normal context: registering and dropping mappings, base files,
 *     batches, commits and the connection.  The signal handler never takes
 *     it.
 *   - the table spinlock (mappings.c) protects the fields the handler
 *     reads or writes: the mapping entries and their page states and
 *     snapshots.  The handler takes it; normal-context code takes it only
 *     with every signal blocked (cow__table_lock()) and only briefly, so
 *     the handler can never spin on a lock its own thread holds.
 */
#ifndef COW_INTERNAL_H
#define COW_INTERNAL_H

#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#if !defined(SYS_mmap) || !defined(SYS_mremap)
#error "libcow needs a 64-bit Linux target with the mmap and mremap calls"
#endif

#define COW__EXPORT __attribute__((visibility("default")))

/* Fixed so that the handler never allocates; a full table refuses mmap. */
#define COW__MAX_MAPPINGS 4096

/* Distinct base files mapped at once; each holds one descriptor. */
#define COW__MAX_BASES 1024

/* Longest single record; a longer run is split into adjacent records. */
#define COW__RECORD_MAX (1u << 20)

/* Most record data in one commit frame (the daemon refuses 64 MiB). */
#define COW__FRAME_DATA_MAX (4u << 20)

/* Size of a record header in a batch buffer: 64-bit offset, 32-bit len. */
#define COW__RECORD_HEADER 12

/*
 * Page states, kept in the low bits of a page's state byte.  The bits
 * above hold the protection the program wants for the page (PROT_READ,
 * PROT_WRITE, PROT_EXEC), which the page actually has only when it is
 * DIRTY: CLEAN and COMMITTED pages never have PROT_WRITE.
 */
enum {
    COW__CLEAN = 0,     /* the shared file page, mapped read-only */
    COW__DIRTY = 1,     /* a private copy, written since the last commit */
    COW__COMMITTED = 2, /* a private copy, committed, read-only again */
    COW__GONE = 3,      /* unmapped by the program */
};

#define COW__STATE_MASK 0x03
#define COW__PROT_SHIFT 2
#define COW__PROT_MASK (PROT_READ | PROT_WRITE | PROT_EXEC)

/* A growable heap buffer; err is sticky so encoders check it once. */
struct cow__buf {
    unsigned char *data;
    size_t len;
    size_t cap;
    int err;
};

int cow__buf_reserve(struct cow__buf *b, size_t more);
void cow__buf_put(struct cow__buf *b, const void *p, size_t n);
void cow__buf_free(struct cow__buf *b);

/*
 * A batch of records (file offset, bytes), kept in a buffer as a 12-byte
 * header followed by the bytes.  tail_end is the file offset just past
 * the last record when that record came from the diff and may be
 * extended by the next run; UINT64_MAX otherwise.
 */
struct cow__batch {
    struct cow__buf buf;
    size_t nrecords;
    size_t tail;
    uint64_t tail_end;
};

int cow__batch_add(struct cow__batch *b, uint64_t offset, const void *p,
                   size_t len);
void cow__batch_clear(struct cow__batch *b);
void cow__batch_free(struct cow__batch *b);
void cow__batch_record(const struct cow__batch *b, size_t pos,
                       uint64_t *offset, uint32_t *len);

/* msgpack.c: encoder (into a cow__buf) and bounds-checked decoder. */
void cow__mp_put_nil(struct cow__buf *b);
void cow__mp_put_bool(struct cow__buf *b, bool v);
void cow__mp_put_uint(struct cow__buf *b, uint64_t v);
void cow__mp_put_int(struct cow__buf *b, int64_t v);
void cow__mp_put_str(struct cow__buf *b, const char *s, size_t n);
void cow__mp_put_cstr(struct cow__buf *b, const char *s);
void cow__mp_put_bin(struct cow__buf *b, const void *p, size_t n);
void cow__mp_put_bin_header(struct cow__buf *b, size_t n);
void cow__mp_put_array(struct cow__buf *b, uint32_t n);
void cow__mp_put_map(struct cow__buf *b, uint32_t n);

struct cow__mpr {
    const unsigned char *p;
    size_t len;
    size_t pos;
};

/*
 * Each reader returns 0 and consumes the value, -EAGAIN when the buffer
 * ends inside it, or -EBADMSG when it is malformed or of another type;
 * on error nothing is consumed.  Strings and bins point into the buffer.
 */
int cow__mp_get_nil(struct cow__mpr *r);
int cow__mp_get_bool(struct cow__mpr *r, bool *v);
int cow__mp_get_uint(struct cow__mpr *r, uint64_t *v);
int cow__mp_get_int(struct cow__mpr *r, int64_t *v);
int cow__mp_get_str(struct cow__mpr *r, const char **s, uint32_t *n);
int cow__mp_get_bin(struct cow__mpr *r, const void **p, uint32_t *n);
int cow__mp_get_array(struct cow__mpr *r, uint32_t *n);
int cow__mp_get_map(struct cow__mpr *r, uint32_t *n);
int cow__mp_skip(struct cow__mpr *r);
bool cow__mp_next_is_nil(const struct cow__mpr *r);

/* mappings.c: the tables, shared with the handler. */
struct cow__mapping {
    uintptr_t start;
    size_t length;   /* as the program asked, not rounded */
    size_t npages;
    size_t live;     /* pages not GONE; the entry is dropped at zero */
    uint64_t offset; /* file offset of start */
    int base;
    bool used;
    bool api;        /* made by cow_map() */
    _Atomic unsigned char *state;
    void **snap;     /* per page: contents at the last commit, or NULL */
};

struct cow__base {
    bool used;
    dev_t dev;
    ino_t ino;
    int fd;          /* our own descriptor of the file, close-on-exec */
    char *path;      /* where it was found, to open it again if need be */
    int nmappings;
    uint64_t map_offset; /* what the last registered mapping covers, */
    uint64_t map_length; /* passed to cowd's `map` */
    int64_t log;     /* cowd's handle, valid while log_conn is current */
    uint64_t log_conn;
    struct cow__batch batch;  /* collected, not yet acknowledged */
    struct cow__batch writes; /* cow_write() records since the commit */
};

/*
 * Page state accessors.  Writers hold the spinlock; readers without it
 * get a hint to be checked again under it.
 */
static inline unsigned cow__state(const struct cow__mapping *m, size_t i)
{
    return atomic_load_explicit(&m->state[i], memory_order_relaxed) &
           COW__STATE_MASK;
}

static inline int cow__page_prot(const struct cow__mapping *m, size_t i)
{
    return atomic_load_explicit(&m->state[i], memory_order_relaxed) >>
           COW__PROT_SHIFT;
}

static inline void cow__set_page(struct cow__mapping *m, size_t i,
                                 unsigned state, int prot)
{
    atomic_store_explicit(&m->state[i],
                          (unsigned char)(state |
                                          (unsigned)(prot & COW__PROT_MASK)
                                              << COW__PROT_SHIFT),
                          memory_order_relaxed);
}

static inline void cow__set_state(struct cow__mapping *m, size_t i,
                                  unsigned state)
{
    cow__set_page(m, i, state, cow__page_prot(m, i));
}

extern struct cow__mapping cow__mappings[COW__MAX_MAPPINGS];
extern struct cow__base cow__bases[COW__MAX_BASES];
extern size_t cow__page;

void cow__spin_lock(void);
void cow__spin_unlock(void);
void cow__table_lock(sigset_t *saved);
void cow__table_unlock(const sigset_t *saved);

int cow__find_page(uintptr_t addr, struct cow__mapping **m, size_t *page);
int cow__base_get(int fd, const struct stat *st);
int cow__base_fd(int k);
void cow__base_maybe_drop(int b);
int cow__mapping_add(uintptr_t start, size_t length, uint64_t offset,
                     int prot, int base, bool api);
int cow__mapping_at(uintptr_t start);
bool cow__range_managed(uintptr_t start, size_t length);
int cow__range_bases(uintptr_t start, size_t length, int *bases, int max);
void cow__range_gone(uintptr_t start, size_t length);
int cow__range_protect(uintptr_t start, size_t length, int prot);
int cow__collect(int b);
void cow__after_fork_baseline(void);

/*
 * Whether fd still refers to the file (dev, ino).  A program may close
 * descriptors it did not open (daemons close them all) and get the same
 * numbers for its own files: libcow must then neither use nor close them.
 */
static inline bool cow__fd_is(int fd, dev_t dev, ino_t ino)
{
    struct stat st;

    return fd >= 0 && fstat(fd, &st) == 0 && st.st_dev == dev &&
           st.st_ino == ino;
}

/* handler.c */
int cow__handler_install(void);
void cow__prefault(const void *addr, size_t len);

/* rpc.c: every call is made with cow__mutex held. */
int cow__rpc_connect(const char *path);
bool cow__rpc_connected(void);
uint64_t cow__rpc_conn(void);
void cow__rpc_close(void);
const char *cow__rpc_error(void);
int cow__rpc_fail(int rc, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
int cow__rpc_map(int fd, uint64_t offset, uint64_t length, int64_t *log);
int cow__rpc_commit(int64_t log, const struct cow__batch *b,
                    int64_t *seq);

/* libcow.c */
extern bool cow__debug_on;
void cow__say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void cow__debug(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

/*
 * The kernel's own mmap family, bypassing the interposed functions and
 * glibc's wrappers.  They return like the libc functions (MAP_FAILED or
 * -1 with errno set) and are safe to call from the signal handler.
 */
static inline void *cow__sys_mmap(void *addr, size_t len, int prot,
                                  int flags, int fd, off_t off)
{
    return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

static inline int cow__sys_munmap(void *addr, size_t len)
{
    return (int)syscall(SYS_munmap, addr, len);
}

static inline int cow__sys_mprotect(void *addr, size_t len, int prot)
{
    return (int)syscall(SYS_mprotect, addr, len, prot);
}

static inline void *cow__sys_mremap(void *old, size_t old_len,
                                    size_t new_len, int flags, void *new)
{
    return (void *)syscall(SYS_mremap, old, old_len, new_len, flags, new);
}

static inline int cow__sys_msync(void *addr, size_t len, int flags)
{
    return (int)syscall(SYS_msync, addr, len, flags);
}

#endif /* COW_INTERNAL_H */
