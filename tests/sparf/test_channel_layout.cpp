#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <utility>

#include "instinfer/core/huge_region.hpp"
#include "sparf_test_util.hpp"

using namespace instinfer;
using namespace sparf_test;

TEST_CASE("channel_layout: pages tile a column block exactly, channel-major inside a page") {
  for (uint32_t page : {512u, 4096u, 16384u}) {
    for (uint32_t d : {64u, 128u}) {
      for (dtype t : {dtype::kF32, dtype::kF16}) {
        for (uint32_t cpp : {1u, 2u, 4u, 8u}) {
          auto l = channel_layout::make(page, d, t, cpp, 3);
          if (uint64_t{cpp} * dtype_size(t) > page) {
            CHECK_FALSE(l.ok());
            continue;
          }
          REQUIRE(l.ok());
          CHECK(l->tokens_per_page * cpp * dtype_size(t) == page);
          CHECK(l->groups() * cpp == d);
          // Every (head, token, channel) maps to a distinct element and the block is covered.
          std::vector<uint8_t> hit(l->block_bytes() / dtype_size(t), 0);
          for (uint32_t h = 0; h < 3; ++h)
            for (uint32_t tok = 0; tok < l->tokens_per_page; ++tok)
              for (uint32_t c = 0; c < d; ++c) hit[l->offset(h, tok, c) / dtype_size(t)]++;
          CHECK(std::all_of(hit.begin(), hit.end(), [](uint8_t x) { return x == 1; }));
          // One channel's tokens are contiguous.
          CHECK(l->offset(1, 1, 5) - l->offset(1, 0, 5) == dtype_size(t));
        }
      }
    }
  }
}

TEST_CASE("channel_layout: bad values are clear errors; overhead is 1.5x") {
  for (uint32_t cpp : {3u, 256u, 6u}) {
    auto l = channel_layout::make(4096, 128, dtype::kF16, cpp, 8);
    REQUIRE_FALSE(l.ok());
    CHECK(l.error().code() == errc::kInvalidArgument);
    CHECK(l.error().message().find("channels_per_page") != std::string::npos);
  }
  CHECK_FALSE(channel_layout::make(3000, 128, dtype::kF16, 4, 8).ok());
  CHECK_FALSE(channel_layout::make(4096, 128, dtype::kF16, 4, 0).ok());
  auto def = channel_layout::make(4096, 128, dtype::kF16, 0, 8);  // 0: default
  REQUIRE(def.ok());
  CHECK(def->channels_per_page == 4);
  CHECK(def->tokens_per_page == 512);
  const uint64_t n = 4 * def->tokens_per_page;
  CHECK(static_cast<double>(def->kv_bytes(n) + def->stored_bytes(n)) / static_cast<double>(def->kv_bytes(n)) ==
        doctest::Approx(channel_layout::storage_overhead()));
}

