// The page-summary policy (Quest-style): the bound, the plan and the selection as pure functions,
// then kv_cache::attend_sparse with policy kPageSummary on host, ssd and csd (in the drive) against
// a float64 reference over the groups an independent float64 selection chooses; budget 1 equals
// dense; summaries follow fork and truncation; bad inputs and a missing policy are refused.
#include <doctest/doctest.h>

#include <unistd.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "instinfer/attention/sparf/page_summary.hpp"
#include "instinfer/attention/sparf/score.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "instinfer/testing/reference.hpp"
#include "sparf/sparf_test_util.hpp"
#include "support/kv_test_util.hpp"

using namespace instinfer;

namespace {

double sparf_test_rel(const std::vector<float>& got, const std::vector<float>& want) {
  double e = 0, m = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    e = std::max(e, std::fabs(double(got[i]) - want[i]));
    m = std::max(m, std::fabs(double(want[i])));
  }
  return m > 0 ? e / m : e;
}

std::vector<std::string> uris() {
  std::vector<std::string> u{"host"};
  if (describe_backends().find("ssd") != std::string::npos) {
    const char* tmp = std::getenv("TMPDIR");
    u.push_back(std::string("ssd:") + (tmp ? tmp : "/tmp") + "/instinfer-pages-" + std::to_string(getpid()) +
                ".bin?capacity=64M");
  }
  if (describe_backends().find("csd") != std::string::npos)  // the drive keeps the summaries and runs the policy
    u.push_back("csd:?channels=4&dies=2&blocks_per_die=128&pages_per_block=16&cores=2");
  return u;
}

// Page summaries in host memory (cache_stats::page_summary_bytes): none where the drive keeps them.
bool in_drive(const std::string& uri) {
  return uri.rfind("csd:", 0) == 0;
}

cache_options options(const kv_shape& shape, const std::string& uri, bool sparf) {
  cache_options o = test_support::sparf_cache_options(shape, uri, 64ull << 20);
  o.sparf = sparf;
  o.page_summaries = true;
  o.n_threads = 2;
  return o;
}

// Rows as stored (f16), with a per-token offset so that groups differ in importance.
struct rows {
  std::vector<f16_t> k, v;  // [n][n_kv_heads][head_dim]
};
rows random_rows(const kv_shape& s, uint32_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  rows r;
  const size_t per = size_t{s.n_kv_heads} * s.head_dim;
  r.k.resize(n * per);
  r.v.resize(n * per);
  for (uint32_t t = 0; t < n; ++t) {
    const float bump = (t / 37) % 5 == 0 ? 1.5f : 0.0f;  // some stretches line up with the query
    for (size_t i = 0; i < per; ++i) {
      r.k[t * per + i] = float_to_f16(nd(rng) + bump);
      r.v[t * per + i] = float_to_f16(nd(rng));
    }
  }
  return r;
}

std::vector<float> random_q(const kv_shape& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.5f, 1.0f);
  std::vector<float> q(size_t{s.n_q_heads} * s.head_dim);
  for (float& x : q) x = nd(rng);
  return q;
}

// Float64 expectation: per kv head, the groups the policy should choose (bounds in double from the
// stored values, same tie rule), then exact attention over their rows.
// The rows as the cache stores them (f16, or quantized on append), read back as floats: exact,
// since f16 widens exactly and a quantized value is its integer times its block's f16 scale.
struct stored_rows {
  std::vector<float> k, v;  // [n][n_kv_heads][head_dim]
};
stored_rows as_stored(const rows& r, dtype t, uint32_t d) {
  const auto one = [&](const std::vector<f16_t>& src, std::vector<float>& out) {
    const size_t n_rows = src.size() / d, row = dtype_row_bytes(t, d);
    std::vector<std::byte> cast(n_rows * row);
    REQUIRE(convert_elements(src.data(), dtype::kF16, cast.data(), t, src.size()));
    out.resize(src.size());
    for (size_t i = 0; i < n_rows; ++i)
      for (uint32_t c = 0; c < d; ++c) out[i * d + c] = load_as_float(cast.data() + i * row, t, c);
  };
  stored_rows s;
  one(r.k, s.k);
  one(r.v, s.v);
  return s;
}

