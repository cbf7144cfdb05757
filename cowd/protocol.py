"""The msgpack-RPC wire format spoken between cowd and its clients.

Frames are msgpack objects back to back on a Unix stream socket:

- request ``[0, msgid, method, params]``
- response ``[1, msgid, error, result]``, exactly one of the two set
- notification ``[2, method, params]``

``params`` is always a one-element array holding a map of named
arguments, so that methods can grow arguments without breaking older
peers.  An error is a map ``{"code": str, "message": str, ...}``; the
code is stable and meant for programs, the message is one line for
people, and some codes carry more keys (a conflict lists its ranges).

A request that passes file descriptors sends them with SCM_RIGHTS in the
same ``sendmsg()`` as the frame and says how many in ``params["fds"]``.

This module is shared by the daemon and the client library; it does no
I/O of its own.
"""

from __future__ import annotations

from typing import Any

import msgpack

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

# Largest frame a peer may send.  A commit is split by libcow into
# frames of at most 4 MiB of data, so this leaves room for a generous
# margin while bounding what one misbehaving client can make cowd hold.
MAX_FRAME = 64 * 1024 * 1024

# At most this many descriptors may ride on one request; more is a
# protocol error, and unclaimed ones are closed at once.
MAX_FDS = 4


class CowError(Exception):
    """An error with a stable code, as carried in an RPC error reply."""

    code = "error"

    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.data}

    def __str__(self) -> str:
        return self.message


class ProtocolError(CowError):
    """The peer sent something that is not a valid request."""

    code = "protocol"


class NotFound(CowError):
    """A named log, session or method does not exist."""

    code = "not-found"


class PermissionDenied(CowError):
    """The caller may not see or merge what it asked for."""

    code = "permission"


class InvalidArgument(CowError):
    """A request was well formed but its arguments make no sense."""

    code = "invalid"


class BaseMismatch(CowError):
    """A log was made from a different file, or the file changed since."""

    code = "base-mismatch"


class Conflict(CowError):
    """Sessions wrote different bytes to the same range of a base file."""

    code = "conflict"


class CorruptLog(CowError):
    """A log failed its checks; the bad part is never applied."""

    code = "corrupt-log"


class Unavailable(CowError):
    """cowd cannot be reached, or went away in the middle of a call."""

    code = "unavailable"


_ERRORS = {
    cls.code: cls
    for cls in (
        CowError,
        ProtocolError,
        NotFound,
        PermissionDenied,
        InvalidArgument,
        BaseMismatch,
        Conflict,
        CorruptLog,
        Unavailable,
    )
}


def error_from_wire(error: Any) -> CowError:
    """Rebuild the exception that a peer's error reply describes."""
    if not isinstance(error, dict):
        return CowError(f"malformed error reply: {error!r}")
    data = dict(error)
    code = data.pop("code", "error")
    message = str(data.pop("message", code))
    exc = _ERRORS.get(code, CowError)(message, **data)
    exc.code = code

    return exc


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def request(msgid: int, method: str, params: dict[str, Any]) -> bytes:
    return pack([REQUEST, msgid, method, [params]])


def response(msgid: int, error: CowError | None, result: Any = None) -> bytes:
    wire = error.to_wire() if error is not None else None
    return pack([RESPONSE, msgid, wire, None if error else result])


def notification(method: str, params: dict[str, Any]) -> bytes:
    return pack([NOTIFICATION, method, [params]])


def unpacker() -> msgpack.Unpacker:
    """A streaming decoder that refuses frames larger than MAX_FRAME."""
    return msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME)


def parse_request(msg: Any) -> tuple[int, str, dict[str, Any]]:
    """Check the shape of a request frame and return its parts."""
    if not isinstance(msg, list) or len(msg) != 4 or msg[0] != REQUEST:
        raise ProtocolError("expected a request [0, msgid, method, params]")
    _, msgid, method, params = msg
    if not isinstance(msgid, int) or not 0 <= msgid < 2**32:
        raise ProtocolError("msgid must be an unsigned 32-bit integer")
    if not isinstance(method, str):
        raise ProtocolError("method must be a string")
    if params == []:
        params = [{}]
    if not (isinstance(params, list) and len(params) == 1):
        raise ProtocolError("params must be a one-element array")
    if not isinstance(params[0], dict):
        raise ProtocolError("params[0] must be a map")

    return msgid, method, params[0]
