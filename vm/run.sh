#!/usr/bin/env bash
# `make vmtest`: test the pteditor kernel module inside a QEMU virtual
# machine running Debian 12's own kernel, since modules cannot be loaded
# on the machine that builds them.
#
# As root, this installs what it needs with apt-get (QEMU, a static
# busybox, Debian's amd64 kernel image and its headers), builds the
# module against those headers and the test programs (its own and those
# of tests/programs that the pteditor engine's tests run), packs an initramfs
# (busybox, vm/init, the virtio and 9p modules, pteditor.ko), and boots
# it under TCG.  The guest mounts this machine's root file system
# read-only over virtio-9p and runs vm/tests/run-guest.sh from this
# tree, with the project's virtual environment (make all) for Python.
# vm/check-log.py then judges the serial console log: every test passed,
# and no kernel message of damage outside the one deliberate test.
#
# Environment: VMTEST_TIMEOUT, seconds the VM may run (default 480).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
build=$repo/build/vm
# The guest runs for three to five minutes under TCG on two busy cores;
# this leaves room for a slower machine and stays far inside CI's time.
timeout=${VMTEST_TIMEOUT:-900}
started=$SECONDS

say() { echo "vmtest: $*"; }
die() { echo "vmtest: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages with apt-get)"
case $repo in *[[:space:]]*) die "the repository path has spaces: $repo" ;; esac
python=$repo/.venv/bin/python
[ -x "$python" ] || die "no $python: run 'make all' first"

install_packages() {
	# INITRD=No: the host needs no initramfs for a kernel it never boots.
	export DEBIAN_FRONTEND=noninteractive INITRD=No
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends \
		qemu-system-x86 busybox-static linux-image-amd64 \
		linux-headers-amd64 gcc make libc6-dev python3 >/dev/null
}

# The kernel release (ABI) behind the installed meta-packages; image and
# headers must be the same one.
kernel_release() {
	local image headers
	image=$(dpkg-query -W -f='${Depends}' linux-image-amd64)
	headers=$(dpkg-query -W -f='${Depends}' linux-headers-amd64)
	image=${image#linux-image-}
	image=${image%% *}
	headers=${headers#linux-headers-}
	headers=${headers%% *}
	[ "$image" = "$headers" ] ||
		die "kernel image $image and headers $headers differ"
	echo "$image"
}

# Prints the module at path $1 (relative to the modules folder) after
# everything it depends on, each once, following modules.dep.
declare -A listed=()
module_with_deps() {
	local dep
	[ -n "${listed[$1]:-}" ] && return
	listed[$1]=1
	for dep in $(awk -v m="$1:" '$1 == m { $1 = ""; print }' \
		"$moddir/modules.dep"); do
		module_with_deps "$dep"
	done
	echo "$1"
}

module_path() {
	awk -F: -v n="/$1.ko" \
		'substr($1, length($1) - length(n) + 1) == n { print $1 }' \
		"$moddir/modules.dep"
}

build_initramfs() {
	local root=$build/initramfs m path
	mkdir -p "$root"/{bin,dev,lib/modules}
	cp /bin/busybox "$root/bin/busybox"
	cp "$repo/vm/init" "$root/init"
	mknod -m 600 "$root/dev/console" c 5 1
	cp "$build/pteditor/pteditor.ko" "$root/lib/modules/"
	: >"$root/lib/modules/load-order"
	for m in virtio_pci 9pnet_virtio 9p; do
		path=$(module_path "$m")
		[ -n "$path" ] || die "no $m module in $moddir"
		module_with_deps "$path"
	done | while read -r path; do
		cp "$moddir/$path" "$root/lib/modules/"
		basename "$path" >>"$root/lib/modules/load-order"
	done
	(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null) \
		>"$build/initramfs.cpio"
}

say "installing packages"
install_packages
say "packages ready in $((SECONDS - started)) s"
release=$(kernel_release)
moddir=/usr/lib/modules/$release
kernel=/boot/vmlinuz-$release
[ -r "$kernel" ] || die "no $kernel"
[ -d "$moddir/build" ] || die "no headers in $moddir/build"
say "kernel $release ($(dpkg-query -W -f='${Version}' "linux-image-$release"))"

build_started=$SECONDS
rm -rf "$build"
mkdir -p "$build/pteditor"
# Kbuild builds in the module's folder: build a copy, keep native/ clean.
cp "$repo"/native/pteditor/{Makefile,pteditor.c,pteditor.h} "$build/pteditor/"
make -s -C "$moddir/build" M="$build/pteditor" modules
gcc -O2 -Wall -Wextra -Werror -I"$repo/native/pteditor" \
	-o "$build/ptetest" "$repo/vm/tests/ptetest.c"
# The programs the engine's end-to-end tests run under cowctl.
mkdir -p "$build/programs"
for p in writer mapscript hammer remapper; do
	gcc -O2 -Wall -Wextra -Werror -pthread \
		-o "$build/programs/$p" "$repo/tests/programs/$p.c"
done
build_initramfs
say "module, tests and initramfs built in $((SECONDS - build_started)) s"

log=$build/serial.log
# Two NUMA nodes of one socket each, so a test can migrate pages between
# them (a socket split across nodes makes the kernel warn); automatic
# NUMA balancing off, so the kernel moves nothing the tests do not ask.
cmdline="console=ttyS0 loglevel=4 log_buf_len=4M panic=-1"
cmdline="$cmdline numa_balancing=disable"
# The exported tree spans several file systems: keep their inodes apart.
fsopts=,multidevs=remap
vm_started=$SECONDS
status=0
timeout -k 10 "$timeout" qemu-system-x86_64 \
	-accel tcg -cpu max -m 1024 -nographic -no-reboot \
	-smp 2,sockets=2,cores=1,threads=1 \
	-object memory-backend-ram,id=mem0,size=512M \
	-object memory-backend-ram,id=mem1,size=512M \
	-numa node,nodeid=0,cpus=0,memdev=mem0 \
	-numa node,nodeid=1,cpus=1,memdev=mem1 \
	-serial "file:$log" -monitor none \
	-kernel "$kernel" -initrd "$build/initramfs.cpio" \
	-append "$cmdline cowd_repo=$repo" \
	-fsdev "local,id=hostroot,path=/,security_model=none,readonly=on$fsopts" \
	-device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot ||
	status=$?
[ "$status" -eq 124 ] && say "the VM timed out after $timeout s"
[ "$status" -eq 0 ] || [ "$status" -eq 124 ] || say "QEMU exited with $status"
say "VM ran for $((SECONDS - vm_started)) s; serial console log follows"
cat "$log"
echo
say "total $((SECONDS - started)) s"
python3 "$repo/vm/check-log.py" "$log"
