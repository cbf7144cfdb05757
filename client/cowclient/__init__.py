"""Python client library for cowd.

``Client`` speaks cowd's RPC: status, sessions, logs, merges.
``Mapping`` opens a managed mapping of a file through libcow: reads see
the file, writes stay private to this process and are committed to its
log.  cowctl is built on both.
"""

from cowclient._native import libcow_path
from cowclient._rpc import DEFAULT_SOCKET, Client, default_socket
from cowd.protocol import (
    BaseMismatch,
    Conflict,
    CorruptLog,
    CowError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProtocolError,
    Unavailable,
)

__all__ = [
    "DEFAULT_SOCKET",
    "BaseMismatch",
    "Client",
    "Conflict",
    "CorruptLog",
    "CowError",
    "InvalidArgument",
    "Mapping",
    "NotFound",
    "PermissionDenied",
    "ProtocolError",
    "Unavailable",
    "default_socket",
    "libcow_path",
]


def __getattr__(name: str):
    # Mapping loads libcow through cffi; only pay for that when used.
    if name == "Mapping":
        from cowclient._mapping import Mapping

        return Mapping
    raise AttributeError(name)