std::vector<double> expected(const kv_shape& s, const stored_rows& r, uint32_t n, uint32_t tpp, const sparf_params& p,
                             const std::vector<float>& q) {
  return sparf_test::page_summary_reference_rows(r.k.data(), r.v.data(), n, s.n_kv_heads, s.group_size(), s.head_dim,
                                                 tpp, p, q.data(), 1.0 / std::sqrt(double(s.head_dim)), 0.0);
}

}  // namespace

TEST_CASE("page summary score kernel: every built ISA against the float64 bound, only the asked range written") {
  std::mt19937_64 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  for (const uint32_t d : {64u, 68u, 128u})
    for (const uint32_t G : {1u, 3u, 4u, 5u, 8u}) {
      const uint32_t H = 3, n_groups = 37;
      std::vector<std::vector<float>> blocks(n_groups, std::vector<float>(page_summary_floats(H, d)));
      for (auto& b : blocks)
        for (uint32_t h = 0; h < H; ++h)
          for (uint32_t c = 0; c < d; ++c) {  // a min <= max pair per channel, of either sign
            const float x = nd(rng), y = nd(rng);
            b[size_t{2} * h * d + c] = std::min(x, y);
            b[size_t{2} * h * d + d + c] = std::max(x, y);
          }
      std::vector<const float*> ptrs;
      for (const auto& b : blocks) ptrs.push_back(b.data());
      std::vector<float> q(size_t{H} * G * d);
      for (float& x : q) x = nd(rng);
      for (const cpu_isa isa : {cpu_isa::kScalar, cpu_isa::kAvx2, cpu_isa::kAvx512, cpu_isa::kNeon}) {
        if (!cpu_isa_available(isa)) continue;
        CAPTURE(cpu_isa_name(isa));
        CAPTURE(d);
        CAPTURE(G);
        auto fn = select_page_summary_score_kernel(isa);
        REQUIRE(fn.ok());
        std::vector<float> scores(size_t{H} * n_groups, -12345.0f);
        page_summary_score_args a;
        a.groups = ptrs.data();
        a.n_groups = n_groups;
        a.group_begin = 5;
        a.group_end = 30;
        a.kv_begin = 1;
        a.n_kv = 2;
        a.head_dim = d;
        a.group_size = G;
        a.q = q.data();
        a.scores = scores.data();
        fn.value()(a);
        double worst = 0;
        for (uint32_t h = 0; h < H; ++h)
          for (uint32_t g = 0; g < n_groups; ++g) {
            const float got = scores[size_t{h} * n_groups + g];
            if (h < a.kv_begin || g < a.group_begin || g >= a.group_end) {
              CHECK(got == -12345.0f);
              continue;
            }
            const float* mn = blocks[g].data() + size_t{2} * h * d;
            double best = -INFINITY, mag = 0;
            for (uint32_t j = 0; j < G; ++j) {
              double s = 0;
              for (uint32_t c = 0; c < d; ++c) {
                const double qc = q[(size_t{h} * G + j) * d + c];
                s += std::max(qc * mn[c], qc * mn[d + c]);
                mag += std::fabs(qc * mn[c]) + std::fabs(qc * mn[d + c]);
              }
              best = std::max(best, s);
            }
            worst = std::max(worst, std::fabs(got - best) / mag);
          }
        MESSAGE(cpu_isa_name(isa), " d ", d, " G ", G, ": max error / sum of |terms| ", worst);
        CHECK(worst < 1e-6);
      }
    }
  auto bad = select_page_summary_score_kernel(static_cast<cpu_isa>(99));
  CHECK(bad.error().code() == errc::kUnsupported);
}

