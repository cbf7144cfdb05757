"""A blocking RPC client for cowd, one connection per Client.

Files the daemon must read or write are opened here, with the caller's
own rights, and passed to cowd as descriptors.  A merge into ``-o OUT``
is written by cowd into a temporary file this side created next to
OUT; this side renames it into place only after cowd has synced it, so
OUT is either the old file or the whole new one.
"""

from __future__ import annotations

import array
import os
import socket
import stat
import tempfile
from collections.abc import Callable
from typing import Any

import msgpack

from cowd import protocol
from cowd.durable import fsync_dir
from cowd.protocol import InvalidArgument, Unavailable

# Where a system-wide cowd listens (see systemd/cowd.socket).
DEFAULT_SOCKET = "/run/cowd/cowd.sock"

_RECV_SIZE = 256 * 1024


def default_socket() -> str:
    """COWD_SOCKET if set, else the system-wide socket."""
    return os.environ.get("COWD_SOCKET") or DEFAULT_SOCKET


class Client:
    """A connection to cowd.  Methods raise CowError subclasses."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.socket_path = socket_path or default_socket()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(self.socket_path)
        except OSError as exc:
            self._sock.close()
            reason = exc.strerror or str(exc)
            raise Unavailable(
                f"cannot reach cowd at {self.socket_path}: {reason}"
            ) from None
        # Replies come from the daemon, which is trusted: no size cap.
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=0)
        self._msgid = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        method: str,
        params: dict | None = None,
        fds: list[int] = (),
        on_progress: Callable[[dict], None] | None = None,
    ) -> Any:
        """Send one request and wait for its reply.

        Progress notifications that arrive meanwhile go to on_progress.
        """
        params = dict(params or {})
        if fds:
            params["fds"] = len(fds)
        self._msgid = (self._msgid + 1) % 2**32
        frame = protocol.request(self._msgid, method, params)
        try:
            self._send(frame, fds)
            reply = self._receive(on_progress)
        except OSError as exc:
            raise Unavailable(f"lost connection to cowd: {exc}") from None
        _, msgid, error, result = reply
        if error is not None:
            raise protocol.error_from_wire(error)

        return result

    def _send(self, frame: bytes, fds: list[int]) -> None:
        if not fds:
            self._sock.sendall(frame)
            return
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sent = self._sock.sendmsg([frame], rights)
        self._sock.sendall(frame[sent:])

    def _receive(self, on_progress: Callable[[dict], None] | None) -> list:
        while True:
            for msg in self._unpacker:
                if msg[0] == protocol.RESPONSE and msg[1] == self._msgid:
                    return msg
                if msg[0] != protocol.NOTIFICATION:
                    continue
                if msg[1] == "error":
                    raise protocol.error_from_wire(msg[2][0])
                if msg[1] == "progress" and on_progress is not None:
                    on_progress(msg[2][0])
            data = self._sock.recv(_RECV_SIZE)
            if not data:
                raise Unavailable("cowd closed the connection")
            self._unpacker.feed(data)

    # -- operations ---------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def sessions(self, all: bool = False) -> list[dict[str, Any]]:
        return self.call("sessions", {"all": all})

    def logs(self, file: str | None = None) -> list[dict[str, Any]]:
        """Logs visible to the caller, optionally only those of one file."""
        params = {}
        if file is not None:
            st = os.stat(file)
            params["base"] = [st.st_dev, st.st_ino]

        return self.call("logs", params)

    def log_show(self, log: str) -> dict[str, Any]:
        return self.call("log_show", {"log": log})

    def merge(
        self,
        source: str,
        log: str,
        output: str | None = None,
        force: bool = False,
        in_place: bool = False,
        on_progress: Callable[[dict], None] | None = None,
        sync: bool = True,
    ) -> dict[str, Any]:
        """Apply one log to a copy of source (or to source itself)."""
        params = {"log": log, "force": force, "sync": sync}

        return self._merge("merge", source, output, in_place, params, on_progress)

    def merge_all(
        self,
        source: str,
        output: str | None = None,
        on_conflict: str = "fail",
        force: bool = False,
        in_place: bool = False,
        on_progress: Callable[[dict], None] | None = None,
        sync: bool = True,
    ) -> dict[str, Any]:
        """Apply every committed log of source, in commit order.

        With in_place, source is replaced atomically by the result;
        processes that map the old version keep it.  Only batches the
        file does not hold yet are applied, and when there are none the
        file is left as it is.  Without sync (only with an output), the
        output is renamed into place without waiting for the disk, and
        no manifest says what it holds.
        """
        params = {"on_conflict": on_conflict, "force": force, "sync": sync}

        return self._merge("merge_all", source, output, in_place, params, on_progress)

    def verify(self, logs: list[str] = ()) -> list[dict[str, Any]]:
        """Check logs batch by batch (all visible logs when none named)."""
        return self.call("verify", {"logs": list(logs)})

    def prune(
        self, older_than: float | None = None, dry_run: bool = False
    ) -> dict[str, Any]:
        """Remove logs of ended sessions that merge outputs fully hold."""
        return self.call("prune", {"older_than": older_than, "dry_run": dry_run})

    def _merge(
        self,
        method: str,
        source: str,
        output: str | None,
        in_place: bool,
        params: dict,
        on_progress: Callable[[dict], None] | None,
    ) -> dict[str, Any]:
        if not params["sync"] and (in_place or output is None):
            raise InvalidArgument("--no-sync needs an output file (-o), not --in-place")
        if in_place:
            if output is not None:
                raise InvalidArgument("--in-place and -o exclude each other")
            output = source
            params = {**params, "in_place": True}
        params["progress"] = on_progress is not None
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if output is None:
                return self.call(method, params, [src], on_progress)
            return self._merge_into(method, src, output, params, on_progress)
        finally:
            os.close(src)

    def _merge_into(
        self,
        method: str,
        src: int,
        output: str,
        params: dict,
        on_progress: Callable[[dict], None] | None,
    ) -> dict[str, Any]:
        output = os.path.abspath(output)
        folder, name = os.path.split(output)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        try:
            os.fchmod(fd, stat.S_IMODE(os.fstat(src).st_mode))
            result = self.call(method, params, [src, fd], on_progress)
            if result.get("noop"):
                os.unlink(tmp)
            else:
                os.replace(tmp, output)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        if params["sync"]:
            fsync_dir(folder)
        result["output"] = output

        return result
