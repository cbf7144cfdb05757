"""Many written pages, large files, and the switch between engines.

The remap engine costs a kernel mapping per written page, and the
kernel allows vm.max_map_count of them: past a switch point a mapping
moves to the uffd engine, which stderr reports once.  Bytes committed
before or after the switch keep their meaning: a commit records exactly
the bytes changed since the last one, so a byte changed, committed, then
set back to its base value is recorded, and a byte left alone is not
recorded again.
"""

from __future__ import annotations

import json
import os
import signal
import struct

import pytest
from managed import (
    ENGINES,
    PAGE,
    apply,
    engine_env,
    libcow_lines,
    make_base,
    merged,
    records_by_session,
    switch_lines,
)

from conftest import hexarg

# scatter's value for its k-th page.
GOLDEN = 0x9E3779B97F4A7C15


def scatter_value(k: int) -> bytes:
    return struct.pack("<Q", ((k + 1) * GOLDEN) % 2**64)


def scatter_slot(k: int, stride: int) -> int:
    return k * stride * PAGE + (k % 512) * 8


def sparse_file(path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def untouched_sparse(path, size: int, mtime_ns: int) -> bool:
    """Nothing was ever written to the sparse file at path."""
    st = os.stat(path)

    return st.st_size == size and st.st_blocks == 0 and st.st_mtime_ns == mtime_ns


def check_scattered(path, count: int, stride: int) -> None:
    """path holds scatter's values at their slots and zeros elsewhere."""
    nonzero = 0
    with open(path, "rb") as f:
        for k in range(count):
            f.seek(scatter_slot(k, stride))
            assert f.read(8) == scatter_value(k), f"page {k * stride}"
            nonzero += 8 - scatter_value(k).count(0)
        f.seek(0)
        zeros = 0
        while chunk := f.read(64 << 20):
            zeros += chunk.count(0)
    assert zeros == os.path.getsize(path) - nonzero


def test_200000_scattered_pages_complete_under_the_default_limit(
    cowd, programs, tmp_path
):
    count, stride = 200_000, 2
    # The premise: one kernel mapping per written page would not fit.
    with open("/proc/sys/vm/max_map_count") as f:
        assert count > int(f.read())
    size = count * stride * PAGE
    base = tmp_path / "big.bin"
    sparse_file(base, size)
    mtime = os.stat(base).st_mtime_ns

    result = cowd.run(
        [str(base)],
        str(programs / "scatter"),
        str(base),
        str(count),
        str(stride),
        timeout=600,
    )

    assert result.returncode == 0, result.stderr
    (line,) = libcow_lines(result.stderr)
    assert "userfaultfd" in line and str(base) in line
    assert untouched_sparse(base, size, mtime)
    out = tmp_path / "big.out"
    merge = cowd.cowctl("merge-all", "-s", str(base), "-o", str(out), timeout=600)
    assert merge.returncode == 0, merge.stderr
    check_scattered(out, count, stride)


def test_without_userfaultfd_the_limit_is_a_loud_crash(cowd, programs, tmp_path):
    count, stride = 40_000, 2
    size = count * stride * PAGE
    base = tmp_path / "mid.bin"
    sparse_file(base, size)
    mtime = os.stat(base).st_mtime_ns
    env = {**os.environ, "COW_UFFD": "off"}

    result = cowd.run(
        [str(base)],
        str(programs / "scatter"),
        str(base),
        str(count),
        str(stride),
        env=env,
        timeout=600,
    )

    # A write that cannot be made private must not be lost silently.
    assert result.returncode == -signal.SIGSEGV
    lines = libcow_lines(result.stderr)
    assert "cannot switch" in lines[0] and "COW_UFFD=off" in lines[0]
    assert "cannot make a private copy" in lines[-1]
    assert untouched_sparse(base, size, mtime)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_byte_set_back_to_its_base_value_is_recorded(
    cowd, programs, tmp_path, engine
):
    base = tmp_path / "data.bin"
    content = make_base(base)
    original = content[5:6]
    steps = [f"w{hexarg(5, b'X')}", "s", f"w{hexarg(5, original)}"]

    result = cowd.run(
        [str(base)],
        str(programs / "mapscript"),
        str(base),
        *steps,
        env=engine_env(engine),
    )

    assert result.returncode == 0, result.stderr
    assert merged(cowd, base, tmp_path) == content


@pytest.mark.parametrize("engine", ENGINES)
def test_a_commit_records_only_bytes_changed_since_the_last(
    cowd, programs, tmp_path, engine
):
    # Merges judge conflicts by who wrote a byte last: recording again a
    # byte that did not change would count as writing it again.
    base = tmp_path / "data.bin"
    content = make_base(base)
    steps = [f"w{hexarg(0, b'A')}", "s", f"w{hexarg(10, b'B')}", "s"]
    steps += [f"w{hexarg(0, content[:1])}"]

    result = cowd.run(
        [str(base)],
        str(programs / "mapscript"),
        str(base),
        *steps,
        env=engine_env(engine),
    )

    assert result.returncode == 0, result.stderr
    (records,) = records_by_session(cowd, base).values()
    assert records == [(0, b"A"), (10, b"B"), (0, content[:1])]


def test_pages_committed_before_a_switch_keep_their_meaning(cowd, programs, tmp_path):
    base = tmp_path / "data.bin"
    content = make_base(base, 12 * PAGE)
    back = content[PAGE + 3 : PAGE + 4]
    steps = [
        # Committed under the remap engine: page 0 stays committed, page 1
        # is written again (a snapshot), then more pages force the switch.
        f"w{hexarg(3, b'A')}",
        f"w{hexarg(PAGE + 3, b'B')}",
        "s",
        f"w{hexarg(PAGE + 9, b'b')}",
        *(f"w{hexarg(p * PAGE, b'fill')}" for p in range(2, 10)),
        # After the switch: set back what was committed before it.
        f"w{hexarg(PAGE + 3, back)}",
        f"w{hexarg(4, b'a')}",
        "s",
        f"w{hexarg(11 * PAGE, b'last')}",
    ]
    env = {**os.environ, "COW_SWITCH_PAGES": "4"}

    result = cowd.run(
        [str(base)], str(programs / "mapscript"), str(base), *steps, env=env
    )

    assert result.returncode == 0, result.stderr
    assert len(switch_lines(result.stderr)) == 1
    expected = [(3, b"Aa"), (PAGE + 9, b"b"), (11 * PAGE, b"last")]
    expected += [(p * PAGE, b"fill") for p in range(2, 10)]
    assert merged(cowd, base, tmp_path) == apply(content, expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_sparse_5_gib_file_is_written_near_its_end(cowd, programs, tmp_path, engine):
    size = 5 << 30
    base = tmp_path / "huge.bin"
    sparse_file(base, size)
    mtime = os.stat(base).st_mtime_ns
    writes = [((4 << 30) + 5, b"past 4 GiB"), (size - 100, b"near the end\n")]

    result = cowd.run(
        [str(base)],
        str(programs / "mapscript"),
        str(base),
        *(f"w{hexarg(off, data)}" for off, data in writes),
        *(f"v{hexarg(off, data)}" for off, data in writes),
        env=engine_env(engine),
    )

    assert result.returncode == 0, result.stderr
    assert untouched_sparse(base, size, mtime)
    # The log holds the 64-bit offsets and bytes exactly.  (A merge would
    # copy five gigabytes; the offsets are what this test is about.)
    (log,) = json.loads(cowd.cowctl("logs", "--json", check=True).stdout)
    shown = json.loads(cowd.cowctl("log", "show", log["path"], "--json").stdout)
    records = [tuple(r) for b in shown["batches"] for r in b["records"]]
    assert records == [(off, data.hex()) for off, data in writes]


def test_merge_all_of_a_sparse_5_gib_file_puts_bytes_past_4_gib(
    cowd, programs, tmp_path, request
):
    size = 5 << 30
    base = tmp_path / "huge.bin"
    sparse_file(base, size)
    # Offsets whose low 32 bits alone would land near the file's start,
    # one write across the 4 GiB line itself, and one at the very end.
    writes = [
        ((4 << 30) - 3, b"across 4 GiB"),
        ((4 << 30) + 64, b"past 4 GiB"),
        ((4 << 30) + 3 * PAGE + 1, b"a page on"),
        (size - 13, b"the last 13.\n"),
    ]
    result = cowd.run(
        [str(base)],
        str(programs / "mapscript"),
        str(base),
        *(f"w{hexarg(off, data)}" for off, data in writes),
        env=engine_env("remap"),
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "merged.bin"

    cowd.cowctl("merge-all", "-s", str(base), "-o", str(out), check=True)

    request.addfinalizer(lambda: out.unlink(missing_ok=True))
    assert out.stat().st_size == size
    # The base's holes stay holes: only the written pages take space.
    assert out.stat().st_blocks * 512 <= 64 * PAGE
    with open(out, "rb") as f:
        # Where a merge that cut offsets to 32 bits would have written.
        assert f.read(4 * PAGE) == bytes(4 * PAGE)
        for off, data in writes:
            after = min(8, size - off - len(data))
            f.seek(off - 8)
            assert f.read(8 + len(data) + after) == bytes(8) + data + bytes(after)
