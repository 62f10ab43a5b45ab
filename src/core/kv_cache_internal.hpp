// What kv_cache's units (src/core/kv_cache*.cpp) share. Private to src/core.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "instinfer/kv/kv_cache.hpp"

namespace instinfer::kv_cache_detail {

inline constexpr uint32_t kMaxTokensPerLayer = 1u << 30;  // keeps every token index far from overflow

inline uint32_t ceil_div(uint64_t a, uint64_t b) {
  return static_cast<uint32_t>((a + b - 1) / b);
}

inline std::string seq_name(seq_id seq) {
  return "sequence " + std::to_string(seq);
}

inline bool overlaps(const void* a, size_t a_bytes, const void* b, size_t b_bytes) noexcept {
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + b_bytes && y < x + a_bytes;
}

}  // namespace instinfer::kv_cache_detail