TEST_CASE("page summary: the bound holds for every row, plans and selections follow the budget") {
  const uint32_t H = 2, d = 64, G = 3, n = 40;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::vector<float> k(size_t{n} * H * d), q(size_t{G} * d);
  for (float& x : k) x = nd(rng);
  for (float& x : q) x = nd(rng);
  std::vector<float> summary(page_summary_floats(H, d));
  page_summary_clear(summary.data(), H, d);
  page_summary_fold(summary.data(), H, d, dtype::kF32, reinterpret_cast<const std::byte*>(k.data()), 17);
  page_summary_fold(summary.data(), H, d, dtype::kF32, reinterpret_cast<const std::byte*>(k.data() + 17 * H * d),
                    n - 17);
  for (uint32_t h = 0; h < H; ++h) {
    const float bound = page_summary_score(summary.data() + size_t{2} * h * d, q.data(), G, d);
    double best = -INFINITY;
    for (uint32_t t = 0; t < n; ++t)
      for (uint32_t g = 0; g < G; ++g) {
        double dot = 0;
        for (uint32_t c = 0; c < d; ++c) dot += double(q[g * d + c]) * k[(size_t{t} * H + h) * d + c];
        best = std::max(best, dot);
      }
    CHECK(bound >= best - 1e-4 * std::fabs(best));
  }

  sparf_params p = sparf_params::with_compression(0.25);
  p.policy = sparse_policy::kPageSummary;
  CHECK(p.sink_tokens == 16);  // the defaults: groups 0 and 58..62 (the last 64 tokens) mandatory
  CHECK(p.window_tokens == 64);
  CHECK(page_summary_resolve(p, d, 16, 1000).value().n_mandatory == 1 + 5);
  p.sink_tokens = p.window_tokens = 0;
  auto plan = page_summary_resolve(p, d, 16, 1000).value();  // 63 groups, the last of 8 tokens
  CHECK(plan.n_groups == 63);
  CHECK(plan.n_select == 16);
  CHECK(plan.n_mandatory == 0);
  p.sink_tokens = 20;    // groups 0, 1
  p.window_tokens = 40;  // tokens 960..999: groups 60, 61, 62
  plan = page_summary_resolve(p, d, 16, 1000).value();
  CHECK(plan.sink_groups == 2);
  CHECK(plan.window_first == 60);
  CHECK(plan.n_mandatory == 5);
  CHECK(plan.n_select == 16);
  std::vector<float> scores(63);
  for (uint32_t g = 0; g < 63; ++g) scores[g] = float(g % 7) + float(g) * 1e-3f;
  std::vector<uint32_t> order(2 * 63), out(plan.n_select);
  REQUIRE(page_summary_select(plan, scores.data(), order.data(), out.data()) == 16);
  CHECK(std::is_sorted(out.begin(), out.end()));
  for (uint32_t g : {0u, 1u, 60u, 61u, 62u}) CHECK(std::count(out.begin(), out.end(), g) == 1);
  // the 11 best of the rest: score 6 (g = 6, 13, ..., 55), then 5 (g = 54, 47, 40)
  for (uint32_t g : {6u, 13u, 20u, 27u, 34u, 41u, 48u, 55u, 54u, 47u, 40u})
    CHECK(std::count(out.begin(), out.end(), g) == 1);
  p.sink_tokens = 1000;  // everything mandatory
  CHECK(page_summary_resolve(p, d, 16, 1000).value().n_select == 63);
  sparf_params e = sparf_params::with_rk(0, 40);  // r is SparF's only
  e.policy = sparse_policy::kPageSummary;
  e.sink_tokens = e.window_tokens = 0;
  CHECK(page_summary_resolve(e, d, 16, 1000).value().n_select == 3);
  e.k = 1001;
  CHECK(page_summary_resolve(e, d, 16, 1000).error().code() == errc::kInvalidArgument);
  sparf_params bad;
  bad.policy = static_cast<sparse_policy>(9);
  CHECK(bad.validate(d).code() == errc::kInvalidArgument);
}

