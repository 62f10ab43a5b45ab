// kv_cache over "ssd:<file>" decodes exactly like kv_cache over "host" on the same stored values:
// across page boundaries, after fork, after truncation and after reopening the cache.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "instinfer/backend/ssd_backend.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "instinfer/testing/reference.hpp"
#include "ssd_test_util.hpp"

using namespace instinfer;

namespace {

constexpr uint32_t kLayers = 3, kQHeads = 8, kKvHeads = 2, kDim = 128;

cache_options options(const std::string& uri, dtype t) {
  cache_options o;
  o.shape = kv_shape{kLayers, kQHeads, kKvHeads, kDim, t};
  o.page_bytes = 4096;
  o.capacity_bytes = 64ull << 20;
  o.n_threads = 2;
  o.backend_uri = uri;
  return o;
}

// The same operations on both caches.
struct pair_of_caches {
  std::unique_ptr<kv_cache> host, ssd;
  uint32_t seed = 7;

  pair_of_caches(dtype t, const std::string& ssd_uri) {
    auto h = kv_cache::create(options("host", t));
    REQUIRE_MESSAGE(h.ok(), h.error().to_string());
    host = std::move(h.value());
    auto s = kv_cache::create(options(ssd_uri, t));
    REQUIRE_MESSAGE(s.ok(), s.error().to_string());
    ssd = std::move(s.value());
    CHECK(ssd->storage().name() == "ssd");
  }

  seq_id create() {
    auto a = host->create_sequence();
    auto b = ssd->create_sequence();
    REQUIRE((a.ok() && b.ok()));
    REQUIRE(a.value() == b.value());
    return a.value();
  }
  seq_id fork(seq_id s) {
    auto a = host->fork_sequence(s);
    auto b = ssd->fork_sequence(s);
    REQUIRE((a.ok() && b.ok()));
    REQUIRE(a.value() == b.value());
    return a.value();
  }
  void append(seq_id s, uint32_t n) {
    for (uint32_t l = 0; l < kLayers; ++l) {
      const auto k = ssd_test::random_floats(size_t{n} * kKvHeads * kDim, seed++);
      const auto v = ssd_test::random_floats(size_t{n} * kKvHeads * kDim, seed++);
      REQUIRE(host->append(s, l, n, k.data(), v.data(), dtype::kF32).ok());
      const status st = ssd->append(s, l, n, k.data(), v.data(), dtype::kF32);
      REQUIRE_MESSAGE(st.ok(), st.to_string());
    }
  }
  void truncate(seq_id s, uint64_t begin) {
    REQUIRE(host->remove_range(s, begin, UINT64_MAX).ok());
    REQUIRE(ssd->remove_range(s, begin, UINT64_MAX).ok());
  }
  // Every layer, with prefetch of the next layer as a decoder would do it.
  void check(const std::vector<seq_id>& seqs) {
    const size_t n = seqs.size() * kQHeads * kDim;
    const backend_stats before = ssd->stats().backend;
    ssd->prefetch(0, seqs);
    for (uint32_t l = 0; l < kLayers; ++l) {
      const auto q = ssd_test::random_floats(n, seed++);
      std::vector<float> oh(n), os(n, NAN), lh(seqs.size() * kQHeads), ls(seqs.size() * kQHeads, NAN);
      REQUIRE(host->attend(l, seqs, q.data(), oh.data(), lh.data()).ok());
      const status st = ssd->attend(l, seqs, q.data(), os.data(), ls.data());
      REQUIRE_MESSAGE(st.ok(), st.to_string());
      if (l + 1 < kLayers) ssd->prefetch(l + 1, seqs);
      for (size_t b = 0; b < seqs.size(); ++b) {
        for (uint32_t h = 0; h < kQHeads; ++h) {
          const size_t at = (b * kQHeads + h) * kDim;
          std::vector<double> want(oh.begin() + at, oh.begin() + at + kDim);
          const double err = reference::relative_error(std::span<const float>(os.data() + at, kDim), want);
          CHECK_MESSAGE(err <= 1e-6, "layer " << l << " seq " << seqs[b] << " head " << h << " err " << err);
          const float a = lh[b * kQHeads + h], c = ls[b * kQHeads + h];
          CHECK((a == c || std::fabs(a - c) <= 1e-6f * std::max(1.0f, std::fabs(a))));
        }
      }
    }
    // Each layer's stored chunks were read by the prefetch issued before its attend (a decoder's
    // overlap of I/O with compute): a prefetch that is refused or dropped shows up here.
    const backend_stats after = ssd->stats().backend;
    if (after.device_read_requests > before.device_read_requests)
      CHECK(after.device_reads_prefetched > before.device_reads_prefetched);
    // The stored values are the same too (after the loop: these reads would drop a prefetch).
    for (uint32_t l = 0; l < kLayers; ++l)
      for (seq_id s : seqs) {
        std::vector<std::byte> kh, vh, ks, vs;
        REQUIRE(host->read_tokens(s, l, kh, vh).ok());
        REQUIRE(ssd->read_tokens(s, l, ks, vs).ok());
        CHECK(kh == ks);
        CHECK(vh == vs);
      }
  }
};

}  // namespace

