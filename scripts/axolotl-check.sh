#!/usr/bin/env bash
# CeRA through Axolotl as a user runs it (docs/guides/axolotl.md), on CPU, offline but for
# PyPI. Not part of `make test`: the install is about 7.6 GB and 400 s.
#   1. a fresh CPython 3.12 venv, `pip install axolotl==0.21.0`, then the cera_rs wheel
#      (dist/, which must carry a build for torch 2.14: make wheel TORCHES="2.11.0 2.14.1");
#      pip may only add cera_rs (Axolotl's pins and its torch stay as they were), and
#      `pip check` must be clean;
#   2. a tiny Llama from a LlamaConfig, a word-level tokenizer and a JSONL of counting
#      sequences, made here (scripts/axolotl_check.py make);
#   3. `axolotl train` with adapter: cera (plugin, cera: block, lora_target_linear,
#      gradient checkpointing): the loss must fall; then a resume from its checkpoint;
#   4. `axolotl merge-lora` on both merge paths (memory_efficient, legacy), and with a
#      LoRA YAML pointed at the CeRA adapter: each must fail, name `cera-rs export-lora`,
#      and write no merged model;
#   5. the saved adapter through PeftModel.from_pretrained, `cera-rs analyze` and
#      `cera-rs export-lora`.
# Prints each check, exits non-zero on the first failure.
# Usage: scripts/axolotl-check.sh   (WHEEL=path overrides dist/cera_rs-*.whl; WORK=dir the
# working folder, default ${XDG_CACHE_HOME:-~/.cache}/cera_rs-axolotl-check, emptied first;
# VENV=dir with REUSE_VENV=1 reuses a venv that already holds Axolotl, and reinstalls the
# wheel there).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3}
WHEEL=${WHEEL:-$(ls "$ROOT"/dist/cera_rs-*.whl)}
WORK=${WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/cera_rs-axolotl-check}
VENV=${VENV:-$WORK/venv}
AXOLOTL=axolotl==0.21.0
started=$SECONDS

ok() { echo "ok: $*"; }
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
step() { echo; echo "== $* ($((SECONDS - started)) s)"; }

run=$WORK/run
rm -rf "$run"
mkdir -p "$WORK"

step "1. Axolotl, then the wheel, in a CPython 3.12 venv"
if [ "${REUSE_VENV:-0}" = 1 ] && [ -x "$VENV/bin/axolotl" ]; then
  echo "reusing $VENV"
  "$VENV/bin/python" -m pip uninstall --quiet --yes cera_rs 2>/dev/null || true
else
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  t0=$SECONDS
  "$VENV/bin/python" -m pip install --quiet "$AXOLOTL"
  ok "pip install $AXOLOTL in $((SECONDS - t0)) s ($(du -sh "$VENV" | cut -f1))"
fi
py=$VENV/bin/python
"$py" -m pip freeze | sort >"$WORK/freeze-before.txt"
grep -iE '^(torch|peft|transformers|trl|accelerate)==' "$WORK/freeze-before.txt" | tr '\n' ' '
echo
"$py" -m pip install --quiet "$WHEEL"
"$py" -m pip freeze | sort >"$WORK/freeze-after.txt"
added=$(comm -13 "$WORK/freeze-before.txt" "$WORK/freeze-after.txt" | tr '\n' ' ')
removed=$(comm -23 "$WORK/freeze-before.txt" "$WORK/freeze-after.txt" | tr '\n' ' ')
[ -z "$removed" ] || fail "installing the wheel changed or removed: $removed (added: $added)"
case "$added" in
  "cera_rs"*" " | "cera-rs"*" ") ;;
  *) fail "installing the wheel added more than cera_rs: $added" ;;
esac
ok "the wheel added only ${added}and changed nothing of Axolotl's set"
"$py" -m pip check || fail "pip check"
ok "pip check is clean"
"$VENV/bin/cera-rs" --version

step "2. a tiny local Llama, tokenizer and dataset"
"$py" scripts/axolotl_check.py make "$run"

export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PATH=$VENV/bin:$PATH
cd "$run"

