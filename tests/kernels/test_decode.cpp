// Decode kernels of one ISA (the first argument: scalar, avx2, avx512 or neon; one ctest each) against
// the float64 reference. Exits 77 (skipped) when this build or CPU lacks the ISA.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "decode_test_util.hpp"

using namespace instinfer;

namespace {

// Set once in main from the command line, before any test runs.
cpu_isa kIsa = cpu_isa::kScalar;
constexpr double kTolerance = 1e-5;

std::string describe(const decode_params& p, uint32_t threads) {
  return std::string(cpu_isa_name(kIsa)) + " head_dim=" + std::to_string(p.layout.page.head_dim) +
         " dtype=" + std::string(dtype_name(p.layout.page.kv_dtype)) + " group=" + std::to_string(p.group_size) +
         " kv_heads=" + std::to_string(p.layout.n_kv_heads) + " page=" + std::to_string(p.layout.page.page_bytes) +
         " tpp=" + std::to_string(p.layout.tokens()) + " softcap=" + std::to_string(p.softcap) +
         " threads=" + std::to_string(threads);
}

// Runs the batch through a fresh host_decoder and checks it against the reference.
void run_and_check(test::paged_batch& b, uint32_t threads) {
  INFO(describe(b.params, threads));
  auto dec = host_decoder::create(b.params, threads, kIsa);
  REQUIRE_MESSAGE(dec.ok(), dec.error().to_string());
  CHECK((*dec)->isa() == kIsa);
  CHECK((*dec)->n_threads() == threads);
  const status s = (*dec)->run(b.work);
  REQUIRE_MESSAGE(s.ok(), s.to_string());
  const auto e = b.check();
  CHECK(e.out <= kTolerance);
  CHECK(e.lse <= kTolerance);
}

const dtype kDtypes[] = {dtype::kF32, dtype::kF16, dtype::kBF16, dtype::kQ8_0, dtype::kQ4_0};

}  // namespace

TEST_CASE("decode matches the float64 reference: head dims x dtypes x groups x edge contexts") {
  for (uint32_t hd : {64u, 128u, 256u}) {
    for (dtype t : kDtypes) {
      const uint32_t row = page_geometry::row_bytes(hd, t);
      // The smallest page holding a row (quantized rows leave the rest of a page unused).
      uint32_t smallest = 512;
      while (smallest < row) smallest *= 2;
      for (uint32_t page : {smallest, 4096u}) {
        for (uint32_t group : {1u, 4u, 8u}) {
          for (uint32_t threads : {1u, 2u}) {
            const auto p = test::make_params(hd, t, group, 2, page);
            const uint32_t tpp = p.layout.tokens();
            // One batch holds every edge case: 1 token, a page - 1, exactly a page, a page + 1, and more.
            std::vector<uint32_t> lengths = {1, tpp, tpp + 1, 3 * tpp + 5};
            if (tpp > 1) lengths.push_back(tpp - 1);
            test::paged_batch b(p, lengths);
            run_and_check(b, threads);
          }
        }
      }
    }
  }
}

TEST_CASE("decode over every page size from 512 B to 64 KiB") {
  for (uint32_t page = 512; page <= 65536; page *= 2) {
    for (dtype t : kDtypes) {
      const uint32_t hd = 64;
      if (page < page_geometry::row_bytes(hd, t)) continue;
      const auto p = test::make_params(hd, t, 4, 2, page);
      const uint32_t tpp = p.layout.tokens();
      std::vector<uint32_t> lengths = {1, tpp, tpp + 1, 2 * tpp + 3};
      if (tpp > 1) lengths.push_back(tpp - 1);
      test::paged_batch b(p, lengths);
      run_and_check(b, 2);
    }
  }
}

TEST_CASE("decode with soft-cap and with uneven group sizes") {
  for (dtype t : kDtypes) {
    for (float cap : {0.0f, 1.5f, 30.0f}) {
      for (uint32_t group : {2u, 3u, 4u, 7u, 16u}) {
        const auto p = test::make_params(128, t, group, 2, 4096, cap);
        const uint32_t lengths[] = {1, 37, 300};
        test::paged_batch b(p, lengths, 6.0f);  // large logits so that the cap matters
        run_and_check(b, 2);
      }
    }
  }
}

