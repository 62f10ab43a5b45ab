// The page policy's group scores (contract: attention/sparf/score.hpp), written once over an arch
// (attention/simd.hpp) and instantiated per ISA in src/kernels/sparf_<isa>.cpp.
//
// Per group: the next blocks are prefetched (each group's block is its own allocation, so the
// hardware streams stop at every block's end), then every asked kv head's bound is summed in
// vectors, up to four query heads of the GQA group at a time so that each min / max vector is
// loaded once for them. The per-head maximum keeps page_summary_score's rule (std::max: a NaN
// head's bound is passed over).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include "instinfer/attention/simd.hpp"
#include "instinfer/attention/sparf/score.hpp"

namespace instinfer::kernels {

template <class Arch>
void page_summary_scores(const page_summary_score_args& a) noexcept {
  using ops = simd::simd_ops<Arch>;
  using vec = typename ops::vec;
  constexpr uint32_t L = ops::kLanes;
  constexpr uint32_t kHeadsAtOnce = 4;
  constexpr uint32_t kAheadGroups = 2;  // about 2 x 2 KiB ahead at head_dim 128, 2 kv heads asked
  const uint32_t d = a.head_dim, G = a.group_size, dv = d / L * L;
  const size_t head_floats = size_t{2} * d;  // min row + max row
  for (uint32_t g = a.group_begin; g < a.group_end; ++g) {
    if (g + kAheadGroups < a.group_end) {
      const auto* next = reinterpret_cast<const std::byte*>(a.groups[g + kAheadGroups] + a.kv_begin * head_floats);
      for (size_t off = 0; off < a.n_kv * head_floats * sizeof(float); off += 64) ops::prefetch(next + off);
    }
    const float* block = a.groups[g];
    for (uint32_t h = a.kv_begin; h < a.kv_begin + a.n_kv; ++h) {
      const float* mn = block + h * head_floats;
      const float* mx = mn + d;
      const float* qh = a.q + size_t{h} * G * d;
      float best = -std::numeric_limits<float>::infinity();
      for (uint32_t g0 = 0; g0 < G; g0 += kHeadsAtOnce) {
        const uint32_t gn = G - g0 < kHeadsAtOnce ? G - g0 : kHeadsAtOnce;
        vec acc[kHeadsAtOnce];
        for (uint32_t j = 0; j < kHeadsAtOnce; ++j) acc[j] = ops::zero();
        for (uint32_t c = 0; c < dv; c += L) {
          const vec lo = ops::load(mn + c), hi = ops::load(mx + c);
          for (uint32_t j = 0; j < gn; ++j) {
            const vec qv = ops::load(qh + size_t{g0 + j} * d + c);
            acc[j] = acc[j] + ops::max(qv * lo, qv * hi);
          }
        }
        for (uint32_t j = 0; j < gn; ++j) {
          alignas(64) float lanes[L];
          ops::store(lanes, acc[j]);
          float s = 0.0f;
          for (uint32_t c = dv; c < d; ++c) {
            const float qc = qh[size_t{g0 + j} * d + c];
            s += qc * mn[c] < qc * mx[c] ? qc * mx[c] : qc * mn[c];
          }
          for (uint32_t l = 0; l < L; ++l) s += lanes[l];
          best = best < s ? s : best;
        }
      }
      a.scores[size_t{h} * a.n_groups + g] = best;
    }
  }
}

}  // namespace instinfer::kernels
