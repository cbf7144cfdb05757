"""Threads and forked children of a managed program.

Many threads faulting on the same page at once must make one private
copy and lose no write, while commits run; a forked child that keeps
writing is a session of its own, with its own log, and the parent's log
holds only what the parent wrote.
"""

from __future__ import annotations

import os
import struct

import pytest
from managed import (
    ENGINES,
    PAGE,
    apply,
    engine_env,
    make_base,
    merged,
    records_by_session,
    switch_lines,
)

from conftest import hexarg

THREADS = 8


def hammer_value(page: int, thread: int, i: int) -> int:
    return page * 1_000_000 + thread * 10_000 + i


# Each engine, and a switch from one to the other while threads write.
HAMMER_ENV = {**ENGINES, "switching": {"COW_SWITCH_PAGES": "3"}}


@pytest.mark.parametrize("engine", HAMMER_ENV)
def test_threads_writing_one_page_at_once_lose_no_write(
    cowd, programs, tmp_path, engine
):
    base = tmp_path / "data.bin"
    pages, iterations = 8, 2000
    content = make_base(base, pages * PAGE)

    result = cowd.run(
        [str(base)],
        str(programs / "hammer"),
        str(base),
        str(pages),
        str(iterations),
        env={**os.environ, **HAMMER_ENV[engine]},
    )

    assert result.returncode == 0, result.stderr
    assert len(switch_lines(result.stderr)) == (engine != "remap")
    assert base.read_bytes() == content
    last = [
        (page * PAGE + t * 8, struct.pack("<Q", hammer_value(page, t, iterations - 1)))
        for page in range(pages)
        for t in range(THREADS)
    ]
    assert merged(cowd, base, tmp_path) == apply(content, last)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_forked_child_is_a_session_with_its_own_log(cowd, programs, tmp_path, engine):
    base = tmp_path / "data.bin"
    content = make_base(base, 4 * PAGE)
    before = (0, b"parent before")
    child = [(100, b"child one"), (PAGE + 7, b"child two")]
    after = (2 * PAGE, b"parent after")
    steps = [
        f"w{hexarg(*before)}",
        "F",
        f"w{hexarg(*child[0])}",
        "s",
        f"w{hexarg(*child[1])}",
        "J",
        f"w{hexarg(*after)}",
    ]

    result = cowd.run(
        [str(base)],
        str(programs / "mapscript"),
        str(base),
        *steps,
        env=engine_env(engine),
    )

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    logs = records_by_session(cowd, base)
    assert sorted(logs.values()) == sorted([[before, after], child])
    assert merged(cowd, base, tmp_path) == apply(content, [before, *child, after])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_child_records_only_what_it_changed_on_inherited_pages(
    cowd, programs, tmp_path, engine
):
    base = tmp_path / "data.bin"
    content = make_base(base, 2 * PAGE)
    # The parent's uncommitted write and the child's share a page.
    parent = (10, b"from the parent")
    child = (40, b"from the child")
    steps = [f"w{hexarg(*parent)}", "F", f"w{hexarg(*child)}", "J"]

    result = cowd.run(
        [str(base)],
        str(programs / "mapscript"),
        str(base),
        *steps,
        env=engine_env(engine),
    )

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    assert sorted(records_by_session(cowd, base).values()) == [[parent], [child]]
