// SPDX-License-Identifier: GPL-2.0
/*
 * pteditor: the page-table editor device behind cowd's pteditor engine.
 *
 * /dev/pteditor speaks the part of PTEditor's ioctl interface that cowd
 * needs (see pteditor.h): read the paging entries of an address of a
 * process, point one page-table entry at another page, flush the TLB.
 * cowd holds the only open descriptor and, when a client's SIGSEGV
 * handler has copied a page of a shared file mapping into an anonymous
 * page of its own, points the faulting entry at that copy.
 *
 * Such a swap lies to the kernel: the entry of a file mapping now maps an
 * anonymous page that the kernel's books still count as mapped only
 * where it was allocated, while the file page is counted as mapped where
 * it no longer is.  If the kernel ever tears that entry down itself
 * (munmap, exit, mremap, madvise, truncate), it unaccounts the wrong
 * page: "BUG: Bad page map", "Bad rss-counter state", and a page freed
 * while still mapped.  PTEditor leaves that to its user.  This module
 * does not: it remembers every entry it swapped (the mm, the address,
 * the original entry, a reference on the copy) and registers an mmu
 * notifier on the process's mm, so that the kernel never meets one of
 * its entries:
 *
 * - before a range is unmapped (munmap, mremap, mmap over it) the
 *   originals in it are put back and those swaps end;
 * - before other work on a range (madvise, truncation, reclaim or
 *   migration of the file page) they are put back but the swaps are only
 *   suspended: once the kernel is done, the copies go back in, over the
 *   file page wherever it now is, or alone where the kernel dropped it
 *   (but never past the end of the file);
 * - when the mm is torn down (normal exit, SIGKILL, exec, anything) all
 *   originals are put back before the first mapping is unmapped;
 * - unloading the module puts back everything it still tracks.
 *
 * Protection changes keep the page an entry maps and leave it swapped.
 * The module parameter restore=0 turns tracking off for new swaps, which
 * reproduces PTEditor's behaviour; it exists so tests can show the
 * failure is real, and must never be used otherwise.  The parameter
 * ptedit_abi=1 makes the device answer as PTEditor does, for testing
 * that cowd drives PTEditor right: VM_UPDATE writes the entry it is
 * given, nothing is tracked, and VM_RESTORE and SWAPPED are unknown.
 * Switch it only while no swap is tracked.
 *
 * Only x86-64 is supported: the entry checks use x86 page bits.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/atomic.h>
#include <linux/delay.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pgtable.h>
#include <linux/pid.h>
#include <linux/rbtree.h>
#include <linux/sched/mm.h>
#include <linux/sched/task.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/swap.h>
#include <linux/swapops.h>
#include <linux/threads.h>
#include <linux/uaccess.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <asm/tlbflush.h>

#include "pteditor.h"

#ifndef CONFIG_X86_64
#error "pteditor supports x86-64 only"
#endif

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Page-table editor for cowd, restoring swapped entries");

static bool restore = true;
module_param(restore, bool, 0644);
MODULE_PARM_DESC(restore,
		 "Track swapped entries and restore them before unmap and exit "
		 "(default 1; 0 only to demonstrate the corruption in tests)");

static bool ptedit_abi;
module_param(ptedit_abi, bool, 0644);
MODULE_PARM_DESC(ptedit_abi,
		 "Serve PTEditor's interface only, as PTEditor does: no tracking, "
		 "no VM_RESTORE or SWAPPED (default 0; for tests of cowd)");

/*
 * How often a swap waits for an invalidation of the process's address
 * space to finish before giving up with -EAGAIN, and how long each wait
 * is: invalidations last microseconds, so 200 waits of 50-100 us cover
 * a slow one without stalling cowd for long.
 */
#define PTE_BUSY_RETRIES 200

/*
 * A suspended swap whose file page is being migrated is tried again
 * every millisecond, for about a second; migration takes far less.
 */
#define PTE_RESUME_DELAY_MS 1
#define PTE_RESUME_TRIES 1000

/* One swapped entry: where, what it held, and the page it maps now. */
struct pte_swap {
	struct rb_node node;
	unsigned long vaddr;
	pte_t orig;		/* what the kernel had there (may be none) */
	pte_t swapped;		/* what we put there */
	struct page *copy;	/* holds a reference while tracked */
	bool suspended;		/* original in place for the kernel */
	bool dirty;		/* the swapped entry was written through */
	struct list_head done;	/* on a restore batch, once detached */
};

/*
 * The swapped entries of one mm, and its mmu notifier subscription.
 *
 * lock protects swaps and the counts and flags below, and is taken
 * after mmap_lock and before a page-table lock.  invalidating counts
 * invalidate_range_start calls not yet matched by their _end: no entry
 * is swapped (or swapped again) while it is non-zero, because the kernel
 * may be between clearing entries and having cleared ours, and would
 * then meet a swapped entry that the start callback could not restore.
 * Suspended entries are resumed by the resume work once it drops to 0.
 *
 * Lifetime: one reference from mmu_notifier_get per pte_mm, dropped by
 * whoever takes it off pte_mms (release or module exit); the memory is
 * freed by free_notifier after an SRCU grace period.
 */
struct pte_mm {
	struct mmu_notifier mn;
	spinlock_t lock;
	struct rb_root swaps;
	unsigned long nr_swaps;
	unsigned long nr_suspended;
	int invalidating;
	unsigned int resume_tries;
	struct delayed_work resume;
	bool released;
	bool attached;		/* listed once; under pte_attach_mutex */
	struct list_head link;	/* on pte_mms, under pte_mms_lock */
};

