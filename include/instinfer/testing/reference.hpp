// Float64 reference decode attention, for tests and for checking backends.
//
// It reads exactly the stored values (f32 / f16 / bf16, and q8_0 / q4_0 dequantized, all exact in
// float, widened exactly to double), computes
// the logits, the softmax and the weighted sum of values in double, and returns double outputs
// and lse. Slow and allocating by design: never on a hot path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "instinfer/attention/decode.hpp"
#include "instinfer/core/dtype.hpp"

namespace instinfer::reference {

// Attention of `n_heads` query heads over one KV head's plain arrays.
//   k, v: [n_tokens][head_dim] stored as `t`; q: [n_heads][head_dim] f32
//   out: [n_heads][head_dim] (zeros when n_tokens == 0); lse: [n_heads] (-inf when empty), may be null
// scale: logit scale (> 0); softcap > 0 applies cap * tanh(logit / cap).
inline void attend_rows(const void* k, const void* v, dtype t, uint64_t n_tokens, uint32_t head_dim, const float* q,
                        uint32_t n_heads, double scale, double softcap, double* out, double* lse) {
  const size_t row = dtype_row_bytes(t, head_dim);
  const auto* kb = static_cast<const std::byte*>(k);
  const auto* vb = static_cast<const std::byte*>(v);
  std::vector<double> logits(n_tokens);
  for (uint32_t h = 0; h < n_heads; ++h) {
    const float* qh = q + size_t{h} * head_dim;
    double m = -std::numeric_limits<double>::infinity();
    for (uint64_t i = 0; i < n_tokens; ++i) {
      double dot = 0.0;
      for (uint32_t d = 0; d < head_dim; ++d) dot += double{qh[d]} * double{load_as_float(kb + i * row, t, d)};
      double x = scale * dot;
      if (softcap > 0.0) x = softcap * std::tanh(x / softcap);
      logits[i] = x;
      m = std::max(m, x);
    }
    double* oh = out + size_t{h} * head_dim;
    std::fill(oh, oh + head_dim, 0.0);
    double denom = 0.0;
    for (uint64_t i = 0; i < n_tokens; ++i) {
      const double p = std::exp(logits[i] - m);
      denom += p;
      for (uint32_t d = 0; d < head_dim; ++d) oh[d] += p * double{load_as_float(vb + i * row, t, d)};
    }
    if (n_tokens > 0)
      for (uint32_t d = 0; d < head_dim; ++d) oh[d] /= denom;
    if (lse) lse[h] = n_tokens > 0 ? m + std::log(denom) : -std::numeric_limits<double>::infinity();
  }
}

// The same over a sequence stored in chunks (chunk_layout), as the kernels see it.
//   chunks: ceil(n_tokens / tokens_per_page) chunk pointers; q: [n_q_heads][head_dim]
//   out: [n_q_heads][head_dim]; lse: [n_q_heads] or null
inline void attend_chunks(const decode_params& p, const std::byte* const* chunks, uint64_t n_tokens, const float* q,
                          double* out, double* lse) {
  const chunk_layout& cl = p.layout;
  const uint32_t hd = cl.page.head_dim;
  const dtype t = cl.page.kv_dtype;
  const size_t row = cl.page.row_bytes();
  std::vector<std::byte> k(n_tokens * row), v(n_tokens * row);
  for (uint32_t kvh = 0; kvh < cl.n_kv_heads; ++kvh) {
    for (uint64_t i = 0; i < n_tokens; ++i) {
      const std::byte* c = chunks[i / cl.tokens()];
      const uint32_t in_page = static_cast<uint32_t>(i % cl.tokens());
      std::copy_n(c + cl.offset(kv_kind::kKey, kvh, in_page, 0), row, k.data() + i * row);
      std::copy_n(c + cl.offset(kv_kind::kValue, kvh, in_page, 0), row, v.data() + i * row);
    }
    const size_t h0 = size_t{kvh} * p.group_size;
    attend_rows(k.data(), v.data(), t, n_tokens, hd, q + h0 * hd, p.group_size, p.effective_scale(), p.softcap,
                out + h0 * hd, lse ? lse + h0 : nullptr);
  }
}

// Norm-wise relative error: max_i |got_i - want_i| / max_i |want_i| (0 when both are all zero,
// +inf on a NaN or on a non-zero error against an all-zero reference).
inline double relative_error(std::span<const float> got, std::span<const double> want) {
  double err = 0.0, mag = 0.0;
  const size_t n = std::min(got.size(), want.size());
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < n; ++i) {
    const double e = std::fabs(double{got[i]} - want[i]);
    if (std::isnan(e)) return std::numeric_limits<double>::infinity();
    err = std::max(err, e);
    mag = std::max(mag, std::fabs(want[i]));
  }
  if (err == 0.0) return 0.0;
  return mag > 0.0 ? err / mag : std::numeric_limits<double>::infinity();
}

}  // namespace instinfer::reference
