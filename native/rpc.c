/*
 * rpc.c: libcow's connection to cowd and the three calls it makes.
 *
 * Frames are msgpack-RPC requests [0, msgid, method, [params]] and
 * responses [1, msgid, error, result], back to back on a Unix stream
 * socket.  Calls are synchronous, one in flight at a time; every caller
 * holds cow__mutex, and cow__rpc_lock makes that guarantee local to this
 * file as well.  Any failure of the transport or of the protocol closes
 * the connection, and so does a refused commit: cowd then ends the
 * session and drops a batch it had not committed, and libcow, which
 * still holds the batch, sends it whole on a new connection later.  Each
 * connection gets a new number so that log handles, which are only valid
 * on the connection that got them, can be recognised as stale.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "cow_internal.h"

/*
 * How long to wait for cowd to take a frame or answer one.  Generous,
 * since committing a large batch means an fsync on the daemon side; a
 * daemon that stays silent longer is treated as gone.
 */
#define COW__RPC_TIMEOUT_SEC 60

/* Replies are small maps; anything longer is a broken peer. */
#define COW__RPC_REPLY_MAX (1u << 20)

struct cow__conn {
    int fd;
    dev_t dev;         /* the socket's identity, checked before each use */
    ino_t ino;
    uint64_t id;       /* 0 while disconnected */
    uint32_t msgid;
    struct cow__buf in; /* bytes received and not yet consumed */
    size_t frame;       /* length of the frame at the start of `in` */
};

static struct cow__conn cow__conn = { .fd = -1 };
static uint64_t cow__conn_count;
static pthread_mutex_t cow__rpc_lock = PTHREAD_MUTEX_INITIALIZER;

/* Why the last call failed, for the one-line messages of libcow.c. */
static char cow__rpc_why[256];

/* Records why a call failed, for cow__rpc_error(); returns rc. */
int cow__rpc_fail(int rc, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(cow__rpc_why, sizeof(cow__rpc_why), fmt, ap);
    va_end(ap);

    return rc;
}

const char *cow__rpc_error(void)
{
    return cow__rpc_why;
}

/*
 * Whether libcow has a connection.  One whose descriptor the program
 * closed (and may have reused) counts as lost, so the caller reconnects
 * at once.
 */
bool cow__rpc_connected(void)
{
    if (cow__conn.fd >= 0 &&
        !cow__fd_is(cow__conn.fd, cow__conn.dev, cow__conn.ino))
        cow__rpc_close();

    return cow__conn.fd >= 0;
}

uint64_t cow__rpc_conn(void)
{
    return cow__conn.id;
}

void cow__rpc_close(void)
{
    if (cow__fd_is(cow__conn.fd, cow__conn.dev, cow__conn.ino))
        close(cow__conn.fd);
    cow__conn.fd = -1;
    cow__conn.id = 0;
    cow__conn.frame = 0;
    cow__buf_free(&cow__conn.in);
}

/*
 * Sends all of p, passing fd (when >= 0) with the first bytes.  Returns 0
 * or a negative errno; a timeout is -ETIMEDOUT.
 */
static int cow__send_all(const unsigned char *p, size_t n, int fd)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;

    while (n > 0) {
        struct iovec iov = { .iov_base = (void *)p, .iov_len = n };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
        ssize_t sent;

        if (fd >= 0) {
            struct cmsghdr *cm;

            memset(&control, 0, sizeof(control));
            msg.msg_control = control.buf;
            msg.msg_controllen = sizeof(control.buf);
            cm = CMSG_FIRSTHDR(&msg);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(cm), &fd, sizeof(int));
        }
        sent = sendmsg(cow__conn.fd, &msg, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return cow__rpc_fail(-ETIMEDOUT, "cowd does not read");
        if (sent < 0)
            return cow__rpc_fail(-errno, "send: %s", cow__strerror(errno));
        /* The descriptor went with the first bytes; never send it twice. */
        fd = -1;
        p += sent;
        n -= (size_t)sent;
    }

    return 0;
}

/* Drops the frame the last call consumed, keeping any bytes after it. */
static void cow__consume_frame(void)
{
    struct cow__buf *in = &cow__conn.in;

    if (cow__conn.frame == 0)
        return;
    memmove(in->data, in->data + cow__conn.frame, in->len - cow__conn.frame);
    in->len -= cow__conn.frame;
    cow__conn.frame = 0;
}

