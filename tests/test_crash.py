"""Crashes at every step: a merge's output is all or nothing, a torn
commit is never half applied, and base files are never touched.

cowd is killed from inside, at its Nth crash point, for every N until a
merge completes (COWD_TEST_KILL_AT, read by cowd/_merging.py); clients
are killed with SIGKILL between and inside the frames of a commit.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import Session, start_cowd
from cowd.protocol import Unavailable

PAGE = 4096


def prepare_logs(tmp_path, base, sessions=4, batches=6):
    """Commit batches from several sessions; return the expected merge."""
    cowd = start_cowd(tmp_path)
    rng = random.Random(7)
    expected = bytearray(base.read_bytes())
    try:
        for s in range(sessions):
            session = Session(cowd, base)
            for _ in range(batches):
                # Disjoint slices per session: no conflicts.
                offset = rng.randrange(0, len(expected) // sessions - 64)
                offset += s * (len(expected) // sessions)
                data = rng.randbytes(rng.randrange(1, 64))
                session.commit((offset, data))
                expected[offset : offset + len(data)] = data
            session.end()
    finally:
        assert cowd.stop() == 0
    return bytes(expected)


# A merge passes well under this many crash points; the bound only
# stops a test that never completes a merge.
MAX_KILLS = 400

# Progress reports are crash points; made frequent, they fall all along
# the engine's passes over logs, spill and output.
KILL_ENV = {"COWD_TEST_REPORT_EVERY": "0.0005"}

# What each way of merging leaves where, and how a test reads it back.
MODES = ["output-file", "state-folder", "in-place"]


def merge_once(cowd, base, out, mode):
    client = cowd.client()
    if mode == "output-file":
        return client.merge_all(str(base), str(out))
    if mode == "in-place":
        return client.merge_all(str(base), in_place=True)
    return client.merge_all(str(base))


@pytest.mark.parametrize("mode", MODES)
def test_cowd_killed_at_every_merge_step_leaves_nothing_half_done(tmp_path, mode):
    base = tmp_path / "base"
    base.write_bytes(bytes(range(256)) * (24576 * PAGE // 256))
    pristine = base.read_bytes()
    expected = prepare_logs(tmp_path, base, sessions=8, batches=40)
    out = tmp_path / "out"
    final = {
        "output-file": out,
        "state-folder": tmp_path / "state" / "merges" / "merge_all_base",
        "in-place": base,
    }[mode]

    for kill_at in range(1, MAX_KILLS + 1):
        cowd = start_cowd(tmp_path, env=KILL_ENV | {"COWD_TEST_KILL_AT": str(kill_at)})
        try:
            merge_once(cowd, base, out, mode)
        except Unavailable:
            assert cowd.proc.wait(timeout=20) == -signal.SIGKILL
            # The output is absent, or whole if the kill came after its
            # rename; the base is untouched (in place, the client renames
            # only once cowd has answered).
            assert base.read_bytes() == pristine
            if mode != "in-place":
                assert not final.exists() or final.read_bytes() == expected
            leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
            assert leftovers == []
            continue
        assert cowd.stop() == 0
        break
    else:
        raise AssertionError(f"no merge completed in {MAX_KILLS} tries")

    killed = kill_at - 1
    assert final.read_bytes() == expected
    if mode != "in-place":
        assert base.read_bytes() == pristine
    assert killed >= 20, f"only {killed} crash points were reached"
    print(f"{mode}: cowd killed at crash points 1..{killed}, then merged")


# A client that commits one big batch as several frames, pausing before
# each so the test can kill it at an exact point.  It reads one line
# from stdin before each frame (and before the second half of each
# frame, to die inside one) and says "ready" on stdout.
CLIENT = textwrap.dedent(
    """
    import array, os, socket, sys
    import msgpack
    from cowd import protocol

    sock_path, path, frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sock_path)
    replies = protocol.unpacker()

    def reply():
        while True:
            for msg in replies:
                return msg[3]
            replies.feed(sock.recv(65536))

    def call(msgid, method, params, fds=()):
        frame = protocol.request(msgid, method, params)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sock.sendmsg([frame], rights if fds else [])
        return reply()

    def step():
        print("ready", flush=True)
        sys.stdin.readline()

    call(1, "hello", {"pid": os.getpid(), "engine": "remap"})
    handle = call(2, "map", {"fds": 1}, [os.open(path, os.O_RDONLY)])["log"]
    call(3, "commit", {"log": handle, "records": [[0, b"first"]]})
    for n in range(frames):
        record = [4096 * (n + 1), b"x" * 3000]
        params = {"log": handle, "records": [record], "more": n < frames - 1}
        frame = protocol.request(10 + n, "commit", params)
        step()
        sock.sendall(frame[: len(frame) // 2])
        step()
        sock.sendall(frame[len(frame) // 2 :])
        reply()
    step()
    """
)


def test_client_killed_inside_a_commit_never_leaves_half_a_batch(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(bytes(8 * PAGE))
    frames = 4
    first = bytearray(base.read_bytes())
    first[0:5] = b"first"
    whole = bytearray(first)
    for n in range(frames):
        whole[PAGE * (n + 1) : PAGE * (n + 1) + 3000] = b"x" * 3000

    points = 2 * frames + 1
    for kill_after in range(points):
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, cowd.socket, str(base), str(frames)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(kill_after + 1):
            assert proc.stdout.readline() == b"ready\n"
            if _ < kill_after:
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
        proc.kill()
        proc.wait()

        out = tmp_path / f"out{kill_after}"
        wait_for_session_end(cowd)
        cowd.client().merge_all(str(base), str(out), on_conflict="last")
        # Only a client that sent the last frame has committed the batch.
        committed = kill_after == points - 1
        assert out.read_bytes() == bytes(whole if committed else first)


def wait_for_session_end(cowd):
    deadline = time.monotonic() + 20
    while cowd.client().sessions():
        assert time.monotonic() < deadline
        time.sleep(0.02)


WRITER = textwrap.dedent(
    """
    import mmap, sys
    with open(sys.argv[1], "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[:] = bytes([int(sys.argv[2])]) * len(m)
        print("written", flush=True)
    """
)


def test_writer_killed_during_its_commit_is_all_or_nothing(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(bytes(2048 * PAGE))  # 8 MiB: a commit of several frames
    rng = random.Random(11)
    outcomes = set()
    for attempt in range(1, 25):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cowclient",
                "--socket",
                cowd.socket,
                "run",
                "--path",
                str(base),
                "--",
                sys.executable,
                "-c",
                WRITER,
                str(base),
                str(attempt),
            ],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout.readline() == b"written\n"
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_for_session_end(cowd)

        out = tmp_path / "out"
        cowd.client().merge_all(str(base), str(out), on_conflict="last")
        content = out.read_bytes()
        values = set(content)
        assert len(values) == 1, "a batch was applied in part"
        outcomes.add("committed" if values != {0} else "lost")
        assert base.read_bytes() == bytes(2048 * PAGE)
    print(f"writer kills: {sorted(outcomes)}")
