#!/usr/bin/env bash
# instinfer-generate --prompt-cache end to end, one process per run (a restart each time): a cold
# run saves its prompt from a host cache; a warm run of the same prompt on ssd restores all but
# one token, a run with the same system prompt and another question restores their common
# prefix, a truncated file falls back to a cold prefill with a message; every run's greedy ids
# equal a cold run's. Exits 77 (skipped) without the model.
# Usage: generate_prompt_cache.sh GENERATOR MODEL
set -euo pipefail
gen="$1"
model="${INSTINFER_MODEL:-$2}"
if [[ ! -f "$model" ]]; then
  echo "SKIP: $model is absent (run scripts/fetch-model, or set INSTINFER_MODEL)"
  exit 77
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/instinfer-gen-prompt-cache.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cache="$work/prompt.cache"
system="You are a careful assistant for a lighthouse museum. Answer briefly."
qa="Why were lighthouses painted with bands of colour?"
qb="What did a lighthouse keeper do at night?"

run() {  # run QUESTION KV [extra args]: prints the stderr lines of interest
  local q="$1" kv="$2"
  shift 2
  "$gen" --model "$model" --chat --system "$system" --prompt "$q" --max-tokens 16 --ignore-eos --quiet --verbose \
    --kv "$kv" "$@" 2>&1 | grep -E '^\[(generated|prompt|prompt-cache)\]' | grep -v '^\[prompt\] [0-9]* tokens: [0-9 ]*$'
}
ids() { grep '^\[generated\]' <<<"$1"; }
prompt_line() { grep '^\[prompt\] [0-9]* tokens: [0-9]* restored' <<<"$1"; }
fail() {
  echo "FAIL: $*"
  exit 1
}

cold_a="$(run "$qa" host)"
cold_b="$(run "$qb" host)"
[[ -n "$(ids "$cold_a")" && -n "$(ids "$cold_b")" ]] || fail "no generated ids: $cold_a"

first="$(run "$qa" host --prompt-cache "$cache")"
echo "cold, saving:  $(prompt_line "$first")"
[[ "$(ids "$first")" == "$(ids "$cold_a")" ]] || fail "cold run with --prompt-cache differs"
[[ -f "$cache" && "$(stat -c %a "$cache")" == 600 ]] || fail "no cache file with mode 0600"

warm="$(run "$qa" "ssd:$work/kv.bin?buffered=1" --prompt-cache "$cache")"
echo "same prompt:   $(prompt_line "$warm")"
n="$(prompt_line "$warm" | sed -E 's/^\[prompt\] ([0-9]+) tokens: ([0-9]+) restored, ([0-9]+) prefilled.*/\1 \2 \3/')"
read -r total restored prefilled <<<"$n"
[[ "$restored" == "$((total - 1))" && "$prefilled" == 1 ]] || fail "same prompt: restored $restored of $total"
[[ "$(ids "$warm")" == "$(ids "$cold_a")" ]] || fail "same prompt: tokens differ from the cold run's"

other="$(run "$qb" "ssd:$work/kv2.bin?buffered=1" --prompt-cache "$cache")"
echo "other question: $(prompt_line "$other")"
read -r total restored prefilled <<<"$(prompt_line "$other" |
  sed -E 's/^\[prompt\] ([0-9]+) tokens: ([0-9]+) restored, ([0-9]+) prefilled.*/\1 \2 \3/')"
((restored > 20 && restored < total && restored + prefilled == total)) ||
  fail "other question: restored $restored, prefilled $prefilled of $total"
[[ "$(ids "$other")" == "$(ids "$cold_b")" ]] || fail "other question: tokens differ from the cold run's"

truncate -s 5000 "$cache"
broken="$(run "$qb" host --prompt-cache "$cache")"
grep -q '^\[prompt-cache\] .* not used: ' <<<"$broken" || fail "truncated file: no message: $broken"
echo "truncated file: $(grep '^\[prompt-cache\]' <<<"$broken")"
[[ "$(ids "$broken")" == "$(ids "$cold_b")" ]] || fail "truncated file: tokens differ from the cold run's"
echo "PASS"
