#include <doctest/doctest.h>

#include "instinfer/layout/chunk_layout.hpp"

using namespace instinfer;

TEST_CASE("page_geometry: tokens per page follow page bytes, head_dim and dtype") {
  for (uint32_t page : {512u, 1024u, 4096u, 16384u, 65536u}) {
    for (uint32_t d : {64u, 128u, 256u}) {
      for (dtype t : {dtype::kF32, dtype::kF16, dtype::kBF16}) {
        auto g = page_geometry::make(page, d, t);
        if (d * dtype_size(t) > page) {
          CHECK_FALSE(g.ok());
          CHECK(g.error().code() == errc::kInvalidArgument);
          continue;
        }
        REQUIRE(g.ok());
        CHECK(g->tokens_per_page * d * dtype_size(t) == page);
        CHECK(g->offset(g->tokens_per_page - 1, d - 1) + dtype_size(t) == page);
      }
    }
  }
}

TEST_CASE("page_geometry: quantized rows are whole blocks, whole rows per page, the rest unused") {
  for (uint32_t page : {512u, 1024u, 4096u, 16384u, 65536u}) {
    for (uint32_t d : {64u, 128u, 256u}) {
      for (dtype t : {dtype::kQ8_0, dtype::kQ4_0}) {
        CAPTURE(page);
        CAPTURE(d);
        const uint32_t row = d / 32 * (t == dtype::kQ8_0 ? 34 : 18);
        auto g = page_geometry::make(page, d, t);
        if (row > page) {
          CHECK_FALSE(g.ok());
          continue;
        }
        REQUIRE(g.ok());
        CHECK(g->row_bytes() == row);
        CHECK(g->tokens_per_page == page / row);
        CHECK(g->offset(g->tokens_per_page - 1) + row <= page);
        CHECK(page - g->tokens_per_page * row < row);
      }
    }
  }
  // A head_dim that is not whole blocks is a clear error, here and in kv_shape.
  for (dtype t : {dtype::kQ8_0, dtype::kQ4_0}) {
    auto g = page_geometry::make(4096, 80, t);
    REQUIRE_FALSE(g.ok());
    CHECK(g.error().code() == errc::kInvalidArgument);
    CHECK(g.error().message().find("not a multiple of the") != std::string::npos);
    const status s = kv_shape{1, 2, 2, 80, t}.validate();
    CHECK(s.code() == errc::kInvalidArgument);
    CHECK(s.message().find("block") != std::string::npos);
  }
}

TEST_CASE("page_geometry: bad sizes are clear errors") {
  for (uint32_t page : {0u, 256u, 3000u, 4097u, 131072u}) {
    auto g = page_geometry::make(page, 128, dtype::kF16);
    CHECK_FALSE(g.ok());
    CHECK(g.error().code() == errc::kInvalidArgument);
    CHECK(g.error().message().find("page_bytes") != std::string::npos);
  }
  auto g = page_geometry::make(512, 256, dtype::kF32);  // one row is 1 KiB
  CHECK_FALSE(g.ok());
  CHECK(g.error().message().find("whole number of rows") != std::string::npos);
}

TEST_CASE("chunk_layout: pages of a chunk tile it exactly, K before V") {
  auto g = page_geometry::make(1024, 64, dtype::kF16).value();
  const chunk_layout c = chunk_layout::make(g, 3);
  CHECK(c.pages_per_chunk() == 6);
  CHECK(c.chunk_bytes() == 6 * 1024);
  uint64_t expected = 0;
  for (kv_kind kind : {kv_kind::kKey, kv_kind::kValue}) {
    for (uint32_t h = 0; h < 3; ++h) {
      CHECK(c.page_offset(kind, h) == expected);
      expected += 1024;
    }
  }
  CHECK(c.offset(kv_kind::kValue, 2, 7, 63) + 2 == c.chunk_bytes());
}

TEST_CASE("kv_shape: validation") {
  kv_shape s{32, 32, 8, 128, dtype::kF16};
  CHECK(s.validate().ok());
  CHECK(s.group_size() == 4);
  CHECK(s.token_bytes_per_layer() == 2 * 8 * 128 * 2);
  kv_shape bad = s;
  bad.n_q_heads = 30;
  CHECK(bad.validate().code() == errc::kInvalidArgument);
  bad = s;
  bad.head_dim = 96;
  CHECK(bad.validate().code() == errc::kUnsupported);
  bad = s;
  bad.n_layers = 0;
  CHECK(bad.validate().code() == errc::kInvalidArgument);
  bad = s;
  bad.n_kv_heads = 0;
  CHECK(bad.validate().code() == errc::kInvalidArgument);
  bad = s;
  bad.kv_dtype = static_cast<dtype>(7);
  CHECK(bad.validate().code() == errc::kInvalidArgument);
}
