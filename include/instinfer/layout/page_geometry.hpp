// Flash-page geometry: how many tokens of one (layer, kv_head, K|V) fill one page.
//
// A page is the paper's flash-aware "group": `tokens_per_page` consecutive tokens of one head,
// stored row-major as [tokens_per_page][head_dim]. Page bytes come from the device (NVMe preferred
// write granularity, physical block size) and are never hard-coded by the kernels.
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

  constexpr uint32_t row_bytes() const noexcept { return head_dim * dtype_size(kv_dtype); }

  // Byte offset of element `dim` of token `token` inside a page.
  constexpr uint32_t offset(uint32_t token, uint32_t dim) const noexcept {
    return token * row_bytes() + dim * dtype_size(kv_dtype);
  }

  // Why `make` would refuse these values, or ok. constexpr-friendly: returns a code only.
  static constexpr errc check(uint32_t page_bytes, uint32_t head_dim, dtype t) noexcept {
    if (page_bytes < kMinPageBytes || page_bytes > kMaxPageBytes) return errc::kInvalidArgument;
    if ((page_bytes & (page_bytes - 1)) != 0) return errc::kInvalidArgument;
    if (head_dim == 0 || !is_valid_dtype(t)) return errc::kInvalidArgument;
    const uint32_t row = head_dim * dtype_size(t);
    if (row > page_bytes || page_bytes % row != 0) return errc::kInvalidArgument;
    return errc::kOk;
  }

  // Geometry for a page size; precondition: check(...) == kOk (use `make` for runtime values).
  static constexpr page_geometry unchecked(uint32_t page_bytes, uint32_t head_dim, dtype t) noexcept {
    return page_geometry{page_bytes, head_dim, t, page_bytes / (head_dim * dtype_size(t))};
  }

  static result<page_geometry> make(uint32_t page_bytes, uint32_t head_dim, dtype t) {
    if (check(page_bytes, head_dim, t) == errc::kOk) return unchecked(page_bytes, head_dim, t);
    if (page_bytes < kMinPageBytes || page_bytes > kMaxPageBytes || (page_bytes & (page_bytes - 1)) != 0)
      return status{errc::kInvalidArgument,
                    "page_bytes must be a power of two in [512, 65536], got " + std::to_string(page_bytes)};
    return status{errc::kInvalidArgument, "a page of " + std::to_string(page_bytes) +
                                              " bytes does not hold a whole number of rows of " +
                                              std::to_string(head_dim) + " x " + std::string(dtype_name(t)) + " (" +
                                              std::to_string(head_dim * dtype_size(t)) + " bytes)"};
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

}  // namespace instinfer
