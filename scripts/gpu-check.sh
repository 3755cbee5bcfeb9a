#!/usr/bin/env bash
# One device call: install the abi3 wheel carried in dist/, run the CUDA tests (the
# Linear, embedding and conv branches), the embedding/conv benchmark and the CUDA
# benchmark, leave gpu-check.json and gpu-check.log in $OUT. See scripts/README.md.
#
#   scripts/gpu-check.sh            on a GPU machine (installs into its Python)
#   scripts/gpu-check.sh --dry-run  anywhere: everything but CUDA (installs into a
#                                   temporary --target folder, runs the same tests on
#                                   the CPU route and the benchmark's quick CPU grid)
#
# Environment: OUT (default ./gpu-check-out), PYTHON (default python3), BUDGET (seconds
# for the whole run, default 450), DIST (where the wheels are, default dist), and for
# tests of this script PYTEST_ARGS, BENCH_ARGS, LAYERS_ARGS, TESTS_LIMIT, LAYERS_LIMIT,
# BENCH_LIMIT (seconds).
set -uo pipefail

dry=0
[[ ${1:-} == --dry-run ]] && dry=1
OUT=${OUT:-$PWD/gpu-check-out}
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-450}
DIST=${DIST:-dist}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
STEPS=$OUT/.steps.tsv
: >"$LOG"
: >"$STEPS"
started=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The test files that hold CUDA tests; collecting only those keeps modules that import
# what the device image lacks (fuzzing, notebooks) out of the run.
cuda_files=$(grep -l 'mark\.cuda' tests/test_*.py | tr '\n' ' ')
if ((dry)); then
    mode=dry-run
    # without CUDA the cuda-marked tests skip; the CPU route of the same tests runs
    pytest_args=${PYTEST_ARGS:-tests/test_device_path.py tests/test_tensor_ops.py \
tests/test_layer_types.py}
    bench_args=${BENCH_ARGS:---device cpu --quick}
    layers_args=${LAYERS_ARGS:---device cpu --quick}
else
    mode=gpu
    pytest_args=${PYTEST_ARGS:--m cuda $cuda_files}
    bench_args=${BENCH_ARGS:---device cuda}
    layers_args=${LAYERS_ARGS:---device cuda}
fi

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# step NAME LIMIT CMD...: runs CMD with its output in the log, stopped after LIMIT
# seconds or when the run's BUDGET is spent (15 s kept for the summary), whichever
# comes first; records name, exit status, seconds and whether it timed out.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - started) - 15))
    ((left < limit)) && limit=$left
    if ((limit <= 0)); then
        log "step $name: skipped, the budget is spent"
        printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 0 >>"$STEPS"
        return 1
    fi
    log "step $name (limit ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local timed_out=0
    ((rc == 124 || rc == 137)) && timed_out=1
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$timed_out" >>"$STEPS"
    log "step $name: exit $rc after $(($(date +%s) - t0))s"
    return "$rc"
}

wheel=$(ls "$DIST"/cera_rs-*-abi3-*.whl 2>/dev/null | head -n 1)
log "gpu-check $mode; wheel: ${wheel:-none}; python: $("$PYTHON" -V 2>&1)"

# The wheel without its dependencies (the image's torch, peft and transformers stay);
# pytest and its dependencies from wheels carried in $DIST/deps if the image lacks them.
install='
set -e
if ((dry)); then target=(--target "$work/site"); else target=(--force-reinstall); fi
"$PYTHON" -m pip install --quiet --no-deps --no-index "${target[@]}" "$wheel"
"$PYTHON" -c "import pytest" 2>/dev/null ||
    "$PYTHON" -m pip install --quiet --no-index --find-links "$DIST/deps" pytest
'
export dry work wheel PYTHON DIST
if [[ -z $wheel ]]; then
    log "no $DIST/cera_rs-*-abi3-*.whl: build it first (scripts/README.md)"
    printf '%s\t%s\t%s\t%s\n' install missing-wheel 0 0 >>"$STEPS"
else
    step install 120 bash -c "$install"
fi
((dry)) && export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}

# What runs: the installed wheel (not python/ of this tree), the torch and the card.
env_check='
import json, torch, cera_rs
cuda = torch.cuda.is_available()
print(json.dumps({"cera_rs": cera_rs.__file__, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if cuda else None}))
assert "site-packages" in cera_rs.__file__ or "/site/" in cera_rs.__file__, cera_rs.__file__
assert cuda or DRY, "torch sees no CUDA device"
'
step environment 60 "$PYTHON" -c "DRY = $dry$env_check"
((dry)) || step nvidia-smi 20 nvidia-smi

# shellcheck disable=SC2086  # the argument lists are meant to split on spaces
step tests "${TESTS_LIMIT:-200}" "$PYTHON" -m pytest -q -p no:cacheprovider -rfEs \
    --continue-on-collection-errors --junitxml="$OUT/pytest.xml" $pytest_args
# shellcheck disable=SC2086
step bench-layers "${LAYERS_LIMIT:-90}" "$PYTHON" -m cera_rs.cli bench --layers $layers_args \
    --json "$OUT/layers.json"
# shellcheck disable=SC2086
step bench "${BENCH_LIMIT:-300}" "$PYTHON" -m cera_rs.cli bench $bench_args --json "$OUT/bench.json"

# The summary: steps, test counts from the JUnit XML, the benchmark's targets.
"$PYTHON" - "$OUT" "$mode" "$wheel" <<'EOF' | tee -a "$LOG"
import json, os, sys, tempfile, xml.etree.ElementTree as ET
from datetime import datetime, timezone

out, mode, wheel = sys.argv[1:4]
steps = []
with open(os.path.join(out, ".steps.tsv")) as f:
    for line in f:
        name, rc, seconds, timed_out = line.rstrip("\n").split("\t")
        steps.append({"name": name, "exit": int(rc) if rc.lstrip("-").isdigit() else rc,
                      "seconds": int(seconds), "timed_out": timed_out == "1"})
summary = {"mode": mode, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "wheel": os.path.basename(wheel) or None, "steps": steps}
try:
    suite = ET.parse(os.path.join(out, "pytest.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError) as e:
    summary["tests"] = {"error": str(e)}
try:
    with open(os.path.join(out, "bench.json")) as f:
        bench = json.load(f)
    summary["bench"] = {"machine": bench["machine"], "rows": len(bench["rows"]),
                        "targets": bench["targets"]}
except (OSError, ValueError, KeyError) as e:
    summary["bench"] = {"error": str(e)}
try:
    with open(os.path.join(out, "layers.json")) as f:
        layers = json.load(f)
    summary["layers"] = {"rows": len(layers["rows"]), "targets": layers["targets"]}
except (OSError, ValueError, KeyError) as e:
    summary["layers"] = {"error": str(e)}
summary["ok"] = all(s["exit"] == 0 for s in steps) and summary["tests"].get("failures") == 0 \
    and summary["tests"].get("errors") == 0
fd, tmp = tempfile.mkstemp(dir=out, prefix=".gpu-check.json.")
with os.fdopen(fd, "w") as f:
    json.dump(summary, f, indent=2)
os.replace(tmp, os.path.join(out, "gpu-check.json"))
print(json.dumps(summary, indent=2))
sys.exit(0 if summary["ok"] else 1)
EOF
