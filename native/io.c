/*
 * io.c: interposed calls that make the kernel write into user memory.
 *
 * When a system call such as read(2) stores into a page that is still
 * write-protected, the kernel raises no SIGSEGV: the call fails with
 * EFAULT (or stops short), and the handler never gets the chance to make
 * the page private.  These wrappers make the managed pages of the
 * destination private first, as a write fault would, then call the libc
 * function.  A commit running in another thread may write-protect a page
 * again between the two; the call then fails with EFAULT and is retried,
 * a bounded number of times.
 *
 * Only these entry points are covered.  Calls made inside libc through
 * its private aliases (fread is wrapped for that reason), raw syscall(2),
 * io_uring and the like still see EFAULT on a page not yet written.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "cow_internal.h"

/* Retries of a call that hit EFAULT on a page re-protected meanwhile. */
#define COW__EFAULT_RETRIES 3

/*
 * The functions wrapped here, found before main runs.  A wrapper called
 * earlier (from another library's constructor) looks its function up
 * then; one called while dlsym itself runs on this thread (an allocator
 * setting itself up may read a file) gets NULL and makes the system call
 * directly rather than recursing.
 */
static ssize_t (*cow__real_read)(int, void *, size_t);
static ssize_t (*cow__real_pread)(int, void *, size_t, off_t);
static ssize_t (*cow__real_readv)(int, const struct iovec *, int);
static ssize_t (*cow__real_preadv)(int, const struct iovec *, int, off_t);
static ssize_t (*cow__real_recv)(int, void *, size_t, int);
static ssize_t (*cow__real_recvfrom)(int, void *, size_t, int,
                                     struct sockaddr *, socklen_t *);
static ssize_t (*cow__real_recvmsg)(int, struct msghdr *, int);
static size_t (*cow__real_fread)(void *, size_t, size_t, FILE *);

__attribute__((constructor(101)))
static void cow__io_resolve(void)
{
    COW__NEXT(cow__real_read, "read");
    COW__NEXT(cow__real_pread, "pread");
    COW__NEXT(cow__real_readv, "readv");
    COW__NEXT(cow__real_preadv, "preadv");
    COW__NEXT(cow__real_recv, "recv");
    COW__NEXT(cow__real_recvfrom, "recvfrom");
    COW__NEXT(cow__real_recvmsg, "recvmsg");
    COW__NEXT(cow__real_fread, "fread");
}

static bool cow__iov_managed(const struct iovec *iov, int n)
{
    int k;

    for (k = 0; k < n; k++)
        if (cow__range_managed((uintptr_t)iov[k].iov_base, iov[k].iov_len))
            return true;

    return false;
}

static void cow__prefault_iov(const struct iovec *iov, int n)
{
    int k;

    for (k = 0; k < n; k++)
        cow__prefault(iov[k].iov_base, iov[k].iov_len);
}

/*
 * Runs `call` after making [buf, buf + len) writable, retrying on EFAULT
 * while the range is managed.  call is an expression using the wrapper's
 * arguments; rc receives its result.
 */
#define COW__WRITE_INTO(rc, managed, prefault, call)                       \
    do {                                                                   \
        int tries_ = 0;                                                    \
        bool managed_ = (managed);                                         \
                                                                           \
        for (;;) {                                                         \
            if (managed_)                                                  \
                prefault;                                                  \
            rc = (call);                                                   \
            if (rc >= 0 || errno != EFAULT || !managed_ ||                 \
                ++tries_ > COW__EFAULT_RETRIES)                            \
                break;                                                     \
        }                                                                  \
    } while (0)

COW__EXPORT
ssize_t read(int fd, void *buf, size_t len)
{
    ssize_t (*real)(int, void *, size_t) = COW__NEXT(cow__real_read,
                                                     "read");
    ssize_t rc;

    COW__WRITE_INTO(rc, cow__range_managed((uintptr_t)buf, len),
                    cow__prefault(buf, len),
                    real != NULL ? real(fd, buf, len)
                                 : syscall(SYS_read, fd, buf, len));

    return rc;
}

