// The channel-indexed copy of K (the paper's second, column-wise K layout, used by SparF).
//
// Besides the token-indexed K pages (chunk_layout.hpp: rows of one token), K is stored a second
// time column-wise: a *column page* holds `channels_per_page` consecutive hidden channels of one
// (layer, kv_head) over `tokens_per_page` consecutive tokens, channel-major,
//
//   column page = [channels_per_page][tokens_per_page]       (one channel's tokens contiguous)
//   tokens_per_page = page_bytes / (channels_per_page * dtype size)
//
// so SparF reads the K values of its r chosen channels for many tokens with few page reads
// (the paper: 2-8 channels over 256-1K tokens per 4 KiB fp16 page). A *column block* is the unit
// that fills and is written at once, like a chunk on the token side: `tokens_per_page` tokens of
// one layer of one sequence, every kv head and every channel group,
//
//   column block = [n_kv_heads][head_dim / channels_per_page][column page]
//
// Blocks are append-only and written whole; the tokens of the last, partial block stay in a
// buffer (the drive's DRAM group buffer) until it fills. Storing every K value twice makes the
// stored KV 1.5x the token-indexed KV (K + V + K copy = 3 of 2).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "instinfer/core/dtype.hpp"
#include "instinfer/core/status.hpp"

namespace instinfer {

struct channel_layout {
  static constexpr uint32_t kMinPageBytes = 512;
  static constexpr uint32_t kMaxPageBytes = 64 * 1024;
  // Tokens per column page that `default_channels_per_page` aims for (the paper: 256-1K).
  static constexpr uint32_t kTargetTokensPerPage = 512;

  uint32_t page_bytes = 0;
  uint32_t head_dim = 0;
  dtype kv_dtype = dtype::kF16;
  uint32_t channels_per_page = 0;
  uint32_t tokens_per_page = 0;  // tokens of one column page (and of one column block)
  uint32_t n_kv_heads = 0;

  constexpr uint32_t elem_bytes() const noexcept { return dtype_size(kv_dtype); }
  // Column pages per (kv_head, block): channel groups of a head.
  constexpr uint32_t groups() const noexcept { return head_dim / channels_per_page; }
  constexpr uint32_t pages_per_block() const noexcept { return n_kv_heads * groups(); }
  constexpr uint64_t block_bytes() const noexcept { return uint64_t{page_bytes} * pages_per_block(); }

  constexpr uint32_t group_of(uint32_t channel) const noexcept { return channel / channels_per_page; }
  constexpr uint32_t block_of(uint64_t token) const noexcept { return static_cast<uint32_t>(token / tokens_per_page); }
  constexpr uint32_t token_in_block(uint64_t token) const noexcept {
    return static_cast<uint32_t>(token % tokens_per_page);
  }

  // Index of the page of (kv_head, channel group) inside a column block.
  constexpr uint32_t page_index(uint32_t kv_head, uint32_t group) const noexcept { return kv_head * groups() + group; }
  // Byte offset of (channel, token) inside its column page.
  constexpr uint32_t in_page_offset(uint32_t channel, uint32_t token_in_page) const noexcept {
    return ((channel % channels_per_page) * tokens_per_page + token_in_page) * elem_bytes();
  }
  // Byte offset of K[token_in_block][kv_head][channel] inside a column block.
  constexpr uint64_t offset(uint32_t kv_head, uint32_t token_in_block, uint32_t channel) const noexcept {
    return uint64_t{page_index(kv_head, group_of(channel))} * page_bytes + in_page_offset(channel, token_in_block);
  }

  // Bytes of column pages on storage for a (sequence, layer) of n tokens: sealed blocks only.
  constexpr uint64_t stored_bytes(uint64_t n_tokens) const noexcept {
    return (n_tokens / tokens_per_page) * block_bytes();
  }
  // Bytes of token-indexed K and V for the same tokens (whole values, no page rounding).
  constexpr uint64_t kv_bytes(uint64_t n_tokens) const noexcept {
    return 2ull * n_tokens * n_kv_heads * head_dim * elem_bytes();
  }
  // (K + V + column copy) / (K + V) for whole blocks: always 1.5 (the paper's 1.5x).
  static constexpr double storage_overhead() noexcept { return 1.5; }

