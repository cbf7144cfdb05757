"""The daemon's RPC methods: sessions, logs, commits and merges.

Who a caller is comes from the kernel (SO_PEERCRED), never from what it
says.  A caller is an admin when it is root or the user cowd runs as;
other users see and merge only the logs of their own sessions.  Files
are reached only through descriptors a client passed, opened with the
client's own rights; cowd opens paths only inside its state directory.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

import cowd
from cowd import _engine, _logfile, _merging, _pteditor, protocol
from cowd._engine import POLICIES
from cowd._logfile import LogWriter
from cowd._server import Connection
from cowd._state import LogInfo, State
from cowd.durable import fsync_dir
from cowd.protocol import (
    InvalidArgument,
    PermissionDenied,
    ProtocolError,
)

log = structlog.get_logger()

# Most pages one pte_restore may name: a bound on what one request costs.
_MAX_RESTORE_PAGES = 1 << 20

# Engines a session may name; pteditor only from a cowd that runs it.
ENGINES = ("auto", "remap", "pteditor", "uffd")


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

    def __init__(
        self,
        state: State,
        engine: str,
        socket_path: str,
        sync: bool = True,
        device: _pteditor.Device | None = None,
    ) -> None:
        self.state = state
        # The page-table editor, held open when cowd runs that engine.
        self.device = device
        self.sync = sync
        self.manifests = _merging.Manifests(state.manifests_dir)
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
            "verify": self.verify,
            "prune": self.prune,
            "pte_swap": self.pte_swap,
            "pte_restore": self.pte_restore,
        }

    def is_admin(self, conn: Connection) -> bool:
        return conn.uid in (0, os.getuid())

    def connection_closed(self, conn: Connection) -> None:
        session = conn.session
        if conn.faults:
            log.info("fault channel closed", pid=conn.pid)
            if self.device is not None:
                self.device.forget(conn.pid)
        if session is None:
            return
        for _, writer in session.logs:
            writer.close()
        del self.sessions[session.id]
        log.info("session ended", session=session.id, pid=session.pid)

    # -- the methods libcow calls ---------------------------------------

    async def hello(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        if conn.session is not None or conn.faults:
            raise ProtocolError("hello was already said on this connection")
        engine = params.get("engine", "auto")
        if engine not in ENGINES:
            raise InvalidArgument(f"engine {engine} is not available")
        if engine == "pteditor" and self.device is None:
            raise InvalidArgument(
                f"cowd runs the {self.engine} engine, not pteditor"
                " (start cowd with --engine pteditor)"
            )
        if params.get("faults", False):
            return self._fault_channel(conn, engine)
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

    def _fault_channel(self, conn: Connection, engine: str) -> Any:
        """Make conn the fault channel of the process at its other end.

        The channel carries only pte_swap and pte_restore, so that a
        fault never waits behind a commit of the same process.  It
        belongs to the process the kernel names, not to a session id the
        client could claim: a forked child opens its own before it has a
        session.
        """
        if engine != "pteditor":
            raise InvalidArgument("only the pteditor engine has a fault channel")
        conn.faults = True
        log.info("fault channel opened", pid=conn.pid, uid=conn.uid)

        return {"faults": True, "engine": engine}

    async def pte_swap(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        device = self._device_for(conn)
        target, copy = _address(params, "target"), _address(params, "copy")
        writable = params.get("writable", True)
        if not isinstance(writable, bool):
            raise InvalidArgument("writable must be a boolean")
        try:
            device.swap(conn.pid, target, copy, writable)
        except _pteditor.Refused as exc:
            log.warning("swap refused", pid=conn.pid, code=exc.code, error=str(exc))
            raise

        return {}

    async def pte_restore(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        device = self._device_for(conn)
        target = _address(params, "target")
        pages = params.get("pages", 1)
        if not isinstance(pages, int) or not 1 <= pages <= _MAX_RESTORE_PAGES:
            raise InvalidArgument(f"pages must be 1..{_MAX_RESTORE_PAGES}")

        return {"restored": device.restore(conn.pid, target, pages)}

    def _device_for(self, conn: Connection) -> _pteditor.Device:
        if self.device is None:
            raise InvalidArgument(
                f"engine pteditor is not available: cowd runs the {self.engine} engine"
            )
        session = conn.session
        if not conn.faults and (session is None or session.engine != "pteditor"):
            raise ProtocolError("say hello with the pteditor engine first")

        return self.device

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
        await trio.to_thread.run_sync(
            _append_and_commit, writer, records, seq, self.sync
        )
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
            **self._device_status(),
        }

    def device_facts(self) -> dict[str, Any]:
        """What the start-up log says of the page-table editor device."""
        if self.device is None:
            return {}
        facts = {"device": self.device.path, "restores": self.device.restores}
        if not self.device.tracks:
            # PTEditor: the entries of a client killed while it holds
            # swapped pages are torn down by the kernel as they are, which
            # corrupts its page accounting; nothing here can prevent that.
            facts["warning"] = "the device does not restore entries of killed clients"

        return facts

    def _device_status(self) -> dict[str, Any]:
        """How many page-table entries are swapped, and who restores them.

        "restores" is "device" when the module tracks swaps and restores
        any left when a range or a process goes; "cowd" with PTEditor,
        where nothing does if a client dies holding swapped entries.
        """
        if self.device is None:
            return {}

        return {"swapped": self.device.swapped(), "restores": self.device.restores}

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
        lineage = self.manifests.lineage(os.fstat(source))
        _merging.check_base(info, lineage, bool(params.get("force", False)))
        plan = _merging.Plan([info], lineage, "last")
        name = f"merge_{_base_name(info)}_{info.session}"

        return await self._merge(conn, params, plan, source, output, name)

    async def merge_all(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        source, output = _merge_fds(params, fds)
        policy = params.get("on_conflict", "fail")
        if policy not in POLICIES:
            raise InvalidArgument(f"on-conflict must be one of {', '.join(POLICIES)}")
        lineage = self.manifests.lineage(os.fstat(source))
        infos = [
            info
            for base in lineage.bases()
            for info in self.state.logs_of(base)
            if self._may_see(conn, info.uid)
        ]
        for info in infos:
            _merging.check_base(info, lineage, bool(params.get("force", False)))
        plan = _merging.Plan(infos, lineage, policy)
        name = f"merge_all_{_fd_name(source)}"

        return await self._merge(conn, params, plan, source, output, name)

    async def _merge(
        self,
        conn: Connection,
        params: dict,
        plan: _merging.Plan,
        source: int,
        output: int | None,
        name: str,
    ) -> dict[str, Any]:
        in_place = bool(params.get("in_place"))
        sync = params.get("sync", True)
        if not isinstance(sync, bool):
            raise InvalidArgument("sync must be true or false")
        if not sync and (in_place or output is None):
            raise InvalidArgument("--no-sync needs an output file (-o), not --in-place")
        if in_place and not await trio.to_thread.run_sync(_merging.has_news, plan):
            log.info("nothing new to merge", logs=len(plan.logs))
            return {"output": None, "noop": True, "logs": len(plan.logs), "batches": 0}
        progress = _Progress(conn) if params.get("progress") else None
        report = progress.report if progress else _no_progress
        if output is not None:
            # The client created this file with its own rights and
            # renames it into place once we return.  An output left
            # unsynced gets no manifest: after a machine crash it might
            # not hold what the manifest would say.
            result = await trio.to_thread.run_sync(
                _merging.run, plan, source, output, report, self.state.root, sync
            )
            if sync:
                self._record(plan, result, os.fstat(output))
            path = None
        else:
            path = os.path.join(self.state.merges_dir, name)
            result = await trio.to_thread.run_sync(
                self._merge_into_state, plan, source, path, report, conn.uid, conn.gid
            )
        if progress:
            await progress.flush()
        log.info(
            "merged",
            logs=len(plan.logs),
            batches=result.batches,
            output=path or "(client file)",
            bytes=result.bytes,
        )
        counted = _merging.crashpoints_passed()
        if counted is not None:
            log.info("crash points passed", count=counted)

        return {
            "output": path,
            "noop": False,
            "logs": len(plan.logs),
            "batches": result.batches,
            "records": result.records,
            "bytes": result.bytes,
        }

    def _record(
        self, plan: _merging.Plan, result: _engine.Result, st: os.stat_result
    ) -> None:
        applied, ends = _merging.applied_after(plan, result)
        self.manifests.record(
            _merging.Identity.of(st), plan.lineage.origin, applied, ends
        )
        _merging.crashpoint("manifest recorded")

    def _merge_into_state(
        self,
        plan: _merging.Plan,
        source: int,
        path: str,
        report: _merging.Progress,
        uid: int,
        gid: int,
    ) -> _engine.Result:
        """Write a merge under path in the state folder, atomically."""
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if os.getuid() == 0 and uid != 0:
                os.fchown(fd, uid, gid)
            result = _merging.run(plan, source, fd, report, self.state.root)
            self._record(plan, result, os.fstat(fd))
            os.replace(tmp, path)
            _merging.crashpoint("merge renamed")
        except BaseException:
            _unlink_quietly(tmp)
            raise
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(path))

        return result

    async def verify(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        paths = params.get("logs") or [
            info.path
            for info in self.state.logs.values()
            if self._may_see(conn, info.uid)
        ]
        infos = [self._visible_log(conn, path) for path in paths]

        return await trio.to_thread.run_sync(_verify_all, infos)

    async def prune(self, conn: Connection, params: dict, fds: list[int]) -> Any:
        """Remove logs of ended sessions that a merge output fully holds."""
        older = params.get("older_than")
        # A negative age would take every merged log, whatever its age.
        if older is not None and (
            isinstance(older, bool)
            or not isinstance(older, int | float)
            or not 0 <= older < math.inf
        ):
            raise InvalidArgument("older_than must be a number of seconds >= 0")
        dry_run = bool(params.get("dry_run", False))
        candidates = [
            info
            for info in self.state.logs.values()
            if self._may_see(conn, info.uid)
            and info.session not in self.sessions
            and (older is None or time.time() - info.meta.get("created", 0) > older)
        ]
        merged = await trio.to_thread.run_sync(self._fully_merged, candidates)
        if not dry_run:
            for info in merged:
                self.state.remove_log(info)
                log.info("log pruned", path=info.path, session=info.session)

        return {"pruned": [info.path for info in merged], "dry_run": dry_run}

    def _fully_merged(self, infos: list[LogInfo]) -> list[LogInfo]:
        applied = self.manifests.applied_everywhere()
        merged = []
        for info in infos:
            found = _logfile.scan(info.path)
            if found.corrupt_at is not None or found.pending_bytes:
                continue
            last = found.batches[-1].seq if found.batches else 0
            if applied.get(info.path, 0) >= last:
                merged.append(info)

        return merged

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


def _address(params: dict, key: str) -> int:
    value = params.get(key)
    if not isinstance(value, int) or not 0 < value < 1 << 64:
        raise InvalidArgument(f"{key} must be an address")

    return value


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


def _append_and_commit(writer: LogWriter, records: list, seq: int, sync: bool) -> None:
    if records:
        writer.append(records)
    writer.commit(seq, sync=sync)


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


def _verify_all(infos: list[LogInfo]) -> list[dict[str, Any]]:
    """Check each log batch by batch; say which batches are good."""
    reports = []
    for info in infos:
        try:
            found = _logfile.scan(info.path)
        except _logfile.CorruptLog as exc:
            reports.append({"path": info.path, "ok": False, "error": str(exc)})
            continue
        reports.append(
            {
                "path": info.path,
                "ok": found.corrupt_at is None,
                "good": [[b.seq, b.start, b.end] for b in found.batches],
                "pending_bytes": found.pending_bytes,
                "corrupt_at": found.corrupt_at,
                "corrupt_reason": found.corrupt_reason or None,
            }
        )

    return reports


class _Progress:
    """Sends a merge's progress to its client as notifications.

    The engine reports from a worker thread; reports are forwarded to
    the connection's task at most every ``_PROGRESS_INTERVAL`` seconds,
    and a report never waits for the client to read.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._last = 0.0
        self._pending: tuple[str, int, int] | None = None
        self._token = trio.lowlevel.current_trio_token()

    def report(self, phase: str, done: int, total: int) -> None:
        _merging.crashpoint(f"progress {phase}")
        self._pending = (phase, done, total)
        now = time.monotonic()
        if now - self._last >= _PROGRESS_INTERVAL or done == total:
            self._last = now
            trio.from_thread.run(self.flush, trio_token=self._token)

    async def flush(self) -> None:
        if self._pending is None:
            return
        phase, done, total = self._pending
        self._pending = None
        params = {"phase": phase, "done": done, "total": total}
        with contextlib.suppress(OSError, trio.BrokenResourceError):
            await self._conn.send(protocol.notification("progress", params))


# Progress notifications go out at most this often: enough for a smooth
# bar, few enough to cost nothing next to the merge.
_PROGRESS_INTERVAL = 0.1


def _no_progress(phase: str, done: int, total: int) -> None:
    _merging.crashpoint(f"progress {phase}")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
