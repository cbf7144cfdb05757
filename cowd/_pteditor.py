"""The page-table editor device, as cowd's pteditor engine drives it.

/dev/pteditor allows one opener; cowd holds it for as long as it runs
and edits page tables on behalf of its clients.  A swap points the
page-table entry of a client's file page (the target) at an anonymous
page of the same client (its private copy of the page), with the write,
accessed and dirty bits set, and flushes the TLB.  A restore puts the
original entry back, which must happen before the range is unmapped or
the process ends, or the kernel's page accounting is corrupted.

Two devices answer at that path.  cowd's own module (native/pteditor/)
remembers each original entry, restores it on request (VM_RESTORE) and
puts back any that is still swapped when the kernel unmaps the range or
tears the process down, SIGKILL included.  PTEditor itself knows only
VM_RESOLVE and VM_UPDATE: there cowd keeps the original entries, writes
them back with VM_UPDATE, and nothing covers a client killed while it
holds swapped entries.  Which one is open is learned at start, from
whether the device answers SWAPPED.

Both addresses are always resolved in the process the kernel names as
the peer of the client's connection, so a client can only ever edit its
own page tables.  The device's errno values become Refused with a stable
code: ``no-page`` (nothing mapped at an address, or not a page the
device may swap), ``busy`` (the kernel kept the range busy), ``gone``
(the process ended), ``refused`` (the entry was not acceptable) and
``device`` (anything else).
"""

from __future__ import annotations

import errno
import os
import struct
import time
from fcntl import ioctl

from cowd.protocol import CowError

DEVICE = "/dev/pteditor"


def _ior(nr: int) -> int:
    """PTEditor's _IOR(0x3d17, nr, size_t), its magic's overflow included."""
    return (2 << 30) | (8 << 16) | (0x3D17 << 8) | nr


VM_RESOLVE = _ior(1)
VM_UPDATE = _ior(2)
INVALIDATE_TLB = _ior(10)
VM_RESTORE = _ior(0x40)
SWAPPED = _ior(0x41)

# struct ptedit_entry: pid, vaddr, pgd, p4d, pud, pmd, pte, valid.
_ENTRY = struct.Struct("=8Q")
_VALID_PTE = 1 << 4

# x86-64 entry bits: the frame number, present, writable, accessed, dirty.
_PFN_MASK = 0x000F_FFFF_FFFF_F000
_PRESENT = 1 << 0
_RW = 1 << 1
_ACCESSED = 1 << 5
_DIRTY = 1 << 6

# The module answers EAGAIN while the kernel works on the process's
# page tables (an unmap or a migration in flight); such work is short.
_BUSY_TRIES = 50
_BUSY_PAUSE = 0.001

_CODES = {
    errno.ENOENT: "no-page",
    errno.EFAULT: "no-page",
    errno.EAGAIN: "busy",
    errno.ESRCH: "gone",
    errno.EINVAL: "refused",
    errno.EOPNOTSUPP: "refused",
    errno.EPERM: "refused",
}


