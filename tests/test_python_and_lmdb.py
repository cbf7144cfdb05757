"""Unmodified Python programs and a real third-party library.

Each workload runs twice: once plainly on a copy of the base file, which
gives the bytes it writes (the reference), and once under ``cowctl run``
on the base itself.  The base must come out untouched (bytes and
modification time) and merge-all must give exactly the reference.
"""

from __future__ import annotations

import os
import shutil
import sys
import textwrap

import pytest
from managed import ENGINES, PAGE, engine_env, make_base, merged

from conftest import run

MMAP_SCRIPT = """
import mmap, os, struct, sys

path = sys.argv[1]
page = mmap.PAGESIZE
with open(path, "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)
    m[10:15] = b"py\\n\\0!"
    m[page - 2 : page + 2] = b"edge"
    m[3 * page] = 0xAB
    m.seek(2 * page + 100)
    m.write(b"written through write()")
    m.move(5 * page, 10, 40)
    struct.pack_into("<dQ", m, 4 * page + 8, 3.25, 2**63 + 7)
    m.flush()
    m[20:25] = m[10:15].upper()

    # A second mapping, of the last pages only: a view of its own.
    tail = mmap.mmap(f.fileno(), 2 * page, offset=4 * page)
    tail[0:6] = b"second"
    tail.flush()
    tail.close()

    os.lseek(f.fileno(), 0, os.SEEK_SET)
    with open(path, "rb", buffering=0) as src:
        src.seek(7 * page)
        src.readinto(memoryview(m)[6 * page : 6 * page + 64])
    m.close()
"""

LMDB_SCRIPT = """
import sys
import lmdb

env = lmdb.open(
    sys.argv[1], subdir=False, map_size=int(sys.argv[2]), writemap=True
)
with env.begin(write=True) as txn:
    for i in range(300):
        txn.put(b"key-%05d" % i, b"value %d " % i * (i % 7 + 1))
with env.begin(write=True) as txn:
    for i in range(0, 300, 3):
        txn.delete(b"key-%05d" % i)
    txn.put(b"key-00001", b"replaced" * 100)
with env.begin() as txn:
    assert txn.get(b"key-00001") == b"replaced" * 100
    assert txn.get(b"key-00003") is None
env.close()
"""

# LMDB's map: the data file never grows past it.
LMDB_MAP_SIZE = 256 * PAGE


def reference_and_managed(cowd, tmp_path, base, script, engine, *args):
    """Runs script on a copy of base, then under cowctl run on base."""
    copy = tmp_path / "reference"
    shutil.copyfile(base, copy)
    plain = run([sys.executable, "-c", textwrap.dedent(script), str(copy), *args])
    assert plain.returncode == 0, plain.stderr
    before = os.stat(base)

    result = cowd.run(
        [str(base)],
        sys.executable,
        "-c",
        textwrap.dedent(script),
        str(base),
        *args,
        env=engine_env(engine),
    )

    assert result.returncode == 0, result.stderr
    after = os.stat(base)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    return copy.read_bytes()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_python_program_using_the_mmap_module(cowd, tmp_path, engine):
    base = tmp_path / "data.bin"
    content = make_base(base, 8 * PAGE)

    reference = reference_and_managed(cowd, tmp_path, base, MMAP_SCRIPT, engine)

    assert reference != content
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == reference


def lmdb_base(tmp_path):
    """A new LMDB data file, created and sized without cowd."""
    import lmdb

    base = tmp_path / "data.mdb"
    env = lmdb.open(str(base), subdir=False, map_size=LMDB_MAP_SIZE, writemap=True)
    env.close()
    assert os.path.getsize(base) == LMDB_MAP_SIZE

    return base


@pytest.mark.parametrize("engine", ENGINES)
def test_lmdb_with_writemap_writes_through_cowd(cowd, tmp_path, engine):
    base = lmdb_base(tmp_path)
    content = base.read_bytes()

    reference = reference_and_managed(
        cowd, tmp_path, base, LMDB_SCRIPT, engine, str(LMDB_MAP_SIZE)
    )

    assert reference != content
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == reference
