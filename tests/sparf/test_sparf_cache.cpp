// kv_cache::attend_sparse over every backend built in: at compression 1 it equals dense attend;
// below 1 every backend gives the same result from the same stored values; the index follows
// fork and truncation; bad parameters are rejected.
#include <doctest/doctest.h>

#include <unistd.h>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "instinfer/kv/kv_cache.hpp"
#include "sparf_test_util.hpp"
#include "support/kv_test_util.hpp"

using namespace instinfer;

namespace {

std::vector<std::string> backends_to_try() {
  std::vector<std::string> uris{"host"};
  if (describe_backends().find("ssd") != std::string::npos) {
    const char* tmp = std::getenv("TMPDIR");
    uris.push_back(std::string("ssd:") + (tmp ? tmp : "/tmp") + "/instinfer-sparf-" + std::to_string(getpid()) +
                   ".bin?capacity=64M&read_gap=0");  // bytes below count the chosen pages only, no merged gaps
  }
  if (describe_backends().find("csd") != std::string::npos)
    uris.push_back("csd:?channels=4&dies=2&blocks_per_die=128&pages_per_block=8&cores=2");
  return uris;
}

std::unique_ptr<kv_cache> make(const std::string& uri, const kv_shape& shape) {
  auto c = kv_cache::create(test_support::sparf_cache_options(shape, uri, 64ull << 20));
  if (!c.ok()) return nullptr;  // e.g. O_DIRECT refused by this filesystem
  return std::move(c).value();
}

const auto rel = sparf_test::max_rel_diff;

}  // namespace

TEST_CASE("attend_sparse on every backend: dense at compression 1, identical across backends below 1") {
  const kv_shape shape{2, 8, 2, 128, dtype::kF16};
  const auto work = test_support::workload(shape, 3000, 42);
  const size_t nq = size_t{shape.n_q_heads} * shape.head_dim;

  std::vector<float> first_sparse, first_fork_sparse;
  for (const std::string& uri : backends_to_try()) {
    CAPTURE(uri);
    auto cache = make(uri, shape);
    if (!cache) {
      MESSAGE("skipping " << uri << ": backend unavailable here");
      continue;
    }
    const seq_id s = cache->create_sequence().value();
    // Two appends so the index sees a tail that crosses column blocks.
    REQUIRE(cache->append(s, 1, 1000, work.k.data(), work.v.data(), dtype::kF32).ok());
    const size_t row = size_t{shape.n_kv_heads} * shape.head_dim;
    REQUIRE(cache->append(s, 1, 2000, work.k.data() + 1000 * row, work.v.data() + 1000 * row, dtype::kF32).ok());

    std::vector<float> dense(nq), dense_lse(shape.n_q_heads), sparse(nq), sparse_lse(shape.n_q_heads);
    REQUIRE(cache->flush().ok());
    const uint64_t read0 = cache->stats().backend.device_bytes_read;
    REQUIRE(cache->attend(1, std::span<const seq_id>(&s, 1), work.q.data(), dense.data(), dense_lse.data()).ok());
    const uint64_t read_dense = cache->stats().backend.device_bytes_read - read0;
    REQUIRE(cache
                ->attend_sparse(1, std::span<const seq_id>(&s, 1), work.q.data(), sparse.data(), sparse_lse.data(),
                                sparf_params::with_compression(1.0))
                .ok());
    CHECK(rel(sparse, dense) <= 1e-5);

    const uint64_t read1 = cache->stats().backend.device_bytes_read;
    REQUIRE(cache
                ->attend_sparse(1, std::span<const seq_id>(&s, 1), work.q.data(), sparse.data(), sparse_lse.data(),
                                sparf_params::with_compression(0.125))
                .ok());
    const uint64_t read_sparse = cache->stats().backend.device_bytes_read - read1;
    if (read_dense > 0) {  // a storage backend: only the chosen column pages and selected K/V pages
      MESSAGE(uri << ": bytes read from the device, SparF 1/8 / dense = " << double(read_sparse) / double(read_dense));
      CHECK(read_sparse * 4 <= read_dense);
    }
    const double err = rel(sparse, dense);
    MESSAGE(uri << ": SparF 1/8 vs dense relative error " << err);
    CHECK(err < 1.0);  // an approximation, but not garbage
    const cache_stats st = cache->stats();
    CHECK(st.sparf.dense_pages > 0);
    CHECK(st.sparf.pages_read() < st.sparf.dense_pages * 2);  // two calls: dense-equivalent once each
    // The column copy is on the host (host backend), on the device but for the tail block (ssd), or
    // all in the drive (csd runs SparF itself).
    const uint64_t block_bytes = channel_layout::make(4096, 128, dtype::kF16, 0, shape.n_kv_heads)->block_bytes();
    if (cache->storage().runs_sparf())
      CHECK(st.sparf_column_bytes == 0);
    else if (cache->storage().host_view())
      CHECK(st.sparf_column_bytes == 6 * block_bytes);  // 3000 tokens: 5 sealed blocks + the tail
    else
      CHECK(st.sparf_column_bytes == block_bytes);
    if (first_sparse.empty()) {
      first_sparse = sparse;
    } else {
      CHECK(rel(sparse, first_sparse) <= 1e-6);
    }

    // Fork + truncate + re-append: the index must follow the tokens exactly (compression 1 == dense).
    const seq_id f = cache->fork_sequence(s).value();
    REQUIRE(cache->remove_range(f, 1234, UINT64_MAX).ok());
    REQUIRE(cache->append(f, 1, 7, work.k.data(), work.v.data(), dtype::kF32).ok());
    REQUIRE(cache->remove_range(f, 100, 300).ok());
    REQUIRE(cache->attend(1, std::span<const seq_id>(&f, 1), work.q.data(), dense.data(), nullptr).ok());
    REQUIRE(cache
                ->attend_sparse(1, std::span<const seq_id>(&f, 1), work.q.data(), sparse.data(), nullptr,
                                sparf_params::with_compression(1.0))
                .ok());
    CHECK(rel(sparse, dense) <= 1e-5);
    // Below 1 as well, the fork's SparF is the same on every backend (its column copy follows).
    REQUIRE(cache
                ->attend_sparse(1, std::span<const seq_id>(&f, 1), work.q.data(), sparse.data(), nullptr,
                                sparf_params::with_compression(0.125))
                .ok());
    if (first_fork_sparse.empty())
      first_fork_sparse = sparse;
    else
      CHECK(rel(sparse, first_fork_sparse) <= 1e-6);

    // Bad parameters are clear errors.
    float out[8 * 128];
    CHECK(cache
              ->attend_sparse(1, std::span<const seq_id>(&s, 1), work.q.data(), out, nullptr,
                              sparf_params::with_compression(0.0))
              .code() == errc::kInvalidArgument);
    CHECK(cache
              ->attend_sparse(1, std::span<const seq_id>(&s, 1), work.q.data(), out, nullptr,
                              sparf_params::with_compression(1.5))
              .code() == errc::kInvalidArgument);
    CHECK(cache
              ->attend_sparse(1, std::span<const seq_id>(&s, 1), work.q.data(), out, nullptr,
                              sparf_params::with_rk(0, 10))
              .code() == errc::kInvalidArgument);
    CHECK(cache
              ->attend_sparse(1, std::span<const seq_id>(&s, 1), work.q.data(), out, nullptr,
                              sparf_params::with_rk(8, 100000))
              .code() == errc::kInvalidArgument);
    CHECK(cache->attend_sparse(2, std::span<const seq_id>(&s, 1), work.q.data(), out, nullptr).code() ==
          errc::kLayerOutOfRange);
    cache.reset();
    if (uri.rfind("ssd:", 0) == 0) std::remove(uri.substr(4, uri.find('?') - 4).c_str());
  }
}

