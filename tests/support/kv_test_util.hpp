// Shared helpers of the kv_cache tests (core, sparf, csd, the backend conformance suite): fresh
// random rows, the bytes rows become in a cache dtype, a model of what a (sequence, layer) holds,
// the float64 reference computed from what the cache actually stored (kv_cache::read_tokens),
// and the SparF synthetic workload for a cache shape.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "instinfer/kv/kv_cache.hpp"
#include "instinfer/testing/reference.hpp"
#include "instinfer/testing/sparf_synthetic.hpp"

namespace test_support {

using namespace instinfer;

// Fresh random rows [n][n_kv_heads][head_dim] in f32, normally distributed (never all zero).
inline std::vector<float> random_rows(std::mt19937& rng, uint32_t n, const kv_shape& s) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> rows(size_t{n} * s.n_kv_heads * s.head_dim);
  for (auto& x : rows) x = dist(rng);
  return rows;
}

// Fresh random queries [n_seq][n_q_heads][head_dim].
inline std::vector<float> random_queries(std::mt19937& rng, size_t n_seq, const kv_shape& s) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> q(n_seq * s.n_q_heads * s.head_dim);
  for (auto& x : q) x = dist(rng);
  return q;
}

// The cache-dtype bytes that f32 rows become when stored.
inline std::vector<std::byte> stored_bytes(const std::vector<float>& rows, dtype t) {
  std::vector<std::byte> out(dtype_row_bytes(t, rows.size()));
  REQUIRE(convert_elements(rows.data(), dtype::kF32, out.data(), t, rows.size()));
  return out;
}

// The stored K and V of one (sequence, layer) as they should read back: [n][n_kv_heads][head_dim]
// in the cache dtype.
struct layer_model {
  size_t token_bytes = 0;  // n_kv_heads rows of the cache dtype
  std::vector<std::byte> k, v;

  explicit layer_model(const kv_shape& s = {}) : token_bytes(size_t{s.n_kv_heads} * s.row_bytes()) {}
  size_t n_tokens() const { return token_bytes ? k.size() / token_bytes : 0; }
  void append(const std::vector<std::byte>& kb, const std::vector<std::byte>& vb) {
    k.insert(k.end(), kb.begin(), kb.end());
    v.insert(v.end(), vb.begin(), vb.end());
  }
  // Remove positions [begin, end) (end clamped to the length), as kv_cache::remove_range.
  void remove(size_t begin, size_t end) {
    end = std::min(end, n_tokens());
    if (begin >= end) return;
    k.erase(k.begin() + static_cast<ptrdiff_t>(begin * token_bytes),
            k.begin() + static_cast<ptrdiff_t>(end * token_bytes));
    v.erase(v.begin() + static_cast<ptrdiff_t>(begin * token_bytes),
            v.begin() + static_cast<ptrdiff_t>(end * token_bytes));
  }
};

// The cache holds exactly `k` and `v` for (seq, layer).
inline void expect_layer(kv_cache& cache, seq_id seq, uint32_t layer, const std::vector<std::byte>& k,
                         const std::vector<std::byte>& v) {
  std::vector<std::byte> got_k, got_v;
  const status st = cache.read_tokens(seq, layer, got_k, got_v);
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  REQUIRE(got_k.size() == k.size());
  REQUIRE(got_v.size() == v.size());
  // std::equal, not memcmp: an emptied layer hands back null data() pointers.
  CHECK(std::equal(got_k.begin(), got_k.end(), k.begin()));
  CHECK(std::equal(got_v.begin(), got_v.end(), v.begin()));
}
inline void expect_layer(kv_cache& cache, seq_id seq, uint32_t layer, const layer_model& m) {
  expect_layer(cache, seq, layer, m.k, m.v);
}

// The logit scale the cache uses, in double.
inline double effective_scale(const kv_cache& cache, float scale = 0.0f) {
  return scale > 0.0f ? double{scale} : 1.0 / std::sqrt(double(cache.shape().head_dim));
}

// Float64 attention of every query head of `seq` at `layer`, from the values the cache stored
// (read back with read_tokens). out: [n_q_heads][head_dim]; lse: [n_q_heads] (-inf when empty).
inline void reference_attend(kv_cache& cache, seq_id seq, uint32_t layer, const float* q, std::vector<double>& out,
                             std::vector<double>& lse, double softcap = 0.0, float scale = 0.0f) {
  const kv_shape& s = cache.shape();
  std::vector<std::byte> k, v;
  const status st = cache.read_tokens(seq, layer, k, v);
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  const size_t row = s.row_bytes();
  const size_t n = k.size() / (row * s.n_kv_heads);
  out.assign(size_t{s.n_q_heads} * s.head_dim, 0.0);
  lse.assign(s.n_q_heads, 0.0);
  std::vector<std::byte> kh(n * row), vh(n * row);
  const uint32_t g = s.group_size();
  for (uint32_t h = 0; h < s.n_kv_heads; ++h) {
    for (size_t t = 0; t < n; ++t) {
      std::memcpy(kh.data() + t * row, k.data() + (t * s.n_kv_heads + h) * row, row);
      std::memcpy(vh.data() + t * row, v.data() + (t * s.n_kv_heads + h) * row, row);
    }
    reference::attend_rows(kh.data(), vh.data(), s.kv_dtype, n, s.head_dim, q + size_t{h} * g * s.head_dim, g,
                           effective_scale(cache, scale), softcap, out.data() + size_t{h} * g * s.head_dim,
                           lse.data() + size_t{h} * g);
  }
}

// max_h |got_h - want_h| / max(1, |want_h|); +inf where one is -inf and the other is not.
inline double lse_error(std::span<const float> got, std::span<const double> want) {
  double e = 0.0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    if (std::isinf(want[i]) || std::isinf(got[i])) {
      if (!(std::isinf(want[i]) && std::isinf(got[i]) && (want[i] < 0) == (got[i] < 0)))
        return std::numeric_limits<double>::infinity();
      continue;
    }
    e = std::max(e, std::fabs(double{got[i]} - want[i]) / std::max(1.0, std::fabs(want[i])));
  }
  return e;
}

// Seeded SparF-style inputs (attention peaked on spans, outlier channels) for a cache shape:
// k, v [n][n_kv_heads][head_dim], q [n_q_heads][head_dim].
inline synthetic::attention_workload workload(const kv_shape& shape, uint32_t n, uint64_t seed) {
  synthetic::attention_workload_params wp;
  wp.n_tokens = n;
  wp.n_kv_heads = shape.n_kv_heads;
  wp.group_size = shape.group_size();
  wp.head_dim = shape.head_dim;
  wp.seed = seed;
  return synthetic::make_attention_workload(wp);
}

// Options of a SparF-enabled cache as the SparF tests use them: 4 KiB pages, one thread.
inline cache_options sparf_cache_options(const kv_shape& shape, const std::string& uri = "host",
                                         uint64_t capacity_bytes = 32ull << 20) {
  cache_options o;
  o.shape = shape;
  o.page_bytes = 4096;
  o.capacity_bytes = capacity_bytes;
  o.n_threads = 1;
  o.backend_uri = uri;
  o.sparf = true;
  return o;
}

}  // namespace test_support
