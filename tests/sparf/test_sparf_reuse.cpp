// SparF selection reuse (sparf_params::reuse_min_cosine): while the queries stay close to the ones
// a selection was made for, a call attends that selection's tokens plus every token appended
// since, blended with the selection's alpha, and reads no column pages. Checked against a float64
// SparF that records its choice, on the backends where the host runs SparF (host, ssd); what
// starts a fresh selection (max steps, a distant query, other parameters, fork, truncation) and
// the refusals.
#include <doctest/doctest.h>

#include <unistd.h>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "instinfer/kv/kv_cache.hpp"
#include "sparf_test_util.hpp"
#include "support/kv_test_util.hpp"

using namespace instinfer;

namespace {

// Float64 output of a reused choice over the first n tokens of s: per kv head the chosen tokens
// and [n_at, n), softmax over them, alpha-blended with the mean of V over all n tokens.
std::vector<double> reuse_reference(const sparf_test::stored_layer& s, const sparf_test::sparf_choice& choice,
                                    uint32_t n_at, const float* q) {
  const uint32_t H = s.cfg.n_kv_heads(), G = s.cfg.group_size, d = s.cfg.head_dim();
  std::vector<double> out(size_t{H} * G * d, 0.0);
  for (uint32_t h = 0; h < H; ++h) {
    std::vector<uint32_t> tokens = choice.tokens[h];
    for (uint32_t t = n_at; t < s.n_tokens; ++t) tokens.push_back(t);
    const std::vector<double> mean = sparf_test::v_mean_reference(s, h);
    for (uint32_t g = 0; g < G; ++g)
      sparf_test::blend_reference(s, h, q + (size_t{h} * G + g) * d, tokens, choice.alpha[size_t{h} * G + g], mean,
                                  out.data() + (size_t{h} * G + g) * d);
  }
  return out;
}

std::vector<std::string> host_sparf_backends() {
  std::vector<std::string> uris{"host"};
  if (describe_backends().find("ssd") != std::string::npos) {
    const char* tmp = std::getenv("TMPDIR");
    uris.push_back(std::string("ssd:") + (tmp ? tmp : "/tmp") + "/instinfer-sparf-reuse-" + std::to_string(getpid()) +
                   ".bin?capacity=64M");
  }
  return uris;
}

}  // namespace

