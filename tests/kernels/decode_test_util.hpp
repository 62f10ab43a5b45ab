// Helpers for the decode kernel tests: random paged KV in chunk layout, and a check against the
// float64 reference over the same stored values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <vector>

#include "instinfer/attention/decode.hpp"
#include "instinfer/testing/reference.hpp"

namespace instinfer::test {

// Fresh randomness on every run; INSTINFER_TEST_SEED reproduces a failing one.
inline uint64_t test_seed() {
  static const uint64_t seed = [] {
    if (const char* s = std::getenv("INSTINFER_TEST_SEED")) return uint64_t{std::strtoull(s, nullptr, 0)};
    return (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
  }();
  return seed;
}

inline std::mt19937_64& rng() {
  static std::mt19937_64 g(test_seed());
  return g;
}

// Uniform in [-a, a] but never (close to) zero.
inline float nonzero_uniform(float a) {
  std::uniform_real_distribution<float> u(-a, a);
  for (;;) {
    const float x = u(rng());
    if (std::fabs(x) > 1e-3f * a) return x;
  }
}

// The chunks of one batch: every sequence gets its own chunks, placed in shuffled order in one
// pool so that neighbouring chunks of a sequence are not neighbours in memory. Rows past a
// sequence's last token hold NaN: a kernel that reads them produces NaN and fails the check.
struct paged_batch {
  decode_params params;
  std::vector<uint32_t> n_tokens;
  std::unique_ptr<std::byte[]> pool;
  std::vector<std::vector<const std::byte*>> chunks;  // per sequence
  std::vector<std::vector<float>> q;                  // per sequence [n_q_heads][head_dim]
  std::vector<std::vector<float>> out;
  std::vector<std::vector<float>> lse;
  std::vector<decode_work> work;

  paged_batch(const decode_params& p, std::span<const uint32_t> lengths, float q_amplitude = 2.0f)
      : params(p), n_tokens(lengths.begin(), lengths.end()) {
    const chunk_layout& cl = p.layout;
    const uint32_t tpp = cl.tokens();
    const uint32_t hd = cl.page.head_dim;
    std::vector<uint32_t> nc(lengths.size());
    size_t total = 0;
    for (size_t s = 0; s < lengths.size(); ++s) total += nc[s] = (lengths[s] + tpp - 1) / tpp;
    const size_t cb = cl.chunk_bytes();
    pool = std::make_unique<std::byte[]>(std::max<size_t>(total, 1) * cb + 64);
    std::vector<size_t> slots(total);
    std::iota(slots.begin(), slots.end(), size_t{0});
    std::shuffle(slots.begin(), slots.end(), rng());
    // A per-(kv head, dim) bias on V: real values have one, and it keeps the output away from the
    // cancellation of a zero-mean average.
    std::vector<float> bias(size_t{cl.n_kv_heads} * hd);
    for (float& b : bias) b = nonzero_uniform(1.0f);
    // A row of floats in the cache dtype. Quantized rows past the end get NaN block scales, so
    // that every value of theirs reads as NaN too.
    std::vector<float> kf(hd), vf(hd);
    const dtype kt = cl.page.kv_dtype;
    const auto store_row = [&](const float* x, std::byte* row) {
      if (!is_quantized(kt)) {
        for (uint32_t d = 0; d < hd; ++d) store_from_float(row, kt, d, x[d]);
      } else if (!std::isnan(x[0])) {
        if (!convert_elements(x, dtype::kF32, row, kt, hd)) std::abort();  // finite inputs always convert
      } else {
        std::memset(row, 0, cl.page.row_bytes());
        const uint16_t nan16 = 0x7e00;
        for (uint32_t b = 0; b < hd / kQuantBlock; ++b) std::memcpy(row + b * dtype_block_bytes(kt), &nan16, 2);
      }
    };
    size_t next = 0;
    chunks.resize(lengths.size());
    for (size_t s = 0; s < lengths.size(); ++s) {
      for (uint32_t c = 0; c < nc[s]; ++c) {
        std::byte* base = pool.get() + slots[next++] * cb;
        chunks[s].push_back(base);
        for (uint32_t h = 0; h < cl.n_kv_heads; ++h) {
          for (uint32_t t = 0; t < tpp; ++t) {
            const bool valid = uint64_t{c} * tpp + t < lengths[s];
            std::byte* kr = base + cl.offset(kv_kind::kKey, h, t, 0);
            std::byte* vr = base + cl.offset(kv_kind::kValue, h, t, 0);
            const float nan = std::numeric_limits<float>::quiet_NaN();
            for (uint32_t d = 0; d < hd; ++d) {
              kf[d] = valid ? nonzero_uniform(1.0f) : nan;
              vf[d] = valid ? bias[size_t{h} * hd + d] + nonzero_uniform(0.5f) : nan;
            }
            store_row(kf.data(), kr);
            store_row(vf.data(), vr);
          }
        }
      }
      q.emplace_back(size_t{p.n_q_heads()} * hd);
      for (float& x : q.back()) x = nonzero_uniform(q_amplitude);
      out.emplace_back(size_t{p.n_q_heads()} * hd, std::numeric_limits<float>::quiet_NaN());
      lse.emplace_back(p.n_q_heads(), std::numeric_limits<float>::quiet_NaN());
    }
    for (size_t s = 0; s < lengths.size(); ++s)
      work.push_back({chunks[s].data(), nc[s], lengths[s], q[s].data(), out[s].data(), lse[s].data()});
  }

  // Largest relative error of out and of lse over the batch against the float64 reference.
  struct errors {
    double out = 0.0;
    double lse = 0.0;
  };
  errors check() const {
    errors e;
    const uint32_t nq = params.n_q_heads();
    const uint32_t hd = params.layout.page.head_dim;
    for (size_t s = 0; s < work.size(); ++s) {
      std::vector<double> ref(size_t{nq} * hd), ref_lse(nq);
      reference::attend_chunks(params, chunks[s].data(), n_tokens[s], q[s].data(), ref.data(), ref_lse.data());
      e.out = std::max(e.out, reference::relative_error(out[s], ref));
      for (uint32_t h = 0; h < nq; ++h) {
        double le;
        if (n_tokens[s] == 0)
          le = lse[s][h] == -std::numeric_limits<float>::infinity() ? 0.0 : 1.0;
        else
          le = std::fabs(double{lse[s][h]} - ref_lse[h]) / std::max(1.0, std::fabs(ref_lse[h]));
        if (std::isnan(le)) le = std::numeric_limits<double>::infinity();
        e.lse = std::max(e.lse, le);
      }
    }
    return e;
  }
};

inline decode_params make_params(uint32_t head_dim, dtype t, uint32_t group, uint32_t n_kv_heads, uint32_t page_bytes,
                                 float softcap = 0.0f) {
  decode_params p;
  p.layout = chunk_layout::make(page_geometry::unchecked(page_bytes, head_dim, t), n_kv_heads);
  p.group_size = group;
  p.softcap = softcap;
  return p;
}

}  // namespace instinfer::test