static LIST_HEAD(pte_mms);
static DEFINE_SPINLOCK(pte_mms_lock);
static DEFINE_MUTEX(pte_attach_mutex);
static DECLARE_WAIT_QUEUE_HEAD(pte_release_wait);

/* PTEditor lets one process open the device at a time; so do we. */
static unsigned long pte_device_busy;

/* Why swaps ended, and how often, for the unload summary. */
enum pte_reason {
	PTE_BY_REQUEST, PTE_BY_UNMAP, PTE_BY_EXIT, PTE_BY_UNLOAD,
	PTE_BY_KERNEL, PTE_REASONS
};
static atomic_long_t pte_restored[PTE_REASONS];
static atomic_long_t pte_swapped_total;
static atomic_long_t pte_suspended_total;
static atomic_long_t pte_resumed_total;

static const char *const pte_reason_name[PTE_REASONS] = {
	"request", "unmap", "exit", "unload", "the kernel (page gone)",
};

static inline struct pte_mm *to_pte_mm(struct mmu_notifier *mn)
{
	return container_of(mn, struct pte_mm, mn);
}

/*
 * Drop every translation on every CPU, global ones and those of every
 * PCID included.  The kernel's mm-wide flush is not exported to modules,
 * but __flush_tlb_all is, and run on each CPU it leaves no stale entry
 * for the address behind, whichever mm or PCID cached it.
 */
static void pte_flush_local(void *unused)
{
	__flush_tlb_all();
}

static void pte_flush_all_cpus(void)
{
	on_each_cpu(pte_flush_local, NULL, 1);
}

/*
 * Walk mm's page tables to addr, record each level's entry in e (when e
 * is not NULL), and return the page-table entry mapped and locked, or
 * NULL when no page table covers addr or a huge entry maps it.
 *
 * The caller keeps the page tables from being freed under us: it holds
 * mmap_lock, or runs in invalidate_range_start for a range holding addr
 * (tables are freed only after their range is invalidated), or in
 * ->release (the tables are freed later by the same exiting task).
 */
static pte_t *pte_lookup_lock(struct mm_struct *mm, unsigned long addr,
			      spinlock_t **ptl, struct ptedit_entry *e)
{
	struct ptedit_entry scratch;
	pgd_t *pgdp, pgd;
	p4d_t *p4dp, p4d;
	pud_t *pudp, pud;
	pmd_t *pmdp, pmd;
	pte_t *ptep;

	if (!e)
		e = &scratch;
	e->valid = 0;

	pgdp = pgd_offset(mm, addr);
	pgd = READ_ONCE(*pgdp);
	e->pgd = pgd_val(pgd);
	if (pgd_none(pgd) || pgd_bad(pgd))
		return NULL;
	e->valid |= PTEDIT_VALID_MASK_PGD;

	p4dp = p4d_offset(pgdp, addr);
	p4d = READ_ONCE(*p4dp);
	e->p4d = p4d_val(p4d);
	if (p4d_none(p4d) || p4d_bad(p4d))
		return NULL;
	e->valid |= PTEDIT_VALID_MASK_P4D;

	pudp = pud_offset(p4dp, addr);
	pud = READ_ONCE(*pudp);
	e->pud = pud_val(pud);
	if (pud_none(pud))
		return NULL;
	e->valid |= PTEDIT_VALID_MASK_PUD;
	if (pud_leaf(pud) || pud_bad(pud))
		return NULL;

	pmdp = pmd_offset(pudp, addr);
	pmd = READ_ONCE(*pmdp);
	e->pmd = pmd_val(pmd);
	if (pmd_none(pmd))
		return NULL;
	e->valid |= PTEDIT_VALID_MASK_PMD;
	if (!pmd_present(pmd) || pmd_leaf(pmd) || pmd_bad(pmd))
		return NULL;

	/*
	 * A huge page may have replaced the table since we read pmd (under
	 * mmap_lock read, a fault can still split or install one): check
	 * again under the table's lock, which such a change also takes.
	 */
	ptep = pte_offset_map_lock(mm, pmdp, addr, ptl);
	if (!pmd_same(pmd, READ_ONCE(*pmdp))) {
		pte_unmap_unlock(ptep, *ptl);
		return NULL;
	}
	e->pte = pte_val(ptep_get(ptep));
	e->valid |= PTEDIT_VALID_MASK_PTE;

	return ptep;
}

static struct pte_swap *pte_swap_find(struct pte_mm *pm, unsigned long vaddr)
{
	struct rb_node *n = pm->swaps.rb_node;

	while (n) {
		struct pte_swap *s = rb_entry(n, struct pte_swap, node);

		if (vaddr < s->vaddr)
			n = n->rb_left;
		else if (vaddr > s->vaddr)
			n = n->rb_right;
		else
			return s;
	}

	return NULL;
}

/* The swapped entry with the lowest address at or above vaddr. */
static struct pte_swap *pte_swap_first(struct pte_mm *pm, unsigned long vaddr)
{
	struct rb_node *n = pm->swaps.rb_node;
	struct pte_swap *best = NULL;

	while (n) {
		struct pte_swap *s = rb_entry(n, struct pte_swap, node);

		if (s->vaddr >= vaddr) {
			best = s;
			n = n->rb_left;
		} else {
			n = n->rb_right;
		}
	}

	return best;
}

static struct pte_swap *pte_swap_next(struct pte_swap *swap)
{
	struct rb_node *next = rb_next(&swap->node);

	return next ? rb_entry(next, struct pte_swap, node) : NULL;
}

