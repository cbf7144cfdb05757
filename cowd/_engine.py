"""The merge engine's interface: logs in, one merged file out.

``merge()`` copies the base into the output and applies every committed
batch of the given logs whose sequence number is above the log's
``min_seq``, in commit order, with the conflict policy; it raises
Conflict or CorruptLog and writes nothing useful then.  The caller owns
syncing, renaming and manifests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cowd import _logfile, _merge
from cowd.protocol import CorruptLog

# How conflicting writes are resolved: refuse the merge, or keep the
# later or the earlier writer's bytes.
POLICIES = ("fail", "last", "first")


@dataclass
class LogInput:
    path: str
    session: str
    min_seq: int = 0


@dataclass
class Result:
    batches: int = 0
    records: int = 0
    bytes: int = 0
    # Per log path, the highest sequence number applied from it.
    last_seq: dict[str, int] = field(default_factory=dict)


def merge(
    logs: list[LogInput],
    source_fd: int,
    out_fd: int,
    policy: str,
    progress: Callable[[str, int, int], None],
) -> Result:
    result = Result()
    overlays = []
    for done, log in enumerate(logs):
        found = _logfile.scan(log.path)
        if found.corrupt_at is not None:
            raise CorruptLog(
                f"{log.path}: {found.corrupt_reason} at byte {found.corrupt_at}",
                path=log.path,
                offset=found.corrupt_at,
            )
        batches = [b for b in found.batches if b.seq > log.min_seq]
        if batches:
            result.last_seq[log.path] = batches[-1].seq
        result.batches += len(batches)
        result.records += sum(len(b.records) for b in batches)
        overlays.append(_merge.replay(log.session, batches))
        progress("scan", done + 1, len(logs))
    segments = _merge.plan(overlays, policy)
    result.bytes = _merge.write_output(source_fd, out_fd, segments)
    progress("apply", 1, 1)

    return result
