"""Where the installed native parts (libcow, cow-bench) live."""

from __future__ import annotations

import os

# They are installed beside this module, as plain files: a shared
# library cannot be loaded from anywhere else.
_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native")


def installed(name: str) -> str:
    """Absolute path of the native file name as installed with this package."""
    path = os.path.join(_FOLDER, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not installed at {path}")

    return path


def libcow_path() -> str:
    """Absolute path of libcow.so as installed with this package."""
    return installed("libcow.so")
