/*
 * ptetest: the pteditor module's tests, run inside the test VM by
 * vm/tests/run-guest.sh (one subcommand per test).
 *
 * Each test maps a base file MAP_SHARED and read-only, as libcow does,
 * copies pages into anonymous pages of its own, and has /dev/pteditor
 * point the file pages' entries at the copies, the way cowd will do it
 * on a client's behalf: VM_RESOLVE both addresses, VM_UPDATE the file
 * page's entry to the copy's page frame with write permission,
 * INVALIDATE_TLB.  It then checks what the process sees and that the
 * file never changes, and leaves the swapped entries to the kernel's
 * unmap, exit or kill paths, whose soundness the harness judges from the
 * guest's kernel log.  A failed check prints "FAIL:" and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/mempolicy.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pteditor.h"

#define PAGE 4096UL

/* x86-64 entry bits: the frame number occupies bits 12 to 51. */
#define PTE_PFN_MASK 0x000ffffffffff000ULL
#define PTE_PRESENT (1ULL << 0)
#define PTE_RW (1ULL << 1)
#define PTE_ACCESSED (1ULL << 5)
#define PTE_DIRTY (1ULL << 6)

#define SYSFS_RESTORE "/sys/module/pteditor/parameters/restore"

static const char *test_name = "ptetest";

