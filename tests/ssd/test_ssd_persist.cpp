// The persistent ssd: store (ssd:PATH?persist=1, docs/persistence.md): named sequences come back
// after the cache is closed and reopened (forks, truncations, appends after reopen), exactly and
// with no space leaked; bit flips and truncations of the store's files give kCorruptData for
// the damaged sequences only; a second opener in another process is kBusy; files are 0600.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include "instinfer/backend/registry.hpp"
#include "instinfer/core/crc32c.hpp"
#include "instinfer/kv/prefix_cache.hpp"
#include "persist_test_util.hpp"
#include "ssd_test_util.hpp"
#include "support/forwarding_backend.hpp"

using namespace instinfer;
using namespace persist_test;

namespace {

std::unique_ptr<kv_cache> open_cache(const std::string& path) {
  auto c = kv_cache::create(options(persist_uri(path)));
  REQUIRE_MESSAGE(c.ok(), c.error().to_string());
  return std::move(c.value());
}

void remove_store(const std::string& path) {
  for (const std::string& p : {path, path + ".meta", path + ".meta.new"}) ::unlink(p.c_str());
}

std::vector<char> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

void write_all(const std::string& path, const std::vector<char>& bytes, size_t n) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(::write(fd, bytes.data(), n) == static_cast<ssize_t>(n));
  ::close(fd);
}

// A model of what the cache holds: per named sequence, per layer, the token uids.
struct model {
  std::map<uint64_t, token_list> seqs;
  uint32_t next_uid = 1;

  std::vector<uint32_t> fresh(uint32_t n) {
    std::vector<uint32_t> u(n);
    for (auto& x : u) x = next_uid++;
    return u;
  }
};

// Attend every layer of these sequences with fixed queries: the outputs, to compare after reopen.
std::vector<float> attend_all(kv_cache& cache, const std::vector<seq_id>& seqs) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<float> q(seqs.size() * kQHeads * kDim), out(q.size()), all;
  for (uint32_t l = 0; l < kLayers; ++l) {
    for (auto& x : q) x = u(rng);
    const status s = cache.attend(l, seqs, q.data(), out.data(), nullptr);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    all.insert(all.end(), out.begin(), out.end());
  }
  return all;
}

std::vector<seq_id> ids_of(kv_cache& cache, const model& m) {
  std::vector<seq_id> ids;
  for (const auto& [name, tokens] : m.seqs) {
    auto id = cache.find_sequence(name);
    REQUIRE_MESSAGE(id.ok(), id.error().to_string());
    ids.push_back(id.value());
  }
  return ids;
}

void check_all(kv_cache& cache, const model& m) {
  const auto named = cache.named_sequences();
  REQUIRE(named.size() == m.seqs.size());
  for (const auto& [name, tokens] : m.seqs) {
    auto id = cache.find_sequence(name);
    REQUIRE_MESSAGE(id.ok(), id.error().to_string());
    const status s = check_tokens(cache, id.value(), tokens);
    CHECK_MESSAGE(s.ok(), "name ", name, ": ", s.to_string());
  }
  // Exactly the chunks the recovered tables need are allocated: nothing leaked.
  CHECK(cache.stats().backend.used_chunks == referenced_chunks(cache, ids_of(cache, m)));
}

}  // namespace

TEST_CASE("crc32c: the standard check value") {
  CHECK(crc32c("123456789", 9) == 0xE3069283u);
  // Split anywhere, the same value (the 8-byte steps and the byte tail agree).
  const char text[] = "persistent kv store checksums are sliced by eight";
  const uint32_t whole = crc32c(text, sizeof text);
  for (size_t cut = 0; cut <= sizeof text; ++cut)
    CHECK(crc32c(text + cut, sizeof text - cut, crc32c(text, cut)) == whole);
  // The hardware path (where the CPU has one) and the portable one agree on every length and alignment.
  std::mt19937 rng(3);
  std::vector<unsigned char> bytes(4096 + 64);
  for (auto& b : bytes) b = static_cast<unsigned char>(rng());
  for (int i = 0; i < 500; ++i) {
    const size_t at = rng() % 64, n = rng() % 4096;
    const uint32_t seed = static_cast<uint32_t>(rng());
    CHECK(crc32c(bytes.data() + at, n, seed) == crc32c_portable(bytes.data() + at, n, seed));
  }
}

