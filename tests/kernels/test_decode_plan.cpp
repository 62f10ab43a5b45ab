// The decode planner's invariants over random shapes, and merge_partials / write_normalized
// against a float64 softmax over the same logits and values.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "decode_test_util.hpp"
#include "instinfer/attention/decode_plan.hpp"
#include "instinfer/attention/state.hpp"

using namespace instinfer;

namespace {

uint32_t uniform(uint32_t lo, uint32_t hi) {
  return std::uniform_int_distribution<uint32_t>(lo, hi)(test::rng());
}

std::vector<decode_sequence_shape> random_shapes(uint32_t tpc) {
  std::vector<decode_sequence_shape> shapes(uniform(0, 12));
  for (auto& s : shapes) {
    // Mostly short, some empty, some long.
    const uint32_t kind = uniform(0, 9);
    const uint32_t tokens = kind == 0 ? 0 : kind < 7 ? uniform(1, 40 * tpc) : uniform(1, 2000 * tpc);
    s = {(tokens + tpc - 1) / tpc, tokens};
  }
  return shapes;
}

// Every (sequence, kv head, chunk) is covered by exactly one item; a row's items are its
// sequence's chunks in token order; partial slots are consecutive within split rows.
void check_plan(const decode_plan& plan, const std::vector<decode_sequence_shape>& shapes,
                const decode_plan_options& o) {
  const auto items = plan.items();
  const auto indptr = plan.indptr();
  const uint32_t rows_per_seq = o.rows_per_sequence();
  REQUIRE(indptr.size() == shapes.size() * rows_per_seq + 1);
  CHECK(indptr.front() == 0);
  CHECK(indptr.back() == items.size());
  std::vector<std::vector<uint32_t>> covered(shapes.size());
  for (size_t s = 0; s < shapes.size(); ++s) covered[s].assign(size_t{shapes[s].n_chunks} * o.n_kv_heads, 0);
  uint32_t next_partial = 0;
  for (uint32_t r = 0; r + 1 < indptr.size(); ++r) {
    REQUIRE(indptr[r] < indptr[r + 1]);  // every row has an item, even an empty sequence's
    const uint32_t s = r / rows_per_seq;
    const decode_sequence_shape sh = shapes[s];
    const uint32_t h0 = (r % rows_per_seq) * o.heads_per_item();
    uint32_t expect_chunk = 0;
    const bool split = indptr[r + 1] - indptr[r] > 1;
    for (uint32_t i = indptr[r]; i < indptr[r + 1]; ++i) {
      const decode_work_item& it = items[i];
      CHECK(it.row == r);
      CHECK(it.seq == s);
      CHECK(it.kv_head_begin == h0);
      CHECK(it.kv_head_end == std::min(o.n_kv_heads, h0 + o.heads_per_item()));
      CHECK(it.chunk_begin == expect_chunk);  // token order, no gap, no overlap
      expect_chunk = it.chunk_end();
      if (it.chunk_end() == sh.n_chunks && sh.n_chunks > 0)
        CHECK(it.last_chunk_tokens == sh.n_tokens - (sh.n_chunks - 1) * o.tokens_per_chunk);
      else
        CHECK(it.last_chunk_tokens == o.tokens_per_chunk);
      if (split) {
        CHECK(it.partial == next_partial++);
        CHECK(it.n_chunks > 0);
      } else {
        CHECK(it.partial == decode_work_item::kNoPartial);
      }
      for (uint32_t h = it.kv_head_begin; h < it.kv_head_end; ++h)
        for (uint32_t c = it.chunk_begin; c < it.chunk_end(); ++c) ++covered[s][size_t{h} * sh.n_chunks + c];
    }
    CHECK(expect_chunk == sh.n_chunks);
  }
  CHECK(plan.n_partials() == next_partial);
  for (const auto& c : covered) CHECK(std::all_of(c.begin(), c.end(), [](uint32_t n) { return n == 1; }));
  if (o.n_workers <= 1) CHECK(items.size() == indptr.size() - 1);
}

}  // namespace

