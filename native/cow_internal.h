/*
 * cow_internal.h: interfaces shared by the source files of libcow.
 *
 * libcow is split by concern: libcow.c holds the start-up, the interposed
 * mmap family, the C API and the commit policy; process.c what a process
 * does to its image as a whole (fork, exec, exit) and the locks that must
 * survive it; mappings.c the table of managed mappings and base files and
 * the diff that turns written pages into records; handler.c the SIGSEGV
 * handler of the remap engine (and the sigaction wrappers that keep it
 * installed); uffd.c the userfaultfd engine that a mapping switches to
 * before the remap engine runs out of kernel mappings; io.c the wrappers
 * of the calls through which the kernel writes into user memory; rpc.c
 * the connection to cowd; pte.c the fault channel of the pteditor
 * engine; msgpack.c the wire encoding.
 *
 * Locking.  Two locks protect libcow's state, always taken in this order:
 *
 *   - cow__mutex (a pthread mutex behind cow__lock(), process.c)
 *     serializes everything done in normal context: registering and
 *     dropping mappings, base files, batches, commits and the connection.
 *     The signal handler never takes it.
 *   - the table spinlock (mappings.c) protects the fields the handler
 *     reads or writes: the mapping entries and their page states and
 *     snapshots.  The handler takes it; normal-context code takes it only
 *     with every signal blocked (cow__table_lock()) and only briefly, so
 *     the handler can never spin on a lock its own thread holds.  Every
 *     change to the table is made with every signal blocked, so a handler
 *     never runs in the middle of one.
 *
 * Across fork() the forking thread holds both locks on behalf of the
 * fork (see process.c): nothing is half-changed then, so code that runs
 * on that thread until the fork returns (other atfork handlers, the
 * SIGSEGV handler) uses the state without taking them.
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

/*
 * Thread-local flags are read by the signal handler, which must not call
 * __tls_get_addr (it may allocate); the initial-exec model needs none.
 */
#define COW__TLS __thread __attribute__((tls_model("initial-exec")))

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
 * PROT_WRITE, PROT_EXEC).  In a remap mapping the page actually has it
 * only when it is DIRTY: CLEAN and COMMITTED pages never have PROT_WRITE.
 * In a uffd mapping every live page has the program's protection (the
 * mapping is private, so a write never reaches the file); CLEAN means
 * the kernel tracks the page, and DIRTY marks a page written since the
 * last commit whose tracking the kernel lost (a move), only until the
 * range is write-protected again.
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

/* How a mapping's written pages are made private and found again. */
enum {
    COW__ENGINE_REMAP = 0, /* per-page copies moved in by the handler */
    COW__ENGINE_UFFD = 1,  /* MAP_PRIVATE, written pages found by scan */
};

/*
 * A growable buffer.  Its memory comes straight from mmap, never from
 * malloc, so that a commit made from a signal handler (a program calling
 * _exit there) cannot deadlock on an allocator lock the interrupted code
 * holds.  err is sticky so encoders check it once.
 */
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
void cow__mp_put_request(struct cow__buf *b, uint32_t msgid,
                         const char *method, uint32_t nkeys);

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
    unsigned char engine;
    _Atomic unsigned char *state;
    /*
     * Per page: the page as last committed, or NULL.  The reference of
     * the next diff of that page when set.
     */
    void **snap;
    /* A forked child's snapshots of a uffd mapping: npages pages, or NULL. */
    unsigned char *snap_area;
    /*
     * The snapshot array of a remap mapping that the handler switched to
     * uffd: the handler frees nothing a cow__mutex holder may be reading,
     * so the next holder frees these (cow__drop_old_snaps).
     */
    void **old_snap;
    /*
     * uffd mappings: where the log's view of each page differs from the
     * base file (see commit.c).  delta_at[i] is the offset of page i's
     * delta in the deltas buffer plus one, or 0 where the log's view is
     * the base's; NULL until a page needs one.  delta_live counts the
     * bytes of the buffer still referenced.
     */
    uint64_t *delta_at;
    struct cow__buf deltas;
    size_t delta_live;
    /* remap mappings: private pages and snapshots, each a kernel mapping */
    size_t nprivate;
    /*
     * Under the pteditor engine (a remap mapping whose private pages cowd
     * swaps in by page-table entry): per page, where the private copy is
     * mapped in our address space, or NULL.  The copy stays there, and is
     * unmapped only once the page's original entry is back.
     */
    void **pcopy;
    /*
     * A uffd mapping in a forked child that has not written to it yet:
     * read-only until it does (see cow__uffd_child_defer).
     */
    bool child_pending;
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
extern size_t cow__high;

/*
 * Kernel mappings the remap engine added (private pages and snapshots),
 * and the count at which a mapping switches to the uffd engine.
 */
