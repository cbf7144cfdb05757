/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The ioctl interface of /dev/pteditor, shared by the kernel module and
 * the programs that drive it (cowd, the VM tests).
 *
 * The numbers and the entry layout are those of PTEditor, so a program
 * written against PTEditor's header talks to this device unchanged for
 * the commands served here: VM_RESOLVE, VM_UPDATE (page-table entry
 * level only), GET_PAGESIZE and INVALIDATE_TLB.  Two commands of our own
 * sit far above PTEditor's range so they never collide with a command
 * it may add: VM_RESTORE and SWAPPED.
 *
 * PTEditor builds every number as _IOR(0x3d17, nr, size_t).  The magic
 * is wider than the 8-bit type field, so its upper bits overlap the size
 * field; the values below are what that expression yields on x86-64 and
 * must not be "fixed", or PTEditor programs would stop matching.
 */
#ifndef PTEDITOR_H
#define PTEDITOR_H

#include <linux/types.h>
#ifdef __KERNEL__
#include <linux/ioctl.h>
#else
#include <stddef.h>
#include <sys/ioctl.h>
#endif

#define PTEDITOR_DEVICE_NAME "pteditor"
#define PTEDITOR_DEVICE_PATH "/dev/" PTEDITOR_DEVICE_NAME

/*
 * The entries of every paging level for one virtual address of one
 * process: eight 64-bit words, the layout of PTEditor's ptedit_entry_t.
 * pid 0 means the calling process.  valid says which levels were found
 * (VM_RESOLVE) or are to be written (VM_UPDATE).
 */
struct ptedit_entry {
	__u64 pid;
	__u64 vaddr;
	__u64 pgd;
	__u64 p4d;
	__u64 pud;
	__u64 pmd;
	__u64 pte;
	__u64 valid;
};

typedef struct ptedit_entry ptedit_entry_t;

#define PTEDIT_VALID_MASK_PGD (1 << 0)
#define PTEDIT_VALID_MASK_P4D (1 << 1)
#define PTEDIT_VALID_MASK_PUD (1 << 2)
#define PTEDIT_VALID_MASK_PMD (1 << 3)
#define PTEDIT_VALID_MASK_PTE (1 << 4)

#define PTEDITOR_IOCTL_MAGIC_NUMBER ((long)0x3d17)

/* PTEditor's commands; only those marked "served" are implemented. */
#define PTEDITOR_IOCTL_CMD_VM_RESOLVE	/* served, 0x803d1701 */ \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 1, size_t)
#define PTEDITOR_IOCTL_CMD_VM_UPDATE	/* served, 0x803d1702 */ \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 2, size_t)
#define PTEDITOR_IOCTL_CMD_VM_LOCK \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 3, size_t)
#define PTEDITOR_IOCTL_CMD_VM_UNLOCK \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 4, size_t)
#define PTEDITOR_IOCTL_CMD_READ_PAGE \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 5, size_t)
#define PTEDITOR_IOCTL_CMD_WRITE_PAGE \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 6, size_t)
#define PTEDITOR_IOCTL_CMD_GET_ROOT \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 7, size_t)
#define PTEDITOR_IOCTL_CMD_SET_ROOT \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 8, size_t)
#define PTEDITOR_IOCTL_CMD_GET_PAGESIZE	/* served, 0x803d1709 */ \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 9, size_t)
#define PTEDITOR_IOCTL_CMD_INVALIDATE_TLB /* served, 0x803d170a */ \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 10, size_t)
#define PTEDITOR_IOCTL_CMD_GET_PAT \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 11, size_t)
#define PTEDITOR_IOCTL_CMD_SET_PAT \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 12, size_t)
#define PTEDITOR_IOCTL_CMD_SWITCH_TLB_INVALIDATION \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 13, size_t)

/*
 * Ours.  VM_RESTORE takes an entry with pid and vaddr and puts back the
 * original entry of a swapped page (0, or -ENOENT if none is swapped
 * there).  SWAPPED takes an entry with pid (0: every process) and returns
 * how many swapped entries the device tracks for it.
 */
#define PTEDITOR_IOCTL_CMD_VM_RESTORE	/* 0x803d1740 */ \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 0x40, size_t)
#define PTEDITOR_IOCTL_CMD_SWAPPED	/* 0x803d1741 */ \
	_IOR(PTEDITOR_IOCTL_MAGIC_NUMBER, 0x41, size_t)

#endif /* PTEDITOR_H */
