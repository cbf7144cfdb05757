"""Benchmark: merge-all against cp of the same base, side by side.

Builds a base file and NLOGS logs of RECORDS records each (as cowd
writes them, each session in its own slice of the file so that the
merge has no conflicts), starts a fresh cowd on them, and times four
commands alternately, several rounds, in one run, each writing a new
file: ``merge-all -o``, which syncs its output before renaming it into
place; ``cp`` of the base, which leaves the copy in the page cache;
``merge-all -o --no-sync``, which does too; and ``cp`` followed by a
sync of the copy.  So each merge has a copy as durable as its output to
be compared with.  It prints each command's median and best time and
the ratios, and cowd's peak resident memory (VmHWM), for two log sizes,
so that the memory figure can be seen not to grow with the logs.

On a disk shared with others, the time a sync takes varies from run to
run far more than copying in memory does, so the best times show what
the commands cost better than the medians when the disk is busy; both
are printed.

    python tests/bench/merge.py [--size-mib 1024] [--logs 64]
        [--records 10000] [--scale 4] [--rounds 9] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import COWCTL, start_cowd  # noqa: E402
from cowd._logfile import LogWriter  # noqa: E402

RECORD_SIZE = 64
BATCH = 100


def make_base(path: Path, size: int) -> None:
    chunk = 64 << 20
    rng = random.Random(1)
    with open(path, "wb") as f:
        for done in range(0, size, chunk):
            f.write(rng.randbytes(min(chunk, size - done)))
        f.flush()
        os.fsync(f.fileno())


def make_logs(state: Path, base: Path, nlogs: int, records: int) -> None:
    """Write logs as cowd would, with interleaved global sequence numbers."""
    st = base.stat()
    logs_dir = state / "logs"
    logs_dir.mkdir(parents=True)
    slice_size = st.st_size // nlogs
    writers = []
    for n in range(nlogs):
        folder = logs_dir / f"bench-{n}"
        folder.mkdir()
        meta = {
            "file": str(base),
            "dev": st.st_dev,
            "ino": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "session": f"bench-{n}",
            "pid": 0,
            "uid": os.getuid(),
            "created": time.time(),
        }
        writers.append(LogWriter.create(str(folder / "base.log"), meta))
    rng = random.Random(2)
    seq = 0
    for _ in range(records // BATCH):
        for n, writer in enumerate(writers):
            low = n * slice_size
            batch = [
                (
                    low + rng.randrange(slice_size - RECORD_SIZE),
                    rng.randbytes(RECORD_SIZE),
                )
                for _ in range(BATCH)
            ]
            writer.append(batch)
            seq += 1
            writer.commit(seq, sync=False)
    for writer in writers:
        writer.close()
    (state / "seq").write_text(f"{seq}\n")


def peak_memory_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def timed(argv: list[str], output: Path) -> float:
    """Seconds argv takes to write output, which it creates anew."""
    # Each command writes a new file, none replaces an old one: freeing a
    # gigabyte of page cache inside one command's time and not another's
    # would weigh on the comparison.  What earlier commands left dirty is
    # written back first, so that no command pays for another's pages.
    output.unlink(missing_ok=True)
    os.sync()
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(work: Path, base: Path, nlogs: int, records: int, rounds: int) -> dict:
    run_dir = work / f"run-{records}"
    run_dir.mkdir()
    make_logs(run_dir / "state", base, nlogs, records)
    log_bytes = sum(p.stat().st_size for p in (run_dir / "state").rglob("*.log"))
    cowd = start_cowd(run_dir)
    try:
        cowctl = [COWCTL, "--socket", cowd.socket]
        merged, copied = work / "merged", work / "copied"
        merge = [*cowctl, "merge-all", "-s", str(base), "-o", str(merged)]
        copy = ["cp", str(base), str(copied)]
        synced_copy = ["sh", "-c", f"cp '{base}' '{copied}' && sync '{copied}'"]
        merges, copies, unsynced, synced = [], [], [], []
        for _ in range(rounds):
            copies.append(timed(copy, copied))
            synced.append(timed(synced_copy, copied))
            merges.append(timed(merge, merged))
            unsynced.append(timed([*merge, "--no-sync"], merged))
        peak = peak_memory_kib(cowd.proc.pid)
    finally:
        cowd.stop()
    return {
        "records": nlogs * records,
        "log_mib": log_bytes / 2**20,
        "merge": merges,
        "cp": copies,
        "merge_no_sync": unsynced,
        "cp_sync": synced,
        "peak_kib": peak,
    }


def _column(times: list[float]) -> str:
    return f"{statistics.median(times):5.2f} ({min(times):.2f})"


def _ratio(times: list[float], than: list[float]) -> str:
    median = statistics.median(times) / statistics.median(than)

    return f"{median:5.2f} ({min(times) / min(than):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--logs", type=int, default=64)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--scale", type=int, default=4, help="second run: x records")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cowd-bench-", dir=args.dir))
    try:
        base = work / "base"
        make_base(base, args.size_mib << 20)
        results = [
            measure(work, base, args.logs, records, args.rounds)
            for records in (args.records, args.records * args.scale)
        ]
    finally:
        shutil.rmtree(work)

    print(
        f"base {args.size_mib} MiB, {args.logs} logs, {args.rounds} rounds each;"
        " seconds and ratios: median (best)"
    )
    rows = [
        ("merge-all", "merge"),
        ("cp", "cp"),
        ("merge-all --no-sync", "merge_no_sync"),
        ("cp + sync", "cp_sync"),
    ]
    ratios = [
        ("merge-all / (cp + sync)", "merge", "cp_sync"),
        ("merge-all --no-sync / cp", "merge_no_sync", "cp"),
        ("merge-all / cp", "merge", "cp"),
    ]
    for r in results:
        print(
            f"\n{r['records']} records, {r['log_mib']:.1f} MiB of logs;"
            f" cowd's peak resident memory {r['peak_kib'] / 1024:.1f} MiB"
        )
        for name, key in rows:
            print(f"  {name:<26} {_column(r[key])} s")
        for name, key, than in ratios:
            print(f"  {name:<26} {_ratio(r[key], r[than])}")


if __name__ == "__main__":
    main()