static void fail(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "FAIL: %s: ", test_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

#define CHECK(cond, ...)                                                     \
	do {                                                                 \
		if (!(cond))                                                 \
			fail(__VA_ARGS__);                                   \
	} while (0)

/* ---- the device ---- */

static int dev_open(void)
{
	int fd = open(PTEDITOR_DEVICE_PATH, O_RDWR | O_CLOEXEC);

	CHECK(fd >= 0, "open %s: %s", PTEDITOR_DEVICE_PATH, strerror(errno));
	return fd;
}

static ptedit_entry_t resolve(int dev, pid_t pid, const void *addr)
{
	ptedit_entry_t e = { .pid = (uint64_t)pid, .vaddr = (uintptr_t)addr };

	CHECK(ioctl(dev, PTEDITOR_IOCTL_CMD_VM_RESOLVE, &e) == 0,
	      "VM_RESOLVE %p: %s", addr, strerror(errno));
	return e;
}

static int update_pte(int dev, pid_t pid, const void *addr, uint64_t pte)
{
	ptedit_entry_t e = {
		.pid = (uint64_t)pid,
		.vaddr = (uintptr_t)addr,
		.pte = pte,
		.valid = PTEDIT_VALID_MASK_PTE,
	};

	return ioctl(dev, PTEDITOR_IOCTL_CMD_VM_UPDATE, &e) ? -errno : 0;
}

static long swapped(int dev, pid_t pid)
{
	ptedit_entry_t e = { .pid = (uint64_t)pid };
	long n = ioctl(dev, PTEDITOR_IOCTL_CMD_SWAPPED, &e);

	CHECK(n >= 0, "SWAPPED: %s", strerror(errno));
	return n;
}

/*
 * Point the entry of target (a file page) at the page of copy: what cowd
 * does when a client's handler has copied the page.  Returns the target's
 * original entry.
 */
static uint64_t swap_page(int dev, void *target, void *copy)
{
	ptedit_entry_t t = resolve(dev, 0, target);
	ptedit_entry_t c = resolve(dev, 0, copy);
	uint64_t pte;
	int err;

	CHECK(t.valid & PTEDIT_VALID_MASK_PTE, "no entry for %p", target);
	CHECK(c.valid & PTEDIT_VALID_MASK_PTE, "no entry for copy %p", copy);
	CHECK(t.pte & PTE_PRESENT, "file page %p not present", target);
	CHECK(!(t.pte & PTE_RW), "file page %p already writable", target);
	pte = (t.pte & ~PTE_PFN_MASK) | (c.pte & PTE_PFN_MASK) | PTE_RW |
	      PTE_ACCESSED | PTE_DIRTY;
	err = update_pte(dev, 0, target, pte);
	CHECK(err == 0, "VM_UPDATE %p: %s", target, strerror(-err));
	CHECK(ioctl(dev, PTEDITOR_IOCTL_CMD_INVALIDATE_TLB, target) == 0,
	      "INVALIDATE_TLB: %s", strerror(errno));
	return t.pte;
}

/* ---- base files and copies ---- */

/* Page i of a base file: its number, then a byte that depends on i. */
static void base_page(unsigned char *buf, size_t i)
{
	memset(buf, 'A' + (int)(i % 26), PAGE);
	snprintf((char *)buf, 32, "base page %zu", i);
}

static int make_base(const char *path, size_t pages)
{
	unsigned char buf[PAGE];
	size_t i;
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

	CHECK(fd >= 0, "create %s: %s", path, strerror(errno));
	for (i = 0; i < pages; i++) {
		base_page(buf, i);
		CHECK(pwrite(fd, buf, PAGE, (off_t)(i * PAGE)) == PAGE,
		      "write %s: %s", path, strerror(errno));
	}
	return fd;
}

static unsigned char *map_base(int fd, size_t pages)
{
	void *p = mmap(NULL, pages * PAGE, PROT_READ, MAP_SHARED, fd, 0);

	CHECK(p != MAP_FAILED, "mmap base: %s", strerror(errno));
	return p;
}

/*
 * Anonymous pages for copies, as libcow must allocate them: never a huge
 * page (the copy must be one ordinary page) and not inherited by fork
 * (a child sharing a copy copy-on-write would see the parent's writes
 * through the swapped entry, which the kernel does not know about).
 */
static unsigned char *map_copies(size_t pages)
{
	unsigned char *p = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	CHECK(p != MAP_FAILED, "mmap copies: %s", strerror(errno));
	CHECK(madvise(p, pages * PAGE, MADV_NOHUGEPAGE) == 0 &&
		      madvise(p, pages * PAGE, MADV_DONTFORK) == 0,
	      "madvise copies: %s", strerror(errno));
	return p;
}

/* Copy file page i into copy page i (faulting the file page in) and
 * stamp the copy so it cannot be mistaken for the file. */
static void make_copy(unsigned char *base, unsigned char *copies, size_t i)
{
	memcpy(copies + i * PAGE, base + i * PAGE, PAGE);
	snprintf((char *)copies + i * PAGE, 32, "copy %zu of %d", i,
		 (int)getpid());
}

static int shows_base(const unsigned char *addr, size_t i)
{
	unsigned char want[PAGE];

	base_page(want, i);
	return memcmp(addr, want, PAGE) == 0;
}

static void check_file_intact(int fd, size_t pages)
{
	unsigned char got[PAGE], want[PAGE];
	size_t i;

	for (i = 0; i < pages; i++) {
		base_page(want, i);
		CHECK(pread(fd, got, PAGE, (off_t)(i * PAGE)) == PAGE,
		      "read base: %s", strerror(errno));
		CHECK(memcmp(got, want, PAGE) == 0,
		      "base file page %zu changed", i);
	}
}

/* Swap page i, then check the file address shows the copy and takes
 * writes that land in the copy and nowhere else. */
static uint64_t swap_and_check(int dev, unsigned char *base,
			       unsigned char *copies, size_t i)
{
	unsigned char *target = base + i * PAGE, *copy = copies + i * PAGE;
	char note[64];
	uint64_t orig;

	make_copy(base, copies, i);
	orig = swap_page(dev, target, copy);
	CHECK(memcmp(target, copy, PAGE) == 0,
	      "page %zu does not show its copy after the swap", i);
	snprintf(note, sizeof(note), "written at %p", (void *)target);
	memcpy(target + 100, note, strlen(note) + 1);
	CHECK(strcmp((char *)copy + 100, note) == 0,
	      "write through page %zu did not reach the copy", i);
	return orig;
}

static char *tmp_path(const char *what)
{
	static char path[128];

	snprintf(path, sizeof(path), "/tmp/ptetest-%s-%d", what,
		 (int)getpid());
	return path;
}

/* ---- tests ---- */

/* Everything the engine needs, on one process, ending in munmap. */
static int test_basic(void)
{
	const size_t n = 4;
	int dev = dev_open(), fd, status;
	unsigned char *base, *copies;
	uint64_t orig0, orig1;
	ptedit_entry_t e;
	pid_t child;
	size_t i;

	CHECK(open(PTEDITOR_DEVICE_PATH, O_RDWR) < 0 && errno == EBUSY,
	      "a second open of the device was not refused with EBUSY");
	CHECK(ioctl(dev, PTEDITOR_IOCTL_CMD_GET_PAGESIZE, 0) == (int)PAGE,
	      "GET_PAGESIZE is not %lu", PAGE);
	CHECK(ioctl(dev, PTEDITOR_IOCTL_CMD_VM_LOCK, 0) < 0 && errno == ENOTTY,
	      "VM_LOCK, which is not served, did not fail with ENOTTY");

	fd = make_base(tmp_path("basic"), n);
	base = map_base(fd, n);
	copies = map_copies(n);

	/* Bad requests are refused and change nothing. */
	make_copy(base, copies, 0);
	e = resolve(dev, 0, base);
	CHECK(update_pte(dev, 0, base, e.pte | PTE_RW) == -EINVAL,
	      "mapping the file page itself writable was not refused");
	CHECK(update_pte(dev, 999999, base, e.pte) == -ESRCH,
	      "a request for a missing pid did not fail with ESRCH");
	e = resolve(dev, 0, base);
	e.pmd ^= PTE_RW;
	e.valid = PTEDIT_VALID_MASK_PMD | PTEDIT_VALID_MASK_PTE;
	CHECK(ioctl(dev, PTEDITOR_IOCTL_CMD_VM_UPDATE, &e) < 0 &&
		      errno == EOPNOTSUPP,
	      "a change to the PMD was not refused with EOPNOTSUPP");
	CHECK(update_pte(dev, 0, copies, e.pte) == -EINVAL,
	      "swapping an anonymous mapping's entry was not refused");
	CHECK(shows_base(base, 0) && swapped(dev, getpid()) == 0,
	      "a refused request changed something");

	orig0 = swap_and_check(dev, base, copies, 0);
	orig1 = swap_and_check(dev, base, copies, 1);
	for (i = 2; i < n; i++)
		swap_and_check(dev, base, copies, i);
	CHECK(swapped(dev, getpid()) == (long)n, "not %zu swapped entries", n);
	check_file_intact(fd, n);

	/* Another process mapping the file sees the file, not our copies. */
	child = fork();
	CHECK(child >= 0, "fork: %s", strerror(errno));
	if (child == 0) {
		for (i = 0; i < n; i++)
			if (!shows_base(base + i * PAGE, i))
				_exit(2);
		_exit(0);
	}
	CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) &&
		      WEXITSTATUS(status) == 0,
	      "a forked child did not see the base file (status %#x)", status);

	/* Protection changes keep the swapped entries. */
	CHECK(mprotect(base, n * PAGE, PROT_NONE) == 0 &&
		      mprotect(base, n * PAGE, PROT_READ) == 0,
	      "mprotect: %s", strerror(errno));
	for (i = 0; i < n; i++)
		CHECK(memcmp(base + i * PAGE, copies + i * PAGE, PAGE) == 0,
		      "page %zu lost its copy across mprotect", i);

	/* Restores: PTEditor's way (write the original back), and ours. */
	CHECK(update_pte(dev, 0, base, orig0) == 0, "restore by VM_UPDATE");
	CHECK(shows_base(base, 0), "page 0 does not show the file again");
	e = resolve(dev, 0, base + PAGE);
	CHECK((e.pte & PTE_PFN_MASK) != (orig1 & PTE_PFN_MASK),
	      "page 1 is not swapped before its restore");
	e.pid = 0;
	CHECK(ioctl(dev, PTEDITOR_IOCTL_CMD_VM_RESTORE, &e) == 0,
	      "VM_RESTORE: %s", strerror(errno));
	CHECK(shows_base(base + PAGE, 1), "page 1 does not show the file");
	CHECK(ioctl(dev, PTEDITOR_IOCTL_CMD_VM_RESTORE, &e) < 0 &&
		      errno == ENOENT,
	      "a second VM_RESTORE of page 1 did not fail with ENOENT");
	CHECK(swapped(dev, getpid()) == (long)n - 2, "restores not counted");

	/* A restored page can be swapped again. */
	swap_and_check(dev, base, copies, 0);
	CHECK(swapped(dev, getpid()) == (long)n - 1, "re-swap not counted");

	CHECK(munmap(base, n * PAGE) == 0, "munmap: %s", strerror(errno));
	CHECK(swapped(dev, getpid()) == 0, "entries left swapped after munmap");
	check_file_intact(fd, n);
	return 0;
}