TEST_CASE("decode with an explicit scale, and a batch with an empty sequence") {
  for (dtype t : kDtypes) {
    auto p = test::make_params(64, t, 4, 3, 2048);
    p.scale = 0.3f;
    const uint32_t lengths[] = {5, 0, 1000, 17};
    test::paged_batch b(p, lengths);
    run_and_check(b, 2);
    for (uint32_t h = 0; h < p.n_q_heads() * 64; ++h) CHECK(b.out[1][h] == 0.0f);
  }
}

TEST_CASE("long contexts: ~70k tokens, split over threads and merged by lse") {
  // q4_0 shares q8_0's long-context path (only the load differs): one quantized type here.
  // INSTINFER_TEST_REDUCED (scripts/test-aarch64: qemu-user) keeps f16 and q8_0 and 1 and 3
  // threads; the full sweep runs natively.
  const bool reduced = std::getenv("INSTINFER_TEST_REDUCED") != nullptr;
  const std::vector<dtype> dtypes = reduced ? std::vector<dtype>{dtype::kF16, dtype::kQ8_0}
                                            : std::vector<dtype>{dtype::kF32, dtype::kF16, dtype::kBF16, dtype::kQ8_0};
  const std::vector<uint32_t> thread_counts = reduced ? std::vector<uint32_t>{1, 3} : std::vector<uint32_t>{1, 2, 3};
  for (dtype t : dtypes) {
    const auto p = test::make_params(128, t, 4, 1, 4096);
    const uint32_t lengths[] = {70001};
    test::paged_batch b(p, lengths);
    // The reference is computed once per dtype; every thread count must match it.
    std::vector<std::vector<float>> outs;
    for (uint32_t threads : thread_counts) {
      INFO(describe(p, threads));
      auto dec = host_decoder::create(p, threads, kIsa);
      REQUIRE(dec.ok());
      REQUIRE((*dec)->run(b.work).ok());
      outs.push_back(b.out[0]);
      outs.push_back(b.lse[0]);
    }
    const auto e = b.check();  // checks the last run (3 threads)
    CHECK(e.out <= kTolerance);
    CHECK(e.lse <= kTolerance);
    std::vector<double> ref(p.n_q_heads() * 128), ref_lse(p.n_q_heads());
    reference::attend_chunks(p, b.chunks[0].data(), lengths[0], b.q[0].data(), ref.data(), ref_lse.data());
    for (size_t i = 0; i < outs.size(); i += 2) {
      INFO("run " << i / 2);
      CHECK(reference::relative_error(outs[i], ref) <= kTolerance);
      for (uint32_t h = 0; h < p.n_q_heads(); ++h)
        CHECK(std::fabs(outs[i + 1][h] - ref_lse[h]) <= kTolerance * std::fabs(ref_lse[h]) + kTolerance);
    }
  }
}

TEST_CASE("the workspace grows with the batch and results stay right") {
  const auto p = test::make_params(128, dtype::kF16, 4, 2, 4096);
  auto dec = host_decoder::create(p, 2, kIsa);
  REQUIRE(dec.ok());
  for (const std::vector<uint32_t>& lengths :
       {std::vector<uint32_t>{100}, std::vector<uint32_t>{5000, 7, 20000, 1}, std::vector<uint32_t>{33, 4096}}) {
    test::paged_batch b(p, lengths);
    REQUIRE((*dec)->run(b.work).ok());
    const auto e = b.check();
    CHECK(e.out <= kTolerance);
    CHECK(e.lse <= kTolerance);
  }
}

