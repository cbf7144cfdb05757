/*
 * cow.h: the explicit C API of libcow.
 *
 * A program that wants to manage a file mapping itself, rather than rely
 * on libcow catching writes to the mappings that `cowctl run` selects,
 * maps the file with cow_map(), changes it with cow_write() or with plain
 * stores, and makes the changes durable in its cowd log with cow_commit()
 * or cow_unmap().  The base file is never written: the mapping's written
 * pages are private to the process, and cowd records what changed.
 *
 * Bytes written with cow_write() are logged exactly as written, in call
 * order.  Bytes stored directly into the mapping are logged as the runs
 * that differ from the base file (or from the last commit) when the
 * mapping is committed.
 *
 * The functions are thread-safe.  They work whether or not libcow was
 * injected with LD_PRELOAD: the first call installs libcow's SIGSEGV
 * handler and connects to cowd (at COWD_SOCKET, or /run/cowd/cowd.sock).
 * If cowd cannot be reached, writes stay private and commits are kept in
 * memory and retried at the next commit and at exit.
 */
#ifndef COW_H
#define COW_H

#include <stddef.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Maps length bytes of the regular file open on fd, from offset (a
 * multiple of the page size), as a managed mapping: readable and
 * writable, showing the file's contents, with every written page private
 * to this process.  fd must be open for reading; it may be closed after
 * the call.  Returns the address of the mapping, or NULL with errno set:
 * EINVAL for a zero length or an unaligned offset, ENODEV when fd is not a
 * regular file, ENOMEM when libcow's mapping table is full, or whatever
 * fstat(2) or mmap(2) reported.
 */
void *cow_map(int fd, size_t length, off_t offset);

/*
 * Copies len bytes from data into the mapping map (an address returned by
 * cow_map()) at offset bytes from its start, and records them to be
 * logged exactly as written at the next commit.  data may point into the
 * mapping itself.  Returns 0, -ENOENT when map is not the start of a live
 * cow_map() mapping, -EINVAL when the range is not inside the mapping or
 * reaches past the end of the file, -EFAULT when part of the range was
 * unmapped, or -ENOMEM.
 */
int cow_write(void *map, size_t offset, const void *data, size_t len);

/*
 * Commits the changes made to the base file that map (an address inside
 * a managed mapping) shows, from every mapping of that file, as one batch
 * in the process's cowd log.  map == NULL commits every base file.
 * Returns 0 once cowd has made the batch durable, -ENOENT when map is not
 * inside a managed mapping, or the negative errno of the failure to reach
 * cowd (-ECONNREFUSED, -ENOENT, -EPIPE, -ETIMEDOUT, -EPROTO when cowd
 * refused the batch, ...).  After a failure the batch is kept in memory
 * and sent first at the next commit or at exit.
 */
int cow_commit(void *map);

/*
 * Commits the base file of the managed mapping that starts at map, then
 * unmaps the whole mapping.  The mapping is gone after the call even if
 * the commit failed; its changes are then kept in memory and retried as
 * cow_commit() describes.  Returns 0, -ENOENT when map is not the start of
 * a managed mapping, the commit's error, or munmap(2)'s negative errno.
 */
int cow_unmap(void *map);

#ifdef __cplusplus
}
#endif

#endif /* COW_H */
