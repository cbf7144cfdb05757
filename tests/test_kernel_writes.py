"""Writes the kernel makes for a program into its managed pages.

A system call that stores into a write-protected page fails with EFAULT
instead of faulting, so libcow makes the destination private first.
Each test has the kernel fill part of a managed mapping, across a page
boundary, and checks that the call succeeded, the base is untouched and
merge-all holds the bytes.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
from managed import ENGINES, PAGE, apply, engine_env, make_base, merged

METHODS = ["read", "pread", "readv", "preadv", "fread", "recv", "recvfrom", "recvmsg"]

# Starts near the end of the first page and ends in the third.
OFFSET = PAGE - 100


def source_bytes(tmp_path) -> tuple[object, bytes]:
    data = bytes(range(256)) * (PAGE // 128) + b"\0\n tail"
    source = tmp_path / "source.bin"
    source.write_bytes(data)

    return source, data


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_kernel_writes_into_managed_pages_succeed_and_are_logged(
    cowd, programs, tmp_path, method, engine
):
    base = tmp_path / "data.bin"
    content = make_base(base, 4 * PAGE)
    source, data = source_bytes(tmp_path)

    result = cowd.run(
        [str(base)],
        str(programs / "kernelwrite"),
        str(base),
        method,
        str(OFFSET),
        str(source),
        env=engine_env(engine),
    )

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == apply(content, [(OFFSET, data)])


READINTO = """
import mmap
with open({base!r}, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
    with open({source!r}, "rb", buffering={buffering}) as src:
        view = memoryview(m)[{offset}:{offset} + {length}]
        done = 0
        while done < {length}:
            n = src.readinto(view[done:])
            assert n, "source ended early"
            done += n
        view.release()
"""


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("buffering", [0, -1], ids=["raw", "buffered"])
def test_python_readinto_a_memoryview_of_an_mmap(cowd, tmp_path, buffering, engine):
    base = tmp_path / "data.bin"
    content = make_base(base, 4 * PAGE)
    source, data = source_bytes(tmp_path)
    script = READINTO.format(
        base=str(base),
        source=str(source),
        buffering=buffering,
        offset=OFFSET,
        length=len(data),
    )

    result = cowd.run(
        [str(base)],
        sys.executable,
        "-c",
        textwrap.dedent(script),
        env=engine_env(engine),
    )

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == apply(content, [(OFFSET, data)])