/* munmap of part of a mapping restores exactly the entries inside it. */
static int test_munmap(void)
{
	const size_t n = 8, swap_these[] = { 1, 3, 5, 6 };
	int dev = dev_open(), fd = make_base(tmp_path("munmap"), n);
	unsigned char *base = map_base(fd, n), *copies = map_copies(n);
	size_t i;

	for (i = 0; i < sizeof(swap_these) / sizeof(*swap_these); i++)
		swap_and_check(dev, base, copies, swap_these[i]);
	CHECK(swapped(dev, getpid()) == 4, "not 4 swapped entries");

	CHECK(munmap(base + 2 * PAGE, 4 * PAGE) == 0, "munmap pages 2-5");
	CHECK(swapped(dev, getpid()) == 2, "not 2 entries left after munmap");
	CHECK(memcmp(base + PAGE, copies + PAGE, PAGE) == 0 &&
		      memcmp(base + 6 * PAGE, copies + 6 * PAGE, PAGE) == 0,
	      "pages 1 and 6, outside the unmapped range, lost their copies");
	CHECK(shows_base(base, 0) && shows_base(base + 7 * PAGE, 7),
	      "unswapped pages do not show the file");

	CHECK(munmap(base, n * PAGE) == 0, "munmap the rest");
	CHECK(swapped(dev, getpid()) == 0, "entries left swapped");
	check_file_intact(fd, n);
	return 0;
}

