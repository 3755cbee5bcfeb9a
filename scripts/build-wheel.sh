#!/usr/bin/env bash
# Builds the wheel users install: one abi3 wheel that carries one build of the extension
# per torch minor (cera_rs/_native_builds/torch-2.N/_native.abi3.so), so that pip leaves
# any torch in the declared range alone and `import cera_rs` loads the matching build.
#
# libtorch's C++ API has no ABI promise across minors, so each build is compiled against
# that minor's headers and libraries, taken from a build-only venv holding that torch
# (target/wheel/venv-2.N, deleted after its build unless KEEP_VENVS=1; pip's cache keeps
# the download). tch 0.24 is generated for torch 2.11; later minors removed six of the
# functions its generated C++ wraps (none of which cera_rs calls), so their builds use a
# copy of torch-sys with scripts/patches/torch-sys-0.24-removed-ops.patch applied, C++20
# (torch 2.15's headers refuse C++17) and tch's version check bypassed. The patched
# builds compile in a copy of the crate (target/wheel/crate), so the committed Cargo.lock
# is never rewritten.
#
# Usage: scripts/build-wheel.sh   (make wheel; PY is the dev venv's python, its torch
# build comes from maturin as `make` builds it). TORCHES overrides the list.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
TORCHES=${TORCHES:-"2.11.0 2.12.1 2.13.0 2.14.1 2.15.0"}
WORK=$ROOT/target/wheel
PATCH=$ROOT/scripts/patches/torch-sys-0.24-removed-ops.patch
mkdir -p "$WORK" dist
started=$SECONDS

minor_of() { echo "$1" | cut -d. -f1,2; }
dev_torch=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')

# 1. maturin's wheel: metadata, Python sources, the .pth hook, and the dev torch's build.
rm -rf "$WORK/base" "$WORK/stage"
"$(dirname "$PY")/maturin" build --release --quiet --out "$WORK/base" --interpreter "$PY"
base=$(ls "$WORK"/base/cera_rs-*.whl)
"$PY" -m wheel unpack --dest "$WORK/stage" "$base" >/dev/null
stage=$(ls -d "$WORK"/stage/cera_rs-*)
builds=$stage/cera_rs/_native_builds
mkdir -p "$builds"

# 2. The patched torch-sys, from the registry copy cargo already has for the main build.
torch_sys_src=$(cargo metadata --format-version 1 --locked | "$PY" -c '
import json, sys
meta = json.load(sys.stdin)
print(next(p["manifest_path"] for p in meta["packages"] if p["name"] == "torch-sys").rsplit("/", 1)[0])')
patched=$WORK/torch-sys-patched
stamp="$torch_sys_src $(sha256sum <"$PATCH")"
if [ "$(cat "$patched/.cera-rs-stamp" 2>/dev/null)" != "$stamp" ]; then  # else keep its mtimes
  rm -rf "$patched" && cp -r "$torch_sys_src" "$patched"
  patch --quiet -p1 -d "$patched" <"$PATCH"
  echo "$stamp" >"$patched/.cera-rs-stamp"
fi
rm -rf "$WORK/crate" && mkdir -p "$WORK/crate"
cp -r Cargo.toml Cargo.lock build.rs src "$WORK/crate/"

for version in $TORCHES; do
  minor=$(minor_of "$version")
  t0=$SECONDS
  mkdir -p "$builds/torch-$minor"
  if [ "$version" = "$dev_torch" ]; then
    mv "$stage/cera_rs/_native.abi3.so" "$builds/torch-$minor/_native.abi3.so"
  else
    venv=$WORK/venv-$minor
    target=$WORK/target-$minor
    if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
      rm -rf "$venv"
      python3 -m venv "$venv"
      "$venv/bin/python" -m pip install --quiet --upgrade pip
      "$venv/bin/python" -m pip install --quiet "torch==$version" numpy
    fi
    (
      cd "$WORK/crate"
      export VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH PYO3_PYTHON=$venv/bin/python
      export LIBTORCH_USE_PYTORCH=1 LIBTORCH_BYPASS_VERSION_CHECK=1 CXXFLAGS=-std=c++20
      cargo build --release --lib --features python --quiet --target-dir "$target" \
        --config "patch.crates-io.torch-sys.path=\"$patched\"" \
        --config 'profile.release.strip="symbols"'
    )
    # torch-sys reruns its build script on its own files and LIBTORCH_* variables, not
    # on which venv's torch it finds: a target folder shared by two minors would keep the
    # first one's C++. Hence one target folder per minor, and this check.
    grep -qs "libtorch_lib=$venv/" "$target"/release/build/torch-sys-*/output ||
      { echo "torch-sys in $target was not built against $venv" >&2; exit 1; }
    cp "$target/release/libcera_rs.so" "$builds/torch-$minor/_native.abi3.so"
    [ "${KEEP_VENVS:-0}" = 1 ] || rm -rf "$venv"
  fi
  echo "torch $version: built in $((SECONDS - t0)) s"
done
rm -f "$stage/cera_rs/_native.abi3.so"  # a dev torch outside TORCHES: no stray build
# The torch requirement is exactly the minors built (pyproject's range when all are).
minors=$(for version in $TORCHES; do minor_of "$version"; done)
# shellcheck disable=SC2086
"$PY" scripts/wheel_torch_requirement.py "$stage"/cera_rs-*.dist-info/METADATA $minors

# 3. One wheel: RECORD rewritten by `wheel pack`, the tag maturin gave the first build.
rm -f dist/cera_rs-*.whl
"$PY" -m wheel pack --dest-dir dist "$stage" >/dev/null
ls -l dist/cera_rs-*.whl
echo "make wheel: $((SECONDS - started)) s for torch $TORCHES"
