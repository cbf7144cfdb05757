"""Every way a program maps, remaps, forks, execs and exits, under libcow.

Each test runs a real program under ``cowctl run`` with a real cowd and
checks the three promises: the base file is untouched, the logs hold
what the program changed, and merge-all gives the bytes it wrote.  Most
run under both engines (see managed.py).
"""

from __future__ import annotations

import shutil

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

WRITES = [(0, b"first"), (PAGE - 3, b"crosses"), (2 * PAGE + 9, b"nul\0\n")]


def mapscript(cowd, programs, base, *steps: str, engine: str = "remap", **kw):
    return cowd.run(
        [str(base)],
        str(programs / "mapscript"),
        str(base),
        *steps,
        env=engine_env(engine),
        **kw,
    )


def writes_as_steps(writes) -> list[str]:
    return [f"w{hexarg(offset, data)}" for offset, data in writes]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("commit_point", ["munmap", "msync", "exit"])
def test_each_commit_point_commits_under_each_engine(
    cowd, programs, tmp_path, engine, commit_point
):
    base = tmp_path / "data.bin"
    content = make_base(base)
    flags = {"munmap": [], "msync": ["--msync", "--keep"], "exit": ["--keep"]}
    args = [hexarg(off, data) for off, data in WRITES]

    result = cowd.run(
        [str(base)],
        str(programs / "writer"),
        str(base),
        *flags[commit_point],
        *args,
        env=engine_env(engine),
    )

    assert result.returncode == 0, result.stderr
    assert len(switch_lines(result.stderr)) == (engine == "uffd")
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == apply(content, WRITES)


