// Shared by the persistent-store tests (test_ssd_persist, test_ssd_crash): a small cache shape,
// token rows derived from a token uid (so an expected sequence is just its list of uids), and a
// check of a reopened sequence against that list.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <unordered_set>
#include <vector>

#include "instinfer/core/dtype.hpp"
#include "instinfer/kv/kv_cache.hpp"

namespace persist_test {

using namespace instinfer;

constexpr uint32_t kLayers = 2, kQHeads = 4, kKvHeads = 2, kDim = 64;
constexpr uint32_t kPageBytes = 4096;                          // f16 rows of 128 B: 32 tokens a chunk
constexpr uint32_t kTokensPerChunk = kPageBytes / (kDim * 2);  // 32
constexpr uint64_t kChunkBytes = 2ull * kKvHeads * kPageBytes;

inline cache_options options(const std::string& uri, uint64_t capacity_bytes = 4ull << 20) {
  cache_options o;
  o.shape = kv_shape{kLayers, kQHeads, kKvHeads, kDim, dtype::kF16};
  o.page_bytes = kPageBytes;
  o.capacity_bytes = capacity_bytes;
  o.n_threads = 1;
  o.backend_uri = uri;
  return o;
}

inline std::string persist_uri(const std::string& path) {
  return "ssd:" + path + "?persist=1&queue_depth=8&staging=256K&request=64K";
}

// Element (kv_head h, dim d) of K (kind 0) or V (kind 1) of token `uid` in `layer`: m / 1024
// with |m| < 1024, exact in f16, different for nearby uids, layers, heads and dims.
inline float token_value(uint32_t uid, uint32_t layer, uint32_t kind, uint32_t h, uint32_t d) {
  const uint32_t x = uid * 2654435761u ^ (layer * 97u + kind * 389u + h * 1543u + d * 7919u);
  const uint32_t m = (x ^ (x >> 15)) % 2047u;
  return (static_cast<float>(m) - 1023.0f) / 1024.0f;
}

// K and V rows [n][kKvHeads][kDim] (f32) of tokens uids[0..n) in `layer`.
inline void token_rows(const uint32_t* uids, uint32_t n, uint32_t layer, std::vector<float>& k, std::vector<float>& v) {
  k.resize(size_t{n} * kKvHeads * kDim);
  v.resize(k.size());
  for (uint32_t t = 0; t < n; ++t)
    for (uint32_t h = 0; h < kKvHeads; ++h)
      for (uint32_t d = 0; d < kDim; ++d) {
        const size_t i = (size_t{t} * kKvHeads + h) * kDim + d;
        k[i] = token_value(uids[t], layer, 0, h, d);
        v[i] = token_value(uids[t], layer, 1, h, d);
      }
}

// Per layer, the uids of a sequence's tokens.
using token_list = std::vector<std::vector<uint32_t>>;

inline status append_uids(kv_cache& cache, seq_id seq, uint32_t layer, const std::vector<uint32_t>& uids) {
  std::vector<float> k, v;
  token_rows(uids.data(), static_cast<uint32_t>(uids.size()), layer, k, v);
  return cache.append(seq, layer, static_cast<uint32_t>(uids.size()), k.data(), v.data(), dtype::kF32);
}

// ok when seq holds exactly `want`; kCorruptData (or another read error) passed through; a
// mismatch (a torn or foreign token served) is kInternal with the first difference.
inline status check_tokens(kv_cache& cache, seq_id seq, const token_list& want) {
  std::vector<std::byte> kb, vb;
  std::vector<float> kf, vf, ke, ve;
  for (uint32_t l = 0; l < kLayers; ++l) {
    auto len = cache.length(seq, l);
    if (!len.ok()) return len.error();
    if (len.value() != want[l].size())
      return {errc::kInternal, "layer " + std::to_string(l) + " holds " + std::to_string(len.value()) +
                                   " tokens, expected " + std::to_string(want[l].size())};
    INSTINFER_TRY(cache.read_tokens(seq, l, kb, vb));
    const size_t n = want[l].size() * kKvHeads * kDim;
    kf.resize(n);
    vf.resize(n);
    convert_elements(kb.data(), dtype::kF16, kf.data(), dtype::kF32, n);
    convert_elements(vb.data(), dtype::kF16, vf.data(), dtype::kF32, n);
    token_rows(want[l].data(), static_cast<uint32_t>(want[l].size()), l, ke, ve);
    for (size_t i = 0; i < n; ++i)
      if (kf[i] != ke[i] || vf[i] != ve[i])
        return {errc::kInternal, "layer " + std::to_string(l) + " token " + std::to_string(i / (kKvHeads * kDim)) +
                                     " differs from what was flushed"};
  }
  return {};
}

// Distinct chunks the cache's page tables reference (every layer of every sequence given).
inline uint64_t referenced_chunks(kv_cache& cache, const std::vector<seq_id>& seqs) {
  std::unordered_set<chunk_id> ids;
  csr_page_table t;
  for (uint32_t l = 0; l < kLayers; ++l) {
    if (!cache.page_table(l, seqs, t).ok()) return UINT64_MAX;
    ids.insert(t.indices.begin(), t.indices.end());
  }
  return ids.size();
}

}  // namespace persist_test
