// SparF's reusable scratch: the selection's per-token arrays and the exact pass's staged
// pseudo-chunks. Grows to the largest (n_tokens, group) seen; after that nothing is allocated.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "instinfer/attention/decode.hpp"
#include "instinfer/attention/sparf/score.hpp"
#include "instinfer/attention/state.hpp"
#include "instinfer/core/status.hpp"

namespace instinfer {

class sparf_workspace {
 public:
  // Bytes of staged pseudo-chunks the exact pass fills per kernel call (a batch of selected rows);
  // at least two 64 KiB pages (the largest page_geometry allows), so one pseudo-chunk always fits.
  // No more: the kernel reads the rows back while they are still in L2 (Zen 3: 512 KiB).
  static constexpr size_t kStageBytes = 128 * 1024;

  status reserve(uint32_t n_tokens, uint32_t head_dim, uint32_t group_size, uint32_t column_tokens) noexcept {
    try {
      const size_t n = n_tokens, g = group_size, d = head_dim;
      grow(approx_, n * g);
      grow(rank_, n);
      grow(order_, n);
      grow(page_score_, n);
      grow(page_order_, n);
      grow(page_pick_, n);
      grow(top_scratch_, 2 * n);
      grow(column_ptrs_, (n / std::max<size_t>(column_tokens, 1) + 1) * d);
      grow(q_channels_, g * d);
      grow(column_, std::max<size_t>(d, column_tokens));
      grow(channels_, d);
      grow(weight_, d);
      grow(head_scale_, g);
      grow(alpha_, g);
      grow(stats_, g);
      grow(stats_part_, g);
      grow(o_, g * d);
      grow(o_part_, g * d);
      grow(stage_, kStageBytes / sizeof(cache_line));
      return {};
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory, "SparF workspace for " + std::to_string(n_tokens) + " tokens"};
    }
  }

  // The ISA of the kernels this workspace looks up (decode and SparF scores): the best this CPU
  // runs unless set (tests pin every ISA). Kernels already looked up are dropped.
  status set_isa(cpu_isa isa) noexcept {
    if (!cpu_isa_available(isa))
      return {errc::kUnsupported, "SparF: ISA '" + std::string(cpu_isa_name(isa)) + "' is not available"};
    isa_ = isa;
    kernel_ = nullptr;
    score_ = nullptr;
    group_score_ = nullptr;
    return {};
  }
  cpu_isa isa() const noexcept { return isa_; }

  // The SIMD approximate-score kernel for column values of `column_dtype`, looked up once.
  result<sparf_score_fn> score_kernel(dtype column_dtype) noexcept {
    if (score_ && column_dtype == score_dtype_) return score_;
    try {
      auto fn = select_sparf_score_kernel(isa_, column_dtype);
      if (!fn.ok()) return fn.error();
      score_ = fn.value();
    } catch (const std::bad_alloc&) {
      return status{errc::kOutOfMemory, "SparF: score kernel lookup"};
    }
    score_dtype_ = column_dtype;
    return score_;
  }

  // The page policy's SIMD group-score kernel (page_summary_score_args), looked up once.
  result<page_summary_score_fn> page_summary_kernel() noexcept {
    if (group_score_) return group_score_;
    try {
      auto fn = select_page_summary_score_kernel(isa_);
      if (!fn.ok()) return fn.error();
      group_score_ = fn.value();
    } catch (const std::bad_alloc&) {
      return status{errc::kOutOfMemory, "page summaries: score kernel lookup"};
    }
    return group_score_;
  }

  // The decode kernel for the exact pass's pseudo-chunks (one kv head, cfg's page geometry),
  // looked up once per (head_dim, dtype, softcap) and kept.
  result<decode_chunks_fn> kernel(const decode_params& p) noexcept {
    const bool capped = p.softcap > 0.0f;
    if (kernel_ && p.layout.page.head_dim == kernel_head_dim_ && p.layout.page.kv_dtype == kernel_dtype_ &&
        capped == kernel_softcap_)
      return kernel_;
    try {
      auto fn = select_decode_kernel(isa_, p);
      if (!fn.ok()) return fn.error();
      kernel_ = fn.value();
    } catch (const std::bad_alloc&) {
      return status{errc::kOutOfMemory, "SparF: decode kernel lookup"};
    }
    kernel_head_dim_ = p.layout.page.head_dim;
    kernel_dtype_ = p.layout.page.kv_dtype;
    kernel_softcap_ = capped;
    return kernel_;
  }

  std::byte* stage() noexcept { return reinterpret_cast<std::byte*>(stage_.data()); }

  struct alignas(64) cache_line {
    std::byte bytes[64];
  };

  // Selection (select.hpp).
  std::vector<float> approx_;                  // [group][n_tokens] approximate logits, then probabilities
  std::vector<float> rank_;                    // [n_tokens] ranking score
  std::vector<uint32_t> order_;                // token indices; the first k are the selection
  std::vector<float> page_score_;              // [n_chunks] approximate mass per token page
  std::vector<uint32_t> page_order_;           // [n_chunks]
  std::vector<uint8_t> page_pick_;             // [n_chunks] candidate page
  std::vector<uint32_t> top_scratch_;          // [2 n_tokens] rank keys of the k-th-largest search
  std::vector<const std::byte*> column_ptrs_;  // [column blocks][chosen channels] for the score kernel
  std::vector<float> q_channels_;              // [group][chosen channels] q times the temperature
  std::vector<float> column_;                  // one converted K column (or head_dim scratch)
  std::vector<uint32_t> channels_;
  std::vector<float> weight_;
  std::vector<float> head_scale_;  // [group] approximate-score temperature per query head
  std::vector<float> alpha_;       // [group] alpha when the caller keeps none
  // Exact pass (exact.hpp).
  std::vector<softmax_stats> stats_, stats_part_;  // [group]
  std::vector<float> o_, o_part_;                  // [group][head_dim] unnormalised outputs
  std::vector<cache_line> stage_;                  // kStageBytes of pseudo-chunks

 private:
  template <class T>
  static void grow(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);
  }

  cpu_isa isa_ = best_cpu_isa();
  sparf_score_fn score_ = nullptr;
  dtype score_dtype_ = dtype::kF16;
  page_summary_score_fn group_score_ = nullptr;
  decode_chunks_fn kernel_ = nullptr;
  uint32_t kernel_head_dim_ = 0;
  dtype kernel_dtype_ = dtype::kF16;
  bool kernel_softcap_ = false;
};

}  // namespace instinfer
