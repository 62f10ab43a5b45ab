// The model-side shape of a KV cache: how many layers and heads, how wide, which element type.
#pragma once

#include <cstdint>
#include <string>

#include "instinfer/core/dtype.hpp"
#include "instinfer/core/status.hpp"

namespace instinfer {

struct kv_shape {
  uint32_t n_layers = 0;
  uint32_t n_q_heads = 0;
  uint32_t n_kv_heads = 0;  // GQA: n_q_heads is a multiple of n_kv_heads
  uint32_t head_dim = 0;
  dtype kv_dtype = dtype::kF16;

  // Query heads that share one KV head.
  constexpr uint32_t group_size() const noexcept { return n_kv_heads ? n_q_heads / n_kv_heads : 0; }

  // Bytes of K plus V for one token of one layer.
  constexpr uint64_t token_bytes_per_layer() const noexcept { return 2ull * n_kv_heads * row_bytes(); }
  // Bytes of one token's row of one kv head (head_dim elements, or head_dim / 32 blocks).
  constexpr uint64_t row_bytes() const noexcept { return dtype_row_bytes(kv_dtype, head_dim); }

  // Head dims the kernels are instantiated for (see attention/dispatch.hpp).
  static constexpr bool is_supported_head_dim(uint32_t d) noexcept { return d == 64 || d == 128 || d == 256; }
  static constexpr uint32_t kMaxLayers = 4096;
  static constexpr uint32_t kMaxHeads = 1024;

  status validate() const {
    if (n_layers == 0 || n_layers > kMaxLayers)
      return {errc::kInvalidArgument,
              "n_layers must be in [1, " + std::to_string(kMaxLayers) + "], got " + std::to_string(n_layers)};
    if (n_q_heads == 0 || n_q_heads > kMaxHeads || n_kv_heads == 0 || n_kv_heads > kMaxHeads)
      return {errc::kInvalidArgument, "head counts must be in [1, " + std::to_string(kMaxHeads) + "], got q=" +
                                          std::to_string(n_q_heads) + " kv=" + std::to_string(n_kv_heads)};
    if (n_q_heads % n_kv_heads != 0)
      return {errc::kInvalidArgument, "n_q_heads (" + std::to_string(n_q_heads) +
                                          ") must be a multiple of n_kv_heads (" + std::to_string(n_kv_heads) + ")"};
    if (!is_valid_dtype(kv_dtype)) return {errc::kInvalidArgument, "unknown KV dtype"};
    if (!dtype_holds(kv_dtype, head_dim))
      return {errc::kInvalidArgument, "head_dim " + std::to_string(head_dim) + " is not a multiple of the " +
                                          std::string(dtype_name(kv_dtype)) + " block (32 values)"};
    if (!is_supported_head_dim(head_dim))
      return {errc::kUnsupported, "head_dim " + std::to_string(head_dim) + " is not supported (64, 128 or 256)"};
    return {};
  }
};

}  // namespace instinfer
