"""A stand-in for cowd's pteditor engine, run inside the test VM.

It holds /dev/pteditor, the only open descriptor the device allows, and
serves swap and restore requests from several client processes at once
over a Unix socket, identifying each client by the credentials the
kernel reports for its connection, as cowd will.  The clients
(``ptetest client``) map one shared base file, have their pages swapped
to private copies, write to them, and then end in different ways: unmap,
normal exit, SIGKILL, explicit restore.  When all are gone, the device
must track no swapped entry and the base file must be unchanged; the
harness checks the kernel log.

The device calls are cowd's own (cowd._pteditor), so what this server
shows of concurrent clients holds for the daemon too.

Usage: ptserver.py PTETEST [--clients N] [--pages N]
"""

import argparse
import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile

import trio

from cowd._pteditor import DEVICE, Device, Refused

# The clients' wire format (see ptetest.c): op, target, copy as u64;
# the reply is one i64, a count or 0, or a negative errno.
REQUEST = struct.Struct("=3Q")
REPLY = struct.Struct("=q")
OP_SWAP, OP_RESTORE, OP_COUNT = 1, 2, 3

# How the clients end, in turn.
MODES = ("unmap", "exit", "kill", "restore")


def peer_pid(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)

    return struct.unpack("3i", creds)[0]


def serve_one(device, pid, op, target, copy):
    """Carry out one request; the reply value."""
    try:
        if op == OP_SWAP:
            device.swap(pid, target, copy)
        elif op == OP_RESTORE:
            device.restore(pid, target)
        elif op == OP_COUNT:
            return device.swapped(pid)
        else:
            return -errno.EINVAL
    except Refused as exc:
        return -(exc.errno or errno.EIO)

    return 0


async def receive_exactly(stream, size):
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            return None
        data += chunk

    return data


async def handle_client(device, stream):
    """Answer one client's requests until it disconnects or dies.

    The device calls run in worker threads, so requests of different
    clients reach the module at the same time.
    """
    pid = peer_pid(stream.socket)
    async with stream:
        while (data := await receive_exactly(stream, REQUEST.size)) is not None:
            reply = await trio.to_thread.run_sync(
                serve_one, device, pid, *REQUEST.unpack(data)
            )
            await stream.send_all(REPLY.pack(reply))


async def run_client(ptetest, sock, base, pages, mode, failures):
    """Start one client, kill it if its mode says so, judge its end."""
    argv = [ptetest, "client", sock, base, str(pages), mode]
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    try:
        output = b""
        while chunk := await proc.stdout.receive_some():
            output += chunk
            if mode == "kill" and b"ready" in output:
                proc.send_signal(signal.SIGKILL)
                break
        status = await proc.wait()
    finally:
        proc.kill()
        await proc.stdout.aclose()
    want = -signal.SIGKILL if mode == "kill" else 0
    if status != want:
        failures.append(f"client {proc.pid} ({mode}) ended with {status}")


async def main(ptetest, clients, pages):
    device = Device()
    try:
        os.close(os.open(DEVICE, os.O_RDWR))
        return "a second open of the device was allowed"
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            return f"a second open failed with {exc}, not EBUSY"

    tmp = tempfile.mkdtemp(prefix="ptserver-")
    sock_path, base = os.path.join(tmp, "sock"), os.path.join(tmp, "base")
    await trio.run_process([ptetest, "mkbase", base, str(pages)])
    with open(base, "rb") as f:
        original = f.read()

    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(sock_path)
    listener.listen(clients)
    listeners = [trio.SocketListener(listener)]
    failures = []
    with trio.fail_after(180):
        async with trio.open_nursery() as server:
            server.start_soon(
                trio.serve_listeners,
                lambda stream: handle_client(device, stream),
                listeners,
            )
            async with trio.open_nursery() as nursery:
                for i in range(clients):
                    mode = MODES[i % len(MODES)]
                    nursery.start_soon(
                        run_client, ptetest, sock_path, base, pages, mode, failures
                    )
            server.cancel_scope.cancel()

    left = device.swapped()
    if left:
        failures.append(f"{left} entries still swapped after all clients")
    with open(base, "rb") as f:
        if f.read() != original:
            failures.append("the base file changed")
    if failures:
        return "; ".join(failures)
    print(f"ptserver: {clients} clients served, nothing left swapped")

    return None


def cli():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ptetest")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pages", type=int, default=16)
    args = parser.parse_args()
    error = trio.run(main, args.ptetest, args.clients, args.pages)
    if error:
        print(f"FAIL: concurrent: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
