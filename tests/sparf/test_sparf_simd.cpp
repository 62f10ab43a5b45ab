// SparF's SIMD selection on every ISA this machine runs, the dense ends (sinks + recent window),
// and the multi-threaded host attender, each against the float64 reference (sparf_test_util.hpp).
#include <doctest/doctest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "instinfer/attention/decode.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "sparf_test_util.hpp"
#include "support/kv_test_util.hpp"

using namespace instinfer;
using namespace sparf_test;

namespace {

sparf_config make_cfg(uint32_t page, uint32_t d, dtype t, uint32_t kv_heads, uint32_t group, uint32_t cpp = 0) {
  const auto g = page_geometry::make(page, d, t).value();
  auto c = sparf_config::make(chunk_layout::make(g, kv_heads), cpp, group);
  REQUIRE(c.ok());
  return c.value();
}

std::vector<cpu_isa> isas_here() {
  std::vector<cpu_isa> v;
  for (cpu_isa isa : {cpu_isa::kScalar, cpu_isa::kAvx2, cpu_isa::kAvx512, cpu_isa::kNeon})
    if (cpu_isa_available(isa)) v.push_back(isa);
  return v;
}

struct sel_run {
  std::vector<float> out, lse, alpha;
  std::vector<uint32_t> selected, n_selected;
  uint32_t k = 0;
  status st;
};

sel_run run_isa(const stored_layer& s, const sparf_params& p, const float* q, cpu_isa isa) {
  sel_run r;
  const uint32_t H = s.cfg.n_kv_heads();
  r.k = sparf_resolve(p, s.cfg.head_dim(), s.n_tokens).value().k;
  r.out.assign(size_t{s.cfg.n_q_heads()} * s.cfg.head_dim(), 1234.5f);
  r.lse.assign(s.cfg.n_q_heads(), 1234.5f);
  r.alpha.assign(s.cfg.n_q_heads(), -1.0f);
  r.selected.assign(size_t{H} * r.k, UINT32_MAX);
  r.n_selected.assign(H, 0);
  sparf_workspace ws;
  REQUIRE(ws.set_isa(isa).ok());
  sparf_work w = s.work(q, r.out.data(), r.lse.data());
  w.selected = r.selected.data();
  w.n_selected = r.n_selected.data();
  w.alpha = r.alpha.data();
  r.st = sparf_attend(s.cfg, p, std::span<const sparf_work>(&w, 1), ws);
  return r;
}

}  // namespace

TEST_CASE("sparf: the SIMD selection matches the float64 reference on every ISA here, fresh random inputs") {
  struct shape {
    dtype t;
    uint32_t d, kv_heads, group, cpp, n;
    double c, spread;
    bool whole;
  };
  double worst = 0.0;
  uint64_t seed = 0x5eed;
  for (const shape& sh : {shape{dtype::kF16, 128, 2, 1, 4, 2333, 0.125, 2.0, true},
                          shape{dtype::kF16, 128, 1, 4, 4, 1999, 0.125, 0.0, true},
                          shape{dtype::kBF16, 64, 2, 2, 2, 1500, 0.25, 2.0, false},
                          shape{dtype::kF32, 128, 2, 1, 8, 1001, 0.125, 2.0, true},
                          shape{dtype::kQ8_0, 128, 2, 2, 4, 1777, 0.125, 2.0, true}}) {
    const sparf_config cfg = make_cfg(4096, sh.d, sh.t, sh.kv_heads, sh.group, sh.cpp);
    // Fresh random K, V and q (not the structured workload): scores with no designed gaps.
    const size_t rows = size_t{sh.n} * sh.kv_heads * sh.d;
    const auto k = random_values(rows, ++seed), v = random_values(rows, ++seed);
    auto q = random_values(size_t{sh.kv_heads} * sh.group * sh.d, ++seed);
    for (float& x : q) x *= 3.0f;  // some peaking
    const stored_layer s = store(cfg, k, v, sh.n, {300, 77});
    sparf_params p = sparf_params::with_compression(sh.c);
    p.page_spread = sh.spread;
    p.whole_pages = sh.whole;
    std::vector<double> ref;
    std::vector<uint32_t> ref_sel;
    sparf_reference(s, p, q.data(), ref, &ref_sel);
    std::vector<float> first;
    for (cpu_isa isa : isas_here()) {
      CAPTURE(cpu_isa_name(isa));
      CAPTURE(dtype_name(sh.t));
      CAPTURE(sh.group);
      const sel_run r = run_isa(s, p, q.data(), isa);
      REQUIRE(r.st.ok());
      const double err = max_rel_error(r.out.data(), ref.data(), sh.kv_heads * sh.group, sh.d);
      worst = std::max(worst, err);
      CHECK(err < 1e-4);
      // The selection itself: at most a near-tie apart from the reference's.
      const std::vector<uint32_t> got(r.selected.begin(), r.selected.begin() + r.n_selected[0]);
      std::vector<uint32_t> common;
      std::set_intersection(got.begin(), got.end(), ref_sel.begin(), ref_sel.end(), std::back_inserter(common));
      CHECK(got.size() == ref_sel.size());
      CHECK(common.size() + 2 >= ref_sel.size());
      CHECK(std::is_sorted(got.begin(), got.end()));
      for (float a : r.alpha) CHECK((a > 0.0f && a <= 1.0f));
      if (first.empty()) first = r.out;
    }
  }
  MESSAGE("SparF SIMD vs float64 reference, worst relative error (L2 per head): " << worst);
}

