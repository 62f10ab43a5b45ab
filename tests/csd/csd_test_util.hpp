// Helpers for the CSD tests: random KV in a cache dtype, and a float64 model of what each
// (sequence, layer) holds, so attention results are checked against the reference.
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "instinfer/core/dtype.hpp"
#include "instinfer/testing/reference.hpp"

namespace csd_test {

using namespace instinfer;

// Fresh random rows [n][heads][dim] stored as `t` (never all zero).
inline std::vector<std::byte> random_rows(std::mt19937& rng, uint64_t n, uint32_t heads, uint32_t dim, dtype t) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> f(n * heads * dim);
  for (auto& x : f) x = dist(rng);
  std::vector<std::byte> out(f.size() * dtype_size(t));
  convert_elements(f.data(), dtype::kF32, out.data(), t, f.size());
  return out;
}

inline std::vector<float> random_q(std::mt19937& rng, uint64_t n) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> q(n);
  for (auto& x : q) x = dist(rng);
  return q;
}

// The stored tokens of one (sequence, layer): [n][heads][dim] in the cache dtype.
struct kv_model {
  uint32_t heads = 0;
  uint32_t dim = 0;
  dtype t = dtype::kF16;
  std::vector<std::byte> k, v;

  uint64_t row() const { return uint64_t{dim} * dtype_size(t); }
  uint64_t n_tokens() const { return k.size() / (row() * heads); }
  void append(const std::byte* kk, const std::byte* vv, uint64_t n) {
    k.insert(k.end(), kk, kk + n * heads * row());
    v.insert(v.end(), vv, vv + n * heads * row());
  }
  void truncate(uint64_t n) {
    k.resize(n * heads * row());
    v.resize(n * heads * row());
  }
  // Reference attention over the first n tokens: out [heads*g][dim], lse [heads*g].
  void attend(const float* q, uint32_t g, uint64_t n, double scale, std::vector<double>& out,
              std::vector<double>& lse) const {
    out.assign(uint64_t{heads} * g * dim, 0.0);
    lse.assign(uint64_t{heads} * g, 0.0);
    std::vector<std::byte> kh(n * row()), vh(n * row());
    for (uint32_t h = 0; h < heads; ++h) {
      for (uint64_t i = 0; i < n; ++i) {
        std::copy_n(k.data() + (i * heads + h) * row(), row(), kh.data() + i * row());
        std::copy_n(v.data() + (i * heads + h) * row(), row(), vh.data() + i * row());
      }
      reference::attend_rows(kh.data(), vh.data(), t, n, dim, q + uint64_t{h} * g * dim, g, scale, 0.0,
                             out.data() + uint64_t{h} * g * dim, lse.data() + uint64_t{h} * g);
    }
  }
};

inline double lse_error(std::span<const float> got, std::span<const double> want) {
  double e = 0.0;
  for (size_t i = 0; i < got.size(); ++i)
    e = std::max(e, std::fabs(double{got[i]} - want[i]) / std::max(1.0, std::fabs(want[i])));
  return e;
}

}  // namespace csd_test
