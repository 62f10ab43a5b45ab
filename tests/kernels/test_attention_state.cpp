// state.hpp: merge, normalize, lse and merge_normalized against float64 softmax sums.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "instinfer/attention/state.hpp"

using namespace instinfer;

namespace {

constexpr uint32_t kDim = 8;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct partial {
  softmax_stats st;
  std::vector<float> o = std::vector<float>(kDim, 0.0f);
};

std::mt19937& rng() {
  static std::mt19937 g(std::random_device{}());
  return g;
}

float uniform(float a, float b) {
  return std::uniform_real_distribution<float>(a, b)(rng());
}

// A partial over explicit (logit, value) pairs, built the way a kernel does.
partial make_partial(const std::vector<float>& logits, const std::vector<std::vector<float>>& values) {
  partial p;
  for (size_t i = 0; i < logits.size(); ++i) {
    const float m = std::max(p.st.m, logits[i]);
    const float a = p.st.empty() ? 0.0f : std::exp(p.st.m - m);
    const float w = std::exp(logits[i] - m);
    for (uint32_t d = 0; d < kDim; ++d) p.o[d] = p.o[d] * a + w * values[i][d];
    p.st.d = p.st.d * a + w;
    p.st.m = m;
  }
  return p;
}

struct dataset {
  std::vector<float> logits;
  std::vector<std::vector<float>> values;
};

dataset random_dataset(size_t n) {
  dataset ds;
  for (size_t i = 0; i < n; ++i) {
    ds.logits.push_back(uniform(-20.0f, 20.0f));
    std::vector<float> v(kDim);
    for (float& x : v) x = uniform(0.25f, 2.0f) * (uniform(-1.0f, 1.0f) < 0 ? -1.0f : 1.0f);
    ds.values.push_back(v);
  }
  return ds;
}

// float64 softmax over [begin, end): normalised output and lse.
void reference(const dataset& ds, size_t begin, size_t end, std::vector<double>& out, double& lse) {
  double m = -std::numeric_limits<double>::infinity();
  for (size_t i = begin; i < end; ++i) m = std::max(m, double{ds.logits[i]});
  double s = 0.0;
  out.assign(kDim, 0.0);
  for (size_t i = begin; i < end; ++i) {
    const double w = std::exp(double{ds.logits[i]} - m);
    s += w;
    for (uint32_t d = 0; d < kDim; ++d) out[d] += w * ds.values[i][d];
  }
  for (double& x : out) x /= s;
  lse = m + std::log(s);
}

partial slice(const dataset& ds, size_t begin, size_t end) {
  return make_partial({ds.logits.begin() + begin, ds.logits.begin() + end},
                      {ds.values.begin() + begin, ds.values.begin() + end});
}

}  // namespace

TEST_CASE("merge_state of disjoint partials equals the softmax over their union") {
  const dataset ds = random_dataset(40);
  std::vector<double> ref;
  double ref_lse;
  reference(ds, 0, 40, ref, ref_lse);
  partial a = slice(ds, 0, 13), b = slice(ds, 13, 40);
  merge_state(a.st, a.o.data(), b.st, b.o.data(), kDim);
  CHECK(state_lse(a.st) == doctest::Approx(ref_lse).epsilon(1e-6));
  normalize_state(a.st, a.o.data(), kDim);
  for (uint32_t d = 0; d < kDim; ++d) CHECK(a.o[d] == doctest::Approx(ref[d]).epsilon(1e-5));
}

