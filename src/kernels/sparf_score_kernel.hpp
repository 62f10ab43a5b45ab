// SparF's approximate scores, written once over an arch (attention/simd.hpp) and instantiated per
// ISA in src/kernels/sparf_<isa>.cpp (contract: attention/sparf/score.hpp).
//
// Per column block and query head, tiles of kTileVecs vectors of consecutive tokens accumulate
// q[c] * K[t, c] over the chosen channels in registers (one channel's tokens are contiguous in
// its column page, so each load is one vector of tokens), then one store. The approximate softmax
// (soft-cap, max, exp, sum, scale) runs over the whole row in vectors. Tails narrower than a
// vector use the scalar loads.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "instinfer/attention/simd.hpp"
#include "instinfer/attention/sparf/score.hpp"
#include "instinfer/attention/state.hpp"

namespace instinfer::kernels {

template <class Arch, dtype T>
void sparf_scores(const sparf_score_args& a) noexcept {
  using ops = simd::simd_ops<Arch>;
  using one = simd::simd_ops<simd::scalar_arch>;
  using vec = typename ops::vec;
  constexpr uint32_t L = ops::kLanes;
  constexpr uint32_t kTileVecs = L == 1 ? 1 : 4;
  constexpr uint32_t es = dtype_size(T);
  const uint32_t G = a.group_size, C = a.n_channels, n = a.n_tokens;
  const auto madd = [](vec x, vec y, vec acc) noexcept {
    if constexpr (L == 1) {
      return acc + x * y;  // no libm fma call on a baseline build
    } else {
      return ops::fma(x, y, acc);
    }
  };

  for (uint32_t b = 0; b < a.n_blocks; ++b) {
    const uint32_t first = b * a.block_tokens;
    const uint32_t count = n - first < a.block_tokens ? n - first : a.block_tokens;
    const std::byte* const* col = a.columns + size_t{b} * C;
    for (uint32_t g = 0; g < G; ++g) {
      const float* qg = a.q + size_t{g} * C;
      float* out = a.probs + size_t{g} * n + first;
      uint32_t t = 0;
      for (; t + kTileVecs * L <= count; t += kTileVecs * L) {
        vec acc[kTileVecs];
#pragma GCC unroll 4
        for (uint32_t i = 0; i < kTileVecs; ++i) acc[i] = ops::zero();
        for (uint32_t c = 0; c < C; ++c) {
          const vec qv = ops::broadcast(qg[c]);
          const std::byte* p = col[c] + size_t{t} * es;
#pragma GCC unroll 4
          for (uint32_t i = 0; i < kTileVecs; ++i)
            acc[i] = madd(qv, ops::template load_kv<T>(p + size_t{i} * L * es), acc[i]);
        }
#pragma GCC unroll 4
        for (uint32_t i = 0; i < kTileVecs; ++i) ops::store(out + t + i * L, acc[i]);
      }
      for (; t + L <= count; t += L) {
        vec acc = ops::zero();
        for (uint32_t c = 0; c < C; ++c)
          acc = madd(ops::broadcast(qg[c]), ops::template load_kv<T>(col[c] + size_t{t} * es), acc);
        ops::store(out + t, acc);
      }
      for (; t < count; ++t) {
        float acc = 0.0f;
        for (uint32_t c = 0; c < C; ++c) acc += qg[c] * one::template load_kv<T>(col[c] + size_t{t} * es);
        out[t] = acc;
      }
    }
  }

  // Approximate softmax per query head, in place.
  const uint32_t nv = n / L * L;
  for (uint32_t g = 0; g < G; ++g) {
    float* p = a.probs + size_t{g} * n;
    if (a.softcap > 0.0f) {
      const vec cap = ops::broadcast(a.softcap), inv = ops::broadcast(1.0f / a.softcap);
      for (uint32_t i = 0; i < nv; i += L) ops::store(p + i, cap * ops::tanh(ops::load(p + i) * inv));
      for (uint32_t i = nv; i < n; ++i) p[i] = apply_softcap(p[i], a.softcap);
    }
    vec mv = ops::broadcast(-std::numeric_limits<float>::infinity());
    for (uint32_t i = 0; i < nv; i += L) mv = ops::max(mv, ops::load(p + i));
    alignas(64) float lanes[L];
    ops::store(lanes, mv);
    float m = -std::numeric_limits<float>::infinity();
    for (uint32_t l = 0; l < L; ++l) m = lanes[l] > m ? lanes[l] : m;
    for (uint32_t i = nv; i < n; ++i) m = p[i] > m ? p[i] : m;
    if (G == 1)
      for (uint32_t i = 0; i < n; ++i) a.rank[i] = p[i];  // rank by logit: exp underflow makes no ties
    if (m == -std::numeric_limits<float>::infinity()) {
      for (uint32_t i = 0; i < n; ++i) p[i] = 0.0f;
      continue;
    }
    const vec mb = ops::broadcast(m);
    vec sv = ops::zero();
    for (uint32_t i = 0; i < nv; i += L) {
      const vec e = ops::exp(ops::load(p + i) - mb);
      ops::store(p + i, e);
      sv = sv + e;
    }
    ops::store(lanes, sv);
    float s = 0.0f;
    for (uint32_t l = 0; l < L; ++l) s += lanes[l];
    for (uint32_t i = nv; i < n; ++i) {
      p[i] = std::exp(p[i] - m);
      s += p[i];
    }
    const vec inv = ops::broadcast(1.0f / s);
    for (uint32_t i = 0; i < nv; i += L) ops::store(p + i, ops::load(p + i) * inv);
    for (uint32_t i = nv; i < n; ++i) p[i] *= 1.0f / s;
  }
  if (G > 1) {
    for (uint32_t i = 0; i < nv; i += L) {
      vec s = ops::zero();
      for (uint32_t g = 0; g < G; ++g) s = s + ops::load(a.probs + size_t{g} * n + i);
      ops::store(a.rank + i, s);
    }
    for (uint32_t i = nv; i < n; ++i) {
      float s = 0.0f;
      for (uint32_t g = 0; g < G; ++g) s += a.probs[size_t{g} * n + i];
      a.rank[i] = s;
    }
  }
}

// The one place where the column dtype becomes a template argument.
template <class Arch>
sparf_score_fn lookup_sparf_score_kernel(dtype column_dtype) noexcept {
  switch (column_dtype) {
    case dtype::kF32: return &sparf_scores<Arch, dtype::kF32>;
    case dtype::kF16: return &sparf_scores<Arch, dtype::kF16>;
    case dtype::kBF16: return &sparf_scores<Arch, dtype::kBF16>;
    default: return nullptr;
  }
}

}  // namespace instinfer::kernels
