"""Small helpers for writing files that survive a crash.

Shared by the daemon and the client library, which both place files
with a write, an fsync and a rename.
"""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make a rename or a new name in folder ``path`` durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
