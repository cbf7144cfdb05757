/*
 * cow_merge.h: the merge engine of cowd, a library of its own
 * (libcowmerge.so) that the daemon loads to fold logs into new versions
 * of a base file, and to check logs.
 *
 * The engine reads each log through a fixed buffer, never maps it, and
 * keeps no record in memory: its memory is a few buffers whose size is
 * set by the window (see cow_merge()), plus 8 bytes per window of output
 * and a small fixed amount per log.  It reads the log format that
 * cowd/_logfile.py documents (version 1); the caller checks the header
 * and passes the offset of the first entry after it.
 *
 * Every function returns 0 or a negative errno value, and retries system
 * calls interrupted by signals.  The functions keep no global state and
 * may run in several threads at once on different descriptors.
 */
#ifndef COW_MERGE_H
#define COW_MERGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The window cow_merge() uses when it is passed 0. */
#define COW_MERGE_DEFAULT_WINDOW (1u << 20)

/* The largest window: offsets inside a window must fit in 32 bits. */
#define COW_MERGE_MAX_WINDOW (1u << 30)

/*
 * Distinct sessions one merge can tell apart: a session is kept in 20
 * bits of the per-byte owner array.
 */
#define COW_MERGE_MAX_SESSIONS ((1u << 20) - 1)

/* How conflicting bytes are resolved; see cow_merge(). */
enum cow_merge_policy {
    COW_MERGE_FAIL = 0,
    COW_MERGE_LAST = 1,
    COW_MERGE_FIRST = 2,
};

/*
 * Flags of cow_merge().  COW_MERGE_WRITE_BACK hands the output to the
 * kernel's writeback as it becomes final, so that the disk writes it
 * while the merge goes on and a later fsync(2) has little left to wait
 * for; without it the output stays in the page cache, for the kernel to
 * write when it will.
 */
#define COW_MERGE_WRITE_BACK 1u

/* The passes of a merge, as struct cow_merge_progress reports them. */
enum cow_merge_phase {
    COW_MERGE_SCAN = 1,
    COW_MERGE_SPILL = 2,
    COW_MERGE_APPLY = 3,
};

/* One log to merge.  The caller fills the inputs; cow_merge() the rest. */
struct cow_merge_log {
    /* Input: the log, open for reading.  Only pread(2) is used on it. */
    int fd;
    /*
     * Input: the session that wrote the log.  Bytes written by logs of
     * the same session never conflict with each other.
     */
    uint32_t session;
    /*
     * Input: offset of the first entry, just after the log's header, or
     * the start of any batch (such as a previous merge's applied_end).
     */
    uint64_t data_start;
    /*
     * Input: batches with a commit sequence number <= min_seq are skipped
     * (they were merged before).
     */
    uint64_t min_seq;

    /* Output: the seq of the last batch applied, or min_seq if none. */
    uint64_t last_seq;
    /*
     * Output: offset just past the last batch applied, or data_start if
     * none.  A later merge may pass it as data_start, with last_seq as
     * min_seq, to skip reading again what this one applied.
     */
    uint64_t applied_end;
    /* Output: batches and records applied from this log. */
    uint64_t batches;
    uint64_t records;
    /*
     * Output: bytes of an open or torn batch at the end of the log, as
     * the log was when the merge began.  They are never applied.
     */
    uint64_t pending_bytes;
};

/*
 * A range of conflicting bytes [start, end) of the output, between two
 * sessions, session_a < session_b.
 */
struct cow_merge_conflict {
    uint64_t start;
    uint64_t end;
    uint32_t session_a;
    uint32_t session_b;
};

/* What a merge did, or why it stopped. */
struct cow_merge_stats {
    /* Batches and records applied, and the bytes of their data. */
    uint64_t batches;
    uint64_t records;
    uint64_t bytes_applied;
    /* Size of the output: the base's, or more if records go past it. */
    uint64_t out_size;
    /* Windows of the output, and those that held records. */
    uint64_t windows;
    uint64_t windows_touched;
    /* Bytes written to the spill file, and the groups of windows in it. */
    uint64_t spill_bytes;
    uint64_t groups;
    /* 1 when the output was cloned from the base with FICLONE. */
    int cloned;
    /*
     * Conflicts, whatever the policy: bytes that conflicted at least
     * once, conflict ranges found (each range counts once however many
     * times its bytes conflicted), how many of those were stored in the
     * caller's array, and 1 when some ranges could not be found because
     * a single byte conflicted between more pairs of sessions than the
     * engine's range buffer holds (then nconflicts is a lower bound).
     */
    uint64_t conflict_bytes;
    uint64_t nconflicts;
    uint64_t conflicts_stored;
    int conflicts_truncated;
    /* The most memory the engine's buffers held at once, in bytes. */
    uint64_t peak_buffer_bytes;
    /*
     * For -EBADMSG: the index of the corrupt log (else -1), the offset
     * of the first byte of the batch that failed its checks, and why.
     */
    int corrupt_log;
    uint64_t corrupt_offset;
    char corrupt_reason[64];
};

/*
 * Called by the engine, in the merging thread, each time it updates a
 * struct cow_merge_progress; a non-zero return stops the merge with
 * -ECANCELED.
 */
typedef int (*cow_merge_progress_fn)(void *arg, int phase, uint64_t done,
                                     uint64_t total);

