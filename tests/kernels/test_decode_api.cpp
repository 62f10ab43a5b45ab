// Dispatch and host_decoder contracts: ISA probing, parameter validation, bad batches.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "decode_test_util.hpp"
#include "instinfer/core/thread_pool.hpp"

using namespace instinfer;

TEST_CASE("ISA probing") {
  CHECK(cpu_isa_available(cpu_isa::kScalar));
  CHECK(cpu_isa_available(best_cpu_isa()));
  CHECK(cpu_isa_name(cpu_isa::kAvx512) == "avx512");
  CHECK(cpu_isa_name(cpu_isa::kNeon) == "neon");
  CHECK(cpu_isa_name(static_cast<cpu_isa>(42)) == "unknown");
  CHECK_FALSE(cpu_isa_available(static_cast<cpu_isa>(42)));
#if defined(__x86_64__)
  CHECK_FALSE(cpu_isa_available(cpu_isa::kNeon));
#elif defined(__aarch64__)
  CHECK_FALSE(cpu_isa_available(cpu_isa::kAvx2));
  CHECK(best_cpu_isa() == cpu_isa::kNeon);
#endif
}

TEST_CASE("decode_params: scale and validation") {
  auto p = test::make_params(128, dtype::kF16, 4, 8, 4096);
  CHECK(p.validate().ok());
  CHECK(p.n_q_heads() == 32);
  CHECK(p.effective_scale() == doctest::Approx(1.0 / std::sqrt(128.0)));
  p.scale = 0.25f;
  CHECK(p.effective_scale() == 0.25f);
}

TEST_CASE("bad parameters give clear errors from select_decode_kernel and host_decoder::create") {
  struct bad_case {
    const char* name;
    decode_params params;
    errc code;
  };
  std::vector<bad_case> cases;
  auto base = test::make_params(128, dtype::kF16, 4, 8, 4096);
  {
    auto p = base;
    p.layout.page.head_dim = 96;
    p.layout.page.tokens_per_page = 4096 / (96 * 2);
    cases.push_back({"unsupported head_dim 96", p, errc::kUnsupported});
  }
  {
    auto p = base;
    p.layout.page.head_dim = 0;
    cases.push_back({"head_dim 0", p, errc::kUnsupported});
  }
  {
    auto p = base;
    p.group_size = 0;
    cases.push_back({"group size 0", p, errc::kInvalidArgument});
  }
  {
    auto p = base;
    p.group_size = 1000;
    cases.push_back({"group size too large", p, errc::kInvalidArgument});
  }
  {
    auto p = base;
    p.layout.page.kv_dtype = static_cast<dtype>(9);
    cases.push_back({"unknown dtype", p, errc::kInvalidArgument});
  }
  {
    auto p = base;
    p.layout.page.page_bytes = 3000;
    cases.push_back({"page bytes not a power of two", p, errc::kInvalidArgument});
  }
  {
    auto p = base;
    p.layout.page.tokens_per_page = 7;
    cases.push_back({"inconsistent tokens_per_page", p, errc::kInvalidArgument});
  }
  {
    auto p = base;
    p.layout.n_kv_heads = 0;
    cases.push_back({"no kv heads", p, errc::kInvalidArgument});
  }
  {
    auto p = base;
    p.scale = std::numeric_limits<float>::quiet_NaN();
    cases.push_back({"NaN scale", p, errc::kInvalidArgument});
  }
  {
    auto p = base;
    p.scale = -1.0f;
    cases.push_back({"negative scale", p, errc::kInvalidArgument});
  }
  {
    auto p = base;
    p.softcap = std::numeric_limits<float>::infinity();
    cases.push_back({"infinite softcap", p, errc::kInvalidArgument});
  }
  for (const auto& c : cases) {
    INFO(std::string(c.name));
    const status v = c.params.validate();
    CHECK(v.code() == c.code);
    CHECK_FALSE(v.message().empty());
    auto k = select_decode_kernel(cpu_isa::kScalar, c.params);
    REQUIRE_FALSE(k.ok());
    CHECK(k.error().code() == c.code);
    auto d = host_decoder::create(c.params, 1, cpu_isa::kScalar);
    REQUIRE_FALSE(d.ok());
    CHECK(d.error().code() == c.code);
    MESSAGE(std::string(c.name) << " -> " << d.error().to_string());
  }
}