TEST_CASE("the kernel function: partial states over chunk ranges merge to the whole") {
  const auto p = test::make_params(64, dtype::kBF16, 4, 2, 1024);
  auto fn = select_decode_kernel(kIsa, p);
  REQUIRE(fn.ok());
  const uint32_t lengths[] = {200};
  test::paged_batch b(p, lengths);
  const uint32_t tpp = p.layout.tokens();
  const uint32_t n_chunks = (200 + tpp - 1) / tpp;
  const uint32_t last = 200 - (n_chunks - 1) * tpp;
  for (uint32_t kvh = 0; kvh < 2; ++kvh) {
    std::vector<float> whole(4 * 64), part_a(4 * 64), part_b(4 * 64);
    softmax_stats sw[4], sa[4], sb[4];
    const float* q = b.q[0].data() + kvh * 4 * 64;
    fn.value()(p, b.chunks[0].data(), n_chunks, last, kvh, q, whole.data(), sw);
    fn.value()(p, b.chunks[0].data(), 2, tpp, kvh, q, part_a.data(), sa);
    fn.value()(p, b.chunks[0].data() + 2, n_chunks - 2, last, kvh, q, part_b.data(), sb);
    for (uint32_t h = 0; h < 4; ++h) {
      merge_state(sa[h], part_a.data() + h * 64, sb[h], part_b.data() + h * 64, 64);
      CHECK(sa[h].m == doctest::Approx(sw[h].m));
      CHECK(sa[h].d == doctest::Approx(sw[h].d).epsilon(1e-5));
      for (uint32_t d = 0; d < 64; ++d) CHECK(part_a[h * 64 + d] == doctest::Approx(whole[h * 64 + d]).epsilon(1e-5));
    }
    // No chunks: empty states and zero outputs.
    fn.value()(p, b.chunks[0].data(), 0, 0, kvh, q, part_a.data(), sa);
    for (uint32_t h = 0; h < 4; ++h) CHECK(sa[h].empty());
    CHECK(std::all_of(part_a.begin(), part_a.end(), [](float x) { return x == 0.0f; }));
  }
}

// ---- int8 query dot (decode_params::int8_query_dot, q8_0 K) ----------------------------------

namespace {

// The query as the int8 path scores it: quantize_query_q8, dequantized.
std::vector<float> quantized_query(const std::vector<float>& q, uint32_t hd) {
  std::vector<float> out(q.size());
  std::vector<int8_t> qi(hd);
  std::vector<float> qd(hd / kQuantBlock);
  for (size_t h = 0; h < q.size() / hd; ++h) {
    quantize_query_q8(q.data() + h * hd, hd, qi.data(), qd.data());
    for (uint32_t i = 0; i < hd; ++i)
      out[h * hd + i] = static_cast<float>(static_cast<double>(qi[i]) * qd[i / kQuantBlock]);
  }
  return out;
}

// A bound on the int8 path's error against the exact (f32 query) reference, for sequence s.
// Quantizing q moves each value by at most half its block's step, amax_b / 254, so a logit moves
// by at most delta = scale * sum_b amax_b / 254 * sum_{i in b} |k_i| (soft-cap's tanh is
// 1-Lipschitz, so capped logits move no more). Every probability then changes by a factor in
// [e^-2delta, e^2delta], so |o_j - o'_j| <= (e^2delta - 1) * max_t |v_tj| and |lse - lse'| <= delta.
// Returns {out bound (relative to max |o|, as relative_error), lse bound}.
std::pair<double, double> int8_error_bound(const test::paged_batch& b, size_t s, const std::vector<double>& ref,
                                           const std::vector<double>& ref_lse) {
  const decode_params& p = b.params;
  const chunk_layout& cl = p.layout;
  const uint32_t hd = cl.page.head_dim, tpp = cl.tokens(), nb = hd / kQuantBlock;
  double delta = 0.0, vmax = 0.0;
  for (uint32_t kh = 0; kh < cl.n_kv_heads; ++kh) {
    for (uint32_t t = 0; t < b.n_tokens[s]; ++t) {
      const std::byte* base = b.chunks[s][t / tpp];
      const std::byte* kr = base + cl.offset(kv_kind::kKey, kh, t % tpp, 0);
      const std::byte* vr = base + cl.offset(kv_kind::kValue, kh, t % tpp, 0);
      std::vector<double> k1(nb, 0.0);  // |k|_1 per block
      for (uint32_t i = 0; i < hd; ++i) {
        const std::byte* blk = kr + (i / kQuantBlock) * dtype_block_bytes(dtype::kQ8_0);
        k1[i / kQuantBlock] += std::fabs(double{dequantize_q8_0(blk, i % kQuantBlock)});
        const std::byte* vb = vr + (i / kQuantBlock) * dtype_block_bytes(dtype::kQ8_0);
        vmax = std::max(vmax, std::fabs(double{dequantize_q8_0(vb, i % kQuantBlock)}));
      }
      for (uint32_t g = 0; g < p.group_size; ++g) {
        const float* qh = b.q[s].data() + (size_t{kh} * p.group_size + g) * hd;
        double d = 0.0;
        for (uint32_t blk = 0; blk < nb; ++blk) {
          double amax = 0.0;
          for (uint32_t i = 0; i < kQuantBlock; ++i)
            amax = std::max(amax, std::fabs(double{qh[blk * kQuantBlock + i]}));
          d += amax / 254.0 * k1[blk];
        }
        delta = std::max(delta, d * p.effective_scale());
      }
    }
  }
  double omax = 0.0, lmax = 1.0;
  for (double x : ref) omax = std::max(omax, std::fabs(x));
  for (double x : ref_lse) lmax = std::max(lmax, std::fabs(x));
  // Plus the f32 path's own tolerance: accumulation and the f32 scale products.
  return {std::expm1(2.0 * delta) * vmax / omax + kTolerance, delta / lmax + kTolerance};
}

}  // namespace

