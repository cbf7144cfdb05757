"""The merge engine, libcowmerge.so, seen from Python.

``merge()`` folds the committed batches of several logs into a new
version of their base file, in commit order, with the conflict rules
documented in native/merge.c; its memory does not grow with the logs.
``verify()`` walks one log and says which batches are good and how the
log ends.  Both work on descriptors the caller opened; nothing is synced
or renamed here.

The library is loaded with cffi in ABI mode (dlopen), from the cowd
package's ``_native`` folder where ``pip install .`` puts it.  The calls
block: the daemon runs them in a worker thread.  Nothing here calls from
C back into Python: cffi makes such callbacks out of memory that is
writable and executable, which cowd's systemd unit forbids
(MemoryDenyWriteExecute).  So progress is read from a structure the
engine updates, and a batch listing comes back in an array.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata, resources
from typing import Any

import cffi

from cowd import _logfile
from cowd.protocol import Conflict, CorruptLog, InvalidArgument

_CDEF = """
struct cow_merge_log {
    int fd;
    uint32_t session;
    uint64_t data_start;
    uint64_t min_seq;
    uint64_t last_seq;
    uint64_t applied_end;
    uint64_t batches;
    uint64_t records;
    uint64_t pending_bytes;
};
struct cow_merge_conflict {
    uint64_t start;
    uint64_t end;
    uint32_t session_a;
    uint32_t session_b;
};
struct cow_merge_stats {
    uint64_t batches;
    uint64_t records;
    uint64_t bytes_applied;
    uint64_t out_size;
    uint64_t windows;
    uint64_t windows_touched;
    uint64_t spill_bytes;
    uint64_t groups;
    int cloned;
    uint64_t conflict_bytes;
    uint64_t nconflicts;
    uint64_t conflicts_stored;
    int conflicts_truncated;
    uint64_t peak_buffer_bytes;
    int corrupt_log;
    uint64_t corrupt_offset;
    char corrupt_reason[64];
};
struct cow_merge_batch {
    uint64_t seq;
    uint64_t start;
    uint64_t end;
    uint64_t records;
    uint64_t bytes;
};
struct cow_merge_verify_result {
    int status;
    uint64_t batches;
    uint64_t records;
    uint64_t end;
    uint64_t last_seq;
    uint64_t size;
    uint64_t pending_bytes;
    uint64_t corrupt_offset;
    char reason[64];
};
typedef int (*cow_merge_progress_fn)(void *, int, uint64_t, uint64_t);
struct cow_merge_progress {
    int phase;
    uint64_t done;
    uint64_t total;
    int cancel;
    cow_merge_progress_fn fn;
    void *arg;
};
int cow_merge(struct cow_merge_log *logs, size_t nlogs, int base_fd,
              int out_fd, int spill_fd, int policy, unsigned flags,
              uint64_t window,
              struct cow_merge_conflict *conflicts, size_t max_conflicts,
              struct cow_merge_stats *stats,
              struct cow_merge_progress *progress);
int cow_merge_verify(int fd, uint64_t start, const uint64_t *after_seq,
                     struct cow_merge_batch *batches, size_t max_batches,
                     struct cow_merge_verify_result *result);
uint32_t cow_merge_crc32c(uint32_t crc, const void *data, size_t len);
uint32_t cow_merge_crc32c_portable(uint32_t crc, const void *data,
                                   size_t len);
