#!/usr/bin/env bash
# instinfer-sparse-eval on a tiny configuration (one short prompt, one needle, one budget): dense
# must retrieve the needle, every JSON line must parse and hold sane fractions, and the sparse
# configuration must have read fewer pages than dense; a bad --channel-share or --summary-prompts is refused; --summary-prompts 2 gives one
# agreement entry per prompt. Exits 77 (skipped) without the model.
# Usage: sparse_eval.sh PROGRAM MODEL
set -euo pipefail
prog="$1"
model="${INSTINFER_MODEL:-$2}"
if [[ ! -f "$model" ]]; then
  echo "SKIP: $model is absent (run scripts/fetch-model, or set INSTINFER_MODEL)"
  exit 77
fi
# A bad --channel-share is refused with a message naming the value, before the model is loaded.
for bad in 0 1 -0.5 x; do
  if err="$("$prog" --model "$model" --channel-share "$bad" 2>&1)"; then
    echo "FAIL: --channel-share $bad was accepted"; exit 1
  fi
  [[ "$err" == *"bad value '$bad' for --channel-share"* ]] || { echo "FAIL: unclear error for $bad: $err"; exit 1; }
done
if err="$("$prog" --model "$model" --summary-prompts 0 2>&1)"; then
  echo "FAIL: --summary-prompts 0 was accepted"; exit 1
fi
[[ "$err" == *"bad value '0' for --summary-prompts"* ]] || { echo "FAIL: unclear error: $err"; exit 1; }
out="$("$prog" --model "$model" --lengths 128 --depths 0.5 --needles 1 --gen-tokens 4 --kl-steps 2 --budget 1/4 \
  --policies page --sw-only --summary-prompts 2 --json)"
printf '%s\n' "$out"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(line) for line in sys.argv[1].splitlines() if line.strip()]
assert len(rows) == 2, f"expected dense and one sparse configuration, got {len(rows)} lines"
dense, sparse = rows
assert dense["config"] == "dense" and dense["needles"] == 1, dense
assert dense["needle_hits"] == 1, "dense did not retrieve the needle"
assert dense["agreement"][0]["kl_mean"] == 0 and dense["agreement"][0]["same32"] == 4, dense
# --summary-prompts 2: one agreement entry per prompt, each a prefilled prompt of its own.
assert [a["prompt"] for a in dense["agreement"]] == [0, 1], dense["agreement"]
assert all(a["prompt_tokens"] > 128 for a in dense["agreement"]), dense["agreement"]
assert all(a["first_divergence"] == -1 for a in dense["agreement"]), dense["agreement"]
assert sparse["policy"] == "page" and sparse["sinks"] == 16 and sparse["window"] == 64, sparse
assert 0 < sparse["page_frac"] < 1, sparse
for a in sparse["agreement"]:
    assert a["kl_mean"] >= 0 and 0 <= a["same32"] <= a["n32"] == 4, a
    # A divergence carries dense's top-1 minus top-2 gap there; none carries -1.
    assert (a["dense_gap_at_divergence"] >= 0) == (a["first_divergence"] >= 0), a
assert 0 < sparse["page_summary_overhead"] < sparse["sparf_column_overhead"], sparse
print("ok")
PY