/* Reads until `in` starts with one whole msgpack object; sets frame. */
static int cow__recv_frame(void)
{
    struct cow__buf *in = &cow__conn.in;

    for (;;) {
        struct cow__mpr r = { .p = in->data, .len = in->len };
        ssize_t got;
        int rc = in->len > 0 ? cow__mp_skip(&r) : -EAGAIN;

        if (rc == 0) {
            cow__conn.frame = r.pos;
            return 0;
        }
        if (rc != -EAGAIN)
            return cow__rpc_fail(-EPROTO, "malformed reply from cowd");
        if (in->len >= COW__RPC_REPLY_MAX)
            return cow__rpc_fail(-EMSGSIZE, "oversized reply from cowd");
        if (cow__buf_reserve(in, 4096) != 0)
            return cow__rpc_fail(-ENOMEM, "out of memory");
        got = recv(cow__conn.fd, in->data + in->len, in->cap - in->len, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return cow__rpc_fail(-ETIMEDOUT, "cowd does not answer");
        if (got < 0)
            return cow__rpc_fail(-errno, "receive: %s", cow__strerror(errno));
        if (got == 0)
            return cow__rpc_fail(-EPIPE, "cowd closed the connection");
        in->len += (size_t)got;
    }
}

/*
 * Reads the error of a response: a map with "code" and "message", kept
 * in the failure text.
 */
static int cow__read_error(struct cow__mpr *r)
{
    const char *code = "?";
    const char *message = "";
    uint32_t code_len = 1;
    uint32_t message_len = 0;
    uint32_t n;
    uint32_t k;

    if (cow__mp_get_map(r, &n) != 0)
        return cow__mp_skip(r);
    for (k = 0; k < n; k++) {
        const char *key;
        uint32_t key_len;

        if (cow__mp_get_str(r, &key, &key_len) != 0)
            return -EBADMSG;
        if (key_len == 4 && memcmp(key, "code", 4) == 0 &&
            cow__mp_get_str(r, &code, &code_len) == 0)
            continue;
        if (key_len == 7 && memcmp(key, "message", 7) == 0 &&
            cow__mp_get_str(r, &message, &message_len) == 0)
            continue;
        if (cow__mp_skip(r) != 0)
            return -EBADMSG;
    }
    cow__rpc_fail(0, "cowd refused: %.*s: %.*s", (int)code_len, code,
                  (int)message_len, message);

    return 0;
}

/*
 * Sends one request frame (whose msgid is cow__conn.msgid) and waits for
 * its response, skipping notifications.  On success *result reads the
 * result.  Returns 0, -EPROTO when cowd answered with an error (the
 * connection stays up: cowd refused one request, and the caller decides
 * what that means for the session), or the negative errno of a broken
 * transport or protocol, which closes the connection.
 */
static int cow__call(const struct cow__buf *frame, int fd,
                     struct cow__mpr *result)
{
    int rc;

    if (frame->err != 0)
        return cow__rpc_fail(frame->err, "cannot build request");
    if (!cow__fd_is(cow__conn.fd, cow__conn.dev, cow__conn.ino)) {
        cow__rpc_close();
        return cow__rpc_fail(-EBADF, "the program closed the connection");
    }
    cow__consume_frame();
    rc = cow__send_all(frame->data, frame->len, fd);
    while (rc == 0) {
        uint32_t n;
        uint64_t type;
        uint64_t msgid;

        cow__consume_frame();
        rc = cow__recv_frame();
        if (rc != 0)
            break;
        *result = (struct cow__mpr){ .p = cow__conn.in.data,
                                     .len = cow__conn.frame };
        if (cow__mp_get_array(result, &n) != 0 || n < 3 ||
            cow__mp_get_uint(result, &type) != 0) {
            rc = cow__rpc_fail(-EPROTO, "malformed reply from cowd");
            break;
        }
        if (type == 2)
            continue;
        if (type != 1 || n != 4 || cow__mp_get_uint(result, &msgid) != 0 ||
            msgid != cow__conn.msgid) {
            rc = cow__rpc_fail(-EPROTO, "unexpected reply from cowd");
            break;
        }
        if (cow__mp_next_is_nil(result)) {
            cow__mp_get_nil(result);
            return 0;
        }
        if (cow__read_error(result) != 0) {
            rc = cow__rpc_fail(-EPROTO, "malformed error from cowd");
            break;
        }
        return -EPROTO;
    }
    cow__rpc_close();

    return rc;
}

/*
 * Walks the result map, calling visit for each key; visit consumes the
 * value or returns 1 to have it skipped.  Returns 0 or -EPROTO.
 */
static int cow__result_map(struct cow__mpr *r,
                           int (*visit)(struct cow__mpr *, const char *,
                                        uint32_t, void *),
                           void *arg)
{
    uint32_t n;
    uint32_t k;

    if (cow__mp_get_map(r, &n) != 0)
        return cow__rpc_fail(-EPROTO, "result of cowd is not a map");
    for (k = 0; k < n; k++) {
        const char *key;
        uint32_t len;
        int rc;

        if (cow__mp_get_str(r, &key, &len) != 0)
            return cow__rpc_fail(-EPROTO, "malformed result from cowd");
        rc = visit(r, key, len, arg);
        if (rc == 1)
            rc = cow__mp_skip(r);
        if (rc != 0)
            return cow__rpc_fail(-EPROTO, "malformed result from cowd");
    }

    return 0;
}

static bool cow__key_is(const char *key, uint32_t len, const char *want)
{
    return strlen(want) == len && memcmp(key, want, len) == 0;
}

struct cow__hello {
    bool has_session;
};

static int cow__visit_hello(struct cow__mpr *r, const char *key,
                            uint32_t len, void *arg)
{
    struct cow__hello *h = arg;
    const char *session;
    uint32_t session_len;

    if (!cow__key_is(key, len, "session"))
        return 1;
    if (cow__mp_get_str(r, &session, &session_len) != 0)
        return -EPROTO;
    h->has_session = true;
    cow__debug("session %.*s", (int)session_len, session);

    return 0;
}

static int cow__hello(void)
{
    struct cow__buf b = { 0 };
    struct cow__hello h = { false };
    struct cow__mpr r;
    int rc;

    cow__mp_put_request(&b, ++cow__conn.msgid, "hello", 3);
    cow__mp_put_cstr(&b, "pid");
    cow__mp_put_uint(&b, (uint64_t)getpid());
    cow__mp_put_cstr(&b, "engine");
    cow__mp_put_cstr(&b, cow__engine_name);
    cow__mp_put_cstr(&b, "argv0");
    cow__mp_put_cstr(&b, program_invocation_name);
    rc = cow__call(&b, -1, &r);
    cow__buf_free(&b);
    if (rc == 0)
        rc = cow__result_map(&r, cow__visit_hello, &h);
    if (rc == 0 && !h.has_session)
        rc = cow__rpc_fail(-EPROTO, "cowd sent no session");

    return rc;
}

/* connect(2), finishing the connection if a signal interrupted it. */
static int cow__connect_fd(int fd, const struct sockaddr_un *sun)
{
    struct pollfd p = { .fd = fd, .events = POLLOUT };
    socklen_t len = sizeof(int);
    int err = 0;

    if (connect(fd, (const struct sockaddr *)sun, sizeof(*sun)) == 0)
        return 0;
    if (errno != EINTR)
        return -errno;
    while (poll(&p, 1, -1) < 0)
        if (errno != EINTR)
            return -errno;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
        return -errno;

    return -err;
}

/*
 * Connects to cowd at path and says hello.  Returns 0 or a negative errno
 * (-ENAMETOOLONG when path does not fit a socket address).
 */
int cow__rpc_connect(const char *path)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    struct timeval tv = { .tv_sec = COW__RPC_TIMEOUT_SEC };
    struct stat st;
    size_t len = strlen(path);
    int fd;
    int rc;

    pthread_mutex_lock(&cow__rpc_lock);
    cow__rpc_close();
    if (len >= sizeof(sun.sun_path)) {
        rc = cow__rpc_fail(-ENAMETOOLONG, "socket path too long");
        goto out;
    }
    memcpy(sun.sun_path, path, len + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        rc = cow__rpc_fail(-errno, "%s", cow__strerror(errno));
        goto out;
    }
    rc = cow__connect_fd(fd, &sun);
    if (rc != 0) {
        close(fd);
        rc = cow__rpc_fail(rc, "%s", cow__strerror(-rc));
        goto out;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (fstat(fd, &st) != 0) {
        rc = cow__rpc_fail(-errno, "%s", cow__strerror(errno));
        close(fd);
        goto out;
    }
    cow__conn.dev = st.st_dev;
    cow__conn.ino = st.st_ino;
    cow__conn.fd = fd;
    cow__conn.id = ++cow__conn_count;
    rc = cow__hello();
    if (rc != 0)
        cow__rpc_close();
out:
    pthread_mutex_unlock(&cow__rpc_lock);

    return rc;
}

struct cow__map_result {
    bool has_log;
    int64_t log;
};

static int cow__visit_map(struct cow__mpr *r, const char *key,
                          uint32_t len, void *arg)
{
    struct cow__map_result *m = arg;
    const char *path;
    uint32_t path_len;

    if (cow__key_is(key, len, "log")) {
        m->has_log = true;
        return cow__mp_get_int(r, &m->log);
    }
    if (cow__key_is(key, len, "path")) {
        if (cow__mp_get_str(r, &path, &path_len) != 0)
            return -EPROTO;
        cow__debug("log %.*s", (int)path_len, path);
        return 0;
    }

    return 1;
}

/*
 * Asks cowd for the log of the file open on fd, which goes along with the
 * request.  Returns 0 and the handle in *log, or a negative errno.
 */
int cow__rpc_map(int fd, uint64_t offset, uint64_t length, int64_t *log)
{
    struct cow__buf b = { 0 };
    struct cow__map_result m = { false, 0 };
    struct cow__mpr r;
    int rc;

    pthread_mutex_lock(&cow__rpc_lock);
    if (cow__conn.fd < 0) {
        rc = cow__rpc_fail(-ENOTCONN, "not connected to cowd");
        goto out;
    }
    cow__mp_put_request(&b, ++cow__conn.msgid, "map", 3);
    cow__mp_put_cstr(&b, "fds");
    cow__mp_put_uint(&b, 1);
    cow__mp_put_cstr(&b, "offset");
    cow__mp_put_uint(&b, offset);
    cow__mp_put_cstr(&b, "length");
    cow__mp_put_uint(&b, length);
    rc = cow__call(&b, fd, &r);
    if (rc == 0)
        rc = cow__result_map(&r, cow__visit_map, &m);
    if (rc == 0 && !m.has_log)
        rc = cow__rpc_fail(-EPROTO, "cowd sent no log handle");
    if (rc == 0)
        *log = m.log;
out:
    pthread_mutex_unlock(&cow__rpc_lock);
    cow__buf_free(&b);

    return rc;
}

/* Takes "seq"; nil (cowd had nothing to commit) leaves it at -1. */
static int cow__visit_commit(struct cow__mpr *r, const char *key,
                             uint32_t len, void *arg)
{
    int64_t *seq = arg;

    if (!cow__key_is(key, len, "seq"))
        return 1;
    if (cow__mp_next_is_nil(r))
        return cow__mp_get_nil(r);

    return cow__mp_get_int(r, seq);
}

/*
 * Counts the records from position pos that fit one frame, and their
 * end position: at least one record, at most COW__FRAME_DATA_MAX bytes
 * of record data when there are several.
 */
static uint32_t cow__frame_records(const struct cow__batch *batch,
                                   size_t pos, size_t *end)
{
    size_t data = 0;
    uint32_t n = 0;

    while (pos < batch->buf.len && n < UINT32_MAX) {
        uint64_t offset;
        uint32_t len;

        cow__batch_record(batch, pos, &offset, &len);
        if (n > 0 && data + len > COW__FRAME_DATA_MAX)
            break;
        data += len;
        n++;
        pos += COW__RECORD_HEADER + len;
    }
    *end = pos;

    return n;
}

/* Sends the records [pos, end) as one commit frame. */
static int cow__commit_frame(int64_t log, const struct cow__batch *batch,
                             size_t pos, size_t end, uint32_t n, bool more,
                             int64_t *seq)
{
    struct cow__buf b = { 0 };
    struct cow__mpr r;
    int rc;

    cow__mp_put_request(&b, ++cow__conn.msgid, "commit", 3);
    cow__mp_put_cstr(&b, "log");
    cow__mp_put_int(&b, log);
    cow__mp_put_cstr(&b, "records");
    cow__mp_put_array(&b, n);
    while (pos < end) {
        uint64_t offset;
        uint32_t len;

        cow__batch_record(batch, pos, &offset, &len);
        cow__mp_put_array(&b, 2);
        cow__mp_put_uint(&b, offset);
        cow__mp_put_bin(&b, batch->buf.data + pos + COW__RECORD_HEADER, len);
        pos += COW__RECORD_HEADER + len;
    }
    cow__mp_put_cstr(&b, "more");
    cow__mp_put_bool(&b, more);
    rc = cow__call(&b, -1, &r);
    cow__buf_free(&b);
    if (rc == 0)
        rc = cow__result_map(&r, cow__visit_commit, seq);
    if (rc != 0)
        cow__rpc_close();

    return rc;
}

/*
 * Commits batch to log as one atomic batch, in frames of at most
 * COW__FRAME_DATA_MAX bytes of record data, all but the last marked
 * "more".  Returns 0 and the batch's sequence number in *seq (-1 if cowd
 * gave none), or a negative errno (and cowd drops what it received of the
 * batch).
 */
int cow__rpc_commit(int64_t log, const struct cow__batch *batch,
                    int64_t *seq)
{
    size_t pos = 0;
    int rc = 0;

    *seq = -1;
    pthread_mutex_lock(&cow__rpc_lock);
    if (cow__conn.fd < 0)
        rc = cow__rpc_fail(-ENOTCONN, "not connected to cowd");
    while (rc == 0 && pos < batch->buf.len) {
        size_t end;
        uint32_t n = cow__frame_records(batch, pos, &end);

        rc = cow__commit_frame(log, batch, pos, end, n,
                               end < batch->buf.len, seq);
        pos = end;
    }
    pthread_mutex_unlock(&cow__rpc_lock);

    return rc;
}