TEST_CASE("sparf_index: every K value is reachable from both copies and equal") {
  struct shape {
    uint32_t page, d, heads, cpp;
    dtype t;
    uint32_t n;
  };
  for (const shape& sh : {shape{4096, 128, 2, 4, dtype::kF16, 1300}, shape{1024, 64, 3, 2, dtype::kF32, 700},
                          shape{4096, 64, 1, 8, dtype::kBF16, 256}, shape{512, 64, 2, 1, dtype::kF16, 97}}) {
    CAPTURE(sh.page);
    CAPTURE(sh.n);
    const auto g = page_geometry::make(sh.page, sh.d, sh.t).value();
    const auto cfg = sparf_config::make(chunk_layout::make(g, sh.heads), sh.cpp, 1).value();
    const auto k = random_values(size_t{sh.n} * sh.heads * sh.d, 11);
    const auto v = random_values(k.size(), 12);
    const stored_layer s = store(cfg, k, v, sh.n, {1, 7, 64, 3});
    const channel_layout& cl = cfg.columns;
    CHECK(s.index.n_tokens() == sh.n);
    CHECK(s.index.sealed_blocks() == sh.n / cl.tokens_per_page);
    CHECK(s.index.n_blocks() == (sh.n + cl.tokens_per_page - 1) / cl.tokens_per_page);
    CHECK(s.index.stored_bytes() == cl.stored_bytes(sh.n));
    const uint32_t es = dtype_size(sh.t);
    size_t mismatches = 0;
    for (uint32_t tok = 0; tok < sh.n; ++tok)
      for (uint32_t h = 0; h < sh.heads; ++h)
        for (uint32_t c = 0; c < sh.d; ++c) {
          const std::byte* a = s.chunks[tok / g.tokens_per_page].data() +
                               cfg.tokens.offset(kv_kind::kKey, h, tok % g.tokens_per_page, c);
          const std::byte* b = s.index.block(cl.block_of(tok)) + cl.offset(h, cl.token_in_block(tok), c);
          if (std::memcmp(a, b, es) != 0) ++mismatches;
          // And both equal the value that was stored.
          if (load_as_float(a, sh.t, 0) != s.k[(size_t{tok} * sh.heads + h) * sh.d + c]) ++mismatches;
        }
    CHECK(mismatches == 0);
    // The running mean of V equals the float64 mean of the stored values.
    double worst = 0.0;
    for (uint32_t h = 0; h < sh.heads; ++h)
      for (uint32_t c = 0; c < sh.d; ++c) {
        double m = 0.0;
        for (uint32_t tok = 0; tok < sh.n; ++tok) m += s.v[(size_t{tok} * sh.heads + h) * sh.d + c];
        m /= sh.n;
        worst = std::max(worst, std::fabs(m - s.index.v_mean()[size_t{h} * sh.d + c]));
      }
    CHECK(worst < 1e-6);
  }
}

TEST_CASE("sparf_index: append reports sealed blocks, rejects bad input, copies deeply") {
  const auto g = page_geometry::make(1024, 64, dtype::kF16).value();
  const auto cfg = sparf_config::make(chunk_layout::make(g, 2), 2, 1).value();  // 256 tokens per column page
  auto idx = sparf_index::create(cfg.columns).value();
  const auto rows = random_values(size_t{300} * 2 * 64, 5);
  std::vector<std::byte> kb(rows.size() * 2);
  convert_elements(rows.data(), dtype::kF32, kb.data(), dtype::kF16, rows.size());
  uint32_t sealed = 99;
  REQUIRE(idx.append(200, kb.data(), kb.data(), &sealed).ok());
  CHECK(sealed == 0);
  REQUIRE(idx.append(100, kb.data() + 200 * 2 * 64 * 2, kb.data(), &sealed).ok());
  CHECK(sealed == 1);
  CHECK(idx.buffered_bytes() == 44ull * 2 * 64 * 2);
  const status bad = idx.append(3, nullptr, kb.data());
  CHECK(bad.code() == errc::kInvalidArgument);
  CHECK(idx.n_tokens() == 300);
  sparf_index copy = idx;
  CHECK(copy.block_pointers()[0] != idx.block_pointers()[0]);
  CHECK(std::memcmp(copy.block(1), idx.block(1), cfg.columns.block_bytes()) == 0);
  sparf_index empty;
  CHECK(empty.append(1, kb.data(), kb.data()).code() == errc::kInvalidArgument);
  channel_layout broken = cfg.columns;
  broken.channels_per_page = 3;
  CHECK(sparf_index::create(broken).error().code() == errc::kInvalidArgument);
}