TEST_CASE("int8 query dot: exact on the quantized query, within the derived bound of the f32 query") {
  double worst_ratio = 0.0, worst_err = 0.0;
  for (uint32_t hd : {64u, 128u, 256u}) {
    for (uint32_t page : {512u, 4096u}) {
      for (uint32_t group : {1u, 4u, 8u}) {
        for (float softcap : {0.0f, 30.0f}) {
          for (uint32_t threads : {1u, 2u}) {
            auto p = test::make_params(hd, dtype::kQ8_0, group, 2, page, softcap);
            if (p.layout.tokens() == 0) continue;
            const uint32_t tpp = p.layout.tokens();
            std::vector<uint32_t> lengths = {1, tpp, tpp + 1, 3 * tpp + 5, 300};
            test::paged_batch b(p, lengths);
            INFO(describe(p, threads));
            // The default path on the same batch still meets the f32 tolerance.
            {
              auto dec = host_decoder::create(p, threads, kIsa);
              REQUIRE_MESSAGE(dec.ok(), dec.error().to_string());
              REQUIRE((*dec)->run(b.work).ok());
              const auto e = b.check();
              CHECK(e.out <= kTolerance);
              CHECK(e.lse <= kTolerance);
            }
            p.int8_query_dot = true;
            b.params = p;
            auto dec = host_decoder::create(p, threads, kIsa);
            REQUIRE_MESSAGE(dec.ok(), dec.error().to_string());
            REQUIRE((*dec)->run(b.work).ok());
            for (size_t s = 0; s < b.work.size(); ++s) {
              const uint32_t nq = p.n_q_heads();
              // (1) The kernel: the float64 reference fed the quantized query, to the f32 tolerance.
              const std::vector<float> qq = quantized_query(b.q[s], hd);
              std::vector<double> ref(size_t{nq} * hd), ref_lse(nq);
              reference::attend_chunks(p, b.chunks[s].data(), b.n_tokens[s], qq.data(), ref.data(), ref_lse.data());
              CHECK(reference::relative_error(b.out[s], ref) <= kTolerance);
              for (uint32_t h = 0; h < nq; ++h)
                CHECK(std::fabs(double{b.lse[s][h]} - ref_lse[h]) / std::max(1.0, std::fabs(ref_lse[h])) <= kTolerance);
              // (2) The error against the exact query: measured, and within the derived bound.
              reference::attend_chunks(p, b.chunks[s].data(), b.n_tokens[s], b.q[s].data(), ref.data(), ref_lse.data());
              const double err = reference::relative_error(b.out[s], ref);
              const auto [bound_out, bound_lse] = int8_error_bound(b, s, ref, ref_lse);
              CHECK(err <= bound_out);
              for (uint32_t h = 0; h < nq; ++h)
                CHECK(std::fabs(double{b.lse[s][h]} - ref_lse[h]) / std::max(1.0, std::fabs(ref_lse[h])) <= bound_lse);
              worst_err = std::max(worst_err, err);
              worst_ratio = std::max(worst_ratio, err / bound_out);
            }
          }
        }
      }
    }
  }
  // Measured, for the record (q ~ U(-2, 2), k ~ U(-1, 1), v ~ bias + U(-0.5, 0.5)).
  std::printf("int8 query dot (%s): largest relative error vs the f32 query %.3g, at most %.3g of its bound\n",
              std::string(cpu_isa_name(kIsa)).c_str(), worst_err, worst_ratio);
  CHECK(worst_err > 0.0);  // the query really was quantized
}