TEST_CASE("reopen: named sequences come back exactly, forks and truncations included") {
  const std::string path = ssd_test::scratch_file("reopen.kv");
  remove_store(path);
  model m;
  std::mt19937 rng(11);
  std::vector<float> before;
  {
    auto cache = open_cache(path);
    CHECK(cache->persistent());
    // Five named sequences of uneven lengths (layers differ too), partial tails included.
    std::map<uint64_t, seq_id> id;
    for (uint64_t name : {101, 102, 103}) {
      auto s = cache->create_sequence();
      REQUIRE(s.ok());
      REQUIRE(cache->set_sequence_name(s.value(), name).ok());
      id[name] = s.value();
      m.seqs[name].resize(kLayers);
      for (uint32_t l = 0; l < kLayers; ++l) {
        const uint32_t n = 1 + rng() % 90;
        auto uids = m.fresh(n);
        REQUIRE(append_uids(*cache, s.value(), l, uids).ok());
        m.seqs[name][l] = uids;
      }
    }
    // A fork shares full chunks; a fork at a position; both grow on their own.
    auto f = cache->fork_sequence(id[101]);
    REQUIRE(f.ok());
    REQUIRE(cache->set_sequence_name(f.value(), 201).ok());
    m.seqs[201] = m.seqs[101];
    auto fa = cache->fork_sequence_at(id[102], 1);
    REQUIRE(fa.ok());
    REQUIRE(cache->set_sequence_name(fa.value(), 202).ok());
    m.seqs[202] = {{m.seqs[102][0][0]}, {m.seqs[102][1][0]}};
    for (uint64_t name : {201, 202})
      for (uint32_t l = 0; l < kLayers; ++l) {
        auto uids = m.fresh(5 + rng() % 40);
        REQUIRE(append_uids(*cache, cache->find_sequence(name).value(), l, uids).ok());
        m.seqs[name][l].insert(m.seqs[name][l].end(), uids.begin(), uids.end());
      }
    // A truncation inside a chunk and an interior remove_range.
    REQUIRE(cache->remove_range(id[103], 3, UINT64_MAX).ok());
    for (auto& l : m.seqs[103]) l.resize(std::min<size_t>(l.size(), 3));
    REQUIRE(cache->remove_range(id[101], 10, 40).ok());
    for (auto& l : m.seqs[101])
      if (l.size() > 10) l.erase(l.begin() + 10, l.begin() + std::min<size_t>(l.size(), 40));
    // An unnamed sequence is not kept.
    auto scratch = cache->create_sequence();
    REQUIRE(scratch.ok());
    REQUIRE(append_uids(*cache, scratch.value(), 0, m.fresh(50)).ok());
    REQUIRE(cache->flush().ok());
    before = attend_all(*cache, ids_of(*cache, m));
    // Not flushed: gone after reopen (the store keeps the last commit).
    REQUIRE(append_uids(*cache, id[102], 0, m.fresh(7)).ok());
    REQUIRE(cache->free_sequence(id[103]).ok());
  }
  {
    auto cache = open_cache(path);
    check_all(*cache, m);
    CHECK(cache->stats().n_sequences == m.seqs.size());
    const auto after = attend_all(*cache, ids_of(*cache, m));
    REQUIRE(after.size() == before.size());
    CHECK(std::memcmp(after.data(), before.data(), after.size() * sizeof(float)) == 0);
    // Appends after reopen copy the stored partial tails; a new fork; a name dropped; commit again.
    for (auto& [name, tokens] : m.seqs)
      for (uint32_t l = 0; l < kLayers; ++l) {
        auto uids = m.fresh(1 + rng() % 40);
        REQUIRE(append_uids(*cache, cache->find_sequence(name).value(), l, uids).ok());
        tokens[l].insert(tokens[l].end(), uids.begin(), uids.end());
      }
    auto f = cache->fork_sequence(cache->find_sequence(202).value());
    REQUIRE(f.ok());
    REQUIRE(cache->set_sequence_name(f.value(), 302).ok());
    m.seqs[302] = m.seqs[202];
    const seq_id dropped = cache->find_sequence(103).value();
    REQUIRE(cache->set_sequence_name(dropped, 0).ok());
    CHECK(cache->find_sequence(103).error().code() == errc::kUnknownSequence);
    REQUIRE(cache->free_sequence(dropped).ok());  // (an unnamed one would still hold its chunks here)
    m.seqs.erase(103);
    REQUIRE(cache->flush().ok());
    check_all(*cache, m);
  }
  {
    auto cache = open_cache(path);
    check_all(*cache, m);
    CHECK(cache->find_sequence(103).error().code() == errc::kUnknownSequence);
  }
  remove_store(path);
}