TEST_CASE("sparf_index: truncate then re-append gives the index of the same tokens fed once") {
  const auto g = page_geometry::make(4096, 64, dtype::kF16).value();
  const auto cfg = sparf_config::make(chunk_layout::make(g, 2), 4, 1).value();  // 512 tokens per column page
  const uint32_t H = 2, d = 64, n = 1300;
  const auto k = random_values(size_t{n} * H * d, 41), v = random_values(k.size(), 42);
  std::vector<std::byte> kb(k.size() * 2), vb(kb.size());
  convert_elements(k.data(), dtype::kF32, kb.data(), dtype::kF16, k.size());
  convert_elements(v.data(), dtype::kF32, vb.data(), dtype::kF16, v.size());
  const size_t row = size_t{H} * d * 2;
  auto full = sparf_index::create(cfg.columns).value();
  REQUIRE(full.append(n, kb.data(), vb.data()).ok());
  for (uint32_t cut : {700u, 1024u, 3u, 0u}) {
    CAPTURE(cut);
    sparf_index idx = full;
    const uint32_t tail = cut % cfg.columns.tokens_per_page;
    CHECK(idx.truncate(cut + 1000, nullptr).code() == errc::kInvalidArgument);
    if (tail > 0) CHECK(idx.truncate(cut, nullptr).code() == errc::kInvalidArgument);
    REQUIRE(idx.truncate(cut, tail ? vb.data() + (cut - tail) * row : nullptr).ok());
    CHECK(idx.n_tokens() == cut);
    CHECK(idx.n_blocks() == (cut + 511) / 512);
    auto fresh = sparf_index::create(cfg.columns).value();
    REQUIRE(fresh.append(cut, kb.data(), vb.data()).ok());
    CHECK(std::memcmp(idx.v_mean(), fresh.v_mean(), size_t{H} * d * sizeof(float)) == 0);
    REQUIRE(idx.append(n - cut, kb.data() + cut * row, vb.data() + cut * row).ok());
    CHECK(std::memcmp(idx.v_mean(), full.v_mean(), size_t{H} * d * sizeof(float)) == 0);
    for (uint32_t b = 0; b < full.n_blocks(); ++b)
      CHECK(std::memcmp(idx.block(b), full.block(b), cfg.columns.block_bytes()) == 0);
  }
}

TEST_CASE("sparf_index: column memory grows, moves, drops and copies without losing a block") {
  // 1 MiB blocks (8 kv heads x 128 channels x 512 tokens, f16): 11 blocks make the huge-page region
  // grow and move (2, 4, 8, 16 MiB); each block must still equal its columns built on their own.
  const uint32_t H = 8, d = 128, n = 5300;
  const auto g = page_geometry::make(4096, d, dtype::kF16).value();
  const auto cfg = sparf_config::make(chunk_layout::make(g, H), 4, 1).value();
  const channel_layout& cl = cfg.columns;
  REQUIRE(cl.block_bytes() == (1u << 20));
  const auto k = random_values(size_t{n} * H * d, 91), v = random_values(k.size(), 92);
  std::vector<std::byte> kb(k.size() * 2), vb(kb.size());
  convert_elements(k.data(), dtype::kF32, kb.data(), dtype::kF16, k.size());
  convert_elements(v.data(), dtype::kF32, vb.data(), dtype::kF16, v.size());
  const size_t row = size_t{H} * d * 2;
  auto idx = sparf_index::create(cl).value();
  for (uint32_t at = 0, step = 1; at < n; at += step, step = step * 3 % 997 + 1)
    REQUIRE(idx.append(std::min(step, n - at), kb.data() + at * row, vb.data() + at * row).ok());
  REQUIRE(idx.n_blocks() == (n + 511) / 512);
  std::vector<std::byte> expect(cl.block_bytes());
  std::vector<double> sums(size_t{H} * d);
  for (uint32_t b = 0; b < idx.n_blocks(); ++b) {
    std::fill(expect.begin(), expect.end(), std::byte{0});
    const uint32_t m = std::min(512u, n - b * 512);
    cl.transpose_rows(expect.data(), 0, m, kb.data() + size_t{b} * 512 * row, vb.data() + size_t{b} * 512 * row,
                      sums.data());
    CAPTURE(b);
    CHECK(std::memcmp(idx.block(b), expect.data(), expect.size()) == 0);
  }
  CHECK(idx.resident_bytes() == uint64_t{idx.n_blocks()} * cl.block_bytes());
  idx.drop_block_memory(1);
  CHECK(idx.block(1) == nullptr);
  CHECK_FALSE(idx.block_resident(1));
  CHECK(idx.resident_bytes() == uint64_t{idx.n_blocks() - 1} * cl.block_bytes());
  sparf_index copy = idx;  // a dropped block stays dropped in the copy; the rest are equal
  CHECK(copy.block(1) == nullptr);
  CHECK(std::memcmp(copy.block(7), idx.block(7), cl.block_bytes()) == 0);
  sparf_index moved = std::move(idx);
  CHECK(idx.n_blocks() == 0);  // NOLINT(bugprone-use-after-move): a moved-from index is empty
  CHECK(idx.resident_bytes() == 0);
  CHECK(std::memcmp(moved.block(7), copy.block(7), cl.block_bytes()) == 0);
  CHECK(std::memcmp(moved.v_mean(), copy.v_mean(), size_t{H} * d * sizeof(float)) == 0);
}

