"""The log format: round trips, torn tails and corruption."""

from __future__ import annotations

import random

import pytest

from cowd import _logfile
from cowd._logfile import LogWriter
from cowd.protocol import CorruptLog

META = {"file": "/data/base", "dev": 1, "ino": 2, "size": 100, "session": "s"}


def write_log(path, batches, open_batch=None):
    writer = LogWriter.create(str(path), META)
    for seq, records in batches:
        writer.append(records)
        writer.commit(seq)
    if open_batch:
        writer.append(open_batch)
    writer.close()


def test_round_trip_keeps_binary_data_exactly(tmp_path):
    path = tmp_path / "a.log"
    data = bytes(range(256)) + b"\n\0\nend"
    write_log(path, [(7, [(0, data), (4096, b"\0")]), (9, [(3, b"\n")])])

    found = _logfile.scan(str(path))

    assert found.meta == META
    assert [b.seq for b in found.batches] == [7, 9]
    assert [(r.offset, r.data) for r in found.batches[0].records] == [
        (0, data),
        (4096, b"\0"),
    ]
    assert found.corrupt_at is None and found.pending_bytes == 0


def test_open_batch_at_the_end_is_pending_not_applied(tmp_path):
    path = tmp_path / "a.log"
    write_log(path, [(1, [(0, b"ok")])], open_batch=[(5, b"torn")])

    found = _logfile.scan(str(path))

    assert [b.seq for b in found.batches] == [1]
    assert found.pending_bytes > 0
    assert found.corrupt_at is None


def test_every_truncation_yields_only_whole_batches(tmp_path):
    path = tmp_path / "a.log"
    write_log(path, [(1, [(0, b"first")]), (2, [(9, b"second"), (20, b"x")])])
    full = path.read_bytes()
    header_end = len(_logfile.encode_header(META))

    for cut in range(header_end, len(full)):
        path.write_bytes(full[:cut])
        found = _logfile.scan(str(path))
        assert found.corrupt_at is None
        for batch in found.batches:
            assert batch.end <= cut
        assert found.pending_bytes == cut - (
            found.batches[-1].end if found.batches else header_end
        )


def test_every_flipped_byte_is_detected(tmp_path):
    path = tmp_path / "a.log"
    write_log(path, [(1, [(0, b"first\n")]), (2, [(9, b"sec\0nd"), (20, b"x")])])
    full = path.read_bytes()
    good = [(b.seq, b.records) for b in _logfile.scan(str(path)).batches]
    rng = random.Random(4)

    for pos in range(len(full)):
        damaged = bytearray(full)
        damaged[pos] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(damaged))
        try:
            found = _logfile.scan(str(path))
        except CorruptLog:
            continue
        # Whatever survives the damage must be exactly a prefix of the
        # good batches; the damaged batch itself never comes back.
        got = [(b.seq, b.records) for b in found.batches]
        assert got == good[: len(got)]
        assert len(got) < len(good)


def test_header_damage_is_reported_with_the_path(tmp_path):
    path = tmp_path / "a.log"
    write_log(path, [])
    raw = bytearray(path.read_bytes())
    raw[12] ^= 0xFF
    path.write_bytes(bytes(raw))

    with pytest.raises(CorruptLog, match=str(path)):
        _logfile.read_meta(str(path))


def test_a_batch_stamped_out_of_order_is_corrupt(tmp_path):
    path = tmp_path / "a.log"
    write_log(path, [(5, [(0, b"five")]), (3, [(0, b"three")])])

    found = _logfile.scan(str(path))

    assert [b.seq for b in found.batches] == [5]
    assert found.corrupt_reason == "commit sequence not increasing"
    assert found.corrupt_at == found.batches[0].end