TEST_CASE("decode_plan: every chunk of every kv head is covered once, partials in token order") {
  decode_plan plan;  // one plan reused: its arrays only grow
  for (int round = 0; round < 400; ++round) {
    decode_plan_options o;
    o.tokens_per_chunk = std::vector<uint32_t>{1, 8, 16, 64}[uniform(0, 3)];
    o.n_kv_heads = uniform(1, 8);
    o.n_workers = uniform(1, 16);
    o.items_per_worker = uniform(1, 6);
    o.min_item_tokens = uniform(0, 1) ? 512 : 0;
    o.kv_heads_per_item = uniform(0, 3);
    const auto shapes = random_shapes(o.tokens_per_chunk);
    INFO("round " << round << " tpc " << o.tokens_per_chunk << " kv heads " << o.n_kv_heads << " workers "
                  << o.n_workers << " heads/item " << o.kv_heads_per_item << " sequences " << shapes.size());
    REQUIRE(plan.build(shapes, o).ok());
    check_plan(plan, shapes, o);
    // Split items are about the target size and never below half of the minimum.
    const uint64_t min_chunks = (o.min_item_tokens + o.tokens_per_chunk - 1) / o.tokens_per_chunk;
    for (const decode_work_item& it : plan.items())
      if (it.partial != decode_work_item::kNoPartial) CHECK(2 * uint64_t{it.n_chunks} + 1 >= min_chunks);
  }
}

TEST_CASE("decode_plan: the host policy splits one long sequence for every thread, the drive's per head") {
  decode_plan plan;
  const decode_sequence_shape one_long[] = {{10000, 10000 * 16}};
  REQUIRE(plan.build(one_long, host_sweep_policy(16, 8, 4)).ok());
  CHECK(plan.n_rows() == 1);
  CHECK(plan.items().size() == 16);  // 4 threads x 4 items: 625 chunks each
  CHECK(plan.items()[0].n_kv_heads() == 8);
  const decode_sequence_shape two_short[] = {{2, 20}, {0, 0}};
  REQUIRE(plan.build(two_short, host_sweep_policy(16, 8, 4)).ok());
  CHECK(plan.items().size() == 2);  // below the 512-token minimum: no split
  REQUIRE(plan.build(two_short, per_kv_head_policy(16, 8, 4)).ok());
  CHECK(plan.n_rows() == 16);
  CHECK(plan.items().size() == 24);  // 16 chunk-heads for 16 items wanted: sequence 0 splits per chunk
  CHECK(plan.indptr()[9] == 17);
  CHECK(plan.items()[17].seq == 1);
  CHECK(plan.items()[17].kv_head_begin == 1);
  CHECK(plan.items()[17].n_chunks == 0);
  REQUIRE(plan.build({}, host_sweep_policy(16, 8, 4)).ok());
  CHECK(plan.items().empty());
  CHECK(plan.n_rows() == 0);
}

namespace {

// Partials over random token sets: logits and values in float, their (m, d, o) in float as the
// kernels would produce them, and the float64 softmax over the union.
struct merge_case {
  uint32_t n_states, head_dim;
  std::vector<uint32_t> indptr;
  std::vector<softmax_stats> stats;  // [partials][states]
  std::vector<float> o;              // [partials][states][head_dim]
  std::vector<double> ref_out;       // [rows][states][head_dim]
  std::vector<double> ref_lse;       // [rows][states]

  merge_case(uint32_t rows, uint32_t states, uint32_t dim) : n_states(states), head_dim(dim) {
    indptr.push_back(0);
    for (uint32_t r = 0; r < rows; ++r) indptr.push_back(indptr.back() + uniform(r == 0 ? 0 : 1, 6));
    const uint32_t n_partials = indptr.back();
    stats.resize(size_t{n_partials} * states);
    o.resize(size_t{n_partials} * states * dim);
    ref_out.assign(size_t{rows} * states * dim, 0.0);
    ref_lse.assign(size_t{rows} * states, -std::numeric_limits<double>::infinity());
    for (uint32_t r = 0; r < rows; ++r)
      for (uint32_t h = 0; h < states; ++h) fill_row_state(r, h);
  }

