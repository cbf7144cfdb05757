"""Helpers for the tests of programs that run under ``cowctl run``.

``ENGINES`` selects how libcow makes written pages private: the remap
engine alone, or the uffd engine, to which every mapping switches at its
first write.  The tests that run a program under both use them.
"""

from __future__ import annotations

import os

PAGE = os.sysconf("SC_PAGE_SIZE")

ENGINES = {
    # The switch point is far above anything a test writes.
    "remap": {"COW_SWITCH_PAGES": "1000000000"},
    # Every mapping switches at its first write.
    "uffd": {"COW_SWITCH_PAGES": "0"},
}


def engine_env(engine: str, **extra: str) -> dict[str, str]:
    """The environment of a managed program run with ``engine``."""
    return {**os.environ, **ENGINES[engine], **extra}


def make_base(path, size: int = 3 * PAGE) -> bytes:
    """Fill ``path`` with ``size`` bytes that differ from their neighbours."""
    content = bytes((i * 7 + 3) % 251 for i in range(size))
    path.write_bytes(content)

    return content


def apply(content: bytes, writes) -> bytes:
    """``content`` with each (offset, bytes) of ``writes`` written over it."""
    out = bytearray(content)
    for offset, data in writes:
        out[offset : offset + len(data)] = data

    return bytes(out)


def merged(cowd, base, tmp_path) -> bytes:
    """merge-all of ``base`` into a new file; returns its bytes."""
    out = tmp_path / "merged.out"
    result = cowd.cowctl("merge-all", "-s", str(base), "-o", str(out))
    assert result.returncode == 0, result.stderr

    return out.read_bytes()


def records_by_session(cowd, base) -> dict[str, list[tuple[int, bytes]]]:
    """Every committed record of ``base``'s logs, by session, in order."""
    found: dict[str, list[tuple[int, bytes]]] = {}
    with cowd.client() as client:
        for log in client.logs(file=str(base)):
            shown = client.log_show(log["path"])
            records = found.setdefault(log["session"], [])
            for batch in shown["batches"]:
                records.extend((offset, data) for offset, data in batch["records"])

    return found


def libcow_lines(stderr: bytes) -> list[str]:
    """The lines libcow printed on a program's stderr."""
    return [line for line in stderr.decode().splitlines() if line.startswith("libcow:")]


def switch_lines(stderr: bytes) -> list[str]:
    """libcow's lines saying a mapping switched to the uffd engine."""
    return [line for line in libcow_lines(stderr) if "userfaultfd" in line]
