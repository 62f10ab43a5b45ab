// ssd_backend::read_pages (SparF's dual-step loading): single pages of stored and buffered chunks
// equal the same pages of read_chunk, only the named pages reach the device, bad requests read
// nothing, and an injected I/O error fails cleanly.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "instinfer/backend/ssd_backend.hpp"
#include "ssd_test_util.hpp"
#include "support/batch_of.hpp"

using namespace instinfer;

namespace {

constexpr uint32_t kLayers = 2, kQHeads = 8, kKvHeads = 4, kDim = 128;
constexpr std::byte kUntouched{0xA5};

backend_config make_config(uint32_t page_bytes = 4096) {
  backend_config c;
  c.shape = kv_shape{kLayers, kQHeads, kKvHeads, kDim, dtype::kF16};
  c.page = page_geometry::make(page_bytes, kDim, dtype::kF16).value();
  return c;
}

// read_gap=0 unless a test names it: exact page counts below assume no gap is read through.
std::unique_ptr<ssd_backend> open_backend(const std::string& name, const std::string& options,
                                          const backend_config& cfg) {
  const std::string gap = options.find("read_gap") == std::string::npos ? "&read_gap=0" : "";
  return ssd_test::open_backend("ssd:" + ssd_test::scratch_file(name) + "?" + options + gap, cfg);
}

// Sequences of random f16 tokens appended straight to the backend, with every chunk's
// read_chunk image as the reference.
struct fixture {
  backend_config cfg;
  chunk_layout layout;
  std::unique_ptr<ssd_backend> b;
  struct chunk_info {
    chunk_id id = kInvalidChunk;
    uint32_t n_tokens = 0;
  };
  std::vector<chunk_info> chunks;                    // every chunk of every (sequence, layer)
  std::map<chunk_id, std::vector<std::byte>> image;  // read_chunk of each chunk
  std::map<chunk_id, bool> stored;                   // on the device (read_chunk read it from there)
  uint32_t seed = 1;

  fixture(const std::string& name, const std::string& options, backend_config c = make_config())
      : cfg(c), layout(c.layout()), b(open_backend(name, options, c)) {}

  uint32_t tpp() const { return cfg.page.tokens_per_page; }
  uint32_t page_bytes() const { return cfg.page.page_bytes; }

  void append(seq_id s, uint32_t layer, uint32_t n) {
    const size_t row = size_t{kKvHeads} * kDim * 2;
    const auto k = ssd_test::to_dtype(ssd_test::random_floats(size_t{n} * kKvHeads * kDim, seed++), dtype::kF16);
    const auto v = ssd_test::to_dtype(ssd_test::random_floats(size_t{n} * kKvHeads * kDim, seed++), dtype::kF16);
    uint32_t done = 0, index = 0;
    while (done < n) {
      auto id = b->allocate_chunk({s, layer, index});
      REQUIRE(id.ok());
      const uint32_t m = std::min(n - done, tpp());
      REQUIRE(b->write_tokens(id.value(), {s, layer, index}, 0, m, k.data() + done * row, v.data() + done * row).ok());
      chunks.push_back({id.value(), m});
      done += m;
      ++index;
    }
  }

  // Refresh the reference images and learn which chunks are on the device.
  void snapshot() {
    for (const auto& c : chunks) {
      auto& img = image[c.id];
      img.assign(layout.chunk_bytes(), std::byte{0});
      const uint64_t before = b->stats().device_bytes_read;
      REQUIRE(b->read_chunk(c.id, c.n_tokens, img.data()).ok());
      stored[c.id] = b->stats().device_bytes_read != before;
    }
  }

  // Read `picks` (distinct (chunk index, page) pairs) into unaligned destinations and compare.
  // Returns the device bytes the call read.
  uint64_t read_and_check(const std::vector<std::pair<uint32_t, uint32_t>>& picks) {
    std::vector<std::byte> out(picks.size() * page_bytes() + 1, kUntouched);
    std::byte* base = out.data() + 1;  // destinations need not be aligned
    std::vector<page_read> reads;
    for (size_t i = 0; i < picks.size(); ++i) {
      const auto& c = chunks[picks[i].first];
      reads.push_back({c.id, c.n_tokens, picks[i].second, base + i * page_bytes()});
    }
    const uint64_t before = b->stats().device_bytes_read;
    const status s = b->read_pages(reads);
    REQUIRE_MESSAGE(s.ok(), s.to_string());
    const uint64_t read = b->stats().device_bytes_read - before;
    for (size_t i = 0; i < picks.size(); ++i) {
      const auto& img = image[chunks[picks[i].first].id];
      const bool same = std::memcmp(base + i * page_bytes(), img.data() + uint64_t{picks[i].second} * page_bytes(),
                                    page_bytes()) == 0;
      CHECK_MESSAGE(same, "chunk " << chunks[picks[i].first].id << " page " << picks[i].second);
    }
    return read;
  }

