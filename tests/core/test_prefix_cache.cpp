// The content-addressed prefix cache (kv/prefix_cache.hpp) over a host cache: the longest cached
// prefix comes back as a sequence that shares the stored chunks and reads back (and attends) exactly
// what was stored; misses for other tokens, another model or a partial group; LRU eviction under
// the cap, leaves first; hidden sequences and memory are released and reported.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "instinfer/kv/kv_cache.hpp"
#include "instinfer/kv/prefix_cache.hpp"

using namespace instinfer;

namespace {

constexpr uint32_t kLayers = 2, kDim = 64;
constexpr uint32_t kGroup = 4096 / (kDim * 2);  // tokens per page group: f16, 4 KiB pages

std::unique_ptr<kv_cache> make_cache() {
  cache_options o;
  o.shape = kv_shape{kLayers, 2, 1, kDim, dtype::kF16};
  o.page_bytes = 4096;
  o.capacity_bytes = 256ull * 2 * 4096;
  o.n_threads = 1;
  auto c = kv_cache::create(o);
  REQUIRE_MESSAGE(c.ok(), c.error().to_string());
  return std::move(c).value();
}

std::vector<int32_t> token_ids(uint32_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % 50000);
  return t;
}

// A sequence with n tokens of random K/V in every layer.
seq_id filled(kv_cache& c, uint32_t n, uint32_t seed) {
  const seq_id s = c.create_sequence().value();
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> k(size_t{n} * kDim), v(size_t{n} * kDim);
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (float& x : k) x = dist(rng);
    for (float& x : v) x = dist(rng);
    REQUIRE(c.append(s, l, n, k.data(), v.data(), dtype::kF32).ok());
  }
  return s;
}

// Stored K and V of every layer of s, positions [0, n).
std::vector<std::byte> stored(kv_cache& c, seq_id s, uint64_t n) {
  std::vector<std::byte> all;
  for (uint32_t l = 0; l < kLayers; ++l) {
    std::vector<std::byte> k, v;
    REQUIRE(c.read_tokens(s, l, k, v).ok());
    const size_t row = k.size() / c.length(s, l).value();
    REQUIRE(n * row <= k.size());
    all.insert(all.end(), k.begin(), k.begin() + static_cast<ptrdiff_t>(n * row));
    all.insert(all.end(), v.begin(), v.begin() + static_cast<ptrdiff_t>(n * row));
  }
  return all;
}

std::vector<float> attend(kv_cache& c, seq_id s, uint32_t layer) {
  std::vector<float> q(2 * kDim, 0.25f), out(2 * kDim), lse(2);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>(i % 7) * 0.1f - 0.3f;
  const seq_id ids[] = {s};
  REQUIRE(c.attend(layer, ids, q.data(), out.data(), lse.data()).ok());
  out.insert(out.end(), lse.begin(), lse.end());
  return out;
}

std::unique_ptr<prefix_cache> make_prefix(kv_cache& c, uint64_t capacity, const char* model = "test-model") {
  auto p = prefix_cache::create(c, prefix_cache_options{model, capacity, {}});
  REQUIRE_MESSAGE(p.ok(), p.error().to_string());
  return std::move(p).value();
}

}  // namespace

