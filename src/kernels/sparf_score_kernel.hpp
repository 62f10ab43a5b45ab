// SparF's approximate scores, written once over an arch (attention/simd.hpp) and instantiated per
// ISA in src/kernels/sparf_<isa>.cpp (contract: attention/sparf/score.hpp).
//
// Per column block and query head, the block's logits (<= a column page of tokens, in L1) gather
// q[c] * K[t, c] four channels at a time: one channel's tokens are contiguous in its column page
// and a page's channels are consecutive, so the loads sweep each chosen page sequentially (a
// token-tiled order with all channels in registers interleaves 16 streams and stalls on them). The approximate softmax
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
  constexpr uint32_t es = dtype_size(T);
  const uint32_t G = a.group_size, C = a.n_channels, n = a.n_tokens;
  const auto madd = [](vec x, vec y, vec acc) noexcept {
    if constexpr (L == 1) {
      return acc + x * y;  // no libm fma call on a baseline build
    } else {
      return ops::fma(x, y, acc);
    }
  };

  // Channel-major within a block: four channels (consecutive in their column page, so one
  // sequential sweep of it) update the block's rows of logits, which stay in L1. Each vector of K
  // is loaded and widened once for every query head of the group (GQA): the widening, not the
  // FMAs, was the cost when each head swept the pages again.
  for (uint32_t b = 0; b < a.n_blocks; ++b) {
    const uint32_t first = b * a.block_tokens;
    const uint32_t count = n - first < a.block_tokens ? n - first : a.block_tokens;
    const uint32_t cv = count / L * L;
    const std::byte* const* col = a.columns + size_t{b} * C;
    // The next block's columns (its own, scattered pages), fetched while this block computes:
    // each 64-byte step through a channel here prefetches the same step of that channel there,
    // so about a block of work hides each miss. The last block prefetches itself (already read).
    const std::byte* const* next = b + 1 < a.n_blocks ? col + C : col;
    float* const out0 = a.probs + first;
    uint32_t c = 0;
    for (; c + 4 <= C; c += 4) {
      const std::byte* p0 = col[c];
      const std::byte* p1 = col[c + 1];
      const std::byte* p2 = col[c + 2];
      const std::byte* p3 = col[c + 3];
      const bool fresh = c == 0;
      const std::byte* n0 = next[c];
      const std::byte* n1 = next[c + 1];
      const std::byte* n2 = next[c + 2];
      const std::byte* n3 = next[c + 3];
      for (uint32_t t = 0; t < cv; t += L) {
        const size_t o = size_t{t} * es;
        if (o % 64 < L * es) {  // a new cache line of every channel: prefetch the next block's
          ops::prefetch(n0 + o);
          ops::prefetch(n1 + o);
          ops::prefetch(n2 + o);
          ops::prefetch(n3 + o);
        }
        const vec k0 = ops::template load_kv<T>(p0 + o), k1 = ops::template load_kv<T>(p1 + o);
        const vec k2 = ops::template load_kv<T>(p2 + o), k3 = ops::template load_kv<T>(p3 + o);
        for (uint32_t g = 0; g < G; ++g) {
          const float* qg = a.q + size_t{g} * C + c;
          float* out = out0 + size_t{g} * n + t;
          vec acc = fresh ? ops::zero() : ops::load(out);
          acc = madd(ops::broadcast(qg[0]), k0, acc);
          acc = madd(ops::broadcast(qg[1]), k1, acc);
          acc = madd(ops::broadcast(qg[2]), k2, acc);
          acc = madd(ops::broadcast(qg[3]), k3, acc);
          ops::store(out, acc);
        }
      }
      for (uint32_t g = 0; g < G; ++g) {
        const float* qg = a.q + size_t{g} * C;
        float* out = out0 + size_t{g} * n;
        for (uint32_t t = cv; t < count; ++t) {
          const size_t o = size_t{t} * es;
          float acc = fresh ? 0.0f : out[t];
          acc += qg[c] * one::template load_kv<T>(p0 + o);
          acc += qg[c + 1] * one::template load_kv<T>(p1 + o);
          acc += qg[c + 2] * one::template load_kv<T>(p2 + o);
          acc += qg[c + 3] * one::template load_kv<T>(p3 + o);
          out[t] = acc;
        }
      }
    }
    for (; c < C; ++c) {
      const std::byte* p0 = col[c];
      const bool fresh = c == 0;
      const std::byte* n0 = next[c];
      for (uint32_t t = 0; t < cv; t += L) {
        if (size_t{t} * es % 64 < L * es) ops::prefetch(n0 + size_t{t} * es);
        const vec k0 = ops::template load_kv<T>(p0 + size_t{t} * es);
        for (uint32_t g = 0; g < G; ++g) {
          float* out = out0 + size_t{g} * n + t;
          const vec acc = fresh ? ops::zero() : ops::load(out);
          ops::store(out, madd(ops::broadcast(a.q[size_t{g} * C + c]), k0, acc));
        }
      }
      for (uint32_t g = 0; g < G; ++g) {
        float* out = out0 + size_t{g} * n;
        for (uint32_t t = cv; t < count; ++t)
          out[t] = (fresh ? 0.0f : out[t]) + a.q[size_t{g} * C + c] * one::template load_kv<T>(p0 + size_t{t} * es);
      }
    }
    if (C == 0)
      for (uint32_t g = 0; g < G; ++g)
        for (uint32_t t = 0; t < count; ++t) out0[size_t{g} * n + t] = 0.0f;
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
