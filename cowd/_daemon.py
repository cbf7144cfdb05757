"""The daemon's RPC methods: sessions, logs, commits and merges.

Who a caller is comes from the kernel (SO_PEERCRED), never from what it
says.  A caller is an admin when it is root or the user cowd runs as;
other users see and merge only the logs of their own sessions.  Files
are reached only through descriptors a client passed, opened with the
client's own rights; cowd opens paths only inside its state directory.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

import cowd
from cowd import _logfile, _merge
from cowd._logfile import LogWriter
from cowd._server import Connection
from cowd._state import LogInfo, State
from cowd.durable import fsync_dir
from cowd.protocol import (
    BaseMismatch,
    InvalidArgument,
    PermissionDenied,
    ProtocolError,
)

log = structlog.get_logger()

ENGINES = ("auto", "remap")


@dataclass
class Session:
    """A client process that said hello: its identity and open logs."""

    id: str
    folder: str
    pid: int
    uid: int
    gid: int
    engine: str
    argv0: str
    started: float = field(default_factory=time.time)
    # Log handles are small integers, indexes into this list.
    logs: list[tuple[LogInfo, LogWriter]] = field(default_factory=list)
    by_base: dict[tuple[int, int], int] = field(default_factory=dict)
    commits: int = 0


class Daemon:
    """State shared by every connection, and the methods they call."""

    def __init__(self, state: State, engine: str, socket_path: str) -> None:
        self.state = state
        self.engine = "remap" if engine == "auto" else engine
        self.socket_path = socket_path
        self.started = time.time()
        self.sessions: dict[str, Session] = {}
        self.methods = {
            "hello": self.hello,
            "map": self.map,
            "commit": self.commit,
            "status": self.status,
            "sessions": self.list_sessions,
            "logs": self.list_logs,
            "log_show": self.log_show,
            "merge": self.merge,
            "merge_all": self.merge_all,
        }

    def is_admin(self, conn: Connection) -> bool:
        return conn.uid in (0, os.getuid())

    def connection_closed(self, conn: Connection) -> None:
        session = conn.session
        if session is None:
            return
        for _, writer in session.logs:
            writer.close()
        del self.sessions[session.id]
        log.info("session ended", session=session.id, pid=session.pid)

    # -- the methods libcow calls ---------------------------------------

    async def hello(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        if conn.session is not None:
            raise ProtocolError("hello was already said on this connection")
        engine = params.get("engine", "auto")
        if engine not in ENGINES:
            raise InvalidArgument(f"engine {engine} is not available")
        session_id, folder = self.state.new_session_dir(conn.pid)
        session = Session(
            id=session_id,
            folder=folder,
            pid=conn.pid,
            uid=conn.uid,
            gid=conn.gid,
            engine="remap" if engine == "auto" else engine,
            argv0=str(params.get("argv0", "")),
        )
        conn.session = session
        self.sessions[session_id] = session
        log.info(
            "session started",
            session=session_id,
            pid=conn.pid,
            uid=conn.uid,
            engine=session.engine,
        )

        return {"session": session_id, "engine": session.engine}

    async def map(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        session = _session_of(conn)
        if len(fds) != 1:
            raise ProtocolError("map needs exactly one file descriptor")
        st = os.fstat(fds[0])
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument("only regular files can be managed")
        base = (st.st_dev, st.st_ino)
        handle = session.by_base.get(base)
        if handle is None:
            handle = self._open_log(session, fds[0], st)
        info, _ = session.logs[handle]

        return {"log": handle, "path": info.path}

    def _open_log(self, session: Session, fd: int, st: os.stat_result) -> int:
        path = _fd_path(fd)
        meta = {
            "file": path,
            "dev": st.st_dev,
            "ino": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "session": session.id,
            "pid": session.pid,
            "uid": session.uid,
            "gid": session.gid,
            "engine": session.engine,
            "created": time.time(),
        }
        info, writer = self.state.create_log(session.folder, path, meta)
        session.logs.append((info, writer))
        handle = len(session.logs) - 1
        session.by_base[(st.st_dev, st.st_ino)] = handle
        log.info("log created", session=session.id, path=info.path, file=path)

        return handle

    async def commit(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        session = _session_of(conn)
        handle = params.get("log")
        if not isinstance(handle, int) or not 0 <= handle < len(session.logs):
            raise InvalidArgument(f"no log with handle {handle!r} in this session")
        records = _check_records(params.get("records", []))
        _, writer = session.logs[handle]
        if params.get("more", False):
            await trio.to_thread.run_sync(writer.append, records)
            return {"pending": writer.pending}
        if not records and not writer.pending:
            return {"seq": None}
        # The number is taken before the write so that commit order is
        # the order in which cowd accepted the batches.
        seq = self.state.seq.next()
        await trio.to_thread.run_sync(_append_and_commit, writer, records, seq)
        session.commits += 1
        log.debug("batch committed", session=session.id, seq=seq)

        return {"seq": seq}

    # -- the methods cowctl and the client library call -----------------

    async def status(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        return {
            "version": cowd.__version__,
            "pid": os.getpid(),
            "engine": self.engine,
            "socket": self.socket_path,
            "state_dir": self.state.root,
            "uptime": time.time() - self.started,
            "sessions": len(self.sessions),
            "logs": len(self.state.logs),
            "uid": conn.uid,
            "admin": self.is_admin(conn),
        }

    async def list_sessions(
        self, conn: Connection, params: dict, fds: list[int]
    ) -> Any:
        live = [
            {
                "session": s.id,
                "pid": s.pid,
                "uid": s.uid,
                "engine": s.engine,
                "argv0": s.argv0,
                "started": s.started,
                "live": True,
                "logs": len(s.logs),
                "commits": s.commits,
            }
            for s in self.sessions.values()
            if self._may_see(conn, s.uid)
        ]
        if not params.get("all", False):
            return live
        past: dict[str, dict] = {}
        for info in self.state.logs.values():
            if info.session in self.sessions or not self._may_see(conn, info.uid):
                continue
            entry = past.setdefault(
                info.session,
                {
                    "session": info.session,
                    "pid": info.meta.get("pid"),
                    "uid": info.uid,
                    "engine": info.meta.get("engine", ""),
                    "argv0": "",
                    "started": info.meta.get("created"),
                    "live": False,
                    "logs": 0,
                },
            )
            entry["logs"] += 1

        return live + sorted(past.values(), key=lambda e: e["session"])

    async def list_logs(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        base = params.get("base")
        infos = [
            info
            for info in self.state.logs.values()
            if self._may_see(conn, info.uid)
            and (base is None or list(info.base) == list(base))
        ]

        return await trio.to_thread.run_sync(_describe_logs, infos)

    async def log_show(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        info = self._visible_log(conn, params.get("log"))
        found = await trio.to_thread.run_sync(_logfile.scan, info.path)

        return {
            **_log_summary(info, found),
            "batches": [
                {
                    "seq": b.seq,
                    "records": [[r.offset, r.data] for r in b.records],
                }
                for b in found.batches
            ],
        }

    async def merge(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        source, output = _merge_fds(params, fds)
        info = self._visible_log(conn, params.get("log"))
        force = bool(params.get("force", False))
        _check_base(info, os.fstat(source), force)
        found = await trio.to_thread.run_sync(_logfile.scan, info.path)
        _refuse_corrupt(info, found)
        overlay = _merge.replay(info.session, found.batches)
        segments = _merge.plan([overlay], "last")
        name = f"merge_{_base_name(info)}_{info.session}"
        result = await self._write_merge(conn, source, output, segments, name)
        log.info("merged", log=info.path, batches=len(found.batches), **_where(result))

        return {**result, "logs": 1, "batches": len(found.batches)}

    async def merge_all(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        source, output = _merge_fds(params, fds)
        policy = params.get("on_conflict", "fail")
        if policy not in _merge.POLICIES:
            raise InvalidArgument(
                f"on-conflict must be one of {', '.join(_merge.POLICIES)}"
            )
        force = bool(params.get("force", False))
        st = os.fstat(source)
        infos = [
            info
            for info in self.state.logs_of((st.st_dev, st.st_ino))
            if self._may_see(conn, info.uid)
        ]
        for info in infos:
            _check_base(info, st, force)
        scans = await trio.to_thread.run_sync(_scan_all, infos)
        overlays = []
        batches = 0
        for info, found in zip(infos, scans, strict=True):
            _refuse_corrupt(info, found)
            overlays.append(_merge.replay(info.session, found.batches))
            batches += len(found.batches)
        segments = _merge.plan(overlays, policy)
        name = f"merge_all_{_base_name(infos[0]) if infos else _fd_name(source)}"
        result = await self._write_merge(conn, source, output, segments, name)
        log.info("merged all", logs=len(infos), batches=batches, **_where(result))

        return {**result, "logs": len(infos), "batches": batches}

    async def _write_merge(
        self,
        conn: Connection,
        source: int,
        output: int | None,
        segments: list[_merge.Segment],
        name: str,
    ) -> dict[str, Any]:
        if output is not None:
            # The client created this file with its own rights and
            # renames it into place once we return.
            applied = await trio.to_thread.run_sync(
                _merge.write_output, source, output, segments
            )
            return {"output": None, "bytes": applied}
        path = os.path.join(self.state.merges_dir, name)
        applied = await trio.to_thread.run_sync(
            _write_atomically, source, path, segments, conn.uid, conn.gid
        )

        return {"output": path, "bytes": applied}

    # -- access ---------------------------------------------------------

    def _may_see(self, conn: Connection, uid: int) -> bool:
        return uid == conn.uid or self.is_admin(conn)

    def _visible_log(self, conn: Connection, path: Any) -> LogInfo:
        if not isinstance(path, str):
            raise InvalidArgument("log must be a path")
        info = self.state.find_log(path)
        if not self._may_see(conn, info.uid):
            raise PermissionDenied(f"{path}: log belongs to another user")

        return info


def _session_of(conn: Connection) -> Session:
    if conn.session is None:
        raise ProtocolError("say hello first")

    return conn.session


def _check_records(records: Any) -> list[tuple[int, bytes]]:
    if not isinstance(records, list):
        raise InvalidArgument("records must be an array")
    checked = []
    for record in records:
        if (
            not isinstance(record, list)
            or len(record) != 2
            or not isinstance(record[0], int)
            or not 0 <= record[0] < 2**63
            or not isinstance(record[1], bytes)
        ):
            raise InvalidArgument("a record is [offset, bytes]")
        checked.append((record[0], record[1]))

    return checked


def _append_and_commit(writer: LogWriter, records: list, seq: int) -> None:
    if records:
        writer.append(records)
    writer.commit(seq)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd:{fd}"


def _fd_name(fd: int) -> str:
    return os.path.basename(_fd_path(fd)).removesuffix(" (deleted)")


def _base_name(info: LogInfo) -> str:
    return os.path.basename(info.meta.get("file", "file"))


def _merge_fds(params: dict, fds: list[int]) -> tuple[int, int | None]:
    if not fds:
        raise ProtocolError("a merge needs the source file's descriptor")
    source = fds[0]
    output = fds[1] if len(fds) > 1 else None
    if not stat.S_ISREG(os.fstat(source).st_mode):
        raise InvalidArgument("the source must be a regular file")

    return source, output


def _check_base(info: LogInfo, st: os.stat_result, force: bool) -> None:
    """Refuse to apply a log to a file it was not made from."""
    if force:
        return
    meta = info.meta
    if info.base != (st.st_dev, st.st_ino):
        raise BaseMismatch(
            f"{info.path} was made from {meta.get('file')}, not this file"
            " (use --force to merge anyway)"
        )
    if (meta.get("size"), meta.get("mtime_ns")) != (st.st_size, st.st_mtime_ns):
        raise BaseMismatch(
            f"{meta.get('file')} changed since {info.path} was made"
            " (use --force to merge anyway)"
        )


def _refuse_corrupt(info: LogInfo, found: _logfile.Scan) -> None:
    if found.corrupt_at is not None:
        raise _logfile.CorruptLog(
            f"{info.path}: {found.corrupt_reason} at byte {found.corrupt_at}",
            path=info.path,
            offset=found.corrupt_at,
        )


def _scan_all(infos: list[LogInfo]) -> list[_logfile.Scan]:
    return [_logfile.scan(info.path) for info in infos]


def _log_summary(info: LogInfo, found: _logfile.Scan) -> dict[str, Any]:
    return {
        "path": info.path,
        "session": info.session,
        "file": info.meta.get("file"),
        "pid": info.meta.get("pid"),
        "uid": info.uid,
        "base": list(info.base),
        "commits": len(found.batches),
        "records": sum(len(b.records) for b in found.batches),
        "pending_bytes": found.pending_bytes,
        "corrupt_at": found.corrupt_at,
        "corrupt_reason": found.corrupt_reason or None,
    }


def _describe_logs(infos: list[LogInfo]) -> list[dict[str, Any]]:
    described = []
    for info in infos:
        try:
            found = _logfile.scan(info.path)
        except (OSError, _logfile.CorruptLog) as exc:
            described.append({"path": info.path, "error": str(exc)})
            continue
        summary = _log_summary(info, found)
        summary["size"] = os.path.getsize(info.path)
        described.append(summary)

    return described


def _write_atomically(
    source: int, path: str, segments: list[_merge.Segment], uid: int, gid: int
) -> int:
    """Write a merge under path via a temporary file and a rename."""
    folder = os.path.dirname(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        applied = _merge.write_output(source, fd, segments)
        if os.getuid() == 0 and uid != 0:
            os.fchown(fd, uid, gid)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise
    fsync_dir(folder)

    return applied


def _where(result: dict[str, Any]) -> dict[str, Any]:
    return {"output": result["output"] or "(client file)", "bytes": result["bytes"]}
