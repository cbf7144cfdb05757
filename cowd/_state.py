"""The state directory and what cowd keeps in it.

Layout::

    STATE/seq                      reserved commit sequence numbers
    STATE/logs/SESSION/NAME.log    one log per session and base file
    STATE/merges/NAME              merge outputs, unless -o was given

Everything under STATE belongs to cowd; clients reach it only through
RPC, and paths they name are checked to resolve inside it.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

import structlog

from cowd._logfile import LogWriter, read_meta
from cowd.durable import fsync_dir
from cowd.protocol import CorruptLog, NotFound

log = structlog.get_logger()

# Sequence numbers are reserved on disk this many at a time, so a
# commit costs no extra fsync; a restart skips what was left of the
# last reservation, leaving a gap but never reusing a number.
_SEQ_RESERVE = 4096


class SequenceAllocator:
    """Hands out commit sequence numbers, increasing across restarts."""

    def __init__(self, path: str) -> None:
        self._path = path
        try:
            with open(path) as f:
                self._ceiling = int(f.read().strip() or 0)
        except FileNotFoundError:
            self._ceiling = 0
        self._next = self._ceiling + 1

    def next(self) -> int:
        if self._next > self._ceiling:
            self._reserve(self._next + _SEQ_RESERVE - 1)
        seq = self._next
        self._next += 1

        return seq

    def _reserve(self, ceiling: int) -> None:
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{ceiling}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)
        fsync_dir(os.path.dirname(self._path))
        self._ceiling = ceiling


@dataclass
class LogInfo:
    """A log as the index knows it: where it is and what its header says."""

    path: str
    meta: dict[str, Any]

    @property
    def session(self) -> str:
        return self.meta.get("session", "")

    @property
    def uid(self) -> int:
        return self.meta.get("uid", -1)

    @property
    def base(self) -> tuple[int, int]:
        return self.meta.get("dev", -1), self.meta.get("ino", -1)


class State:
    """The state directory, its commit sequence and its index of logs."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.logs_dir = os.path.join(self.root, "logs")
        self.merges_dir = os.path.join(self.root, "merges")
        self.manifests_dir = os.path.join(self.root, "manifests")
        for path in (self.root, self.logs_dir, self.merges_dir):
            os.makedirs(path, mode=0o700, exist_ok=True)
        self._remove_stale_temporaries()
        self.seq = SequenceAllocator(os.path.join(self.root, "seq"))
        self.logs: dict[str, LogInfo] = {}
        self._load_index()

    def _remove_stale_temporaries(self) -> None:
        """Remove what a merge killed before its rename left behind."""
        for folder in (self.merges_dir, self.manifests_dir):
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                if name.endswith(".tmp"):
                    os.unlink(os.path.join(folder, name))
                    log.info("stale temporary removed", path=name, folder=folder)

    def _load_index(self) -> None:
        for session in sorted(os.listdir(self.logs_dir)):
            folder = os.path.join(self.logs_dir, session)
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                if name.endswith(".log"):
                    self._index(os.path.join(folder, name))

    def _index(self, path: str) -> None:
        try:
            self.logs[path] = LogInfo(path, read_meta(path))
        except (CorruptLog, OSError) as exc:
            log.warning("log unreadable", path=path, error=str(exc))

    def new_session_dir(self, pid: int) -> tuple[str, str]:
        """Create a fresh session folder; return (session id, folder)."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        base = f"{stamp}-{pid}"
        for n in range(1000):
            session = base if n == 0 else f"{base}.{n}"
            folder = os.path.join(self.logs_dir, session)
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                continue
            fsync_dir(self.logs_dir)
            return session, folder
        raise RuntimeError(f"cannot create a session folder for {base}")

    def create_log(
        self, folder: str, name: str, meta: dict[str, Any]
    ) -> tuple[LogInfo, LogWriter]:
        """Create a new log in a session folder, header durable on return."""
        stem = os.path.basename(name) or "file"
        for n in range(1000):
            path = os.path.join(folder, f"{stem}.log" if n == 0 else f"{stem}.{n}.log")
            if not os.path.exists(path):
                break
        writer = LogWriter.create(path, meta)
        info = LogInfo(path, meta)
        self.logs[path] = info

        return info, writer

    def find_log(self, path: str) -> LogInfo:
        """The indexed log at path; anything outside the index is unknown."""
        info = self.logs.get(os.path.realpath(path))
        if info is None:
            raise NotFound(f"{path}: no such log")

        return info

    def remove_log(self, info: LogInfo) -> None:
        """Delete a log, and its session folder once that is empty."""
        os.unlink(info.path)
        del self.logs[info.path]
        folder = os.path.dirname(info.path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)
        fsync_dir(self.logs_dir)

    def logs_of(self, base: tuple[int, int]) -> list[LogInfo]:
        return [info for info in self.logs.values() if info.base == base]
