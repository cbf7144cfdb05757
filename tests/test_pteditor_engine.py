"""The pteditor engine where the machine has no page-table editor.

The engine itself is tested inside a VM with the module loaded (`make
vmtest`); here, where /dev/pteditor does not exist, every way of asking
for it must be refused with one clear line, and a cowd running another
engine must refuse the engine's calls.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import COWD, hexarg, run
from cowclient import libcow_path
from cowclient._rpc import Client
from cowd.protocol import CowError

pytestmark = pytest.mark.skipif(
    os.path.exists("/dev/pteditor"), reason="this machine has the device"
)


def test_cowd_without_the_device_refuses_to_start(tmp_path):
    result = run(
        [COWD, "--socket", str(tmp_path / "s"), "--state-dir", str(tmp_path / "d")]
        + ["--engine", "pteditor"]
    )
    err = result.stderr.decode()

    assert result.returncode == 1
    assert err.count("\n") == 1, err
    assert err.startswith("cowd: cannot open /dev/pteditor: ")
    assert not (tmp_path / "s").exists()


def test_cowctl_run_refuses_pteditor_from_another_engine(cowd, programs, tmp_path):
    base = tmp_path / "base.bin"
    base.write_bytes(b"." * 4096)
    result = cowd.cowctl(
        "run", "--engine", "pteditor", "--path", str(base), "--",
        str(programs / "writer"), str(base), hexarg(0, b"x"),
    )  # fmt: skip
    err = result.stderr.decode()

    assert result.returncode != 0
    assert (
        err == "cowctl: engine pteditor is not available: cowd runs the remap engine\n"
    )
    assert base.read_bytes() == b"." * 4096


def test_libcow_with_pteditor_stops_before_writing(cowd, programs, tmp_path):
    base = tmp_path / "base.bin"
    base.write_bytes(b"." * 4096)
    env = {
        **os.environ,
        "LD_PRELOAD": libcow_path(),
        "COW_PATHS": str(base),
        "COWD_SOCKET": cowd.socket,
        "COW_ENGINE": "pteditor",
    }
    result = subprocess.run(
        [str(programs / "writer"), str(base), hexarg(0, b"x")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "engine pteditor is not available" in result.stderr
    assert "not pteditor" in result.stderr
    assert base.read_bytes() == b"." * 4096


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("hello", {"engine": "pteditor"}),
        ("hello", {"engine": "pteditor", "faults": True}),
        ("pte_swap", {"target": 4096, "copy": 8192}),
        ("pte_restore", {"target": 4096}),
    ],
)
def test_cowd_without_the_engine_refuses_its_calls(cowd, method, params):
    with Client(cowd.socket) as client, pytest.raises(CowError) as refused:
        client.call(method, params)

    assert refused.value.code == "invalid"
    assert "pteditor" in str(refused.value)