TEST_CASE("sparf: sinks + window are always selected; a budget covering everything is dense") {
  const uint32_t d = 128, H = 2, G = 2, n = 3001;
  const sparf_config cfg = make_cfg(4096, d, dtype::kF16, H, G);
  const size_t rows = size_t{n} * H * d;
  const auto k = random_values(rows, 91), v = random_values(rows, 92);
  auto q = random_values(size_t{H} * G * d, 93);
  for (float& x : q) x *= 3.0f;
  const stored_layer s = store(cfg, k, v, n);
  std::vector<double> dense, dense_lse;
  dense_reference(s, q.data(), dense, dense_lse);

  for (cpu_isa isa : isas_here()) {
    CAPTURE(cpu_isa_name(isa));
    SUBCASE("sinks + window covering the sequence: dense attention") {
      sparf_params p = sparf_params::with_compression(0.125);
      p.sink_tokens = 1000;
      p.window_tokens = 2001;
      const sel_run r = run_isa(s, p, q.data(), isa);
      REQUIRE(r.st.ok());
      CHECK(r.k == n);
      for (uint32_t h = 0; h < H; ++h) CHECK(r.n_selected[h] == n);
      for (float a : r.alpha) CHECK(a == 1.0f);
      const double err = max_rel_error(r.out.data(), dense.data(), H * G, d);
      MESSAGE("sinks + window = n vs float64 dense: " << err);
      CHECK(err < 1e-5);
      for (uint32_t qh = 0; qh < H * G; ++qh) CHECK(std::fabs(r.lse[qh] - dense_lse[qh]) < 1e-4);
    }
    SUBCASE("explicit k = n with sinks and window (they count toward k): dense attention") {
      sparf_params p = sparf_params::with_rk(16, n);
      p.sink_tokens = 100;
      p.window_tokens = 100;
      const sel_run r = run_isa(s, p, q.data(), isa);
      REQUIRE(r.st.ok());
      for (uint32_t h = 0; h < H; ++h) CHECK(r.n_selected[h] == n);
      CHECK(max_rel_error(r.out.data(), dense.data(), H * G, d) < 1e-5);
    }
    SUBCASE("sparse middle: sinks and window in the selection, reference agrees") {
      for (double spread : {2.0, 0.0}) {
        CAPTURE(spread);
        sparf_params p = sparf_params::with_compression(0.125);
        p.sink_tokens = 4;
        p.window_tokens = 64;
        p.page_spread = spread;
        const sel_run r = run_isa(s, p, q.data(), isa);
        REQUIRE(r.st.ok());
        const sparf_plan plan = sparf_resolve(p, d, n).value();
        CHECK(plan.sinks == 4);
        CHECK(plan.window == 64);
        for (uint32_t h = 0; h < H; ++h) {
          const uint32_t* sel = r.selected.data() + size_t{h} * r.k;
          const uint32_t m = r.n_selected[h];
          REQUIRE(m >= 68);
          CHECK(m <= plan.k);
          for (uint32_t i = 0; i < 4; ++i) CHECK(sel[i] == i);
          for (uint32_t i = 0; i < 64; ++i) CHECK(sel[m - 64 + i] == n - 64 + i);
          CHECK(std::is_sorted(sel, sel + m));
        }
        std::vector<double> ref;
        std::vector<uint32_t> ref_sel;
        sparf_reference(s, p, q.data(), ref, &ref_sel);
        const std::vector<uint32_t> got(r.selected.begin(), r.selected.begin() + r.n_selected[0]);
        std::vector<uint32_t> common;
        std::set_intersection(got.begin(), got.end(), ref_sel.begin(), ref_sel.end(), std::back_inserter(common));
        CHECK(common.size() + 2 >= ref_sel.size());
        const double err = max_rel_error(r.out.data(), ref.data(), H * G, d);
        MESSAGE("sinks 4 + window 64 vs float64 SparF reference: " << err);
        CHECK(err < 1e-4);
        // Not dense: the middle is sparse.
        CHECK(max_rel_error(r.out.data(), dense.data(), H * G, d) > 1e-6);
      }
    }
  }
}