static void pte_swap_insert(struct pte_mm *pm, struct pte_swap *swap)
{
	struct rb_node **link = &pm->swaps.rb_node, *parent = NULL;

	while (*link) {
		struct pte_swap *s = rb_entry(*link, struct pte_swap, node);

		parent = *link;
		link = swap->vaddr < s->vaddr ? &parent->rb_left
					      : &parent->rb_right;
	}
	rb_link_node(&swap->node, parent, link);
	rb_insert_color(&swap->node, &pm->swaps);
	pm->nr_swaps++;
}

/*
 * Put the original entry back in place of a swapped one, under pm->lock.
 *
 * The original goes back write-protected: if the mapping was writable,
 * the next write takes an ordinary write fault and the kernel redoes its
 * dirty tracking, which it could not do while our entry was in place.
 * An original that was empty (the copy was installed where the kernel
 * had taken the file page down, see pte_resume_one) goes back empty.
 * If the entry no longer maps our copy, something changed it without
 * telling us; we leave it alone and say so.
 */
static void pte_swap_restore(struct mm_struct *mm, struct pte_swap *swap)
{
	spinlock_t *ptl;
	pte_t *ptep, cur;

	ptep = pte_lookup_lock(mm, swap->vaddr, &ptl, NULL);
	if (!ptep) {
		pr_err("no page table at %#lx, swapped entry not restored\n",
		       swap->vaddr);
		return;
	}

	cur = ptep_get(ptep);
	if (pte_present(cur) && pte_pfn(cur) == page_to_pfn(swap->copy)) {
		cur = ptep_get_and_clear(mm, swap->vaddr, ptep);
		swap->dirty |= pte_dirty(cur);
		/* As mprotect may have left it, for a resume. */
		swap->swapped = cur;
		if (!pte_none(swap->orig))
			set_pte_at(mm, swap->vaddr, ptep,
				   pte_wrprotect(swap->orig));
	} else {
		pr_err("entry at %#lx changed to %#lx, not restored\n",
		       swap->vaddr, (unsigned long)pte_val(cur));
	}
	pte_unmap_unlock(ptep, ptl);
}

/*
 * Forget a swapped entry, under pm->lock, restoring it first unless it is
 * suspended (restored already).  The copy stays referenced until
 * pte_finish, since other CPUs may still hold translations to it.
 */
static void pte_swap_detach(struct pte_mm *pm, struct mm_struct *mm,
			    struct pte_swap *swap, struct list_head *done)
{
	if (swap->suspended)
		pm->nr_suspended--;
	else
		pte_swap_restore(mm, swap);
	rb_erase(&swap->node, &pm->swaps);
	pm->nr_swaps--;
	list_add_tail(&swap->done, done);
}

/* Detach the swapped entries of pm within [start, end) onto done. */
static void pte_detach_range(struct pte_mm *pm, struct mm_struct *mm,
			     unsigned long start, unsigned long end,
			     struct list_head *done)
{
	struct pte_swap *swap = pte_swap_first(pm, start);

	while (swap && swap->vaddr < end) {
		struct pte_swap *next = pte_swap_next(swap);

		pte_swap_detach(pm, mm, swap, done);
		swap = next;
	}
}

/*
 * Restore the swapped entries of pm within [start, end) but keep them,
 * and the references on their copies, to be swapped in again once the
 * kernel is done (pte_resume_one).  Under pm->lock.
 */
static void pte_suspend_range(struct pte_mm *pm, struct mm_struct *mm,
			      unsigned long start, unsigned long end)
{
	struct pte_swap *swap = pte_swap_first(pm, start);

	for (; swap && swap->vaddr < end; swap = pte_swap_next(swap)) {
		if (swap->suspended)
			continue;
		pte_swap_restore(mm, swap);
		swap->suspended = true;
		pm->nr_suspended++;
		atomic_long_inc(&pte_suspended_total);
	}
}

/*
 * Finish what pte_swap_detach began, with no lock held: flush every TLB
 * so no CPU can still reach a copy through its old address, then hand
 * the dirty state to the copy and drop our reference.
 */
static void pte_finish(struct list_head *done, enum pte_reason why)
{
	struct pte_swap *swap, *tmp;

	if (list_empty(done))
		return;

	pte_flush_all_cpus();
	list_for_each_entry_safe(swap, tmp, done, done) {
		if (swap->dirty)
			set_page_dirty(swap->copy);
		put_page(swap->copy);
		atomic_long_inc(&pte_restored[why]);
		kfree(swap);
	}
}

/* Whether a vma may have its entries swapped: a shared file mapping. */
static bool pte_vma_swappable(struct vm_area_struct *vma)
{
	const unsigned long deny = VM_PFNMAP | VM_MIXEDMAP | VM_IO |
				   VM_HUGETLB;

	return vma->vm_file && (vma->vm_flags & VM_SHARED) &&
	       !(vma->vm_flags & deny);
}

/* Whether cur is an entry we may swap: a present file page. */
static bool pte_swappable(pte_t cur)
{
	unsigned long pfn = pte_pfn(cur);

	if (!pte_present(cur) || pte_special(cur) || is_zero_pfn(pfn) ||
	    !pfn_valid(pfn))
		return false;

	return !PageAnon(pfn_to_page(pfn));
}

/* Whether vaddr of vma maps a page inside its file's current size. */
static bool pte_within_file(struct vm_area_struct *vma, unsigned long vaddr)
{
	pgoff_t pgoff = vma->vm_pgoff + ((vaddr - vma->vm_start) >> PAGE_SHIFT);
	loff_t size = i_size_read(file_inode(vma->vm_file));

	return pgoff < DIV_ROUND_UP(size, PAGE_SIZE);
}