"""

POLICIES = ("fail", "last", "first")

# The engine's default: large enough that per-window costs vanish, small
# enough that the window buffers (about six times this) stay modest.
DEFAULT_WINDOW = 1 << 20

# The engine's error codes that mean something other than a failed call.
_CONFLICT = -errno.EDEADLK
_CORRUPT = -errno.EBADMSG

# The engine's largest window: offsets in a window must fit 32 bits.
MAX_WINDOW = 1 << 30

# COW_MERGE_WRITE_BACK, the engine's one flag.
_WRITE_BACK = 1

# Where pip puts the library, relative to the cowd package's folder.
_LIBRARY = "_native/libcowmerge.so"

_PHASES = {0: "", 1: "scan", 2: "spill", 3: "apply"}
_ENDS = {0: "clean", 1: "torn", 2: "corrupt"}
_MORE = 3

# Batches cow_merge_verify() hands back per call.
_VERIFY_STEP = 4096

# Seconds between two calls of a progress report function.
_REPORT_EVERY = 0.2

# How many conflicting ranges an error message spells out; the full
# list travels in the error's data.
_SHOWN_CONFLICTS = 5

_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
_lib: Any = None
_lock = threading.Lock()

Progress = Callable[[str, int, int], object]


def library_path() -> str:
    """Absolute path of libcowmerge.so as installed with this package.

    When cowd is imported from a source tree (as the tests do), the
    library is taken from the installed distribution instead.
    """
    here = os.fspath(resources.files("cowd") / _LIBRARY)
    if os.path.exists(here):
        return here
    try:
        installed = os.fspath(
            metadata.distribution("cowd").locate_file(f"cowd/{_LIBRARY}")
        )
    except metadata.PackageNotFoundError:
        installed = here
    if not os.path.exists(installed):
        raise FileNotFoundError(f"libcowmerge.so is not installed at {here}")

    return installed


def _engine() -> Any:
    global _lib
    with _lock:
        if _lib is None:
            _lib = _ffi.dlopen(library_path())

    return _lib


@dataclass
class LogInput:
    """One log to merge, open for reading, and who wrote it."""

    fd: int
    session: str
    data_start: int
    min_seq: int = 0
    # Used in error messages only.
    path: str = ""


@dataclass
class LogOutcome:
    """What a merge took from one log."""

    path: str
    # The seq of the last batch applied (min_seq when none was) and the
    # offset just past it: where the next merge of this log starts.
    last_seq: int
    applied_end: int
    batches: int
    records: int
    # Bytes of an open or torn batch at the end, never applied.
    pending_bytes: int


@dataclass
class MergeResult:
    """What a merge did.  Conflicts are listed whatever the policy."""

    batches: int
    records: int
    bytes_applied: int
    out_size: int
    cloned: bool
    windows: int
    windows_touched: int
    spill_bytes: int
    groups: int
    conflict_bytes: int
    # Every conflict range found; ``conflicts`` holds the first ones of
    # them, sorted, each {"start", "end", "sessions": [a, b]}.  Ranges
    # are only missed (truncated) when one byte conflicts between more
    # pairs of sessions than the engine holds at once.
    conflict_ranges: int
    conflicts: list[dict[str, Any]]
    conflicts_truncated: bool
    peak_buffer_bytes: int
    logs: list[LogOutcome] = field(default_factory=list)


@dataclass
class VerifiedBatch:
    seq: int
    start: int
    end: int
    records: int
    bytes: int


@dataclass
class VerifyResult:
    """A log as the engine reads it: its good batches and how it ends."""

    # "clean", "torn" (an open or torn batch follows) or "corrupt".
    status: str
    batches: list[VerifiedBatch]
    records: int
    # Offset just past the last good batch, and the log's size.
    end: int
    size: int
    pending_bytes: int
    corrupt_at: int | None
    reason: str


def data_start(log: str | int) -> int:
    """Offset of a log's first entry, after checking its header.

    ``log`` is a path or a descriptor open for reading; a descriptor is
    read with pread, so its file offset does not move.  Raises
    CorruptLog when the header is damaged.
    """
    if isinstance(log, int):
        _, pos = _logfile._read_header(_PreadFile(log), f"fd {log}")
        return pos
    with open(log, "rb") as f:
        _, pos = _logfile._read_header(f, log)

    return pos


class _PreadFile:
    """Sequential reads of a descriptor from offset 0, with pread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pos = 0

    def read(self, n: int) -> bytes:
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)

        return data


class MergeProgress:
    """How far a running merge is, and a way to stop it, from any thread.

    Pass one to ``merge()``, then read ``phase`` ("scan", "spill",
    "apply", or "" before the start), ``done`` and ``total`` from another
    thread while the merge runs; ``cancel()`` stops the merge, which then
    raises OSError(ECANCELED).

    With ``report``, ``merge()`` itself calls ``report(phase, done,
    total)`` every ``every`` seconds and once at the end, in the thread
    that called ``merge()``, while the engine runs in a helper thread.  A
    true return value cancels the merge; an exception cancels it and is
    raised again by ``merge()``, even if the merge had ended.
    """

    def __init__(
        self, report: Progress | None = None, every: float = _REPORT_EVERY
    ) -> None:
        self.report = report
        self.every = every
        self.error: BaseException | None = None
        self.c_progress = _ffi.new("struct cow_merge_progress *")

    @property
    def phase(self) -> str:
        return _PHASES.get(self.c_progress.phase, "")

    @property
    def done(self) -> int:
        return self.c_progress.done

    @property
    def total(self) -> int:
        return self.c_progress.total

    @property
    def cancelled(self) -> bool:
        return bool(self.c_progress.cancel)

    def cancel(self) -> None:
        self.c_progress.cancel = 1

    def run(self, call: Callable[[], int]) -> int:
        """Run call (the engine) here, or in a helper thread to report."""
        if self.report is None:
            return call()
        outcome: list[int] = []
        failure: list[BaseException] = []

        def work() -> None:
            try:
                outcome.append(call())
            except BaseException as exc:
                failure.append(exc)

        worker = threading.Thread(target=work, name="cowd-merge", daemon=True)
        worker.start()
        running = True
        while running:
            worker.join(self.every)
            running = worker.is_alive()
            self._report()
        if failure:
            raise failure[0]

        return outcome[0]

    def _report(self) -> None:
        if self.report is None or self.error is not None:
            return
        try:
            if self.report(self.phase, self.done, self.total):
                self.cancel()
        except BaseException as exc:
            self.error = exc
            self.cancel()