TEST_CASE("merge order does not matter") {
  const dataset ds = random_dataset(60);
  const size_t cuts[] = {0, 7, 21, 22, 45, 60};
  std::vector<partial> parts;
  for (size_t i = 0; i + 1 < std::size(cuts); ++i) parts.push_back(slice(ds, cuts[i], cuts[i + 1]));
  std::vector<size_t> order(parts.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::vector<double> ref;
  double ref_lse;
  reference(ds, 0, 60, ref, ref_lse);
  for (int trial = 0; trial < 6; ++trial) {
    std::shuffle(order.begin(), order.end(), rng());
    partial acc;  // starts empty: merging into an empty state must work
    for (size_t i : order) merge_state(acc.st, acc.o.data(), parts[i].st, parts[i].o.data(), kDim);
    CHECK(state_lse(acc.st) == doctest::Approx(ref_lse).epsilon(1e-6));
    normalize_state(acc.st, acc.o.data(), kDim);
    for (uint32_t d = 0; d < kDim; ++d) CHECK(acc.o[d] == doctest::Approx(ref[d]).epsilon(1e-5));
  }
}

TEST_CASE("empty partials") {
  const dataset ds = random_dataset(9);
  partial full = slice(ds, 0, 9);
  const partial saved = full;
  partial empty;
  CHECK(empty.st.empty());
  CHECK(state_lse(empty.st) == kNegInf);

  SUBCASE("merging an empty partial changes nothing") {
    merge_state(full.st, full.o.data(), empty.st, empty.o.data(), kDim);
    CHECK(full.st.m == saved.st.m);
    CHECK(full.st.d == saved.st.d);
    CHECK(full.o == saved.o);
  }
  SUBCASE("merging into an empty partial copies") {
    merge_state(empty.st, empty.o.data(), full.st, full.o.data(), kDim);
    CHECK(empty.st.m == saved.st.m);
    CHECK(empty.st.d == saved.st.d);
    CHECK(empty.o == saved.o);
  }
  SUBCASE("two empty partials stay empty and never produce NaN") {
    partial other;
    merge_state(empty.st, empty.o.data(), other.st, other.o.data(), kDim);
    CHECK(empty.st.empty());
    for (float x : empty.o) CHECK(x == 0.0f);
  }
  SUBCASE("normalize of an empty state gives zeros") {
    std::vector<float> o(kDim, 3.0f);
    normalize_state(empty.st, o.data(), kDim);
    for (float x : o) CHECK(x == 0.0f);
  }
}

TEST_CASE("merge_normalized combines (output, lse) pairs exactly and handles empty sides") {
  const dataset ds = random_dataset(50);
  std::vector<double> ra, rb, ref;
  double la, lb, lref;
  reference(ds, 0, 20, ra, la);
  reference(ds, 20, 50, rb, lb);
  reference(ds, 0, 50, ref, lref);
  std::vector<float> a(ra.begin(), ra.end()), b(rb.begin(), rb.end()), out(kDim);
  float lse = 0.0f;
  merge_normalized(a.data(), static_cast<float>(la), b.data(), static_cast<float>(lb), out.data(), &lse, kDim);
  CHECK(lse == doctest::Approx(lref).epsilon(1e-6));
  for (uint32_t d = 0; d < kDim; ++d) CHECK(out[d] == doctest::Approx(ref[d]).epsilon(1e-5));

  // Symmetric, and out may alias an input.
  std::vector<float> alias = b;
  merge_normalized(b.data(), static_cast<float>(lb), a.data(), static_cast<float>(la), alias.data(), &lse, kDim);
  for (uint32_t d = 0; d < kDim; ++d) CHECK(alias[d] == doctest::Approx(out[d]).epsilon(1e-6));

  std::vector<float> zeros(kDim, 0.0f);
  merge_normalized(a.data(), static_cast<float>(la), zeros.data(), kNegInf, out.data(), &lse, kDim);
  CHECK(lse == static_cast<float>(la));
  CHECK(out == a);
  merge_normalized(zeros.data(), kNegInf, b.data(), static_cast<float>(lb), out.data(), &lse, kDim);
  CHECK(lse == static_cast<float>(lb));
  CHECK(out == b);
  merge_normalized(zeros.data(), kNegInf, zeros.data(), kNegInf, out.data(), &lse, kDim);
  CHECK(lse == kNegInf);
  for (float x : out) CHECK(x == 0.0f);
}

TEST_CASE("lse of a state is m + log(d); soft-cap bounds logits") {
  softmax_stats s{2.5f, 3.0f};
  CHECK(state_lse(s) == doctest::Approx(2.5 + std::log(3.0)));
  CHECK(apply_softcap(100.0f, 5.0f) == doctest::Approx(5.0f * std::tanh(20.0f)));
  CHECK(apply_softcap(-1.0f, 0.0f) == -1.0f);
  CHECK(std::fabs(apply_softcap(1e6f, 30.0f)) <= 30.0f);
}
