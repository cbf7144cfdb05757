"""Merges as a whole: which logs, from which commit on, into which file.

A merge output can itself be merged again, typically after an in-place
merge replaced the base.  So that nothing is applied twice, every merge
leaves a manifest in STATE/manifests, named after the output file's
device and inode, saying which file the logs were made from (the
origin) and, per log, the last commit sequence number applied and the
offset where that batch ends.  Merging a file that has a manifest (and
whose size and mtime still match it) takes the logs of its origin,
reads each from that offset on, and applies only the batches committed
after the ones already in it; when there are none, an in-place merge
is a no-op.

This module decides and records; the byte work is the engine's
(``_engine``), which runs in a worker thread.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cowd import _engine, _mergelib
from cowd._state import LogInfo
from cowd.durable import fsync_dir, write_all
from cowd.protocol import BaseMismatch

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Identity:
    """What tells one version of a file from another."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Identity:
        return cls(
            meta.get("dev", -1),
            meta.get("ino", -1),
            meta.get("size", -1),
            meta.get("mtime_ns", -1),
        )

    @property
    def base(self) -> tuple[int, int]:
        return self.dev, self.ino


@dataclass
class Lineage:
    """Where a file to merge comes from, and what is already in it.

    ``origin`` is the file the oldest logs were made from; ``this`` is the
    file itself, which sessions may have mapped and logged since.  They
    are the same file unless this one is the output of a merge.  Per log,
    ``applied`` is the last sequence number the file holds and ``ends``
    where that batch ends in the log: only what follows can be new.
    """

    this: Identity
    origin: Identity
    applied: dict[str, int]
    ends: dict[str, int] = field(default_factory=dict)

    def bases(self) -> list[tuple[int, int]]:
        return list(dict.fromkeys([self.origin.base, self.this.base]))

    def made_from_here(self, made_from: Identity) -> bool:
        return made_from in (self.origin, self.this)

    def resume_at(self, log: str) -> int | None:
        """Where the batches of log this file does not hold start, if known.

        A log only grows, so the offset holds while the log is at least
        that long; a manifest written before offsets were kept has none.
        """
        end = self.ends.get(log)
        try:
            return end if end is not None and end <= os.path.getsize(log) else None
        except OSError:
            return None


class Manifests:
    """The manifests of merge outputs, one small JSON file each."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, mode=0o700, exist_ok=True)

    def _path(self, dev: int, ino: int) -> str:
        return os.path.join(self.folder, f"{dev}-{ino}.json")

    def lineage(self, st: os.stat_result) -> Lineage:
        """The lineage of the file with this stat, from its manifest if any."""
        this = Identity.of(st)
        manifest = self._load(st.st_dev, st.st_ino)
        if manifest is None or Identity(**manifest["output"]) != this:
            return Lineage(this, this, {})
        origin = Identity(**manifest["origin"])

        return Lineage(
            this, origin, dict(manifest["applied"]), dict(manifest.get("ends", {}))
        )

    def _load(self, dev: int, ino: int) -> dict[str, Any] | None:
        try:
            with open(self._path(dev, ino)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def record(
        self,
        output: Identity,
        origin: Identity,
        applied: dict[str, int],
        ends: dict[str, int],
    ) -> None:
        """Durably record what a merge output holds."""
        path = self._path(output.dev, output.ino)
        body = {
            "output": asdict(output),
            "origin": asdict(origin),
            "applied": applied,
            "ends": ends,
            "created": time.time(),
        }
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, json.dumps(body).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(self.folder)

    def applied_everywhere(self) -> dict[str, int]:
        """Per log, the highest sequence number any merge output holds."""
        best: dict[str, int] = {}
        for name in os.listdir(self.folder):
            if not name.endswith(".json"):
                continue
            manifest = self._load(*map(int, name[:-5].split("-")))
            for log, seq in (manifest or {}).get("applied", {}).items():
                best[log] = max(best.get(log, 0), seq)

        return best


def check_base(info: LogInfo, lineage: Lineage, force: bool) -> None:
    """Refuse to apply a log to a file it was not made from."""
    if force:
        return
    made_from = Identity.from_meta(info.meta)
    file = info.meta.get("file")
    if made_from.base not in lineage.bases():
        raise BaseMismatch(
            f"{info.path} was made from {file}, not from this file"
            " (use --force to merge anyway)"
        )
    if not lineage.made_from_here(made_from):
        raise BaseMismatch(
            f"{file} changed since {info.path} was made (use --force to merge anyway)"
        )


@dataclass
class Plan:
    """One merge, decided: the logs, what to skip, and how to resolve."""

    logs: list[LogInfo]
    lineage: Lineage
    policy: str

    def inputs(self) -> list[_engine.LogInput]:
        return [
            _engine.LogInput(
                info.path,
                info.session,
                self.lineage.applied.get(info.path, 0),
                self.lineage.resume_at(info.path),
            )
            for info in self.logs
        ]


def has_news(plan: Plan) -> bool:
    """Whether any log has a batch the file to merge does not hold yet.

    Each log is read from where the batches the file holds end, when the
    manifest says, so that a merge with nothing new reads little.
    """
    for info in plan.logs:
        start = plan.lineage.resume_at(info.path)
        batches = _mergelib.verify(info.path, start).batches
        if batches and batches[-1].seq > plan.lineage.applied.get(info.path, 0):
            return True

    return False


def run(
    plan: Plan,
    source_fd: int,
    out_fd: int,
    progress: Progress,
    spill_dir: str,
    sync: bool = True,
) -> _engine.Result:
    """Write the merge into out_fd, synced unless told not to.

    No rename, no manifest: those are the caller's.
    """
    crashpoint("merge started")
    result = _engine.merge(
        plan.inputs(), source_fd, out_fd, plan.policy, progress, spill_dir, sync
    )
    crashpoint("merge applied")
    if sync:
        os.fsync(out_fd)
        crashpoint("merge synced")

    return result


def applied_after(
    plan: Plan, result: _engine.Result
) -> tuple[dict[str, int], dict[str, int]]:
    """The manifest's applied and ends maps for the output of this merge."""
    applied, ends = dict(plan.lineage.applied), dict(plan.lineage.ends)
    for path, seq in result.last_seq.items():
        if seq > applied.get(path, 0):
            applied[path] = seq
            ends[path] = result.ends[path]

    return applied, ends


# Crash tests set COWD_TEST_KILL_AT=N to have cowd kill itself with
# SIGKILL at the Nth crash point of its merges, so that steps all along
# a merge, from creating the output to recording its manifest, are
# tried; with N larger than the count, cowd only counts them.
_KILL_AT = int(os.environ.get("COWD_TEST_KILL_AT", "0") or 0)
_passed = 0


def crashpoint(where: str) -> None:
    global _passed
    if not _KILL_AT:
        return
    _passed += 1
    if _passed == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def crashpoints_passed() -> int | None:
    """How many crash points merges have passed, when tests count them."""
    return _passed if _KILL_AT else None