def merge(
    logs: list[LogInput],
    base_fd: int,
    out_fd: int,
    spill_fd: int,
    policy: str = "fail",
    *,
    window: int = DEFAULT_WINDOW,
    max_conflicts: int = 1000,
    progress: MergeProgress | None = None,
    write_back: bool = True,
) -> MergeResult:
    """Merge ``logs`` onto a copy of the base into ``out_fd``.

    ``spill_fd`` is a scratch file, read and written; ``policy`` is
    "fail", "last" or "first"; ``window`` the size of the slices of the
    output the engine works on (its buffers are about six times that).
    At most ``max_conflicts`` conflict ranges are listed; all are
    counted.  See MergeProgress for ``progress``.  With ``write_back``
    the output is handed to the kernel's writeback as it is done, so
    that syncing it after has little left to wait for.

    Raises Conflict (policy "fail" and sessions conflict), CorruptLog (a
    log fails its checks; nothing was written), InvalidArgument or
    OSError.  The output is complete only when this returns, and it is
    neither synced nor renamed.
    """
    _check_arguments(policy, window, max_conflicts)
    names = list(dict.fromkeys(log.session for log in logs))
    c_logs = _c_logs(logs, {name: k for k, name in enumerate(names)})
    conflicts = _ffi.new("struct cow_merge_conflict[]", max(max_conflicts, 1))
    stats = _ffi.new("struct cow_merge_stats *")
    progress = progress or MergeProgress()

    def call() -> int:
        return _engine().cow_merge(
            c_logs,
            len(logs),
            base_fd,
            out_fd,
            spill_fd,
            POLICIES.index(policy),
            _WRITE_BACK if write_back else 0,
            window,
            conflicts,
            max_conflicts,
            stats,
            progress.c_progress,
        )

    rc = progress.run(call)
    listed = _conflict_list(conflicts, stats.conflicts_stored, names)
    _raise_for(rc, logs, stats, listed, progress)

    return _result(stats, listed, logs, c_logs)


def _check_arguments(policy: str, window: int, max_conflicts: int) -> None:
    if policy not in POLICIES:
        raise InvalidArgument(f"on-conflict must be one of {', '.join(POLICIES)}")
    if not 0 < window <= MAX_WINDOW:
        raise InvalidArgument(f"the window must be 1 to {MAX_WINDOW} bytes")
    if max_conflicts < 0:
        raise InvalidArgument("max_conflicts must not be negative")


def _c_logs(logs: list[LogInput], numbers: dict[str, int]) -> Any:
    c_logs = _ffi.new("struct cow_merge_log[]", max(len(logs), 1))
    for c_log, log in zip(c_logs, logs, strict=False):
        c_log.fd = log.fd
        c_log.session = numbers[log.session]
        c_log.data_start = log.data_start
        c_log.min_seq = log.min_seq

    return c_logs


def _conflict_list(
    conflicts: Any, count: int, names: list[str]
) -> list[dict[str, Any]]:
    listed = [
        {
            "start": c.start,
            "end": c.end,
            "sessions": sorted([names[c.session_a], names[c.session_b]]),
        }
        for c in conflicts[0:count]
    ]
    listed.sort(key=lambda c: (c["start"], c["end"], c["sessions"]))

    return listed


