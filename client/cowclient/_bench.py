"""``cowctl bench``: what a first write costs under libcow, side by side
with the kernel's own copy-on-write.

The timing is done by ``cow-bench``, a C program installed beside
libcow: it maps a file, touches every page, then times one store to
each page.  Each round runs it several ways on the same file: mapped
MAP_PRIVATE, where the kernel copies each page on its first write (the
reference), and mapped MAP_SHARED under libcow, once with the remap
engine, once with the uffd engine and, when the cowd asked runs the
pteditor engine, once with that engine.  Rounds alternate the order of
the runs, and the report gives the median of each and their ratios to
the kernel's cost.

The remap and uffd runs are given a socket nobody listens on; the
pteditor runs need cowd, which swaps their pages.  All write each byte
back unchanged, so they have nothing to commit, and cowd keeps no log
of the benchmark.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from dataclasses import dataclass

from cowclient._native import installed, libcow_path
from cowclient._rpc import Client

# Enough pages for the timer's resolution to vanish in the mean, few
# enough for the remap engine to stay below vm.max_map_count.
DEFAULT_PAGES = 20_000

# Odd, so that the median is one of the runs.
DEFAULT_RUNS = 5

# Seconds one run may take; far more than any sane machine needs.
RUN_TIMEOUT = 300

# Prefix of the line libcow prints when the uffd engine is unavailable.
_NO_UFFD = "libcow: cannot switch"


@dataclass(frozen=True)
class Setup:
    """One way of running the benchmark program."""

    name: str
    label: str
    mode: str
    env: dict[str, str]


class BenchError(Exception):
    """The benchmark cannot run, or its program failed."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pages",
        type=int,
        default=DEFAULT_PAGES,
        help=f"pages written per run ({DEFAULT_PAGES})",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=DEFAULT_RUNS,
        help=f"runs of each kind, interleaved ({DEFAULT_RUNS})",
    )
    parser.add_argument(
        "--dir", help="folder for the test file (default: a temporary one)"
    )


def run(client: Client | None, args: argparse.Namespace) -> int:
    """Run the benchmark and print its report; return the exit status."""
    if args.pages < 1 or args.runs < 1:
        raise BenchError("--pages and --runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="cowd-bench-", dir=args.dir) as work:
        path = _make_file(work, args.pages)
        engine = client.status().get("engine", "?") if client is not None else "?"
        setups = _setups(path, work, args.pages)
        if engine == "pteditor" and client is not None:
            setups.append(_pteditor_setup(path, client.socket_path))
        times = _measure(path, args.pages, args.runs, setups)
    _report(args, engine, setups, times)

    return 0


def bench_program() -> str:
    """Absolute path of cow-bench as installed with this package."""
    return installed("cow-bench")


def _make_file(folder: str, pages: int) -> str:
    path = os.path.join(folder, "bench.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(pages * os.sysconf("SC_PAGE_SIZE")))

    return path


def _managed(path: str, socket_path: str) -> dict[str, str]:
    """The environment under which libcow manages mappings of path."""
    return {
        "LD_PRELOAD": libcow_path(),
        "COW_PATHS": path,
        "COWD_SOCKET": os.path.abspath(socket_path),
    }


def _setups(path: str, folder: str, pages: int) -> list[Setup]:
    managed = _managed(path, os.path.join(folder, "no-cowd.sock"))
    # The remap run must not switch engines half way: the switch point
    # is raised above what it makes.
    remap = {**managed, "COW_SWITCH_PAGES": str(2 * pages + 16)}
    uffd = {**managed, "COW_SWITCH_PAGES": "0"}

    return [
        Setup("kernel", "kernel copy-on-write (MAP_PRIVATE)", "private", {}),
        Setup("remap", "libcow remap engine (MAP_SHARED)", "shared", remap),
        Setup("uffd", "libcow uffd engine (MAP_SHARED)", "shared", uffd),
    ]


def _pteditor_setup(path: str, socket_path: str) -> Setup:
    env = {**_managed(path, socket_path), "COW_ENGINE": "pteditor"}

    return Setup("pteditor", "libcow pteditor engine (MAP_SHARED)", "shared", env)


def _measure(
    path: str, pages: int, runs: int, setups: list[Setup]
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {s.name: [] for s in setups}
    unavailable: set[str] = set()
    for round_no in range(runs):
        shift = round_no % len(setups)
        for setup in setups[shift:] + setups[:shift]:
            if setup.name in unavailable:
                continue
            took = _run_once(path, pages, setup)
            if took is None:
                unavailable.add(setup.name)
                continue
            times[setup.name].append(took)

    return times


def _run_once(path: str, pages: int, setup: Setup) -> float | None:
    """ns per page of one run, or None when its engine is unavailable."""
    argv = [bench_program(), path, str(pages), setup.mode]
    env = {**os.environ, **setup.env}
    result = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    if result.returncode != 0:
        raise BenchError(f"cow-bench failed: {result.stderr.strip()}")
    if setup.name == "uffd" and _NO_UFFD in result.stderr:
        return None
    name, _, value = result.stdout.strip().partition(" ")
    if name != "ns_per_page":
        raise BenchError(f"unexpected output from cow-bench: {result.stdout!r}")

    return float(value)


def _report(
    args: argparse.Namespace,
    engine: str,
    setups: list[Setup],
    times: dict[str, list[float]],
) -> None:
    print(
        f"first write to each of {args.pages} pages, median of {args.runs} runs"
        f" and their range (cowd engine: {engine})"
    )
    medians = {name: statistics.median(v) for name, v in times.items() if v}
    width = max(len(s.label) for s in setups)
    for setup in setups:
        runs = times.get(setup.name)
        shown = "not available"
        if runs:
            shown = (
                f"{medians[setup.name] / 1000:.2f} us/page"
                f" ({min(runs) / 1000:.2f} to {max(runs) / 1000:.2f})"
            )
        print(f"  {setup.label:<{width}}  {shown}")
    kernel = medians["kernel"]
    for setup in setups[1:]:
        if setup.name in medians:
            print(f"ratio {setup.name}/kernel: {medians[setup.name] / kernel:.1f}")