@pytest.mark.parametrize("engine", ENGINES)
def test_mprotect_never_lets_a_write_reach_the_file(cowd, programs, tmp_path, engine):
    base = tmp_path / "data.bin"
    content = make_base(base)
    steps = [
        f"m0:{3 * PAGE}:r",
        f"m0:{3 * PAGE}:rw",
        f"w{hexarg(10, b'after rw')}",
        f"m{PAGE}:{PAGE}:-",
        f"m{PAGE}:{PAGE}:rw",
        f"w{hexarg(PAGE + 5, b'page two')}",
        "s",
        f"m0:{PAGE}:r",
        f"m0:{PAGE}:rw",
        f"w{hexarg(20, b'again')}",
        f"v{hexarg(10, b'after rw')}",
    ]

    result = mapscript(cowd, programs, base, *steps, engine=engine)

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    expected = [(10, b"after rw"), (PAGE + 5, b"page two"), (20, b"again")]
    assert merged(cowd, base, tmp_path) == apply(content, expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_madvise_dontneed_keeps_the_private_writes(cowd, programs, tmp_path, engine):
    base = tmp_path / "data.bin"
    content = make_base(base)
    steps = [f"w{hexarg(30, b'kept')}", f"d0:{3 * PAGE}", f"v{hexarg(30, b'kept')}"]

    result = mapscript(cowd, programs, base, *steps, engine=engine)

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == apply(content, [(30, b"kept")])


@pytest.mark.parametrize("engine", ENGINES)
def test_a_mapping_made_with_mmap64_is_managed(cowd, programs, tmp_path, engine):
    base = tmp_path / "data.bin"
    content = make_base(base)
    steps = writes_as_steps(WRITES) + [f"v{hexarg(o, d)}" for o, d in WRITES]

    result = cowd.run(
        [str(base)],
        str(programs / "mapscript"),
        "--mmap64",
        str(base),
        *steps,
        env=engine_env(engine),
    )

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == apply(content, WRITES)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_first_write_fault_leaves_errno_as_it_was(cowd, programs, tmp_path, engine):
    base = tmp_path / "data.bin"
    content = make_base(base)
    # Each store is the first to its page; the second also crosses into
    # the third page, so one step takes two faults.
    writes = [(7, b"one"), (2 * PAGE - 2, b"two+three")]
    steps = [f"n{hexarg(offset, data)}" for offset, data in writes]

    result = mapscript(cowd, programs, base, *steps, engine=engine)

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == apply(content, writes)


@pytest.mark.parametrize("engine", ENGINES)
def test_mremap_grows_shrinks_and_moves_a_managed_mapping(
    cowd, programs, tmp_path, engine
):
    base = tmp_path / "data.bin"
    content = make_base(base, 8 * PAGE)

    result = cowd.run(
        [str(base)], str(programs / "remapper"), str(base), env=engine_env(engine)
    )

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    expected = [
        (10, b"a"),
        (11, b"d"),
        (2 * PAGE + 20, b"b"),
        (6 * PAGE + 30, b"c"),
        (4 * PAGE + 40, b"e"),
        (3 * PAGE + 50, b"f"),
    ]
    assert merged(cowd, base, tmp_path) == apply(content, expected)


EXEC_KINDS = [
    "execv",
    "execve",
    "execvp",
    "execvpe",
    "execl",
    "execlp",
    "execle",
    "fexecve",
    "execveat",
]


@pytest.mark.parametrize("kind", EXEC_KINDS)
def test_exec_commits_before_the_image_is_replaced(cowd, programs, tmp_path, kind):
    base = tmp_path / "data.bin"
    content = make_base(base)
    # The p forms search PATH; the others get an absolute path.
    target = "true" if kind in ("execvp", "execvpe", "execlp") else shutil.which("true")

    result = mapscript(
        cowd, programs, base, *writes_as_steps(WRITES), f"e{kind}:{target}"
    )

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == apply(content, WRITES)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("call", ["_", "E"], ids=["_exit", "_Exit"])
def test_exit_that_skips_destructors_commits_first(
    cowd, programs, tmp_path, engine, call
):
    base = tmp_path / "data.bin"
    content = make_base(base)

    result = mapscript(
        cowd, programs, base, *writes_as_steps(WRITES), call, engine=engine
    )

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == apply(content, WRITES)


def test_posix_spawn_and_system_leave_the_session_alone(cowd, programs, tmp_path):
    base = tmp_path / "data.bin"
    content = make_base(base)
    writes = [(0, b"before"), (100, b"between"), (200, b"after")]
    steps = writes_as_steps(writes)

    result = mapscript(cowd, programs, base, steps[0], "S", steps[1], "y", steps[2])

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    # The spawned children share nothing they could commit: one session.
    assert list(records_by_session(cowd, base).values()) == [writes]
    assert merged(cowd, base, tmp_path) == apply(content, writes)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_program_with_its_own_allocator_starts_and_commits(
    cowd, programs, tmp_path, engine
):
    base = tmp_path / "data.bin"
    content = make_base(base)
    args = [hexarg(offset, data) for offset, data in WRITES]

    # A start-up that recursed would crash, one that deadlocked would hang.
    result = cowd.run(
        [str(base)],
        str(programs / "ownalloc"),
        str(base),
        *args,
        env=engine_env(engine),
        timeout=20,
    )

    assert result.returncode == 0, result.stderr
    # libcow's start-up allocated, through the program's allocator.
    before_main = int(result.stdout.decode().rsplit(":", 1)[1])
    assert before_main > 0
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == apply(content, WRITES)


def test_a_mapping_made_by_an_earlier_constructor_is_managed(cowd, early, tmp_path):
    base = tmp_path / "data.bin"
    content = make_base(base)
    env = engine_env("remap", EARLY_FILE=str(base), EARLY_DO="mmap")

    result = cowd.run([str(base)], str(early), "w", env=env)

    assert result.returncode == 0, result.stderr
    assert libcow_lines(result.stderr) == []
    assert base.read_bytes() == content
    expected = apply(content, [(0, b"early"), (8, b"main")])
    assert merged(cowd, base, tmp_path) == expected


def test_a_raw_mapping_made_before_start_up_is_taken_over(cowd, early, tmp_path):
    base = tmp_path / "data.bin"
    content = make_base(base)
    env = engine_env("remap", EARLY_FILE=str(base), EARLY_DO="raw")

    result = cowd.run([str(base)], str(early), "w", env=env)

    assert result.returncode == 0, result.stderr
    (line,) = libcow_lines(result.stderr)
    assert "took over" in line and str(base) in line
    # What the constructor wrote before libcow started reached the file,
    # as stderr says; what main wrote afterwards did not.
    written_early = apply(content, [(0, b"rawly")])
    assert base.read_bytes() == written_early
    assert merged(cowd, base, tmp_path) == apply(written_early, [(8, b"main")])


def test_fork_handlers_of_the_program_write_to_the_right_session(cowd, early, tmp_path):
    base = tmp_path / "data.bin"
    content = make_base(base, 4 * PAGE)
    env = engine_env("remap", EARLY_FILE=str(base), EARLY_DO="mmap,atfork")

    result = cowd.run([str(base)], str(early), "f", env=env)

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    sessions = sorted(records_by_session(cowd, base).values(), key=len)
    # The child: its own handlers' writes, before and after libcow's.
    assert sessions[0] == [(200, b"c"), (300, b"C"), (2 * PAGE, b"child")]
    # The parent: the prepare and parent handlers' writes, not the child's.
    assert sessions[1] == [
        (0, b"early"),
        (100, b"E"),
        (PAGE, b"P"),
        (3 * PAGE, b"parent"),
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_two_mappings_of_one_file_are_private_views_that_merge(
    cowd, programs, tmp_path, engine
):
    base = tmp_path / "data.bin"
    content = make_base(base)

    result = cowd.run(
        [str(base)], str(programs / "aliases"), str(base), env=engine_env(engine)
    )

    assert result.returncode == 0, result.stderr
    # Neither mapping sees what the other wrote: each has its own pages.
    shown = dict(line.split(": ") for line in result.stdout.decode().splitlines())
    assert shown["B at P+16"] == content[PAGE + 16 : PAGE + 20].hex()
    assert shown["A at P+64"] == content[PAGE + 64 : PAGE + 68].hex()
    assert base.read_bytes() == content
    # B's later commit of the same page leaves A's committed bytes alone
    # where B did not write: "ZZ" over half of "AAAA" leaves "ZZAA".
    expected = [(16, b"aaaa"), (PAGE + 16, b"ZZAA"), (PAGE + 64, b"BBBB")]
    assert merged(cowd, base, tmp_path) == apply(content, expected)
