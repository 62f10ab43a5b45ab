// KV manager tests over the host backend: page tables, fork/truncate/remove semantics, failure
// atomicity (out of pages, failing backend), and bad inputs.
#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <vector>

#include "instinfer/backend/host_backend.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "support/forwarding_backend.hpp"
#include "support/kv_test_util.hpp"

using namespace instinfer;
using test_support::expect_layer;
using test_support::random_rows;
using test_support::reference_attend;
using test_support::stored_bytes;

namespace {

kv_shape small_shape(dtype t = dtype::kF32) {
  return kv_shape{3, 4, 2, 64, t};
}

std::unique_ptr<kv_cache> make_cache(const kv_shape& shape, uint32_t page_bytes, uint64_t capacity_chunks,
                                     std::unique_ptr<backend> b = nullptr) {
  cache_options o;
  o.shape = shape;
  o.page_bytes = page_bytes;
  const uint64_t chunk_bytes = 2ull * shape.n_kv_heads * page_bytes;
  o.capacity_bytes = capacity_chunks * chunk_bytes;
  o.n_threads = 1;
  auto c = b ? kv_cache::create(o, std::move(b)) : kv_cache::create(o);
  REQUIRE_MESSAGE(c.ok(), c.error().to_string());
  return std::move(c).value();
}

}  // namespace

TEST_CASE("append across page boundaries stores exactly the rows given") {
  for (dtype t : {dtype::kF32, dtype::kF16, dtype::kBF16}) {
    CAPTURE(dtype_name(t));
    const kv_shape shape = small_shape(t);
    auto cache = make_cache(shape, 1024, 64);
    const uint32_t tpp = cache->page().tokens_per_page;
    std::mt19937 rng(7);
    auto seq = cache->create_sequence().value();
    std::vector<std::byte> all_k, all_v;
    // Uneven append sizes: 1, a page - 1, exactly a page, a page + 1, ...
    for (uint32_t n : {1u, tpp - 1, tpp, tpp + 1, 3u, 2 * tpp + 5}) {
      auto k = random_rows(rng, n, shape), v = random_rows(rng, n, shape);
      REQUIRE(cache->append(seq, 1, n, k.data(), v.data(), dtype::kF32).ok());
      auto kb = stored_bytes(k, t), vb = stored_bytes(v, t);
      all_k.insert(all_k.end(), kb.begin(), kb.end());
      all_v.insert(all_v.end(), vb.begin(), vb.end());
    }
    expect_layer(*cache, seq, 1, all_k, all_v);
    CHECK(cache->length(seq, 1).value() == all_k.size() / (shape.n_kv_heads * shape.head_dim * dtype_size(t)));
    CHECK(cache->length(seq, 0).value() == 0);

    // Rows already in the cache dtype are copied verbatim.
    auto k = random_rows(rng, 5, shape), v = random_rows(rng, 5, shape);
    auto kb = stored_bytes(k, t), vb = stored_bytes(v, t);
    REQUIRE(cache->append(seq, 2, 5, kb.data(), vb.data(), t).ok());
    expect_layer(*cache, seq, 2, kb, vb);
  }
}

TEST_CASE("page table is CSR with last_page_len") {
  const kv_shape shape = small_shape();
  auto cache = make_cache(shape, 512, 64);  // 2 tokens per page (64 x f32 = 256 B rows)
  const uint32_t tpp = cache->page().tokens_per_page;
  REQUIRE(tpp == 2);
  std::mt19937 rng(1);
  auto a = cache->create_sequence().value();
  auto b = cache->create_sequence().value();
  auto c = cache->create_sequence().value();
  auto k = random_rows(rng, 5, shape);
  REQUIRE(cache->append(a, 0, 5, k.data(), k.data(), dtype::kF32).ok());
  REQUIRE(cache->append(b, 0, 4, k.data(), k.data(), dtype::kF32).ok());
  csr_page_table pt;
  const std::vector<seq_id> seqs{a, b, c};
  REQUIRE(cache->page_table(0, seqs, pt).ok());
  CHECK(pt.indptr == std::vector<uint32_t>{0, 3, 5, 5});
  CHECK(pt.last_page_len == std::vector<uint32_t>{1, 2, 0});
  const page_table_view view = pt.view();
  CHECK(view.n_tokens(0) == 5);
  CHECK(view.n_tokens(1) == 4);
  CHECK(view.n_tokens(2) == 0);
}