/*
 * The page a new entry would map, referenced, if it may be a copy: a
 * present user entry without global, special or caching bits, mapping an
 * ordinary anonymous page that is mapped somewhere (so it is neither
 * free nor kernel memory).  The reference is taken before the checks so
 * the page cannot be freed and reused while we look at it.
 */
static struct page *pte_copy_get(pte_t new)
{
	const pteval_t need = _PAGE_PRESENT | _PAGE_USER;
	const pteval_t deny = _PAGE_GLOBAL | _PAGE_SPECIAL | _PAGE_PAT |
			      _PAGE_PCD | _PAGE_PWT;
	unsigned long pfn = pte_pfn(new);
	struct page *page;

	if ((pte_flags(new) & need) != need || (pte_flags(new) & deny))
		return ERR_PTR(-EINVAL);
	if (!pfn_valid(pfn))
		return ERR_PTR(-EINVAL);

	page = pfn_to_page(pfn);
	if (!get_page_unless_zero(page))
		return ERR_PTR(-EINVAL);
	if (!PageAnon(page) || PageKsm(page) || PageCompound(page) ||
	    page_mapcount(page) < 1) {
		put_page(page);
		return ERR_PTR(-EINVAL);
	}

	return page;
}

/*
 * Replace the entry at ptep (locked) with new, break-before-make: clear
 * it, flush every TLB, then write.  Clearing atomically captures the
 * accessed and dirty bits the hardware set, which the original must keep.
 */
static pte_t pte_replace(struct mm_struct *mm, unsigned long vaddr,
			 pte_t *ptep, pte_t new)
{
	pte_t old = ptep_get_and_clear(mm, vaddr, ptep);

	pte_flush_all_cpus();
	set_pte_at(mm, vaddr, ptep, new);

	return old;
}

enum pte_resume { PTE_RESUMED, PTE_DROP, PTE_WAIT };

/*
 * Swap a suspended entry in again, under mmap_lock (read) and pm->lock,
 * with no invalidation running.  What the kernel left there decides:
 *
 * - a file page (the kernel wrote it back, failed to reclaim or migrate
 *   it, or migrated it to a new page): it becomes the new original;
 * - nothing, inside the file (reclaim or madvise dropped the page, or a
 *   hole was punched): the copy goes in where nothing was, and "nothing"
 *   is what a restore puts back, which the kernel's books agree with;
 * - a migration entry: the page is moving, try again shortly;
 * - anything else (the vma is gone, the file was truncated below the
 *   page): the swap ends here.
 *
 * This keeps a process's copy in place across the kernel's housekeeping
 * on the file page, as a private mapping's copied page would stay.
 */
static enum pte_resume pte_resume_one(struct mm_struct *mm,
				      struct pte_swap *swap)
{
	struct vm_area_struct *vma = vma_lookup(mm, swap->vaddr);
	enum pte_resume ret = PTE_DROP;
	spinlock_t *ptl;
	pte_t *ptep, cur;

	if (!vma || !pte_vma_swappable(vma))
		return PTE_DROP;
	ptep = pte_lookup_lock(mm, swap->vaddr, &ptl, NULL);
	if (!ptep)
		return PTE_DROP;

	cur = ptep_get(ptep);
	if (pte_present(cur) && pte_pfn(cur) == page_to_pfn(swap->copy)) {
		ret = PTE_RESUMED;	/* never restored: still ours */
	} else if (pte_none(cur)) {
		if (pte_within_file(vma, swap->vaddr)) {
			swap->orig = cur;
			set_pte_at(mm, swap->vaddr, ptep, swap->swapped);
			ret = PTE_RESUMED;
		}
	} else if (pte_swappable(cur)) {
		swap->orig = pte_replace(mm, swap->vaddr, ptep, swap->swapped);
		ret = PTE_RESUMED;
	} else if (!pte_present(cur) &&
		   is_migration_entry(pte_to_swp_entry(cur))) {
		ret = PTE_WAIT;
	}
	pte_unmap_unlock(ptep, ptl);

	return ret;
}

/*
 * Resume every suspended entry of pm, under mmap_lock (read) and
 * pm->lock; those whose swap ends go to done.  Returns whether some must
 * be tried again later.
 */
static bool pte_resume_all(struct pte_mm *pm, struct mm_struct *mm,
			   struct list_head *done)
{
	struct pte_swap *swap, *next;
	bool again = false;

	if (pm->released || pm->invalidating || !pm->nr_suspended)
		return false;

	for (swap = pte_swap_first(pm, 0); swap; swap = next) {
		next = pte_swap_next(swap);
		if (!swap->suspended)
			continue;
		switch (pte_resume_one(mm, swap)) {
		case PTE_RESUMED:
			swap->suspended = false;
			pm->nr_suspended--;
			atomic_long_inc(&pte_resumed_total);
			break;
		case PTE_WAIT:
			again = true;
			break;
		case PTE_DROP:
			pte_swap_detach(pm, mm, swap, done);
			break;
		}
	}

	if (!again || ++pm->resume_tries < PTE_RESUME_TRIES) {
		if (!again)
			pm->resume_tries = 0;
		return again;
	}
	pr_warn("page still migrating after %d tries, swap ended\n",
		PTE_RESUME_TRIES);
	pm->resume_tries = 0;
	for (swap = pte_swap_first(pm, 0); swap; swap = next) {
		next = pte_swap_next(swap);
		if (swap->suspended)
			pte_swap_detach(pm, mm, swap, done);
	}

	return false;
}

