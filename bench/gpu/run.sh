#!/usr/bin/env bash
# One call on a GPU machine: configure and build the CUDA backend, run the GPU tests (float64
# reference and host kernel) and the decode benchmark, and print a short table of achieved KV
# bandwidth over the device-to-device copy bandwidth measured in the same run.
#
#   bench/gpu/run.sh            # BUILD_DIR=build-gpu JOBS=$(nproc) CUDA_ARCHS=<cmake list> to override
#
# Exit status: 0 when the tests pass and the target (ratio >= 0.85 at 32k context, batch >= 16,
# f16) is met; 1 on a test failure or a missed target; 77 when no GPU is visible.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD_DIR:-$root/build-gpu}
jobs=${JOBS:-$(nproc)}

echo "== GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv,noheader || true
else
  echo "nvidia-smi not found"
fi

echo "== configure and build ($build)"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DINSTINFER_CUDA=ON -DINSTINFER_WERROR=ON \
  ${CUDA_ARCHS:+-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS} >"$build.configure.log" 2>&1 ||
  { cat "$build.configure.log"; echo "configure failed"; exit 1; }
grep "instinfer:" "$build.configure.log" || true
cmake --build "$build" -j "$jobs" --target instinfer-test-cuda-math instinfer-test-cuda-decode instinfer-cuda-bench ||
  { echo "build failed"; exit 1; }

echo "== tests"
"$build/bin/instinfer-test-cuda-math"
math_rc=$?
start=$(date +%s)
"$build/bin/instinfer-test-cuda-decode"
gpu_rc=$?
echo "instinfer-test-cuda-decode: exit $gpu_rc in $(( $(date +%s) - start )) s"
if [ "$gpu_rc" -eq 77 ]; then
  echo "no GPU visible: the GPU tests were skipped, nothing was measured"
  exit 77
fi

echo "== decode benchmark"
out="$build/cuda-bench.txt"
"$build/bin/instinfer-cuda-bench" --dtype f16 --contexts 4096,32768,131072 --batches 1,16,64 | tee "$out"
bench_rc=${PIPESTATUS[0]}
for t in f32 bf16; do
  "$build/bin/instinfer-cuda-bench" --dtype "$t" --contexts 32768 --batches 16 | grep -v '^#' | tail -n 1 | tee -a "$out"
done
for hd in 64 256; do
  "$build/bin/instinfer-cuda-bench" --dtype f16 --head-dim "$hd" --contexts 32768 --batches 16 | grep -v '^#' |
    tail -n 1 | tee -a "$out"
done

echo "== summary"
# Columns: dtype hd kvh g context batch splits time_us KV_GB/s ratio
target=$(awk '$1 == "f16" && $5 == 32768 && $6 >= 16 && $4 != "" {
                n++; if ($10 < 0.85) bad++; printf "f16 ctx=32768 batch=%s head_dim=%s: %.3f of copy bandwidth\n", $6, $2, $10 }
              END { if (n == 0) print "TARGET: no f16 32k batch>=16 row"; else if (bad) print "TARGET MISSED (>= 0.85)"; else print "TARGET MET (>= 0.85)" }' "$out")
echo "$target"
echo "math tests: $([ $math_rc -eq 0 ] && echo pass || echo FAIL)   GPU tests: $([ $gpu_rc -eq 0 ] && echo pass || echo FAIL)   bench: exit $bench_rc"
[ $math_rc -eq 0 ] && [ $gpu_rc -eq 0 ] && [ $bench_rc -eq 0 ] && echo "$target" | grep -q "TARGET MET" && exit 0
exit 1
