// The persistent csd: store (csd:PATH?persist=1, docs/persistence.md): named sequences come back
// after the cache and its drive process are gone (forks, truncations, appends after reopen),
// exactly and with no space leaked; bit flips in committed flash pages give kCorruptData for the
// sequences holding them only; bit flips and truncations of PATH.meta refuse the store; a second
// opener in another process is kBusy; files are 0600; what cannot persist is refused up front.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include "instinfer/backend/csd_backend.hpp"
#include "instinfer/backend/registry.hpp"
#include "persist_test_util.hpp"
#include "ssd_test_util.hpp"

using namespace instinfer;
using namespace persist_test;

namespace {

// 2 x 2 lanes x 16 blocks x 64 pages of 4 KiB: 16 MiB of (sparse) flash, one drive core.
std::string store_uri(const std::string& path, const std::string& extra = "") {
  return "csd:" + path + "?persist=1&cores=1&channels=2&dies=2&blocks_per_die=16&pages_per_block=64&buffer_mb=1" +
         "&data_mb=1" + extra;
}

std::unique_ptr<kv_cache> open_cache(const std::string& path, const std::string& extra = "") {
  auto c = kv_cache::create(options(store_uri(path, extra)));
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

void write_file(const std::string& path, const std::vector<char>& bytes, size_t n) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(::write(fd, bytes.data(), n) == static_cast<ssize_t>(n));
  ::close(fd);
}

uint32_t get32(const std::vector<char>& b, size_t off) {
  uint32_t v;
  std::memcpy(&v, b.data() + off, 4);
  return v;
}

struct model {
  std::map<uint64_t, token_list> seqs;
  uint32_t next_uid = 1;
  std::vector<uint32_t> fresh(uint32_t n) {
    std::vector<uint32_t> u(n);
    for (auto& x : u) x = next_uid++;
    return u;
  }
};

std::vector<seq_id> ids_of(kv_cache& cache, const model& m) {
  std::vector<seq_id> ids;
  for (const auto& [name, tokens] : m.seqs) {
    auto id = cache.find_sequence(name);
    REQUIRE_MESSAGE(id.ok(), id.error().to_string());
    ids.push_back(id.value());
  }
  return ids;
}

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

void check_all(kv_cache& cache, const model& m) {
  REQUIRE(cache.named_sequences().size() == m.seqs.size());
  for (const auto& [name, tokens] : m.seqs) {
    auto id = cache.find_sequence(name);
    REQUIRE_MESSAGE(id.ok(), id.error().to_string());
    const status s = check_tokens(cache, id.value(), tokens);
    CHECK_MESSAGE(s.ok(), "name ", name, ": ", s.to_string());
  }
  CHECK(cache.stats().backend.used_chunks == referenced_chunks(cache, ids_of(cache, m)));
}

// Named sequences of uneven lengths, a whole fork and a fork at a position, grown on their own.
void build(kv_cache& cache, model& m, std::mt19937& rng) {
  for (uint64_t name : {101, 102, 103}) {
    auto s = cache.create_sequence();
    REQUIRE(s.ok());
    REQUIRE(cache.set_sequence_name(s.value(), name).ok());
    m.seqs[name].resize(kLayers);
    for (uint32_t l = 0; l < kLayers; ++l) {
      auto uids = m.fresh(1 + rng() % 90);
      REQUIRE(append_uids(cache, s.value(), l, uids).ok());
      m.seqs[name][l] = uids;
    }
  }
  auto f = cache.fork_sequence(cache.find_sequence(101).value());
  REQUIRE(f.ok());
  REQUIRE(cache.set_sequence_name(f.value(), 201).ok());
  m.seqs[201] = m.seqs[101];
  auto fa = cache.fork_sequence_at(cache.find_sequence(102).value(), 1);
  REQUIRE(fa.ok());
  REQUIRE(cache.set_sequence_name(fa.value(), 202).ok());
  m.seqs[202] = {{m.seqs[102][0][0]}, {m.seqs[102][1][0]}};
  for (uint64_t name : {201, 202})
    for (uint32_t l = 0; l < kLayers; ++l) {
      auto uids = m.fresh(5 + rng() % 40);
      REQUIRE(append_uids(cache, cache.find_sequence(name).value(), l, uids).ok());
      m.seqs[name][l].insert(m.seqs[name][l].end(), uids.begin(), uids.end());
    }
}

}  // namespace