/*
 * Resumes suspended entries in process context, where mmap_lock can be
 * taken, once the invalidation that suspended them has ended.  The mm is
 * released with mmput_async: dropping the last user here would run
 * ->release, which waits for this very work.
 */
static void pte_resume_work(struct work_struct *work)
{
	struct pte_mm *pm = container_of(to_delayed_work(work), struct pte_mm,
					 resume);
	struct mm_struct *mm = pm->mn.mm;
	LIST_HEAD(done);
	bool again;

	if (!mmget_not_zero(mm))
		return;
	mmap_read_lock(mm);
	spin_lock(&pm->lock);
	again = pte_resume_all(pm, mm, &done);
	spin_unlock(&pm->lock);
	mmap_read_unlock(mm);
	pte_finish(&done, PTE_BY_KERNEL);
	if (again)
		queue_delayed_work(system_wq, &pm->resume,
				   msecs_to_jiffies(PTE_RESUME_DELAY_MS));
	mmput_async(mm);
}

/*
 * Which invalidations take entries down and how.  Unmapping (munmap,
 * mremap's move, mmap over a range) ends the swaps in the range.
 * Protection changes (mprotect, write-protecting a file page for
 * writeback, soft-dirty) keep the page an entry maps, so a swapped entry
 * survives them untouched.  Everything else (madvise, truncation and hole
 * punching, reclaim and migration of the file page) suspends them: the
 * original is put back for the kernel to work on, and the copy is
 * swapped in again afterwards if the page is still there to be covered.
 */
static int pte_mn_start(struct mmu_notifier *mn,
			const struct mmu_notifier_range *range)
{
	struct pte_mm *pm = to_pte_mm(mn);
	LIST_HEAD(done);

	spin_lock(&pm->lock);
	pm->invalidating++;
	if (pm->nr_swaps) {
		switch (range->event) {
		case MMU_NOTIFY_UNMAP:
			pte_detach_range(pm, range->mm, range->start,
					 range->end, &done);
			break;
		case MMU_NOTIFY_PROTECTION_VMA:
		case MMU_NOTIFY_PROTECTION_PAGE:
		case MMU_NOTIFY_SOFT_DIRTY:
			break;
		default:
			pte_suspend_range(pm, range->mm, range->start,
					  range->end);
			break;
		}
	}
	spin_unlock(&pm->lock);
	pte_finish(&done, PTE_BY_UNMAP);

	return 0;
}

/* The kernel is done with [start, end): resume what it suspended. */
static void pte_mn_end(struct mmu_notifier *mn,
		       const struct mmu_notifier_range *range)
{
	struct pte_mm *pm = to_pte_mm(mn);
	bool resume;

	spin_lock(&pm->lock);
	pm->invalidating--;
	resume = !pm->invalidating && pm->nr_suspended && !pm->released;
	spin_unlock(&pm->lock);
	if (resume)
		mod_delayed_work(system_wq, &pm->resume, 0);
}

/*
 * The mm is being torn down (its last user exited, by any means): called
 * before any of its mappings is unmapped.  Put every original back, then
 * drop our subscription unless module exit already took it.
 */
static void pte_mn_release(struct mmu_notifier *mn, struct mm_struct *mm)
{
	struct pte_mm *pm = to_pte_mm(mn);
	bool put = false;
	LIST_HEAD(done);

	spin_lock(&pm->lock);
	pm->released = true;
	pte_detach_range(pm, mm, 0, ULONG_MAX, &done);
	spin_unlock(&pm->lock);
	pte_finish(&done, PTE_BY_EXIT);
	cancel_delayed_work_sync(&pm->resume);
	wake_up_all(&pte_release_wait);

	spin_lock(&pte_mms_lock);
	if (!list_empty(&pm->link)) {
		list_del_init(&pm->link);
		put = true;
	}
	spin_unlock(&pte_mms_lock);
	if (put)
		mmu_notifier_put(mn);
}

static struct mmu_notifier *pte_mn_alloc(struct mm_struct *mm)
{
	struct pte_mm *pm = kzalloc(sizeof(*pm), GFP_KERNEL);

	if (!pm)
		return ERR_PTR(-ENOMEM);
	spin_lock_init(&pm->lock);
	pm->swaps = RB_ROOT;
	INIT_LIST_HEAD(&pm->link);
	INIT_DELAYED_WORK(&pm->resume, pte_resume_work);

	return &pm->mn;
}

static void pte_mn_free(struct mmu_notifier *mn)
{
	kfree(to_pte_mm(mn));
}

static const struct mmu_notifier_ops pte_mn_ops = {
	.release = pte_mn_release,
	.invalidate_range_start = pte_mn_start,
	.invalidate_range_end = pte_mn_end,
	.alloc_notifier = pte_mn_alloc,
	.free_notifier = pte_mn_free,
};

/*
 * The pte_mm of mm, subscribed to its notifier on first use.  The caller
 * holds a user reference on mm (mmget) and not its mmap_lock, which
 * mmu_notifier_get takes for writing.
 *
 * Registration takes every rmap lock of the mm (mm_take_all_locks), so
 * when it returns, no invalidation that began before it is still running
 * (truncation and reclaim hold those locks across theirs), and every
 * later one calls us: no swap can slip between a start we never saw and
 * the entry being taken down.
 */
static struct pte_mm *pte_attach(struct mm_struct *mm)
{
	struct mmu_notifier *mn;
	struct pte_mm *pm;

