"""A managed program outlives its cowd.

When cowd stops while a program runs, the program keeps its private
pages and keeps running; a commit fails with one clear line on stderr
and its batch is kept; once a new cowd listens on the same socket with
the same state, the next commit delivers it.  Nothing reaches the base.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest
from managed import ENGINES, apply, engine_env, libcow_lines, make_base, merged

from conftest import COWCTL, RUN_TIMEOUT, hexarg, start_cowd


def open_when_read(fifo, proc) -> int:
    """Opens fifo for writing once the program has opened it to read."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        if proc.poll() is not None:
            raise AssertionError(f"the program ended early: {proc.stderr.read()!r}")
        time.sleep(0.01)
    raise AssertionError("the program never reached its wait")


def restart(tmp_path):
    """A new cowd on the same socket and state folder."""
    (tmp_path / "notify.sock").unlink(missing_ok=True)

    return start_cowd(tmp_path)


@pytest.mark.parametrize("engine", ENGINES)
def test_commits_wait_for_a_restarted_cowd(cowd, programs, tmp_path, engine):
    base = tmp_path / "data.bin"
    content = make_base(base)
    first, second, third = (0, b"while up"), (100, b"while down"), (200, b"after")
    fifos = [tmp_path / "go1", tmp_path / "go2"]
    for fifo in fifos:
        os.mkfifo(fifo)
    steps = [
        f"w{hexarg(*first)}",
        "s",
        f"g{fifos[0]}",
        f"w{hexarg(*second)}",
        "s",
        f"g{fifos[1]}",
        "s",
        f"w{hexarg(*third)}",
    ]
    argv = [COWCTL, "--socket", cowd.socket, "run", "--path", str(base), "--"]
    argv += [str(programs / "mapscript"), str(base), *steps]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, env=engine_env(engine))
    again = None
    try:
        fd = open_when_read(fifos[0], proc)
        assert cowd.stop() == 0
        os.write(fd, b"x")
        os.close(fd)

        # The program committed into the void, then waits again.
        fd = open_when_read(fifos[1], proc)
        assert base.read_bytes() == content
        again = restart(tmp_path)
        os.write(fd, b"x")
        os.close(fd)
        assert proc.wait(timeout=RUN_TIMEOUT) == 0
        stderr = proc.stderr.read()

        failed = [line for line in libcow_lines(stderr) if "failed" in line]
        assert len(failed) == 1 and "will be retried" in failed[0]
        assert base.read_bytes() == content
        expected = apply(content, [first, second, third])
        assert merged(again, base, tmp_path) == expected
    finally:
        proc.kill()
        proc.wait()
        if again is not None:
            assert again.stop() == 0