TEST_CASE("reopen: names are checked; a different shape is refused; sparse policies are unsupported") {
  const std::string path = ssd_test::scratch_file("names.kv");
  remove_store(path);
  {
    auto cache = open_cache(path);
    auto a = cache->create_sequence(), b = cache->create_sequence();
    REQUIRE((a.ok() && b.ok()));
    CHECK(cache->set_sequence_name(a.value(), 7).ok());
    CHECK(cache->set_sequence_name(b.value(), 7).code() == errc::kInvalidArgument);
    CHECK(cache->set_sequence_name(99, 8).code() == errc::kUnknownSequence);
    CHECK(cache->find_sequence(0).error().code() == errc::kInvalidArgument);
    CHECK(cache->sequence_name(a.value()).value() == 7);
    REQUIRE(cache->flush().ok());
  }
  auto other = options(persist_uri(path));
  other.shape.n_layers = 3;
  auto c = kv_cache::create(other);
  REQUIRE_FALSE(c.ok());
  CHECK(c.error().code() == errc::kInvalidArgument);
  auto sparse = options(persist_uri(path));
  sparse.sparf = true;
  auto s = kv_cache::create(sparse);
  REQUIRE_FALSE(s.ok());
  CHECK(s.error().code() == errc::kUnsupported);
  auto summaries = options(persist_uri(path));
  summaries.page_summaries = true;
  auto ps = kv_cache::create(summaries);
  REQUIRE_FALSE(ps.ok());
  CHECK(ps.error().code() == errc::kUnsupported);
  // Without persist=1 the store's slots would all count as free: refused.
  auto plain = kv_cache::create(options("ssd:" + path));
  REQUIRE_FALSE(plain.ok());
  CHECK(plain.error().code() == errc::kInvalidArgument);
  CHECK(plain.error().message().find("persist=1") != std::string::npos);
  // A csd: store persists on one drive only: a clear kUnsupported, before any drive is started
  // (tests/csd/test_csd_persist.cpp has the rest).
  auto drive = make_backend("csd:" + path + ".flash?persist=1&drives=2");
  REQUIRE_FALSE(drive.ok());
  CHECK(drive.error().code() == errc::kUnsupported);
  // After all that the store is intact.
  auto again = open_cache(path);
  CHECK(again->find_sequence(7).ok());
  again.reset();
  remove_store(path);
}

