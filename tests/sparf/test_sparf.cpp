#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "instinfer/attention/decode.hpp"
#include "sparf_test_util.hpp"

using namespace instinfer;
using namespace sparf_test;

namespace {

sparf_config make_cfg(uint32_t page, uint32_t d, dtype t, uint32_t kv_heads, uint32_t group, uint32_t cpp = 0) {
  const auto g = page_geometry::make(page, d, t).value();
  auto c = sparf_config::make(chunk_layout::make(g, kv_heads), cpp, group);
  REQUIRE(c.ok());
  return c.value();
}

struct run_result {
  std::vector<float> out, lse;
  sparf_counters counters;
  status st;
};

run_result run(const stored_layer& s, const sparf_params& p, const float* q) {
  run_result r;
  r.out.assign(size_t{s.cfg.n_q_heads()} * s.cfg.head_dim(), 1234.5f);
  r.lse.assign(s.cfg.n_q_heads(), 1234.5f);
  sparf_workspace ws;
  const sparf_work w = s.work(q, r.out.data(), r.lse.data());
  r.st = sparf_attend(s.cfg, p, std::span<const sparf_work>(&w, 1), ws, &r.counters);
  return r;
}

// Dense attention by the host decode kernels (the library's own) over the same chunks.
bool dense_kernel(const stored_layer& s, const float* q, std::vector<float>& out, std::vector<float>& lse) {
  decode_params dp;
  dp.layout = s.cfg.tokens;
  dp.group_size = s.cfg.group_size;
  dp.scale = s.cfg.scale;
  auto fn = select_decode_kernel(best_cpu_isa(), dp);
  if (!fn.ok()) return false;
  const uint32_t G = s.cfg.group_size, d = s.cfg.head_dim(), tpp = s.cfg.tokens.page.tokens_per_page;
  out.assign(size_t{s.cfg.n_q_heads()} * d, 0.0f);
  lse.assign(s.cfg.n_q_heads(), 0.0f);
  std::vector<softmax_stats> st(G);
  const uint32_t last = s.n_tokens - (static_cast<uint32_t>(s.chunk_ptrs.size()) - 1) * tpp;
  for (uint32_t h = 0; h < s.cfg.n_kv_heads(); ++h) {
    float* o = out.data() + size_t{h} * G * d;
    fn.value()(dp, s.chunk_ptrs.data(), static_cast<uint32_t>(s.chunk_ptrs.size()), last, h, q + size_t{h} * G * d, o,
               st.data());
    for (uint32_t g = 0; g < G; ++g) {
      normalize_state(st[g], o + size_t{g} * d, d);
      lse[size_t{h} * G + g] = state_lse(st[g]);
    }
  }
  return true;
}

}  // namespace

TEST_CASE("sparf_resolve: compression gives SparQ's split; 1 is dense") {
  auto p1 = sparf_resolve(sparf_params::with_compression(1.0), 128, 1000).value();
  CHECK(p1.r == 128);
  CHECK(p1.k == 1000);
  sparf_params plain = sparf_params::with_compression(0.125);
  plain.sink_tokens = plain.window_tokens = 0;
  auto p8 = sparf_resolve(plain, 128, 1024).value();
  CHECK(p8.r == 16);
  CHECK(p8.k == 64);  // 16 * 1024 + 2 * 64 * 128 = 1/8 of 2 * 1024 * 128
  // The default dense ends (16 sinks, 64 recent) raise k to hold them.
  auto ends = sparf_resolve(sparf_params::with_compression(0.125), 128, 1024).value();
  CHECK(ends.r == 16);
  CHECK(ends.k == 80);
  CHECK(ends.sinks == 16);
  CHECK(ends.window == 64);
  plain.compression = 1.0 / 16;
  auto tiny = sparf_resolve(plain, 64, 3).value();
  CHECK(tiny.r == 4);
  CHECK(tiny.k == 1);
  CHECK(sparf_resolve(sparf_params::with_compression(1.0 / 16), 64, 3).value().k == 3);  // all sinks
  auto ex = sparf_resolve(sparf_params::with_rk(8, 100), 128, 100).value();
  CHECK(ex.r == 8);
  CHECK(ex.k == 100);
}