extern _Atomic size_t cow__remap_maps;
extern size_t cow__switch_at;
extern size_t cow__max_map_count;

void cow__spin_lock(void);
void cow__spin_unlock(void);
void cow__table_lock(sigset_t *saved);
void cow__table_unlock(const sigset_t *saved);

void *cow__array_new(size_t n);
void cow__array_free(void *p, size_t n);
size_t cow__round_page(size_t n);

int cow__find_page(uintptr_t addr, struct cow__mapping **m, size_t *page);
int cow__base_get(int fd, const struct stat *st);
int cow__base_fd(int k);
void cow__base_maybe_drop(int b);
int cow__mapping_add(uintptr_t start, size_t length, uint64_t offset,
                     int prot, int base, bool api);
int cow__mapping_at(uintptr_t start);
int cow__mapping_holding(uintptr_t start, size_t length, size_t *first);
int cow__move_prepare(int k, size_t first, uintptr_t dest, size_t length,
                      struct cow__mapping *d);
void cow__move_abandon(struct cow__mapping *d);
int cow__mapping_move(int k, size_t first, size_t n_old,
                      struct cow__mapping *d, int ext_prot);
bool cow__range_managed(uintptr_t start, size_t length);
int cow__range_bases(uintptr_t start, size_t length, int *bases, int max);
void cow__range_gone(uintptr_t start, size_t length);
void cow__release_gone(void);
int cow__delta_store(struct cow__mapping *m, size_t i,
                     const unsigned char *now, const unsigned char *base,
                     size_t n);
int cow__delta_copy(const struct cow__mapping *m, size_t i,
                    struct cow__mapping *d, size_t j);
void cow__delta_forget(struct cow__mapping *m);
void cow__entry_gone(int k);
void cow__drop_old_snaps(struct cow__mapping *m);
int cow__range_protect(uintptr_t start, size_t length, int prot);
int cow__apply_prots(struct cow__mapping *m, size_t first, size_t last);
int cow__collect(int b, bool final);
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
void cow__write_msg(const char *const *parts, size_t n);
char *cow__utoa(size_t v, char *buf, size_t len);

/*
 * uffd.c: the userfaultfd engine.  cow__uffd_switch and cow__uffd_arm
 * run with the spinlock held and every signal blocked (from the handler
 * or from normal context); they call only async-signal-safe functions.
 */
struct cow__region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

extern bool cow__uffd_off;

int cow__uffd_available(const char **why);
int cow__uffd_switch(struct cow__mapping *m, const char **why);
int cow__uffd_arm(struct cow__mapping *m, size_t first, size_t last);
long cow__uffd_scan(uintptr_t *from, uintptr_t end, bool protect,
                    struct cow__region *vec, size_t n);
void cow__uffd_forget(void);
void cow__uffd_child_defer(struct cow__mapping *m);
int cow__uffd_child_baseline(struct cow__mapping *m);

/*
 * pte.c: the fault channel of the pteditor engine.  cow__pte_on says the
 * engine runs; swaps and restores are made with the spinlock held and
 * every signal blocked, from the handler or from normal context.
 */
extern bool cow__pte_on;
int cow__pte_start(const char *path);
int cow__pte_swap(const void *target, const void *copy, bool writable);
int cow__pte_restore(uintptr_t start, size_t pages);
const char *cow__pte_error(void);
void cow__pte_release_range(uintptr_t start, size_t length);
void cow__pte_release_all(void);
void cow__pte_forget(struct cow__mapping *m);
void cow__pte_unswap(struct cow__mapping *m, size_t first, size_t last);
void cow__pte_reswap(struct cow__mapping *m, size_t first, size_t last);
void cow__pte_child(struct cow__mapping *m);

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

/*
 * process.c: the locks, fork, exec and exit.  COW__NEXT(var, name)
 * yields var, looking up the next definition of name first if var is
 * still NULL (called before libcow's constructors ran); NULL when it
 * cannot be found right now.
 */
#define COW__NEXT(var, name)                                               \
    ((var) != NULL ? (var) : ((var) = (__typeof__(var))cow__next(name)))

extern COW__TLS bool cow__fork_hold;
void cow__lock(void);
void cow__unlock(void);
bool cow__lock_held_here(void);
int cow__process_init(void);
bool cow__table_forked(void);
void cow__table_adopted(void);
void *cow__next(const char *name);
void cow__finish(const char *what, bool final);

/* libcow.c */
extern bool cow__debug_on;
extern bool cow__ready;
extern const char *cow__engine_name;
void cow__say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void cow__debug(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));
const char *cow__strerror(int err);
void cow__commit_before(const char *what, bool final);
void cow__commit_range(uintptr_t start, size_t length);
void cow__session_reset(void);
bool cow__path_matches(int fd);

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