TEST_CASE("the prefix cache's index survives a restart; its cap holds; a damaged index is refused") {
  const std::string path = ssd_test::scratch_file("prefix.kv"), index = path + ".prefix";
  remove_store(path);
  ::unlink(index.c_str());
  // Token ids are the uids whose K/V persist_test writes, so a restored prefix can be checked.
  std::vector<int32_t> a_ids(100), b_ids(128);
  for (uint32_t i = 0; i < a_ids.size(); ++i) a_ids[i] = static_cast<int32_t>(1000 + i);
  for (uint32_t i = 0; i < b_ids.size(); ++i) b_ids[i] = i < 64 ? a_ids[i] : static_cast<int32_t>(5000 + i);
  const auto fill = [](kv_cache& c, const std::vector<int32_t>& ids) {
    auto s = c.create_sequence();
    REQUIRE(s.ok());
    const std::vector<uint32_t> uids(ids.begin(), ids.end());
    for (uint32_t l = 0; l < kLayers; ++l) REQUIRE(append_uids(c, s.value(), l, uids).ok());
    return s.value();
  };
  const auto want = [](const std::vector<int32_t>& ids, uint64_t n) {
    return token_list(kLayers, std::vector<uint32_t>(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(n)));
  };
  const auto open_prefix = [&](kv_cache& c, uint64_t cap, const std::string& model = "m") {
    return prefix_cache::create(c, prefix_cache_options{model, cap, index});
  };
  {
    auto cache = open_cache(path);
    auto prefix = open_prefix(*cache, 8);
    REQUIRE(prefix.ok());
    const seq_id a = fill(*cache, a_ids), b = fill(*cache, b_ids);
    REQUIRE(prefix.value()->insert(a, a_ids).ok());  // groups 0-2
    REQUIRE(prefix.value()->insert(b, b_ids).ok());  // shares 0-1, adds 2
    CHECK(prefix.value()->stats().groups == 5);
    REQUIRE(cache->free_sequence(a).ok());
    REQUIRE(cache->free_sequence(b).ok());
    const status saved = prefix.value()->save();
    REQUIRE_MESSAGE(saved.ok(), saved.to_string());
    struct stat st {};
    REQUIRE(::stat(index.c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
  }
  {  // after a restart: every group back, lookups serve exactly the stored tokens
    auto cache = open_cache(path);
    auto prefix = open_prefix(*cache, 8);
    REQUIRE_MESSAGE(prefix.ok(), prefix.error().to_string());
    CHECK(prefix.value()->stats().groups == 5);
    auto hit = prefix.value()->lookup(a_ids);
    REQUIRE(hit.ok());
    CHECK(hit.value().n_tokens == 96);
    CHECK(check_tokens(*cache, hit.value().seq, want(a_ids, 96)).ok());
    auto hit_b = prefix.value()->lookup(b_ids);
    REQUIRE(hit_b.ok());
    CHECK(hit_b.value().n_tokens == 128);
    CHECK(check_tokens(*cache, hit_b.value().seq, want(b_ids, 128)).ok());
    REQUIRE(cache->free_sequence(hit.value().seq).ok());
    REQUIRE(cache->free_sequence(hit_b.value().seq).ok());
    CHECK(prefix.value()->save().ok());  // b's path is now the most recent
  }
  {  // a smaller cap on the next start: the least recently used leaves go
    auto cache = open_cache(path);
    auto prefix = open_prefix(*cache, 4);
    REQUIRE(prefix.ok());
    CHECK(prefix.value()->stats().groups == 4);
    auto hit_b = prefix.value()->lookup(b_ids);
    REQUIRE(hit_b.ok());
    CHECK(hit_b.value().n_tokens == 128);
    CHECK(check_tokens(*cache, hit_b.value().seq, want(b_ids, 128)).ok());
    REQUIRE(cache->free_sequence(hit_b.value().seq).ok());
    CHECK(prefix.value()->save().ok());
  }
  {  // the evicted group's chunks are free: a's hidden sequence keeps groups 0-1, b's its own
    // copies of 0-1 (b was appended, not forked from a) and 2-3; nothing else is allocated
    auto cache = open_cache(path);
    std::vector<seq_id> all;
    for (const auto& [name, seq] : cache->named_sequences()) all.push_back(seq);
    CHECK(all.size() == 2);
    CHECK(referenced_chunks(*cache, all) == 6 * kLayers);
    CHECK(cache->stats().backend.used_chunks == 6 * kLayers);
    // Another model's index: refused; a damaged one: kCorruptData; the cache is unchanged.
    CHECK(open_prefix(*cache, 8, "other").error().code() == errc::kInvalidArgument);
    std::vector<char> bytes = read_all(index);
    REQUIRE(bytes.size() > 100);
    bytes[bytes.size() - 5] ^= 0x10;
    write_all(index, bytes, bytes.size());
    CHECK(open_prefix(*cache, 8).error().code() == errc::kCorruptData);
    write_all(index, bytes, 40);
    CHECK(open_prefix(*cache, 8).error().code() == errc::kCorruptData);
    CHECK(cache->named_sequences().size() == all.size());
  }
  remove_store(path);
  ::unlink(index.c_str());
}

TEST_CASE("a persistent store behind the forwarding test backend still commits and recovers") {
  const std::string path = ssd_test::scratch_file("forwarded.kv");
  remove_store(path);
  const auto open_wrapped = [&] {
    auto b = make_backend(persist_uri(path));
    REQUIRE_MESSAGE(b.ok(), b.error().to_string());
    auto c = kv_cache::create(options(persist_uri(path)),
                              std::make_unique<test_support::forwarding_backend>(std::move(b.value())));
    REQUIRE_MESSAGE(c.ok(), c.error().to_string());
    return std::move(c.value());
  };
  {
    auto cache = open_wrapped();
    CHECK(cache->persistent());
    auto s = cache->create_sequence();
    REQUIRE(s.ok());
    REQUIRE(cache->set_sequence_name(s.value(), 5).ok());
    REQUIRE(append_uids(*cache, s.value(), 1, {4, 5, 6}).ok());
    REQUIRE(cache->flush().ok());
  }
  auto cache = open_wrapped();
  auto id = cache->find_sequence(5);
  REQUIRE_MESSAGE(id.ok(), id.error().to_string());
  CHECK(check_tokens(*cache, id.value(), {{}, {4, 5, 6}}).ok());
  cache.reset();
  remove_store(path);
}

TEST_CASE("a second opener in another process is BUSY; the store's files are 0600") {
  const std::string path = ssd_test::scratch_file("busy.kv");
  remove_store(path);
  auto cache = open_cache(path);
  auto s = cache->create_sequence();
  REQUIRE(s.ok());
  REQUIRE(cache->set_sequence_name(s.value(), 1).ok());
  REQUIRE(append_uids(*cache, s.value(), 0, {1, 2, 3}).ok());
  REQUIRE(cache->flush().ok());
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // The child only opens: exec a fresh image so no state of this process's threads matters.
    ::execl("/proc/self/exe", "test_ssd_persist", "--open-store", path.c_str(), static_cast<char*>(nullptr));
    ::_exit(3);
  }
  int wst = 0;
  REQUIRE(::waitpid(child, &wst, 0) == child);
  CHECK(WIFEXITED(wst));
  CHECK(WEXITSTATUS(wst) == static_cast<int>(-static_cast<int>(errc::kBusy)));
  for (const std::string& p : {path, path + ".meta"}) {
    struct stat st {};
    REQUIRE(::lstat(p.c_str(), &st) == 0);
    CHECK(S_ISREG(st.st_mode));
    CHECK((st.st_mode & 0777) == 0600);
  }
  cache.reset();
  remove_store(path);
}

TEST_CASE("every read path checks the chunk checksums: read_chunk, read_pages, attend, copy") {
  const std::string path = ssd_test::scratch_file("paths.kv");
  remove_store(path);
  backend_config cfg;
  cfg.shape = kv_shape{kLayers, kQHeads, kKvHeads, kDim, dtype::kF16};
  cfg.page = page_geometry::make(kPageBytes, kDim, dtype::kF16).value();
  cfg.capacity_bytes = 1ull << 20;
  auto b = ssd_test::open_backend(persist_uri(path), cfg);
  REQUIRE(b->persistence() != nullptr);
  const chunk_layout lay = cfg.layout();
  // Two sealed chunks and one partial one, written to the file by flush.
  std::vector<chunk_id> ids;
  std::vector<std::vector<std::byte>> images;
  std::mt19937 rng(9);
  for (uint32_t c = 0; c < 3; ++c) {
    auto id = b->allocate_chunk({1, 0, c});
    REQUIRE(id.ok());
    const uint32_t n = c < 2 ? kTokensPerChunk : 5;
    std::vector<std::byte> k(size_t{n} * kKvHeads * kDim * 2), v(k.size());
    for (auto& x : k) x = static_cast<std::byte>(rng() & 0x3f);
    for (auto& x : v) x = static_cast<std::byte>(rng() & 0x3f);
    REQUIRE(b->write_tokens(id.value(), {1, 0, c}, 0, n, k.data(), v.data()).ok());
    ids.push_back(id.value());
  }
  REQUIRE(b->flush().ok());
  REQUIRE(b->buffered_chunks() == 1);  // the partial tail stays buffered (served from memory)
  for (chunk_id id : ids) {
    images.emplace_back(lay.chunk_bytes());
    REQUIRE(b->read_chunk(id, id == ids[2] ? 5 : kTokensPerChunk, images.back().data()).ok());
  }
  // Flip one bit of the first chunk's V page of head 1, row 3, behind the backend's back.
  const uint32_t bad_page = lay.page_index(kv_kind::kValue, 1);
  const uint64_t off = b->chunk_offset(ids[0]) + uint64_t{bad_page} * kPageBytes + 3 * kDim * 2 + 17;
  {
    const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    REQUIRE(fd >= 0);
    char byte = 0;
    REQUIRE(::pread(fd, &byte, 1, static_cast<off_t>(off)) == 1);
    byte = static_cast<char>(byte ^ 0x10);
    REQUIRE(::pwrite(fd, &byte, 1, static_cast<off_t>(off)) == 1);
    ::close(fd);
  }
  std::vector<std::byte> chunk(lay.chunk_bytes()), page(kPageBytes);
  CHECK(b->read_chunk(ids[0], kTokensPerChunk, chunk.data()).code() == errc::kCorruptData);
  REQUIRE(b->read_chunk(ids[1], kTokensPerChunk, chunk.data()).ok());
  CHECK(chunk == images[1]);
  // read_pages: the damaged page is refused, another page of the same chunk is served.
  page_read bad{ids[0], kTokensPerChunk, bad_page, page.data()};
  CHECK(b->read_pages(std::span<const page_read>(&bad, 1)).code() == errc::kCorruptData);
  page_read good{ids[0], kTokensPerChunk, 0, page.data()};
  REQUIRE(b->read_pages(std::span<const page_read>(&good, 1)).ok());
  CHECK(std::memcmp(page.data(), images[0].data(), kPageBytes) == 0);
  // attend over the damaged chunk: refused; over the intact one: served.
  std::vector<float> q(kQHeads * kDim, 0.25f), out(q.size());
  attend_batch_builder builder;
  const auto attend_over = [&](chunk_id id) {
    builder.clear(kTokensPerChunk);
    const chunk_id table[1] = {id};
    builder.add(1, std::span<const chunk_id>(table, 1), kTokensPerChunk);
    return b->attend(0, builder.view(q.data(), out.data(), nullptr, kQHeads, kDim));
  };
  CHECK(attend_over(ids[0]).code() == errc::kCorruptData);
  CHECK(attend_over(ids[1]).ok());
  // A copy-on-write read of the damaged chunk: refused, the destination released untouched.
  auto fresh = b->allocate_chunk({2, 0, 0});
  REQUIRE(fresh.ok());
  CHECK(b->copy_tokens(fresh.value(), {2, 0, 0}, ids[0], 10).code() == errc::kCorruptData);
  CHECK(b->copy_tokens(fresh.value(), {2, 0, 0}, ids[1], 10).ok());
  b.reset();
  remove_store(path);
}

namespace {

// The store the damage sweep starts from, and what each name holds and references.
struct damage_fixture {
  std::string path;
  model m;
  std::map<uint64_t, std::set<chunk_id>> slots;  // per name
  std::map<chunk_id, uint32_t> tokens_used;      // per slot: most tokens any table uses
  std::vector<char> data, meta;

  damage_fixture() : path(ssd_test::scratch_file("damage.kv")) {
    remove_store(path);
    std::mt19937 rng(23);
    auto cache = open_cache(path);
    for (uint64_t name = 1; name <= 6; ++name) {
      seq_id s;
      if (name == 4 || name == 6) {  // forks: full chunks shared with 1 and 2
        auto f = cache->fork_sequence(cache->find_sequence(name == 4 ? 1 : 2).value());
        REQUIRE(f.ok());
        s = f.value();
        m.seqs[name] = m.seqs[name == 4 ? 1 : 2];
      } else {
        auto c = cache->create_sequence();
        REQUIRE(c.ok());
        s = c.value();
        m.seqs[name].resize(kLayers);
      }
      REQUIRE(cache->set_sequence_name(s, name).ok());
      for (uint32_t l = 0; l < kLayers; ++l) {
        auto uids = m.fresh(20 + rng() % 70);
        REQUIRE(append_uids(*cache, s, l, uids).ok());
        m.seqs[name][l].insert(m.seqs[name][l].end(), uids.begin(), uids.end());
      }
    }
    REQUIRE(cache->flush().ok());
    csr_page_table t;
    for (const auto& [name, tokens] : m.seqs)
      for (uint32_t l = 0; l < kLayers; ++l) {
        const seq_id id = cache->find_sequence(name).value();
        REQUIRE(cache->page_table(l, std::vector<seq_id>{id}, t).ok());
        for (size_t c = 0; c < t.indices.size(); ++c) {
          slots[name].insert(t.indices[c]);
          const uint32_t used = c + 1 < t.indices.size() ? kTokensPerChunk : t.last_page_len[0];
          tokens_used[t.indices[c]] = std::max(tokens_used[t.indices[c]], used);
        }
      }
    cache.reset();
    data = read_all(path);
    meta = read_all(path + ".meta");
    REQUIRE(!data.empty());
    REQUIRE(!meta.empty());
  }
  ~damage_fixture() { remove_store(path); }

  void restore() {
    write_all(path, data, data.size());
    write_all(path + ".meta", meta, meta.size());
  }

  // Reads every name: `damaged(name)` says whether it must be kCorruptData, `may_fail(name)`
  // whether it may be (else it must be intact). Every sequence read is exact or refused.
  template <class Must, class May>
  void check(Must damaged, May may_fail, const char* what) {
    auto c = kv_cache::create(options(persist_uri(path)));
    REQUIRE_MESSAGE(c.ok(), what, ": ", c.error().to_string());
    kv_cache& cache = *c.value();
    for (const auto& [name, tokens] : m.seqs) {
      auto id = cache.find_sequence(name);
      status s = id.ok() ? check_tokens(cache, id.value(), tokens) : id.error();
      if (s.ok() && id.ok()) {  // attend must agree with read_tokens
        std::vector<float> q(kQHeads * kDim, 0.5f), out(q.size());
        s = cache.attend(0, std::vector<seq_id>{id.value()}, q.data(), out.data(), nullptr);
      }
      CHECK_MESSAGE(s.code() != errc::kInternal, what, " name ", name, ": ", s.to_string());  // never wrong data
      if (damaged(name))
        CHECK_MESSAGE(s.code() == errc::kCorruptData, what, " name ", name, ": ", s.to_string());
      else if (!may_fail(name))
        CHECK_MESSAGE(s.ok(), what, " name ", name, ": ", s.to_string());
    }
  }
};

uint32_t get32(const std::vector<char>& b, size_t at) {
  uint32_t v;
  std::memcpy(&v, b.data() + at, 4);
  return v;
}
uint64_t get64(const std::vector<char>& b, size_t at) {
  uint64_t v;
  std::memcpy(&v, b.data() + at, 8);
  return v;
}

}  // namespace

TEST_CASE("bit flips and truncations: kCorruptData for the damaged sequences, the rest intact") {
  damage_fixture f;
  std::mt19937_64 rng(31);
  const auto none = [](uint64_t) { return false; };

  SUBCASE("data file: a flipped bit in a stored row") {
    std::vector<chunk_id> used;
    for (const auto& [slot, n] : f.tokens_used) used.push_back(slot);
    for (int round = 0; round < 40; ++round) {
      const chunk_id slot = used[rng() % used.size()];
      const uint32_t page = rng() % (2 * kKvHeads);
      const uint32_t row = rng() % f.tokens_used[slot];  // a row some table uses: always checked
      const size_t off = slot * kChunkBytes + size_t{page} * kPageBytes + size_t{row} * kDim * 2 + rng() % (kDim * 2);
      f.restore();
      std::vector<char> bad = f.data;
      bad[off] = static_cast<char>(bad[off] ^ (1 << (rng() % 8)));
      write_all(f.path, bad, bad.size());
      const auto hit = [&](uint64_t name) { return f.slots[name].count(slot) != 0; };
      f.check(hit, none, "data bit flip");
    }
  }
  SUBCASE("metadata: a flipped bit in the header, table or a record") {
    const uint32_t n_records = get32(f.meta, 64);
    const size_t table_end = 72 + size_t{n_records} * 24 + 4;
    for (int round = 0; round < 60; ++round) {
      const size_t off = round < 10 ? rng() % table_end : rng() % f.meta.size();
      f.restore();
      std::vector<char> bad = f.meta;
      bad[off] = static_cast<char>(bad[off] ^ (1 << (rng() % 8)));
      write_all(f.path + ".meta", bad, bad.size());
      if (off < table_end) {  // the header and table carry every record: the open refuses the store
        auto c = kv_cache::create(options(persist_uri(f.path)));
        REQUIRE_FALSE(c.ok());
        CHECK(c.error().code() == errc::kCorruptData);
        continue;
      }
      uint64_t victim = 0;
      for (uint32_t r = 0; r < n_records; ++r) {
        const size_t e = 72 + size_t{r} * 24;
        const uint64_t at = get64(f.meta, e + 8), bytes = get32(f.meta, e + 16);
        if (off >= at && off < at + bytes) victim = get64(f.meta, e);
      }
      REQUIRE(victim != 0);
      f.check([&](uint64_t name) { return name == victim; }, none, "metadata bit flip");
    }
  }
  SUBCASE("truncated data file") {
    for (int round = 0; round < 12; ++round) {
      const size_t keep = rng() % (f.data.size() / 4096) * 4096;
      f.restore();
      write_all(f.path, f.data, keep);
      // A chunk wholly past the cut reads back as zeros: refused. One cut inside may be too.
      const auto gone = [&](uint64_t name) {
        for (chunk_id s : f.slots[name])
          if (s * kChunkBytes >= keep) return true;
        return false;
      };
      const auto cut = [&](uint64_t name) {
        for (chunk_id s : f.slots[name])
          if ((s + 1) * kChunkBytes > keep) return true;
        return false;
      };
      f.check(gone, cut, "truncated data");
    }
  }
  SUBCASE("truncated metadata") {
    const uint32_t n_records = get32(f.meta, 64);
    const size_t table_end = 72 + size_t{n_records} * 24 + 4;
    for (int round = 0; round < 12; ++round) {
      const size_t keep = rng() % f.meta.size();
      f.restore();
      write_all(f.path + ".meta", f.meta, keep);
      if (keep < table_end) {
        auto c = kv_cache::create(options(persist_uri(f.path)));
        REQUIRE_FALSE(c.ok());
        CHECK(c.error().code() == errc::kCorruptData);
        continue;
      }
      const auto lost = [&](uint64_t name) {
        for (uint32_t r = 0; r < n_records; ++r) {
          const size_t e = 72 + size_t{r} * 24;
          if (get64(f.meta, e) == name) return get64(f.meta, e + 8) + get32(f.meta, e + 16) > keep;
        }
        return false;
      };
      f.check(lost, none, "truncated metadata");
    }
  }
}

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--open-store") == 0) {
    // The second opener of the BUSY case: exit with the open's error code, negated.
    auto c = kv_cache::create(options(persist_uri(argv[2])));
    return c.ok() ? 0 : -static_cast<int>(c.error().code());
  }
  return ssd_test::run_tests(argc, argv);
}
