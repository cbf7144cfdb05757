"""Judge a `make vmtest` run from the test VM's serial console log.

The guest prints the plan, a PASS or FAIL line per test, and at the end
its whole kernel log between markers, in which each test's start is
marked ("cowd-vmtest: begin NAME").  A test passes when it says so and
the kernel messages logged while it ran hold no sign of damage.  The one
exception is "raw", the deliberate swap without restore: there the bad
accounting must appear, or the demonstration proved nothing.

The tests expected are those of vm/tests/plan, whatever plan the guest
printed: a test the guest skipped or never reached fails.

Usage: check-log.py SERIAL_LOG; prints one line per test and a total,
exits 1 if anything failed.
"""

import os
import re
import sys

PLAN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "plan")

# Kernel messages that mean the kernel found something wrong.
DAMAGE = re.compile(
    r"BUG:|WARNING:|Bad page|rss-counter|Oops|Kernel panic"
    r"|general protection fault|Call Trace"
)
# The test that must show the damage, and the messages that prove it.
DELIBERATE = "raw"
EXPECTED = ("Bad page map", "Bad rss-counter state")
MARKER = re.compile(r"cowd-vmtest: (begin (\S+)|end)$")


def kernel_sections(lines):
    """Map each test (and "boot", before the first) to its kernel lines."""
    try:
        start = lines.index("VMTEST DMESG BEGIN") + 1
        end = lines.index("VMTEST DMESG END", start)
    except ValueError:
        return None
    sections, current = {"boot": []}, "boot"
    for line in lines[start:end]:
        marker = MARKER.search(line)
        if marker:
            current = marker.group(2) or "after tests"
            sections.setdefault(current, [])
        else:
            sections[current].append(line)

    return sections


def judge_kernel(name, klines):
    """Why the kernel log of one test is wrong, or None."""
    damage = [line for line in klines if DAMAGE.search(line)]
    if name == DELIBERATE:
        missing = [m for m in EXPECTED if not any(m in x for x in klines)]
        if missing:
            return f"expected kernel messages missing: {', '.join(missing)}"
        return None
    if damage:
        return "kernel log: " + damage[0].strip()

    return None


def guest_lines(lines, tag):
    """The words after "VMTEST TAG" on the lines that have it.

    The console may glue a marker to the end of an earlier line (escape
    sequences and all), so markers are looked for anywhere in a line.
    """
    pattern = re.compile(rf"VMTEST {tag} (.*)$")

    return [m.group(1).split() for x in lines if (m := pattern.search(x))]


def main(path):
    with open(path, errors="replace") as f:
        lines = [line.rstrip("\r\n") for line in f]
    with open(PLAN) as f:
        plan = [x.strip() for x in f if x.strip() and not x.startswith("#")]
    said = next(iter(guest_lines(lines, "PLAN")), [])
    passed = {words[0] for words in guest_lines(lines, "PASS") if words}
    sections = kernel_sections(lines)
    failures = []

    def report(name, why):
        print(f"{'FAIL' if why else 'PASS'} {name}" + (f": {why}" if why else ""))
        if why:
            failures.append(name)

    if said != plan:
        ran = " ".join(said)
        report("plan", f"the guest ran another plan than vm/tests/plan: {ran}")
    if sections is None:
        report("kernel log", "missing from the console (crash or timeout?)")
        sections = {}
    for name in plan:
        why = None if name in passed else "the test failed or did not run"
        if why is None and name not in sections:
            why = "no kernel log section for it"
        report(name, why or judge_kernel(name, sections[name]))
    for name in sections.keys() - set(plan):
        why = judge_kernel(name, sections[name])
        if why:
            report(name, why)
    for words in guest_lines(lines, "ABORT"):
        report("guest", "aborted: " + " ".join(words))

    ok = len([name for name in plan if name not in failures])
    print(f"vmtest: {ok} passed, {len(failures)} failed")

    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