step "3. axolotl train with adapter: cera, on CPU"
cat train.yml && echo
axolotl train train.yml >train.log 2>&1 || { tail -40 train.log; fail "axolotl train (train.log)"; }
grep -m1 "CeRA: r=8" train.log | sed 's/^.*CeRA:/CeRA:/' || fail "the plugin's load_adapter did not run"
grep -q "gradient checkpointing on" train.log || fail "gradient checkpointing is not on"
ok "the plugin built the model (gradient checkpointing on)"
"$py" "$ROOT/scripts/axolotl_check.py" losses out
[ -f out/adapter_config.json ] || fail "no adapter saved in out/"
grep -q '"peft_type": "CERA"' out/adapter_config.json || fail "out/ does not hold a CeRA adapter"
ok "out/ holds the CeRA adapter ($(ls out | tr '\n' ' '))"

step "3b. resume from out/checkpoint-16 to step 24"
axolotl train resume.yml >resume.log 2>&1 || { tail -40 resume.log; fail "resumed train (resume.log)"; }
grep -q "Saving model checkpoint to .*checkpoint-24" resume.log || fail "no checkpoint-24"
"$py" "$ROOT/scripts/axolotl_check.py" resumed out 16
"$py" "$ROOT/scripts/axolotl_check.py" losses out

step "3c. a LoRA YAML's settings with adapter: cera are refused by name"
sed 's/"adapter": "cera",/"adapter": "cera", "lora_alpha": 16, "lora_dropout": 0.05, "load_in_4bit": true,/' \
  train.yml >refused.yml
if axolotl train refused.yml >refused.log 2>&1; then fail "a YAML with lora_alpha trained"; fi
for key in lora_alpha lora_dropout load_in_4bit; do
  grep -m1 -- "- $key: " refused.log || fail "the refusal does not name $key"
done
ok "refused before any model was loaded"

step "4. axolotl merge-lora is refused, on both merge paths"
refused() {  # $1: log name, rest: the command
  local log=$1
  shift
  if "$@" >"$log" 2>&1; then fail "$* succeeded (see $log)"; fi
  grep -q "cera-rs export-lora" "$log" || { tail -20 "$log"; fail "$*: no refusal naming cera-rs export-lora"; }
  [ ! -e out/merged ] || fail "$* wrote out/merged"
  grep -m1 -o "a CeRA adapter cannot be merged[^:]*" "$log"
  ok "refused, no out/merged: $*"
}
refused merge-efficient.log axolotl merge-lora train.yml
refused merge-legacy.log axolotl merge-lora train.yml --merge-method legacy
# The hazard: the memory-efficient path reads any adapter folder as LoRA. A LoRA YAML
# (with the plugin listed) pointed at the CeRA adapter is refused too.
sed -e 's/"adapter": "cera"/"adapter": "lora", "lora_r": 8, "lora_alpha": 16/' -e '/"cera": {/,/}/d' \
  train.yml >lora.yml
sed -i 's/"lora_target_linear": true,/"lora_target_linear": true, "lora_model_dir": "out",/' lora.yml
refused merge-as-lora.log axolotl merge-lora lora.yml

step "5. the saved adapter: PeftModel.from_pretrained, cera-rs analyze, cera-rs export-lora"
"$py" "$ROOT/scripts/axolotl_check.py" load "$run"
cera-rs analyze out --json analyze.json | tail -8
[ -s analyze.json ] || fail "cera-rs analyze wrote no report"
ok "cera-rs analyze"
cera-rs export-lora out lora --rank 4 --data tokens.txt --base model | tail -6
grep -q '"peft_type": "LORA"' lora/adapter_config.json || fail "export-lora wrote no LoRA adapter"
ok "cera-rs export-lora wrote a rank-4 PEFT LoRA in lora/"

step "6. the exported LoRA merges through axolotl merge-lora (the way the refusal names)"
sed -e 's/"lora_model_dir": "out"/"lora_model_dir": "lora"/' -e '/CeraPlugin/d' \
  -e 's#"output_dir": "[^"]*"#"output_dir": "lora-merge"#' lora.yml >export-merge.yml
axolotl merge-lora export-merge.yml >merge-export.log 2>&1 || { tail -20 merge-export.log; fail "merge of the exported LoRA"; }
[ -f lora-merge/merged/model.safetensors ] || fail "no lora-merge/merged/model.safetensors"
"$py" "$ROOT/scripts/axolotl_check.py" merged "$run" lora-merge/merged

echo
echo "axolotl-check passed in $((SECONDS - started)) s"
