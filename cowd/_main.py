"""The ``cowd`` command: parse options, set up, serve until told to stop."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import socket
import sys

import structlog
import trio

import cowd
from cowd import _logging, _pteditor, _server, _systemd
from cowd._daemon import ENGINES, Daemon
from cowd._state import State

log = structlog.get_logger()

# Backlog of the listening socket; clients connect once per process.
_BACKLOG = 128


class SetupError(Exception):
    """The daemon cannot start; the message says why, in one line."""


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    _logging.configure(args.log_level)
    device = None
    try:
        # The device first: a cowd that cannot serve its engine must not
        # take the socket from one that can.
        if args.engine == "pteditor":
            device = _pteditor.Device()
        state = State(args.state_dir)
        listener, owned = _listener(args.socket)
    except (SetupError, _pteditor.Unavailable, OSError, ValueError) as exc:
        print(f"cowd: {exc}", file=sys.stderr)
        sys.exit(1)
    path = listener.getsockname() or args.socket
    daemon = Daemon(state, args.engine, path, sync=args.sync, device=device)
    try:
        trio.run(_run, daemon, listener)
    finally:
        if owned:
            _unlink_quietly(path)
        listener.close()
        if device is not None:
            device.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cowd",
        description="Serve private copy-on-write views of shared file mappings.",
    )
    parser.add_argument(
        "--socket",
        help="Unix socket to listen on; not needed when systemd passes one",
    )
    parser.add_argument(
        "--state-dir",
        required=True,
        help="folder for logs and merge outputs (created if missing)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="how private page copies are made (default: auto)",
    )
    parser.add_argument(
        "--no-sync",
        dest="sync",
        action="store_false",
        help="answer commits before their batch is fsynced: faster, but a"
        " machine crash may lose the last committed batches (never tear one)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
    )
    parser.add_argument("--version", action="version", version=cowd.__version__)

    return parser


def _listener(path: str | None) -> tuple[socket.socket, bool]:
    """The listening socket, and whether cowd created its file."""
    inherited = _systemd.listen_socket()
    if inherited is not None:
        return inherited, False
    if not path:
        raise SetupError("--socket is required unless systemd passes a socket")
    _clear_stale_socket(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        # Root serves every user and checks each caller's credentials;
        # an ordinary user's daemon serves only that user.
        os.chmod(path, 0o666 if os.getuid() == 0 else 0o600)
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise

    return sock, True


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a daemon that died; refuse a live one."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise SetupError(f"{path} exists and is not a socket") from None
        raise
    finally:
        probe.close()
    raise SetupError(f"another cowd is already listening on {path}")


async def _run(daemon: Daemon, listener: socket.socket) -> None:
    sock = trio.socket.from_stdlib_socket(listener)
    async with trio.open_nursery() as nursery:
        # Ready is announced only once a stop request would be honoured.
        await nursery.start(_stop_on_signal, nursery.cancel_scope)
        nursery.start_soon(
            _server.serve, sock, daemon.methods, daemon.connection_closed
        )
        log.info(
            "cowd started",
            version=cowd.__version__,
            pid=os.getpid(),
            socket=daemon.socket_path,
            state_dir=daemon.state.root,
            engine=daemon.engine,
            sync=daemon.sync,
            **daemon.device_facts(),
        )
        _systemd.notify("READY=1\nSTATUS=serving")
    log.info("cowd stopped")


async def _stop_on_signal(
    scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("stopping", signal=signal.Signals(signum).name)
            _systemd.notify("STOPPING=1")
            scope.cancel()
            return


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