TEST_CASE("ssd and host caches agree across page boundaries, fork and truncation") {
  for (dtype t : {dtype::kF16, dtype::kBF16, dtype::kF32}) {
    CAPTURE(dtype_name(t));
    pair_of_caches c(t, "ssd:" + ssd_test::scratch_file("cache.bin") + "?staging=512K&request=64K&write_batch=4");
    const seq_id a = c.create(), b = c.create();
    c.append(a, 1);
    c.check({a});
    c.append(a, 15);  // exactly one page
    c.append(b, 17);  // one page and one token
    c.check({a, b});
    c.append(a, 300);
    c.append(b, 47);
    c.check({b, a});
    // Fork shares full chunks and copies the partial tail; both grow apart afterwards.
    const seq_id f = c.fork(a);
    c.check({a, f});
    c.append(f, 20);
    c.append(a, 3);
    c.check({a, b, f});
    REQUIRE(c.ssd->flush().ok());
    // Truncation inside a sealed chunk (it is copied before the next append) and at a boundary.
    c.truncate(a, 100);
    c.truncate(f, 64);
    c.check({a, f});
    c.append(a, 40);
    c.append(f, 1);
    c.check({f, b, a});
    // Decode-style growth: one token per step per layer.
    for (int step = 0; step < 20; ++step) {
      c.append(a, 1);
      c.append(b, 1);
    }
    c.check({a, b, f});
    REQUIRE(c.host->free_sequence(b).ok());
    REQUIRE(c.ssd->free_sequence(b).ok());
    c.check({a, f});
    const auto st = c.ssd->stats();
    CHECK(st.backend.device_bytes_written > 0);
    CHECK(st.backend.device_bytes_read > 0);
  }
}

TEST_CASE("a reopened ssd cache (same file, same process) agrees with host again") {
  const std::string uri = "ssd:" + ssd_test::scratch_file("reopen.bin") + "?staging=256K";
  for (int round = 0; round < 3; ++round) {
    pair_of_caches c(dtype::kF16, uri);
    const seq_id a = c.create();
    c.append(a, 50 + 33 * static_cast<uint32_t>(round));
    REQUIRE(c.ssd->flush().ok());
    c.check({a});
  }
}

TEST_CASE("write amplification through the cache: 1.00 for whole pages") {
  pair_of_caches c(dtype::kF16, "ssd:" + ssd_test::scratch_file("wa.bin"));
  const seq_id a = c.create(), b = c.create();
  c.append(a, 16 * 12);
  c.append(b, 16 * 5);
  REQUIRE(c.ssd->flush().ok());
  const auto st = c.ssd->stats().backend;
  CHECK(st.kv_bytes_appended > 0);
  CHECK(st.write_amplification() == 1.0);
}

int main(int argc, char** argv) {
  return ssd_test::run_tests(argc, argv);
}