  uint64_t pages_on_disk(const std::vector<std::pair<uint32_t, uint32_t>>& picks) {
    uint64_t n = 0;
    for (const auto& p : picks) n += stored[chunks[p.first].id];
    return n;
  }

  std::vector<std::pair<uint32_t, uint32_t>> random_picks(std::mt19937& rng, size_t n) {
    std::set<std::pair<uint32_t, uint32_t>> set;
    std::uniform_int_distribution<uint32_t> chunk(0, static_cast<uint32_t>(chunks.size() - 1));
    std::uniform_int_distribution<uint32_t> page(0, layout.pages_per_chunk() - 1);
    while (set.size() < n) set.insert({chunk(rng), page(rng)});
    std::vector<std::pair<uint32_t, uint32_t>> v(set.begin(), set.end());
    std::shuffle(v.begin(), v.end(), rng);  // the backend sorts; the caller need not
    return v;
  }
};

}  // namespace

TEST_CASE("random page subsets equal read_chunk; only pages on the device are read") {
  // Small staging and queue: a batch takes several rounds.
  fixture f("pages.bin", "write_batch=4&staging=128K&request=32K&queue_depth=4");
  for (seq_id s = 1; s <= 3; ++s)
    for (uint32_t l = 0; l < kLayers; ++l) f.append(s, l, 150 + 7 * static_cast<uint32_t>(s));
  std::mt19937 rng(42);
  for (int phase = 0; phase < 2; ++phase) {
    CAPTURE(phase);
    if (phase == 1) REQUIRE(f.b->flush().ok());  // now only the partial tails stay buffered (flushed copies)
    f.snapshot();
    const auto n_stored = std::count_if(f.stored.begin(), f.stored.end(), [](const auto& p) { return p.second; });
    CHECK(n_stored > 0);
    if (phase == 0) CHECK(f.b->buffered_chunks() > 0);
    for (int trial = 0; trial < 40; ++trial) {
      const size_t n = 1 + rng() % 60;
      const auto picks = f.random_picks(rng, n);
      CHECK(f.read_and_check(picks) == f.pages_on_disk(picks) * f.page_bytes());
    }
    // Every page of every chunk at once.
    std::vector<std::pair<uint32_t, uint32_t>> all;
    for (uint32_t c = 0; c < f.chunks.size(); ++c)
      for (uint32_t p = 0; p < f.layout.pages_per_chunk(); ++p) all.push_back({c, p});
    CHECK(f.read_and_check(all) == f.pages_on_disk(all) * f.page_bytes());
  }
  CHECK(f.b->read_pages({}).ok());
}

TEST_CASE("engine options: sqpoll, iopoll fallback, no registration, queue depth 1") {
  for (const char* opts : {"sqpoll=1", "iopoll=1", "register=0&single_issuer=0", "queue_depth=1&staging=64K"}) {
    CAPTURE(opts);
    fixture f("opts.bin", opts);
    f.append(1, 0, 300);
    f.append(2, 1, 90);
    f.snapshot();
    std::mt19937 rng(11);
    for (int trial = 0; trial < 10; ++trial) {
      const auto picks = f.random_picks(rng, 1 + rng() % 40);
      CHECK(f.read_and_check(picks) == f.pages_on_disk(picks) * f.page_bytes());
    }
  }
}