TEST_CASE("lookup returns the longest cached prefix, sharing the stored chunks") {
  auto c = make_cache();
  auto p = make_prefix(*c, 64);
  const std::vector<int32_t> tokens = token_ids(3 * kGroup + 5, 1);  // three full groups and a tail
  const seq_id a = filled(*c, static_cast<uint32_t>(tokens.size()), 2);
  REQUIRE(p->insert(a, tokens).ok());
  CHECK(p->stats().groups == 3);
  CHECK(p->stats().held_sequences == 1);

  const uint64_t free_before = c->storage().free_chunks();
  auto m = p->lookup(tokens);
  REQUIRE(m.ok());
  CHECK(m->n_tokens == 3 * kGroup);
  REQUIRE(m->seq != 0);
  CHECK(m->seq != a);
  // Shared, not copied: no chunk was allocated for it.
  CHECK(c->storage().free_chunks() == free_before);
  CHECK(c->stats().shared_chunks >= 3 * kLayers);
  for (uint32_t l = 0; l < kLayers; ++l) CHECK(c->length(m->seq, l).value() == 3 * kGroup);
  CHECK(stored(*c, m->seq, 3 * kGroup) == stored(*c, a, 3 * kGroup));
  const seq_id fork = c->fork_sequence_at(a, 3 * kGroup).value();
  CHECK(attend(*c, m->seq, 1) == attend(*c, fork, 1));

  // The caller's sequence can go: the prefix stays.
  const std::vector<std::byte> expect = stored(*c, a, 2 * kGroup);
  REQUIRE(c->free_sequence(a).ok());
  REQUIRE(c->free_sequence(fork).ok());
  std::vector<int32_t> other = tokens;
  other[2 * kGroup + 3] ^= 1;  // differs in the third group
  auto m2 = p->lookup(other);
  REQUIRE(m2.ok());
  CHECK(m2->n_tokens == 2 * kGroup);
  CHECK(stored(*c, m2->seq, 2 * kGroup) == expect);
  // The sequence returned is the caller's: it appends the rest.
  std::vector<float> row(kDim, 0.5f);
  for (uint32_t l = 0; l < kLayers; ++l) CHECK(c->append(m2->seq, l, 1, row.data(), row.data(), dtype::kF32).ok());

  // Misses: a changed first token, fewer tokens than a group, nothing.
  other = tokens;
  other[0] += 1;
  CHECK(p->lookup(other).value().n_tokens == 0);
  CHECK(p->lookup(other).value().seq == 0);
  CHECK(p->lookup(std::span<const int32_t>(tokens.data(), kGroup - 1)).value().n_tokens == 0);
  CHECK(p->lookup({}).value().n_tokens == 0);
  const prefix_cache_stats s = p->stats();
  CHECK(s.lookups == 6);
  CHECK(s.hits == 2);
  CHECK(s.hit_tokens == 5 * kGroup);
  CHECK(s.tokens_per_group == kGroup);
}

TEST_CASE("only what every layer holds is indexed; bad inputs are errors") {
  auto c = make_cache();
  auto p = make_prefix(*c, 16);
  const std::vector<int32_t> tokens = token_ids(4 * kGroup, 3);
  const seq_id a = c->create_sequence().value();
  std::vector<float> rows(size_t{4} * kGroup * kDim, 0.1f);
  REQUIRE(c->append(a, 0, 4 * kGroup, rows.data(), rows.data(), dtype::kF32).ok());
  REQUIRE(c->append(a, 1, 2 * kGroup + 1, rows.data(), rows.data(), dtype::kF32).ok());
  REQUIRE(p->insert(a, tokens).ok());
  CHECK(p->stats().groups == 2);  // layer 1 holds two full groups
  CHECK(p->lookup(tokens).value().n_tokens == 2 * kGroup);
  CHECK(p->insert(12345, tokens).code() == errc::kUnknownSequence);
  CHECK(prefix_cache::create(*c, prefix_cache_options{"m", 0, {}}).error().code() == errc::kInvalidArgument);
  // Inserting the same prefix again adds nothing.
  REQUIRE(p->insert(a, tokens).ok());
  CHECK(p->stats().groups == 2);
  CHECK(p->stats().inserted_groups == 2);
}

TEST_CASE("the fingerprint covers the model id and the cache shape") {
  auto c = make_cache();
  auto a = make_prefix(*c, 4, "model-a");
  auto a2 = make_prefix(*c, 4, "model-a");
  auto b = make_prefix(*c, 4, "model-b");
  CHECK(a->fingerprint() == a2->fingerprint());
  CHECK(a->fingerprint() != b->fingerprint());
  cache_options o;
  o.shape = kv_shape{kLayers, 4, 1, kDim, dtype::kF16};  // other GQA group
  o.page_bytes = 4096;
  o.capacity_bytes = 16 * 2 * 4096;
  auto other = kv_cache::create(o).value();
  auto a3 = make_prefix(*other, 4, "model-a");
  CHECK(a3->fingerprint() != a->fingerprint());
}