TEST_CASE("channel_layout::transpose_rows: engine rows and chunk pages give the same block and V sums") {
  const auto g = page_geometry::make(4096, 128, dtype::kF16).value();
  const chunk_layout chunks = chunk_layout::make(g, 2);
  const channel_layout cols = channel_layout::make(4096, 128, dtype::kF16, 4, 2).value();
  const uint32_t n = chunks.tokens(), H = 2, d = 128;
  std::vector<std::byte> k(size_t{n} * H * d * 2), v(k.size());
  convert_elements(random_values(size_t{n} * H * d, 7).data(), dtype::kF32, k.data(), dtype::kF16, size_t{n} * H * d);
  convert_elements(random_values(size_t{n} * H * d, 8).data(), dtype::kF32, v.data(), dtype::kF16, size_t{n} * H * d);
  std::vector<std::byte> chunk(chunks.chunk_bytes());
  chunks.scatter_rows(chunk.data(), 0, n, k.data(), v.data());
  std::vector<std::byte> from_rows(cols.block_bytes()), from_chunk(cols.block_bytes());
  std::vector<double> sum_rows(size_t{H} * d, 0.0), sum_chunk(sum_rows.size(), 0.0);
  cols.transpose_rows(from_rows.data(), 3, n, k.data(), v.data(), sum_rows.data());
  cols.transpose_rows(from_chunk.data(), 3, n, chunk.data() + chunks.offset(kv_kind::kKey, 0, 0, 0),
                      chunk.data() + chunks.offset(kv_kind::kValue, 0, 0, 0), g.row_bytes(), g.page_bytes,
                      sum_chunk.data());
  CHECK(std::memcmp(from_rows.data(), from_chunk.data(), from_rows.size()) == 0);
  CHECK(sum_rows == sum_chunk);
  // K[token][head][channel] lands at offset(head, first + token, channel).
  CHECK(std::memcmp(from_rows.data() + cols.offset(1, 3 + 5, 77), k.data() + ((5 * H + 1) * d + 77) * 2, 2) == 0);
}

