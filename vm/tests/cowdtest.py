"""The pteditor engine end to end, run inside the test VM.

Each test starts the real cowd from the repository's virtual environment
with ``--engine pteditor`` (it holds /dev/pteditor, which allows one
opener, until it stops) and runs real programs under ``cowctl run
--engine pteditor``: their first write to each page of a shared mapping
faults, libcow copies the page and asks cowd over its fault channel to
swap the copy in.  The tests check what the programs and the merges see,
that the base files never change, and that cowd's device holds no
swapped entry once the programs are gone; the harness judges the kernel
log of each test.

Usage: cowdtest.py PROGRAMS TEST, where PROGRAMS holds the test programs
(writer, mapscript, hammer, remapper) built by vm/run.sh, and TEST is one
of the functions named in TESTS.  A failed check prints "FAIL:" and
exits 1.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from cowclient import Client

BIN = os.path.dirname(sys.executable)
PAGE = os.sysconf("SC_PAGE_SIZE")

# Seconds cowd may take to listen, and programs to end, under TCG.
START_TIMEOUT = 60
RUN_TIMEOUT = 120


class Failed(Exception):
    """A check failed; the message says which."""


def check(cond, message):
    if not cond:
        raise Failed(message)


def base_bytes(pages):
    """A base file's bytes: every page different, every byte printable."""
    return b"".join(bytes([65 + i % 26]) * PAGE for i in range(pages))


def hexarg(offset, data):
    return f"{offset}:{data.hex()}"