def _raise_for(
    rc: int,
    logs: list[LogInput],
    stats: Any,
    listed: list[dict[str, Any]],
    progress: MergeProgress,
) -> None:
    if progress.error is not None:
        raise progress.error
    if rc == 0:
        return
    if rc == _CONFLICT:
        raise Conflict(
            _describe(listed, stats.nconflicts, stats.conflict_bytes),
            conflicts=listed,
            conflict_ranges=stats.nconflicts,
            conflict_bytes=stats.conflict_bytes,
        )
    if rc == _CORRUPT:
        log = logs[stats.corrupt_log]
        path = log.path or f"log {stats.corrupt_log}"
        reason = _ffi.string(stats.corrupt_reason).decode(errors="replace")
        offset = stats.corrupt_offset
        raise CorruptLog(f"{path}: {reason} at byte {offset}", path=path, offset=offset)
    raise OSError(-rc, os.strerror(-rc))


def _describe(listed: list[dict[str, Any]], total: int, nbytes: int) -> str:
    shown = ", ".join(
        f"{c['start']}-{c['end']} ({' vs '.join(c['sessions'])})"
        for c in listed[:_SHOWN_CONFLICTS]
    )
    more = total - min(len(listed), _SHOWN_CONFLICTS)
    tail = f" and {more} more" if more > 0 else ""
    noun = "range" if total == 1 else "ranges"

    return f"{total} conflicting {noun} ({nbytes} bytes): {shown}{tail}"


def _result(
    stats: Any, listed: list[dict[str, Any]], logs: list[LogInput], c_logs: Any
) -> MergeResult:
    return MergeResult(
        batches=stats.batches,
        records=stats.records,
        bytes_applied=stats.bytes_applied,
        out_size=stats.out_size,
        cloned=bool(stats.cloned),
        windows=stats.windows,
        windows_touched=stats.windows_touched,
        spill_bytes=stats.spill_bytes,
        groups=stats.groups,
        conflict_bytes=stats.conflict_bytes,
        conflict_ranges=stats.nconflicts,
        conflicts=listed,
        conflicts_truncated=bool(stats.conflicts_truncated),
        peak_buffer_bytes=stats.peak_buffer_bytes,
        logs=[
            LogOutcome(
                path=log.path,
                last_seq=c.last_seq,
                applied_end=c.applied_end,
                batches=c.batches,
                records=c.records,
                pending_bytes=c.pending_bytes,
            )
            for log, c in zip(logs, c_logs, strict=False)
        ],
    )


def verify(log: str | int, start: int | None = None) -> VerifyResult:
    """Walk a log as a merge would, batch by batch.

    ``log`` is a path or a descriptor open for reading; ``start`` is the
    offset of its first entry, read from the header when not given.
    Raises CorruptLog when the header is damaged, OSError when the log
    cannot be read; damage further in is described in the result.
    """
    if isinstance(log, int):
        return _verify_fd(log, data_start(log) if start is None else start)
    fd = os.open(log, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _verify_fd(fd, data_start(fd) if start is None else start)
    finally:
        os.close(fd)


def _verify_fd(fd: int, start: int) -> VerifyResult:
    batches: list[VerifiedBatch] = []
    records = 0
    for found, array in _verify_steps(fd, start):
        batches.extend(
            VerifiedBatch(b.seq, b.start, b.end, b.records, b.bytes)
            for b in array[0 : found.batches]
        )
        records += found.records
    status = _ENDS[found.status]

    return VerifyResult(
        status=status,
        batches=batches,
        records=records,
        end=found.end,
        size=found.size,
        pending_bytes=found.pending_bytes,
        corrupt_at=found.corrupt_offset if status == "corrupt" else None,
        reason=_ffi.string(found.reason).decode(errors="replace"),
    )


def _verify_steps(fd: int, start: int) -> Iterator[tuple[Any, Any]]:
    """Call the engine's verify until the log ends, a batch array a time."""
    lib = _engine()
    array = _ffi.new("struct cow_merge_batch[]", _VERIFY_STEP)
    after = _ffi.NULL
    while True:
        found = _ffi.new("struct cow_merge_verify_result *")
        rc = lib.cow_merge_verify(fd, start, after, array, _VERIFY_STEP, found)
        if rc != 0:
            raise OSError(-rc, os.strerror(-rc))
        yield found, array
        if found.status != _MORE:
            return
        start = found.end
        after = _ffi.new("uint64_t *", found.last_seq)


def crc32c(
    data: bytes | bytearray | memoryview, value: int = 0, *, portable=False
) -> int:
    """The engine's CRC-32C of data continued from value, for checks.

    ``portable`` picks the table-driven implementation even where the
    processor's crc32 instruction is available.
    """
    lib = _engine()
    function = lib.cow_merge_crc32c_portable if portable else lib.cow_merge_crc32c
    view = memoryview(data).cast("B")

    return function(value, _ffi.from_buffer(view), len(view))