TEST_CASE("sparf_resolve: the channel share moves the budget between columns and rows, keeping it") {
  // r = ceil(2 S c d), k = ceil((1 - S) c n); the K+V values read, r n + 2 k d, stay c of 2 n d
  // (exactly when nothing rounds).
  const uint32_t d = 128, n = 65536;
  for (const double c : {0.5, 0.25, 0.125, 0.0625})
    for (const double share : {0.125, 0.25, 0.375, 0.5, 0.75}) {
      sparf_params p = sparf_params::with_compression(c);
      p.channel_share = share;
      p.sink_tokens = p.window_tokens = 0;
      const sparf_plan plan = sparf_resolve(p, d, n).value();
      CAPTURE(c);
      CAPTURE(share);
      CHECK(plan.r == static_cast<uint32_t>(std::ceil(2.0 * share * c * d)));
      CHECK(plan.k == static_cast<uint32_t>(std::ceil((1.0 - share) * c * n)));
      const double values = static_cast<double>(plan.r) * n + 2.0 * plan.k * d;
      CHECK(values / (2.0 * n * d) == doctest::Approx(c).epsilon(0.01));
      CHECK(static_cast<double>(plan.r) * n / values == doctest::Approx(share).epsilon(0.02));
    }
  // The even split is the default and SparQ's.
  sparf_params even = sparf_params::with_compression(0.25);
  CHECK(even.channel_share == 0.5);
  even.sink_tokens = even.window_tokens = 0;
  CHECK(sparf_resolve(even, d, n).value().r == 32);
  CHECK(sparf_resolve(even, d, n).value().k == n / 8);
  // Clamped to one channel and one token; ignored by explicit r and k and by compression 1.
  sparf_params tiny = sparf_params::with_compression(0.01);
  tiny.channel_share = 0.01;
  tiny.sink_tokens = tiny.window_tokens = 0;
  CHECK(sparf_resolve(tiny, 64, 10).value().r == 1);
  CHECK(sparf_resolve(tiny, 64, 10).value().k == 1);
  sparf_params ex = sparf_params::with_rk(8, 100);
  ex.channel_share = 0.9;
  CHECK(sparf_resolve(ex, d, 1000).value().k == 100);
  sparf_params one = sparf_params::with_compression(1.0);
  one.channel_share = 0.1;
  CHECK(sparf_resolve(one, d, 1000).value().k == 1000);
  // Out of (0, 1), NaN: refused, naming the field; a changed share is another selection.
  for (const double bad : {0.0, 1.0, -0.5, 2.0, std::nan("")}) {
    sparf_params b = sparf_params::with_compression(0.125);
    b.channel_share = bad;
    const auto st = sparf_resolve(b, d, n);
    REQUIRE_FALSE(st.ok());
    CHECK(st.error().code() == errc::kInvalidArgument);
    CHECK(st.error().message().find("channel_share") != std::string::npos);
  }
  sparf_params other = sparf_params::with_compression(0.125);
  other.channel_share = 0.25;
  CHECK_FALSE(other.same_selection(sparf_params::with_compression(0.125)));
}