class Cowd:
    """A cowd with the pteditor engine in a folder of its own."""

    def __init__(self, folder, engine="pteditor"):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.socket = os.path.join(folder, "cowd.sock")
        self.log = os.path.join(folder, "cowd.log")
        argv = [f"{BIN}/cowd", "--socket", self.socket, "--engine", engine]
        argv += ["--state-dir", os.path.join(folder, "state")]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            check(self.proc.poll() is None, f"cowd exited: {self.tail()}")
            check(time.monotonic() < deadline, "cowd did not start")
            time.sleep(0.1)
        if engine == "pteditor":
            restores = self.status()["restores"]
            want = "cowd" if ptedit_abi() else "device"
            check(restores == want, f"cowd says {restores} restores, not {want}")

    def _answers(self):
        try:
            with Client(self.socket) as client:
                client.status()
        except Exception:
            return False

        return True

    def status(self):
        with Client(self.socket) as client:
            return client.status()

    def tail(self):
        with open(self.log, errors="replace") as f:
            return f.read()[-2000:]

    def cowctl(self, *args, check_ok=True):
        argv = [f"{BIN}/cowctl", "--socket", self.socket, *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        if check_ok:
            check(
                done.returncode == 0,
                f"cowctl {' '.join(args)}: {done.returncode}: {done.stderr}",
            )

        return done

    def run(self, paths, *command, **kwargs):
        args = ["run", "--engine", "pteditor"]
        for path in paths:
            args += ["--path", path]
        done = self.cowctl(*args, "--", *command, **kwargs)
        # With PTEditor nothing else would put the entries back.
        check("cannot restore" not in done.stderr, f"libcow: {done.stderr}")

        return done

    def wait_unswapped(self):
        """Wait until the device tracks no swapped entry (mm teardown of
        a reaped process may come a little later)."""
        for _ in range(200):
            if self.status()["swapped"] == 0:
                return
            time.sleep(0.1)
        raise Failed(f"{self.status()['swapped']} entries still swapped")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise Failed("cowd did not stop on SIGTERM") from None
        check(self.proc.returncode == 0, f"cowd exited {self.proc.returncode}")
        check("Traceback" not in self.tail(), f"cowd logged: {self.tail()}")


def ptedit_abi():
    """Whether the module answers as PTEditor does (vm/tests/run-guest.sh
    sets that for a second pass of the tests)."""
    with open("/sys/module/pteditor/parameters/ptedit_abi") as f:
        return f.read().strip() == "Y"


def make_base(folder, name, pages):
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(base_bytes(pages))

    return path


def merged(cowd, base):
    out = base + ".merged"
    cowd.cowctl("merge-all", "-s", base, "-o", out)
    with open(out, "rb") as f:
        return f.read()


def unchanged(base, pages):
    with open(base, "rb") as f:
        check(f.read() == base_bytes(pages), f"{base} changed")


def expect(pages, edits):
    want = bytearray(base_bytes(pages))
    for offset, data in edits:
        want[offset : offset + len(data)] = data

    return bytes(want)


# -- the tests ---------------------------------------------------------


def refuse(programs, folder):
    """A second cowd cannot have the device; a session asking for
    pteditor from a cowd without it is refused, by cowctl and libcow."""
    cowd = Cowd(folder)
    try:
        other = os.path.join(folder, "other")
        done = subprocess.run(
            [
                f"{BIN}/cowd",
                "--socket",
                other + ".sock",
                "--state-dir",
                other,
                "--engine",
                "pteditor",
            ],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        lines = done.stderr.strip().splitlines()
        check(done.returncode == 1, f"second cowd exited {done.returncode}")
        check(
            len(lines) == 1 and "/dev/pteditor" in lines[0],
            f"second cowd said {done.stderr!r}",
        )
        print(f"second cowd: {lines[0]}")
    finally:
        cowd.stop()

    remap = Cowd(os.path.join(folder, "remap"), engine="remap")
    try:
        base = make_base(folder, "base.bin", 2)
        done = remap.run(
            [base], f"{programs}/writer", base, hexarg(1, b"x"), check_ok=False
        )
        check(
            done.returncode != 0 and "pteditor" in done.stderr,
            f"cowctl run against a remap cowd: {done.stderr!r}",
        )
        print(f"cowctl: {done.stderr.strip()}")
        env = dict(
            os.environ,
            LD_PRELOAD=libcow(),
            COW_PATHS=base,
            COWD_SOCKET=remap.socket,
            COW_ENGINE="pteditor",
        )
        done = subprocess.run(
            [f"{programs}/writer", base, hexarg(1, b"x")],
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        check(
            done.returncode == 1
            and "not available" in done.stderr
            and len(done.stderr.strip().splitlines()) == 1,
            f"libcow against a remap cowd: {done.stderr!r}",
        )
        print(f"libcow: {done.stderr.strip()}")
        unchanged(base, 2)
    finally:
        remap.stop()


def libcow():
    import cowclient._native

    return cowclient._native.libcow_path()


def writer(programs, folder):
    """Writes through MAP_SHARED, committed at msync, munmap and exit:
    the base is unchanged and merge-all reproduces every byte, including
    data crossing pages with newlines and NUL bytes."""
    cowd = Cowd(folder)
    try:
        pages = 4
        base = make_base(folder, "base.bin", pages)
        crossing = b"line one\nline\x00two\n" * 20
        edits = [
            (15, b"xxx"),
            (PAGE - 100, crossing),
            (3 * PAGE - 7, b"\x00\n\x00\n\xff\x00end"),
        ]
        cowd.run(
            [base],
            f"{programs}/writer",
            base,
            "--msync",
            *(hexarg(o, d) for o, d in edits[:2]),
        )
        cowd.run([base], f"{programs}/writer", base, "--keep", hexarg(*edits[2]))
        unchanged(base, pages)
        check(
            merged(cowd, base) == expect(pages, edits),
            "merge-all does not reproduce the writes",
        )
        cowd.wait_unswapped()
    finally:
        cowd.stop()


def concurrent(programs, folder):
    """Several clients fault at once through the one cowd: processes on
    one file, and threads of one process on the same pages."""
    cowd = Cowd(folder)
    try:
        pages, clients = 16, 6
        base = make_base(folder, "base.bin", pages)
        edits = []
        procs = []
        for c in range(clients):
            mine = [
                (p * PAGE + 64 * c, f"client {c} page {p}\n".encode())
                for p in range(pages)
            ]
            edits += mine
            argv = [
                f"{BIN}/cowctl",
                "--socket",
                cowd.socket,
                "run",
                "--engine",
                "pteditor",
                "--path",
                base,
                "--",
                f"{programs}/writer",
                base,
                *(hexarg(o, d) for o, d in mine),
            ]
            procs.append(subprocess.Popen(argv, stderr=subprocess.PIPE))
        hammered = make_base(folder, "hammer.bin", 4)
        procs.append(
            subprocess.Popen(
                [
                    f"{BIN}/cowctl",
                    "--socket",
                    cowd.socket,
                    "run",
                    "--engine",
                    "pteditor",
                    "--path",
                    hammered,
                    "--",
                    f"{programs}/hammer",
                    hammered,
                    "4",
                    "200",
                ],
                stderr=subprocess.PIPE,
            )
        )
        for proc in procs:
            _, err = proc.communicate(timeout=RUN_TIMEOUT)
            check(
                proc.returncode == 0,
                f"client exited {proc.returncode}: {err.decode(errors='replace')}",
            )
        unchanged(base, pages)
        unchanged(hammered, 4)
        check(
            merged(cowd, base) == expect(pages, edits),
            "merge-all does not reproduce the concurrent writes",
        )
        cowd.wait_unswapped()
        print(f"{clients} writers and 8 threads served")
    finally:
        cowd.stop()


def kill(programs, folder):
    """A client killed by SIGKILL while its pages are swapped: the
    kernel restores them at teardown, and nothing stays swapped."""
    cowd = Cowd(folder)
    try:
        pages = 8
        base = make_base(folder, "base.bin", pages)
        steps = [f"w{p * PAGE + 5}:{b'killed'.hex()}" for p in range(pages)]
        proc = subprocess.Popen(
            [
                f"{BIN}/cowctl",
                "--socket",
                cowd.socket,
                "run",
                "--engine",
                "pteditor",
                "--path",
                base,
                "--",
                f"{programs}/mapscript",
                base,
                *steps,
                "p600000",
            ]
        )
        deadline = time.monotonic() + RUN_TIMEOUT
        while cowd.status()["swapped"] < pages:
            check(proc.poll() is None, f"client exited {proc.returncode}")
            check(time.monotonic() < deadline, "the client never swapped")
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cowd.wait_unswapped()
        unchanged(base, pages)
    finally:
        cowd.stop()


def munmap(programs, folder):
    """munmap of a partly swapped range: the swapped pages in it are
    restored, the rest of the mapping keeps its copies."""
    cowd = Cowd(folder)
    try:
        pages = 6
        base = make_base(folder, "base.bin", pages)
        edits = [
            (0 * PAGE + 1, b"zero"),
            (2 * PAGE + 2, b"two"),
            (3 * PAGE + 3, b"three"),
            (5 * PAGE + 5, b"five"),
        ]
        steps = [f"w{o}:{d.hex()}" for o, d in edits]
        # Pages 0-3 go: 0, 2 and 3 swapped, 1 never written.
        steps += [
            f"u0:{4 * PAGE}",
            f"v{5 * PAGE + 5}:{b'five'.hex()}",
            f"w{4 * PAGE}:{b'four'.hex()}",
        ]
        edits.append((4 * PAGE, b"four"))
        cowd.run([base], f"{programs}/mapscript", base, *steps)
        unchanged(base, pages)
        check(
            merged(cowd, base) == expect(pages, edits),
            "merge-all does not reproduce the writes around the munmap",
        )
        cowd.wait_unswapped()
    finally:
        cowd.stop()


def fork(programs, folder):
    """A forked child faults through a fault channel of its own: its
    swaps are made in its page tables, not its parent's."""
    cowd = Cowd(folder)
    try:
        pages = 3
        base = make_base(folder, "base.bin", pages)
        edits = [(1, b"parent"), (PAGE + 2, b"both")]
        steps = [f"w1:{b'parent'.hex()}", "s", "f"]
        steps += [f"w{PAGE + 2}:{b'both'.hex()}", f"v{PAGE + 2}:{b'both'.hex()}"]
        cowd.run([base], f"{programs}/mapscript", base, *steps)
        unchanged(base, pages)
        check(
            merged(cowd, base) == expect(pages, edits),
            "merge-all does not reproduce the parent's and child's writes",
        )
        cowd.wait_unswapped()
    finally:
        cowd.stop()


def remap(programs, folder):
    """mremap moves, grows and shrinks a mapping with swapped pages."""
    cowd = Cowd(folder)
    try:
        base = make_base(folder, "base.bin", 8)
        cowd.run([base], f"{programs}/remapper", base)
        unchanged(base, 8)
        cowd.wait_unswapped()
    finally:
        cowd.stop()


def bench(programs, folder):
    """cowctl bench with this cowd: the pteditor engine's first-write cost
    next to the remap engine's and the kernel's own copy-on-write."""
    cowd = Cowd(folder)
    try:
        done = cowd.cowctl("bench", "--pages", "500", "--runs", "3", "--dir", folder)
        print(done.stdout, end="")
        check("ratio pteditor/kernel" in done.stdout, "no pteditor ratio")
        cowd.wait_unswapped()
    finally:
        cowd.stop()


TESTS = {
    f.__name__: f
    for f in (refuse, writer, concurrent, kill, munmap, fork, remap, bench)
}


def main():
    programs, name = sys.argv[1], sys.argv[2]
    folder = tempfile.mkdtemp(prefix=f"cowdtest-{name}-")
    try:
        TESTS[name](programs, folder)
    except Failed as exc:
        print(f"FAIL: {name}: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