TEST_CASE("fork shares full chunks, copies the partial tail, and isolates later appends") {
  const kv_shape shape = small_shape(dtype::kF16);
  auto cache = make_cache(shape, 1024, 64);
  const uint32_t tpp = cache->page().tokens_per_page;
  std::mt19937 rng(11);
  auto parent = cache->create_sequence().value();
  auto k = random_rows(rng, 2 * tpp + 3, shape), v = random_rows(rng, 2 * tpp + 3, shape);
  REQUIRE(cache->append(parent, 0, 2 * tpp + 3, k.data(), v.data(), dtype::kF32).ok());
  const uint64_t used_before = cache->stats().backend.used_chunks;
  auto child = cache->fork_sequence(parent).value();
  CHECK(cache->stats().backend.used_chunks == used_before + 1);  // only the tail is copied
  CHECK(cache->stats().shared_chunks == 2);

  auto kb = stored_bytes(k, shape.kv_dtype), vb = stored_bytes(v, shape.kv_dtype);
  expect_layer(*cache, child, 0, kb, vb);

  // Appending to the child must not change the parent, and vice versa.
  auto k2 = random_rows(rng, tpp, shape), v2 = random_rows(rng, tpp, shape);
  REQUIRE(cache->append(child, 0, tpp, k2.data(), v2.data(), dtype::kF32).ok());
  auto k3 = random_rows(rng, 1, shape), v3 = random_rows(rng, 1, shape);
  REQUIRE(cache->append(parent, 0, 1, k3.data(), v3.data(), dtype::kF32).ok());
  auto child_k = kb, child_v = vb;
  auto k2b = stored_bytes(k2, shape.kv_dtype), v2b = stored_bytes(v2, shape.kv_dtype);
  child_k.insert(child_k.end(), k2b.begin(), k2b.end());
  child_v.insert(child_v.end(), v2b.begin(), v2b.end());
  expect_layer(*cache, child, 0, child_k, child_v);
  auto parent_k = kb, parent_v = vb;
  auto k3b = stored_bytes(k3, shape.kv_dtype), v3b = stored_bytes(v3, shape.kv_dtype);
  parent_k.insert(parent_k.end(), k3b.begin(), k3b.end());
  parent_v.insert(parent_v.end(), v3b.begin(), v3b.end());
  expect_layer(*cache, parent, 0, parent_k, parent_v);

  // Freeing the parent keeps the child's shared pages alive.
  REQUIRE(cache->free_sequence(parent).ok());
  expect_layer(*cache, child, 0, child_k, child_v);
  REQUIRE(cache->free_sequence(child).ok());
  CHECK(cache->stats().backend.used_chunks == 0);
  CHECK(cache->stats().shared_chunks == 0);
}

