// The channel-indexed copy of K and the running mean of V for one (sequence, layer): the storage
// SparF's selection reads (attention/sparf/select.hpp), kept beside the token-indexed chunks by
// whoever stores them (src/sparf's attender on the host; the drive keeps its own in flash).
//
// Tokens arrive in order (append); whole column blocks (layout/channel_layout.hpp) are sealed as
// they fill (a storage tier writes them then), the last partial block is the tail buffer. Rows
// become columns through channel_layout::transpose_rows, the one transform every copy uses. V is
// summed in double per block in token order, and the mean is the sealed blocks' sums (added in
// block order) plus the tail's over the token count: it does not depend on how the tokens were
// batched, nor on truncations and re-appends in between.
// Fork: copy the index (sealed blocks are immutable, so a storage tier may share them).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "instinfer/core/dtype.hpp"
#include "instinfer/core/status.hpp"
#include "instinfer/layout/channel_layout.hpp"

namespace instinfer {

class channel_index {
 public:
  channel_index() = default;
  explicit channel_index(const channel_layout& layout)
      : layout_(layout),
        sealed_sum_(size_t{layout.n_kv_heads} * layout.head_dim, 0.0),
        v_mean_(sealed_sum_.size(), 0.0f) {}
  channel_index(const channel_index& o)
      : layout_(o.layout_),
        n_tokens_(o.n_tokens_),
        blocks_(o.blocks_),
        block_sum_(o.block_sum_),
        sealed_sum_(o.sealed_sum_),
        v_mean_(o.v_mean_) {
    rebuild_pointers();
  }
  channel_index& operator=(const channel_index& o) {
    if (this != &o) {
      channel_index tmp(o);
      *this = std::move(tmp);
    }
    return *this;
  }
  channel_index(channel_index&&) noexcept = default;
  channel_index& operator=(channel_index&&) noexcept = default;

  static result<channel_index> create(const channel_layout& layout) {
    if (channel_layout::check(layout.page_bytes, layout.head_dim, layout.kv_dtype, layout.channels_per_page,
                              layout.n_kv_heads) != errc::kOk ||
        layout.tokens_per_page != layout.page_bytes / (layout.channels_per_page * layout.elem_bytes()))
      return status{errc::kInvalidArgument, "channel_index: invalid column layout (use channel_layout::make)"};
    try {
      return channel_index(layout);
    } catch (const std::bad_alloc&) {
      return status{errc::kOutOfMemory, "channel_index"};
    }
  }

  const channel_layout& layout() const noexcept { return layout_; }
  uint32_t n_tokens() const noexcept { return n_tokens_; }
  uint32_t n_blocks() const noexcept { return static_cast<uint32_t>(blocks_.size()); }
  // Blocks that are full (written to storage); the rest (0 or 1) is the tail buffer.
  uint32_t sealed_blocks() const noexcept { return tp() ? n_tokens_ / tp() : 0; }
  const std::byte* block(uint32_t b) const noexcept { return blocks_[b].data(); }
  // Storage backends keep sealed blocks on the device: the host copy of block b (sealed) can be
  // dropped; its V sums stay. block(b) / block_pointers() are then null for it.
  void drop_block_memory(uint32_t b) noexcept {
    if (b >= sealed_blocks()) return;
    std::vector<std::byte>().swap(blocks_[b]);
    pointers_[b] = nullptr;
  }
  bool block_resident(uint32_t b) const noexcept { return b < blocks_.size() && !blocks_[b].empty(); }
  // Column bytes held in this process (resident sealed blocks and the tail buffer).
  uint64_t resident_bytes() const noexcept {
    uint64_t bytes = 0;
    for (const auto& blk : blocks_) bytes += blk.size();
    return bytes;
  }
  // n_blocks() pointers, for sparf_work::column_blocks; valid until the next append or truncate.
  const std::byte* const* block_pointers() const noexcept { return pointers_.data(); }
  // [n_kv_heads][head_dim] mean of the stored V rows (zeros when empty).
  const float* v_mean() const noexcept { return v_mean_.data(); }
  // Column bytes on storage (sealed blocks) and in the tail buffer.
  uint64_t stored_bytes() const noexcept { return uint64_t{sealed_blocks()} * layout_.block_bytes(); }
  uint64_t buffered_bytes() const noexcept {
    return tp() ? uint64_t{n_tokens_ % tp()} * layout_.n_kv_heads * layout_.head_dim * layout_.elem_bytes() : 0;
  }

  // Append n tokens. k, v: [n][n_kv_heads][head_dim] in the layout dtype (as stored in the chunks).
  // On failure the index is unchanged. Returns through `sealed` (optional) how many blocks this
  // call sealed, so a storage backend can write them.
  status append(uint32_t n, const std::byte* k, const std::byte* v, uint32_t* sealed = nullptr) noexcept {
    if (sealed) *sealed = 0;
    if (n == 0) return {};
    if (tp() == 0) return {errc::kInvalidArgument, "channel_index::append: index has no layout"};
    if (k == nullptr || v == nullptr) return {errc::kInvalidArgument, "channel_index::append: null K or V rows"};
    if (uint64_t{n_tokens_} + n > UINT32_MAX) return {errc::kInvalidArgument, "channel_index: too many tokens"};
    const channel_layout& L = layout_;
    const uint32_t end = n_tokens_ + n;
    INSTINFER_TRY(grow((size_t{end} + tp() - 1) / tp()));
    const uint64_t row_stride = uint64_t{L.n_kv_heads} * L.row_bytes();
    for (uint32_t i = 0; i < n;) {  // block by block
      const uint32_t tok = n_tokens_ + i;
      const uint32_t b = tok / tp();
      const uint32_t m = std::min(n - i, tp() - tok % tp());
      L.transpose_rows(blocks_[b].data(), tok % tp(), m, k + i * row_stride, v + i * row_stride, block_sum_[b].data());
      if ((tok + m) % tp() == 0)  // block b sealed: fold its sum into the sealed prefix
        for (size_t x = 0; x < sealed_sum_.size(); ++x) sealed_sum_[x] += block_sum_[b][x];
      i += m;
    }
    if (sealed) *sealed = end / tp() - n_tokens_ / tp();
    n_tokens_ = end;
    update_mean();
    return {};
  }

