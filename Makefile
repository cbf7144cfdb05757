# Two commands do all set-up on a fresh machine:
#   make demo   build everything, start a private cowd, run the demo
#   make test   build everything and run the whole test suite
# Both create a virtual environment in .venv and install cowd into it
# with pip, which builds libcow with CMake.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml CMakeLists.txt $(shell find cowd client native -type f \
	\( -name '*.py' -o -name '*.c' -o -name '*.h' -o -name 'CMakeLists.txt' \) \
	2>/dev/null)

.PHONY: all demo test bench lint clean vmtest

all: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/pip install --quiet '.[test]'
	touch $@

# A private cowd in a temporary folder, stopped when the demo ends.
demo: $(STAMP)
	@set -e; dir=$$(mktemp -d); sock=$$dir/cowd.sock; \
	$(BIN)/cowd --socket $$sock --state-dir $$dir/state 2>$$dir/cowd.log & \
	pid=$$!; trap 'kill $$pid 2>/dev/null; wait $$pid' EXIT; \
	for i in $$(seq 100); do \
		$(BIN)/cowctl --socket $$sock status >/dev/null 2>&1 && break; \
		sleep 0.1; \
	done; \
	echo "cowd running in $$dir (log: $$dir/cowd.log)"; \
	$(BIN)/cowctl --socket $$sock demo --dir $$dir/demo --processes 3

test: $(STAMP)
	$(BIN)/python -m pytest

# Side-by-side measurements; they print ratios, they assert nothing.
bench: $(STAMP)
	$(BIN)/python tests/bench/merge.py

# The pteditor kernel module, tested inside a QEMU virtual machine on
# Debian 12's kernel; as root, since it installs what it needs with apt.
vmtest: $(STAMP)
	bash vm/run.sh

lint: $(STAMP)
	$(BIN)/ruff check cowd client tests
	$(BIN)/ruff format --check cowd client tests

clean:
	rm -rf $(VENV) build
