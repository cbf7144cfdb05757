"""The merge engine's interface to the daemon: logs in, one file out.

``merge()`` copies the base into the output and applies every committed
batch of the given logs whose sequence number is above the log's
``min_seq``, in commit order, with the conflict policy, using the C
engine (native/merge.c, through ``_mergelib``).  It raises Conflict or
CorruptLog, and then what it wrote is of no use.  Its memory does not
grow with the logs: records are spilled to a temporary file in the
state folder, grouped by window of the output.  With ``write_back`` the
output is handed to the kernel's writeback as it is done.  The caller
owns syncing, renaming and manifests.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from cowd import _mergelib

# How conflicting writes are resolved: refuse the merge, or keep the
# later or the earlier writer's bytes.
POLICIES = ("fail", "last", "first")

# How often a running merge reports progress, in seconds.  Crash tests
# shorten it so that the reports, which are crash points, fall all
# along the merge.
_REPORT_EVERY = float(os.environ.get("COWD_TEST_REPORT_EVERY", "0.1"))


@dataclass
class LogInput:
    path: str
    session: str
    min_seq: int = 0
    # Where to start reading, past batches known to be applied already;
    # from the first batch when None.
    start: int | None = None


@dataclass
class Result:
    batches: int = 0
    records: int = 0
    bytes: int = 0
    # Per log path, the highest sequence number applied from it, and
    # where that batch ends in the log.
    last_seq: dict[str, int] = field(default_factory=dict)
    ends: dict[str, int] = field(default_factory=dict)


def merge(
    logs: list[LogInput],
    source_fd: int,
    out_fd: int,
    policy: str,
    progress: Callable[[str, int, int], None],
    spill_dir: str,
    write_back: bool = True,
) -> Result:
    opened: list[int] = []
    try:
        inputs = []
        for log in logs:
            fd = os.open(log.path, os.O_RDONLY | os.O_CLOEXEC)
            opened.append(fd)
            # The header is checked whatever the start.
            start = _mergelib.data_start(fd)
            inputs.append(
                _mergelib.LogInput(
                    fd=fd,
                    session=log.session,
                    data_start=max(start, log.start or 0),
                    min_seq=log.min_seq,
                    path=log.path,
                )
            )
        with tempfile.TemporaryFile(dir=spill_dir) as spill:
            merged = _mergelib.merge(
                inputs,
                source_fd,
                out_fd,
                spill.fileno(),
                policy,
                progress=_mergelib.MergeProgress(progress, every=_REPORT_EVERY),
                write_back=write_back,
            )
    finally:
        for fd in opened:
            os.close(fd)

    return Result(
        batches=merged.batches,
        records=merged.records,
        bytes=merged.bytes_applied,
        last_seq={o.path: o.last_seq for o in merged.logs if o.batches},
        ends={o.path: o.applied_end for o in merged.logs if o.batches},
    )
