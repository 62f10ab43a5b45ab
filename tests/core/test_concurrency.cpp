// Several threads drive one cache at once (appends, forks, frees, attends on their own
// sequences) while the backend runs its own worker threads: results must equal a replay on a
// fresh cache, and TSan (scripts/test) must see no race. One ctest per backend
// (instinfer-test-concurrency-host, -ssd, -csd), each skipping (exit 77) where it cannot run:
// the ssd and csd runs put their files in $TMPDIR, the csd run starts instinfer-csd drives.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "instinfer/backend/csd_backend.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "ssd/ssd_test_util.hpp"

using namespace instinfer;

namespace {
constexpr uint32_t kThreads = 4, kSteps = 40;
const kv_shape kShape{2, 8, 2, 64, dtype::kF16};

std::string g_scheme = "host";
uint32_t g_serial = 0;

std::unique_ptr<kv_cache> make_cache() {
  cache_options o;
  o.shape = kShape;
  // The csd drive's flash file is opened with O_DIRECT: pages of 4 KiB.
  o.page_bytes = g_scheme == "csd" ? 4096 : 1024;
  o.capacity_bytes = 32ull << 20;
  o.n_threads = 2;
  const std::string file = ssd_test::scratch_file(g_scheme + "-" + std::to_string(g_serial++) + ".bin");
  if (g_scheme == "ssd") o.backend_uri = "ssd:" + file;
  // 64 MiB of flash for a 32 MiB cache: room for the drive's garbage collection.
  if (g_scheme == "csd")
    o.backend_uri = "csd:" + file + "?channels=4&dies=2&blocks_per_die=256&pages_per_block=8&cores=2";
  auto cache = kv_cache::create(o);
  INFO(o.backend_uri, ": ", cache.ok() ? std::string() : cache.error().to_string());
  REQUIRE(cache.ok());
  return std::move(cache).value();
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

// An engine's threads (llama.cpp's ith/nth) attending one long sequence with the slice calls,
// step after step on the same buffers, while another client appends to its own sequence: every
// step's output equals one attend_chunk call on the same cache state (on the host the slices are
// one shared run; elsewhere they split by sequence), and TSan sees no race in the hand-off.
TEST_CASE("slices of one call on several threads, with a concurrent client") {
  cache_options o;
  o.shape = kShape;
  o.page_bytes = g_scheme == "csd" ? 4096 : 1024;
  o.capacity_bytes = 32ull << 20;
  o.caller_threads = true;
  const std::string file = ssd_test::scratch_file(g_scheme + "-slices-" + std::to_string(g_serial++) + ".bin");
  if (g_scheme == "ssd") o.backend_uri = "ssd:" + file;
  if (g_scheme == "csd")
    o.backend_uri = "csd:" + file + "?channels=4&dies=2&blocks_per_die=256&pages_per_block=8&cores=2";
  auto created = kv_cache::create(o);
  REQUIRE_MESSAGE(created.ok(), created.error().to_string());
  kv_cache& cache = *created.value();
  std::mt19937 rng(7);
  std::normal_distribution<float> dist;
  const size_t row = size_t{kShape.n_kv_heads} * kShape.head_dim;
  const size_t qn = size_t{kShape.n_q_heads} * kShape.head_dim;
  const seq_id seq = cache.create_sequence().value();
  std::vector<float> k(1200 * row), v(1200 * row);
  for (auto& x : k) x = dist(rng);
  for (auto& x : v) x = dist(rng);
  for (uint32_t l = 0; l < kShape.n_layers; ++l)
    REQUIRE(cache.append(seq, l, 1200, k.data(), v.data(), dtype::kF32).ok());
  std::atomic<bool> stop{false};
  std::thread other([&] {
    std::mt19937 wr(9);
    std::normal_distribution<float> wdist;  // its own: a distribution keeps state
    std::vector<float> kk(row), vv(row);
    const seq_id mine = cache.create_sequence().value();
    while (!stop.load()) {
      for (auto& x : kk) x = wdist(wr);
      for (auto& x : vv) x = wdist(wr);
      REQUIRE(cache.append(mine, 0, 1, kk.data(), vv.data(), dtype::kF32).ok());
    }
    REQUIRE(cache.free_sequence(mine).ok());
  });
  const uint32_t nth = 3, n_rows = 4;
  std::vector<float> q(n_rows * qn), out(q.size()), want(q.size());
  const seq_id seqs[1] = {seq};
  for (uint32_t step = 0; step < 12; ++step) {
    const uint32_t layer = step % kShape.n_layers;
    for (auto& x : q) x = dist(rng);
    const uint32_t pos[1] = {1200 - n_rows}, rows[1] = {n_rows};
    std::vector<status> st(nth);
    std::vector<std::thread> threads;
    for (uint32_t i = 0; i < nth; ++i)
      threads.emplace_back(
          [&, i] { st[i] = cache.attend_chunk_slice(layer, seqs, pos, rows, q.data(), out.data(), nullptr, i, nth); });
    for (auto& th : threads) th.join();
    for (const status& s : st) REQUIRE_MESSAGE(s.ok(), s.to_string());
    REQUIRE(cache.attend_chunk(layer, seqs, pos, rows, q.data(), want.data(), nullptr).ok());
    double diff = 0, norm = 0;  // normwise: the shared run may split the sequence where one call does not
    for (size_t i = 0; i < want.size(); ++i) {
      diff += double(out[i] - want[i]) * double(out[i] - want[i]);
      norm += double(want[i]) * double(want[i]);
    }
    CAPTURE(step);
    CHECK(std::sqrt(diff / norm) <= 1e-6);
  }
  stop = true;
  other.join();
}

int main(int argc, char** argv) {
  std::vector<char*> args{argv[0]};
  for (int i = 1; i < argc; ++i) {
    if (argv[i][0] != '-')
      g_scheme = argv[i];
    else
      args.push_back(argv[i]);
  }
  if (g_scheme != "host" && g_scheme != "ssd" && g_scheme != "csd") {
    std::fprintf(stderr, "usage: %s host|ssd|csd [doctest options]\n", argv[0]);
    return 2;
  }
  if (g_scheme == "csd" && !csd_backend::available()) {
    std::fprintf(stderr, "skipped: csd: instinfer-csd not found (next to this executable, or INSTINFER_CSD_DEVICE)\n");
    return 77;
  }
  if (g_scheme != "host" && !ssd_test::direct_io_works()) {
    std::fprintf(stderr, "skipped: %s: %s does not support O_DIRECT\n", g_scheme.c_str(),
                 ssd_test::scratch_dir().c_str());
    ssd_test::remove_scratch();
    return 77;
  }
  doctest::Context ctx(static_cast<int>(args.size()), args.data());
  const int rc = ctx.run();
  if (g_scheme != "host") ssd_test::remove_scratch();
  return rc;
}