TEST_CASE("sparf: bad parameters are clear errors and write nothing") {
  const sparf_config cfg = make_cfg(4096, 128, dtype::kF16, 2, 2);
  const uint32_t n = 300;
  const auto k = random_values(size_t{n} * 2 * 128, 1), v = random_values(k.size(), 2);
  const auto q = random_values(size_t{4} * 128, 3);
  const stored_layer s = store(cfg, k, v, n);
  struct bad {
    sparf_params p;
    const char* what;
  };
  const double nan = std::nan("");
  for (const bad& b :
       {bad{sparf_params::with_rk(0, 10), "r (channels)"}, bad{sparf_params::with_rk(129, 10), "r (channels)"},
        bad{sparf_params::with_rk(8, 0), "k (tokens)"}, bad{sparf_params::with_rk(8, 301), "exceeds"},
        bad{sparf_params::with_compression(0.0), "compression"},
        bad{sparf_params::with_compression(-0.5), "compression"},
        bad{sparf_params::with_compression(1.5), "compression"},
        bad{sparf_params::with_compression(nan), "compression"},
        bad{[] {
              auto p = sparf_params{};
              p.page_spread = 0.5;
              return p;
            }(),
            "page_spread"}}) {
    CAPTURE(b.what);
    const run_result r = run(s, b.p, q.data());
    CHECK(r.st.code() == errc::kInvalidArgument);
    CHECK(r.st.message().find(b.what) != std::string::npos);
    CHECK(std::all_of(r.out.begin(), r.out.end(), [](float x) { return x == 1234.5f; }));
    CHECK(r.counters.items == 0);
  }
  // A malformed work item (chunk count disagrees with the token count).
  sparf_work w = s.work(q.data(), nullptr, nullptr);
  std::vector<float> out(4 * 128);
  w.out = out.data();
  w.n_chunks -= 1;
  sparf_workspace ws;
  const status st = sparf_attend(cfg, sparf_params{}, std::span<const sparf_work>(&w, 1), ws);
  CHECK(st.code() == errc::kInvalidArgument);
  CHECK(st.message().find("chunks") != std::string::npos);
  // A layout that disagrees with the chunks.
  sparf_config broken = cfg;
  broken.columns.head_dim = 64;
  w.n_chunks += 1;
  CHECK(sparf_attend(broken, sparf_params{}, std::span<const sparf_work>(&w, 1), ws).code() == errc::kInvalidArgument);
}

TEST_CASE("sparf: compression 1 equals dense attention within 1e-5 (float64 reference and host kernels)") {
  struct shape {
    uint32_t page, d, kv_heads, group;
    dtype t;
    uint32_t n;
  };
  for (const shape& sh : {shape{4096, 128, 2, 1, dtype::kF16, 1000}, shape{4096, 128, 2, 4, dtype::kF16, 1537},
                          shape{1024, 64, 3, 2, dtype::kF32, 333}, shape{4096, 128, 1, 8, dtype::kBF16, 2048},
                          shape{16384, 256, 1, 1, dtype::kF16, 700}, shape{4096, 64, 2, 1, dtype::kF16, 1}}) {
    CAPTURE(sh.d);
    CAPTURE(sh.group);
    CAPTURE(sh.n);
    const sparf_config cfg = make_cfg(sh.page, sh.d, sh.t, sh.kv_heads, sh.group);
    const uint32_t hq = sh.kv_heads * sh.group;
    // Peaked, structured inputs and plain random ones.
    for (int kind = 0; kind < 2; ++kind) {
      std::vector<float> k, v, q;
      if (kind == 0) {
        synthetic::attention_workload_params wp;
        wp.n_tokens = sh.n;
        wp.n_kv_heads = sh.kv_heads;
        wp.group_size = sh.group;
        wp.head_dim = sh.d;
        wp.seed = 100 + sh.n;
        auto wl = synthetic::make_attention_workload(wp);
        k = wl.k, v = wl.v, q = wl.q;
      } else {
        k = random_values(size_t{sh.n} * sh.kv_heads * sh.d, sh.n);
        v = random_values(k.size(), sh.n + 1);
        q = random_values(size_t{hq} * sh.d, sh.n + 2);
      }
      const stored_layer s = store(cfg, k, v, sh.n, {5, 100, 1});
      const run_result r = run(s, sparf_params::with_compression(1.0), q.data());
      REQUIRE(r.st.ok());
      std::vector<double> ref, ref_lse;
      dense_reference(s, q.data(), ref, ref_lse);
      CHECK(max_rel_error(r.out.data(), ref.data(), hq, sh.d) < 1e-5);
      for (uint32_t h = 0; h < hq; ++h) CHECK(r.lse[h] == doctest::Approx(ref_lse[h]).epsilon(1e-5));
      CHECK(r.counters.selected_tokens == uint64_t{sh.n} * sh.kv_heads);
      CHECK(r.counters.token_pages_read == r.counters.dense_pages);
      std::vector<float> kout, klse;
      if (dense_kernel(s, q.data(), kout, klse)) {
        std::vector<double> kd(kout.begin(), kout.end());
        CHECK(max_rel_error(r.out.data(), kd.data(), hq, sh.d) < 1e-5);
        for (uint32_t h = 0; h < hq; ++h) CHECK(r.lse[h] == doctest::Approx(klse[h]).epsilon(1e-5));
      } else {
        MESSAGE("no host decode kernel for this shape; compared with the float64 reference only");
      }
    }
  }
}

