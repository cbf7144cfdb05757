"""The two pieces of systemd's protocol cowd speaks: socket activation
(LISTEN_FDS) and readiness notification (NOTIFY_SOCKET).

Both are small enough that writing them here beats a dependency; both
do nothing when systemd did not start the daemon.
"""

from __future__ import annotations

import os
import socket

# The first descriptor systemd passes; SD_LISTEN_FDS_START in its docs.
LISTEN_FDS_START = 3


def listen_socket() -> socket.socket | None:
    """The listening socket systemd handed over, or None.

    The environment variables are removed once read, so programs cowd
    might start never mistake them for their own.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None or int(pid) != os.getpid():
        return None
    if int(count) < 1:
        return None
    sock = socket.socket(fileno=LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValueError("the socket passed by systemd is not a Unix stream socket")
    os.set_inheritable(LISTEN_FDS_START, False)

    return sock


def notify(state: str) -> bool:
    """Tell the service manager about a state change, if it listens.

    Notification is advisory: a manager that went away is no reason to
    stop serving, so failures are reported by the return value only.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        ) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError:
        return False

    return True