  // Channels per page giving about kTargetTokensPerPage tokens per column page, within [1, head_dim].
  static constexpr uint32_t default_channels_per_page(uint32_t page_bytes, uint32_t head_dim, dtype t) noexcept {
    uint32_t c = 1;
    while (c < head_dim && uint64_t{page_bytes} / (uint64_t{c} * dtype_size(t)) > kTargetTokensPerPage) c *= 2;
    return c;
  }

  // Why `make` would refuse these values, or ok.
  static constexpr errc check(uint32_t page_bytes, uint32_t head_dim, dtype t, uint32_t channels_per_page,
                              uint32_t n_kv_heads) noexcept {
    if (page_bytes < kMinPageBytes || page_bytes > kMaxPageBytes || (page_bytes & (page_bytes - 1)) != 0)
      return errc::kInvalidArgument;
    if (!is_valid_dtype(t) || head_dim == 0 || n_kv_heads == 0) return errc::kInvalidArgument;
    if (channels_per_page == 0 || channels_per_page > head_dim || head_dim % channels_per_page != 0)
      return errc::kInvalidArgument;
    if ((channels_per_page & (channels_per_page - 1)) != 0) return errc::kInvalidArgument;
    if (uint64_t{channels_per_page} * dtype_size(t) > page_bytes) return errc::kInvalidArgument;
    return errc::kOk;
  }

  // Precondition: check(...) == kOk (use `make` for runtime values).
  static constexpr channel_layout unchecked(uint32_t page_bytes, uint32_t head_dim, dtype t, uint32_t channels_per_page,
                                            uint32_t n_kv_heads) noexcept {
    return channel_layout{page_bytes, head_dim, t, channels_per_page, page_bytes / (channels_per_page * dtype_size(t)),
                          n_kv_heads};
  }

  // channels_per_page == 0: default_channels_per_page.
  static result<channel_layout> make(uint32_t page_bytes, uint32_t head_dim, dtype t, uint32_t channels_per_page,
                                     uint32_t n_kv_heads) {
    if (channels_per_page == 0) channels_per_page = default_channels_per_page(page_bytes, head_dim, t);
    if (check(page_bytes, head_dim, t, channels_per_page, n_kv_heads) == errc::kOk)
      return unchecked(page_bytes, head_dim, t, channels_per_page, n_kv_heads);
    if (page_bytes < kMinPageBytes || page_bytes > kMaxPageBytes || (page_bytes & (page_bytes - 1)) != 0)
      return status{errc::kInvalidArgument,
                    "column page_bytes must be a power of two in [512, 65536], got " + std::to_string(page_bytes)};
    if (!is_valid_dtype(t) || head_dim == 0 || n_kv_heads == 0)
      return status{errc::kInvalidArgument, "column layout needs a valid dtype, head_dim >= 1 and n_kv_heads >= 1"};
    return status{errc::kInvalidArgument, "channels_per_page must be a power of two dividing head_dim " +
                                              std::to_string(head_dim) + " whose values fit one " +
                                              std::to_string(page_bytes) + "-byte page, got " +
                                              std::to_string(channels_per_page)};
  }

