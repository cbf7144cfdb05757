"""The on-disk log: one per session and base file, append-only.

Layout (all integers little-endian)::

    header   magic "cowdlog\\0" (8) | version u16 | meta_len u32 |
             meta (msgpack map, meta_len bytes) | crc32c u32
    record   "R" | offset u64 | length u32 | data (length bytes)
    commit   "C" | seq u64 | count u32 | crc32c u32

The header's crc covers everything before it.  A batch is the records
since the previous commit marker (or the header), closed by a commit
marker whose crc covers the batch's records, headers and data alike,
followed by the marker's own tag, seq and count.  ``seq`` is the global
commit sequence number cowd stamped on the batch; ``count`` is the
number of records.

Records of a batch that has no commit marker yet are an open or torn
batch: they are never applied.  A marker whose crc does not match, an
unknown tag or a record that cannot be parsed makes the log corrupt
from that batch's first byte on; the reader reports the offset and
stops there, since nothing after a corrupt length can be trusted.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

import crc32c
import msgpack

from cowd.durable import fsync_dir, write_all
from cowd.protocol import CorruptLog

MAGIC = b"cowdlog\0"
VERSION = 1

_HEADER = struct.Struct("<8sHI")
_CRC = struct.Struct("<I")
_RECORD = struct.Struct("<cQI")
_COMMIT = struct.Struct("<cQI")

# The header's metadata is a few short strings and integers; anything
# larger is damage, not a header.
MAX_META = 64 * 1024


@dataclass
class Record:
    offset: int
    data: bytes


@dataclass
class Batch:
    seq: int
    start: int
    end: int
    records: list[Record] = field(default_factory=list)


@dataclass
class Scan:
    """What a full read of a log found."""

    meta: dict[str, Any]
    batches: list[Batch]
    # Byte offset where unreadable data starts, with the reason, or None.
    corrupt_at: int | None = None
    corrupt_reason: str = ""
    # Bytes of an open or torn batch at the end of the log.
    pending_bytes: int = 0


def encode_header(meta: dict[str, Any]) -> bytes:
    blob = msgpack.packb(meta, use_bin_type=True)
    head = _HEADER.pack(MAGIC, VERSION, len(blob)) + blob

    return head + _CRC.pack(crc32c.crc32c(head))


def encode_record(offset: int, data: bytes) -> bytes:
    return _RECORD.pack(b"R", offset, len(data)) + data


def encode_commit(seq: int, count: int, crc: int) -> bytes:
    body = _COMMIT.pack(b"C", seq, count)

    return body + _CRC.pack(crc32c.crc32c(body, crc))


class LogWriter:
    """Appends batches to one log file; used by the daemon only.

    Records of the open batch are written as they arrive, so a large
    batch never sits in memory; the commit marker is what makes them
    count.  ``commit()`` returns once the batch is on disk.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._crc = 0
        self._count = 0

    @classmethod
    def create(cls, path: str, meta: dict[str, Any]) -> LogWriter:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, encode_header(meta))
            os.fsync(fd)
            fsync_dir(os.path.dirname(path))
        except BaseException:
            os.close(fd)
            raise

        return cls(fd)

    @property
    def pending(self) -> int:
        return self._count

    def append(self, records: list[tuple[int, bytes]]) -> None:
        chunk = b"".join(encode_record(off, data) for off, data in records)
        write_all(self._fd, chunk)
        self._crc = crc32c.crc32c(chunk, self._crc)
        self._count += len(records)

    def commit(self, seq: int, *, sync: bool = True) -> None:
        write_all(self._fd, encode_commit(seq, self._count, self._crc))
        if sync:
            os.fsync(self._fd)
        self._crc = 0
        self._count = 0

    def close(self) -> None:
        os.close(self._fd)


def read_meta(path: str) -> dict[str, Any]:
    """Read and check just the header of a log."""
    with open(path, "rb") as f:
        meta, _ = _read_header(f, path)

    return meta


def scan(path: str) -> Scan:
    """Read a whole log, checking every batch.

    Raises CorruptLog only when the header itself is unreadable; damage
    further in is reported in the result, with its offset, and the
    batches before it are returned.
    """
    with open(path, "rb") as f:
        meta, pos = _read_header(f, path)
        result = Scan(meta=meta, batches=[])
        reader = _Reader(f, pos)
        _scan_batches(reader, result)

    return result


def _scan_batches(reader: _Reader, result: Scan) -> None:
    while True:
        start = reader.pos
        records: list[Record] = []
        crc = 0
        while True:
            tag = reader.read(1)
            if not tag:
                result.pending_bytes = reader.pos - start
                return
            if tag == b"R":
                head = reader.read(_RECORD.size - 1)
                if len(head) < _RECORD.size - 1:
                    result.pending_bytes = reader.pos - start
                    return
                offset, length = struct.unpack("<QI", head)
                data = reader.read(length)
                if len(data) < length:
                    result.pending_bytes = reader.pos - start
                    return
                crc = crc32c.crc32c(tag + head + data, crc)
                records.append(Record(offset, data))
            elif tag == b"C":
                tail = reader.read(_COMMIT.size - 1 + _CRC.size)
                if len(tail) < _COMMIT.size - 1 + _CRC.size:
                    result.pending_bytes = reader.pos - start
                    return
                seq, count, stored = struct.unpack("<QII", tail)
                crc = crc32c.crc32c(tag + tail[:-4], crc)
                if crc != stored or count != len(records):
                    _mark_corrupt(result, start, "batch checksum mismatch")
                    return
                if result.batches and seq <= result.batches[-1].seq:
                    # cowd stamps a log's batches in increasing order, as
                    # the merge engine also insists.
                    _mark_corrupt(result, start, "commit sequence not increasing")
                    return
                result.batches.append(Batch(seq, start, reader.pos, records))
                break
            else:
                _mark_corrupt(result, start, f"unknown entry tag {tag!r}")
                return


def _mark_corrupt(result: Scan, offset: int, reason: str) -> None:
    result.corrupt_at = offset
    result.corrupt_reason = reason


def _read_header(f: Any, path: str) -> tuple[dict[str, Any], int]:
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise CorruptLog(f"{path}: truncated header", path=path, offset=0)
    magic, version, meta_len = _HEADER.unpack(head)
    if magic != MAGIC:
        raise CorruptLog(f"{path}: not a cowd log", path=path, offset=0)
    if version != VERSION:
        raise CorruptLog(
            f"{path}: log format version {version} is not supported",
            path=path,
            offset=8,
        )
    if meta_len > MAX_META:
        raise CorruptLog(f"{path}: header too large", path=path, offset=10)
    blob = f.read(meta_len)
    stored = f.read(_CRC.size)
    if len(blob) < meta_len or len(stored) < _CRC.size:
        raise CorruptLog(f"{path}: truncated header", path=path, offset=0)
    if _CRC.unpack(stored)[0] != crc32c.crc32c(head + blob):
        raise CorruptLog(f"{path}: header checksum mismatch", path=path, offset=0)
    meta = msgpack.unpackb(blob, raw=False)
    if not isinstance(meta, dict):
        raise CorruptLog(f"{path}: header is not a map", path=path, offset=14)

    return meta, _HEADER.size + meta_len + _CRC.size


class _Reader:
    """Buffered reads that keep track of the file position."""

    def __init__(self, f: Any, pos: int) -> None:
        self._f = f
        self.pos = pos

    def read(self, n: int) -> bytes:
        data = self._f.read(n)
        self.pos += len(data)

        return data
