// Flash-page geometry: how many tokens of one (layer, kv_head, K|V) fill one page.
//
// A page is the paper's flash-aware "group": `tokens_per_page` consecutive tokens of one head,
// stored row-major as [tokens_per_page][head_dim]. Page bytes come from the device (NVMe preferred
// write granularity, physical block size) and are never hard-coded by the kernels.
//
// A row is dtype_row_bytes(kv_dtype, head_dim) bytes: head_dim elements of a dense type, or
// head_dim / 32 blocks of a quantized one (q8_0: 34 bytes per block, q4_0: 18), so a quantized
// row is no power of two. Rows never straddle a page: tokens_per_page = floor(page / row), and
// the last page_bytes % row bytes of a page are unused (4 KiB, head_dim 128: 30 q8_0 rows of
// 136 bytes and 16 bytes of padding; 56 q4_0 rows of 72 bytes and 64 bytes of padding).
#pragma once

#include <cstdint>
#include <string>

#include "instinfer/core/dtype.hpp"
#include "instinfer/core/status.hpp"

namespace instinfer {

struct page_geometry {
  static constexpr uint32_t kMinPageBytes = 512;
  static constexpr uint32_t kMaxPageBytes = 64 * 1024;
  static constexpr uint32_t kDefaultPageBytes = 4096;

  uint32_t page_bytes = 0;
  uint32_t head_dim = 0;
  dtype kv_dtype = dtype::kF16;
  uint32_t tokens_per_page = 0;

  // Bytes of one token's row of one head.
  static constexpr uint32_t row_bytes(uint32_t head_dim, dtype t) noexcept {
    return static_cast<uint32_t>(dtype_row_bytes(t, head_dim));
  }
  constexpr uint32_t row_bytes() const noexcept { return row_bytes(head_dim, kv_dtype); }

  // Byte offset of row `token` inside a page.
  constexpr uint32_t offset(uint32_t token) const noexcept { return token * row_bytes(); }
  // Byte offset of element `dim` of token `token` inside a page (dense types only: a quantized
  // element has no byte of its own; dim 0 is the row's start for every type).
  constexpr uint32_t offset(uint32_t token, uint32_t dim) const noexcept {
    return offset(token) + dim * dtype_size(kv_dtype);
  }

  // Why `make` would refuse these values, or ok. constexpr-friendly: returns a code only.
  static constexpr errc check(uint32_t page_bytes, uint32_t head_dim, dtype t) noexcept {
    if (page_bytes < kMinPageBytes || page_bytes > kMaxPageBytes) return errc::kInvalidArgument;
    if ((page_bytes & (page_bytes - 1)) != 0) return errc::kInvalidArgument;
    if (head_dim == 0 || !is_valid_dtype(t) || !dtype_holds(t, head_dim)) return errc::kInvalidArgument;
    const uint32_t row = row_bytes(head_dim, t);
    if (row > page_bytes) return errc::kInvalidArgument;
    if (!is_quantized(t) && page_bytes % row != 0) return errc::kInvalidArgument;
    return errc::kOk;
  }

  // Geometry for a page size; precondition: check(...) == kOk (use `make` for runtime values).
  static constexpr page_geometry unchecked(uint32_t page_bytes, uint32_t head_dim, dtype t) noexcept {
    return page_geometry{page_bytes, head_dim, t, page_bytes / row_bytes(head_dim, t)};
  }

  static result<page_geometry> make(uint32_t page_bytes, uint32_t head_dim, dtype t) {
    if (check(page_bytes, head_dim, t) == errc::kOk) return unchecked(page_bytes, head_dim, t);
    if (page_bytes < kMinPageBytes || page_bytes > kMaxPageBytes || (page_bytes & (page_bytes - 1)) != 0)
      return status{errc::kInvalidArgument,
                    "page_bytes must be a power of two in [512, 65536], got " + std::to_string(page_bytes)};
    if (!is_valid_dtype(t)) return status{errc::kInvalidArgument, "unknown KV dtype"};
    if (head_dim == 0 || !dtype_holds(t, head_dim))
      return status{errc::kInvalidArgument, "head_dim " + std::to_string(head_dim) + " is not a multiple of the " +
                                                std::string(dtype_name(t)) + " block (" +
                                                std::to_string(dtype_block_elems(t)) + " values)"};
    return status{errc::kInvalidArgument, "a page of " + std::to_string(page_bytes) +
                                              " bytes does not hold a whole number of rows of " +
                                              std::to_string(head_dim) + " x " + std::string(dtype_name(t)) + " (" +
                                              std::to_string(row_bytes(head_dim, t)) + " bytes)"};
  }
};

// The paper's group: 16 tokens x 128 dims x fp16 = one 4 KiB flash page.
static_assert(page_geometry::unchecked(4096, 128, dtype::kF16).tokens_per_page == 16);
static_assert(page_geometry::unchecked(16384, 128, dtype::kF16).tokens_per_page == 64);
static_assert(page_geometry::unchecked(512, 128, dtype::kF32).tokens_per_page == 1);
static_assert(page_geometry::unchecked(4096, 64, dtype::kF16).offset(3, 5) == 3 * 128 + 10);
static_assert(page_geometry::check(4096, 256, dtype::kF32) == errc::kOk);
static_assert(page_geometry::check(512, 256, dtype::kF32) == errc::kInvalidArgument);   // row > page
static_assert(page_geometry::check(3000, 128, dtype::kF16) == errc::kInvalidArgument);  // not a power of two
static_assert(page_geometry::check(128 * 1024, 128, dtype::kF16) == errc::kInvalidArgument);
// Quantized rows: whole blocks, whole rows per page, the rest of the page unused.
static_assert(page_geometry::unchecked(4096, 128, dtype::kQ8_0).tokens_per_page == 30);
static_assert(page_geometry::unchecked(4096, 128, dtype::kQ4_0).tokens_per_page == 56);
static_assert(page_geometry::unchecked(512, 256, dtype::kQ8_0).tokens_per_page == 1);
static_assert(page_geometry::unchecked(4096, 64, dtype::kQ4_0).offset(3) == 3 * 36);
static_assert(page_geometry::check(4096, 48, dtype::kQ8_0) == errc::kInvalidArgument);  // 48 % 32 != 0
static_assert(page_geometry::check(512, 16, dtype::kF16) == errc::kOk);                 // dense rows need no blocks

}  // namespace instinfer