  // The one K->column transform, beside the layout (the host index and the drive use it):
  // tokens [first, first + n) of a column block (first + n <= tokens_per_page) from K and V rows,
  // K values into their column pages, V values added to v_sum [n_kv_heads][head_dim] in double,
  // token by token (so every copy of the index sums in the same order and agrees bit for bit).
  // Rows are strided: element ch of (token i, head h) is at k + i * token_stride + h * head_stride
  // + ch * elem_bytes() (engine rows [n][n_kv_heads][head_dim]: token_stride = n_kv_heads *
  // head_stride, head_stride = head_dim * elem_bytes(); a chunk page: the reverse).
  void transpose_rows(std::byte* block, uint32_t first, uint32_t n, const std::byte* k, const std::byte* v,
                      uint64_t token_stride, uint64_t head_stride, double* v_sum) const noexcept {
    const uint32_t es = elem_bytes();
    for (uint32_t i = 0; i < n; ++i)
      for (uint32_t h = 0; h < n_kv_heads; ++h) {
        const std::byte* krow = k + i * token_stride + h * head_stride;
        const std::byte* vrow = v + i * token_stride + h * head_stride;
        for (uint32_t ch = 0; ch < head_dim; ++ch) std::memcpy(block + offset(h, first + i, ch), krow + ch * es, es);
        double* vs = v_sum + uint64_t{h} * head_dim;
        for (uint32_t ch = 0; ch < head_dim; ++ch) vs[ch] += static_cast<double>(load_as_float(vrow, kv_dtype, ch));
      }
  }
  // Engine rows [n][n_kv_heads][head_dim] (the append path).
  void transpose_rows(std::byte* block, uint32_t first, uint32_t n, const std::byte* k, const std::byte* v,
                      double* v_sum) const noexcept {
    const uint64_t row = uint64_t{head_dim} * elem_bytes();
    transpose_rows(block, first, n, k, v, row * n_kv_heads, row, v_sum);
  }

  std::string to_string() const {
    return "channel_layout(page=" + std::to_string(page_bytes) + "B, " + std::to_string(channels_per_page) + " ch x " +
           std::to_string(tokens_per_page) + " tok, head_dim=" + std::to_string(head_dim) + ", " +
           std::string(dtype_name(kv_dtype)) + ", kv_heads=" + std::to_string(n_kv_heads) + ")";
  }
};

namespace detail {
// The paper's range: 4 KiB fp16 pages hold 2-8 channels over 1K-256 tokens.
constexpr channel_layout kPaperColumns = channel_layout::unchecked(4096, 128, dtype::kF16, 4, 40);
static_assert(kPaperColumns.tokens_per_page == 512);
static_assert(channel_layout::unchecked(4096, 128, dtype::kF16, 2, 1).tokens_per_page == 1024);
static_assert(channel_layout::unchecked(4096, 128, dtype::kF16, 8, 1).tokens_per_page == 256);
static_assert(channel_layout::default_channels_per_page(4096, 128, dtype::kF16) == 4);
static_assert(channel_layout::default_channels_per_page(16384, 128, dtype::kF16) == 16);
static_assert(channel_layout::default_channels_per_page(512, 64, dtype::kF32) == 1);
static_assert(kPaperColumns.groups() == 32 && kPaperColumns.pages_per_block() == 40 * 32);
// A column page holds as many values as a token page: one block stores K of tokens_per_page tokens once.
static_assert(kPaperColumns.block_bytes() == 512ull * 40 * 128 * 2);
static_assert(kPaperColumns.in_page_offset(5, 7) == (1 * 512 + 7) * 2);
static_assert(kPaperColumns.offset(2, 7, 5) == (2ull * 32 + 1) * 4096 + (1 * 512 + 7) * 2);
static_assert(kPaperColumns.offset(39, 511, 127) + 2 == kPaperColumns.block_bytes());
static_assert(kPaperColumns.stored_bytes(1023) == kPaperColumns.block_bytes());
static_assert(kPaperColumns.stored_bytes(1024) * 2 == kPaperColumns.kv_bytes(1024));           // copy = K = half of KV
static_assert(channel_layout::check(4096, 128, dtype::kF16, 3, 1) == errc::kInvalidArgument);  // not a power of two
static_assert(channel_layout::check(4096, 128, dtype::kF16, 256, 1) == errc::kInvalidArgument);  // > head_dim
static_assert(channel_layout::check(4096, 128, dtype::kF16, 0, 1) == errc::kInvalidArgument);
static_assert(channel_layout::check(512, 256, dtype::kF32, 256, 1) == errc::kInvalidArgument);  // 1 KiB > page
}  // namespace detail

}  // namespace instinfer