	mutex_lock(&pte_attach_mutex);
	mn = mmu_notifier_get(&pte_mn_ops, mm);
	if (IS_ERR(mn)) {
		mutex_unlock(&pte_attach_mutex);
		return ERR_CAST(mn);
	}
	pm = to_pte_mm(mn);
	if (pm->attached) {
		/* Already ours: keep a single reference per pte_mm. */
		mmu_notifier_put(mn);
	} else {
		pm->attached = true;
		spin_lock(&pte_mms_lock);
		list_add_tail(&pm->link, &pte_mms);
		spin_unlock(&pte_mms_lock);
	}
	mutex_unlock(&pte_attach_mutex);

	return pm;
}

/* The pte_mm of mm if it has one; valid while the caller holds mmget. */
static struct pte_mm *pte_mm_of(struct mm_struct *mm)
{
	struct pte_mm *pm, *found = NULL;

	spin_lock(&pte_mms_lock);
	list_for_each_entry(pm, &pte_mms, link) {
		if (pm->mn.mm == mm) {
			found = pm;
			break;
		}
	}
	spin_unlock(&pte_mms_lock);

	return found;
}

/* The mm of pid (0: the caller), with a user reference, or an error. */
static struct mm_struct *pte_get_mm(u64 pid)
{
	struct task_struct *task;
	struct mm_struct *mm;
	struct pid *p;

	if (pid == 0)
		return get_task_mm(current) ?: ERR_PTR(-ESRCH);
	if (pid > PID_MAX_LIMIT)
		return ERR_PTR(-ESRCH);

	p = find_get_pid(pid);
	task = get_pid_task(p, PIDTYPE_PID);
	put_pid(p);
	if (!task)
		return ERR_PTR(-ESRCH);
	mm = get_task_mm(task);
	put_task_struct(task);

	return mm ?: ERR_PTR(-ESRCH);
}

/*
 * Levels above the page-table entry are never written; a request naming
 * them is accepted only if it would leave them as they are, which is
 * what PTEditor's library sends when it updates a whole resolved entry.
 */
static bool pte_upper_unchanged(const struct ptedit_entry *req,
				const struct ptedit_entry *cur)
{
	static const struct {
		u64 mask;
		size_t offset;
	} levels[] = {
		{ PTEDIT_VALID_MASK_PGD, offsetof(struct ptedit_entry, pgd) },
		{ PTEDIT_VALID_MASK_P4D, offsetof(struct ptedit_entry, p4d) },
		{ PTEDIT_VALID_MASK_PUD, offsetof(struct ptedit_entry, pud) },
		{ PTEDIT_VALID_MASK_PMD, offsetof(struct ptedit_entry, pmd) },
	};
	size_t i;

	for (i = 0; i < ARRAY_SIZE(levels); i++) {
		const u64 *want = (const void *)req + levels[i].offset;
		const u64 *have = (const void *)cur + levels[i].offset;

		if ((req->valid & levels[i].mask) && *want != *have)
			return false;
	}

	return true;
}

/*
 * One attempt at VM_UPDATE's page-table entry, under mmap_lock (read)
 * and pm->lock.  *spare is a preallocated record, taken when used; the
 * page reference in *drop, if any, is for the caller to put once the
 * locks are gone.
 */
static long pte_update_locked(struct pte_mm *pm, struct mm_struct *mm,
			      const struct ptedit_entry *req,
			      struct pte_swap **spare, struct page **drop,
			      struct list_head *done)
{
	unsigned long vaddr = req->vaddr & PAGE_MASK;
	pte_t new = __pte(req->pte);
	struct ptedit_entry cur_entry;
	struct pte_swap *swap;
	struct page *copy;
	spinlock_t *ptl;
	pte_t *ptep, cur;
	long ret = 0;

	if (pm->released)
		return -ESRCH;
	if (pm->invalidating)
		return -EAGAIN;

	/* A suspended swap is resumed first, as the worker would. */
	swap = pte_swap_find(pm, vaddr);
	if (swap && swap->suspended) {
		switch (pte_resume_one(mm, swap)) {
		case PTE_RESUMED:
			swap->suspended = false;
			pm->nr_suspended--;
			break;
		case PTE_WAIT:
			return -EAGAIN;
		case PTE_DROP:
			pte_swap_detach(pm, mm, swap, done);
			swap = NULL;
			break;
		}
	}

	ptep = pte_lookup_lock(mm, vaddr, &ptl, &cur_entry);
	if (!ptep)
		return -ENOENT;
	if (!pte_upper_unchanged(req, &cur_entry)) {
		ret = -EOPNOTSUPP;
		goto out;
	}
	if (!(req->valid & PTEDIT_VALID_MASK_PTE))
		goto out;
	cur = ptep_get(ptep);

	/* Writing back the original page is a restore. */
	if (swap && !pte_none(swap->orig) &&
	    pte_pfn(new) == pte_pfn(swap->orig)) {
		pte_unmap_unlock(ptep, ptl);
		pte_swap_detach(pm, mm, swap, done);
		return 0;
	}

	if (!swap && !pte_swappable(cur)) {
		ret = -ENOENT;
		goto out;
	}
	copy = pte_copy_get(new);
	if (IS_ERR(copy)) {
		ret = PTR_ERR(copy);
		goto out;
	}

	if (swap) {
		/* Swapped already: a new copy, or new permissions. */
		if (pte_dirty(pte_replace(mm, vaddr, ptep, new)))
			set_page_dirty(swap->copy);
		*drop = swap->copy;
		swap->copy = copy;
		swap->swapped = new;
	} else if (restore) {
		swap = *spare;
		*spare = NULL;
		swap->vaddr = vaddr;
		swap->copy = copy;
		swap->swapped = new;
		swap->orig = pte_replace(mm, vaddr, ptep, new);
		pte_swap_insert(pm, swap);
		atomic_long_inc(&pte_swapped_total);
	} else {
		/* PTEditor's way, for tests only: nothing to restore. */
		pte_replace(mm, vaddr, ptep, new);
		*drop = copy;
		pr_warn("untracked swap at %#lx of pid %llu (restore=0)\n",
			vaddr, req->pid);
	}
out:
	pte_unmap_unlock(ptep, ptl);

