"""Crashes stay crashes, and a program's own handlers keep working.

Faults libcow does not own (a NULL pointer, a read-only mapping, a
managed page the program itself made read-only, a stack overflow on an
alternate signal stack) reach the SIGSEGV handler the program installed,
after libcow's or before it, and writes to managed pages still work
around them.  A write past the end of the file gets SIGBUS, as it does
without libcow.
"""

from __future__ import annotations

import signal

import pytest
from managed import ENGINES, PAGE, apply, engine_env, make_base, merged

from conftest import run

# Faults ownsegv makes in each mode; altstack adds a stack overflow.
CAUGHT = {"sigaction": 3, "signal": 3, "altstack": 4}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", CAUGHT)
def test_a_handler_installed_after_libcow_gets_the_faults_it_owns(
    cowd, programs, tmp_path, mode, engine
):
    base = tmp_path / "data.bin"
    content = make_base(base, 2 * PAGE)

    result = cowd.run(
        [str(base)],
        str(programs / "ownsegv"),
        str(base),
        mode,
        env=engine_env(engine),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"caught {CAUGHT[mode]}\n".encode()
    assert base.read_bytes() == content
    assert merged(cowd, base, tmp_path) == apply(content, [(0, b"ok"), (8, b"ok")])


def test_a_handler_installed_before_libcow_gets_the_faults_it_owns(
    cowd, early, tmp_path
):
    base = tmp_path / "data.bin"
    content = make_base(base)
    env = engine_env("remap", EARLY_FILE=str(base), EARLY_DO="segv,mmap")

    result = cowd.run([str(base)], str(early), "n", "w", env=env)

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    expected = apply(content, [(0, b"early"), (8, b"main")])
    assert merged(cowd, base, tmp_path) == expected


@pytest.mark.parametrize("catch", [False, True], ids=["default", "handler"])
def test_a_write_past_the_end_of_the_file_gets_sigbus_as_without_libcow(
    cowd, programs, tmp_path, catch
):
    base = tmp_path / "small.bin"
    base.write_bytes(b"short")
    copy = tmp_path / "copy.bin"
    copy.write_bytes(b"short")
    args = ["catch"] if catch else []
    plain = run([str(programs / "pasteof"), str(copy), *args])

    result = cowd.run([str(base)], str(programs / "pasteof"), str(base), *args)

    assert plain.returncode == (0 if catch else -signal.SIGBUS)
    assert (result.returncode, result.stdout) == (plain.returncode, plain.stdout)
    assert base.read_bytes() == b"short"
