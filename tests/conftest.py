"""Fixtures that start the real daemon and build the real test programs.

Each test gets its own cowd, listening on a socket in tmp_path with its
state there too; readiness is taken from cowd's own sd_notify message,
so the fixture also proves READY=1 is sent.  The C programs under
tests/programs are compiled once per run against the installed libcow.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cowclient import Client, libcow_path

TESTS = Path(__file__).parent
ROOT = TESTS.parent

# Generous bounds for a shared, noisy machine: these only stop a hung
# test from hanging the run, they measure nothing.
START_TIMEOUT = 20
RUN_TIMEOUT = 60


def _tool(name: str) -> str:
    """A command installed beside the running interpreter."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name) or name


COWD = _tool("cowd")
COWCTL = _tool("cowctl")


@dataclass
class Cowd:
    """A running daemon and the ways tests talk to it."""

    socket: str
    state_dir: Path
    proc: subprocess.Popen
    log_path: Path

    def client(self) -> Client:
        return Client(self.socket)

    def cowctl(
        self, *args: str, check: bool = False, **kw
    ) -> subprocess.CompletedProcess:
        return run([COWCTL, "--socket", self.socket, *args], check=check, **kw)

    def run(
        self, patterns: list[str], *command: str, **kw
    ) -> subprocess.CompletedProcess:
        """Run a program under ``cowctl run`` with the given patterns."""
        return self.cowctl("run", "--path", *patterns, "--", *command, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=START_TIMEOUT)
        return self.proc.returncode


def run(argv: list[str], check: bool = False, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("timeout", RUN_TIMEOUT)
    result = subprocess.run(argv, **kw)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{argv} exited {result.returncode}\n"
            f"stdout: {result.stdout!r}\nstderr: {result.stderr!r}"
        )
    return result


def start_cowd(
    tmp_path: Path, *extra: str, prefix: list[str] = (), env: dict | None = None
) -> Cowd:
    """Start cowd and wait for its READY=1 notification.

    ``prefix`` is put before the command, to run cowd as another user;
    ``env`` adds environment variables.
    """
    sock_path = str(tmp_path / "cowd.sock")
    state_dir = tmp_path / "state"
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    os.chmod(notify_path, 0o666)
    notify.settimeout(START_TIMEOUT)
    log_path = tmp_path / "cowd.log"
    env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": notify_path}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *prefix,
                COWD,
                "--socket",
                sock_path,
                "--state-dir",
                str(state_dir),
                *extra,
            ],
            stderr=log,
            env=env,
        )
    try:
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
    except TimeoutError:
        proc.kill()
        log_text = log_path.read_text()
        raise AssertionError(f"cowd never became ready:\n{log_text}") from None
    finally:
        notify.close()
        os.unlink(notify_path)

    return Cowd(sock_path, state_dir, proc, log_path)


@pytest.fixture
def cowd(tmp_path: Path):
    daemon = start_cowd(tmp_path)
    yield daemon
    rc = daemon.stop()
    assert rc == 0, f"cowd exited {rc}:\n{daemon.log_path.read_text()}"
    assert "Traceback" not in daemon.log_path.read_text()


@pytest.fixture(scope="session")
def programs(tmp_path_factory) -> Path:
    """The C test programs, compiled against the installed libcow."""
    out = tmp_path_factory.mktemp("programs")
    lib = Path(libcow_path())
    include = lib.parent / "include"
    for source in sorted((TESTS / "programs").glob("*.c")):
        argv = ["cc", "-O1", "-Wall", "-o", str(out / source.stem), str(source)]
        argv += [f"-I{include}", f"-L{lib.parent}", f"-Wl,-rpath,{lib.parent}"]
        argv += ["-Wl,--as-needed", "-lcow", "-lpthread"]
        run(argv, check=True)

    return out


@pytest.fixture(scope="session")
def early(tmp_path_factory) -> Path:
    """earlymain, linked with libearly, whose constructor runs before
    libcow's (tests/programs/early)."""
    out = tmp_path_factory.mktemp("early")
    src = TESTS / "programs" / "early"
    lib = ["cc", "-shared", "-fPIC", "-O1", "-Wall", "-o", str(out / "libearly.so")]
    run([*lib, str(src / "early.c"), "-lpthread"], check=True)
    main = [
        "cc",
        "-O1",
        "-Wall",
        "-o",
        str(out / "earlymain"),
        str(src / "earlymain.c"),
    ]
    main += [f"-L{out}", "-learly", f"-Wl,-rpath,{out}", "-lpthread"]
    run(main, check=True)

    return out / "earlymain"


class Session:
    """A client session driven over RPC exactly as libcow drives one:
    hello, map a file (passing its descriptor), commit batches."""

    def __init__(self, cowd: Cowd, path) -> None:
        self.client = cowd.client()
        self.client.call("hello", {"pid": os.getpid(), "engine": "remap"})
        fd = os.open(path, os.O_RDONLY)
        try:
            reply = self.client.call("map", {}, [fd])
        finally:
            os.close(fd)
        self.handle = reply["log"]
        self.log_path = reply["path"]

    def commit(self, *records) -> int | None:
        params = {"log": self.handle, "records": [list(r) for r in records]}
        return self.client.call("commit", params)["seq"]

    def end(self) -> None:
        self.client.close()


def commit_through_rpc(cowd: Cowd, path, records) -> tuple[Client, str]:
    """One session committing one batch; returns its client and log path."""
    session = Session(cowd, path)
    session.commit(*records)
    return session.client, session.log_path


def hexarg(offset: int, data: bytes) -> str:
    """An OFFSET:HEXDATA argument for the writer programs."""
    return f"{offset}:{data.hex()}"
