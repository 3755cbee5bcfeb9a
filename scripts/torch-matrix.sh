#!/usr/bin/env bash
# Checks the built wheel (dist/, `make wheel`) under every torch it claims: for each
# version, a fresh venv with that torch installed first (the user's torch), then the
# wheel with whatever pip resolves for its other requirements, then
#   - torch must be exactly as it was (pip may not replace or move it);
#   - scripts/torch_smoke.py: import (the build for that minor), gradcheck of cera_delta in
#     float64, the README quick start with save/load through PEFT and a load without
#     `import cera_rs`, an autocast bf16 training step, `cera-rs --version`;
#   - tests/test_transformers_adapters.py: transformers' own adapter methods with CeRA,
#     under the transformers and peft versions pip resolved.
# Writes target/matrix/table.md (torch, result, minutes, resolved versions) and exits
# non-zero if any version failed. Each venv is deleted after its row (several GB).
# Usage: scripts/torch-matrix.sh [TORCH_VERSION ...]   (default: the five below)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSIONS=${*:-"2.11.0 2.12.1 2.13.0 2.14.1 2.15.0"}
WHEEL=${WHEEL:-$(ls dist/cera_rs-*.whl)}
OUT=$ROOT/target/matrix
mkdir -p "$OUT"
TABLE=$OUT/table.md
echo "| torch | result | minutes | transformers / peft resolved |" >"$TABLE"
echo "|---|---|---|---|" >>"$TABLE"
failed=0
for version in $VERSIONS; do
  t0=$SECONDS
  venv=$OUT/venv-$version
  log=$OUT/$version.log
  rm -rf "$venv"
  (
    set -e
    python3 -m venv "$venv"
    py=$venv/bin/python
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet "torch==$version"
    before=$("$py" -m pip freeze | grep -i '^torch==')
    "$py" -m pip install --quiet "$WHEEL" pytest
    after=$("$py" -m pip freeze | grep -i '^torch==')
    [ "$before" = "$after" ] || { echo "pip changed torch: $before -> $after"; exit 1; }
    echo "torch left alone: $after"
    "$py" scripts/torch_smoke.py
    "$py" -m pytest -q -p no:cacheprovider tests/test_transformers_adapters.py
    "$py" -m pip freeze | grep -iE '^(transformers|peft)==' | tr '\n' ' ' >"$OUT/$version.resolved"
  ) >"$log" 2>&1
  status=$?
  minutes=$(awk "BEGIN {printf \"%.1f\", ($SECONDS - $t0) / 60}")
  resolved=$(cat "$OUT/$version.resolved" 2>/dev/null || echo "-")
  if [ $status -eq 0 ]; then result=passed; else result="FAILED (see $log)"; failed=1; fi
  echo "| $version | $result | $minutes | $resolved |" >>"$TABLE"
  echo "torch $version: $result in $minutes min"
  rm -rf "$venv"
done
cat "$TABLE"
exit $failed
