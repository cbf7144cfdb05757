"""cowctl: the command line for users and admins of cowd.

Every command speaks RPC through the client library.  Errors are one
line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any, NoReturn

from cowclient import _bench, _demo
from cowclient._native import libcow_path
from cowclient._rpc import Client
from cowclient._text import record_line
from cowd.protocol import CowError

# Engines libcow can run; others are refused before the program starts.
ENGINES = ("auto", "remap", "pteditor", "uffd")

_GLOB_CHARS = "*?["


class UsageError(Exception):
    """The command line asks for something that cannot be done."""


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except (CowError, UsageError) as exc:
        _fail(str(exc))
    except OSError as exc:
        name = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{name}{exc.strerror or exc}")
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status or 0)


def _fail(message: str, status: int = 1) -> NoReturn:
    print(f"cowctl: {message}", file=sys.stderr)
    sys.exit(status)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one line every other error gets.

    Subcommand parsers are made of the same class, so they say it too.
    """

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see '{self.prog} --help')", status=2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cowctl", description="Talk to cowd: sessions, logs, merges.")
    parser.add_argument(
        "--socket", help="cowd's socket (default: $COWD_SOCKET or /run/cowd/cowd.sock)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("status", help="show the daemon's state")
    _add_json(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sessions", help="list client sessions")
    p.add_argument("--all", action="store_true", help="include ended sessions")
    _add_json(p)
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("logs", help="list logs")
    p.add_argument("--file", help="only logs of this base file")
    _add_json(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("log", help="inspect one log")
    log_sub = p.add_subparsers(dest="log_command", required=True, metavar="ACTION")
    p = log_sub.add_parser("show", help="print a log's committed records")
    p.add_argument("log", metavar="LOG", help="log path, as `cowctl logs` lists")
    _add_json(p)
    p.set_defaults(func=cmd_log_show)

    p = sub.add_parser("run", help="run a program with managed mappings")
    p.add_argument(
        "--engine", default="auto", help="auto (default), remap, pteditor or uffd"
    )
    p.add_argument(
        "--path",
        action="extend",
        nargs="+",
        required=True,
        metavar="PATTERN",
        help="manage MAP_SHARED mappings of files matching PATTERN",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("merge", help="apply one log to a copy of its base")
    p.add_argument("-s", "--source", required=True, metavar="SOURCE")
    p.add_argument("-l", "--log", required=True, metavar="LOG")
    _add_output(p)
    p.add_argument("--force", action="store_true", help="merge onto another file")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "merge-all", aliases=["merge_all"], help="apply every log of a base"
    )
    p.add_argument("-s", "--source", required=True, metavar="SOURCE")
    _add_output(p)
    p.add_argument(
        "--on-conflict",
        choices=("fail", "last", "first"),
        default="fail",
        help="refuse conflicting writes (default) or keep the last/first",
    )
    p.add_argument("--force", action="store_true", help="merge onto a changed file")
    p.set_defaults(func=cmd_merge_all)

    p = sub.add_parser("verify", help="check logs batch by batch")
    p.add_argument("logs", nargs="*", metavar="LOG", help="default: all your logs")
    _add_json(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("prune", help="remove logs that merges already hold")
    p.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="only logs created more than DAYS days ago",
    )
    p.add_argument("--dry-run", action="store_true", help="only list them")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "bench", help="time first writes against the kernel's copy-on-write"
    )
    _bench.add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="replay the original demo end to end")
    _demo.add_arguments(p)
    p.set_defaults(func=cmd_demo)

    return parser


def _add_output(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", metavar="OUT", help="write the result here")
    where.add_argument(
        "--in-place",
        action="store_true",
        help="replace SOURCE atomically; mappings of the old version keep it",
    )
    parser.add_argument(
        "--no-sync",
        dest="sync",
        action="store_false",
        help="with -o: do not wait for the disk (a machine crash may lose OUT)",
    )


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=_json_bytes)
    print()


def _json_bytes(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [header] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# -- commands -------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> None:
    with _client(args) as client:
        status = client.status()
    if args.json:
        _print_json(status)
        return
    for key in ("version", "pid", "engine", "socket", "state_dir", "sessions", "logs"):
        print(f"{key}: {status[key]}")
    if "swapped" in status:
        print(f"swapped: {status['swapped']} (restored by {status['restores']})")
    print(f"uptime: {status['uptime']:.0f}s")


def cmd_sessions(args: argparse.Namespace) -> None:
    with _client(args) as client:
        sessions = client.sessions(all=args.all)
    if args.json:
        _print_json(sessions)
        return
    rows = [
        [
            s["session"],
            s["pid"],
            s["uid"],
            s["engine"],
            "live" if s["live"] else "ended",
            s["logs"],
            _when(s["started"]),
            s["argv0"],
        ]
        for s in sessions
    ]
    header = ["SESSION", "PID", "UID", "ENGINE", "STATE", "LOGS", "STARTED", "PROGRAM"]
    _table(rows, header)


def cmd_logs(args: argparse.Namespace) -> None:
    with _client(args) as client:
        logs = client.logs(file=args.file)
    if args.json:
        _print_json(logs)
        return
    rows = [
        [
            log["path"],
            log.get("session"),
            log.get("file"),
            log.get("commits"),
            log.get("records"),
            log.get("error") or _log_health(log),
        ]
        for log in logs
    ]
    _table(rows, ["PATH", "SESSION", "FILE", "COMMITS", "RECORDS", "STATE"])


def _log_health(log: dict) -> str:
    if log.get("corrupt_at") is not None:
        return f"corrupt at byte {log['corrupt_at']}"
    if log.get("pending_bytes"):
        return f"{log['pending_bytes']} uncommitted bytes"
    return "ok"


def cmd_log_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        shown = client.log_show(args.log)
    if args.json:
        _print_json(shown)
        return
    for batch in shown["batches"]:
        for offset, data in batch["records"]:
            print(record_line(offset, data))
    if shown.get("corrupt_at") is not None:
        print(
            f"cowctl: {shown['path']}: {shown['corrupt_reason']}"
            f" at byte {shown['corrupt_at']}; nothing after it is shown",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> None:
    command = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("run needs a command after --")
    if args.engine not in ENGINES:
        raise UsageError(f"engine {args.engine} is not available in this build")
    with _client(args) as client:
        served = client.status().get("engine")
        socket_path = os.path.abspath(client.socket_path)
    # pteditor swaps pages through cowd's device: only that cowd can.
    if args.engine == "pteditor" and served != "pteditor":
        raise UsageError(
            f"engine pteditor is not available: cowd runs the {served} engine"
        )
    env = dict(os.environ)
    preload = env.get("LD_PRELOAD")
    env["LD_PRELOAD"] = libcow_path() + (f" {preload}" if preload else "")
    env["COW_PATHS"] = "\n".join(absolute_pattern(p) for p in args.path)
    env["COWD_SOCKET"] = socket_path
    env["COW_ENGINE"] = args.engine
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"cowctl: {command[0]}: {exc.strerror}", file=sys.stderr)
        sys.exit(127)


def absolute_pattern(pattern: str) -> str:
    """Anchor a pattern at the current folder and resolve its fixed part.

    libcow matches patterns against the resolved path of each mapped
    file, so a symbolic link in the part before the first wildcard is
    resolved here.
    """
    pattern = os.path.abspath(pattern)
    parts = pattern.split("/")
    fixed = 0
    while fixed < len(parts) and not any(c in parts[fixed] for c in _GLOB_CHARS):
        fixed += 1
    head = os.path.realpath("/".join(parts[:fixed]) or "/")
    rest = parts[fixed:]

    return os.path.join(head, *rest) if rest else head


def cmd_merge(args: argparse.Namespace) -> None:
    with _client(args) as client, _progress_bar() as bar:
        result = client.merge(
            args.source,
            args.log,
            args.output,
            force=args.force,
            in_place=args.in_place,
            on_progress=bar,
            sync=args.sync,
        )
    _print_merge(result)


def cmd_merge_all(args: argparse.Namespace) -> None:
    with _client(args) as client, _progress_bar() as bar:
        result = client.merge_all(
            args.source,
            args.output,
            on_conflict=args.on_conflict,
            force=args.force,
            in_place=args.in_place,
            on_progress=bar,
            sync=args.sync,
        )
    _print_merge(result)


def _print_merge(result: dict) -> None:
    if result.get("noop"):
        print(f"{result['output']} already holds every committed batch")
        return
    print(
        f"merged {result['batches']} batches from {result['logs']} logs"
        f" into {result['output']}"
    )


@contextlib.contextmanager
def _progress_bar():
    """A progress callback drawing a bar on a terminal, or None."""
    if not sys.stderr.isatty():
        yield None
        return
    drawn = False

    def draw(event: dict) -> None:
        nonlocal drawn
        total = max(event.get("total") or 1, 1)
        share = min(event.get("done", 0) / total, 1.0)
        filled = int(share * _BAR_WIDTH)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        phase = event.get("phase", "")
        sys.stderr.write(f"\r[{bar}] {share * 100:5.1f}% {phase:<8}")
        sys.stderr.flush()
        drawn = True

    try:
        yield draw
    finally:
        if drawn:
            sys.stderr.write("\n")


_BAR_WIDTH = 40


def cmd_verify(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reports = client.verify(args.logs)
    if args.json:
        _print_json(reports)
    else:
        for report in reports:
            print(_verify_line(report))

    return 0 if all(report["ok"] for report in reports) else 1


def _verify_line(report: dict) -> str:
    if "error" in report:
        return f"{report['path']}: BAD: {report['error']}"
    good = report["good"]
    seqs = f" (seq {good[0][0]}..{good[-1][0]})" if good else ""
    line = f"{report['path']}: {len(good)} good batches{seqs}"
    if report["corrupt_at"] is not None:
        line += (
            f"; CORRUPT at byte {report['corrupt_at']}: {report['corrupt_reason']},"
            " nothing from there on is applied"
        )
    if report["pending_bytes"]:
        line += f"; {report['pending_bytes']} bytes of an uncommitted batch at the end"

    return line


def cmd_prune(args: argparse.Namespace) -> None:
    days = args.older_than
    if days is not None and not 0 <= days < math.inf:
        raise UsageError(f"--older-than takes a number of days >= 0, not {days}")
    older = args.older_than * 86400 if args.older_than is not None else None
    with _client(args) as client:
        result = client.prune(older_than=older, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in result["pruned"]:
        print(f"{verb} {path}")
    print(f"{verb} {len(result['pruned'])} logs")


def cmd_bench(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            return _bench.run(client, args)
        except _bench.BenchError as exc:
            raise UsageError(str(exc)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        _demo.check_arguments(args)
        with _client(args) as client:
            return _demo.run(client, args)
    except _demo.DemoError as exc:
        raise UsageError(str(exc)) from None