TEST_CASE("pages adjacent on the device go out as one read") {
  fixture f("merge.bin", "request=32K");
  f.append(1, 0, 64);
  REQUIRE(f.b->flush().ok());
  f.snapshot();
  REQUIRE(f.stored[f.chunks[0].id]);
  // A chunk's 8 pages are 32 KiB: one request. A fault armed for the second read never fires.
  f.b->inject_fault({ssd_fault::op::kRead, 2, EIO, 0});
  std::vector<std::pair<uint32_t, uint32_t>> whole;
  for (uint32_t p = 0; p < f.layout.pages_per_chunk(); ++p) whole.push_back({0, p});
  CHECK(f.read_and_check(whole) == f.layout.chunk_bytes());
  f.b->inject_fault({ssd_fault::op::kRead, 0, 0, 0});  // disarm
  // A page named twice is read once.
  CHECK(f.read_and_check({{0, 3}, {0, 3}}) == f.page_bytes());
}

TEST_CASE("pages within the merge gap share a read: same data, fewer requests, never more than the span") {
  // 4 KiB pages, 4 kv heads: 32 KiB chunks of 8 pages.
  const uint32_t page = 4096;
  for (uint64_t gap : {0ull, 4096ull, 12288ull, 1ull << 20}) {
    CAPTURE(gap);
    fixture f("gap.bin", "request=64K&read_gap=" + std::to_string(gap));
    f.append(1, 0, 400);  // 25 chunks
    REQUIRE(f.b->flush().ok());
    f.snapshot();
    std::mt19937 rng(5);
    for (int trial = 0; trial < 30; ++trial) {
      const auto picks = f.random_picks(rng, 1 + rng() % 80);
      // Expected: sort the device offsets, merge as the reader should, count requests and bytes.
      std::vector<uint64_t> offs;
      for (const auto& p : picks)
        if (f.stored[f.chunks[p.first].id])
          offs.push_back(uint64_t{f.chunks[p.first].id} * f.layout.chunk_bytes() + uint64_t{p.second} * page);
      std::sort(offs.begin(), offs.end());
      uint64_t requests = 0, bytes = 0, run_begin = 0, run_end = 0;
      for (uint64_t o : offs) {
        if (requests > 0 && o <= run_end + gap && std::max(run_end, o + page) - run_begin <= (64u << 10)) {
          run_end = std::max(run_end, o + page);
          continue;
        }
        bytes += run_end - run_begin;
        ++requests;
        run_begin = o;
        run_end = o + page;
      }
      bytes += run_end - run_begin;
      const uint64_t before = f.b->stats().device_read_requests;
      const uint64_t read = f.read_and_check(picks);  // the data equals read_chunk's
      const uint64_t issued = f.b->stats().device_read_requests - before;
      CHECK(issued == requests);
      CHECK(read == bytes);
      if (!offs.empty()) {
        CHECK(read >= offs.size() * page);
        CHECK(read <= offs.back() + page - offs.front());  // never more than the span
        if (gap == 0) CHECK(read == offs.size() * page);
      }
    }
  }
}

TEST_CASE("pages smaller than the direct-I/O alignment are read within their chunk") {
  // 2 KiB pages: 8 tokens each, 16 KiB chunks.
  fixture f("small.bin", "write_batch=2", make_config(2048));
  f.append(1, 0, 100);
  f.append(2, 1, 37);
  REQUIRE(f.b->flush().ok());
  f.snapshot();
  std::mt19937 rng(7);
  for (int trial = 0; trial < 20; ++trial) {
    const auto picks = f.random_picks(rng, 1 + rng() % 30);
    const uint64_t read = f.read_and_check(picks);
    CHECK(read >= f.pages_on_disk(picks) * f.page_bytes());
    CHECK(read <= f.pages_on_disk(picks) * 4096);
  }
}

TEST_CASE("a prefetch in flight is cancelled first; attend still works after") {
  fixture f("prefetch.bin", "staging=128K&request=32K&queue_depth=4");
  f.append(1, 0, 200);
  REQUIRE(f.b->flush().ok());
  f.snapshot();
  std::vector<chunk_id> ids;
  for (const auto& c : f.chunks) ids.push_back(c.id);
  std::vector<float> q(kQHeads * kDim, 0.2f), out(kQHeads * kDim), out2(kQHeads * kDim);
  attend_item item{1, ids, 200, q.data(), out.data(), nullptr};
  REQUIRE(f.b->attend(0, test_support::batch_of({&item, 1}, f.cfg.layout().tokens(), kQHeads, kDim)).ok());
  f.b->prefetch(0, test_support::batch_of({&item, 1}, f.cfg.layout().tokens(), kQHeads, kDim));
  std::mt19937 rng(3);
  const auto picks = f.random_picks(rng, 20);
  CHECK(f.read_and_check(picks) == f.pages_on_disk(picks) * f.page_bytes());
  item.out = out2.data();
  REQUIRE(f.b->attend(0, test_support::batch_of({&item, 1}, f.cfg.layout().tokens(), kQHeads, kDim)).ok());
  CHECK(out == out2);
}

