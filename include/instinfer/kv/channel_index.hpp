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
#include <cstring>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "instinfer/core/dtype.hpp"
#include "instinfer/core/huge_region.hpp"
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
  // A deep copy (fork): its own column memory holding the resident blocks. Throws bad_alloc.
  channel_index(const channel_index& o)
      : layout_(o.layout_),
        n_tokens_(o.n_tokens_),
        n_blocks_(o.n_blocks_),
        resident_(o.resident_),
        block_sum_(o.block_sum_),
        sealed_sum_(o.sealed_sum_),
        v_mean_(o.v_mean_) {
    if (n_blocks_ == 0) return;  // also a default (layout-less) index: block_bytes() needs a layout
    const uint64_t bb = layout_.block_bytes();
    if (!memory_.reserve(n_blocks_ * bb)) throw std::bad_alloc();
    for (uint32_t b = 0; b < n_blocks_; ++b)
      if (resident_[b]) std::memcpy(memory_.data() + b * bb, o.memory_.data() + b * bb, bb);
    rebuild_pointers();
  }
  channel_index& operator=(const channel_index& o) {
    if (this != &o) {
      channel_index tmp(o);
      *this = std::move(tmp);
    }
    return *this;
  }
  // A moved-from index is empty (no blocks, no tokens), as its vectors are.
  channel_index(channel_index&& o) noexcept
      : layout_(o.layout_),
        n_tokens_(std::exchange(o.n_tokens_, 0)),
        n_blocks_(std::exchange(o.n_blocks_, 0)),
        memory_(std::move(o.memory_)),
        resident_(std::move(o.resident_)),
        block_sum_(std::move(o.block_sum_)),
        pointers_(std::move(o.pointers_)),
        sealed_sum_(std::move(o.sealed_sum_)),
        v_mean_(std::move(o.v_mean_)) {}
  channel_index& operator=(channel_index&& o) noexcept {
    if (this != &o) {
      layout_ = o.layout_;
      n_tokens_ = std::exchange(o.n_tokens_, 0);
      n_blocks_ = std::exchange(o.n_blocks_, 0);
      memory_ = std::move(o.memory_);
      resident_ = std::move(o.resident_);
      block_sum_ = std::move(o.block_sum_);
      pointers_ = std::move(o.pointers_);
      sealed_sum_ = std::move(o.sealed_sum_);
      v_mean_ = std::move(o.v_mean_);
    }
    return *this;
  }

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
  uint32_t n_blocks() const noexcept { return n_blocks_; }
  // Blocks that are full (written to storage); the rest (0 or 1) is the tail buffer.
  uint32_t sealed_blocks() const noexcept { return tp() ? n_tokens_ / tp() : 0; }
  const std::byte* block(uint32_t b) const noexcept { return pointers_[b]; }
  // Storage backends keep sealed blocks on the device: the host copy of block b (sealed) can be
  // dropped; its V sums stay. block(b) / block_pointers() are then null for it.
  void drop_block_memory(uint32_t b) noexcept {
    if (b >= sealed_blocks() || !resident_[b]) return;
    memory_.discard(uint64_t{b} * layout_.block_bytes(), layout_.block_bytes());
    resident_[b] = 0;
    pointers_[b] = nullptr;
  }
  bool block_resident(uint32_t b) const noexcept { return b < n_blocks_ && resident_[b]; }
  // Column bytes held in this process (resident sealed blocks and the tail buffer).
  uint64_t resident_bytes() const noexcept {
    uint64_t blocks = 0;
    for (uint32_t b = 0; b < n_blocks_; ++b) blocks += resident_[b];
    return blocks ? blocks * layout_.block_bytes() : 0;
  }
  // n_blocks() pointers, for sparf_work::column_blocks; valid until the next append or truncate.
  const std::byte* const* block_pointers() const noexcept { return pointers_.data(); }
  // [n_kv_heads][head_dim] mean of the stored V rows (zeros when empty).
  const float* v_mean() const noexcept { return v_mean_.data(); }
  // Column bytes on storage (sealed blocks) and in the tail buffer.
  uint64_t stored_bytes() const noexcept {
    return sealed_blocks() ? uint64_t{sealed_blocks()} * layout_.block_bytes() : 0;
  }
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
      L.transpose_rows(block_memory(b), tok % tp(), m, k + i * row_stride, v + i * row_stride, block_sum_[b].data());
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
    if (partial > 0 && !block_resident(static_cast<uint32_t>(keep - 1))) {  // memory still reserved
      std::memset(block_memory(static_cast<uint32_t>(keep - 1)), 0, layout_.block_bytes());
      resident_[keep - 1] = 1;
      pointers_[keep - 1] = block_memory(static_cast<uint32_t>(keep - 1));
    }
    // The removed blocks' memory goes back to the system; the address space stays for regrowth.
    memory_.discard(keep * layout_.block_bytes(), (n_blocks_ - keep) * layout_.block_bytes());
    n_blocks_ = static_cast<uint32_t>(keep);
    resident_.resize(keep);
    block_sum_.resize(keep);
    pointers_.resize(keep);
    if (partial > 0) {  // the new tail block: K columns rewritten when given, V summed afresh
      std::vector<double>& bs = block_sum_[keep - 1];
      std::fill(bs.begin(), bs.end(), 0.0);
      const uint64_t row = layout_.row_bytes();
      if (k_tail != nullptr) {
        layout_.transpose_rows(block_memory(static_cast<uint32_t>(keep - 1)), 0, partial, k_tail, v_tail,
                               row * layout_.n_kv_heads, row, bs.data());
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

  std::byte* block_memory(uint32_t b) noexcept { return memory_.data() + uint64_t{b} * layout_.block_bytes(); }

  // Blocks [n_blocks_, need) become live, zeroed (their memory may hold a truncated block's).
  status grow(size_t need) noexcept {
    if (need <= n_blocks_) return {};
    const size_t had = n_blocks_;
    const uint64_t bb = layout_.block_bytes();
    try {
      resident_.reserve(need);
      block_sum_.reserve(need);
      pointers_.reserve(need);
      if (!memory_.reserve(need * bb)) throw std::bad_alloc();
      while (resident_.size() < need) {
        block_sum_.emplace_back(sealed_sum_.size(), 0.0);
        resident_.push_back(1);
      }
    } catch (const std::bad_alloc&) {
      resident_.resize(had);
      block_sum_.resize(had);
      rebuild_pointers();  // the region may have moved before the failure
      return {errc::kOutOfMemory, "channel_index: column blocks for " + std::to_string(need) + " blocks"};
    }
    std::memset(memory_.data() + had * bb, 0, (need - had) * bb);
    n_blocks_ = static_cast<uint32_t>(need);
    rebuild_pointers();  // the region may have moved; reserved above, so this cannot throw
    return {};
  }

  void update_mean() noexcept {
    const double inv = n_tokens_ ? 1.0 / static_cast<double>(n_tokens_) : 0.0;
    const bool tail = n_tokens_ % tp() != 0;
    for (size_t x = 0; x < sealed_sum_.size(); ++x)
      v_mean_[x] = static_cast<float>((sealed_sum_[x] + (tail ? block_sum_.back()[x] : 0.0)) * inv);
  }

  void rebuild_pointers() {
    pointers_.resize(n_blocks_);
    for (uint32_t b = 0; b < n_blocks_; ++b) pointers_[b] = resident_[b] ? block_memory(b) : nullptr;
  }

  channel_layout layout_{};
  uint32_t n_tokens_ = 0;
  uint32_t n_blocks_ = 0;
  huge_region memory_;                          // block b at b * block_bytes; huge pages for the score kernel's reads
  std::vector<uint8_t> resident_;               // per block: its memory holds its columns (not dropped)
  std::vector<std::vector<double>> block_sum_;  // per block: [n_kv_heads][head_dim] sum of V
  std::vector<const std::byte*> pointers_;
  std::vector<double> sealed_sum_;  // sum of the sealed blocks' sums, in block order
  std::vector<float> v_mean_;
};

}  // namespace instinfer