/*
 * Other ways the kernel takes entries down.  madvise(MADV_DONTNEED) drops
 * the file page but not the process's data, so the copy comes back;
 * mremap moves the original entries (the copies stay behind, at their
 * own addresses); truncation ends the swaps past the new end of file.
 */
static int test_zap(void)
{
	const size_t n = 8;
	int dev = dev_open(), fd = make_base(tmp_path("zap"), n);
	unsigned char *base = map_base(fd, n), *copies = map_copies(n);
	unsigned char *moved;
	pid_t me = getpid();
	size_t i;

	for (i = 0; i < n; i++)
		swap_and_check(dev, base, copies, i);

	CHECK(madvise(base, PAGE, MADV_DONTNEED) == 0, "madvise DONTNEED");
	CHECK(swapped(dev, me) == (long)n, "MADV_DONTNEED ended a swap");
	CHECK(memcmp(base, copies, PAGE) == 0,
	      "page 0 lost its copy across MADV_DONTNEED");

	moved = mmap(NULL, 2 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS,
		     -1, 0);
	CHECK(moved != MAP_FAILED, "reserve: %s", strerror(errno));
	moved = mremap(base + PAGE, 2 * PAGE, 2 * PAGE,
		       MREMAP_MAYMOVE | MREMAP_FIXED, moved);
	CHECK(moved != MAP_FAILED, "mremap: %s", strerror(errno));
	CHECK(swapped(dev, me) == 6, "mremap did not restore pages 1-2");
	CHECK(shows_base(moved, 1) && shows_base(moved + PAGE, 2),
	      "moved pages do not show the file");

	CHECK(ftruncate(fd, (off_t)(6 * PAGE)) == 0, "truncate");
	CHECK(swapped(dev, me) == 4, "truncation did not end pages 6-7");
	CHECK(memcmp(base + 3 * PAGE, copies + 3 * PAGE, PAGE) == 0 &&
		      memcmp(base, copies, PAGE) == 0,
	      "pages 0 and 3 lost their copies");

	CHECK(munmap(base, n * PAGE) == 0 && munmap(moved, 2 * PAGE) == 0,
	      "munmap: %s", strerror(errno));
	CHECK(swapped(dev, me) == 0, "entries left swapped");
	check_file_intact(fd, 6);
	return 0;
}

/* Runs fn in a child that shares our mappings (not the copies); 0 if it
 * exited 0. */
