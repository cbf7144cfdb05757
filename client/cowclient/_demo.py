"""``cowctl demo``: the original prototype's demo, end to end.

init   create FILES base files holding TEXT
test   start PROCESSES writer processes under ``cowctl run``; each maps
       every file MAP_SHARED, writes DATA at OFFSET and unmaps, which
       faults, makes private copies and commits to its own log
show   print one writer's log and show the base files are unchanged
merge  merge-all each file and print the result

Every constant of the prototype is an option here.  The demo checks
what it shows and exits non-zero if anything differs from what it
promised.
"""

from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import tempfile

from cowclient._rpc import Client
from cowclient._text import record_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", help="work folder (default: a new temporary one)")
    parser.add_argument("--files", type=int, default=1, help="base files (1)")
    parser.add_argument("--processes", type=int, default=1, help="writers (1)")
    parser.add_argument("--offset", type=int, default=15, help="write offset (15)")
    parser.add_argument("--data", default="xxx", help="bytes each writer writes")
    parser.add_argument(
        "--text", default="----- Hello World! -----", help="initial file content"
    )


class DemoError(Exception):
    """The demo's options ask for something it cannot show, or it broke."""


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse options the demo cannot honour, before anything starts."""
    if args.files < 1:
        raise DemoError(f"--files must be at least 1, not {args.files}")
    if args.processes < 1:
        raise DemoError(f"--processes must be at least 1, not {args.processes}")
    if args.offset < 0:
        raise DemoError(f"--offset must not be negative, not {args.offset}")
    # Bytes as the writer gets them: argv that is not UTF-8 stays intact.
    text, data = os.fsencode(args.text), os.fsencode(args.data)
    if not data:
        raise DemoError("--data must not be empty: the writers would write nothing")
    if args.offset + len(data) > len(text):
        raise DemoError(
            f"--offset {args.offset} with {len(data)} bytes of --data"
            f" does not fit in the {len(text)} bytes of --text"
        )


def run(client: Client, args: argparse.Namespace) -> int:
    check_arguments(args)
    text, data = os.fsencode(args.text), os.fsencode(args.data)
    work = args.dir or tempfile.mkdtemp(prefix="cowd-demo-")
    files = _init(work, args.files, text)
    _test(client.socket_path, files, args.processes, args.offset, data)
    ok = _show(client, files, text)
    expected = text[: args.offset] + data + text[args.offset + len(data) :]
    ok &= _merge(client, work, files, expected)
    print("demo passed" if ok else "demo FAILED")

    return 0 if ok else 1


def _init(work: str, count: int, text: bytes) -> list[str]:
    folder = os.path.join(work, "files")
    os.makedirs(folder, exist_ok=True)
    files = []
    for i in range(count):
        path = os.path.join(folder, f"file{i}")
        with open(path, "wb") as f:
            f.write(text)
        files.append(path)
    print(f"[init] {count} files created in {folder}, each holding {text!r}")

    return files


def _test(socket: str, files: list[str], processes: int, offset: int, data: bytes):
    pattern = os.path.join(os.path.dirname(files[0]), "*")
    cowctl = [sys.executable, "-m", "cowclient", "--socket", socket]
    writer = [sys.executable, "-m", "cowclient._demo", str(offset), data.hex()]
    children = [
        subprocess.Popen([*cowctl, "run", "--path", pattern, "--", *writer, *files])
        for _ in range(processes)
    ]
    for child in children:
        if child.wait() != 0:
            raise DemoError(f"writer process {child.pid} failed ({child.returncode})")
    print(f"[test] {processes} processes wrote {data!r} at offset {offset}")


def _show(client: Client, files: list[str], text: bytes) -> bool:
    logs = client.logs(file=files[0])
    if not logs:
        print(f"[show] no log for {files[0]}")
        return False
    first = min(logs, key=lambda entry: entry["path"])
    print(f"[show] {len(logs)} logs for {files[0]}; {first['path']}:")
    for batch in client.log_show(first["path"])["batches"]:
        for offset, data in batch["records"]:
            print(record_line(offset, data))
    unchanged = all(_read(path) == text for path in files)
    print(f"[show] base files unchanged: {'yes' if unchanged else 'NO'}")

    return unchanged


def _merge(client: Client, work: str, files: list[str], expected: bytes) -> bool:
    folder = os.path.join(work, "merge")
    os.makedirs(folder, exist_ok=True)
    ok = True
    for path in files:
        out = os.path.join(folder, f"merge_all_{os.path.basename(path)}")
        result = client.merge_all(path, out)
        merged = _read(out)
        ok &= merged == expected
        print(
            f"[merge] {result['batches']} batches from {result['logs']} logs"
            f" -> {out}: {merged!r}"
        )

    return ok


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(offset: int, data: bytes, files: list[str]) -> None:
    """The writer process: a plain program with no knowledge of cowd."""
    for path in files:
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[offset : offset + len(data)] = data
            if m[offset : offset + len(data)] != data:
                sys.exit(f"{path}: read back differs from what was written")


if __name__ == "__main__":
    _write(int(sys.argv[1]), bytes.fromhex(sys.argv[2]), sys.argv[3:])
