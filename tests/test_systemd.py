"""The shipped systemd units, and cowd under socket activation."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from conftest import COWCTL, COWD, ROOT, run

UNITS = ROOT / "systemd"
INSTALLED_COWD = "/usr/local/bin/cowd"


def test_units_verify_without_any_output(tmp_path):
    # The service names cowd where `pip install .` as root puts it;
    # verify checks that the binary exists, so point it at this one.
    service = (UNITS / "cowd.service").read_text()
    assert f"ExecStart={INSTALLED_COWD} " in service
    (tmp_path / "cowd.service").write_text(
        service.replace(INSTALLED_COWD, shutil.which(COWD) or COWD)
    )
    shutil.copy(UNITS / "cowd.socket", tmp_path)

    result = run(
        ["systemd-analyze", "verify", "cowd.service", "cowd.socket"], cwd=tmp_path
    )

    assert result.stdout + result.stderr == b""
    assert result.returncode == 0


def test_tmpfiles_entry_creates_a_private_state_folder():
    lines = [
        line.split()
        for line in (UNITS / "cowd.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    assert ["d", "/var/lib/cowd", "0700", "root", "root", "-"] in lines


def test_cowd_serves_a_socket_passed_by_systemd(tmp_path):
    sock = tmp_path / "activated.sock"
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(sock),
            COWD,
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline, "socket never appeared"
            time.sleep(0.05)

        result = run([COWCTL, "--socket", str(sock), "status", "--json"], check=True)

        assert b'"state_dir"' in result.stdout
        assert Path(sock).exists()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