static int in_child(int (*fn)(unsigned char *, size_t), unsigned char *base,
		    size_t n)
{
	int status;
	pid_t child = fork();

	CHECK(child >= 0, "fork: %s", strerror(errno));
	if (child == 0)
		_exit(fn(base, n));
	CHECK(waitpid(child, &status, 0) == child, "waitpid: %s",
	      strerror(errno));
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

/* In a child: move the file pages, mapped by both processes, to the
 * other NUMA node, and check they moved. */
static int move_to_other_node(unsigned char *base, size_t n)
{
	void *pages[16];
	int nodes[16], status[16];
	size_t i;

	for (i = 0; i < n; i++) {
		pages[i] = base + i * PAGE;
		if (!shows_base(pages[i], i)) /* maps the file page here */
			return 2;
	}
	if (syscall(SYS_move_pages, 0, n, pages, NULL, status, 0) != 0)
		return 3;
	for (i = 0; i < n; i++)
		nodes[i] = status[i] == 0 ? 1 : 0;
	if (syscall(SYS_move_pages, 0, n, pages, nodes, status,
		    MPOL_MF_MOVE_ALL) != 0)
		return 4;
	for (i = 0; i < n; i++)
		if (status[i] != nodes[i])
			return 5;
	return 0;
}

/*
 * The kernel migrates the file pages behind swapped entries (as
 * compaction and NUMA placement do): it needs the originals in place
 * while it works, and the copies must be back afterwards, now covering
 * the pages' new frames.
 */
static int test_migrate(void)
{
	const size_t n = 4;
	int dev = dev_open(), fd = make_base(tmp_path("migrate"), n);
	unsigned char *base = map_base(fd, n), *copies = map_copies(n);
	ptedit_entry_t e;
	size_t i;

	for (i = 0; i < n; i++)
		swap_and_check(dev, base, copies, i);
	CHECK(in_child(move_to_other_node, base, n) == 0,
	      "the file pages could not be moved to the other node");
	CHECK(swapped(dev, getpid()) == (long)n, "migration ended swaps");
	for (i = 0; i < n; i++)
		CHECK(memcmp(base + i * PAGE, copies + i * PAGE, PAGE) == 0,
		      "page %zu lost its copy across migration", i);

	/* The restored original is the page's new frame, and valid. */
	e = resolve(dev, 0, base);
	e.pid = 0;
	CHECK(ioctl(dev, PTEDITOR_IOCTL_CMD_VM_RESTORE, &e) == 0,
	      "VM_RESTORE: %s", strerror(errno));
	CHECK(shows_base(base, 0), "page 0 does not show the file");

	CHECK(munmap(base, n * PAGE) == 0, "munmap: %s", strerror(errno));
	CHECK(swapped(dev, getpid()) == 0, "entries left swapped");
	check_file_intact(fd, n);
	return 0;
}

/* In a child: map the file pages, page them out, and check the kernel
 * unmapped them (which walks every mapping of the pages). */
static int page_out(unsigned char *base, size_t n)
{
	int pagemap = open("/proc/self/pagemap", O_RDONLY);
	uint64_t entry;
	size_t i;

	for (i = 0; i < n; i++)
		if (!shows_base(base + i * PAGE, i))
			return 2;
	if (pagemap < 0 || madvise(base, n * PAGE, MADV_PAGEOUT) != 0)
		return 3;
	for (i = 0; i < n; i++) {
		off_t at = (off_t)((uintptr_t)(base + i * PAGE) / PAGE * 8);

		if (pread(pagemap, &entry, 8, at) != 8)
			return 4;
		if (entry & (1ULL << 63)) /* still present */
			return 5;
	}
	return 0;
}

/*
 * Reclaim walks every mapping of a file page it takes, ours included,
 * without our mmap_lock: the swapped entries must come through.  The
 * pages are first dropped from our mapping (MADV_DONTNEED), so that only
 * the child maps them, which is what MADV_PAGEOUT wants.
 */
static int test_pageout(void)
{
	const size_t n = 4;
	int dev = dev_open(), fd = make_base(tmp_path("pageout"), n);
	unsigned char *base = map_base(fd, n), *copies = map_copies(n);
	size_t i;

	for (i = 0; i < n; i++)
		swap_and_check(dev, base, copies, i);
	CHECK(madvise(base, n * PAGE, MADV_DONTNEED) == 0, "madvise");
	CHECK(in_child(page_out, base, n) == 0,
	      "the child could not page the file pages out");
	CHECK(swapped(dev, getpid()) == (long)n, "reclaim ended swaps");
	for (i = 0; i < n; i++)
		CHECK(memcmp(base + i * PAGE, copies + i * PAGE, PAGE) == 0,
		      "page %zu lost its copy across reclaim", i);

	CHECK(munmap(base, n * PAGE) == 0, "munmap: %s", strerror(errno));
	CHECK(swapped(dev, getpid()) == 0, "entries left swapped");
	check_file_intact(fd, n);
	return 0;
}

/* Swap, then exit normally with every entry still swapped. */
static int test_exit(void)
{
	const size_t n = 6;
	int dev = dev_open(), fd = make_base(tmp_path("exit"), n);
	unsigned char *base = map_base(fd, n), *copies = map_copies(n);
	size_t i;

	for (i = 0; i < n; i++)
		swap_and_check(dev, base, copies, i);
	CHECK(swapped(dev, getpid()) == (long)n, "not %zu swapped entries", n);
	check_file_intact(fd, n);
	return 0;
}

/* The device's count of swapped entries, for all processes. */
static int test_count(const char *want)
{
	int dev = dev_open();
	long n = swapped(dev, 0);

	CHECK(n == atol(want), "%ld entries swapped, expected %s", n, want);
	return 0;
}

/*
 * A child swaps pages and is killed by SIGKILL while they are swapped;
 * it holds the device, so once it is gone the parent can open it and
 * find nothing left.
 */
static int test_kill(void)
{
	const size_t n = 6;
	int ready[2], status;
	pid_t child;
	char c;

	CHECK(pipe(ready) == 0, "pipe: %s", strerror(errno));
	child = fork();
	CHECK(child >= 0, "fork: %s", strerror(errno));
	if (child == 0) {
		int dev = dev_open(), fd = make_base(tmp_path("kill"), n);
		unsigned char *base = map_base(fd, n);
		unsigned char *copies = map_copies(n);
		size_t i;

		for (i = 0; i < n; i++)
			swap_and_check(dev, base, copies, i);
		CHECK(write(ready[1], "r", 1) == 1, "signal readiness");
		for (;;)
			pause();
	}
	close(ready[1]);
	CHECK(read(ready[0], &c, 1) == 1, "the child died before swapping");
	CHECK(kill(child, SIGKILL) == 0, "kill: %s", strerror(errno));
	CHECK(waitpid(child, &status, 0) == child && WIFSIGNALED(status) &&
		      WTERMSIG(status) == SIGKILL,
	      "the child did not die of SIGKILL (status %#x)", status);
	return test_count("0");
}

/*
 * Unloading the module with entries swapped restores them: a child swaps
 * pages and closes the device; we unload the module, and the child then
 * sees the file again at the swapped addresses and its copies intact.
 */
static int test_unload(const char *ko)
{
	const size_t n = 4;
	int ready[2], go[2], status, kofd;
	pid_t child;
	char c;

	CHECK(pipe(ready) == 0 && pipe(go) == 0, "pipe: %s", strerror(errno));
	child = fork();
	CHECK(child >= 0, "fork: %s", strerror(errno));
	if (child == 0) {
		int dev = dev_open(), fd = make_base(tmp_path("unload"), n);
		unsigned char *base = map_base(fd, n);
		unsigned char *copies = map_copies(n);
		size_t i;

		for (i = 0; i < n; i++)
			swap_and_check(dev, base, copies, i);
		close(dev);
		CHECK(write(ready[1], "r", 1) == 1, "signal readiness");
		CHECK(read(go[0], &c, 1) == 1, "wait for the unload");
		for (i = 0; i < n; i++) {
			CHECK(shows_base(base + i * PAGE, i),
			      "page %zu still swapped after unload", i);
			CHECK(strncmp((char *)copies + i * PAGE, "copy ", 5)
				      == 0,
			      "copy %zu damaged by the unload", i);
		}
		check_file_intact(fd, n);
		_exit(0);
	}
	CHECK(read(ready[0], &c, 1) == 1, "the child died before swapping");
	CHECK(syscall(SYS_delete_module, "pteditor", O_NONBLOCK) == 0,
	      "unload the module: %s", strerror(errno));
	CHECK(write(go[1], "g", 1) == 1, "wake the child");
	CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) &&
		      WEXITSTATUS(status) == 0,
	      "the child failed after the unload (status %#x)", status);

	kofd = open(ko, O_RDONLY | O_CLOEXEC);
	CHECK(kofd >= 0, "open %s: %s", ko, strerror(errno));
	CHECK(syscall(SYS_finit_module, kofd, "", 0) == 0,
	      "load the module again: %s", strerror(errno));
	return test_count("0");
}