TEST_CASE("sparf: compression < 1 matches the float64 SparF reference") {
  struct shape {
    uint32_t d, kv_heads, group, cpp;
    bool whole;
    double c;
    double spread = 2.0;
  };
  for (const shape& sh :
       {shape{128, 2, 1, 4, true, 0.125}, shape{128, 2, 1, 4, false, 0.125}, shape{128, 2, 1, 4, true, 0.125, 0.0},
        shape{128, 1, 4, 4, true, 0.125, 0.0}, shape{128, 1, 4, 8, true, 0.25}, shape{64, 2, 2, 2, false, 0.5},
        shape{128, 1, 1, 2, true, 1.0 / 16}}) {
    CAPTURE(sh.group);
    CAPTURE(sh.whole);
    CAPTURE(sh.c);
    const sparf_config cfg = make_cfg(4096, sh.d, dtype::kF16, sh.kv_heads, sh.group, sh.cpp);
    synthetic::attention_workload_params wp;
    wp.n_tokens = 1500;
    wp.n_kv_heads = sh.kv_heads;
    wp.group_size = sh.group;
    wp.head_dim = sh.d;
    wp.seed = 7;
    const auto wl = synthetic::make_attention_workload(wp);
    const stored_layer s = store(cfg, wl.k, wl.v, wp.n_tokens);
    sparf_params p = sparf_params::with_compression(sh.c);
    p.whole_pages = sh.whole;
    p.page_spread = sh.spread;
    p.sink_tokens = p.window_tokens = 0;  // plain SparF: the bounds below were measured so
    CAPTURE(sh.spread);
    const run_result r = run(s, p, wl.q.data());
    REQUIRE(r.st.ok());
    std::vector<double> ref, dense, dense_lse;
    sparf_reference(s, p, wl.q.data(), ref);
    dense_reference(s, wl.q.data(), dense, dense_lse);
    const uint32_t hq = sh.kv_heads * sh.group;
    CHECK(max_rel_error(r.out.data(), ref.data(), hq, sh.d) < 1e-4);
    // It is an approximation: not dense, but close on peaked inputs.
    const double err = max_rel_error(r.out.data(), dense.data(), hq, sh.d);
    CHECK(err > 1e-6);
    if (sh.c >= 0.125) CHECK(err < 0.5);
    const sparf_plan plan = sparf_resolve(p, sh.d, wp.n_tokens).value();
    CHECK(r.counters.selected_tokens <= uint64_t{plan.k} * sh.kv_heads);
    CHECK(r.counters.selected_tokens >= uint64_t{plan.k} * sh.kv_heads * 3 / 4);
    if (sh.whole) CHECK(r.counters.channels_used % sh.cpp == 0);
  }
}

TEST_CASE("sparf: dual-step loading reads at most 1/4 of dense pages at compression 1/8 on realistic inputs") {
  for (uint32_t n : {1024u, 2048u, 4096u}) {
    for (uint64_t seed : {1u, 2u, 3u}) {
      CAPTURE(n);
      CAPTURE(seed);
      const sparf_config cfg = make_cfg(4096, 128, dtype::kF16, 4, 1);
      synthetic::attention_workload_params wp;
      wp.n_tokens = n;
      wp.n_kv_heads = 4;
      wp.seed = seed;
      const auto wl = synthetic::make_attention_workload(wp);
      const stored_layer s = store(cfg, wl.k, wl.v, n);
      sparf_params plain;  // default: 1/8; plain SparF, since the ends would count beyond the split
      plain.sink_tokens = plain.window_tokens = 0;
      const run_result r = run(s, plain, wl.q.data());
      REQUIRE(r.st.ok());
      const sparf_counters& c = r.counters;
      CHECK(c.page_fraction() <= 0.25);
      CHECK(c.token_pages_read < c.dense_pages);  // whole pages were skipped
      CHECK(c.byte_fraction() <= 0.125 + 1e-9);   // only the selected entries are used
      CHECK(c.channel_pages_read > 0);
      MESSAGE("n=" << n << " pages " << c.page_fraction() << " bytes " << c.byte_fraction());
    }
  }
}

