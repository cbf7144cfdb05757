"""Managed mappings for Python programs, through libcow's C API.

libcow is loaded with cffi in ABI mode (dlopen), so nothing is compiled
against Python.  Loaded this way rather than preloaded, libcow's
constructor sees no COW_PATHS and does nothing; the SIGSEGV handler and
the connection to cowd are set up by the first ``cow_map`` call.
"""

from __future__ import annotations

import os
import threading

import cffi

from cowclient._native import libcow_path
from cowd.protocol import CowError, InvalidArgument

_CDEF = """
void *cow_map(int fd, size_t length, long offset);
int cow_write(void *map, size_t offset, const void *data, size_t len);
int cow_commit(void *map);
int cow_unmap(void *map);
"""

_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
_lib = None
_lock = threading.Lock()


def _libcow():
    global _lib
    with _lock:
        if _lib is None:
            _lib = _ffi.dlopen(libcow_path())

    return _lib


class Mapping:
    """A private, logged view of a file.

    Reads see the file and this mapping's own writes; writes never reach
    the file.  ``commit()`` makes the writes since the last commit one
    durable batch in this process's log; ``close()`` commits and unmaps.
    The file only needs to be readable.
    """

    def __init__(
        self,
        path: str,
        length: int | None = None,
        offset: int = 0,
        socket: str | None = None,
    ) -> None:
        if socket is not None:
            # libcow reads COWD_SOCKET when it first connects.
            os.environ["COWD_SOCKET"] = socket
        lib = _libcow()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if length is None:
                length = os.fstat(fd).st_size - offset
            if length <= 0:
                raise InvalidArgument(f"{path}: nothing to map")
            addr = lib.cow_map(fd, length, offset)
            if addr == _ffi.NULL:
                err = _ffi.errno
                raise OSError(err, f"cow_map: {os.strerror(err)}", path)
        finally:
            os.close(fd)
        self.path = path
        self.length = length
        self._addr = addr
        self._view = _ffi.buffer(_ffi.cast("char *", addr), length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index):
        self._check_open()
        return self._view[index]

    def write(self, offset: int, data: bytes) -> None:
        """Write data at offset (relative to the mapping), recorded exactly."""
        self._check_open()
        _check(_libcow().cow_write(self._addr, offset, data, len(data)), "cow_write")

    def commit(self) -> None:
        self._check_open()
        _check(_libcow().cow_commit(self._addr), "cow_commit")

    def close(self) -> None:
        if self._addr is None:
            return
        addr, self._addr = self._addr, None
        self._view = None
        _check(_libcow().cow_unmap(addr), "cow_unmap")

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._addr is None:
            raise ValueError("mapping is closed")


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise CowError(f"{what}: {os.strerror(-rc)}", errno=-rc)
