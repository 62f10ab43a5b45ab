#!/bin/sh
# Draw the paper-experiment plots from `instinfer-bench paper --csv` output.
#   bench/plots/make_plots.sh paper.csv [out_dir=docs/img] [name_suffix]
# Needs gnuplot (gnuplot-nox). Every figure is modelled (see docs/experiment.md).
set -eu
csv=${1:?usage: make_plots.sh PAPER_CSV [OUT_DIR]}
out=${2:-docs/img}
suffix=${3:-}
here=$(dirname "$0")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"

# CSV columns: 1 sweep 2 model 3 method 4 drives 5 batch 6 input 7 output 8 internal_gbps 9 channels
# 10 link_gbps 11 host_link_gbps 12 compression 13 fits 14 tokens_per_s 15 step_ms 16 gpu_ms
# 17 transfer_ms 18 device_ms 19 link_ms 20 page_frac 21 speedup_vs_flexgen 22 kind
model=$(awk -F, 'NR==2 {print $2}' "$csv")
batch=$(awk -F, '$1=="headline" {print $5; exit}' "$csv")
for m in gpu-resident host-offload flexgen-ssd csd-dense csd-sparf; do
  awk -F, -v m="$m" '$1=="main" && $3==m && $4==1 && $13==1 {print $5, $14}' "$csv" > "$tmp/batch_$m.dat"
  awk -F, -v m="$m" '$1=="channels" && $3==m {print $8, $14}' "$csv" > "$tmp/internal_$m.dat"
  awk -F, -v m="$m" '$1=="host-link" && $3==m {print $11, $14}' "$csv" > "$tmp/hostlink_$m.dat"
  awk -F, -v m="$m" '$1=="context" && $3==m && $13==1 {print $6, $14}' "$csv" > "$tmp/context_$m.dat"
  awk -F, -v m="$m" '$1=="scale-out" && $3==m {print $4, $14}' "$csv" > "$tmp/drives_$m.dat"
done
for n in 2 4; do
  awk -F, -v n="$n" '$1=="drives" && $3=="csd-sparf" && $4==n {print $5, $14}' "$csv" > "$tmp/batch_csd-sparf-x$n.dat"
  awk -F, -v n="$n" '$1=="drives" && $3=="csd-dense" && $4==n {print $5, $14}' "$csv" > "$tmp/batch_csd-dense-x$n.dat"
done
awk -F, '$1=="compression" && $3=="csd-sparf" {print $12, $14, $20}' "$csv" | sort -g > "$tmp/compression.dat"
# Breakdown at the headline batch: method, GPU, KV transfer, in-storage attention, drive link, step.
awk -F, -v b="$batch" '$1=="main" && $4==1 && $5==b {printf "%s %g %g %g %g %g\n", $3, $16, $17, $18, $19, $15}' \
  "$csv" > "$tmp/breakdown.dat"

for gp in throughput_vs_batch breakdown sensitivity; do
  gnuplot -e "dir='$tmp'; out='$out'; model='$model'; batch='$batch'; suffix='$suffix'" "$here/$gp.gp"
done
echo "plots written to $out"