TEST_CASE("attend_sparse on the host: multi-threaded equals single-threaded, bit for bit") {
  const kv_shape shape{1, 8, 4, 128, dtype::kF16};
  const uint32_t n = 5000;
  const auto work = test_support::workload(shape, n, 77);
  const size_t nq = size_t{shape.n_q_heads} * shape.head_dim;
  std::vector<std::vector<float>> outs, lses;
  std::vector<sparf_counters> counters;
  for (uint32_t threads : {1u, 2u, 3u, 4u}) {
    CAPTURE(threads);
    cache_options o = test_support::sparf_cache_options(shape, "host", 64ull << 20);
    o.n_threads = threads;
    auto cache = kv_cache::create(o);
    REQUIRE(cache.ok());
    kv_cache& c = *cache.value();
    const seq_id a = c.create_sequence().value(), b = c.create_sequence().value();
    const size_t row = size_t{shape.n_kv_heads} * shape.head_dim;
    REQUIRE(c.append(a, 0, n, work.k.data(), work.v.data(), dtype::kF32).ok());
    REQUIRE(c.append(b, 0, n - 1234, work.k.data() + 1234 * row, work.v.data() + 1234 * row, dtype::kF32).ok());
    std::vector<float> q2(work.q.begin(), work.q.end());
    q2.insert(q2.end(), work.q.rbegin(), work.q.rend());
    const seq_id seqs[2] = {a, b};
    for (int variant = 0; variant < 2; ++variant) {
      sparf_params p = sparf_params::with_compression(0.125);
      if (variant == 1) {
        p.sink_tokens = 16;
        p.window_tokens = 128;
      }
      std::vector<float> out(2 * nq), lse(2 * shape.n_q_heads);
      const sparf_counters before = c.stats().sparf;
      REQUIRE(c.attend_sparse(0, seqs, q2.data(), out.data(), lse.data(), p).ok());
      outs.push_back(out);
      lses.push_back(lse);
      counters.push_back(c.stats().sparf.since(before));
    }
  }
  for (size_t i = 2; i < outs.size(); ++i) {
    CAPTURE(i);
    CHECK(outs[i] == outs[i % 2]);
    CHECK(lses[i] == lses[i % 2]);
    CHECK(counters[i].selected_tokens == counters[i % 2].selected_tokens);
    CHECK(counters[i].token_pages_read == counters[i % 2].token_pages_read);
  }
  CHECK(outs[0] != outs[1]);  // the sinks + window variant differs
}
