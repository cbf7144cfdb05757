"""Merging logs into a new version of a base file.

A merge never writes the base.  It plans first: each session's batches
are replayed in commit order into an overlay, the bytes that session
leaves behind, so a session overwriting its own earlier bytes is never
a conflict.  Overlays of different sessions that cover the same byte
with different values conflict.  By default a conflict fails the merge
and nothing is written; ``last`` and ``first`` resolve each conflicting
byte in favour of the session whose final write to it committed last
or first.  Only then is the output written: the base is copied, the
overlays applied and the result synced, all into a file the caller
renames into place.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from dataclasses import dataclass

from cowd._logfile import Batch
from cowd.durable import pwrite_all
from cowd.protocol import Conflict, InvalidArgument

POLICIES = ("fail", "last", "first")

# How many conflicting ranges an error message spells out; the full
# list travels in the error's data.
_SHOWN_CONFLICTS = 5


@dataclass
class Segment:
    start: int
    data: bytes
    seq: int
    session: str = ""

    @property
    def end(self) -> int:
        return self.start + len(self.data)


@dataclass
class ConflictRange:
    start: int
    end: int
    sessions: set[str]

    def to_wire(self) -> dict:
        return {
            "start": self.start,
            "end": self.end,
            "sessions": sorted(self.sessions),
        }


class Overlay:
    """The bytes a sequence of writes leaves, as disjoint sorted segments."""

    def __init__(self, session: str = "") -> None:
        self.session = session
        self._starts: list[int] = []
        self._segments: list[Segment] = []

    def write(self, offset: int, data: bytes, seq: int) -> None:
        if not data:
            return
        end = offset + len(data)
        lo = bisect.bisect_right(self._starts, offset) - 1
        if lo < 0 or self._segments[lo].end <= offset:
            lo += 1
        hi = bisect.bisect_left(self._starts, end, lo)

        pieces = []
        if lo < hi and self._segments[lo].start < offset:
            first = self._segments[lo]
            pieces.append(self._piece(first, first.start, offset))
        pieces.append(Segment(offset, bytes(data), seq, self.session))
        if lo < hi and self._segments[hi - 1].end > end:
            last = self._segments[hi - 1]
            pieces.append(self._piece(last, end, last.end))

        self._segments[lo:hi] = pieces
        self._starts[lo:hi] = [p.start for p in pieces]

    def segments(self) -> list[Segment]:
        return list(self._segments)

    @staticmethod
    def _piece(seg: Segment, start: int, end: int) -> Segment:
        data = seg.data[start - seg.start : end - seg.start]

        return Segment(start, data, seg.seq, seg.session)


def replay(session: str, batches: Iterable[Batch]) -> Overlay:
    """Apply one session's batches, in commit order, to an overlay."""
    overlay = Overlay(session)
    for batch in sorted(batches, key=lambda b: b.seq):
        for record in batch.records:
            overlay.write(record.offset, record.data, batch.seq)

    return overlay


def find_conflicts(overlays: Iterable[Overlay]) -> list[ConflictRange]:
    """Ranges where two sessions leave different bytes."""
    segments = sorted(
        (seg for overlay in overlays for seg in overlay.segments()),
        key=lambda s: s.start,
    )
    found: list[ConflictRange] = []
    active: list[Segment] = []
    for seg in segments:
        active = [a for a in active if a.end > seg.start]
        for other in active:
            if other.session != seg.session:
                found.extend(_differences(other, seg))
        active.append(seg)

    return _coalesce(found)


def _differences(a: Segment, b: Segment) -> list[ConflictRange]:
    start, end = max(a.start, b.start), min(a.end, b.end)
    left = a.data[start - a.start : end - a.start]
    right = b.data[start - b.start : end - b.start]
    if left == right:
        return []
    ranges = []
    run = None
    for i in range(end - start):
        if left[i] != right[i]:
            if run is None:
                run = i
        elif run is not None:
            ranges.append((run, i))
            run = None
    if run is not None:
        ranges.append((run, end - start))
    sessions = {a.session, b.session}

    return [ConflictRange(start + s, start + e, set(sessions)) for s, e in ranges]


def _coalesce(ranges: list[ConflictRange]) -> list[ConflictRange]:
    merged: list[ConflictRange] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if merged and r.start <= merged[-1].end:
            merged[-1].end = max(merged[-1].end, r.end)
            merged[-1].sessions |= r.sessions
        else:
            merged.append(ConflictRange(r.start, r.end, set(r.sessions)))

    return merged


def plan(overlays: list[Overlay], policy: str) -> list[Segment]:
    """Order the segments to write, or raise Conflict under ``fail``."""
    if policy not in POLICIES:
        raise InvalidArgument(f"on-conflict must be one of {', '.join(POLICIES)}")
    conflicts = find_conflicts(overlays)
    if conflicts and policy == "fail":
        raise Conflict(
            _describe(conflicts),
            conflicts=[c.to_wire() for c in conflicts],
        )
    segments = [seg for overlay in overlays for seg in overlay.segments()]
    # Applying in ascending commit order lets the last writer of each
    # byte win; descending lets the first.  Where sessions agree the
    # order does not matter.
    segments.sort(key=lambda s: s.seq, reverse=policy == "first")

    return segments


def _describe(conflicts: list[ConflictRange]) -> str:
    shown = ", ".join(
        f"{c.start}-{c.end} ({' vs '.join(sorted(c.sessions))})"
        for c in conflicts[:_SHOWN_CONFLICTS]
    )
    more = len(conflicts) - _SHOWN_CONFLICTS
    tail = f" and {more} more" if more > 0 else ""
    noun = "range" if len(conflicts) == 1 else "ranges"

    return f"{len(conflicts)} conflicting {noun}: {shown}{tail}"


def write_output(source_fd: int, out_fd: int, segments: list[Segment]) -> int:
    """Copy the base into out_fd, apply segments, sync; return bytes applied."""
    os.ftruncate(out_fd, 0)
    _copy_file(source_fd, out_fd, os.fstat(source_fd).st_size)
    applied = 0
    for seg in segments:
        pwrite_all(out_fd, seg.data, seg.start)
        applied += len(seg.data)
    os.fsync(out_fd)

    return applied


def _copy_file(src: int, dst: int, size: int) -> None:
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done, done, done)
            if n == 0:
                break
            done += n
    except OSError:
        # Some file systems and kernels refuse copy_file_range between
        # the two files; fall back to plain reads and writes.
        pass
    while done < size:
        chunk = os.pread(src, min(1 << 20, size - done), done)
        if not chunk:
            break
        pwrite_all(dst, chunk, done)
        done += len(chunk)
