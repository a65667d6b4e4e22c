# pyops: `make test` and `make demo` are the whole set-up on a fresh machine (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := build/.pyops-built
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml
PYTEST_FLAGS ?= -q
BENCH_FLAGS ?= --benchmark-warmup=on --benchmark-min-rounds=5 --benchmark-max-time=0.5

.PHONY: build test demo bench fuzz gpu-check clean

# A fresh .venv with the pinned packages; redone only when requirements.txt changes.
$(DEPS): requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	touch $@

# The extension, compiled by an editable install (ninja keeps objects in build/, so only changed files recompile).
$(BUILT): $(DEPS) $(SOURCES)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

build: $(BUILT)

test: build
	$(VPY) -m pytest tests $(PYTEST_FLAGS)

demo: build
	$(VPY) -m pyops

# glibc's malloc hands large freed blocks back to the kernel, so a fresh output of a few MB can cost thousands of page
# faults on one call and none on the next: that made single CPU timings 1-5x slower at random (bench/NOTES.md). The
# two thresholds keep freed memory in the heap, the steady state a tuned allocator (jemalloc, tcmalloc) gives.
BENCH_MALLOC := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824

bench: build
	mkdir -p bench/results
	$(BENCH_MALLOC) $(VPY) -m pytest bench --device cpu $(BENCH_FLAGS) --benchmark-json=bench/results/cpu.json -p no:cacheprovider
	$(VPY) bench/report.py bench/results/cpu.json --out bench/results --stat min

# Many wider random layers than the unit tests draw, through every forced route and CPU instruction set, against
# float64 PyTorch (half a minute on 2 cores; not part of `make test`): FUZZ_FLAGS="--cases 1000 --seed 7" for more.
fuzz: build
	$(VPY) tests/fuzz_routes.py $(FUZZ_FLAGS)

# For the lent GPU machine: its own python3 and torch as they are (no venv, nothing installed), the extension built
# in place for the visible GPU, the whole test suite with CUDA present, the CUDA benchmarks, a short table last.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build pyops/*.so
