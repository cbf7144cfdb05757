"""Connections: the accept loop, framing, descriptor passing, dispatch.

Each connection is served by its own task, one request at a time, so a
session's commits reach its log in the order the client sent them.  A
connection that sends something unparseable or too large gets one
protocol error notification and is closed; nothing it sent before is
affected and the daemon carries on.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import structlog
import trio

from cowd import protocol
from cowd.protocol import CowError, ProtocolError

log = structlog.get_logger()

# Bytes asked of the kernel per receive; frames larger than this simply
# take several receives.
_RECV_SIZE = 256 * 1024

# Descriptors queued but not yet claimed by a request.  A client that
# runs ahead of its own requests is buggy or hostile past this.
_MAX_QUEUED_FDS = 16

_CREDS = struct.Struct("3i")
_ANC_SIZE = socket.CMSG_SPACE(protocol.MAX_FDS * array.array("i").itemsize)

Handler = Callable[["Connection", dict[str, Any], list[int]], Awaitable[Any]]


class Connection:
    """One client connection and what the kernel says about its peer."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
        self.pid, self.uid, self.gid = _CREDS.unpack(raw)
        self.session: Any = None
        # A session's fault channel (pteditor engine): pte_* calls only.
        self.faults = False
        self._fds: deque[int] = deque()

    async def receive(self) -> bytes:
        data, ancdata, flags, _ = await self.sock.recvmsg(
            _RECV_SIZE, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors in one message")
        if len(self._fds) > _MAX_QUEUED_FDS:
            raise ProtocolError("too many unclaimed file descriptors")

        return data

    def take_fds(self, count: Any) -> list[int]:
        if not isinstance(count, int) or not 0 <= count <= protocol.MAX_FDS:
            raise ProtocolError(f"fds must be 0..{protocol.MAX_FDS}")
        if count > len(self._fds):
            raise ProtocolError(f"request claims {count} descriptors, none sent")

        return [self._fds.popleft() for _ in range(count)]

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popleft())
        self.sock.close()


async def serve(
    listener: trio.socket.SocketType,
    methods: dict[str, Handler],
    on_close: Callable[[Connection], None],
) -> None:
    """Accept connections forever, each served by its own task."""
    async with trio.open_nursery() as nursery:
        while True:
            sock, _ = await listener.accept()
            nursery.start_soon(_serve_connection, sock, methods, on_close)


async def _serve_connection(
    sock: trio.socket.SocketType,
    methods: dict[str, Handler],
    on_close: Callable[[Connection], None],
) -> None:
    try:
        conn = Connection(sock)
    except OSError as exc:
        log.warning("peer credentials unavailable", error=str(exc))
        sock.close()
        return
    try:
        await _read_requests(conn, methods)
    except ProtocolError as exc:
        log.warning("protocol error", pid=conn.pid, error=str(exc))
        await _notify_error(conn, exc)
    except (OSError, trio.BrokenResourceError) as exc:
        log.info("connection lost", pid=conn.pid, error=str(exc))
    finally:
        on_close(conn)
        conn.close()


async def _read_requests(conn: Connection, methods: dict[str, Handler]) -> None:
    unpacker = protocol.unpacker()
    while True:
        data = await conn.receive()
        if not data:
            return
        try:
            unpacker.feed(data)
        except msgpack.BufferFull:
            raise ProtocolError(
                f"frame larger than {protocol.MAX_FRAME} bytes"
            ) from None
        while True:
            try:
                msg = unpacker.unpack()
            except msgpack.OutOfData:
                break
            except (ValueError, msgpack.UnpackException) as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from None
            await conn.send(await _dispatch(conn, methods, msg))


async def _dispatch(conn: Connection, methods: dict[str, Handler], msg: Any) -> bytes:
    msgid, method, params = protocol.parse_request(msg)
    fds = conn.take_fds(params.get("fds", 0))
    try:
        handler = methods.get(method)
        if handler is None:
            raise protocol.NotFound(f"no such method: {method}")
        result = await handler(conn, params, fds)
    except CowError as exc:
        return protocol.response(msgid, exc)
    except Exception as exc:
        # A bug in one request must not take the daemon down with it.
        log.exception("request failed", method=method, pid=conn.pid)
        return protocol.response(msgid, CowError(f"internal error: {exc}"))
    finally:
        for fd in fds:
            os.close(fd)

    return protocol.response(msgid, None, result)


async def _notify_error(conn: Connection, exc: CowError) -> None:
    frame = protocol.pack([protocol.NOTIFICATION, "error", [exc.to_wire()]])
    with contextlib.suppress(OSError, trio.BrokenResourceError):
        await conn.send(frame)