  void fill_row_state(uint32_t r, uint32_t h) {
    std::vector<double> logits, values;  // the union of the row's tokens, for the reference
    // A per-row offset of the logits far from zero makes the rescaling matter.
    const float offset = test::nonzero_uniform(30.0f);
    for (uint32_t p = indptr[r]; p < indptr[r + 1]; ++p) {
      const uint32_t n_tokens = uniform(0, 3) == 0 ? 0 : uniform(1, 50);  // some partials are empty
      softmax_stats& st = stats[size_t{p} * n_states + h];
      float* op = o.data() + (size_t{p} * n_states + h) * head_dim;
      std::vector<float> x(n_tokens), v(size_t{n_tokens} * head_dim);
      for (float& xi : x) xi = offset + test::nonzero_uniform(8.0f);
      for (float& vi : v) vi = 1.0f + test::nonzero_uniform(0.5f);  // away from a zero mean
      st = softmax_stats{};
      for (float xi : x) st.m = std::max(st.m, xi);
      std::fill(op, op + head_dim, 0.0f);
      for (uint32_t t = 0; t < n_tokens; ++t) {
        const float e = std::exp(x[t] - st.m);
        st.d += e;
        for (uint32_t d = 0; d < head_dim; ++d) op[d] += e * v[size_t{t} * head_dim + d];
        logits.push_back(x[t]);
        values.insert(values.end(), v.begin() + size_t{t} * head_dim, v.begin() + size_t{t + 1} * head_dim);
      }
    }
    if (logits.empty()) return;  // zeros and -inf
    const double m = *std::max_element(logits.begin(), logits.end());
    double denom = 0.0;
    double* out = ref_out.data() + (size_t{r} * n_states + h) * head_dim;
    for (size_t t = 0; t < logits.size(); ++t) {
      const double e = std::exp(logits[t] - m);
      denom += e;
      for (uint32_t d = 0; d < head_dim; ++d) out[d] += e * values[t * head_dim + d];
    }
    for (uint32_t d = 0; d < head_dim; ++d) out[d] /= denom;
    ref_lse[size_t{r} * n_states + h] = m + std::log(denom);
  }
};

}  // namespace

TEST_CASE("merge_partials + write_normalized match a float64 softmax over the union of the partials") {
  double worst_out = 0.0, worst_lse = 0.0;
  for (int round = 0; round < 50; ++round) {
    const uint32_t rows = uniform(1, 8), states = uniform(1, 8), dim = std::vector<uint32_t>{1, 64, 128}[uniform(0, 2)];
    merge_case c(rows, states, dim);
    std::vector<softmax_stats> merged(size_t{rows} * states);
    std::vector<float> out(size_t{rows} * states * dim, std::numeric_limits<float>::quiet_NaN());
    std::vector<float> lse(size_t{rows} * states, std::numeric_limits<float>::quiet_NaN());
    merge_partials(c.indptr.data(), rows, c.stats.data(), c.o.data(), states, dim, merged.data(), out.data());
    write_normalized(merged.data(), out.data(), rows * states, dim, out.data(), lse.data());
    for (size_t i = 0; i < lse.size(); ++i) {
      const std::span<const float> got(out.data() + i * dim, dim);
      const std::span<const double> want(c.ref_out.data() + i * dim, dim);
      if (std::isinf(c.ref_lse[i])) {  // no tokens at all: zeros and -inf
        CHECK(std::all_of(got.begin(), got.end(), [](float x) { return x == 0.0f; }));
        CHECK(lse[i] == -std::numeric_limits<float>::infinity());
        continue;
      }
      const double e_out = reference::relative_error(got, want);
      const double e_lse = std::fabs(lse[i] - c.ref_lse[i]) / std::max(1.0, std::fabs(c.ref_lse[i]));
      worst_out = std::max(worst_out, e_out);
      worst_lse = std::max(worst_lse, e_lse);
    }
  }
  MESSAGE("merge_partials: worst relative error out " << worst_out << ", lse " << worst_lse);
  CHECK(worst_out <= 1e-5);
  CHECK(worst_lse <= 1e-5);
}

TEST_CASE("merge_partial_range of no partials is empty; of one is a copy; write_normalized skips a null lse") {
  const softmax_stats one[2] = {{1.5f, 2.0f}, {}};
  const float o[4] = {2.0f, 4.0f, 7.0f, 7.0f};
  softmax_stats st[2];
  float out[4] = {9, 9, 9, 9};
  merge_partial_range(one, o, 0, 0, 2, 2, st, out);
  CHECK(st[0].empty());
  CHECK(std::all_of(out, out + 4, [](float x) { return x == 0.0f; }));
  merge_partial_range(one, o, 0, 1, 2, 2, st, out);
  CHECK(st[0].m == 1.5f);
  CHECK(st[0].d == 2.0f);
  CHECK(out[1] == 4.0f);
  write_normalized(st, out, 2, 2, out, nullptr);
  CHECK(out[0] == 1.0f);
  CHECK(out[1] == 2.0f);
  CHECK(out[2] == 0.0f);  // an empty state normalises to zeros
}
