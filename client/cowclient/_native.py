"""Where the installed libcow lives."""

from __future__ import annotations

import os
from importlib import resources


def libcow_path() -> str:
    """Absolute path of libcow.so as installed with this package."""
    path = os.fspath(resources.files("cowclient") / "_native" / "libcow.so")
    if not os.path.exists(path):
        raise FileNotFoundError(f"libcow.so is not installed at {path}")

    return path
