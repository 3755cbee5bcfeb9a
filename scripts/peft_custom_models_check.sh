#!/usr/bin/env bash
# PEFT's own custom-model test matrix (tests/test_custom_models.py) with a CeRA twin for
# every LoRA row on the Embedding, Conv1d, Conv2d, Conv2dGroups(2) and Conv3d models.
# Not part of `make test` (PEFT's test files are not vendored; CI has no network):
#
#   scripts/peft_custom_models_check.sh PEFT_TESTS_DIR [pytest args...]
#
# PEFT_TESTS_DIR is a copy of PEFT's tests/ folder (from a checkout of PEFT, or
# `git archive HEAD tests | tar -x` of a clone). The folder is copied, the twins are
# appended to TEST_CASES after LoRA's (same name with "CeRA" for "LoRA", same targets),
# and pytest runs the twins (-k CeRA) and, as the control, the LoRA rows they copy.
set -euo pipefail
src=${1:?usage: $0 PEFT_TESTS_DIR [pytest args...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PY:-$here/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$src" "$work/tests"
"$py" - "$work/tests/test_custom_models.py" <<'PYEOF'
import sys
path = sys.argv[1]
text = open(path).read()
anchor = "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = ["
twins = '''
# CeRA twins (cera_rs, scripts/peft_custom_models_check.sh)
from cera_rs import CeraConfig  # noqa: E402

_CERA_MODELS = {"EmbConv1D", "Conv1d", "Conv2d", "Conv2dGroups", "Conv2dGroups2", "Conv3d"}
TEST_CASES += [
    (name.replace("LoRA", "CeRA"), model_id, CeraConfig, dict(kwargs))
    for name, model_id, cls, kwargs in list(TEST_CASES)
    if cls is LoraConfig and model_id in _CERA_MODELS and set(kwargs) <= {"target_modules"}
]

'''
assert anchor in text, "TEST_CASES layout changed"
open(path, "w").write(text.replace(anchor, twins + anchor, 1))
PYEOF
cd "$work"
lora='(EmbConv1D or Conv1d or Conv2d or Conv2dGroups or Conv2dGroups2 or Conv3d) and LoRA
  and not DoRA and not bias and not trainable_tokens and not CeRA and not Bigger and not 1x1
  and not Kernel1 and not Conv2d2 and not TinyLoRA and not GraLoRA and not VBLoRA
  and not UniLora and not AdaLoRA'
lora=${lora//$'\n'/ }
echo "== CeRA twins"
"$py" -m pytest -q -p no:cacheprovider tests/test_custom_models.py -k "CeRA" "$@" | tail -n 60 || true
echo "== LoRA rows (control)"
"$py" -m pytest -q -p no:cacheprovider tests/test_custom_models.py -k "$lora" "$@" | tail -n 5 || true