  // Keep the first n tokens (remove_range to the end). v_tail: the stored V rows of the tokens of
  // the new partial block, [n % tokens_per_page][n_kv_heads][head_dim] in the layout dtype (the
  // caller reads them from its chunks); null when n is a multiple of tokens_per_page. A block that
  // was sealed and becomes partial again is the tail buffer again: its columns are rewritten from
  // k_tail (same shape as v_tail) when given, which they must be if the block's memory was dropped.
  status truncate(uint32_t n, const std::byte* v_tail, const std::byte* k_tail = nullptr) noexcept {
    if (n > n_tokens_)
      return {errc::kInvalidArgument,
              "channel_index::truncate: " + std::to_string(n) + " > " + std::to_string(n_tokens_) + " tokens"};
    if (n == n_tokens_) return {};
    const uint32_t partial = n % tp();
    if (partial > 0 && v_tail == nullptr)
      return {errc::kInvalidArgument, "channel_index::truncate: the V rows of the new tail block are needed"};
    const size_t keep = (size_t{n} + tp() - 1) / tp();
    if (partial > 0 && k_tail == nullptr && !block_resident(static_cast<uint32_t>(keep - 1)))
      return {errc::kInvalidArgument, "channel_index::truncate: the new tail block was dropped; its K rows are needed"};
    if (partial > 0 && !block_resident(static_cast<uint32_t>(keep - 1))) {
      try {
        blocks_[keep - 1].assign(layout_.block_bytes(), std::byte{0});
      } catch (const std::bad_alloc&) {
        return {errc::kOutOfMemory, "channel_index::truncate: tail block"};
      }
      pointers_[keep - 1] = blocks_[keep - 1].data();
    }
    blocks_.resize(keep);
    block_sum_.resize(keep);
    pointers_.resize(keep);
    if (partial > 0) {  // the new tail block: K columns rewritten when given, V summed afresh
      std::vector<double>& bs = block_sum_[keep - 1];
      std::fill(bs.begin(), bs.end(), 0.0);
      const uint64_t row = layout_.row_bytes();
      if (k_tail != nullptr) {
        layout_.transpose_rows(blocks_[keep - 1].data(), 0, partial, k_tail, v_tail, row * layout_.n_kv_heads, row,
                               bs.data());
      } else {  // the resident columns are still right: sum V only
        const uint32_t H = layout_.n_kv_heads, d = layout_.head_dim;
        for (uint32_t i = 0; i < partial; ++i)
          for (uint32_t h = 0; h < H; ++h)
            for (uint32_t ch = 0; ch < d; ++ch)
              bs[size_t{h} * d + ch] +=
                  static_cast<double>(load_as_float(v_tail + (size_t{i} * H + h) * row, layout_.kv_dtype, ch));
      }
    }
    std::fill(sealed_sum_.begin(), sealed_sum_.end(), 0.0);
    for (uint32_t b = 0; b < n / tp(); ++b)
      for (size_t x = 0; x < sealed_sum_.size(); ++x) sealed_sum_[x] += block_sum_[b][x];
    n_tokens_ = n;
    update_mean();
    return {};
  }

 private:
  uint32_t tp() const noexcept { return layout_.tokens_per_page; }

  status grow(size_t need) noexcept {
    const size_t had = blocks_.size();
    try {
      blocks_.reserve(need);
      block_sum_.reserve(need);
      pointers_.reserve(need);
      while (blocks_.size() < need) {
        blocks_.emplace_back(layout_.block_bytes());
        block_sum_.emplace_back(sealed_sum_.size(), 0.0);
        pointers_.push_back(blocks_.back().data());
      }
      return {};
    } catch (const std::bad_alloc&) {
      blocks_.resize(had);
      block_sum_.resize(had);
      pointers_.resize(had);
      return {errc::kOutOfMemory, "channel_index: column blocks for " + std::to_string(need) + " blocks"};
    }
  }

  void update_mean() noexcept {
    const double inv = n_tokens_ ? 1.0 / static_cast<double>(n_tokens_) : 0.0;
    const bool tail = n_tokens_ % tp() != 0;
    for (size_t x = 0; x < sealed_sum_.size(); ++x)
      v_mean_[x] = static_cast<float>((sealed_sum_[x] + (tail ? block_sum_.back()[x] : 0.0)) * inv);
  }

  void rebuild_pointers() {
    pointers_.clear();
    for (const auto& b : blocks_) pointers_.push_back(b.empty() ? nullptr : b.data());
  }

  channel_layout layout_{};
  uint32_t n_tokens_ = 0;
  std::vector<std::vector<std::byte>> blocks_;
  std::vector<std::vector<double>> block_sum_;  // per block: [n_kv_heads][head_dim] sum of V
  std::vector<const std::byte*> pointers_;
  std::vector<double> sealed_sum_;  // sum of the sealed blocks' sums, in block order
  std::vector<float> v_mean_;
};

}  // namespace instinfer
