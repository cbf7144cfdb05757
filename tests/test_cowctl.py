"""cowctl as a user meets it: help, listings, JSON, and one-line errors."""

from __future__ import annotations

import json

import pytest

from conftest import COWCTL, Session, commit_through_rpc, run
from cowd.protocol import CowError

COMMANDS = [
    [],
    ["status"],
    ["sessions"],
    ["logs"],
    ["log", "show"],
    ["run"],
    ["merge"],
    ["merge-all"],
    ["merge_all"],
    ["demo"],
    ["bench"],
    ["verify"],
    ["prune"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "cowctl")
def test_every_command_has_help(command):
    result = run([COWCTL, *command, "--help"], check=True)

    assert b"usage: cowctl" in result.stdout


def one_line_error(result) -> str:
    err = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith("cowctl: ")
    return err


def test_logs_json_lists_path_session_and_file(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(b"0123456789")
    client, log_path = commit_through_rpc(cowd, base, [[2, b"ab"]])

    listed = json.loads(cowd.cowctl("logs", "--json", check=True).stdout)

    assert [entry["path"] for entry in listed] == [log_path]
    assert listed[0]["file"] == str(base)
    assert listed[0]["session"] == client.call("sessions")[0]["session"]
    shown = cowd.cowctl("log", "show", listed[0]["path"], check=True)
    assert shown.stdout == b"Offset: 2, Length: 2, Data: ab\n"


def test_log_show_escapes_newlines_and_nul_bytes(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(bytes(16))
    _, log_path = commit_through_rpc(cowd, base, [[0, b"a\nb\0c\\\xff"]])

    shown = cowd.cowctl("log", "show", log_path, check=True)

    assert shown.stdout == b"Offset: 0, Length: 7, Data: a\\nb\\x00c\\\\\\xff\n"


def test_merge_all_alias_and_output_file(cowd, tmp_path):
    base = tmp_path / "base"
    base.write_bytes(b"0123456789")
    commit_through_rpc(cowd, base, [[2, b"ab"]])
    out = tmp_path / "out"

    cowd.cowctl("merge_all", "-s", str(base), "-o", str(out), check=True)

    assert out.read_bytes() == b"01ab456789"
    assert base.read_bytes() == b"0123456789"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unreachable_daemon_is_one_line(tmp_path):
    result = run([COWCTL, "--socket", str(tmp_path / "none.sock"), "status"])

    assert "cannot reach cowd" in one_line_error(result)


@pytest.mark.parametrize(
    "args",
    [
        ["log", "show", "/etc/passwd"],
        ["merge", "-s", "/nonexistent", "-l", "x"],
        ["merge-all", "-s", "/nonexistent"],
        ["run", "--engine", "warp", "--path", "x", "--", "true"],
        ["run", "--path", "x"],
        ["demo", "--files", "0"],
        ["demo", "--processes", "0"],
        ["demo", "--offset", "-5"],
        ["demo", "--offset", "22"],
        ["demo", "--data", ""],
        ["demo", "--text", ""],
        ["prune", "--older-than", "-3"],
        ["prune", "--older-than", "nan"],
        ["demo", "--files", "abc"],
        ["merge-all"],
        ["no-such-command"],
        ["--no-such-option", "status"],
    ],
)
def test_bad_input_is_one_line(cowd, args):
    one_line_error(cowd.cowctl(*args))


@pytest.mark.parametrize("older_than", [-3 * 86400, float("nan"), "3"])
def test_daemon_refuses_a_prune_age_that_is_no_age(cowd, tmp_path, older_than):
    base = tmp_path / "base"
    base.write_bytes(b"0123456789")
    session = Session(cowd, base)
    session.commit((2, b"ab"))
    session.end()
    cowd.client().merge_all(str(base), output=str(tmp_path / "out"))

    with pytest.raises(CowError, match="older_than"):
        cowd.client().call("prune", {"older_than": older_than})

    assert [entry["path"] for entry in cowd.client().logs()] == [session.log_path]