TEST_CASE("sparf: the same stored values give the same result however they are fed") {
  const sparf_config cfg = make_cfg(4096, 128, dtype::kF16, 2, 2, 4);
  synthetic::attention_workload_params wp;
  wp.n_tokens = 1300;
  wp.n_kv_heads = 2;
  wp.group_size = 2;
  wp.seed = 9;
  const auto wl = synthetic::make_attention_workload(wp);
  const stored_layer a = store(cfg, wl.k, wl.v, wp.n_tokens);
  const stored_layer b = store(cfg, wl.k, wl.v, wp.n_tokens, {1});
  const stored_layer c = store(cfg, wl.k, wl.v, wp.n_tokens, {17, 511, 3, 600});
  stored_layer dd = c;  // copies of the chunks and index at other addresses
  dd.chunk_ptrs.clear();
  for (const auto& ch : dd.chunks) dd.chunk_ptrs.push_back(ch.data());
  const stored_layer& d = dd;
  for (double comp : {1.0, 0.25, 0.125, 1.0 / 16}) {
    CAPTURE(comp);
    const auto p = sparf_params::with_compression(comp);
    const run_result ra = run(a, p, wl.q.data());
    REQUIRE(ra.st.ok());
    for (const stored_layer* s : {&b, &c, &d}) {
      const run_result rb = run(*s, p, wl.q.data());
      REQUIRE(rb.st.ok());
      CHECK(std::memcmp(ra.out.data(), rb.out.data(), ra.out.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(ra.lse.data(), rb.lse.data(), ra.lse.size() * sizeof(float)) == 0);
      CHECK(ra.counters.pages_read() == rb.counters.pages_read());
    }
  }
  // A batch of two sequences gives each the result it gets alone.
  const auto q2 = random_values(wl.q.size(), 77);
  std::vector<float> o1(wl.q.size()), o2(wl.q.size());
  const sparf_work w[2] = {a.work(wl.q.data(), o1.data(), nullptr), c.work(q2.data(), o2.data(), nullptr)};
  sparf_workspace ws;
  sparf_counters both;
  REQUIRE(sparf_attend(cfg, sparf_params{}, std::span<const sparf_work>(w, 2), ws, &both).ok());
  const run_result alone = run(c, sparf_params{}, q2.data());
  CHECK(std::memcmp(alone.out.data(), o2.data(), o2.size() * sizeof(float)) == 0);
  CHECK(both.items == 2 * 2);
}

TEST_CASE("sparf: dual-step loading: select, read only the needed token pages, attend") {
  const sparf_config cfg = make_cfg(4096, 128, dtype::kF16, 3, 2, 4);
  synthetic::attention_workload_params wp;
  wp.n_tokens = 2500;
  wp.n_kv_heads = 3;
  wp.group_size = 2;
  wp.seed = 31;
  const auto wl = synthetic::make_attention_workload(wp);
  const stored_layer s = store(cfg, wl.k, wl.v, wp.n_tokens);
  const sparf_params p;  // 1/8
  const sparf_plan plan = sparf_resolve(p, 128, wp.n_tokens).value();
  std::vector<uint32_t> sel(size_t{3} * plan.k), nsel(3);
  sparf_work w = s.work(wl.q.data(), nullptr, nullptr);
  w.chunks = nullptr;  // step one needs no token pages
  w.selected = sel.data();
  w.n_selected = nsel.data();
  sparf_workspace ws;
  sparf_counters c1;
  REQUIRE(sparf_select(cfg, p, std::span<const sparf_work>(&w, 1), ws, &c1).ok());
  CHECK(c1.token_pages_read == 0);
  CHECK(c1.channel_pages_read > 0);
  // The pages a storage backend would read: chunks holding a selected token, of any kv head.
  std::vector<const std::byte*> needed(s.chunk_ptrs.size(), nullptr);
  uint64_t pages = 0;
  for (uint32_t h = 0; h < 3; ++h) {
    CHECK(nsel[h] <= plan.k);
    CHECK(nsel[h] > 0);
    std::vector<char> hit(s.chunk_ptrs.size(), 0);
    for (uint32_t j = 0; j < nsel[h]; ++j) {
      const uint32_t t = sel[size_t{h} * plan.k + j];
      if (j > 0) CHECK(t > sel[size_t{h} * plan.k + j - 1]);  // ascending, distinct
      const uint32_t ch = t / cfg.tokens.page.tokens_per_page;
      needed[ch] = s.chunk_ptrs[ch];
      pages += hit[ch] ? 0 : 2;
      hit[ch] = 1;
    }
  }
  std::vector<float> out(size_t{6} * 128), lse(6);
  sparf_work w2 = s.work(wl.q.data(), out.data(), lse.data());
  w2.chunks = needed.data();
  sparf_counters c2;
  REQUIRE(sparf_attend(cfg, p, std::span<const sparf_work>(&w2, 1), ws, &c2).ok());
  CHECK(c2.token_pages_read == pages);
  const run_result full = run(s, p, wl.q.data());
  REQUIRE(full.st.ok());
  CHECK(std::memcmp(full.out.data(), out.data(), out.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(full.lse.data(), lse.data(), lse.size() * sizeof(float)) == 0);
  // sparf_select without somewhere to put the selection is an error.
  sparf_work bad = w;
  bad.selected = nullptr;
  CHECK(sparf_select(cfg, p, std::span<const sparf_work>(&bad, 1), ws).code() == errc::kInvalidArgument);
}

TEST_CASE("sparf: a preselected attend reuses sparf_select's tokens and alpha, bit for bit, and checks them") {
  const sparf_config cfg = make_cfg(4096, 128, dtype::kF16, 2, 3, 4);
  synthetic::attention_workload_params wp;
  wp.n_tokens = 3000;
  wp.n_kv_heads = 2;
  wp.group_size = 3;
  wp.seed = 41;
  const auto wl = synthetic::make_attention_workload(wp);
  const stored_layer s = store(cfg, wl.k, wl.v, wp.n_tokens);
  for (double c : {1.0, 0.25, 0.125}) {
    CAPTURE(c);
    const sparf_params p = sparf_params::with_compression(c);
    const sparf_plan plan = sparf_resolve(p, 128, wp.n_tokens).value();
    std::vector<uint32_t> sel(size_t{2} * plan.k), nsel(2);
    std::vector<float> alpha(6), full(wl.q.size()), pre(wl.q.size()), full_lse(6), pre_lse(6);
    sparf_workspace ws;
    sparf_counters once, select_part, attend_part;
    sparf_work w = s.work(wl.q.data(), full.data(), full_lse.data());
    REQUIRE(sparf_attend(cfg, p, std::span<const sparf_work>(&w, 1), ws, &once).ok());
    w.out = pre.data();
    w.lse = pre_lse.data();
    w.selected = sel.data();
    w.n_selected = nsel.data();
    w.alpha = alpha.data();
    REQUIRE(sparf_select(cfg, p, std::span<const sparf_work>(&w, 1), ws, &select_part).ok());
    w.preselected = true;
    REQUIRE(sparf_attend(cfg, p, std::span<const sparf_work>(&w, 1), ws, &attend_part).ok());
    CHECK(std::memcmp(full.data(), pre.data(), full.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(full_lse.data(), pre_lse.data(), full_lse.size() * sizeof(float)) == 0);
    select_part.add(attend_part);  // the two calls together count what one full attend counts
    CHECK(select_part.pages_read() == once.pages_read());
    CHECK(select_part.dense_pages == once.dense_pages);
    CHECK(select_part.items == once.items);
    CHECK(select_part.selected_tokens == once.selected_tokens);
    if (c < 1.0) {
      // A selection that sparf_select could not have produced is refused, not trusted.
      std::swap(sel[0], sel[1]);
      CHECK(sparf_attend(cfg, p, std::span<const sparf_work>(&w, 1), ws).code() == errc::kInvalidArgument);
      std::swap(sel[0], sel[1]);
      const uint32_t keep = sel[0];
      sel[0] = wp.n_tokens;
      CHECK(sparf_attend(cfg, p, std::span<const sparf_work>(&w, 1), ws).code() == errc::kInvalidArgument);
      sel[0] = keep;
      nsel[1] = plan.k + 1;
      CHECK(sparf_attend(cfg, p, std::span<const sparf_work>(&w, 1), ws).code() == errc::kInvalidArgument);
      w.alpha = nullptr;
      CHECK(sparf_attend(cfg, p, std::span<const sparf_work>(&w, 1), ws).code() == errc::kInvalidArgument);
    }
  }
}

TEST_CASE("sparf: the threshold top-k equals a full sort in ranking order, ties to the lower index") {
  // Fresh random scores with many ties, signed zeros and -inf (masked-out logits); the top `want`
  // of the candidates must be exactly the first `want` of a stable sort by score, descending.
  std::mt19937 rng(20261201);
  for (int it = 0; it < 3000; ++it) {
    const uint32_t n = 1 + rng() % 700, per = 1 + rng() % 20;
    std::vector<float> score(n);
    const int mode = static_cast<int>(rng() % 4);
    for (float& x : score) {
      if (mode == 0) x = std::uniform_real_distribution<float>(-4.0f, 4.0f)(rng);
      if (mode == 1) x = static_cast<float>(static_cast<int>(rng() % 5) - 2);  // heavy ties
      if (mode == 2) x = rng() % 2 ? 0.0f : -0.0f;                             // +0 == -0
      if (mode == 3) x = rng() % 4 == 0 ? -INFINITY : std::normal_distribution<float>()(rng);
    }
    const uint32_t lo = rng() % n, hi = lo + rng() % (n - lo + 1);
    std::vector<uint8_t> pick((n + per - 1) / per);
    for (uint8_t& p : pick) p = rng() % 3 != 0;
    const bool use_pick = rng() % 2;
    std::vector<uint32_t> cand;
    for (uint32_t i = lo; i < hi; ++i)
      if (!use_pick || pick[i / per]) cand.push_back(i);
    const uint32_t want = static_cast<uint32_t>(rng() % (cand.size() + 2));
    std::stable_sort(cand.begin(), cand.end(), [&](uint32_t a, uint32_t b) { return score[a] > score[b]; });
    cand.resize(std::min<size_t>(want, cand.size()));
    std::sort(cand.begin(), cand.end());
    std::vector<uint32_t> out(n + 1, UINT32_MAX);
    std::vector<uint32_t> scratch(2 * size_t{n});
    const uint32_t got = sparf_detail::top_ascending(score.data(), lo, hi, use_pick ? pick.data() : nullptr, per, want,
                                                     out.data(), scratch.data());
    CAPTURE(it);
    CAPTURE(mode);
    REQUIRE(got == cand.size());
    CHECK(std::equal(cand.begin(), cand.end(), out.begin()));
  }
}

TEST_CASE("SparF top-k over scores with NaNs (a non-finite query): exactly `want` tokens, NaNs last") {
  // Found by the drive fuzzer: NaN scores broke nth_element's order, and more than `want` tokens
  // passed the threshold into a buffer sized for want.
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  for (int round = 0; round < 50; ++round) {
    const uint32_t n = 64;
    std::vector<float> score(n);
    for (float& x : score) x = u(rng);
    uint32_t n_nan = 0;
    for (uint32_t i = 0; i < n; ++i)
      if (rng() % 3 == 0) score[i] = std::numeric_limits<float>::quiet_NaN(), ++n_nan;
    const uint32_t want = 1 + static_cast<uint32_t>(rng() % (n - 1));
    std::vector<uint32_t> out(n, UINT32_MAX);
    std::vector<uint32_t> scratch(2 * size_t{n});
    const uint32_t got = sparf_detail::top_ascending(score.data(), 0, n, nullptr, 1, want, out.data(), scratch.data());
    REQUIRE(got == want);
    CHECK(std::is_sorted(out.begin(), out.begin() + got));
    // Every finite score chosen is at least every finite score left out; NaNs only when the
    // finite ones ran out.
    float min_in = INFINITY, max_out = -INFINITY;
    uint32_t nan_in = 0;
    std::vector<bool> in(n, false);
    for (uint32_t j = 0; j < got; ++j) in[out[j]] = true;
    for (uint32_t i = 0; i < n; ++i) {
      if (std::isnan(score[i])) {
        nan_in += in[i];
        continue;
      }
      if (in[i])
        min_in = std::min(min_in, score[i]);
      else
        max_out = std::max(max_out, score[i]);
    }
    CHECK(min_in >= max_out);
    CHECK(nan_in == (want > n - n_nan ? want - (n - n_nan) : 0u));
  }
}
