// Host tests of the CUDA backend's shared math, run in every CI (no GPU needed): state.hpp's
// merges against float64, the kernel's address, split and tiling helpers, a CPU replay of the
// kernel's partition against the float64 reference, and the cuda backend's URI handling.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "emulate_decode.hpp"
#include "instinfer/attention/state.hpp"
#include "instinfer/backend/cuda_backend.hpp"
#include "instinfer/cuda/decode_math.hpp"
#include "instinfer/testing/reference.hpp"

using namespace instinfer;

namespace {

// Float64 softmax-weighted sum of scalar values: (lse, o).
std::pair<double, double> softmax64(const std::vector<float>& s, const std::vector<float>& v) {
  double m = -INFINITY;
  for (float x : s) m = std::max(m, double{x});
  double d = 0.0, o = 0.0;
  for (size_t i = 0; i < s.size(); ++i) {
    const double p = std::exp(double{s[i]} - m);
    d += p;
    o += p * v[i];
  }
  return {m + std::log(d), o / d};
}

// A partial state over logits s[b, e) with scalar values, built the kernel's way (fold_tile).
void fold_range(const std::vector<float>& s, const std::vector<float>& v, size_t b, size_t e, softmax_stats& st,
                float& o) {
  softmax_stats sts[1] = {st};
  float oo[1][1] = {{o}};
  for (size_t i = b; i < e; i += 2) {
    float ss[2][1] = {{s[i]}, {i + 1 < e ? s[i + 1] : -INFINITY}};
    float vv[2][1] = {{v[i]}, {i + 1 < e ? v[i + 1] : 0.0f}};
    cuda::fold_tile(ss, vv, sts, oo);
  }
  st = sts[0];
  o = oo[0][0];
}

}  // namespace

TEST_CASE("state.hpp merges of kernel-built partials match float64 softmax") {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 4.0f);
  for (size_t n : {1u, 2u, 7u, 100u, 5000u}) {
    std::vector<float> s(n), v(n);
    for (size_t i = 0; i < n; ++i) {
      s[i] = dist(rng);
      v[i] = dist(rng) + 0.5f;
    }
    const auto [lse64, o64] = softmax64(s, v);
    // Split into 1..5 random pieces, fold each as the kernel does, merge in order.
    for (int pieces = 1; pieces <= 5; ++pieces) {
      std::vector<size_t> cuts{0, n};
      std::uniform_int_distribution<size_t> cut(0, n);
      for (int p = 1; p < pieces; ++p) cuts.push_back(cut(rng));
      std::sort(cuts.begin(), cuts.end());
      softmax_stats acc{};
      float acc_o = 0.0f;
      for (size_t p = 0; p + 1 < cuts.size(); ++p) {
        softmax_stats st{};
        float o = 0.0f;
        fold_range(s, v, cuts[p], cuts[p + 1], st, o);
        merge_state(acc, &acc_o, st, &o, 1);
      }
      CHECK(std::fabs(state_lse(acc) - lse64) <= 1e-5 * std::max(1.0, std::fabs(lse64)));
      float out = acc_o;
      normalize_state(acc, &out, 1);
      CHECK(std::fabs(out - o64) <= 1e-5 * std::max(1.0, std::fabs(o64)));
    }
    // merge_normalized of two halves (the cross-tier API) agrees too.
    const size_t h = n / 2;
    softmax_stats a{}, b{};
    float oa = 0.0f, ob = 0.0f;
    fold_range(s, v, 0, h, a, oa);
    fold_range(s, v, h, n, b, ob);
    const float la = state_lse(a), lb = state_lse(b);
    normalize_state(a, &oa, 1);
    normalize_state(b, &ob, 1);
    float out = 0.0f, lse = 0.0f;
    merge_normalized(&oa, la, &ob, lb, &out, &lse, 1);
    CHECK(std::fabs(lse - lse64) <= 1e-5 * std::max(1.0, std::fabs(lse64)));
    CHECK(std::fabs(out - o64) <= 1e-5 * std::max(1.0, std::fabs(o64)));
  }
}