TEST_CASE("an ISA this machine lacks is unsupported, not a crash") {
  const auto p = test::make_params(128, dtype::kF16, 4, 8, 4096);
  for (cpu_isa isa : {cpu_isa::kScalar, cpu_isa::kAvx2, cpu_isa::kAvx512, cpu_isa::kNeon}) {
    auto k = select_decode_kernel(isa, p);
    CHECK(k.ok() == cpu_isa_available(isa));
    if (!k.ok()) {
      CHECK(k.error().code() == errc::kUnsupported);
      auto d = host_decoder::create(p, 1, isa);
      CHECK(d.error().code() == errc::kUnsupported);
    }
  }
  auto d = host_decoder::create(p, 100000);
  CHECK(d.error().code() == errc::kInvalidArgument);
}

TEST_CASE("host_decoder::run rejects malformed batches without touching outputs") {
  const auto p = test::make_params(64, dtype::kF32, 2, 2, 1024);
  const uint32_t lengths[] = {10, 9};
  test::paged_batch b(p, lengths);
  auto dec = host_decoder::create(p, 2);
  REQUIRE(dec.ok());
  REQUIRE((*dec)->run(b.work).ok());

  auto expect_bad = [&](std::vector<decode_work> w, const std::string& what) {
    INFO(what);
    const status s = (*dec)->run(w);
    CHECK(s.code() == errc::kInvalidArgument);
    CHECK_FALSE(s.message().empty());
    MESSAGE(what << " -> " << s.to_string());
  };
  auto w = b.work;
  w[1].q = nullptr;
  expect_bad(w, "null q");
  w = b.work;
  w[0].out = nullptr;
  expect_bad(w, "null out");
  w = b.work;
  w[0].chunks = nullptr;
  expect_bad(w, "null chunk list");
  w = b.work;
  w[0].n_tokens = 0;
  expect_bad(w, "zero tokens in a chunk");
  w = b.work;
  w[0].n_tokens = 10000;
  expect_bad(w, "more tokens than the chunks hold");
  std::vector<const std::byte*> with_null = b.chunks[0];
  with_null.push_back(nullptr);
  w = b.work;
  w[0].chunks = with_null.data();
  w[0].n_chunks = 4;
  w[0].n_tokens = 3 * p.layout.tokens() + 1;
  expect_bad(w, "null chunk pointer");
  // An empty batch is fine.
  CHECK((*dec)->run({}).ok());
}

TEST_CASE("thread_pool: the caller always runs, workers at most once per run, runs never overlap") {
  for (uint32_t n : {1u, 2u, 5u}) {
    thread_pool pool(n);
    CHECK(pool.size() == n);
    std::vector<std::atomic<int>> hits(n);
    std::atomic<int> inside{0}, max_inside{0};
    for (int r = 0; r < 300; ++r) {
      std::vector<std::atomic<int>> this_run(n);
      auto fn = [&](uint32_t i) noexcept {
        const int now = inside.fetch_add(1) + 1;
        int seen = max_inside.load();
        while (now > seen && !max_inside.compare_exchange_weak(seen, now)) {
        }
        this_run[i].fetch_add(1);
        hits[i].fetch_add(1);
        inside.fetch_sub(1);
      };
      pool.run(fn);
      CHECK(inside.load() == 0);  // every joined worker has finished when run() returns
      CHECK(this_run[0].load() == 1);
      for (auto& h : this_run) CHECK(h.load() <= 1);
    }
    CHECK(hits[0].load() == 300);
    CHECK(max_inside.load() <= static_cast<int>(n));
  }
}