TEST_CASE("attend_sparse without cache_options::sparf is unsupported") {
  cache_options o;
  o.shape = kv_shape{1, 2, 1, 64, dtype::kF32};
  o.capacity_bytes = 1 << 20;
  auto cache = kv_cache::create(o).value();
  const seq_id s = cache->create_sequence().value();
  float q[2 * 64] = {1.0f}, out[2 * 64];
  CHECK(cache->attend_sparse(0, std::span<const seq_id>(&s, 1), q, out, nullptr).code() == errc::kUnsupported);
}

// One compute pool per cache (backend_config::pool): dense decode, SparF and the page-summary
// policy share n_threads - 1 workers, where each used to start its own (3 x (n_threads - 1)).
TEST_CASE("a host cache with both sparse policies starts n_threads - 1 compute threads") {
  const auto threads_now = [] {
    uint32_t n = 0;
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
    return n;
  };
  const uint32_t before = threads_now();
  {
    cache_options o = test_support::sparf_cache_options(kv_shape{1, 4, 2, 64, dtype::kF16}, "host", 16ull << 20);
    o.page_summaries = true;
    o.n_threads = 4;
    auto cache = kv_cache::create(o);
    REQUIRE_MESSAGE(cache.ok(), cache.error().to_string());
    CHECK(threads_now() == before + 3);
    // Both policies and dense attend run on that pool, one after another.
    const seq_id s = (*cache)->create_sequence().value();
    std::vector<float> k(size_t{300} * 2 * 64), v(k.size()), q(4 * 64, 0.25f), out(q.size());
    for (size_t i = 0; i < k.size(); ++i) k[i] = std::sin(0.1f * static_cast<float>(i)), v[i] = std::cos(0.07f * i);
    REQUIRE((*cache)->append(s, 0, 300, k.data(), v.data(), dtype::kF32).ok());
    const std::span<const seq_id> one(&s, 1);
    CHECK((*cache)->attend(0, one, q.data(), out.data(), nullptr).ok());
    sparf_params p = sparf_params::with_compression(0.25);
    CHECK((*cache)->attend_sparse(0, one, q.data(), out.data(), nullptr, p).ok());
    p.policy = sparse_policy::kPageSummary;
    CHECK((*cache)->attend_sparse(0, one, q.data(), out.data(), nullptr, p).ok());
    CHECK(threads_now() == before + 3);
  }
  CHECK(threads_now() == before);
}
