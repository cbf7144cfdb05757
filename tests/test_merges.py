"""Merges people can trust: in place, incremental, verified, pruned.

Sessions here are driven over RPC by the test itself (hello, map,
commit), which is exactly what libcow sends, so each step of a session's
life can be placed between merges.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

from conftest import COWCTL, RUN_TIMEOUT, Session, start_cowd


def test_in_place_merge_replaces_the_base_and_keeps_old_mappings(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(b"0123456789")
    old = open(base, "rb")  # noqa: SIM115 - held across the merge
    s = Session(cowd, base)
    s.commit((0, b"AB"))

    cowd.cowctl("merge-all", "-s", str(base), "--in-place", check=True)

    assert base.read_bytes() == b"AB23456789"
    assert old.read() == b"0123456789"
    old.close()


def test_merge_after_in_place_applies_only_what_is_new(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(b"0123456789")
    s = Session(cowd, base)
    s.commit((0, b"A"))
    cowd.client().merge_all(str(base), in_place=True)
    first_inode = base.stat().st_ino

    again = cowd.client().merge_all(str(base), in_place=True)
    assert again["noop"] is True
    assert base.stat().st_ino == first_inode

    s.commit((1, b"B"))
    later = Session(cowd, base)  # a session of the merged file itself
    later.commit((9, b"Z"))
    result = cowd.client().merge_all(str(base), in_place=True)

    assert result["batches"] == 2
    assert base.read_bytes() == b"AB2345678Z"


def test_merge_refuses_a_log_made_from_an_older_version(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(b"0123456789")
    Session(cowd, base).commit((0, b"A"))
    os.utime(base, ns=(0, 0))

    result = cowd.cowctl("merge-all", "-s", str(base), "-o", str(tmp_path / "out"))

    assert result.returncode == 1
    assert b"changed since" in result.stderr
    assert not (tmp_path / "out").exists()


def corrupt_one_batch(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(b"0123456789")
    s = Session(cowd, base)
    s.commit((0, b"good"))
    s.commit((5, b"bad"))
    log = Path(s.log_path)
    raw = bytearray(log.read_bytes())
    raw[-20] ^= 0x40  # inside the second batch's record data
    log.write_bytes(bytes(raw))
    return base, s.log_path


def test_verify_names_good_batches_and_where_corruption_starts(cowd, tmp_path):
    base, log_path = corrupt_one_batch(cowd, tmp_path)

    result = cowd.cowctl("verify", log_path)

    assert result.returncode == 1
    line = result.stdout.decode()
    assert line.startswith(f"{log_path}: 1 good batches")
    assert "CORRUPT at byte" in line

    (report,) = json.loads(cowd.cowctl("verify", "--json").stdout)
    assert report["corrupt_at"] == report["good"][0][2]


def test_merge_refuses_a_corrupt_log_naming_path_and_offset(cowd, tmp_path):
    base, log_path = corrupt_one_batch(cowd, tmp_path)
    out = tmp_path / "out"

    result = cowd.cowctl("merge-all", "-s", str(base), "-o", str(out))

    err = result.stderr.decode()
    assert result.returncode == 1
    assert err.count("\n") == 1
    assert log_path in err and "at byte" in err
    assert not out.exists()
    assert base.read_bytes() == b"0123456789"


def test_prune_removes_only_fully_merged_logs_of_ended_sessions(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(b"0123456789")
    merged, unmerged, live = (Session(cowd, base) for _ in range(3))
    merged.commit((0, b"A"))
    live.commit((1, b"B"))
    cowd.client().merge_all(str(base), in_place=True)
    unmerged.commit((2, b"C"))
    merged.end()
    unmerged.end()

    dry = cowd.cowctl("prune", "--dry-run", check=True)
    assert dry.stdout.decode().splitlines() == [
        f"would remove {merged.log_path}",
        "would remove 1 logs",
    ]
    cowd.cowctl("prune", check=True)

    remaining = {entry["path"] for entry in cowd.client().logs()}
    assert remaining == {unmerged.log_path, live.log_path}
    assert not os.path.exists(os.path.dirname(merged.log_path))


def test_merge_reports_progress_to_the_client(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(bytes(1 << 20))
    Session(cowd, base).commit((4096, b"x"))
    events = []

    cowd.client().merge_all(str(base), str(tmp_path / "out"), on_progress=events.append)

    assert events, "no progress notification arrived"
    assert events[-1]["done"] == events[-1]["total"]


def test_cowctl_draws_a_progress_bar_on_a_terminal(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(bytes(1 << 20))
    Session(cowd, base).commit((0, b"x"))
    parent, child = pty.openpty()
    argv = [COWCTL, "--socket", cowd.socket, "merge-all", "-s", str(base)]
    argv += ["-o", str(tmp_path / "out")]

    proc = subprocess.run(
        argv, stderr=child, stdout=subprocess.PIPE, timeout=RUN_TIMEOUT
    )
    os.close(child)
    drawn = os.read(parent, 65536).decode()
    os.close(parent)

    assert proc.returncode == 0
    assert "100.0%" in drawn and "[####" in drawn


def test_no_sync_daemon_still_commits_and_merges(tmp_path):
    cowd = start_cowd(tmp_path, "--no-sync")
    try:
        base = tmp_path / "base"
        base.write_bytes(b"0123456789")
        Session(cowd, base).commit((3, b"xyz"))
        cowd.cowctl("merge-all", "-s", str(base), "-o", str(tmp_path / "o"), check=True)
        assert (tmp_path / "o").read_bytes() == b"012xyz6789"
    finally:
        assert cowd.stop() == 0


def test_merge_all_no_sync_writes_the_same_file_and_no_manifest(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(b"0123456789" * 100_000)
    s = Session(cowd, base)
    s.commit((3, b"xyz"), (500_000, b"\0\n"))
    synced, unsynced = tmp_path / "synced", tmp_path / "unsynced"
    manifests = cowd.state_dir / "manifests"

    cowd.cowctl("merge-all", "-s", str(base), "-o", str(synced), check=True)
    before = set(os.listdir(manifests))
    cowd.cowctl(
        "merge-all", "-s", str(base), "-o", str(unsynced), "--no-sync", check=True
    )

    assert unsynced.read_bytes() == synced.read_bytes()
    assert set(os.listdir(manifests)) == before
    # Without a manifest the output is a file of its own, not a version
    # of the base: what the base's sessions commit later is merged onto
    # the synced output only.
    s.commit((9, b"Q"))
    onto_synced = cowd.client().merge_all(str(synced), str(tmp_path / "a"))
    onto_unsynced = cowd.client().merge_all(str(unsynced), str(tmp_path / "b"))
    assert (onto_synced["batches"], onto_unsynced["batches"]) == (1, 0)


def test_no_sync_is_refused_in_place_and_without_an_output(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(b"0123456789")
    Session(cowd, base).commit((0, b"A"))
    files = sorted(os.listdir(tmp_path))

    for where in (["--in-place"], []):
        result = cowd.cowctl("merge-all", "-s", str(base), *where, "--no-sync")

        assert result.returncode != 0
        assert result.stderr.decode().count("\n") == 1
        assert b"--no-sync needs an output file" in result.stderr
    assert base.read_bytes() == b"0123456789"
    assert sorted(os.listdir(tmp_path)) == files


def test_merge_after_in_place_reads_each_log_from_where_it_left_off(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(b"0123456789")
    s = Session(cowd, base)
    s.commit((0, b"A"))
    cowd.client().merge_all(str(base), in_place=True)
    # Damage the batch the merge already holds: a merge that read the log
    # from its start again would refuse it as corrupt.
    log = Path(s.log_path)
    raw = bytearray(log.read_bytes())
    raw[-18] ^= 0x01  # the data byte of the only record
    log.write_bytes(bytes(raw))
    assert cowd.client().verify([s.log_path])[0]["ok"] is False

    assert cowd.client().merge_all(str(base), in_place=True)["noop"] is True
    s.commit((1, b"B"))
    result = cowd.client().merge_all(str(base), in_place=True)

    assert result["batches"] == 1
    assert base.read_bytes() == b"AB23456789"