TEST_CASE("fold_tile: out-of-range tokens contribute nothing and empty tiles leave the state alone") {
  softmax_stats st[1] = {};
  float o[1][2] = {{0.0f, 0.0f}};
  float s_none[2][1] = {{-INFINITY}, {-INFINITY}};
  float v_none[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
  cuda::fold_tile(s_none, v_none, st, o);
  CHECK(st[0].empty());
  CHECK(st[0].m == -INFINITY);
  CHECK(state_lse(st[0]) == -INFINITY);
  float s_one[2][1] = {{1.5f}, {-INFINITY}};
  float v_one[2][2] = {{2.0f, -3.0f}, {0.0f, 0.0f}};
  cuda::fold_tile(s_one, v_one, st, o);
  CHECK(st[0].m == 1.5f);
  CHECK(st[0].d == 1.0f);
  CHECK(o[0][0] == 2.0f);
  CHECK(o[0][1] == -3.0f);
  cuda::fold_tile(s_none, v_none, st, o);  // nothing changes
  CHECK(st[0].d == 1.0f);
  CHECK(o[0][0] == 2.0f);
}

TEST_CASE("dequantize8 (the kernel's q8_0 / q4_0 read) equals load_as_float bit for bit") {
  std::mt19937 rng(11);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> x(256);
  for (dtype t : {dtype::kQ8_0, dtype::kQ4_0}) {
    for (float& v : x) v = dist(rng);
    std::vector<std::byte> row(dtype_row_bytes(t, x.size()));
    REQUIRE(convert_elements(x.data(), dtype::kF32, row.data(), t, x.size()));
    const auto* r = reinterpret_cast<const unsigned char*>(row.data());
    for (uint32_t e0 = 0; e0 < x.size(); e0 += 8) {
      float got[8];
      if (t == dtype::kQ8_0)
        cuda::dequantize8<dtype::kQ8_0>(r, e0, got);
      else
        cuda::dequantize8<dtype::kQ4_0>(r, e0, got);
      for (uint32_t i = 0; i < 8; ++i) CHECK(got[i] == load_as_float(row.data(), t, e0 + i));
    }
  }
}

TEST_CASE("kv_row_offset agrees with chunk_layout") {
  std::mt19937 rng(3);
  for (uint32_t page_bytes : {512u, 4096u, 16384u, 65536u})
    for (dtype t : {dtype::kF32, dtype::kF16, dtype::kBF16})
      for (uint32_t hd : {64u, 128u, 256u}) {
        if (page_geometry::check(page_bytes, hd, t) != errc::kOk) continue;
        const auto cl = chunk_layout::make(page_geometry::unchecked(page_bytes, hd, t), 5);
        uint32_t log2_tpp = 0;
        while ((1u << log2_tpp) < cl.tokens()) ++log2_tpp;
        REQUIRE((1u << log2_tpp) == cl.tokens());
        std::uniform_int_distribution<uint32_t> tok(0, 100000), head(0, 4), chunk(0, 1000);
        for (int i = 0; i < 200; ++i) {
          const uint32_t token = tok(rng), h = head(rng), c = chunk(rng);
          for (uint32_t kind = 0; kind < 2; ++kind) {
            const uint64_t want =
                uint64_t{c} * cl.chunk_bytes() + cl.offset(static_cast<kv_kind>(kind), h, token % cl.tokens(), 0);
            CHECK(cuda::kv_row_offset(c, cl.chunk_bytes(), page_bytes, 5, kind, h, token, log2_tpp,
                                      cl.page.row_bytes()) == want);
          }
        }
      }
}

TEST_CASE("plan_decode_splits covers every token with tile-aligned splits") {
  for (uint32_t tile : {4u, 8u, 16u, 32u})
    for (uint32_t max_tokens : {0u, 1u, 255u, 256u, 257u, 1000u, 32768u, 131072u, 1u << 20})
      for (uint64_t base : {1ull, 3ull, 16ull, 64ull, 528ull, 100000ull}) {
        const uint64_t target = 132 * 4;
        const auto p = cuda::plan_decode_splits(max_tokens, base, target, tile);
        CAPTURE(tile);
        CAPTURE(max_tokens);
        CAPTURE(base);
        CHECK(p.split_tokens % tile == 0);
        CHECK(p.split_tokens > 0);
        CHECK(uint64_t{p.split_tokens} * p.max_splits >= max_tokens);
        CHECK(p.splits_for(max_tokens) == p.max_splits);
        for (uint32_t len : {0u, 1u, max_tokens / 2, max_tokens}) CHECK(p.splits_for(len) <= p.max_splits);
        if (max_tokens <= cuda::kMinSplitTokens) CHECK(p.max_splits == 1);
        // Never worse at filling the device than not splitting.
        CHECK(cuda::wave_efficiency(base * p.max_splits, target) >= cuda::wave_efficiency(base, target));
        if (p.max_splits > 1) {
          const uint32_t min_split = (cuda::kMinSplitTokens + tile - 1) / tile * tile;
          CHECK(p.split_tokens >= min_split);
          CHECK(cuda::wave_efficiency(base * p.max_splits, target) > cuda::wave_efficiency(base, target));
        }
        // A small batch with room to split (at least two minimum splits per needed split) fills the GPU.
        if (base * 8 <= target && uint64_t{max_tokens} / (2 * cuda::kMinSplitTokens) * base >= target)
          CHECK(cuda::wave_efficiency(base * p.max_splits, target) >= 0.9);
      }
}

TEST_CASE("group_tile_for divides the group and prefers large tiles") {
  for (uint32_t g = 1; g <= 64; ++g) {
    const uint32_t t = cuda::group_tile_for(g);
    CHECK(g % t == 0);
    CHECK((t == 1 || t == 2 || t == 4 || t == 8));
    if (g % 8 == 0) CHECK(t == 8);
  }
}

namespace {

struct replay_case {
  uint32_t page_bytes;
  dtype t;
  uint32_t n_kv_heads;
  uint32_t group;
  std::vector<uint32_t> lengths;
  float softcap;
  bool force_split;
};

// Fill a host pool with random chunks in shuffled order, replay the kernel, compare with float64.
template <uint32_t HeadDim, uint32_t ElemBytes, uint32_t G, uint32_t RowBytes = HeadDim* ElemBytes>
void check_replay(const replay_case& c, double tol) {
  std::mt19937 rng(HeadDim * 131 + G * 7 + static_cast<uint32_t>(c.t));
  const auto cl = chunk_layout::make(page_geometry::unchecked(c.page_bytes, HeadDim, c.t), c.n_kv_heads);
  const uint32_t tpp = cl.tokens();
  uint32_t total_chunks = 0;
  uint32_t max_len = 0;
  for (uint32_t len : c.lengths) {
    total_chunks += (len + tpp - 1) / tpp;
    max_len = std::max(max_len, len);
  }
  std::vector<uint32_t> ids(total_chunks);
  std::iota(ids.begin(), ids.end(), 0u);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<std::byte> pool(size_t{total_chunks} * cl.chunk_bytes());
  std::normal_distribution<float> dist(0.0f, 1.0f);
  REQUIRE(cl.page.row_bytes() == RowBytes);
  std::vector<float> row(HeadDim);
  for (size_t page = 0; page < size_t{total_chunks} * cl.pages_per_chunk(); ++page)
    for (uint32_t r = 0; r < tpp; ++r) {
      for (float& x : row) x = dist(rng);
      REQUIRE(convert_elements(row.data(), dtype::kF32, pool.data() + page * c.page_bytes + cl.page.offset(r), c.t,
                               HeadDim));
    }

  const uint32_t n_q = c.n_kv_heads * c.group;
  const float scale = 1.0f / std::sqrt(static_cast<float>(HeadDim));
  using tr = cuda::decode_traits<HeadDim, ElemBytes, G, RowBytes>;
  const uint64_t base = uint64_t{c.lengths.size()} * c.n_kv_heads * (c.group / G);
  const auto plan = cuda::plan_decode_splits(max_len, base, c.force_split ? base * 64 : base, tr::kTileTokens);
  if (c.force_split && max_len > 4 * cuda::kMinSplitTokens) CHECK(plan.max_splits > 1);

  decode_params dp;
  dp.layout = cl;
  dp.group_size = c.group;
  dp.scale = scale;
  dp.softcap = c.softcap;
  uint32_t next = 0;
  for (uint32_t len : c.lengths) {
    const uint32_t nc = (len + tpp - 1) / tpp;
    const uint32_t* seq_ids = ids.data() + next;
    next += nc;
    std::vector<float> q(size_t{n_q} * HeadDim);
    for (float& x : q) x = dist(rng);
    std::vector<float> out(q.size(), 12345.0f), lse(n_q, 12345.0f);
    test::emulated_sequence seq{seq_ids, len, q.data(), out.data(), lse.data()};
    test::emulate_sequence<HeadDim, ElemBytes, G, RowBytes>(cl, pool.data(), seq, c.group, scale, c.softcap, plan);

    std::vector<const std::byte*> chunks(nc);
    for (uint32_t i = 0; i < nc; ++i) chunks[i] = pool.data() + uint64_t{seq_ids[i]} * cl.chunk_bytes();
    std::vector<double> want(q.size()), want_lse(n_q);
    reference::attend_chunks(dp, chunks.data(), len, q.data(), want.data(), want_lse.data());
    CAPTURE(len);
    CAPTURE(plan.max_splits);
    CHECK(reference::relative_error(out, want) <= tol);
    for (uint32_t h = 0; h < n_q; ++h) {
      if (len == 0) {
        CHECK(lse[h] == -INFINITY);
      } else {
        CHECK(std::fabs(lse[h] - want_lse[h]) <= tol * std::max(1.0, std::fabs(want_lse[h])));
      }
    }
  }
}

}  // namespace

TEST_CASE("CPU replay of the kernel's partition matches the float64 reference") {
  // Contexts cover: empty, a single token, partial tiles and pages, page sizes below and above a
  // tile, and splits forced on long contexts.
  SUBCASE("f32, head_dim 128, group 4, 4 KiB pages") {
    check_replay<128, 4, 4>({4096, dtype::kF32, 2, 4, {0, 1, 7, 33, 1000, 5000}, 0.0f, false}, 1e-5);
    check_replay<128, 4, 4>({4096, dtype::kF32, 2, 4, {1, 3000, 20000}, 0.0f, true}, 1e-5);
  }
  SUBCASE("f32, head_dim 64, group 1, 512-byte pages (two tokens a page, several pages a tile)") {
    check_replay<64, 4, 1>({512, dtype::kF32, 3, 1, {1, 2, 3, 17, 4099}, 0.0f, true}, 1e-5);
  }
  SUBCASE("f32, head_dim 256, group 8, soft-cap") {
    check_replay<256, 4, 8>({16384, dtype::kF32, 1, 8, {5, 1025, 9000}, 30.0f, true}, 1e-5);
  }
  SUBCASE("f16, head_dim 128, group 8 (paper geometry)") {
    check_replay<128, 2, 8>({4096, dtype::kF16, 2, 8, {16, 17, 2048, 12345}, 0.0f, true}, 1e-5);
  }
  SUBCASE("bf16, head_dim 64, group 6 -> tile 2") {
    check_replay<64, 2, 2>({65536, dtype::kBF16, 2, 6, {1, 600, 70000}, 0.0f, true}, 1e-5);
  }
  // Quantized rows: 30 (q8_0) / 56 (q4_0) tokens a 4 KiB page, 4-byte staging, division by tpp.
  SUBCASE("q8_0, head_dim 128, group 4") {
    check_replay<128, 2, 4, 136>({4096, dtype::kQ8_0, 2, 4, {0, 1, 29, 30, 31, 1000, 5000}, 0.0f, true}, 1e-5);
  }
  SUBCASE("q4_0, head_dim 64, group 2, soft-cap") {
    check_replay<64, 2, 2, 36>({4096, dtype::kQ4_0, 2, 2, {1, 113, 3000}, 30.0f, true}, 1e-5);
  }
  SUBCASE("q8_0, head_dim 256, group 8 (16-byte rows: 16-byte copies)") {
    check_replay<256, 2, 8, 272>({16384, dtype::kQ8_0, 1, 8, {7, 2000}, 0.0f, true}, 1e-5);
  }
}

TEST_CASE("cuda backend: compile-time and run-time availability, URI errors") {
  static_assert(kv_backend<cuda_backend>);
  CHECK(cuda_backend::kScheme == "cuda");
#if defined(INSTINFER_WITH_CUDA) && INSTINFER_WITH_CUDA
  CHECK(cuda_backend::compiled_in());
#else
  CHECK_FALSE(cuda_backend::compiled_in());
#endif
  CHECK(cuda_backend::available() == (cuda_backend::compiled_in() && cuda_device_count() > 0));

  const auto make = [](const char* text) {
    auto uri = backend_uri::parse(text);
    REQUIRE(uri.ok());
    return make_cuda_backend(*uri);
  };
  if (!cuda_backend::compiled_in()) {
    auto b = make("cuda:0");
    REQUIRE_FALSE(b.ok());
    CHECK(b.error().code() == errc::kUnsupported);
    return;
  }
  for (const char* bad : {"cuda:x", "cuda:-1", "cuda:0x", "cuda:0?capacity=lots", "cuda:0?bogus=1", "host"}) {
    CAPTURE(bad);
    auto b = make(bad);
    REQUIRE_FALSE(b.ok());
    CHECK(b.error().code() == errc::kInvalidArgument);
    CHECK_FALSE(b.error().message().empty());
  }
  auto b = make("cuda:0?capacity=1M");
  if (cuda_device_count() == 0) {
    REQUIRE_FALSE(b.ok());
    CHECK(b.error().code() == errc::kUnsupported);
    CHECK(b.error().message().find("no CUDA device") != std::string::npos);
  } else {
    CHECK(b.ok());
    auto far = make("cuda:4096");
    REQUIRE_FALSE(far.ok());
    CHECK(far.error().code() == errc::kInvalidArgument);
  }
}

TEST_CASE("cuda backend: calls before configure() fail cleanly") {
  if (!cuda_backend::compiled_in()) return;
  cuda_backend b;
  CHECK(b.capacity_chunks() == 0);
  CHECK(b.free_chunks() == 0);
  auto id = b.allocate_chunk({});
  REQUIRE_FALSE(id.ok());
  CHECK(id.error().code() == errc::kInvalidArgument);
  std::byte row[16]{};
  CHECK(b.write_tokens(0, {}, 0, 1, row, row).code() == errc::kInvalidArgument);
  CHECK(b.read_chunk(0, 1, row).code() == errc::kInvalidArgument);
  CHECK(b.attend(0, {}).code() == errc::kInvalidArgument);
  CHECK(b.chunk_device_ptr(0) == nullptr);
  b.release_chunk(0);  // ignored
  backend_config cfg;
  cfg.shape = kv_shape{1, 4, 2, 128, dtype::kF16};
  auto page = page_geometry::make(4096, 128, dtype::kF16);
  REQUIRE(page.ok());
  cfg.page = *page;
  const status s = b.configure(cfg);
  if (cuda_device_count() == 0) {
    CHECK(s.code() == errc::kUnsupported);
  }
  cfg.shape.head_dim = 96;
  cuda_backend b2;
  CHECK(b2.configure(cfg).code() == errc::kUnsupported);  // head_dim checked before the device
}