TEST_CASE("reopen: named sequences come back exactly after the drive is gone") {
  const std::string path = ssd_test::scratch_file("reopen.flash");
  remove_store(path);
  model m;
  std::mt19937 rng(11);
  std::vector<float> before;
  {
    auto cache = open_cache(path);
    CHECK(cache->persistent());
    build(*cache, m, rng);
    // A truncation inside a chunk and an interior remove_range.
    REQUIRE(cache->remove_range(cache->find_sequence(103).value(), 3, UINT64_MAX).ok());
    for (auto& l : m.seqs[103]) l.resize(std::min<size_t>(l.size(), 3));
    REQUIRE(cache->remove_range(cache->find_sequence(101).value(), 10, 40).ok());
    for (auto& l : m.seqs[101])
      if (l.size() > 10) l.erase(l.begin() + 10, l.begin() + std::min<size_t>(l.size(), 40));
    auto scratch = cache->create_sequence();  // unnamed: not kept
    REQUIRE(scratch.ok());
    REQUIRE(append_uids(*cache, scratch.value(), 0, m.fresh(50)).ok());
    REQUIRE(cache->flush().ok());
    before = attend_all(*cache, ids_of(*cache, m));
    // Not flushed: gone after reopen.
    REQUIRE(append_uids(*cache, cache->find_sequence(102).value(), 0, m.fresh(7)).ok());
    REQUIRE(cache->free_sequence(cache->find_sequence(103).value()).ok());
  }
  {
    auto cache = open_cache(path);
    check_all(*cache, m);
    CHECK(cache->stats().n_sequences == m.seqs.size());
    const auto after = attend_all(*cache, ids_of(*cache, m));
    REQUIRE(after.size() == before.size());
    CHECK(std::memcmp(after.data(), before.data(), after.size() * sizeof(float)) == 0);
    // Appends after reopen copy the stored tails; a fork; a name dropped and freed; commit again,
    // twice (the second commit frees the pages only the first referenced).
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
    REQUIRE(cache->free_sequence(cache->find_sequence(103).value()).ok());
    m.seqs.erase(103);
    REQUIRE(cache->flush().ok());
    REQUIRE(append_uids(*cache, cache->find_sequence(302).value(), 1, m.fresh(3)).ok());
    REQUIRE(cache->remove_range(cache->find_sequence(302).value(), 0, UINT64_MAX).ok());
    for (auto& l : m.seqs[302]) l.clear();
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

TEST_CASE("flash pages of the last commit are not erased or reused before the next commit") {
  const std::string path = ssd_test::scratch_file("reuse.flash");
  remove_store(path);
  // 2 x 2 lanes x 24 blocks x 16 pages: 1536 pages, cycled twice below.
  const std::string small = "&blocks_per_die=24&pages_per_block=16";
  const std::string uri = "csd:" + path + "?persist=1&cores=1&channels=2&dies=2&buffer_mb=1&data_mb=1" + small;
  model m;
  {
    auto c = kv_cache::create(options(uri));
    REQUIRE_MESSAGE(c.ok(), c.error().to_string());
    kv_cache& cache = *c.value();
    auto a = cache.create_sequence();
    REQUIRE(a.ok());
    REQUIRE(cache.set_sequence_name(a.value(), 1).ok());
    m.seqs[1].resize(kLayers);
    for (uint32_t l = 0; l < kLayers; ++l) {
      m.seqs[1][l] = m.fresh(100);
      REQUIRE(append_uids(cache, a.value(), l, m.seqs[1][l]).ok());
    }
    REQUIRE(cache.flush().ok());
    // After the commit: the sequence is freed, and fresh data fills the flash over and over.
    REQUIRE(cache.free_sequence(a.value()).ok());
    for (int round = 0; round < 70; ++round) {
      auto s = cache.create_sequence();
      REQUIRE(s.ok());
      for (uint32_t l = 0; l < kLayers; ++l) {
        const status st = append_uids(cache, s.value(), l, m.fresh(200));
        REQUIRE_MESSAGE(st.ok(), st.to_string());
      }
      REQUIRE(cache.free_sequence(s.value()).ok());
    }
    CHECK(cache.stats().backend.flash_pages_programmed > 2 * 1536);
  }  // a crash as far as the store knows: no flush since the commit
  auto c = kv_cache::create(options(uri));
  REQUIRE_MESSAGE(c.ok(), c.error().to_string());
  check_all(*c.value(), m);
  c.value().reset();
  remove_store(path);
}

TEST_CASE("refused up front: several drives, RAM flash, another shape, SparF, a plain open of a store") {
  const std::string path = ssd_test::scratch_file("refuse.flash");
  remove_store(path);
  {
    auto cache = open_cache(path);
    auto a = cache->create_sequence();
    REQUIRE(a.ok());
    REQUIRE(cache->set_sequence_name(a.value(), 7).ok());
    REQUIRE(append_uids(*cache, a.value(), 0, {1, 2, 3}).ok());
    REQUIRE(cache->flush().ok());
  }
  for (const std::string& uri : {"csd:" + path + "?persist=1&drives=2", std::string("csd:?persist=1")}) {
    auto b = make_backend(uri);
    REQUIRE_FALSE(b.ok());
    CHECK(b.error().code() == errc::kUnsupported);
  }
  auto other = options(store_uri(path));
  other.shape.n_layers = 3;
  auto c = kv_cache::create(other);
  REQUIRE_FALSE(c.ok());
  CHECK(c.error().code() == errc::kInvalidArgument);
  auto sparse = options(store_uri(path));
  sparse.sparf = true;
  auto s = kv_cache::create(sparse);
  REQUIRE_FALSE(s.ok());
  CHECK(s.error().code() == errc::kUnsupported);
  auto plain = kv_cache::create(options("csd:" + path + "?cores=1"));
  REQUIRE_FALSE(plain.ok());
  CHECK(plain.error().code() == errc::kInvalidArgument);
  CHECK(plain.error().message().find("persist=1") != std::string::npos);
  // After all that the store is intact.
  auto again = open_cache(path);
  auto id = again->find_sequence(7);
  REQUIRE(id.ok());
  CHECK(check_tokens(*again, id.value(), {{1, 2, 3}, {}}).ok());
  again.reset();
  remove_store(path);
}

TEST_CASE("a second opener in another process is BUSY; the store's files are 0600") {
  const std::string path = ssd_test::scratch_file("busy.flash");
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
    ::execl("/proc/self/exe", "instinfer-test-csd-persist", "--open-store", path.c_str(), static_cast<char*>(nullptr));
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

TEST_CASE("bit flips in committed flash pages and in PATH.meta, truncations of PATH.meta") {
  const std::string path = ssd_test::scratch_file("damage.flash");
  remove_store(path);
  model m;
  std::mt19937 rng(23);
  std::map<uint64_t, std::set<chunk_id>> chunks_of;  // name -> the chunks its tables reference
  {
    auto cache = open_cache(path);
    build(*cache, m, rng);
    REQUIRE(cache->flush().ok());
  }
  {
    auto cache = open_cache(path);
    check_all(*cache, m);
    csr_page_table t;
    for (const auto& [name, tokens] : m.seqs)
      for (uint32_t l = 0; l < kLayers; ++l) {
        const std::vector<seq_id> one{cache->find_sequence(name).value()};
        REQUIRE(cache->page_table(l, one, t).ok());
        chunks_of[name].insert(t.indices.begin(), t.indices.end());
      }
  }
  const std::vector<char> meta = read_all(path + ".meta");
  // The drive's metadata (format in docs/persistence.md): 80-byte header, then per chunk u32 id,
  // u32 tokens, 4 pages, 4 checksums (2 kv heads: 4 pages a chunk).
  const uint32_t n_chunks = get32(meta, 72);
  REQUIRE(n_chunks > 0);
  const size_t rec = 4 * (2 + 2 * 2 * kKvHeads);
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  REQUIRE(fd >= 0);
  int detected = 0;
  for (int round = 0; round < 24; ++round) {
    // A bit of a row the committed chunk holds (so always covered by its checksum).
    const size_t at = 80 + (rng() % n_chunks) * rec;
    const chunk_id chunk = get32(meta, at);
    const uint32_t tokens = get32(meta, at + 4);
    const uint32_t page = static_cast<uint32_t>(rng() % (2 * kKvHeads));
    const uint64_t ppn = get32(meta, at + 8 + 4 * page);
    const uint64_t off = ppn * kPageBytes + uint64_t{rng() % tokens} * kDim * 2 + rng() % (kDim * 2);
    char byte = 0;
    REQUIRE(::pread(fd, &byte, 1, static_cast<off_t>(off)) == 1);
    const char flipped = static_cast<char>(byte ^ (1 << (rng() % 8)));
    REQUIRE(::pwrite(fd, &flipped, 1, static_cast<off_t>(off)) == 1);
    {
      auto cache = open_cache(path);
      for (const auto& [name, tokens_of] : m.seqs) {
        const seq_id id = cache->find_sequence(name).value();
        const status s = check_tokens(*cache, id, tokens_of);
        const bool hit = chunks_of[name].count(chunk) != 0;
        if (hit) {
          CHECK_MESSAGE(s.code() == errc::kCorruptData, "round ", round, " name ", name, ": ", s.to_string());
          std::vector<float> q(kQHeads * kDim, 0.5f), out(q.size());
          // Attend over the damaged layer only fails if the chunk is in it: check both layers.
          bool attend_failed = false;
          for (uint32_t l = 0; l < kLayers; ++l) {
            const std::vector<seq_id> one{id};
            const status a = cache->attend(l, one, q.data(), out.data(), nullptr);
            CHECK((a.ok() || a.code() == errc::kCorruptData));
            attend_failed = attend_failed || a.code() == errc::kCorruptData;
          }
          CHECK(attend_failed);
          detected += s.code() == errc::kCorruptData;
        } else {
          CHECK_MESSAGE(s.ok(), "round ", round, " name ", name, ": ", s.to_string());
        }
      }
    }
    REQUIRE(::pwrite(fd, &byte, 1, static_cast<off_t>(off)) == 1);
  }
  ::close(fd);
  CHECK(detected >= 24);
  // PATH.meta: one checksum covers it all, so any damage refuses the whole store.
  for (int round = 0; round < 30; ++round) {
    std::vector<char> bad = meta;
    size_t keep = bad.size();
    if (round < 20) {
      const size_t off = rng() % bad.size();
      bad[off] = static_cast<char>(bad[off] ^ (1 << (rng() % 8)));
    } else {
      keep = rng() % bad.size();
    }
    write_file(path + ".meta", bad, keep);
    auto c = kv_cache::create(options(store_uri(path)));
    REQUIRE_FALSE(c.ok());
    CHECK_MESSAGE(c.error().code() == errc::kCorruptData, "round ", round, ": ", c.error().to_string());
  }
  write_file(path + ".meta", meta, meta.size());
  {
    auto cache = open_cache(path);
    check_all(*cache, m);
  }
  remove_store(path);
}

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--open-store") == 0) {
    auto c = kv_cache::create(options(store_uri(argv[2])));
    return c.ok() ? 0 : -static_cast<int>(c.error().code());
  }
  if (!csd_backend::available()) {
    std::fprintf(stderr, "skipped: instinfer-csd not found (next to this executable, or INSTINFER_CSD_DEVICE)\n");
    return 77;
  }
  return ssd_test::run_tests(argc, argv);
}