TEST_CASE("SparF selection reuse: the kept tokens plus the appended ones with the kept alpha; fresh after a change") {
  const kv_shape shape{1, 4, 2, 128, dtype::kF32};
  const uint32_t H = shape.n_kv_heads, G = shape.group_size(), d = shape.head_dim;
  const uint32_t n1 = 1500, total = n1 + 16;
  const auto work = test_support::workload(shape, total, 5);
  const auto other = test_support::workload(shape, 1, 6);  // another query, far from work.q
  const size_t row = size_t{H} * d, nq = size_t{shape.n_q_heads} * d;
  const auto stored = [&](const sparf_config& cfg, uint32_t n) {
    return sparf_test::store(cfg, std::vector<float>(work.k.begin(), work.k.begin() + n * row),
                             std::vector<float>(work.v.begin(), work.v.begin() + n * row), n);
  };

  for (const std::string& uri : host_sparf_backends()) {
    CAPTURE(uri);
    auto created = kv_cache::create(test_support::sparf_cache_options(shape, uri, 64ull << 20));
    if (!created.ok()) {
      MESSAGE("skipping " << uri << ": " << created.error().message());
      continue;
    }
    kv_cache& cache = *created.value();
    const sparf_config cfg = sparf_config::make(cache.layout(), 0, G).value();
    const seq_id s = cache.create_sequence().value();
    const std::span<const seq_id> one(&s, 1);
    REQUIRE(cache.append(s, 0, n1, work.k.data(), work.v.data(), dtype::kF32).ok());
    uint32_t n = n1;
    const auto append = [&](uint32_t m) {
      REQUIRE(cache.append(s, 0, m, work.k.data() + n * row, work.v.data() + n * row, dtype::kF32).ok());
      n += m;
    };

    sparf_params p = sparf_params::with_compression(0.125);
    p.reuse_min_cosine = 0.99f;
    p.reuse_max_steps = 2;
    std::vector<float> out(nq), again(nq);
    // One call; returns what it counted. A reused selection uses no channels.
    const auto call = [&](const float* q, float* dst, const sparf_params& params) {
      const sparf_counters before = cache.stats().sparf;
      const status st = cache.attend_sparse(0, one, q, dst, nullptr, params);
      REQUIRE_MESSAGE(st.ok(), st.to_string());
      return cache.stats().sparf.since(before);
    };
    const auto fresh_matches_reference = [&](const float* q, const sparf_params& params, sparf_test::sparf_choice& c) {
      std::vector<double> ref;
      sparf_test::sparf_reference(stored(cfg, n), params, q, ref, nullptr, &c);
      const double err = sparf_test::max_rel_error(out.data(), ref.data(), shape.n_q_heads, d);
      CHECK(err < 1e-4);  // the same choice as the float64 SparF (else the outputs differ by ~0.3)
    };

    // A fresh selection, the float64 SparF's.
    sparf_test::sparf_choice choice;
    CHECK(call(work.q.data(), out.data(), p).channels_used > 0);
    fresh_matches_reference(work.q.data(), p, choice);
    const uint32_t n_at = n;

    // Tokens appended, the same queries: the kept tokens and all new ones, the kept alpha.
    for (const uint32_t m : {7u, 1u}) {
      append(m);
      const sparf_counters c = call(work.q.data(), out.data(), p);
      CHECK(c.channels_used == 0);
      CHECK(c.channel_pages_read == 0);
      uint64_t kept = 0;
      for (const auto& t : choice.tokens) kept += t.size() + (n - n_at);
      CHECK(c.selected_tokens == kept);
      CHECK(c.items == H);
      CHECK(cache.stats().sparf_reused_selections == (m == 7u ? 1u : 2u));
      const std::vector<double> ref = reuse_reference(stored(cfg, n), choice, n_at, work.q.data());
      CHECK(sparf_test::max_rel_error(out.data(), ref.data(), shape.n_q_heads, d) <= 1e-5);
    }

    // reuse_max_steps (2) served: the next call selects afresh.
    append(1);
    CHECK(call(work.q.data(), out.data(), p).channels_used > 0);
    fresh_matches_reference(work.q.data(), p, choice);

    // A distant query selects afresh; the same one again reuses it, with no appends the same output.
    CHECK(call(other.q.data(), out.data(), p).channels_used > 0);
    fresh_matches_reference(other.q.data(), p, choice);
    CHECK(call(other.q.data(), again.data(), p).channels_used == 0);
    CHECK(sparf_test::max_rel_diff(again, out) == 0.0);

    // Other selection parameters select afresh; a call without reuse drops the kept selection.
    sparf_params wider = p;
    wider.compression = 0.25;
    CHECK(call(other.q.data(), out.data(), wider).channels_used > 0);
    CHECK(call(other.q.data(), out.data(), wider).channels_used == 0);
    sparf_params off = wider;
    off.reuse_min_cosine = 0.0f;
    CHECK(call(other.q.data(), out.data(), off).channels_used > 0);
    CHECK(call(other.q.data(), out.data(), wider).channels_used > 0);

    // A fork starts without a selection; a truncation drops the sequence's.
    const seq_id f = cache.fork_sequence(s).value();
    CHECK(cache.stats().sparf.items > 0);
    {
      const sparf_counters before = cache.stats().sparf;
      REQUIRE(cache.attend_sparse(0, std::span<const seq_id>(&f, 1), other.q.data(), out.data(), nullptr, wider).ok());
      CHECK(cache.stats().sparf.since(before).channels_used > 0);
    }
    REQUIRE(cache.remove_range(s, n - 3, UINT64_MAX).ok());
    n -= 3;
    CHECK(call(other.q.data(), out.data(), wider).channels_used > 0);
    fresh_matches_reference(other.q.data(), wider, choice);

    // Refusals: bad thresholds and step counts, reuse with the page policy.
    const auto refused = [&](const sparf_params& bad) {
      return cache.attend_sparse(0, one, work.q.data(), out.data(), nullptr, bad).code();
    };
    for (const float bad : {-0.5f, 1.5f, std::numeric_limits<float>::quiet_NaN()}) {
      sparf_params b = p;
      b.reuse_min_cosine = bad;
      CHECK(refused(b) == errc::kInvalidArgument);
    }
    for (const uint32_t bad : {0u, sparf_params::kMaxReuseSteps + 1}) {
      sparf_params b = p;
      b.reuse_max_steps = bad;
      CHECK(refused(b) == errc::kInvalidArgument);
    }
    sparf_params pages = p;
    pages.policy = sparse_policy::kPageSummary;
    CHECK(refused(pages) == errc::kInvalidArgument);
    created.value().reset();
    if (uri.rfind("ssd:", 0) == 0) std::remove(uri.substr(4, uri.find('?') - 4).c_str());
  }
}