/*
 * How far a merge is, and a way to stop it.  The engine reports at the
 * start and end of each phase and in between every 1/1024 of the
 * phase's work or every MiB of it, whichever is more: done counts bytes
 * of logs read (scan), of logs copied to the spill file (spill) or of
 * output finished (apply).  A report stores phase, total and done with
 * relaxed atomic stores, so another thread may read each of them while
 * the merge runs; calls fn(arg, ...) when fn is not NULL, in the merging
 * thread; and stops the merge with -ECANCELED when fn returned non-zero
 * or cancel is non-zero.  cancel may be set from any thread.
 */
struct cow_merge_progress {
    int phase;
    uint64_t done;
    uint64_t total;
    int cancel;
    cow_merge_progress_fn fn;
    void *arg;
};

/*
 * Merges the committed batches of nlogs logs onto a copy of the base
 * file (base_fd, read with pread(2)) written to out_fd, which must be
 * open for writing and is truncated first.  The rules are in merge.c.
 *
 * spill_fd is a scratch file open for reading and writing, ideally
 * empty (an O_TMPFILE on the same file system as the output); it
 * receives a copy of the applicable records, grouped by output window.
 * window is the size of the slices of the output the engine works on
 * (0 for COW_MERGE_DEFAULT_WINDOW); the engine's buffers hold about 6.2
 * times window bytes plus a few MiB (merge.c has the details).  Up to
 * max_conflicts conflict ranges are stored in conflicts (which may be
 * NULL when max_conflicts is 0).  progress may be NULL; see struct
 * cow_merge_progress.
 *
 * flags is 0 or COW_MERGE_WRITE_BACK.  Nothing is synced and nothing
 * renamed: that is the caller's part.
 *
 * Returns 0 when the output is complete; -EDEADLK when policy is
 * COW_MERGE_FAIL and sessions conflict (the output is then incomplete;
 * stats and conflicts tell where); -EBADMSG when a log is corrupt
 * (stats->corrupt_*), before anything is written; -ECANCELED when
 * stopped through progress; -EINVAL for a bad argument (a policy, flag, window
 * or descriptor that makes no sense, more than COW_MERGE_MAX_SESSIONS
 * sessions); -EFBIG when a record ends past the largest file offset;
 * -EIO when a log or the spill file changed under the merge; -ENOMEM;
 * or the negative errno of a failed read or write.
 */
int cow_merge(struct cow_merge_log *logs, size_t nlogs, int base_fd,
              int out_fd, int spill_fd, int policy, unsigned flags,
              uint64_t window,
              struct cow_merge_conflict *conflicts, size_t max_conflicts,
              struct cow_merge_stats *stats,
              struct cow_merge_progress *progress);

/* How a walk of a log ended, as cow_merge_verify() found it. */
enum cow_merge_end {
    /* The last batch is followed by nothing. */
    COW_MERGE_CLEAN = 0,
    /* An open or torn batch follows; it is never applied. */
    COW_MERGE_TORN = 1,
    /* A batch fails its checks; nothing from it on is ever applied. */
    COW_MERGE_CORRUPT = 2,
    /* The caller's array is full: call again to go on. */
    COW_MERGE_MORE = 3,
};

/* One good batch of a log, from its first record to past its marker. */
struct cow_merge_batch {
    uint64_t seq;
    uint64_t start;
    uint64_t end;
    uint64_t records;
    /* Bytes of record data. */
    uint64_t bytes;
};

struct cow_merge_verify_result {
    /* One of enum cow_merge_end. */
    int status;
    /* Good batches found by this call, and the records in them. */
    uint64_t batches;
    uint64_t records;
    /*
     * Offset just past the last good batch (the start offset if none):
     * where the next call starts, for COW_MERGE_MORE.
     */
    uint64_t end;
    /* Seq of the last good batch (valid when batches > 0). */
    uint64_t last_seq;
    /* Size of the log when it was read. */
    uint64_t size;
    /* For COW_MERGE_TORN: bytes from end to the end of the log. */
    uint64_t pending_bytes;
    /*
     * For COW_MERGE_CORRUPT: the offset of the bad batch (equal to end)
     * and why it is bad.
     */
    uint64_t corrupt_offset;
    char reason[64];
};

/*
 * Reads the log open on fd from offset start, checking every batch as a
 * merge does, and stores the good ones in batches, in order, until
 * max_batches are stored (then the status is COW_MERGE_MORE) or the log
 * ends.  With max_batches == 0 (batches may then be NULL) it reads to
 * the end, storing nothing.  The first call passes the offset just after
 * the log's header and after_seq == NULL; a call that goes on passes the
 * end and last_seq of the previous one (&result->last_seq), because each
 * batch's seq must be above the one before it.  Returns 0 with result
 * filled whatever the log holds; -EINVAL when start is past the end of
 * the file; -ENOMEM; or the negative errno of a failed read.
 */
int cow_merge_verify(int fd, uint64_t start, const uint64_t *after_seq,
                     struct cow_merge_batch *batches, size_t max_batches,
                     struct cow_merge_verify_result *result);

/*
 * CRC-32C (Castagnoli) of len bytes at data, continued from crc (0 to
 * start), as the log format uses it: the same value as Python's
 * crc32c.crc32c(data, crc).  Uses the processor's crc32 instruction when
 * it has one.
 */
uint32_t cow_merge_crc32c(uint32_t crc, const void *data, size_t len);

/*
 * The same function computed with tables only, on any processor;
 * exported so that tests can check both implementations.
 */
uint32_t cow_merge_crc32c_portable(uint32_t crc, const void *data,
                                   size_t len);

#ifdef __cplusplus
}
#endif

#endif