TEST_CASE("page summary attend on host and ssd: float64 reference over the chosen groups, dense at budget 1") {
  const kv_shape shape{2, 8, 4, 128, dtype::kF16};  // GQA group of 2
  const uint32_t n1 = 700, n2 = 533, n = n1 + n2;   // two appends: the tail group is folded twice
  const rows r = random_rows(shape, n, 11);
  const std::vector<float> q = random_q(shape, 12);
  const size_t nq = q.size(), per = size_t{shape.n_kv_heads} * shape.head_dim;
  for (const std::string& uri : uris()) {
    CAPTURE(uri);
    auto made = kv_cache::create(options(shape, uri, true));
    if (!made.ok()) {
      MESSAGE("skipping " << uri << ": " << made.error().message());
      continue;
    }
    auto cache = std::move(made).value();
    const uint32_t tpp = cache->page().tokens_per_page;
    const seq_id s = cache->create_sequence().value();
    REQUIRE(cache->append(s, 1, n1, r.k.data(), r.v.data(), dtype::kF16).ok());
    REQUIRE(cache->append(s, 1, n2, r.k.data() + n1 * per, r.v.data() + n1 * per, dtype::kF16).ok());
    const std::span<const seq_id> one(&s, 1);

    std::vector<float> dense(nq), got(nq), lse(shape.n_q_heads), dense_lse(shape.n_q_heads);
    REQUIRE(cache->attend(1, one, q.data(), dense.data(), dense_lse.data()).ok());
    sparf_params all = sparf_params::with_compression(1.0);
    all.policy = sparse_policy::kPageSummary;
    REQUIRE(cache->attend_sparse(1, one, q.data(), got.data(), lse.data(), all).ok());
    CHECK(sparf_test_rel(got, dense) <= 1e-5);
    for (uint32_t i = 0; i < shape.n_q_heads; ++i) CHECK(lse[i] == doctest::Approx(dense_lse[i]).epsilon(1e-5));

    for (double budget : {0.1, 0.3}) {
      for (uint32_t ends : {0u, 50u}) {
        sparf_params p = sparf_params::with_compression(budget);
        p.policy = sparse_policy::kPageSummary;
        p.sink_tokens = ends;
        p.window_tokens = ends;
        CAPTURE(budget);
        CAPTURE(ends);
        const auto before = cache->stats();
        REQUIRE(cache->attend_sparse(1, one, q.data(), got.data(), nullptr, p).ok());
        const auto after = cache->stats();
        const std::vector<double> want = expected(shape, as_stored(r, shape.kv_dtype, shape.head_dim), n, tpp, p, q);
        const double err = reference::relative_error(got, want);
        MESSAGE(uri << " budget " << budget << " ends " << ends << ": relative error vs float64 " << err);
        CHECK(err <= 2e-3);
        if (ends == 0 && budget < 0.2) CHECK(sparf_test_rel(got, dense) > 1e-3);  // the choice matters here
        const page_summary_plan plan = page_summary_resolve(p, shape.head_dim, tpp, n).value();
        CHECK(after.sparf.token_pages_read - before.sparf.token_pages_read == 2ull * shape.n_kv_heads * plan.n_select);
        CHECK(after.sparf.dense_pages - before.sparf.dense_pages == 2ull * shape.n_kv_heads * plan.n_groups);
        CHECK(after.sparf.channel_pages_read == before.sparf.channel_pages_read);
      }
    }
    // Summaries: one block per group of the one layer that has tokens, beside SparF's copy.
    const auto st = cache->stats();
    CHECK(st.page_summary_bytes ==
          (in_drive(uri) ? 0 : uint64_t{(n + tpp - 1) / tpp} * page_summary_floats(4, 128) * sizeof(float)));
    MESSAGE(uri << ": page summaries " << st.page_summary_bytes << " B, SparF column copy in host memory "
                << st.sparf_column_bytes << " B, K+V " << 2ull * n * per * 2 << " B");
    // SparF still runs beside it, chosen per call.
    REQUIRE(cache->attend_sparse(1, one, q.data(), got.data(), nullptr, sparf_params::with_compression(1.0)).ok());
    CHECK(sparf_test_rel(got, dense) <= 1e-5);
  }
}

