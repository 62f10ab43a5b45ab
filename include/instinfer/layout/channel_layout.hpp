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
//
// Quantized caches (q8_0, q4_0): a column page holds one value per (channel, token), and a
// quantized value has no bytes of its own (its scale covers 32 channels of the row), so the column
// copy stores f16 of the dequantized K values (`column_dtype`). f16 rounds them by at most 2^-11
// relative, far below the quantization error itself (about 2^-8 of a block's amax for q8_0, 2^-4
// for q4_0), and only the approximate scores that choose tokens read the columns: the exact pass
// reads the quantized rows. f32 columns would be exact but double the column reads that SparF
// exists to save; a quantized column (32 tokens of one channel per block) would need its own
// scales and formats. The copy is then larger than the quantized K (2 bytes a value against 1.0625
// for q8_0, 0.5625 for q4_0): K + V + copy is 1 + 2 / (2 x 1.0625) = 1.94x the quantized K + V for
// q8_0 and 1 + 2 / (2 x 0.5625) = 2.78x for q4_0, instead of the dense types' 1.5x.
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
  dtype kv_dtype = dtype::kF16;  // the cache's (token rows') dtype
  uint32_t channels_per_page = 0;
  uint32_t tokens_per_page = 0;  // tokens of one column page (and of one column block)
  uint32_t n_kv_heads = 0;

  // The dtype of the column values: the cache dtype, or f16 for a quantized cache.
  static constexpr dtype column_dtype(dtype kv) noexcept { return is_quantized(kv) ? dtype::kF16 : kv; }
  constexpr dtype column_dtype() const noexcept { return column_dtype(kv_dtype); }
  // Bytes of one column value, and of one token row of one head in the cache dtype.
  constexpr uint32_t elem_bytes() const noexcept { return dtype_size(column_dtype()); }
  constexpr uint32_t row_bytes() const noexcept { return static_cast<uint32_t>(dtype_row_bytes(kv_dtype, head_dim)); }
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
  // Bytes of token-indexed K and V for the same tokens (whole rows, no page rounding).
  constexpr uint64_t kv_bytes(uint64_t n_tokens) const noexcept { return 2ull * n_tokens * n_kv_heads * row_bytes(); }
  // (K + V + column copy) / (K + V) for whole blocks: 1.5 (the paper's 1.5x) for the dense types.
  static constexpr double storage_overhead() noexcept { return 1.5; }

  // Channels per page giving about kTargetTokensPerPage tokens per column page, within [1, head_dim].
  static constexpr uint32_t default_channels_per_page(uint32_t page_bytes, uint32_t head_dim, dtype t) noexcept {
    uint32_t c = 1;
    const uint32_t es = dtype_size(column_dtype(t));
    while (c < head_dim && uint64_t{page_bytes} / (uint64_t{c} * es) > kTargetTokensPerPage) c *= 2;
    return c;
  }

  // Why `make` would refuse these values, or ok.
  static constexpr errc check(uint32_t page_bytes, uint32_t head_dim, dtype t, uint32_t channels_per_page,
                              uint32_t n_kv_heads) noexcept {
    if (page_bytes < kMinPageBytes || page_bytes > kMaxPageBytes || (page_bytes & (page_bytes - 1)) != 0)
      return errc::kInvalidArgument;
    if (!is_valid_dtype(t) || head_dim == 0 || n_kv_heads == 0 || !dtype_holds(t, head_dim))
      return errc::kInvalidArgument;
    if (channels_per_page == 0 || channels_per_page > head_dim || head_dim % channels_per_page != 0)
      return errc::kInvalidArgument;
    if ((channels_per_page & (channels_per_page - 1)) != 0) return errc::kInvalidArgument;
    if (uint64_t{channels_per_page} * dtype_size(column_dtype(t)) > page_bytes) return errc::kInvalidArgument;
    return errc::kOk;
  }

  // Precondition: check(...) == kOk (use `make` for runtime values).
  static constexpr channel_layout unchecked(uint32_t page_bytes, uint32_t head_dim, dtype t, uint32_t channels_per_page,
                                            uint32_t n_kv_heads) noexcept {
    return channel_layout{
        page_bytes, head_dim, t, channels_per_page, page_bytes / (channels_per_page * dtype_size(column_dtype(t))),
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
    if (!is_valid_dtype(t) || head_dim == 0 || n_kv_heads == 0 || !dtype_holds(t, head_dim))
      return status{errc::kInvalidArgument,
                    "column layout needs a valid dtype, head_dim >= 1 (whole blocks of a quantized dtype) and "
                    "n_kv_heads >= 1"};
    return status{errc::kInvalidArgument, "channels_per_page must be a power of two dividing head_dim " +
                                              std::to_string(head_dim) + " whose values fit one " +
                                              std::to_string(page_bytes) + "-byte page, got " +
                                              std::to_string(channels_per_page)};
  }

  // The one K->column transform, beside the layout (the host index and the drive use it):
  // tokens [first, first + n) of a column block (first + n <= tokens_per_page) from K and V rows,
  // K values into their column pages, V values added to v_sum [n_kv_heads][head_dim] in double,
  // token by token (so every copy of the index sums in the same order and agrees bit for bit).
  // Rows are strided: the row of (token i, head h) starts at k + i * token_stride + h * head_stride
  // (engine rows [n][n_kv_heads][head_dim]: token_stride = n_kv_heads * head_stride, head_stride
  // = row_bytes(); a chunk page: the reverse). A quantized K row is dequantized to f16 columns.
  void transpose_rows(std::byte* block, uint32_t first, uint32_t n, const std::byte* k, const std::byte* v,
                      uint64_t token_stride, uint64_t head_stride, double* v_sum) const noexcept {
    const uint32_t es = elem_bytes();
    for (uint32_t i = 0; i < n; ++i)
      for (uint32_t h = 0; h < n_kv_heads; ++h) {
        const std::byte* krow = k + i * token_stride + h * head_stride;
        const std::byte* vrow = v + i * token_stride + h * head_stride;
        if (is_quantized(kv_dtype)) {
          for (uint32_t ch = 0; ch < head_dim; ++ch) {
            const f16_t x = float_to_f16(load_as_float(krow, kv_dtype, ch));
            std::memcpy(block + offset(h, first + i, ch), &x, sizeof x);
          }
        } else {
          for (uint32_t ch = 0; ch < head_dim; ++ch) std::memcpy(block + offset(h, first + i, ch), krow + ch * es, es);
        }
        double* vs = v_sum + uint64_t{h} * head_dim;
        for (uint32_t ch = 0; ch < head_dim; ++ch) vs[ch] += static_cast<double>(load_as_float(vrow, kv_dtype, ch));
      }
  }
  // Engine rows [n][n_kv_heads][head_dim] (the append path).
  void transpose_rows(std::byte* block, uint32_t first, uint32_t n, const std::byte* k, const std::byte* v,
                      double* v_sum) const noexcept {
    const uint64_t row = row_bytes();
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
// A quantized cache's columns are f16: the same column pages as an f16 cache's.
static_assert(channel_layout::unchecked(4096, 128, dtype::kQ8_0, 4, 1).tokens_per_page == 512);
static_assert(channel_layout::default_channels_per_page(4096, 128, dtype::kQ4_0) == 4);
static_assert(channel_layout::unchecked(4096, 128, dtype::kQ4_0, 4, 2).kv_bytes(10) == 2ull * 10 * 2 * 72);
}  // namespace detail

}  // namespace instinfer