TEST_CASE("sparf: sparf_select_head then sparf_exact_head give sparf_attend's output, and the selection is a value") {
  const auto g = page_geometry::make(4096, 128, dtype::kF16).value();
  const sparf_config cfg = sparf_config::make(chunk_layout::make(g, 2), 4, 2).value();
  const uint32_t n = 1500, H = 2, G = 2, d = 128;
  const auto k = random_values(size_t{n} * H * d, 11), v = random_values(k.size(), 12);
  const auto q = random_values(size_t{H} * G * d, 13);
  const stored_layer s = store(cfg, k, v, n);
  const sparf_params p = sparf_params::with_compression(0.125);
  const sparf_plan plan = sparf_resolve(p, d, n).value();
  std::vector<float> batch_out(size_t{H} * G * d), batch_lse(H * G), out(batch_out.size()), lse(batch_lse.size());
  sparf_workspace ws;
  sparf_counters batch_c, c;
  const sparf_work w = s.work(q.data(), batch_out.data(), batch_lse.data());
  REQUIRE(sparf_attend(cfg, p, std::span<const sparf_work>(&w, 1), ws, &batch_c).ok());
  REQUIRE(ws.reserve(n, d, G, cfg.columns.tokens_per_page).ok());
  const sparf_columns cols{s.index.block_pointers(), nullptr, s.index.n_blocks()};
  std::vector<uint32_t> tokens(plan.k);
  std::vector<float> alpha(G);
  for (uint32_t h = 0; h < H; ++h) {
    const float* qh = q.data() + size_t{h} * G * d;
    const sparf_selection sel = sparf_select_head(cfg, plan, p, cols, n, static_cast<uint32_t>(s.chunk_ptrs.size()), qh,
                                                  h, ws, c, tokens.data(), alpha.data());
    REQUIRE(sel.n == plan.k);
    CHECK(std::is_sorted(sel.tokens, sel.tokens + sel.n));
    CHECK(sel.alpha[0] > 0.0f);
    CHECK(sel.alpha[0] < 1.0f);
    REQUIRE(sparf_exact_head(cfg, sel, s.chunk_ptrs.data(), s.index.v_mean() + size_t{h} * d, qh,
                             out.data() + size_t{h} * G * d, lse.data() + size_t{h} * G, h, ws, c)
                .ok());
  }
  CHECK(out == batch_out);
  CHECK(lse == batch_lse);
  CHECK(c.token_pages_read == batch_c.token_pages_read);
  CHECK(c.channel_pages_read == batch_c.channel_pages_read);
}

TEST_CASE("huge_region: a reservation the address space cannot hold fails and leaves the region as it was") {
  huge_region r;
  REQUIRE(r.reserve(size_t{3} << 20));  // two huge pages
  CHECK(r.capacity() == size_t{4} << 20);
  CHECK(reinterpret_cast<uintptr_t>(r.data()) % huge_region::kHugePage == 0);
  for (size_t i = 0; i < r.capacity(); i += 4096) r.data()[i] = static_cast<std::byte>(i / 4096 + 1);
  std::byte* const before = r.data();
  // 2^62 bytes: beyond any x86-64 or aarch64 address space, so mmap refuses it; SIZE_MAX trips
  // the doubling's overflow guard first.
  CHECK_FALSE(r.reserve(size_t{1} << 62));
  CHECK_FALSE(r.reserve(SIZE_MAX));
  CHECK(r.data() == before);
  CHECK(r.capacity() == size_t{4} << 20);
  bool intact = true;
  for (size_t i = 0; i < r.capacity(); i += 4096) intact &= r.data()[i] == static_cast<std::byte>(i / 4096 + 1);
  CHECK(intact);
  // Still usable: a growth that fits moves the pages and keeps them.
  REQUIRE(r.reserve(size_t{9} << 20));
  CHECK(r.capacity() == size_t{16} << 20);
  intact = true;
  for (size_t i = 0; i < (size_t{4} << 20); i += 4096) intact &= r.data()[i] == static_cast<std::byte>(i / 4096 + 1);
  CHECK(intact);
  CHECK(r.data()[(size_t{4} << 20) + 4096] == std::byte{0});  // new memory reads as zeros
  // discard drops whole OS pages to zeros and clamps a range past the end.
  r.discard(0, 8192);
  CHECK(r.data()[0] == std::byte{0});
  CHECK(r.data()[4096] == std::byte{0});
  CHECK(r.data()[8192] == static_cast<std::byte>(3));
  r.discard(r.capacity() - 4096, SIZE_MAX);
  huge_region moved = std::move(r);
  CHECK(r.data() == nullptr);
  CHECK(r.capacity() == 0);
  CHECK(moved.data()[8192] == static_cast<std::byte>(3));
}