TEST_CASE("truncation into a shared or sealed chunk copies before appending") {
  const kv_shape shape = small_shape();
  auto cache = make_cache(shape, 1024, 64);
  const uint32_t tpp = cache->page().tokens_per_page;
  std::mt19937 rng(3);
  auto a = cache->create_sequence().value();
  const uint32_t n = 3 * tpp;
  auto k = random_rows(rng, n, shape), v = random_rows(rng, n, shape);
  REQUIRE(cache->append(a, 0, n, k.data(), v.data(), dtype::kF32).ok());
  auto b = cache->fork_sequence(a).value();
  // Cut b inside its second (shared, sealed) chunk, then append: a must not change.
  const uint32_t cut = tpp + 1;
  REQUIRE(cache->remove_range(b, cut, UINT64_MAX).ok());
  CHECK(cache->length(b, 0).value() == cut);
  auto k2 = random_rows(rng, tpp, shape), v2 = random_rows(rng, tpp, shape);
  REQUIRE(cache->append(b, 0, tpp, k2.data(), v2.data(), dtype::kF32).ok());
  auto ka = stored_bytes(k, shape.kv_dtype), va = stored_bytes(v, shape.kv_dtype);
  expect_layer(*cache, a, 0, ka, va);
  const size_t row = shape.n_kv_heads * shape.head_dim * 4;
  std::vector<std::byte> kb(ka.begin(), ka.begin() + cut * row), vb(va.begin(), va.begin() + cut * row);
  auto k2b = stored_bytes(k2, shape.kv_dtype), v2b = stored_bytes(v2, shape.kv_dtype);
  kb.insert(kb.end(), k2b.begin(), k2b.end());
  vb.insert(vb.end(), v2b.begin(), v2b.end());
  expect_layer(*cache, b, 0, kb, vb);

  // Same on an unshared but sealed chunk.
  REQUIRE(cache->remove_range(a, 5, UINT64_MAX).ok());
  REQUIRE(cache->append(a, 0, 1, k2.data(), v2.data(), dtype::kF32).ok());
  std::vector<std::byte> ka2(ka.begin(), ka.begin() + 5 * row), va2(va.begin(), va.begin() + 5 * row);
  ka2.insert(ka2.end(), k2b.begin(), k2b.begin() + row);
  va2.insert(va2.end(), v2b.begin(), v2b.begin() + row);
  expect_layer(*cache, a, 0, ka2, va2);
}

TEST_CASE("remove_range of interior positions keeps the rest in order") {
  const kv_shape shape = small_shape(dtype::kBF16);
  auto cache = make_cache(shape, 1024, 64);
  std::mt19937 rng(21);
  auto s = cache->create_sequence().value();
  const uint32_t n = 37;
  auto k = random_rows(rng, n, shape), v = random_rows(rng, n, shape);
  for (uint32_t l = 0; l < shape.n_layers; ++l) REQUIRE(cache->append(s, l, n, k.data(), v.data(), dtype::kF32).ok());
  REQUIRE(cache->remove_range(s, 4, 19).ok());
  const size_t row = shape.n_kv_heads * shape.head_dim * 2;
  auto kb = stored_bytes(k, shape.kv_dtype), vb = stored_bytes(v, shape.kv_dtype);
  std::vector<std::byte> ke(kb.begin(), kb.begin() + 4 * row), ve(vb.begin(), vb.begin() + 4 * row);
  ke.insert(ke.end(), kb.begin() + 19 * row, kb.end());
  ve.insert(ve.end(), vb.begin() + 19 * row, vb.end());
  for (uint32_t l = 0; l < shape.n_layers; ++l) {
    CHECK(cache->length(s, l).value() == n - 15);
    expect_layer(*cache, s, l, ke, ve);
  }
  CHECK(cache->remove_range(s, 9, 3).code() == errc::kInvalidArgument);
  CHECK(cache->remove_range(s, 100, UINT64_MAX).ok());  // past the end: nothing to do
}

TEST_CASE("out of pages is a clean error that changes nothing") {
  const kv_shape shape = small_shape();
  auto cache = make_cache(shape, 1024, 4);
  const uint32_t tpp = cache->page().tokens_per_page;
  std::mt19937 rng(5);
  auto s = cache->create_sequence().value();
  auto k = random_rows(rng, 3 * tpp + 1, shape), v = random_rows(rng, 3 * tpp + 1, shape);
  REQUIRE(cache->append(s, 0, 3 * tpp + 1, k.data(), v.data(), dtype::kF32).ok());  // 4 chunks
  auto big = random_rows(rng, 2 * tpp, shape);
  status st = cache->append(s, 0, 2 * tpp, big.data(), big.data(), dtype::kF32);
  CHECK(st.code() == errc::kOutOfPages);
  CHECK(st.message().find("free chunks") != std::string::npos);
  CHECK(cache->length(s, 0).value() == 3 * tpp + 1);
  expect_layer(*cache, s, 0, stored_bytes(k, shape.kv_dtype), stored_bytes(v, shape.kv_dtype));
  // Fork needs one chunk for the partial tail: also refused cleanly.
  auto f = cache->fork_sequence(s);
  CHECK(f.error().code() == errc::kOutOfPages);
  CHECK(cache->stats().n_sequences == 1);
  // Appending to another layer fails too, and the first layer still reads back.
  CHECK(cache->append(s, 1, 1, big.data(), big.data(), dtype::kF32).code() == errc::kOutOfPages);
  expect_layer(*cache, s, 0, stored_bytes(k, shape.kv_dtype), stored_bytes(v, shape.kv_dtype));
}