/*
 * The failure the module prevents, on purpose: with restore=0 the swap
 * is PTEditor's, untracked, and munmap then unaccounts the copy instead
 * of the file page, so the copy loses a reference it never had and, once
 * the process exits, one more.  To keep the demonstration from freeing a
 * page that is still in use (which would spread the damage to whatever
 * reuses it), the copy is first spliced twice into a pipe held open by a
 * child that outlives the test: the kernel reports the bad accounting
 * ("Bad page map", "Bad rss-counter state") and the page simply leaks.
 */
static int test_raw(void)
{
	int dev = dev_open(), fd = make_base(tmp_path("raw"), 1), pipefd[2];
	unsigned char *base = map_base(fd, 1), *copies = map_copies(1);
	struct iovec iov = { .iov_base = copies, .iov_len = PAGE };
	int sysfs = open(SYSFS_RESTORE, O_RDONLY);
	char flag = 0;
	pid_t holder;
	int i;

	CHECK(sysfs >= 0 && read(sysfs, &flag, 1) == 1 && flag == 'N',
	      "restore is not off; this test needs restore=0");
	CHECK(pipe(pipefd) == 0, "pipe: %s", strerror(errno));
	make_copy(base, copies, 0);
	for (i = 0; i < 2; i++)
		CHECK(vmsplice(pipefd[1], &iov, 1, 0) == (ssize_t)PAGE,
		      "vmsplice: %s", strerror(errno));
	holder = fork();
	CHECK(holder >= 0, "fork: %s", strerror(errno));
	if (holder == 0) {
		close(dev);
		for (;;)
			pause();
	}
	close(pipefd[0]);
	close(pipefd[1]);

	swap_page(dev, base, copies);
	CHECK(memcmp(base, copies, PAGE) == 0, "the raw swap did not take");
	CHECK(swapped(dev, getpid()) == 0, "a restore=0 swap was tracked");
	CHECK(munmap(base, PAGE) == 0, "munmap: %s", strerror(errno));
	return 0;
}