TEST_CASE("page summary over a quantized cache (q8_0, q4_0) on host and ssd: summaries of the dequantized K") {
  for (dtype t : {dtype::kQ8_0, dtype::kQ4_0}) {
    CAPTURE(dtype_name(t));
    const kv_shape shape{1, 8, 4, 128, t};  // GQA group of 2
    const uint32_t n1 = 640, n2 = 411, n = n1 + n2;
    const rows r = random_rows(shape, n, 41);
    const stored_rows stored = as_stored(r, t, shape.head_dim);
    const std::vector<float> q = random_q(shape, 42);
    const size_t nq = q.size(), per = size_t{shape.n_kv_heads} * shape.head_dim;
    for (const std::string& uri : uris()) {
      CAPTURE(uri);
      auto made = kv_cache::create(options(shape, uri, false));
      REQUIRE_MESSAGE(made.ok(), made.error().message());
      auto cache = std::move(made).value();
      const uint32_t tpp = cache->page().tokens_per_page;
      const seq_id s = cache->create_sequence().value();
      // f16 rows, quantized on append (the summaries must see the stored, dequantized values).
      REQUIRE(cache->append(s, 0, n1, r.k.data(), r.v.data(), dtype::kF16).ok());
      REQUIRE(cache->append(s, 0, n2, r.k.data() + n1 * per, r.v.data() + n1 * per, dtype::kF16).ok());
      const std::span<const seq_id> one(&s, 1);

      std::vector<float> dense(nq), got(nq);
      REQUIRE(cache->attend(0, one, q.data(), dense.data(), nullptr).ok());
      sparf_params all = sparf_params::with_compression(1.0);
      all.policy = sparse_policy::kPageSummary;
      REQUIRE(cache->attend_sparse(0, one, q.data(), got.data(), nullptr, all).ok());
      CHECK(sparf_test_rel(got, dense) <= 1e-5);
      for (double budget : {0.1, 0.3}) {
        sparf_params p = sparf_params::with_compression(budget);
        p.policy = sparse_policy::kPageSummary;
        p.sink_tokens = 40;
        p.window_tokens = 40;
        CAPTURE(budget);
        REQUIRE(cache->attend_sparse(0, one, q.data(), got.data(), nullptr, p).ok());
        const double err = reference::relative_error(got, expected(shape, stored, n, tpp, p, q));
        MESSAGE(uri << " " << dtype_name(t) << " budget " << budget << ": relative error vs float64 " << err);
        CHECK(err <= 1e-5);
        if (budget < 0.2) CHECK(sparf_test_rel(got, dense) > 1e-3);  // a real selection
      }
      CHECK(cache->stats().page_summary_bytes ==
            (in_drive(uri)
                 ? 0
                 : uint64_t{(n + tpp - 1) / tpp} * page_summary_floats(shape.n_kv_heads, 128) * sizeof(float)));
    }
  }
}