TEST_CASE("a failing backend write leaves the cache as it was") {
  const kv_shape shape = small_shape();
  std::mt19937 rng(17);
  for (int fail_at = 1; fail_at <= 4; ++fail_at) {
    CAPTURE(fail_at);
    // A host backend whose Nth write or copy fails: exercises the manager's rollback paths.
    auto owned = std::make_unique<test_support::forwarding_backend>(std::make_unique<host_backend>());
    test_support::forwarding_backend* fb = owned.get();
    auto cache = make_cache(shape, 1024, 32, std::move(owned));
    const uint32_t tpp = cache->page().tokens_per_page;
    auto s = cache->create_sequence().value();
    auto k = random_rows(rng, tpp + 3, shape), v = random_rows(rng, tpp + 3, shape);
    REQUIRE(cache->append(s, 0, tpp + 3, k.data(), v.data(), dtype::kF32).ok());
    auto other = cache->fork_sequence(s).value();
    const uint64_t used = cache->stats().backend.used_chunks;
    fb->fail_nth(test_support::call_mask(test_support::call::kWrite, test_support::call::kCopy), fail_at);
    auto k2 = random_rows(rng, 2 * tpp + 2, shape);
    status st = cache->append(s, 0, 2 * tpp + 2, k2.data(), k2.data(), dtype::kF32);
    CHECK(st.code() == errc::kIoError);
    CHECK(cache->length(s, 0).value() == tpp + 3);
    CHECK(cache->stats().backend.used_chunks == used);
    expect_layer(*cache, s, 0, stored_bytes(k, shape.kv_dtype), stored_bytes(v, shape.kv_dtype));
    expect_layer(*cache, other, 0, stored_bytes(k, shape.kv_dtype), stored_bytes(v, shape.kv_dtype));
    // The cache keeps working after the failure.
    fb->disarm();
    REQUIRE(cache->append(s, 0, 1, k2.data(), k2.data(), dtype::kF32).ok());
    CHECK(cache->length(s, 0).value() == tpp + 4);
  }
}

TEST_CASE("bad inputs: unknown sequence, layer out of range, null rows, zero sizes, bad dtype") {
  const kv_shape shape = small_shape(dtype::kF16);
  auto cache = make_cache(shape, 1024, 8);
  auto s = cache->create_sequence().value();
  float row[2 * 64] = {1.0f};
  CHECK(cache->append(999, 0, 1, row, row, dtype::kF32).code() == errc::kUnknownSequence);
  CHECK(cache->append(s, 3, 1, row, row, dtype::kF32).code() == errc::kLayerOutOfRange);
  CHECK(cache->append(s, 0, 1, nullptr, row, dtype::kF32).code() == errc::kInvalidArgument);
  CHECK(cache->append(s, 0, 0, row, row, dtype::kF32).code() == errc::kInvalidArgument);
  CHECK(cache->append(s, 0, 1, row, row, dtype::kBF16).code() == errc::kUnsupported);
  CHECK(cache->append(s, 0, 1, row, row, static_cast<dtype>(9)).code() == errc::kInvalidArgument);
  CHECK(cache->append(s, 0, 0x7fffffffu, row, row, dtype::kF32).code() == errc::kInvalidArgument);
  CHECK(cache->fork_sequence(999).error().code() == errc::kUnknownSequence);
  CHECK(cache->free_sequence(999).code() == errc::kUnknownSequence);
  CHECK(cache->remove_range(999, 0, 1).code() == errc::kUnknownSequence);
  CHECK(cache->length(s, 7).error().code() == errc::kLayerOutOfRange);
  const seq_id seqs[] = {s, 12345};
  float q[2 * 4 * 64] = {}, out[2 * 4 * 64];
  CHECK(cache->attend(0, seqs, q, out, nullptr).code() == errc::kUnknownSequence);
  CHECK(cache->attend(5, std::span<const seq_id>(seqs, 1), q, out, nullptr).code() == errc::kLayerOutOfRange);
  CHECK(cache->attend(0, std::span<const seq_id>(), q, out, nullptr).code() == errc::kInvalidArgument);
  CHECK(cache->attend(0, std::span<const seq_id>(seqs, 1), nullptr, out, nullptr).code() == errc::kInvalidArgument);
  REQUIRE(cache->free_sequence(s).ok());
  CHECK(cache->free_sequence(s).code() == errc::kUnknownSequence);

  cache_options o;
  o.shape = shape;
  o.page_bytes = 3000;
  CHECK(kv_cache::create(o).error().code() == errc::kInvalidArgument);
  o.page_bytes = 0;
  o.shape.head_dim = 80;
  CHECK(kv_cache::create(o).error().code() == errc::kUnsupported);
  o.shape.head_dim = 64;
  o.backend_uri = "ssd";
  o.backend_uri = "nvme-of://x";
  CHECK(kv_cache::create(o).error().code() == errc::kInvalidArgument);
}