class Refused(CowError):
    """The device would not edit an entry; the code says why."""

    code = "pteditor"

    def __init__(self, code: str, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.errno = errno


class Unavailable(Exception):
    """The device cannot be opened: no module loaded, or another opener."""


class Device:
    """The open device, held for the daemon's lifetime."""

    def __init__(self, path: str = DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            why = {
                errno.ENOENT: "no such device (is the pteditor module loaded?)",
                errno.EBUSY: "another process holds it",
                errno.EACCES: "permission denied (cowd must run as root)",
            }.get(exc.errno, exc.strerror)
            raise Unavailable(f"cannot open {path}: {why}") from None
        self.path = path
        self.tracks = self._answers_swapped()
        # Who puts original entries back, as status and the log say it.
        self.restores = "device" if self.tracks else "cowd"
        # Without a tracking module, per (pid, target page): the entry
        # the kernel had there and the frame of the copy swapped in.
        self._originals: dict[tuple[int, int], tuple[int, int]] = {}

    def _answers_swapped(self) -> bool:
        """Whether the device is one that tracks and restores swaps.

        PTEditor answers a command it lacks with -1, seen here as EPERM;
        other devices may say ENOTTY or EINVAL.
        """
        try:
            self._count(0)
        except Refused as exc:
            if exc.errno in (errno.EPERM, errno.ENOTTY, errno.EINVAL):
                return False
            raise

        return True

    def close(self) -> None:
        os.close(self.fd)

    def swap(self, pid: int, target: int, copy: int, writable: bool = True) -> None:
        """Point pid's entry for target at the page mapped at copy.

        With writable false the entry is written without the write bit,
        so the next write faults again (a committed page).
        """
        old = self._resolve(pid, target)
        frame = self._resolve(pid, copy) & _PFN_MASK
        new = (old & ~_PFN_MASK) | frame | _ACCESSED
        new = new | _RW | _DIRTY if writable else new & ~_RW
        self._update(pid, target, new, f"swap at {target:#x}")
        if not self.tracks:
            # A page swapped again (a new copy, or write-protected at a
            # commit) keeps the original of its first swap.
            first = self._originals.get((pid, target), (old, 0))[0]
            self._originals[(pid, target)] = (first, frame)

    def restore(self, pid: int, target: int, pages: int = 1) -> int:
        """Put back the original entries of pages swapped from target on.

        Returns how many were swapped; pages that were not are skipped.
        """
        page = os.sysconf("SC_PAGE_SIZE")
        restored = 0
        for i in range(pages):
            vaddr = target + i * page
            if self.tracks:
                done = self._restore_tracked(pid, vaddr)
            else:
                done = self._restore_kept(pid, vaddr)
            restored += done

        return restored

    def _restore_tracked(self, pid: int, vaddr: int) -> bool:
        entry = _ENTRY.pack(pid, vaddr, 0, 0, 0, 0, 0, 0)
        try:
            self._call(VM_RESTORE, entry, f"restore at {vaddr:#x}")
        except Refused as exc:
            if exc.code != "no-page":
                raise
            return False

        return True

    def _restore_kept(self, pid: int, vaddr: int) -> bool:
        """Write back the original entry cowd kept, if the copy is there.

        An entry that no longer maps the copy was changed by someone
        else since the swap; writing the old original over it would do
        the very damage restoring prevents, so it is left alone.  What
        cowd kept goes once the original is back or nothing is left to
        restore, and stays if the device refused, for another try.
        """
        key = (pid, vaddr)
        if key not in self._originals:
            return False
        original, frame = self._originals[key]
        try:
            current = self._resolve(pid, vaddr)
        except Refused as exc:
            if exc.code != "no-page":
                raise
            current = None
        ours = current is not None and current & _PFN_MASK == frame
        if ours:
            self._update(pid, vaddr, original, f"restore at {vaddr:#x}")
        del self._originals[key]

        return ours

    def forget(self, pid: int) -> None:
        """Drop what cowd kept for pid, a process that has ended."""
        for key in [key for key in self._originals if key[0] == pid]:
            del self._originals[key]

    def swapped(self, pid: int = 0) -> int:
        """Entries swapped in pid (0: every process)."""
        if not self.tracks:
            return sum(1 for key in self._originals if pid in (0, key[0]))

        return self._count(pid)

    def _count(self, pid: int) -> int:
        buf = bytearray(_ENTRY.pack(pid, 0, 0, 0, 0, 0, 0, 0))

        return self._call(SWAPPED, buf, "count", mutate=True)

    def _update(self, pid: int, vaddr: int, pte: int, what: str) -> None:
        """Write pid's page-table entry for vaddr, and flush the TLB."""
        entry = bytearray(_ENTRY.pack(pid, vaddr, 0, 0, 0, 0, pte, _VALID_PTE))
        # PTEditor says 1, not an errno, when the process has no memory;
        # ioctl returns that number only for a buffer it may write to.
        if self._call(VM_UPDATE, entry, what, mutate=True) != 0:
            raise Refused("gone", f"{what}: the process has ended")
        # PTEditor flushes inside VM_UPDATE, and its INVALIDATE_TLB takes
        # an address, which ioctl's int argument cannot carry; cowd's
        # module flushes every address on this call anyway.
        self._call(INVALIDATE_TLB, 0, "flush")

    def _resolve(self, pid: int, vaddr: int) -> int:
        buf = bytearray(_ENTRY.pack(pid, vaddr, 0, 0, 0, 0, 0, 0))
        self._call(VM_RESOLVE, buf, f"resolve {vaddr:#x}", mutate=True)
        entry = _ENTRY.unpack(buf)
        if not entry[7] & _VALID_PTE or not entry[6] & _PRESENT:
            raise Refused("no-page", f"no page is mapped at {vaddr:#x}")

        return entry[6]

    def _call(self, cmd: int, arg, what: str, mutate: bool = False) -> int:
        for _ in range(_BUSY_TRIES):
            try:
                if mutate:
                    return ioctl(self.fd, cmd, arg, True)
                return ioctl(self.fd, cmd, arg)
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    code = _CODES.get(exc.errno, "device")
                    why = f"{what}: {exc.strerror}"
                    raise Refused(code, why, exc.errno) from None
            time.sleep(_BUSY_PAUSE)

        raise Refused("busy", f"{what}: the kernel kept the range busy")
