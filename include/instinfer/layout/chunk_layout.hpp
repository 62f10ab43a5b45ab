// The allocation unit of the cache: a chunk.
//
// A chunk holds one token range (tokens_per_page tokens) of one layer of one sequence for every
// KV head: 2 * n_kv_heads flash pages, K pages first, then V pages,
//
//   chunk = [K|V][n_kv_heads][tokens_per_page][head_dim]      (FlashInfer's "HND" page)
//
// Keeping all heads of a token range together is the paper's erase-block packing: a decode
// append fills the same chunk for every head, so whole chunks are written at once, and a layer's
// chunks of a sequence can be laid out contiguously on storage.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "instinfer/layout/kv_shape.hpp"
#include "instinfer/layout/page_geometry.hpp"

namespace instinfer {

enum class kv_kind : uint8_t { kKey = 0, kValue = 1 };

struct chunk_layout {
  page_geometry page{};
  uint32_t n_kv_heads = 0;

  constexpr uint32_t pages_per_chunk() const noexcept { return 2 * n_kv_heads; }
  constexpr uint64_t chunk_bytes() const noexcept { return uint64_t{page.page_bytes} * pages_per_chunk(); }
  constexpr uint32_t tokens() const noexcept { return page.tokens_per_page; }

  // Index of the page of (kind, head) inside the chunk.
  constexpr uint32_t page_index(kv_kind kind, uint32_t kv_head) const noexcept {
    return static_cast<uint32_t>(kind) * n_kv_heads + kv_head;
  }
  // Byte offset of that page inside the chunk.
  constexpr uint64_t page_offset(kv_kind kind, uint32_t kv_head) const noexcept {
    return uint64_t{page_index(kind, kv_head)} * page.page_bytes;
  }
  // Byte offset of element `dim` of token `token` of (kind, head) inside the chunk.
  constexpr uint64_t offset(kv_kind kind, uint32_t kv_head, uint32_t token, uint32_t dim) const noexcept {
    return page_offset(kind, kv_head) + page.offset(token, dim);
  }

  static constexpr chunk_layout make(const page_geometry& g, uint32_t n_kv_heads) noexcept {
    return chunk_layout{g, n_kv_heads};
  }

  // Tokens [first, first + n) fit one chunk (n >= 1): the write-range rule every backend enforces.
  constexpr bool fits(uint32_t first, uint32_t n) const noexcept {
    return n != 0 && first < tokens() && n <= tokens() - first;
  }

  // The byte transforms between an engine's row layout and a chunk live here, beside the layout,
  // so every backend (host, ssd, the drive, cuda staging) uses the same ones.
  //
  // rows -> chunk: tokens [first, first + n) from k, v rows [n][n_kv_heads][head_dim] (cache dtype).
  // The caller checks fits(first, n).
  void scatter_rows(std::byte* chunk, uint32_t first, uint32_t n, const std::byte* k,
                    const std::byte* v) const noexcept {
    const uint32_t row = page.row_bytes();
    for (uint32_t t = 0; t < n; ++t)
      for (uint32_t h = 0; h < n_kv_heads; ++h) {
        const uint64_t src = (uint64_t{t} * n_kv_heads + h) * row;
        std::memcpy(chunk + offset(kv_kind::kKey, h, first + t, 0), k + src, row);
        std::memcpy(chunk + offset(kv_kind::kValue, h, first + t, 0), v + src, row);
      }
  }
  // chunk -> rows: tokens [first, first + n) of the chunk into k, v rows [n][n_kv_heads][head_dim].
  void gather_rows(const std::byte* chunk, uint32_t first, uint32_t n, std::byte* k, std::byte* v) const noexcept {
    const uint32_t row = page.row_bytes();
    for (uint32_t t = 0; t < n; ++t)
      for (uint32_t h = 0; h < n_kv_heads; ++h) {
        const uint64_t dst = (uint64_t{t} * n_kv_heads + h) * row;
        std::memcpy(k + dst, chunk + offset(kv_kind::kKey, h, first + t, 0), row);
        std::memcpy(v + dst, chunk + offset(kv_kind::kValue, h, first + t, 0), row);
      }
  }
  // The first n tokens of every page of src into dst (fork of a partial tail, copy-on-write).
  void copy_prefix(std::byte* dst, const std::byte* src, uint32_t n) const noexcept {
    const uint64_t bytes = uint64_t{n} * page.row_bytes();
    for (uint32_t p = 0; p < pages_per_chunk(); ++p) {
      const uint64_t off = uint64_t{p} * page.page_bytes;
      std::memcpy(dst + off, src + off, bytes);
    }
  }
};

namespace detail {
constexpr chunk_layout kExampleChunk = chunk_layout::make(page_geometry::unchecked(4096, 128, dtype::kF16), 8);
static_assert(kExampleChunk.chunk_bytes() == 16 * 4096);
static_assert(kExampleChunk.page_offset(kv_kind::kValue, 0) == 8 * 4096);
static_assert(kExampleChunk.offset(kv_kind::kKey, 1, 2, 3) == 4096 + 2 * 256 + 6);
static_assert(kExampleChunk.offset(kv_kind::kValue, 7, 15, 127) + 2 == kExampleChunk.chunk_bytes());
}  // namespace detail

}  // namespace instinfer