COW__EXPORT
ssize_t pread(int fd, void *buf, size_t len, off_t offset)
{
    ssize_t (*real)(int, void *, size_t, off_t) =
        COW__NEXT(cow__real_pread, "pread");
    ssize_t rc;

    COW__WRITE_INTO(rc, cow__range_managed((uintptr_t)buf, len),
                    cow__prefault(buf, len),
                    real != NULL
                        ? real(fd, buf, len, offset)
                        : syscall(SYS_pread64, fd, buf, len, offset));

    return rc;
}

COW__EXPORT
ssize_t pread64(int fd, void *buf, size_t len, off_t offset)
{
    return pread(fd, buf, len, offset);
}

COW__EXPORT
ssize_t readv(int fd, const struct iovec *iov, int n)
{
    ssize_t (*real)(int, const struct iovec *, int) =
        COW__NEXT(cow__real_readv, "readv");
    ssize_t rc;

    COW__WRITE_INTO(rc, cow__iov_managed(iov, n), cow__prefault_iov(iov, n),
                    real != NULL ? real(fd, iov, n)
                                 : syscall(SYS_readv, fd, iov, n));

    return rc;
}

/* The kernel takes preadv's offset in two halves; a 64-bit long holds it. */
COW__EXPORT
ssize_t preadv(int fd, const struct iovec *iov, int n, off_t offset)
{
    ssize_t (*real)(int, const struct iovec *, int, off_t) =
        COW__NEXT(cow__real_preadv, "preadv");
    ssize_t rc;

    COW__WRITE_INTO(rc, cow__iov_managed(iov, n), cow__prefault_iov(iov, n),
                    real != NULL ? real(fd, iov, n, offset)
                                 : syscall(SYS_preadv, fd, iov, n,
                                           (long)offset, 0L));

    return rc;
}

COW__EXPORT
ssize_t preadv64(int fd, const struct iovec *iov, int n, off_t offset)
{
    return preadv(fd, iov, n, offset);
}

COW__EXPORT
ssize_t recv(int fd, void *buf, size_t len, int flags)
{
    ssize_t (*real)(int, void *, size_t, int) =
        COW__NEXT(cow__real_recv, "recv");
    ssize_t rc;

    COW__WRITE_INTO(rc, cow__range_managed((uintptr_t)buf, len),
                    cow__prefault(buf, len),
                    real != NULL ? real(fd, buf, len, flags)
                                 : syscall(SYS_recvfrom, fd, buf, len, flags,
                                           NULL, NULL));

    return rc;
}

COW__EXPORT
ssize_t recvfrom(int fd, void *buf, size_t len, int flags,
                 struct sockaddr *from, socklen_t *fromlen)
{
    ssize_t (*real)(int, void *, size_t, int, struct sockaddr *,
                    socklen_t *) = COW__NEXT(cow__real_recvfrom, "recvfrom");
    ssize_t rc;

    COW__WRITE_INTO(rc, cow__range_managed((uintptr_t)buf, len),
                    cow__prefault(buf, len),
                    real != NULL ? real(fd, buf, len, flags, from, fromlen)
                                 : syscall(SYS_recvfrom, fd, buf, len, flags,
                                           from, fromlen));

    return rc;
}

COW__EXPORT
ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
    ssize_t (*real)(int, struct msghdr *, int) =
        COW__NEXT(cow__real_recvmsg, "recvmsg");
    ssize_t rc;

    COW__WRITE_INTO(rc, cow__iov_managed(msg->msg_iov, (int)msg->msg_iovlen),
                    cow__prefault_iov(msg->msg_iov, (int)msg->msg_iovlen),
                    real != NULL ? real(fd, msg, flags)
                                 : syscall(SYS_recvmsg, fd, msg, flags));

    return rc;
}

/*
 * fread reads large requests straight into the caller's buffer through
 * libc's private read, which no wrapper sees.  It reports EFAULT only as
 * a short count, so there is no retry here.  Without libc's fread (only
 * while dlsym runs on this thread) nothing can be read.
 */
COW__EXPORT
size_t fread(void *buf, size_t size, size_t n, FILE *stream)
{
    size_t (*real)(void *, size_t, size_t, FILE *) =
        COW__NEXT(cow__real_fread, "fread");

    if (real == NULL) {
        errno = ENOSYS;
        return 0;
    }
    if (size != 0 && n <= SIZE_MAX / size &&
        cow__range_managed((uintptr_t)buf, size * n))
        cow__prefault(buf, size * n);

    return real(buf, size, n, stream);
}