/* ---- a client of the server in ptserver.py ---- */

/* Requests and replies on the server's socket, native byte order. */
enum { OP_SWAP = 1, OP_RESTORE = 2, OP_COUNT = 3 };

struct request {
	uint64_t op, target, copy;
};

static long ask(int sock, uint64_t op, const void *target, const void *copy)
{
	struct request req = { op, (uintptr_t)target, (uintptr_t)copy };
	int64_t reply;

	CHECK(write(sock, &req, sizeof(req)) == sizeof(req), "send: %s",
	      strerror(errno));
	CHECK(read(sock, &reply, sizeof(reply)) == sizeof(reply),
	      "no reply from the server");
	return (long)reply;
}

/*
 * Swap n pages of the shared base file through the server, write to
 * them, check isolation, then end as mode says: "unmap" (in two halves),
 * "exit" (normally, entries swapped), "kill" (wait to be killed) or
 * "restore" (ask the server to restore each page).
 */
static int test_client(const char *sockpath, const char *basepath,
		       size_t n, const char *mode)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int fd = open(basepath, O_RDWR | O_CLOEXEC);
	unsigned char *base, *copies;
	char note[64];
	size_t i;

	CHECK(fd >= 0, "open %s: %s", basepath, strerror(errno));
	CHECK(strlen(sockpath) < sizeof(sa.sun_path), "socket path too long");
	strcpy(sa.sun_path, sockpath);
	CHECK(connect(sock, (struct sockaddr *)&sa, sizeof(sa)) == 0,
	      "connect %s: %s", sockpath, strerror(errno));
	base = map_base(fd, n);
	copies = map_copies(n);

	for (i = 0; i < n; i++) {
		unsigned char *target = base + i * PAGE;
		long err;

		make_copy(base, copies, i);
		err = ask(sock, OP_SWAP, target, copies + i * PAGE);
		CHECK(err == 0, "swap of page %zu: %s", i, strerror((int)-err));
		snprintf(note, sizeof(note), "pid %d page %zu", (int)getpid(),
			 i);
		memcpy(target + 200, note, strlen(note) + 1);
	}
	for (i = 0; i < n; i++) {
		snprintf(note, sizeof(note), "pid %d page %zu", (int)getpid(),
			 i);
		CHECK(memcmp(base + i * PAGE, copies + i * PAGE, PAGE) == 0 &&
			      strcmp((char *)base + i * PAGE + 200, note) == 0,
		      "page %zu does not hold our own writes", i);
	}
	CHECK(ask(sock, OP_COUNT, NULL, NULL) == (long)n, "count after swaps");
	check_file_intact(fd, n);

	if (strcmp(mode, "unmap") == 0) {
		CHECK(munmap(base, n / 2 * PAGE) == 0, "munmap first half");
		CHECK(ask(sock, OP_COUNT, NULL, NULL) == (long)(n - n / 2),
		      "count after the first half");
		CHECK(munmap(base + n / 2 * PAGE, (n - n / 2) * PAGE) == 0,
		      "munmap second half");
		CHECK(ask(sock, OP_COUNT, NULL, NULL) == 0, "count after all");
	} else if (strcmp(mode, "restore") == 0) {
		for (i = 0; i < n; i++)
			CHECK(ask(sock, OP_RESTORE, base + i * PAGE, NULL) == 0,
			      "restore page %zu", i);
		for (i = 0; i < n; i++)
			CHECK(shows_base(base + i * PAGE, i),
			      "page %zu does not show the file", i);
		CHECK(ask(sock, OP_COUNT, NULL, NULL) == 0, "count");
	} else if (strcmp(mode, "kill") == 0) {
		printf("ready %d\n", (int)getpid());
		fflush(stdout);
		for (;;)
			pause();
	} else {
		CHECK(strcmp(mode, "exit") == 0, "unknown mode %s", mode);
	}
	printf("done %d %s\n", (int)getpid(), mode);
	return 0;
}

