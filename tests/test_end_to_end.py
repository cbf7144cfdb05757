"""Real programs under ``cowctl run`` with libcow preloaded, end to end.

Each test starts its own cowd, runs unmodified programs that write
through MAP_SHARED mappings, and checks the three promises: the base
file is untouched, the log holds what the program changed, and
merge-all reproduces exactly what it wrote.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap

import pytest
from managed import PAGE, apply, make_base

from conftest import hexarg, run


def merge_all(cowd, base, out, *extra):
    return cowd.cowctl("merge-all", "-s", str(base), "-o", str(out), *extra)


WRITES = [
    (0, b"first bytes"),
    (PAGE - 5, b"crosses\na page"),
    (2 * PAGE + 100, b"nul\0inside\0\nand newline"),
]


@pytest.mark.parametrize("commit_point", ["munmap", "msync", "exit"])
def test_writes_stay_private_and_merge_all_reproduces_them(
    cowd, programs, tmp_path, commit_point
):
    base = tmp_path / "data.bin"
    content = make_base(base)
    flags = {"munmap": [], "msync": ["--msync", "--keep"], "exit": ["--keep"]}
    args = [hexarg(off, data) for off, data in WRITES]

    result = cowd.run(
        [str(tmp_path / "*.bin")],
        str(programs / "writer"),
        str(base),
        *flags[commit_point],
        *args,
    )

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    out = tmp_path / "merged"
    merged = merge_all(cowd, base, out)
    assert merged.returncode == 0, merged.stderr
    assert out.read_bytes() == apply(content, WRITES)


def test_log_records_only_the_bytes_that_differ(cowd, programs, tmp_path):
    base = tmp_path / "data.bin"
    base.write_bytes(b"----- Hello World! -----")

    cowd.run([str(base)], str(programs / "writer"), str(base), hexarg(15, b"lxx"))

    (log,) = json.loads(cowd.cowctl("logs", "--json", check=True).stdout)
    shown = cowd.cowctl("log", "show", log["path"], check=True)
    assert shown.stdout == b"Offset: 16, Length: 2, Data: xx\n"


def test_files_outside_the_patterns_are_left_alone(cowd, programs, tmp_path):
    managed, other = tmp_path / "managed.bin", tmp_path / "other.dat"
    managed.write_bytes(b"a" * 64)
    other.write_bytes(b"a" * 64)
    writer = str(programs / "writer")

    cowd.run([str(tmp_path / "*.bin")], writer, str(managed), hexarg(0, b"Z"))
    cowd.run([str(tmp_path / "*.bin")], writer, str(other), hexarg(0, b"Z"))

    assert managed.read_bytes() == b"a" * 64
    assert other.read_bytes() == b"Z" + b"a" * 63
    assert [e["file"] for e in cowd.client().logs()] == [str(managed)]


def two_writers(cowd, programs, tmp_path):
    base = tmp_path / "data.bin"
    content = make_base(base, PAGE)
    for data in (b"AAAA", b"BBBB"):
        result = cowd.run(
            [str(base)], str(programs / "writer"), str(base), hexarg(40, data)
        )
        assert result.returncode == 0, result.stderr
    return base, content


def test_conflicting_writers_are_refused_and_named(cowd, programs, tmp_path):
    base, _ = two_writers(cowd, programs, tmp_path)
    out = tmp_path / "merged"
    sessions = [s["session"] for s in cowd.client().sessions(all=True)]

    result = merge_all(cowd, base, out)

    err = result.stderr.decode()
    assert result.returncode == 1
    assert err.count("\n") == 1
    assert "1 conflicting range (4 bytes): 40-44" in err
    assert all(session in err for session in sessions)
    assert not out.exists()


@pytest.mark.parametrize(("policy", "winner"), [("last", b"BBBB"), ("first", b"AAAA")])
def test_on_conflict_resolves_by_commit_order(cowd, programs, tmp_path, policy, winner):
    base, content = two_writers(cowd, programs, tmp_path)
    out = tmp_path / "merged"

    result = merge_all(cowd, base, out, "--on-conflict", policy)

    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == apply(content, [(40, winner)])


def test_null_dereference_still_dies_by_sigsegv(cowd, programs, tmp_path):
    base = tmp_path / "data.bin"
    make_base(base)
    command = (
        f"'{sys.executable}' -m cowclient --socket '{cowd.socket}' run"
        f" --path '{tmp_path}/*' -- '{programs / 'nullderef'}'"
    )

    # The timeout is the check that the fault is not retried forever.
    result = run(["sh", "-c", f"{command}; echo $?"], timeout=30)

    assert result.stdout.strip().splitlines()[-1] == b"139"


def test_write_to_a_read_only_mapping_still_crashes(cowd, programs, tmp_path):
    base = tmp_path / "data.bin"
    content = make_base(base)

    result = cowd.run([str(base)], str(programs / "readonly_write"), str(base))

    assert result.returncode == -signal.SIGSEGV
    assert base.read_bytes() == content


def test_python_mmap_module_works_under_cowctl_run(cowd, tmp_path):
    base = tmp_path / "data.bin"
    content = make_base(base)
    script = textwrap.dedent(
        f"""
        import mmap
        with open({str(base)!r}, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[10:15] = b"py\\n\\0!"
            assert m[10:15] == b"py\\n\\0!"
        """
    )

    result = cowd.run([str(base)], sys.executable, "-c", script)

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    merge_all(cowd, base, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == apply(content, [(10, b"py\n\0!")])


def test_c_api_records_exactly_the_bytes_written(cowd, programs, tmp_path):
    base = tmp_path / "data.bin"
    base.write_bytes(b"----- Hello World! -----")
    env = {**os.environ, "COWD_SOCKET": cowd.socket}

    result = run([str(programs / "api_writer"), str(base), hexarg(15, b"lxx")], env=env)

    assert result.returncode == 0, result.stderr
    (log,) = cowd.client().logs()
    shown = cowd.cowctl("log", "show", log["path"], check=True)
    assert shown.stdout == b"Offset: 15, Length: 3, Data: lxx\n"
    assert base.read_bytes() == b"----- Hello World! -----"


def test_python_client_mapping_writes_privately(cowd, tmp_path):
    base = tmp_path / "data.bin"
    content = make_base(base)
    script = textwrap.dedent(
        f"""
        from cowclient import Mapping
        with Mapping({str(base)!r}, socket={cowd.socket!r}) as m:
            m.write({PAGE - 2}, b"\\0\\nhi")
            assert m[{PAGE - 2}:{PAGE + 2}] == b"\\0\\nhi"
            m.commit()
            m.write(0, b"second")
        """
    )

    result = run([sys.executable, "-c", script])

    assert result.returncode == 0, result.stderr
    assert base.read_bytes() == content
    merge_all(cowd, base, tmp_path / "out")
    expected = apply(content, [(PAGE - 2, b"\0\nhi"), (0, b"second")])
    assert (tmp_path / "out").read_bytes() == expected
    (log,) = cowd.client().logs()
    assert log["commits"] == 2


def test_demo_runs_end_to_end(cowd, tmp_path):
    result = cowd.cowctl(
        "demo", "--dir", str(tmp_path / "demo"), "--files", "2", "--processes", "3"
    )

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.decode()
    assert "Offset: 15, Length: 3, Data: xxx" in out
    assert "demo passed" in out
    merged = tmp_path / "demo" / "merge" / "merge_all_file1"
    assert merged.read_bytes() == b"----- Hello Worxxx -----"