TEST_CASE("attend through the cache matches the float64 reference after fork and truncation") {
  for (dtype t : {dtype::kF32, dtype::kF16, dtype::kBF16}) {
    for (uint32_t threads : {1u, 2u}) {
      CAPTURE(dtype_name(t));
      CAPTURE(threads);
      cache_options o;
      o.shape = kv_shape{2, 8, 2, 128, t};
      o.page_bytes = 4096;
      o.capacity_bytes = 64ull << 20;
      o.n_threads = threads;
      auto cache = kv_cache::create(o).value();
      const uint32_t tpp = cache->page().tokens_per_page;
      std::mt19937 rng(1000 + threads);
      auto a = cache->create_sequence().value();
      auto k = random_rows(rng, 5 * tpp + 3, o.shape), v = random_rows(rng, 5 * tpp + 3, o.shape);
      REQUIRE(cache->append(a, 1, 5 * tpp + 3, k.data(), v.data(), dtype::kF32).ok());
      auto b = cache->fork_sequence(a).value();
      REQUIRE(cache->remove_range(b, 2 * tpp - 1, UINT64_MAX).ok());
      auto k2 = random_rows(rng, tpp + 1, o.shape), v2 = random_rows(rng, tpp + 1, o.shape);
      REQUIRE(cache->append(b, 1, tpp + 1, k2.data(), v2.data(), dtype::kF32).ok());
      auto c = cache->create_sequence().value();  // empty: zeros, lse -inf
      auto d = cache->create_sequence().value();  // a single token
      REQUIRE(cache->append(d, 1, 1, k2.data(), v2.data(), dtype::kF32).ok());

      const std::vector<seq_id> seqs{a, b, c, d};
      const size_t qn = size_t{o.shape.n_q_heads} * o.shape.head_dim;
      std::vector<float> q(seqs.size() * qn), out(q.size()), lse(seqs.size() * o.shape.n_q_heads);
      std::normal_distribution<float> dist(0.0f, 1.0f);
      for (auto& x : q) x = dist(rng);
      REQUIRE(cache->attend(1, seqs, q.data(), out.data(), lse.data()).ok());
      for (size_t i = 0; i < seqs.size(); ++i) {
        std::vector<double> want, want_lse;
        reference_attend(*cache, seqs[i], 1, q.data() + i * qn, want, want_lse);
        const double err = reference::relative_error(std::span<const float>(out.data() + i * qn, qn), want);
        CAPTURE(i);
        CHECK(err <= 1e-5);
        for (uint32_t h = 0; h < o.shape.n_q_heads; ++h) {
          const float got = lse[i * o.shape.n_q_heads + h];
          if (std::isinf(want_lse[h])) {
            CHECK(std::isinf(got));
          } else {
            CHECK(std::fabs(got - want_lse[h]) <= 1e-5 * std::max(1.0, std::fabs(want_lse[h])));
          }
        }
      }
    }
  }
}
