#!/bin/sh
# The test list of `make vmtest`, run inside the test VM by vm/init, in
# a chroot of the host's root file system (read-only, with a tmpfs on
# /tmp), with the pteditor module loaded.  Usage: run-guest.sh REPO
#
# Each test is announced on the console and in the kernel log
# ("cowd-vmtest: begin NAME"), so the host can tell which test produced
# which kernel message: every test must leave the kernel log clean,
# except "raw", the deliberate demonstration of the corruption the
# module prevents, which runs last because it damages the kernel's page
# accounting for good.

set -u
repo=$1
build=$repo/build/vm
ptetest=$build/ptetest
python=$repo/.venv/bin/python
passed=0
failed=0

run() {
	name=$1
	shift
	echo "cowd-vmtest: begin $name" >/dev/kmsg
	echo "VMTEST BEGIN $name"
	if "$@"; then
		echo "VMTEST PASS $name"
		passed=$((passed + 1))
	else
		echo "VMTEST FAIL $name"
		failed=$((failed + 1))
	fi
}

# Waits (up to 20 s) for a kernel message matching $1 logged since the
# current test began: the mm of an exited process, where the kernel
# checks its counters, may be freed a little after the process is reaped.
await_kernel_message() {
	for _ in $(seq 200); do
		dmesg | sed -n "/cowd-vmtest: begin $name\$/,\$p" |
			grep -q "$1" && return 0
		sleep 0.1
	done
	echo "no kernel message matching '$1'"
	return 1
}

exit_then_count() {
	"$ptetest" exit && "$ptetest" count 0
}

# Runs a test with the module answering as PTEditor does, so that cowd
# alone restores entries: a swap it failed to put back would show as bad
# accounting at munmap or exit.
as_ptedit() {
	echo 1 >/sys/module/pteditor/parameters/ptedit_abi || return 1
	"$@"
	rc=$?
	echo 0 >/sys/module/pteditor/parameters/ptedit_abi
	return $rc
}

raw_swap() {
	echo 0 >/sys/module/pteditor/parameters/restore &&
		"$ptetest" raw &&
		await_kernel_message "Bad page map" &&
		await_kernel_message "Bad rss-counter state"
}

# One test of the plan, by name.
run_test() {
	case $1 in
	exit) exit_then_count ;;
	concurrent) "$python" "$repo/vm/tests/ptserver.py" "$ptetest" ;;
	engine-*)
		"$python" "$repo/vm/tests/cowdtest.py" "$build/programs" "${1#engine-}"
		;;
	ptedit-*)
		as_ptedit "$python" "$repo/vm/tests/cowdtest.py" \
			"$build/programs" "${1#ptedit-}"
		;;
	unload) "$ptetest" unload "$build/pteditor/pteditor.ko" ;;
	raw) raw_swap ;;
	*) "$ptetest" "$1" ;;
	esac
}

tests=$(grep -v '^#' "$repo/vm/tests/plan")
echo "VMTEST PLAN" $tests
for t in $tests; do
	# Late kernel messages of the tests before raw belong in their part
	# of the log, not in raw's, where bad accounting is expected.
	[ "$t" = raw ] && sleep 1
	run "$t" run_test "$t"
done
echo "cowd-vmtest: end" >/dev/kmsg
echo "VMTEST GUEST RESULT: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
