// Decode kernels of one ISA (the first argument: scalar, avx2, avx512 or neon; one ctest each) against
// the float64 reference. Exits 77 (skipped) when this build or CPU lacks the ISA.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
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
  for (dtype t : {dtype::kF32, dtype::kF16, dtype::kBF16, dtype::kQ8_0}) {
    const auto p = test::make_params(128, t, 4, 1, 4096);
    const uint32_t lengths[] = {70001};
    test::paged_batch b(p, lengths);
    // The reference is computed once per dtype; every thread count must match it.
    std::vector<std::vector<float>> outs;
    for (uint32_t threads : {1u, 2u, 3u}) {
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