static void usage(void)
{
	fputs("usage: ptetest basic|munmap|zap|migrate|pageout|exit|kill|raw\n"
	      "       ptetest count N\n"
	      "       ptetest mkbase FILE PAGES\n"
	      "       ptetest unload MODULE.ko\n"
	      "       ptetest client SOCKET BASEFILE PAGES MODE\n",
	      stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";

	test_name = cmd;
	if (argc == 2 && strcmp(cmd, "basic") == 0)
		return test_basic();
	if (argc == 2 && strcmp(cmd, "munmap") == 0)
		return test_munmap();
	if (argc == 2 && strcmp(cmd, "zap") == 0)
		return test_zap();
	if (argc == 2 && strcmp(cmd, "migrate") == 0)
		return test_migrate();
	if (argc == 2 && strcmp(cmd, "pageout") == 0)
		return test_pageout();
	if (argc == 2 && strcmp(cmd, "exit") == 0)
		return test_exit();
	if (argc == 2 && strcmp(cmd, "kill") == 0)
		return test_kill();
	if (argc == 2 && strcmp(cmd, "raw") == 0)
		return test_raw();
	if (argc == 4 && strcmp(cmd, "mkbase") == 0)
		return close(make_base(argv[2], (size_t)atol(argv[3])));
	if (argc == 3 && strcmp(cmd, "count") == 0)
		return test_count(argv[2]);
	if (argc == 3 && strcmp(cmd, "unload") == 0)
		return test_unload(argv[2]);
	if (argc == 6 && strcmp(cmd, "client") == 0)
		return test_client(argv[2], argv[3], (size_t)atol(argv[4]),
				   argv[5]);
	usage();
	return 2;
}