TEST_CASE("LRU eviction under the cap, leaves first; memory and sequences come back") {
  auto c = make_cache();
  const uint64_t free0 = c->storage().free_chunks();
  const uint64_t seqs0 = c->stats().n_sequences;
  {
    auto p = make_prefix(*c, 4);
    const std::vector<int32_t> t1 = token_ids(3 * kGroup, 10), t2 = token_ids(3 * kGroup, 11);
    const std::vector<int32_t> t3 = token_ids(2 * kGroup, 12);
    const seq_id s1 = filled(*c, 3 * kGroup, 20), s2 = filled(*c, 3 * kGroup, 21), s3 = filled(*c, 2 * kGroup, 22);
    REQUIRE(p->insert(s1, t1).ok());
    const uint64_t bytes_at_3 = p->stats().host_bytes;
    CHECK(bytes_at_3 > 3 * kGroup * sizeof(int32_t));
    // Three more groups under a cap of four: t1's two deepest groups go (leaves first).
    REQUIRE(p->insert(s2, t2).ok());
    CHECK(p->stats().groups == 4);
    CHECK(p->stats().evicted_groups == 2);
    auto m1 = p->lookup(t1);  // also makes t1's group the most recent
    CHECK(m1.value().n_tokens == kGroup);
    CHECK(p->lookup(t2).value().n_tokens == 3 * kGroup);
    CHECK(p->lookup(t1).value().n_tokens == kGroup);
    // Two more: t2 (used before t1's last lookup) loses its two deepest groups.
    REQUIRE(p->insert(s3, t3).ok());
    CHECK(p->stats().groups == 4);
    CHECK(p->lookup(t1).value().n_tokens == kGroup);
    CHECK(p->lookup(t2).value().n_tokens == kGroup);
    CHECK(p->lookup(t3).value().n_tokens == 2 * kGroup);
    // Memory stays bounded by the cap however much is inserted.
    for (uint32_t i = 0; i < 20; ++i) {
      const seq_id s = filled(*c, 2 * kGroup, 100 + i);
      REQUIRE(p->insert(s, token_ids(2 * kGroup, 200 + i)).ok());
      REQUIRE(c->free_sequence(s).ok());
    }
    CHECK(p->stats().groups == 4);
    CHECK(p->stats().host_bytes <= 2 * bytes_at_3 + 4096);
    CHECK(p->stats().held_sequences <= 4);
    // Everything the test created is freed: only the hidden sequences hold chunks now.
    for (const seq_id s : {s1, s2, s3}) REQUIRE(c->free_sequence(s).ok());
    // (the sequences returned by lookup are the test's too)
  }
  // The prefix cache is gone: its hidden sequences with it. Sequences returned by lookup remain
  // the caller's; free them all and every chunk is back.
  std::vector<seq_id> left;
  for (seq_id id = 1; id < 200; ++id)
    if (c->contains(id)) left.push_back(id);
  for (const seq_id id : left) REQUIRE(c->free_sequence(id).ok());
  CHECK(c->stats().n_sequences == seqs0);
  CHECK(c->storage().free_chunks() == free0);
}

TEST_CASE("branches: prefixes that share groups are both found") {
  auto c = make_cache();
  auto p = make_prefix(*c, 16);
  std::vector<int32_t> t1 = token_ids(3 * kGroup, 30), t2 = t1;
  for (uint32_t i = kGroup; i < 3 * kGroup; ++i) t2[i] = t1[i] + 1;  // same first group
  const seq_id s1 = filled(*c, 3 * kGroup, 31);
  const seq_id s2 = c->fork_sequence_at(s1, kGroup).value();
  std::vector<float> rows(size_t{2} * kGroup * kDim, -0.2f);
  for (uint32_t l = 0; l < kLayers; ++l)
    REQUIRE(c->append(s2, l, 2 * kGroup, rows.data(), rows.data(), dtype::kF32).ok());
  REQUIRE(p->insert(s1, t1).ok());
  REQUIRE(p->insert(s2, t2).ok());
  CHECK(p->stats().groups == 5);  // the shared first group once
  auto m1 = p->lookup(t1).value();
  auto m2 = p->lookup(t2).value();
  CHECK(m1.n_tokens == 3 * kGroup);
  CHECK(m2.n_tokens == 3 * kGroup);
  CHECK(stored(*c, m1.seq, 3 * kGroup) == stored(*c, s1, 3 * kGroup));
  CHECK(stored(*c, m2.seq, 3 * kGroup) == stored(*c, s2, 3 * kGroup));
  p->clear();
  CHECK(p->stats().groups == 0);
  CHECK(p->stats().held_sequences == 0);
  CHECK(p->lookup(t1).value().n_tokens == 0);
}
