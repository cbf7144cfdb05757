"""The C merge engine (libcowmerge) against a byte-by-byte model.

Logs are real files written with the daemon's LogWriter; the engine
merges them through cowd._mergelib, and the result is compared with a
direct Python rendering of the merge rules documented in native/merge.c:
batches in commit order, per byte an owner and a value, a conflict when
a session writes a different value over another session's byte.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowd import _logfile, _mergelib
from cowd._logfile import LogWriter
from cowd._mergelib import LogInput
from cowd.protocol import Conflict, CorruptLog

META = {"file": "/data/base", "dev": 1, "ino": 2, "size": 0, "mtime_ns": 0}


@dataclass
class ModelLog:
    """A log to write: who wrote it and its batches (seq, records)."""

    session: str
    batches: list[tuple[int, list[tuple[int, bytes]]]]
    min_seq: int = 0
    open_batch: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass
class Expected:
    output: bytes
    conflicts: list[dict]
    conflict_bytes: int


def model_merge(base: bytes, logs: list[ModelLog], policy: str) -> Expected:
    """The merge rules, one byte at a time."""
    order = sorted(
        (seq, k, records)
        for k, log in enumerate(logs)
        for seq, records in log.batches
        if seq > log.min_seq
    )
    ends = [off + len(data) for _, _, recs in order for off, data in recs if data]
    out = bytearray(base.ljust(max([len(base), *ends]), b"\0"))
    owner: dict[int, str] = {}
    hits: set[tuple[int, str, str]] = set()
    for _, k, records in order:
        writer = logs[k].session
        for off, data in records:
            for i, value in enumerate(data):
                _apply_byte(out, owner, hits, off + i, value, writer, policy)

    return Expected(bytes(out), _ranges(hits), len({pos for pos, _, _ in hits}))


def _apply_byte(out, owner, hits, pos, value, writer, policy) -> None:
    held = owner.get(pos)
    if held is None or held == writer or out[pos] == value:
        out[pos] = value
        owner[pos] = writer
        return
    hits.add((pos, *sorted((held, writer))))
    if policy != "first":
        out[pos] = value
        owner[pos] = writer


def _ranges(hits: set[tuple[int, str, str]]) -> list[dict]:
    ranges = []
    for pos, a, b in sorted(hits, key=lambda h: (h[1], h[2], h[0])):
        last = ranges[-1] if ranges else None
        if last and last["sessions"] == [a, b] and last["end"] == pos:
            last["end"] = pos + 1
        else:
            ranges.append({"start": pos, "end": pos + 1, "sessions": [a, b]})

    return sorted(ranges, key=lambda c: (c["start"], c["end"], c["sessions"]))


def write_log(path: Path, log: ModelLog) -> None:
    writer = LogWriter.create(str(path), {**META, "session": log.session})
    for seq, records in log.batches:
        writer.append(records)
        writer.commit(seq, sync=False)
    if log.open_batch:
        writer.append(log.open_batch)
    writer.close()


class Files:
    """A base, logs, an output and a spill file in one folder."""

    def __init__(self, folder: Path, base: bytes, logs: list[ModelLog]) -> None:
        self.folder = folder
        self.base_path = folder / "base"
        self.base_path.write_bytes(base)
        self.log_paths = []
        for k, log in enumerate(logs):
            path = folder / f"{k}.log"
            write_log(path, log)
            self.log_paths.append(path)
        self.logs = logs

    def merge(
        self, policy: str = "last", start_at: list[int] | None = None, **kw
    ) -> tuple[_mergelib.MergeResult, bytes]:
        """Merge the logs, each from its header or from start_at."""
        fds = []
        try:
            inputs = []
            for k, path in enumerate(self.log_paths):
                log = self.logs[k]
                fds.append(os.open(path, os.O_RDONLY))
                start = _mergelib.data_start(str(path))
                if start_at is not None:
                    start = start_at[k]
                inputs.append(
                    LogInput(fds[-1], log.session, start, log.min_seq, str(path))
                )
            base = os.open(self.base_path, os.O_RDONLY)
            fds.append(base)
            out = os.open(self.folder / "out", os.O_RDWR | os.O_CREAT, 0o600)
            fds.append(out)
            spill = os.open(self.folder, os.O_RDWR | os.O_TMPFILE, 0o600)
            fds.append(spill)
            result = _mergelib.merge(inputs, base, out, spill, policy, **kw)
            return result, (self.folder / "out").read_bytes()
        finally:
            for fd in fds:
                os.close(fd)


# -- the property: engine == model --------------------------------------

_bytes = st.one_of(
    st.binary(max_size=80),
    st.lists(st.sampled_from(b"\n\0ab"), max_size=80).map(bytes),
)


@st.composite
def _base(draw, spread):
    if spread < 1000:
        return draw(st.binary(max_size=300))
    size = draw(st.integers(0, spread // 2))

    return random.Random(draw(st.integers(0, 9))).randbytes(size)


@st.composite
def merges(draw):
    # Small spreads pack writes together, so they overlap; wide ones
    # scatter them over several blocks of a window and several windows.
    spread = draw(st.sampled_from([400, 400, 30_000]))
    base = draw(_base(spread))
    batch = st.lists(st.tuples(st.integers(0, spread), _bytes), max_size=4)
    nlogs = draw(st.integers(1, 4))
    shapes = [draw(st.lists(batch, min_size=1, max_size=4)) for _ in range(nlogs)]
    total = sum(len(shape) for shape in shapes)
    seqs = draw(st.permutations(range(1, total + 1)))
    logs = []
    for shape in shapes:
        mine, seqs = sorted(seqs[: len(shape)]), seqs[len(shape) :]
        logs.append(
            ModelLog(
                session=draw(st.sampled_from(["s1", "s2", "s3"])),
                batches=list(zip(mine, shape, strict=True)),
                min_seq=draw(st.sampled_from([0, 0, 0, total // 2])),
                open_batch=draw(st.one_of(st.just([]), batch)),
            )
        )
    window = draw(st.sampled_from([1, 7, 64, 4096, 10_000, 1 << 20]))
    policy = draw(st.sampled_from(_mergelib.POLICIES))

    return base, logs, window, policy


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(merges())
def test_engine_matches_the_model_of_the_merge_rules(case):
    base, logs, window, policy = case
    expected = model_merge(base, logs, policy)

    with tempfile.TemporaryDirectory() as folder:
        files = Files(Path(folder), base, logs)
        if policy == "fail" and expected.conflicts:
            with pytest.raises(Conflict) as failed:
                files.merge(policy, window=window, max_conflicts=10_000)
            assert failed.value.data["conflicts"] == expected.conflicts
            assert failed.value.data["conflict_bytes"] == expected.conflict_bytes
            return
        result, output = files.merge(policy, window=window, max_conflicts=10_000)

    assert output == expected.output
    assert result.conflicts == expected.conflicts
    assert result.conflict_ranges == len(expected.conflicts)
    assert result.conflict_bytes == expected.conflict_bytes


# -- which batches apply --------------------------------------------------


def test_min_seq_skips_batches_merged_before(tmp_path):
    log = ModelLog(
        "s1", [(1, [(0, b"one")]), (4, [(4, b"four")]), (6, [(9, b"six")])], 4
    )
    files = Files(tmp_path, b"." * 16, [log])

    result, output = files.merge()

    assert output == b".........six...."
    outcome = result.logs[0]
    assert (outcome.last_seq, outcome.batches) == (6, 1)
    assert outcome.applied_end == files.log_paths[0].stat().st_size


def test_nothing_new_leaves_the_base_and_the_log_position(tmp_path):
    log = ModelLog("s1", [(1, [(0, b"one")]), (2, [(3, b"two")])], min_seq=2)
    files = Files(tmp_path, b"base", [log])

    result, output = files.merge()

    assert output == b"base"
    outcome = result.logs[0]
    assert outcome.last_seq == 2
    assert outcome.applied_end == _mergelib.data_start(str(files.log_paths[0]))


def test_a_later_merge_goes_on_from_where_the_last_one_stopped(tmp_path):
    log = ModelLog("s1", [(1, [(0, b"one")]), (2, [(4, b"two")])])
    files = Files(tmp_path, b"." * 12, [log])
    first, output = files.merge()
    fd = os.open(files.log_paths[0], os.O_WRONLY | os.O_APPEND)
    writer = LogWriter(fd)
    writer.append([(8, b"new"), (0, b"O")])
    writer.commit(7, sync=False)
    writer.close()
    (tmp_path / "base").write_bytes(output)
    outcome = first.logs[0]
    files.logs = [ModelLog("s1", [], min_seq=outcome.last_seq)]

    later, output = files.merge(start_at=[outcome.applied_end])

    assert output == b"One.two.new."
    assert (later.records, later.logs[0].last_seq) == (2, 7)


def test_torn_tail_is_reported_and_never_applied(tmp_path):
    log = ModelLog("s1", [(1, [(0, b"ok")])], open_batch=[(4, b"torn\n\0")])
    files = Files(tmp_path, b"........", [log])
    size = files.log_paths[0].stat().st_size

    result, output = files.merge()

    assert output == b"ok......"
    outcome = result.logs[0]
    assert outcome.pending_bytes == size - outcome.applied_end > 0


def test_records_past_the_base_end_extend_it_with_zeros(tmp_path):
    log = ModelLog("s1", [(1, [(10, b"far")])])
    files = Files(tmp_path, b"abc", [log])

    result, output = files.merge(window=4)

    assert output == b"abc" + b"\0" * 7 + b"far"
    assert result.out_size == 13


def test_logs_of_one_session_never_conflict_with_each_other(tmp_path):
    logs = [
        ModelLog("s1", [(1, [(0, b"aaaa")])]),
        ModelLog("s1", [(2, [(0, b"bb")])]),
    ]
    files = Files(tmp_path, b"....", logs)

    result, output = files.merge("fail")

    assert output == b"bbaa"
    assert result.conflict_bytes == 0


def test_sequence_going_backwards_in_a_log_is_refused(tmp_path):
    log = ModelLog("s1", [(5, [(0, b"a")]), (3, [(1, b"b")])])
    files = Files(tmp_path, b"..", [log])
    found = _logfile.scan(str(files.log_paths[0]))
    # The reader stops at the batch stamped out of order.
    assert found.corrupt_at == found.batches[0].end

    with pytest.raises(CorruptLog) as refused:
        files.merge()

    assert refused.value.data["offset"] == found.corrupt_at
    assert "commit sequence" in str(refused.value)


def test_empty_merge_copies_the_base(tmp_path):
    base = random.Random(1).randbytes(3 * 4096 + 5)
    files = Files(tmp_path, base, [])

    result, output = files.merge(window=4096)

    assert output == base
    assert result.windows == 4 and result.windows_touched == 0


# -- damage ---------------------------------------------------------------


def _damage_cases(tmp_path):
    logs = [
        ModelLog(
            "s1",
            [
                (1, [(0, b"first\n"), (20, b"\0x")]),
                (2, [(3, b"second")]),
                (3, []),
                (5, [(8, b"third"), (1, b"3")]),
            ],
        )
    ]
    files = Files(tmp_path, b"=" * 24, logs)
    found = _logfile.scan(str(files.log_paths[0]))

    return files, found.batches


def test_every_single_byte_flip_is_refused_or_never_applied(tmp_path):
    files, batches = _damage_cases(tmp_path)
    path = files.log_paths[0]
    good = path.read_bytes()
    start = _mergelib.data_start(str(path))
    flips = 0

    for pos in range(start, len(good)):
        damaged = next(k for k, b in enumerate(batches) if b.start <= pos < b.end)
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(good)
            bad[pos] ^= mask
            path.write_bytes(bad)
            _check_flip(files, batches, damaged)
            flips += 1

    assert flips == 3 * (len(good) - start)


def _check_flip(files, batches, damaged):
    survivors = ModelLog("s1", files.logs[0].batches[:damaged])
    expected = model_merge(b"=" * 24, [survivors], "last").output
    verified = _mergelib.verify(str(files.log_paths[0]))
    assert len(verified.batches) == damaged
    assert verified.end == batches[damaged].start
    try:
        result, output = files.merge()
    except CorruptLog as refused:
        assert refused.data["offset"] == batches[damaged].start
        assert verified.status == "corrupt"
        assert verified.corrupt_at == batches[damaged].start
        return
    assert verified.status == "torn"
    assert output == expected
    assert result.logs[0].batches == damaged
    assert result.logs[0].pending_bytes == verified.pending_bytes > 0


def test_verify_and_the_python_reader_agree_on_a_good_log(tmp_path):
    files, batches = _damage_cases(tmp_path)

    verified = _mergelib.verify(str(files.log_paths[0]))

    assert verified.status == "clean"
    assert [(b.seq, b.start, b.end) for b in verified.batches] == [
        (b.seq, b.start, b.end) for b in batches
    ]
    assert verified.records == sum(len(b.records) for b in batches)


def test_verify_lists_more_batches_than_one_call_returns(tmp_path):
    # The engine hands batches back 4096 at a time; the seq check must
    # hold across calls too, so batch 4097 going backwards is caught.
    seqs = [*range(1, 4097), 4000, 5000]
    log = ModelLog("s1", [(seq, [(seq % 7, b"x")]) for seq in seqs])
    files = Files(tmp_path, b"", [log])
    found = _logfile.scan(str(files.log_paths[0]))

    verified = _mergelib.verify(str(files.log_paths[0]))

    assert len(found.batches) == len(verified.batches) == 4096
    assert verified.batches[-1].end == found.corrupt_at
    assert (verified.status, verified.corrupt_at) == ("corrupt", verified.end)
    assert verified.reason == "commit sequence not increasing"


def test_corrupt_log_message_names_the_log_and_offset(tmp_path):
    files, batches = _damage_cases(tmp_path)
    path = files.log_paths[0]
    bad = bytearray(path.read_bytes())
    bad[batches[1].end - 1] ^= 0x10
    path.write_bytes(bad)

    with pytest.raises(CorruptLog) as refused:
        files.merge()

    assert str(refused.value) == (
        f"{path}: batch checksum mismatch at byte {batches[1].start}"
    )
    assert refused.value.data == {"path": str(path), "offset": batches[1].start}


# -- checksum -------------------------------------------------------------


@given(st.binary(max_size=5000), st.integers(0, 2**32 - 1), st.integers(0, 15))
def test_crc_matches_the_python_crc32c_package(data, value, shift):
    # Shifting the data inside a buffer moves it across alignments.
    view = memoryview(bytes(shift) + data)[shift:]
    want = crc32c.crc32c(data, value)

    assert _mergelib.crc32c(view, value) == want
    assert _mergelib.crc32c(view, value, portable=True) == want


@pytest.mark.parametrize("size", [3071, 3072, 3073, 3 * 3072 + 5, 100_003, 1 << 20])
def test_crc_of_long_inputs_matches_across_streams(size):
    # Inputs of three streams' length and more take the interleaved path.
    data = random.Random(size).randbytes(size + 8)
    for shift in (0, 3):
        view = memoryview(data)[shift : shift + size]
        want = crc32c.crc32c(bytes(view), 0x1234)

        assert _mergelib.crc32c(view, 0x1234) == want
        assert _mergelib.crc32c(view, 0x1234, portable=True) == want


# -- large pieces and many conflicts --------------------------------------


def test_records_larger_than_every_buffer_stream_through(tmp_path):
    rng = random.Random(7)
    big = rng.randbytes(5 << 20)
    logs = [
        ModelLog("s1", [(1, [(1000, big)])]),
        ModelLog("s2", [(2, [(3 << 20, rng.randbytes(300_000)), (7, b"x")])]),
    ]
    base = rng.randbytes(2 << 20)
    files = Files(tmp_path, base, logs)

    for window in (4 << 20, 1 << 20, 100_000):
        result, output = files.merge("last", window=window, max_conflicts=10)
        expected = model_merge(base, logs, "last")
        assert output == expected.output
        assert result.conflict_bytes == expected.conflict_bytes


def _crowded_logs(rng, size: int, records: int, length: int) -> list[ModelLog]:
    """Three sessions writing over each other, in interleaved batches."""
    logs = [ModelLog(f"s{k}", []) for k in range(3)]
    for seq in range(1, 31):
        batch = [
            (rng.randrange(size), rng.choice([b"\0", b"ab"]) * (length // 2))
            for _ in range(records // 10)
        ]
        logs[seq % 3].batches.append((seq, batch))

    return logs


@pytest.mark.parametrize(
    "window, records, length",
    [
        # Windows whose pieces fill the apply buffer after some dozens.
        (64 << 10, 8_000, 100),
        # More windows than a group holds, most of them with pieces.
        (64, 3_000, 40),
    ],
)
def test_windows_are_grouped_and_sorted_back_in_commit_order(
    tmp_path, window, records, length
):
    rng = random.Random(window)
    size = 2 << 20
    base = rng.randbytes(size)
    logs = _crowded_logs(rng, size, records, length)
    files = Files(tmp_path, base, logs)
    expected = model_merge(base, logs, "last")

    result, output = files.merge("last", window=window, max_conflicts=100_000)

    assert result.groups > 1
    assert output == expected.output
    assert result.conflicts == expected.conflicts
    assert result.conflict_bytes == expected.conflict_bytes


def test_more_conflict_ranges_than_the_engine_holds_are_all_found(tmp_path):
    # Every other byte differs: 65,536 separate ranges in one window,
    # more than the engine's run array, so it redoes the window in parts.
    size = 1 << 17
    logs = [
        ModelLog("s1", [(1, [(0, bytes(size))])]),
        ModelLog("s2", [(2, [(0, bytes([0, 1]) * (size // 2))])]),
        ModelLog("s3", [(3, [(size - 8, b"\2" * 16)])]),
    ]
    files = Files(tmp_path, bytes(size + 8), logs)
    expected = model_merge(bytes(size + 8), logs, "last")

    result, output = files.merge("last", window=size, max_conflicts=100_000)

    assert len(expected.conflicts) > 65_536
    assert result.conflicts == expected.conflicts
    assert result.conflict_bytes == expected.conflict_bytes
    assert output == expected.output


def test_conflict_list_is_capped_but_counted_in_full(tmp_path):
    logs = [
        ModelLog("s1", [(1, [(k * 10, b"a") for k in range(50)])]),
        ModelLog("s2", [(2, [(k * 10, b"b") for k in range(50)])]),
    ]
    files = Files(tmp_path, bytes(500), logs)

    with pytest.raises(Conflict) as failed:
        files.merge("fail", window=64, max_conflicts=7)

    assert len(failed.value.data["conflicts"]) == 7
    assert failed.value.data["conflict_ranges"] == 50
    assert failed.value.data["conflict_bytes"] == 50
    assert str(failed.value).startswith("50 conflicting ranges (50 bytes): 0-1 ")


# -- progress and cancellation --------------------------------------------


def _progress_files(tmp_path):
    logs = [ModelLog("s1", [(k + 1, [(k * 4096, b"z" * 100)]) for k in range(64)])]
    return Files(tmp_path, bytes(64 * 4096), logs)


def test_progress_shows_the_end_of_the_last_phase(tmp_path):
    files = _progress_files(tmp_path)
    progress = _mergelib.MergeProgress()

    result, _ = files.merge(window=4096, progress=progress)

    assert (progress.phase, progress.done) == ("apply", result.out_size)
    assert progress.total == result.out_size


def test_cancelled_merge_stops_with_ecanceled(tmp_path):
    files = _progress_files(tmp_path)
    progress = _mergelib.MergeProgress()
    progress.cancel()

    with pytest.raises(OSError) as stopped:
        files.merge(window=4096, progress=progress)

    assert stopped.value.errno == errno.ECANCELED
    assert progress.phase == "scan"


def test_report_function_sees_the_finished_merge(tmp_path):
    files = _progress_files(tmp_path)
    seen = []
    progress = _mergelib.MergeProgress(lambda *call: seen.append(call))

    result, _ = files.merge(window=4096, progress=progress)

    assert seen[-1] == ("apply", result.out_size, result.out_size)


def test_report_function_raising_is_raised_by_merge(tmp_path):
    files = _progress_files(tmp_path)

    def report(phase, done, total):
        raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        files.merge(window=4096, progress=_mergelib.MergeProgress(report, every=0))


# -- copies ---------------------------------------------------------------


def _dense_and_sparse_windows(window: int, nwindows: int) -> list[ModelLog]:
    """Pieces that make some windows dense (most blocks written, the first
    two and last three not) and others sparse or empty, past the base's
    end too."""
    rng = random.Random(11)
    block = 4096
    dense = {0, 2, 3, 7, 9, 10}
    sparse = {1, 8}
    records = []
    for w in range(nwindows):
        start = w * window
        if w in dense:
            for b in range(2, window // block - 3):
                records.append((start + b * block + 100, rng.randbytes(block - 200)))
        elif w in sparse:
            records.append((start + window // 2, b"sparse\n"))
    records.append((nwindows * window + 10, b"\0end"))
    return [ModelLog("s1", [(1, records[::2])]), ModelLog("s2", [(2, records[1::2])])]


def test_dense_windows_copy_only_their_untouched_blocks(tmp_path):
    window = 64 << 10
    base = random.Random(5).randbytes(10 * window)
    logs = _dense_and_sparse_windows(window, 11)
    files = Files(tmp_path, base, logs)

    result, output = files.merge(window=window)

    assert output == model_merge(base, logs, "last").output
    assert result.windows_touched == 9


def test_a_sparse_base_merges_into_a_sparse_output(tmp_path):
    window, mib = 64 << 10, 1 << 20
    # Data at the start and in the middle, holes between and to the end.
    extents = [(0, 100_000), (3 * mib + 4096, 200_000)]
    size = 8 * mib
    rng = random.Random(7)
    base = bytearray(size)
    for start, length in extents:
        base[start : start + length] = rng.randbytes(length)
    records = [
        (50_000, b"in the first extent"),
        (99_990, b"across its end into the hole"),
        (2 * mib, b"in a hole\n\0"),
        (3 * mib + 4090, b"from a hole into data"),
        (size - 5, b"end.\n"),
        (size + 100, b"past the base"),
    ]
    logs = [ModelLog("s1", [(1, records[::2])]), ModelLog("s2", [(2, records[1::2])])]
    files = Files(tmp_path, b"", logs)
    with open(files.base_path, "r+b") as f:
        f.truncate(size)
        for start, length in extents:
            f.seek(start)
            f.write(base[start : start + length])

    _, output = files.merge(window=window)

    assert output == model_merge(bytes(base), logs, "last").output
    allocated = (tmp_path / "out").stat().st_blocks * 512
    # The extents, the blocks the records touch and their windows' gaps.
    assert allocated <= 300_000 + 6 * (256 << 10)


def test_untouched_windows_copy_across_file_systems(tmp_path):
    # copy_file_range refuses a base on another file system (tmpfs here),
    # which sends the engine to its read-and-write fallback.
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    base = random.Random(3).randbytes(10 * (64 << 10))
    logs = _dense_and_sparse_windows(64 << 10, 11)
    files = Files(tmp_path, b"", logs)
    with tempfile.NamedTemporaryFile(dir=shm) as other:
        other.write(base)
        other.flush()
        files.base_path.unlink()
        files.base_path.symlink_to(other.name)

        _, output = files.merge(window=64 << 10)

    assert output == model_merge(base, logs, "last").output


# -- memory ---------------------------------------------------------------

_MEASURE = """
import json, os, resource, sys
from cowd import _mergelib
folder, logs = sys.argv[1], json.loads(sys.argv[2])
inputs = []
for path, session in logs:
    fd = os.open(path, os.O_RDONLY)
    inputs.append(_mergelib.LogInput(fd, session, _mergelib.data_start(path)))
