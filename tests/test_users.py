"""Who sees what: cowd as root serving several users, and as a user.

The unprivileged side runs as the conventional ``nobody`` user through
setpriv(1); cowd knows callers only by the credentials the kernel gives
it, so this is the real thing, not a simulation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import COWCTL, commit_through_rpc, hexarg, run, start_cowd

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def shared_dir(programs):
    """A folder both root and nobody can use (pytest's tmp_path is 0700),
    holding a copy of the writer program."""
    path = Path(tempfile.mkdtemp(prefix="cowd-users-"))
    path.chmod(0o755)
    mine = path / "nobody"
    mine.mkdir()
    os.chown(mine, NOBODY, NOBODY)
    shutil.copy(programs / "writer", path / "writer")
    yield path
    shutil.rmtree(path)


def as_nobody(cowd, *args, **kw):
    return run([*AS_NOBODY, COWCTL, "--socket", cowd.socket, *args], **kw)


def nobody_file(shared_dir, name, content):
    path = shared_dir / "nobody" / name
    path.write_bytes(content)
    os.chown(path, NOBODY, NOBODY)
    return path


def test_users_see_and_merge_only_their_own_logs(shared_dir):
    cowd = start_cowd(shared_dir)
    try:
        root_base = shared_dir / "root.bin"
        root_base.write_bytes(b"r" * 32)
        _, root_log = commit_through_rpc(cowd, root_base, [[0, b"R"]])
        base = nobody_file(shared_dir, "data.bin", b"n" * 32)

        wrote = as_nobody(
            cowd,
            "run",
            "--path",
            str(base),
            "--",
            str(shared_dir / "writer"),
            str(base),
            hexarg(3, b"N"),
        )
        assert wrote.returncode == 0, wrote.stderr

        mine = json.loads(as_nobody(cowd, "logs", "--json", check=True).stdout)
        assert [entry["file"] for entry in mine] == [str(base)]
        everything = json.loads(cowd.cowctl("logs", "--json", check=True).stdout)
        assert len(everything) == 2

        refused = as_nobody(cowd, "log", "show", root_log)
        assert refused.returncode == 1
        assert b"belongs to another user" in refused.stderr

        out = shared_dir / "nobody" / "merged"
        as_nobody(cowd, "merge-all", "-s", str(base), "-o", str(out), check=True)
        assert out.read_bytes() == b"nnnNnnnn" + b"n" * 24
        assert out.stat().st_uid == NOBODY
        assert base.read_bytes() == b"n" * 32
    finally:
        assert cowd.stop() == 0


def test_cowd_runs_as_an_ordinary_user(shared_dir):
    home = shared_dir / "nobody"
    cowd = start_cowd(home, prefix=AS_NOBODY)
    try:
        assert (home / "state").stat().st_uid == NOBODY
        assert oct((home / "cowd.sock").stat().st_mode & 0o777) == oct(0o600)
        base = nobody_file(shared_dir, "data.bin", b"n" * 32)

        wrote = as_nobody(
            cowd,
            "run",
            "--path",
            str(base),
            "--",
            str(shared_dir / "writer"),
            str(base),
            hexarg(0, b"\0\n"),
        )
        assert wrote.returncode == 0, wrote.stderr

        out = home / "merged"
        as_nobody(cowd, "merge-all", "-s", str(base), "-o", str(out), check=True)
        assert out.read_bytes() == b"\0\n" + b"n" * 30
        assert base.read_bytes() == b"n" * 32
    finally:
        assert cowd.stop() == 0
