// Several threads drive one cache at once (appends, forks, frees, attends on their own
// sequences) while the host decoder runs its own worker threads: results must equal a replay
// on a fresh cache, and TSan (scripts/test) must see no race.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "instinfer/kv/kv_cache.hpp"

using namespace instinfer;

namespace {
constexpr uint32_t kThreads = 4, kSteps = 40;
const kv_shape kShape{2, 8, 2, 64, dtype::kF16};

std::unique_ptr<kv_cache> make_cache() {
  cache_options o;
  o.shape = kShape;
  o.page_bytes = 1024;
  o.capacity_bytes = 64ull << 20;
  o.n_threads = 2;
  return kv_cache::create(o).value();
}

// One client's deterministic workload; returns the last attention output it saw.
std::vector<float> client(kv_cache& cache, uint32_t id) {
  std::mt19937 rng(100 + id);
  std::normal_distribution<float> dist;
  const size_t row = size_t{kShape.n_kv_heads} * kShape.head_dim;
  const size_t qn = size_t{kShape.n_q_heads} * kShape.head_dim;
  std::vector<float> k(64 * row), v(64 * row), q(qn), out(qn);
  seq_id seq = cache.create_sequence().value();
  for (uint32_t step = 0; step < kSteps; ++step) {
    const uint32_t n = 1 + rng() % 40;
    for (size_t i = 0; i < n * row; ++i) {
      k[i] = dist(rng);
      v[i] = dist(rng);
    }
    for (uint32_t l = 0; l < kShape.n_layers; ++l)
      REQUIRE(cache.append(seq, l, n, k.data(), v.data(), dtype::kF32).ok());
    if (step % 7 == 3) {  // fork, keep the fork, drop the original
      const seq_id child = cache.fork_sequence(seq).value();
      REQUIRE(cache.free_sequence(seq).ok());
      seq = child;
    }
    if (step % 11 == 5) REQUIRE(cache.remove_range(seq, cache.length(seq, 0).value() / 2, UINT64_MAX).ok());
    for (auto& x : q) x = dist(rng);
    REQUIRE(cache.attend(step % kShape.n_layers, std::span<const seq_id>(&seq, 1), q.data(), out.data(), nullptr).ok());
  }
  REQUIRE(cache.free_sequence(seq).ok());
  return out;
}
}  // namespace

TEST_CASE("concurrent clients on one cache match a sequential replay") {
  auto shared = make_cache();
  std::vector<std::vector<float>> concurrent(kThreads);
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < kThreads; ++t) threads.emplace_back([&, t] { concurrent[t] = client(*shared, t); });
  for (auto& th : threads) th.join();
  CHECK(shared->stats().n_sequences == 0);
  CHECK(shared->stats().backend.used_chunks == 0);
  for (uint32_t t = 0; t < kThreads; ++t) {
    auto fresh = make_cache();
    const std::vector<float> sequential = client(*fresh, t);
    CAPTURE(t);
    CHECK(std::memcmp(sequential.data(), concurrent[t].data(), sequential.size() * sizeof(float)) == 0);
  }
}
