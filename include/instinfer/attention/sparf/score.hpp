// SparF's approximate scores as a SIMD kernel (steps 2 and the approximate softmax of select.hpp):
// written once over an xsimd arch tag (src/kernels/sparf_score_kernel.hpp) and compiled per ISA
// beside the decode kernels (src/kernels/sparf_<isa>.cpp); `select_sparf_score_kernel` is the
// runtime pick, with the same ISAs as select_decode_kernel.
#pragma once

#include <cstddef>
#include <cstdint>

#include "instinfer/attention/decode.hpp"
#include "instinfer/core/dtype.hpp"
#include "instinfer/core/status.hpp"

namespace instinfer {

// One GQA group's approximate scores over every token of one (sequence, layer, kv head).
struct sparf_score_args {
  // [n_blocks][n_channels]: the first value of chosen channel j's tokens in column block b
  // (a column page keeps one channel's tokens contiguous: channel_layout.hpp).
  const std::byte* const* columns = nullptr;
  uint32_t n_blocks = 0;
  uint32_t block_tokens = 0;  // tokens of a column block (the last may hold fewer)
  uint32_t n_tokens = 0;
  uint32_t n_channels = 0;
  uint32_t group_size = 1;
  // [group_size][n_channels]: the query heads' values at the chosen channels, each already
  // multiplied by its head's approximate temperature.
  const float* q = nullptr;
  float softcap = 0.0f;    // <= 0: off
  float* probs = nullptr;  // out, [group_size][n_tokens]: approximate softmax probabilities
  float* rank = nullptr;   // out, [n_tokens]: the logits (group_size 1) or the summed probabilities
};

using sparf_score_fn = void (*)(const sparf_score_args& args) noexcept;

// The kernel for column values of dtype `column_dtype` (f32, f16 or bf16) on `isa`; kUnsupported
// when the ISA is not built in or not available on this CPU.
result<sparf_score_fn> select_sparf_score_kernel(cpu_isa isa, dtype column_dtype);

// The page policy's group scores (page_summary.hpp's bound) as a SIMD kernel, compiled per ISA
// beside SparF's. A group's summary block holds every kv head ([n_kv_heads][2][head_dim]: min
// row, max row), so the kernel walks groups in order and scores all asked heads of each block
// while it is in cache: one sequential sweep, where a loop per head strided across the blocks.
struct page_summary_score_args {
  const float* const* groups = nullptr;  // [n_groups] summary blocks
  uint32_t n_groups = 0;
  uint32_t group_begin = 0, group_end = 0;  // the groups scored, [group_begin, group_end)
  uint32_t kv_begin = 0, n_kv = 0;          // the kv heads scored
  uint32_t head_dim = 0;
  uint32_t group_size = 1;
  const float* q = nullptr;  // [n_kv_heads][group_size][head_dim], kv head 0 first
  float* scores = nullptr;   // out, [n_kv_heads][n_groups]: page_summary_score of (group, kv head)
};

using page_summary_score_fn = void (*)(const page_summary_score_args& args) noexcept;

// The kernel on `isa`; kUnsupported when the ISA is not built in or not available on this CPU.
result<page_summary_score_fn> select_page_summary_score_kernel(cpu_isa isa);

}  // namespace instinfer