TEST_CASE("int8 query dot: causal rows (prefill) are exact on the quantized query") {
  for (uint32_t group : {1u, 4u}) {
    auto p = test::make_params(128, dtype::kQ8_0, group, 2, 4096);
    p.int8_query_dot = true;
    const uint32_t tpp = p.layout.tokens(), nq = p.n_q_heads(), hd = 128;
    const uint32_t n = 3 * tpp + 5, rows = 70;
    test::paged_batch b(p, std::vector<uint32_t>{n});
    std::vector<float> q(size_t{rows} * nq * hd), out(q.size()), lse(size_t{rows} * nq);
    for (float& x : q) x = test::nonzero_uniform(2.0f);
    decode_work w = b.work[0];
    w.q = q.data();
    w.out = out.data();
    w.lse = lse.data();
    w.n_rows = rows;
    w.first_pos = n - rows;
    auto dec = host_decoder::create(p, 2, kIsa);
    REQUIRE_MESSAGE(dec.ok(), dec.error().to_string());
    const status st = (*dec)->run(std::span<const decode_work>(&w, 1));
    REQUIRE_MESSAGE(st.ok(), st.to_string());
    for (uint32_t r = 0; r < rows; ++r) {
      const std::vector<float> qr(q.begin() + size_t{r} * nq * hd, q.begin() + size_t{r + 1} * nq * hd);
      const std::vector<float> qq = quantized_query(qr, hd);
      std::vector<double> ref(size_t{nq} * hd), ref_lse(nq);
      reference::attend_chunks(p, b.chunks[0].data(), w.first_pos + r + 1, qq.data(), ref.data(), ref_lse.data());
      INFO("group " << group << " row " << r);
      CHECK(reference::relative_error(std::span<const float>(out.data() + size_t{r} * nq * hd, size_t{nq} * hd), ref) <=
            kTolerance);
    }
  }
}

TEST_CASE("int8 query dot is refused where it does not apply: other dtypes, too large a group") {
  for (dtype t : {dtype::kF32, dtype::kF16, dtype::kBF16, dtype::kQ4_0}) {
    auto p = test::make_params(128, t, 4, 2, 4096);
    p.int8_query_dot = true;
    auto dec = host_decoder::create(p, 1, kIsa);
    REQUIRE_FALSE(dec.ok());
    CHECK(dec.error().code() == errc::kUnsupported);
    CHECK_FALSE(select_decode_heads_kernel(kIsa, p).ok());
  }
  auto p = test::make_params(256, dtype::kQ8_0, 256, 2, 4096);  // 256 x 256 > kQ8QueryCap
  p.int8_query_dot = true;
  auto dec = host_decoder::create(p, 1, kIsa);
  REQUIRE_FALSE(dec.ok());
  CHECK(dec.error().code() == errc::kUnsupported);
  p.group_size = 128;  // 128 x 256 = kQ8QueryCap: fits
  CHECK(host_decoder::create(p, 1, kIsa).ok());
}

int main(int argc, char** argv) {
  // One binary for every ISA: compiling the test once instead of per ISA saves CI minutes.
  std::vector<char*> args{argv[0]};
  std::string isa_name;
  for (int i = 1; i < argc; ++i) {
    if (argv[i][0] != '-' && isa_name.empty())
      isa_name = argv[i];
    else
      args.push_back(argv[i]);
  }
  bool known = false;
  for (cpu_isa isa : {cpu_isa::kScalar, cpu_isa::kAvx2, cpu_isa::kAvx512, cpu_isa::kNeon}) {
    if (cpu_isa_name(isa) == isa_name) {
      kIsa = isa;
      known = true;
    }
  }
  if (!known) {
    std::fprintf(stderr, "usage: %s scalar|avx2|avx512|neon [doctest options]\n", argv[0]);
    return 2;
  }
  if (!cpu_isa_available(kIsa)) {
    std::printf("skipped: decode ISA '%s' is not built in or not supported by this CPU\n",
                std::string(cpu_isa_name(kIsa)).c_str());
    return 77;
  }
  std::printf("decode ISA %s, seed %llu (set INSTINFER_TEST_SEED to reproduce)\n",
              std::string(cpu_isa_name(kIsa)).c_str(), static_cast<unsigned long long>(test::test_seed()));
  doctest::Context ctx(static_cast<int>(args.size()), args.data());
  return ctx.run();
}
