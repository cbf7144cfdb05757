"""The daemon on its socket: framing, bad input, identity, shutdown."""

from __future__ import annotations

import os
import signal

import msgpack
import pytest
import trio

from conftest import start_cowd
from cowd import protocol


async def connect(cowd) -> trio.SocketStream:
    return await trio.open_unix_socket(cowd.socket)


async def call(stream, msg) -> list:
    await stream.send_all(msgpack.packb(msg))
    return await read_frame(stream)


async def read_frame(stream) -> list:
    unpacker = msgpack.Unpacker(raw=False)
    with trio.fail_after(10):
        while True:
            for msg in unpacker:
                return msg
            data = await stream.receive_some()
            if not data:
                return None
            unpacker.feed(data)


async def test_status_answers_over_msgpack_rpc(cowd):
    stream = await connect(cowd)

    reply = await call(stream, [0, 7, "status", [{}]])

    assert reply[:3] == [1, 7, None]
    assert reply[3]["pid"] == cowd.proc.pid
    assert reply[3]["uid"] == os.getuid()


async def test_unknown_method_gets_an_error_reply_and_the_connection_lives(cowd):
    stream = await connect(cowd)

    reply = await call(stream, [0, 1, "no_such_thing", [{}]])
    assert reply[2]["code"] == "not-found"

    reply = await call(stream, [0, 2, "status", [{}]])
    assert reply[2] is None


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1",  # a byte msgpack never uses
        msgpack.packb([0, "id", "status", [{}]]),
        msgpack.packb([0, 1, "status", "not-an-array"]),
        msgpack.packb({"not": "a request"}),
    ],
)
async def test_malformed_frames_close_only_that_connection(cowd, frame):
    bystander = await connect(cowd)
    stream = await connect(cowd)

    await stream.send_all(frame)
    reply = await read_frame(stream)

    assert reply is None or reply[:2] == [2, "error"]
    assert (await call(bystander, [0, 1, "status", [{}]]))[2] is None


async def test_oversized_frame_is_refused_without_buffering_it(cowd):
    stream = await connect(cowd)
    # A bin32 header announcing more than MAX_FRAME, then data.
    header = b"\x94\x00\x01\xa6commit\x91\x81\xa4blob\xc6" + (
        protocol.MAX_FRAME + 1
    ).to_bytes(4, "big")
    await stream.send_all(header)
    with trio.move_on_after(10):
        try:
            while True:
                await stream.send_all(b"\0" * (1 << 20))
        except trio.BrokenResourceError:
            pass

    assert (await call(await connect(cowd), [0, 1, "status", [{}]]))[2] is None


async def test_commit_before_hello_is_refused(cowd):
    stream = await connect(cowd)

    reply = await call(stream, [0, 1, "commit", [{"log": 0, "records": []}]])

    assert reply[2]["code"] == "protocol"


def test_sigterm_stops_cowd_cleanly_and_removes_its_socket(tmp_path):
    daemon = start_cowd(tmp_path)

    daemon.proc.send_signal(signal.SIGTERM)

    assert daemon.proc.wait(timeout=20) == 0
    assert not os.path.exists(daemon.socket)
    assert "cowd stopped" in daemon.log_path.read_text()


def test_a_second_cowd_on_a_live_socket_refuses_in_one_line(cowd, tmp_path):
    from conftest import COWD, run

    result = run([COWD, "--socket", cowd.socket, "--state-dir", str(tmp_path / "x")])

    assert result.returncode != 0
    assert result.stderr.decode().strip().count("\n") == 0
    assert "already listening" in result.stderr.decode()