TEST_CASE("page summary: fork shares groups, truncation rebuilds the tail; same as a cache built fresh") {
  const kv_shape shape{1, 4, 2, 64, dtype::kF16};
  const size_t per = size_t{shape.n_kv_heads} * shape.head_dim;
  const rows a = random_rows(shape, 900, 21), b = random_rows(shape, 300, 22);
  const std::vector<float> q = random_q(shape, 23);
  sparf_params p = sparf_params::with_compression(0.2);
  p.policy = sparse_policy::kPageSummary;
  for (const std::string& uri : uris()) {
    CAPTURE(uri);
    auto made = kv_cache::create(options(shape, uri, false));
    if (!made.ok()) continue;
    auto cache = std::move(made).value();
    const uint32_t tpp = cache->page().tokens_per_page;
    const seq_id s = cache->create_sequence().value();
    REQUIRE(cache->append(s, 0, 600, a.k.data(), a.v.data(), dtype::kF16).ok());
    const uint64_t before_fork = cache->stats().page_summary_bytes;
    const seq_id f = cache->fork_sequence(s).value();
    CHECK(cache->stats().page_summary_bytes == before_fork);  // shared, nothing copied
    // Different continuations; the fork's partial tail group must not see the parent's rows.
    REQUIRE(cache->append(s, 0, 300, a.k.data() + 600 * per, a.v.data() + 600 * per, dtype::kF16).ok());
    REQUIRE(cache->append(f, 0, 300, b.k.data(), b.v.data(), dtype::kF16).ok());
    // Cut an interior range out of s: tokens [250, 500) (250 is inside a group).
    REQUIRE(cache->remove_range(s, 250, 500).ok());

    auto fresh = kv_cache::create(options(shape, "host", false)).value();
    const seq_id fs = fresh->create_sequence().value(), ff = fresh->create_sequence().value();
    REQUIRE(fresh->append(fs, 0, 250, a.k.data(), a.v.data(), dtype::kF16).ok());
    REQUIRE(fresh->append(fs, 0, 400, a.k.data() + 500 * per, a.v.data() + 500 * per, dtype::kF16).ok());
    REQUIRE(fresh->append(ff, 0, 600, a.k.data(), a.v.data(), dtype::kF16).ok());
    REQUIRE(fresh->append(ff, 0, 300, b.k.data(), b.v.data(), dtype::kF16).ok());
    REQUIRE(fresh->page().tokens_per_page == tpp);
    for (auto [mine, theirs] : {std::pair{s, fs}, std::pair{f, ff}}) {
      std::vector<float> got(q.size()), want(q.size());
      REQUIRE(cache->attend_sparse(0, std::span<const seq_id>(&mine, 1), q.data(), got.data(), nullptr, p).ok());
      REQUIRE(fresh->attend_sparse(0, std::span<const seq_id>(&theirs, 1), q.data(), want.data(), nullptr, p).ok());
      CHECK(sparf_test_rel(got, want) <= 1e-6);
    }
    // A batch of both, as one call.
    const seq_id both[] = {s, f};
    const seq_id fresh_both[] = {fs, ff};
    std::vector<float> q2(2 * q.size()), got2(q2.size()), want2(q2.size());
    std::copy(q.begin(), q.end(), q2.begin());
    std::copy(q.rbegin(), q.rend(), q2.begin() + q.size());
    REQUIRE(cache->attend_sparse(0, both, q2.data(), got2.data(), nullptr, p).ok());
    REQUIRE(fresh->attend_sparse(0, fresh_both, q2.data(), want2.data(), nullptr, p).ok());
    CHECK(sparf_test_rel(got2, want2) <= 1e-6);
    REQUIRE(cache->free_sequence(s).ok());
    REQUIRE(cache->free_sequence(f).ok());
    CHECK(cache->stats().page_summary_bytes == 0);
  }
}

TEST_CASE("page summary: a policy the cache does not keep and bad parameters are refused") {
  const kv_shape shape{2, 2, 2, 64, dtype::kF16};
  const rows r = random_rows(shape, 100, 31);
  const std::vector<float> q = random_q(shape, 32);
  std::vector<float> out(q.size(), 7.0f);

  cache_options sparf_only = test_support::sparf_cache_options(shape);
  auto c1 = kv_cache::create(sparf_only).value();
  const seq_id s1 = c1->create_sequence().value();
  REQUIRE(c1->append(s1, 0, 100, r.k.data(), r.v.data(), dtype::kF16).ok());
  sparf_params p = sparf_params::with_compression(0.5);
  p.policy = sparse_policy::kPageSummary;
  status st = c1->attend_sparse(0, std::span<const seq_id>(&s1, 1), q.data(), out.data(), nullptr, p);
  CHECK(st.code() == errc::kUnsupported);
  CHECK(st.message().find("page_summaries") != std::string::npos);
  CHECK(c1->stats().page_summary_bytes == 0);

  auto c2 = kv_cache::create(options(shape, "host", false)).value();
  const seq_id s2 = c2->create_sequence().value();
  REQUIRE(c2->append(s2, 0, 100, r.k.data(), r.v.data(), dtype::kF16).ok());
  st = c2->attend_sparse(0, std::span<const seq_id>(&s2, 1), q.data(), out.data(), nullptr,
                         sparf_params::with_compression(0.5));
  CHECK(st.code() == errc::kUnsupported);
  CHECK(c2->stats().sparf_column_bytes == 0);
  sparf_params bad = p;
  bad.policy = static_cast<sparse_policy>(3);
  CHECK(c2->attend_sparse(0, std::span<const seq_id>(&s2, 1), q.data(), out.data(), nullptr, bad).code() ==
        errc::kInvalidArgument);
  bad = p;
  bad.compression = 0.0;
  CHECK(c2->attend_sparse(0, std::span<const seq_id>(&s2, 1), q.data(), out.data(), nullptr, bad).code() ==
        errc::kInvalidArgument);
  sparf_params too_many = sparf_params::with_rk(1, 101);
  too_many.policy = sparse_policy::kPageSummary;
  CHECK(c2->attend_sparse(0, std::span<const seq_id>(&s2, 1), q.data(), out.data(), nullptr, too_many).code() ==
        errc::kInvalidArgument);
  CHECK(out[0] == 7.0f);                                       // nothing written on a refusal
  if (describe_backends().find("csd") != std::string::npos) {  // in the drive: SparF only -> refused by policy
    cache_options o =
        test_support::sparf_cache_options(shape, "csd:?channels=2&dies=2&blocks_per_die=64&pages_per_block=8");
    auto on_drive = kv_cache::create(o);
    REQUIRE(on_drive.ok());
    const seq_id s3 = (*on_drive)->create_sequence().value();
    REQUIRE((*on_drive)->append(s3, 0, 100, r.k.data(), r.v.data(), dtype::kF16).ok());
    st = (*on_drive)->attend_sparse(0, std::span<const seq_id>(&s3, 1), q.data(), out.data(), nullptr, p);
    CHECK(st.code() == errc::kUnsupported);
    CHECK(st.message().find("page_summaries") != std::string::npos);
    CHECK(out[0] == 7.0f);
  }
  // An empty layer: zeros and lse -inf, like dense.
  std::vector<float> lse(shape.n_q_heads, 0.0f);
  REQUIRE(c2->attend_sparse(1, std::span<const seq_id>(&s2, 1), q.data(), out.data(), lse.data(), p).ok());
  CHECK(out[0] == 0.0f);
  CHECK(std::isinf(lse[0]));
}

