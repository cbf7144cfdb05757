"""``cowctl bench``: the report, not the timings.

The benchmark measures first writes under libcow against the kernel's
own copy-on-write; these tests only check that it runs and reports a
ratio for each engine, never how fast anything is.
"""

from __future__ import annotations

import re
import sys

from conftest import run
from cowclient._bench import bench_program

RATIO = re.compile(rb"^ratio (remap|uffd)/kernel: \d+\.\d$", re.MULTILINE)

# Drives cowclient._bench as cowctl does.
DRIVER = """
import argparse, sys
from cowclient import Client, _bench
parser = argparse.ArgumentParser()
_bench.add_arguments(parser)
args = parser.parse_args(sys.argv[2:])
with Client(sys.argv[1]) as client:
    sys.exit(_bench.run(client, args))
"""


def test_the_bench_module_reports_a_ratio_per_engine(cowd, tmp_path):
    argv = [sys.executable, "-c", DRIVER, cowd.socket, "--pages", "300"]

    result = run([*argv, "--runs", "3", "--dir", str(tmp_path)])

    assert result.returncode == 0, result.stderr
    assert sorted(RATIO.findall(result.stdout)) == [b"remap", b"uffd"]
    assert cowd.client().logs() == []


def test_cowctl_bench_prints_a_ratio_line(cowd):
    result = cowd.cowctl("bench", "--pages", "300", "--runs", "1")

    assert result.returncode == 0, result.stderr
    assert RATIO.search(result.stdout)


def test_a_shared_mapping_libcow_does_not_manage_is_not_timed(tmp_path):
    # The bench's managed runs are timed only if their writes stay out of
    # the file: without libcow, a MAP_SHARED run is refused.
    data = tmp_path / "data"
    data.write_bytes(bytes(range(256)) * 64)

    shared = run([bench_program(), str(data), "4", "shared"])
    private = run([bench_program(), str(data), "4", "private"])

    assert shared.returncode == 1
    assert b"not a private view" in shared.stderr
    assert private.returncode == 0, private.stderr
    assert data.read_bytes() == bytes(range(256)) * 64