	return ret;
}

static long pte_update(struct mm_struct *mm, const struct ptedit_entry *req)
{
	struct pte_swap *spare;
	struct page *drop = NULL;
	struct vm_area_struct *vma;
	struct pte_mm *pm;
	LIST_HEAD(done);
	long ret;
	int try;

	/*
	 * mmu_notifier_get takes mmap_lock for writing: look for our
	 * subscription first, which cannot go away while we hold mmget.
	 */
	pm = pte_mm_of(mm) ?: pte_attach(mm);
	if (IS_ERR(pm))
		return PTR_ERR(pm);
	spare = kzalloc(sizeof(*spare), GFP_KERNEL);
	if (!spare)
		return -ENOMEM;
	if (mmap_read_lock_killable(mm)) {
		kfree(spare);
		return -EINTR;
	}

	vma = vma_lookup(mm, req->vaddr);
	if (!vma || !pte_vma_swappable(vma)) {
		ret = -EINVAL;
		goto out;
	}
	for (try = 0; try < PTE_BUSY_RETRIES; try++) {
		spin_lock(&pm->lock);
		ret = pte_update_locked(pm, mm, req, &spare, &drop, &done);
		spin_unlock(&pm->lock);
		if (ret != -EAGAIN)
			break;
		usleep_range(50, 100);
	}
out:
	mmap_read_unlock(mm);
	pte_finish(&done, PTE_BY_REQUEST);
	if (drop) {
		pte_flush_all_cpus();
		put_page(drop);
	}
	kfree(spare);

	return ret;
}

static long pte_ioctl_update(void __user *argp)
{
	struct ptedit_entry req;
	struct mm_struct *mm;
	long ret;

	if (copy_from_user(&req, argp, sizeof(req)))
		return -EFAULT;
	mm = pte_get_mm(req.pid);
	if (IS_ERR(mm))
		return PTR_ERR(mm);
	ret = pte_update(mm, &req);
	mmput(mm);

	return ret;
}

/*
 * VM_UPDATE with ptedit_abi=1, as PTEditor serves it: the page-table
 * entry is written as given and nothing is remembered, so putting the
 * original back before the range goes is the caller's job alone.  As in
 * the tracking mode, only entries of shared file mappings are written,
 * and the upper levels never.
 */
static long pte_ioctl_update_raw(void __user *argp)
{
	struct ptedit_entry req, cur;
	struct vm_area_struct *vma;
	struct mm_struct *mm;
	spinlock_t *ptl;
	pte_t *ptep;
	long ret = 0;

	if (copy_from_user(&req, argp, sizeof(req)))
		return -EFAULT;
	mm = pte_get_mm(req.pid);
	if (IS_ERR(mm))
		return PTR_ERR(mm);
	if (mmap_read_lock_killable(mm)) {
		mmput(mm);
		return -EINTR;
	}

	vma = vma_lookup(mm, req.vaddr);
	if (!vma || !pte_vma_swappable(vma)) {
		ret = -EINVAL;
		goto out;
	}
	ptep = pte_lookup_lock(mm, req.vaddr, &ptl, &cur);
	if (!ptep) {
		ret = -ENOENT;
		goto out;
	}
	if (!pte_upper_unchanged(&req, &cur))
		ret = -EOPNOTSUPP;
	else if (req.valid & PTEDIT_VALID_MASK_PTE)
		pte_replace(mm, req.vaddr & PAGE_MASK, ptep, __pte(req.pte));
	pte_unmap_unlock(ptep, ptl);
out:
	mmap_read_unlock(mm);
	mmput(mm);

	return ret;
}

static long pte_ioctl_resolve(void __user *argp)
{
	struct ptedit_entry e;
	struct mm_struct *mm;
	spinlock_t *ptl;
	pte_t *ptep;

	if (copy_from_user(&e, argp, sizeof(e)))
		return -EFAULT;
	mm = pte_get_mm(e.pid);
	if (IS_ERR(mm))
		return PTR_ERR(mm);
	if (mmap_read_lock_killable(mm)) {
		mmput(mm);
		return -EINTR;
	}

	/*
	 * Only addresses inside a mapping: elsewhere munmap may be freeing
	 * page tables under a downgraded mmap_lock as we walk.
	 */
	e.pgd = e.p4d = e.pud = e.pmd = e.pte = e.valid = 0;
	if (vma_lookup(mm, e.vaddr)) {
		ptep = pte_lookup_lock(mm, e.vaddr, &ptl, &e);
		if (ptep)
			pte_unmap_unlock(ptep, ptl);
	}
	mmap_read_unlock(mm);
	mmput(mm);

	return copy_to_user(argp, &e, sizeof(e)) ? -EFAULT : 0;
}