TEST_CASE("invalid requests are kInvalidArgument and read nothing") {
  fixture f("bad.bin", "write_batch=1");
  f.append(1, 0, 40);  // two sealed chunks written, one buffered tail
  f.snapshot();
  const uint32_t pb = f.page_bytes();
  std::vector<std::byte> buf(4 * pb, kUntouched);
  const auto c0 = f.chunks[0], tail = f.chunks.back();
  auto id = f.b->allocate_chunk({9, 0, 0});
  REQUIRE(id.ok());
  const chunk_id released = id.value();
  f.b->release_chunk(released);
  const page_read good0{c0.id, c0.n_tokens, 1, buf.data()};
  const page_read good1{tail.id, tail.n_tokens, 2, buf.data() + pb};
  const std::vector<page_read> bad = {
      {12345678, 16, 0, buf.data() + 2 * pb},                                 // no such chunk
      {released, 16, 0, buf.data() + 2 * pb},                                 // released
      {c0.id, c0.n_tokens, f.layout.pages_per_chunk(), buf.data() + 2 * pb},  // page >= 2 * n_kv_heads
      {c0.id, c0.n_tokens, 0, nullptr},                                       // null destination
      {c0.id, f.tpp() + 1, 0, buf.data() + 2 * pb},                           // too many tokens
  };
  for (size_t i = 0; i < bad.size(); ++i) {
    CAPTURE(i);
    const std::vector<page_read> reads = {good0, good1, bad[i]};
    const uint64_t before = f.b->stats().device_bytes_read;
    const status s = f.b->read_pages(reads);
    CHECK(s.code() == errc::kInvalidArgument);
    CHECK(s.message().find("read_pages: read 2") != std::string::npos);
    CHECK(f.b->stats().device_bytes_read == before);
    CHECK(std::all_of(buf.begin(), buf.end(), [](std::byte x) { return x == kUntouched; }));
  }
  // The same valid reads alone succeed.
  CHECK(f.read_and_check({{0, 1}, {static_cast<uint32_t>(f.chunks.size() - 1), 2}}) == pb);
}

TEST_CASE("an injected I/O error fails the batch cleanly; later reads work") {
  fixture f("faults.bin", "write_batch=2&staging=128K&request=32K&queue_depth=4");
  for (seq_id s = 1; s <= 2; ++s) f.append(s, 0, 170);
  REQUIRE(f.b->flush().ok());
  f.snapshot();
  std::vector<std::pair<uint32_t, uint32_t>> picks;
  for (uint32_t c = 0; c < f.chunks.size(); c += 2) picks.push_back({c, c % f.layout.pages_per_chunk()});
  REQUIRE(f.pages_on_disk(picks) >= 6);  // more runs than one round holds
  for (int err : {EIO, 0}) {
    for (uint64_t nth : {1, 3, 6}) {
      CAPTURE(err);
      CAPTURE(nth);
      std::vector<std::byte> out(picks.size() * f.page_bytes());
      std::vector<page_read> reads;
      for (size_t i = 0; i < picks.size(); ++i) {
        const auto& c = f.chunks[picks[i].first];
        reads.push_back({c.id, c.n_tokens, picks[i].second, out.data() + i * f.page_bytes()});
      }
      f.b->inject_fault({ssd_fault::op::kRead, nth, err, 512});
      const status s = f.b->read_pages(reads);
      CHECK(s.code() == errc::kIoError);
      CHECK(s.message().find("read_pages") != std::string::npos);
      CHECK(f.read_and_check(picks) == f.pages_on_disk(picks) * f.page_bytes());
      std::vector<std::byte> chunk(f.layout.chunk_bytes());
      REQUIRE(f.b->read_chunk(f.chunks[0].id, f.chunks[0].n_tokens, chunk.data()).ok());
      CHECK(chunk == f.image[f.chunks[0].id]);
    }
  }
}

int main(int argc, char** argv) {
  return ssd_test::run_tests(argc, argv);
}