TEST_CASE("page_summary_select equals a stable sort of the free groups: ties, signed zeros, infinities, NaN") {
  std::mt19937 rng(4242);
  const float inf = std::numeric_limits<float>::infinity();
  for (int draw = 0; draw < 400; ++draw) {
    const uint32_t tpp = 1 + rng() % 64, n_tokens = 1 + rng() % 60000;
    sparf_params p = sparf_params::with_compression(std::uniform_real_distribution<double>(0.01, 1.0)(rng));
    p.policy = sparse_policy::kPageSummary;
    p.sink_tokens = rng() % 4 == 0 ? 0 : rng() % 300;
    p.window_tokens = rng() % 4 == 0 ? 0 : rng() % 600;
    const page_summary_plan plan = page_summary_resolve(p, 128, tpp, n_tokens).value();
    const uint32_t n = plan.n_groups;
    std::vector<float> scores(n);
    const uint32_t levels = 1 + rng() % 50;  // few levels: many ties
    for (float& x : scores) {
      const uint32_t r = rng() % 100;
      x = r == 0   ? std::numeric_limits<float>::quiet_NaN()
          : r == 1 ? -0.0f
          : r == 2 ? 0.0f
          : r == 3 ? inf
          : r == 4 ? -inf
                   : static_cast<float>(static_cast<int>(rng() % levels) - static_cast<int>(levels / 2)) * 0.25f;
    }
    std::vector<uint32_t> scratch(2 * size_t{n}), out(plan.n_select);
    CAPTURE(draw);
    REQUIRE(page_summary_select(plan, scores.data(), scratch.data(), out.data()) == plan.n_select);
    // Reference: mandatory groups, then the free ones by (score desc with NaN as -inf, index asc).
    std::vector<uint32_t> want_out, free;
    for (uint32_t g = 0; g < n; ++g) (g < plan.sink_groups || g >= plan.window_first ? want_out : free).push_back(g);
    const auto key = [&](uint32_t g) { return std::isnan(scores[g]) ? -inf : scores[g]; };
    std::stable_sort(free.begin(), free.end(), [&](uint32_t a, uint32_t b) { return key(a) > key(b); });
    free.resize(plan.n_select - plan.n_mandatory);
    want_out.insert(want_out.end(), free.begin(), free.end());
    std::sort(want_out.begin(), want_out.end());
    CHECK(out == want_out);
  }
}