base = os.open(os.path.join(folder, "base"), os.O_RDONLY)
out = os.open(os.path.join(folder, "out"), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
spill = os.open(folder, os.O_RDWR | os.O_TMPFILE, 0o600)
result = _mergelib.merge(inputs, base, out, spill, "last")
print(json.dumps({
    "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "records": result.records,
    "buffers": result.peak_buffer_bytes,
}))
"""


def _measure(folder: Path, nlogs: int, records: int) -> dict:
    rng = random.Random(records)
    folder.mkdir()
    (folder / "base").write_bytes(bytes(16 << 20))
    logs = []
    for k in range(nlogs):
        path = folder / f"{k}.log"
        writer = LogWriter.create(str(path), {**META, "session": f"s{k}"})
        for seq in range(records // 100):
            writer.append(
                [(rng.randrange(16 << 20), rng.randbytes(64)) for _ in range(100)]
            )
            writer.commit(seq * nlogs + k + 1, sync=False)
        writer.close()
        logs.append([str(path), f"s{k}"])
    child = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder), json.dumps(logs)],
        capture_output=True,
        text=True,
        check=True,
    )

    return json.loads(child.stdout)


def test_peak_memory_does_not_grow_with_the_logs(tmp_path):
    small = _measure(tmp_path / "small", 8, 2_000)
    large = _measure(tmp_path / "large", 8, 16_000)

    assert (small["records"], large["records"]) == (16_000, 128_000)
    assert large["maxrss_kib"] - small["maxrss_kib"] < 4 * 1024
    assert large["buffers"] - small["buffers"] < 1 << 20