static long pte_ioctl_restore(void __user *argp)
{
	struct ptedit_entry req;
	struct pte_swap *swap;
	struct mm_struct *mm;
	struct pte_mm *pm;
	LIST_HEAD(done);
	long ret = -ENOENT;

	if (copy_from_user(&req, argp, sizeof(req)))
		return -EFAULT;
	mm = pte_get_mm(req.pid);
	if (IS_ERR(mm))
		return PTR_ERR(mm);
	pm = pte_mm_of(mm);
	if (!pm)
		goto out;
	if (mmap_read_lock_killable(mm)) {
		ret = -EINTR;
		goto out;
	}
	spin_lock(&pm->lock);
	swap = pte_swap_find(pm, req.vaddr & PAGE_MASK);
	if (swap) {
		pte_detach_range(pm, mm, swap->vaddr, swap->vaddr + 1, &done);
		ret = 0;
	}
	spin_unlock(&pm->lock);
	mmap_read_unlock(mm);
	pte_finish(&done, PTE_BY_REQUEST);
out:
	mmput(mm);

	return ret;
}

static long pte_ioctl_swapped(void __user *argp)
{
	struct ptedit_entry req;
	struct mm_struct *mm = NULL;
	struct pte_mm *pm;
	long count = 0;

	if (copy_from_user(&req, argp, sizeof(req)))
		return -EFAULT;
	if (req.pid) {
		mm = pte_get_mm(req.pid);
		if (IS_ERR(mm))
			return PTR_ERR(mm);
		/* Count what the pending resume work will have left. */
		pm = pte_mm_of(mm);
		if (pm)
			flush_delayed_work(&pm->resume);
	}

	spin_lock(&pte_mms_lock);
	list_for_each_entry(pm, &pte_mms, link) {
		if (!mm || pm->mn.mm == mm)
			count += READ_ONCE(pm->nr_swaps);
	}
	spin_unlock(&pte_mms_lock);
	if (mm)
		mmput(mm);

	return count;
}

static long pte_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *argp = (void __user *)arg;

	switch (cmd) {
	case PTEDITOR_IOCTL_CMD_VM_RESOLVE:
		return pte_ioctl_resolve(argp);
	case PTEDITOR_IOCTL_CMD_VM_UPDATE:
		if (READ_ONCE(ptedit_abi))
			return pte_ioctl_update_raw(argp);
		return pte_ioctl_update(argp);
	case PTEDITOR_IOCTL_CMD_GET_PAGESIZE:
		return PAGE_SIZE;
	case PTEDITOR_IOCTL_CMD_INVALIDATE_TLB:
		pte_flush_all_cpus();
		return 0;
	/* PTEditor answers -1, EPERM, to the commands it lacks. */
	case PTEDITOR_IOCTL_CMD_VM_RESTORE:
		return READ_ONCE(ptedit_abi) ? -EPERM : pte_ioctl_restore(argp);
	case PTEDITOR_IOCTL_CMD_SWAPPED:
		return READ_ONCE(ptedit_abi) ? -EPERM : pte_ioctl_swapped(argp);
	default:
		return -ENOTTY;
	}
}

static int pte_open(struct inode *inode, struct file *file)
{
	if (test_and_set_bit(0, &pte_device_busy))
		return -EBUSY;

	return 0;
}

static int pte_release(struct inode *inode, struct file *file)
{
	clear_bit(0, &pte_device_busy);

	return 0;
}

static const struct file_operations pte_fops = {
	.owner = THIS_MODULE,
	.open = pte_open,
	.release = pte_release,
	.unlocked_ioctl = pte_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice pte_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = PTEDITOR_DEVICE_NAME,
	.fops = &pte_fops,
	.mode = 0600,
};

/*
 * Restore everything pm still has and drop its subscription.  pm is off
 * pte_mms already, so ->release will not drop it too.  If the mm has no
 * users left it is being torn down: its ->release restores the entries
 * (our subscription is still registered, so it will be called), and we
 * must wait for that before letting go.
 */
static void pte_unload_mm(struct pte_mm *pm)
{
	struct mm_struct *mm = pm->mn.mm;
	LIST_HEAD(done);

	if (mmget_not_zero(mm)) {
		mmap_read_lock(mm);
		spin_lock(&pm->lock);
		pm->released = true;
		pte_detach_range(pm, mm, 0, ULONG_MAX, &done);
		spin_unlock(&pm->lock);
		mmap_read_unlock(mm);
		pte_finish(&done, PTE_BY_UNLOAD);
		cancel_delayed_work_sync(&pm->resume);
		mmput(mm);
	} else {
		wait_event(pte_release_wait, READ_ONCE(pm->released));
	}
	mmu_notifier_put(&pm->mn);
}

static int __init pte_init(void)
{
	int ret = misc_register(&pte_misc);

	if (ret)
		return ret;
	pr_info("/dev/%s ready (restore=%d)\n", PTEDITOR_DEVICE_NAME, restore);

	return 0;
}

static void __exit pte_exit(void)
{
	struct pte_mm *pm;
	int i;

	misc_deregister(&pte_misc);
	for (;;) {
		spin_lock(&pte_mms_lock);
		pm = list_first_entry_or_null(&pte_mms, struct pte_mm, link);
		if (pm)
			list_del_init(&pm->link);
		spin_unlock(&pte_mms_lock);
		if (!pm)
			break;
		pte_unload_mm(pm);
	}
	/* Wait for the notifiers' free callbacks, which run our code. */
	mmu_notifier_synchronize();

	pr_info("unloaded: %ld entries swapped, %ld suspended, %ld resumed\n",
		atomic_long_read(&pte_swapped_total),
		atomic_long_read(&pte_suspended_total),
		atomic_long_read(&pte_resumed_total));
	for (i = 0; i < ARRAY_SIZE(pte_restored); i++)
		pr_info("restored by %s: %ld\n", pte_reason_name[i],
			atomic_long_read(&pte_restored[i]));
}

module_init(pte_init);
module_exit(pte_exit);
