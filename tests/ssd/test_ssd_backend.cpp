// The ssd backend driven directly (as the KV manager drives it): decode against a float64
// reference, prefetch, write amplification, fault injection at every I/O call site, ENOSPC,
// the memory bound and bad inputs.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cerrno>
#include <cmath>
#include <map>
#include <thread>
#include <vector>

#include "instinfer/backend/ssd_backend.hpp"
#include "instinfer/testing/reference.hpp"
#include "ssd_test_util.hpp"
#include "support/batch_of.hpp"

using namespace instinfer;

namespace {

constexpr uint32_t kLayers = 2, kQHeads = 8, kKvHeads = 2, kDim = 128;

backend_config make_config(dtype t = dtype::kF16, uint32_t page_bytes = 4096) {
  backend_config c;
  c.shape = kv_shape{kLayers, kQHeads, kKvHeads, kDim, t};
  c.page = page_geometry::make(page_bytes, kDim, t).value();
  return c;
}

std::string uri_for(const std::string& name, const std::string& options = "") {
  return "ssd:" + ssd_test::scratch_file(name) + (options.empty() ? "" : "?" + options);
}

using ssd_test::open_backend;

// A tiny KV manager: page tables plus a mirror of the stored rows for the reference.
struct harness {
  backend_config cfg;
  std::unique_ptr<ssd_backend> b;
  struct table {
    std::vector<chunk_id> chunks;
    uint32_t n = 0;
    std::vector<std::byte> k, v;  // [n][kv_heads][head_dim] in the cache dtype
  };
  std::map<std::pair<seq_id, uint32_t>, table> tables;
  uint32_t seed = 1;

  explicit harness(const std::string& uri, backend_config c = make_config()) : cfg(c), b(open_backend(uri, c)) {}

  uint32_t tpp() const { return cfg.page.tokens_per_page; }
  size_t row_bytes() const { return size_t{kKvHeads} * kDim * dtype_size(cfg.shape.kv_dtype); }

  // Append n fresh random tokens; on failure the mirror keeps only what the backend accepted.
  status append(seq_id s, uint32_t layer, uint32_t n) {
    auto& t = tables[{s, layer}];
    const auto kf = ssd_test::random_floats(size_t{n} * kKvHeads * kDim, seed++);
    const auto vf = ssd_test::random_floats(size_t{n} * kKvHeads * kDim, seed++);
    const auto k = ssd_test::to_dtype(kf, cfg.shape.kv_dtype), v = ssd_test::to_dtype(vf, cfg.shape.kv_dtype);
    uint32_t done = 0;
    while (done < n) {
      const uint32_t in_chunk = t.n % tpp();
      if (in_chunk == 0) {
        auto id = b->allocate_chunk({s, layer, static_cast<uint32_t>(t.chunks.size())});
        if (!id.ok()) return id.error();
        t.chunks.push_back(id.value());
      }
      const uint32_t m = std::min(n - done, tpp() - in_chunk);
      const status st = b->write_tokens(t.chunks.back(), {s, layer, static_cast<uint32_t>(t.chunks.size() - 1)},
                                        in_chunk, m, k.data() + done * row_bytes(), v.data() + done * row_bytes());
      if (!st.ok()) {
        if (in_chunk == 0) {
          b->release_chunk(t.chunks.back());
          t.chunks.pop_back();
        }
        return st;
      }
      t.k.insert(t.k.end(), k.begin() + done * row_bytes(), k.begin() + (done + m) * row_bytes());
      t.v.insert(t.v.end(), v.begin() + done * row_bytes(), v.begin() + (done + m) * row_bytes());
      t.n += m;
      done += m;
    }
    return {};
  }

  // Attend a batch and check every output against the float64 reference over the mirror.
  status attend_and_check(uint32_t layer, const std::vector<seq_id>& seqs, double tol = 2e-6, bool prefetch = false) {
    std::vector<attend_item> items(seqs.size());
    const size_t qrow = size_t{kQHeads} * kDim;
    std::vector<float> q(seqs.size() * qrow), out(seqs.size() * qrow, NAN), lse(seqs.size() * kQHeads, NAN);
    for (size_t i = 0; i < seqs.size(); ++i) {
      auto& t = tables[{seqs[i], layer}];
      const auto qi = ssd_test::random_floats(qrow, 1000 + static_cast<uint32_t>(i) + seed);
      std::copy(qi.begin(), qi.end(), q.begin() + static_cast<std::ptrdiff_t>(i * qrow));
      items[i] = {seqs[i], t.chunks, t.n, q.data() + i * qrow, out.data() + i * qrow, lse.data() + i * kQHeads};
    }
    const auto batch = test_support::batch_of(items, cfg.layout().tokens(), kQHeads, kDim);
    if (prefetch) b->prefetch(layer, batch);
    const status s = b->attend(layer, batch);
    if (!s.ok()) return s;
    const uint32_t g = kQHeads / kKvHeads;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const auto& t = tables[{seqs[i], layer}];
      const size_t hrow = size_t{kDim} * dtype_size(cfg.shape.kv_dtype);
      for (uint32_t h = 0; h < kKvHeads; ++h) {
        std::vector<std::byte> kh(t.n * hrow), vh(t.n * hrow);
        for (uint32_t j = 0; j < t.n; ++j) {
          std::copy_n(t.k.data() + j * row_bytes() + h * hrow, hrow, kh.data() + j * hrow);
          std::copy_n(t.v.data() + j * row_bytes() + h * hrow, hrow, vh.data() + j * hrow);
        }
        std::vector<double> want(size_t{g} * kDim), want_lse(g);
        reference::attend_rows(kh.data(), vh.data(), cfg.shape.kv_dtype, t.n, kDim,
                               q.data() + i * qrow + size_t{h} * g * kDim, g, 1.0 / std::sqrt(double{kDim}), 0.0,
                               want.data(), want_lse.data());
        const double err = reference::relative_error(
            std::span<const float>(out.data() + i * qrow + size_t{h} * g * kDim, size_t{g} * kDim), want);
        CHECK_MESSAGE(err <= tol, "seq " << seqs[i] << " head " << h << " n " << t.n << " err " << err);
        for (uint32_t j = 0; j < g; ++j) {
          if (t.n == 0)
            CHECK(std::isinf(lse[i * kQHeads + h * g + j]));
          else
            CHECK(std::fabs(lse[i * kQHeads + h * g + j] - want_lse[j]) <=
                  1e-5 * std::max(1.0, std::fabs(want_lse[j])));
        }
      }
    }
    return {};
  }
};

}  // namespace

TEST_CASE("URI options are parsed and checked") {
  auto opts = [](const std::string& u) { return ssd_backend_options::from_uri(backend_uri::parse(u).value()); };
  auto o = opts(
      "ssd:/x/y?queue_depth=64&staging=16M&request=1M&capacity=2G&write_batch=8&buffered=1&sqpoll=1"
      "&iopoll=1&single_issuer=0&register=0&preallocate=1&keep=1");
  REQUIRE(o.ok());
  CHECK(o->path == "/x/y");
  CHECK(o->queue_depth == 64);
  CHECK(o->staging_bytes == 16ull << 20);
  CHECK(o->request_bytes == 1ull << 20);
  CHECK(o->capacity_bytes == 2ull << 30);
  CHECK(o->write_batch == 8);
  CHECK((o->buffered && o->sqpoll && o->iopoll && !o->single_issuer && !o->register_buffers && o->preallocate &&
         o->keep_file));
  CHECK(opts("ssd:").error().code() == errc::kInvalidArgument);
  CHECK(opts("ssd:/x?bogus=1").error().message().find("bogus") != std::string::npos);
  CHECK(opts("ssd:/x?queue_depth=0").error().code() == errc::kInvalidArgument);
  CHECK(opts("ssd:/x?queue_depth=abc").error().code() == errc::kInvalidArgument);
  CHECK(opts("ssd:/x?staging=1000").error().code() == errc::kInvalidArgument);
  CHECK(opts("ssd:/x?request=1").error().code() == errc::kInvalidArgument);
  CHECK(opts("host").error().code() == errc::kInvalidArgument);
  auto made = make_ssd_backend(backend_uri::parse("ssd:" + ssd_test::scratch_file("m.bin")).value());
  REQUIRE(made.ok());
  CHECK(made.value()->name() == "ssd");
  CHECK(made.value()->preferred_page_bytes() >= 4096);
  CHECK(ssd_backend::available());
}

TEST_CASE("configure: bad configurations are clear errors") {
  auto cfg = make_config();
  ssd_backend small({ssd_test::scratch_file("small.bin")});
  auto c2 = cfg;
  c2.capacity_bytes = 1000;
  CHECK(small.configure(c2).code() == errc::kInvalidArgument);
  auto b = open_backend(uri_for("twice.bin"), cfg);
  CHECK(b->configure(cfg).code() == errc::kInvalidArgument);
  ssd_backend missing_dir({ssd_test::scratch_file("no/such/dir.bin")});
  CHECK(!missing_dir.configure(cfg).ok());
  ssd_backend unconfigured({ssd_test::scratch_file("u.bin")});
  CHECK(!unconfigured.allocate_chunk({}).ok());
  CHECK(unconfigured.attend(0, attend_batch{}).code() == errc::kInvalidArgument);
}

TEST_CASE("decode equals the float64 reference across page boundaries, batch submitted together") {
  for (dtype t : {dtype::kF16, dtype::kBF16, dtype::kF32}) {
    CAPTURE(dtype_name(t));
    harness h(uri_for("decode.bin", "staging=256K&request=64K&queue_depth=8"), make_config(t));
    const std::vector<uint32_t> lengths = {1, 15, 16, 17, 33, 100, 257, 1000};
    std::vector<seq_id> seqs;
    for (size_t i = 0; i < lengths.size(); ++i) {
      seqs.push_back(i + 1);
      for (uint32_t l = 0; l < kLayers; ++l) REQUIRE(h.append(i + 1, l, lengths[i]).ok());
    }
    for (uint32_t l = 0; l < kLayers; ++l) REQUIRE(h.attend_and_check(l, seqs).ok());
    // Seal the tails into storage and grow some sequences across more boundaries.
    REQUIRE(h.b->flush().ok());
    for (uint32_t l = 0; l < kLayers; ++l) {
      REQUIRE(h.append(3, l, 1).ok());
      REQUIRE(h.append(8, l, 31).ok());
    }
    for (uint32_t l = 0; l < kLayers; ++l) REQUIRE(h.attend_and_check(l, seqs).ok());
    CHECK(h.b->stats().device_bytes_read > 0);
  }
}

TEST_CASE("empty sequences give zeros and lse -inf") {
  harness h(uri_for("empty.bin"));
  h.tables[{1, 0}];
  REQUIRE(h.append(2, 0, 40).ok());
  REQUIRE(h.attend_and_check(0, {1, 2}).ok());
}

TEST_CASE("prefetch: adopted when it matches, discarded when it does not") {
  harness h(uri_for("prefetch.bin", "staging=128K&request=32K&queue_depth=4"));
  for (seq_id s = 1; s <= 3; ++s)
    for (uint32_t l = 0; l < kLayers; ++l) REQUIRE(h.append(s, l, 300 + 50 * static_cast<uint32_t>(s)).ok());
  REQUIRE(h.b->flush().ok());
  for (uint32_t l = 0; l < kLayers; ++l) REQUIRE(h.attend_and_check(l, {1, 2, 3}, 2e-6, true).ok());
  // A prefetch of another layer, then attend: the stale reads are dropped.
  std::vector<attend_item> items;
  std::vector<float> q(kQHeads * kDim, 0.5f), out(kQHeads * kDim);
  auto& t = h.tables[{2, 1}];
  items.push_back({2, t.chunks, t.n, q.data(), out.data(), nullptr});
  h.b->prefetch(1, test_support::batch_of(items, h.cfg.layout().tokens(), kQHeads, kDim));
  REQUIRE(h.attend_and_check(0, {3, 1}).ok());
  // A prefetch followed by a release of one of its chunks, then the attend that was hinted.
  h.b->prefetch(1, test_support::batch_of(items, h.cfg.layout().tokens(), kQHeads, kDim));
  REQUIRE(h.append(4, 1, 20).ok());
  h.b->release_chunk(h.tables[{4, 1}].chunks.back());
  h.tables.erase({4, 1});
  REQUIRE(h.attend_and_check(1, {2}).ok());
  // Bad hints are ignored.
  h.b->prefetch(99, test_support::batch_of(items, h.cfg.layout().tokens(), kQHeads, kDim));
  REQUIRE(h.attend_and_check(1, {2}).ok());
}

TEST_CASE("scattered page tables: several reads per staging slot, buffered chunks between stored ones") {
  // Full chunks in any order make a valid page table (attention does not depend on token order),
  // so a table interleaving another's chunks gives windows whose stored chunks are not adjacent on
  // the device and whose buffered chunks sit between them.
  harness h(uri_for("scatter.bin", "staging=128K&request=64K&queue_depth=4&write_batch=64"));
  const uint32_t tpp = h.tpp();
  REQUIRE(h.append(1, 0, 8 * tpp).ok());
  REQUIRE(h.b->flush().ok());                 // chunks 0..7 stored
  REQUIRE(h.append(1, 0, 6 * tpp + 5).ok());  // 8..13 sealed in group buffers, 14 a tail
  REQUIRE(h.b->buffered_chunks() == 7);
  const auto& src = h.tables[{1, 0}];
  auto& dst = h.tables[{2, 0}];
  for (uint32_t c : {7u, 8u, 6u, 9u, 5u, 10u, 4u, 11u, 3u, 12u, 2u, 13u, 1u, 0u, 14u}) {
    dst.chunks.push_back(src.chunks[c]);
    const size_t first = size_t{c} * tpp * h.row_bytes();
    const size_t last = std::min<size_t>(size_t{c + 1} * tpp, src.n) * h.row_bytes();
    dst.k.insert(dst.k.end(), src.k.begin() + first, src.k.begin() + last);
    dst.v.insert(dst.v.end(), src.v.begin() + first, src.v.begin() + last);
  }
  dst.n = src.n;
  const uint64_t read_before = h.b->stats().device_bytes_read;
  REQUIRE(h.attend_and_check(0, {2, 1}).ok());
  CHECK(h.b->stats().device_bytes_read - read_before == 2 * 8 * h.b->chunk_offset(1));  // stored chunks, once each
  REQUIRE(h.attend_and_check(0, {2}, 2e-6, true).ok());
}

TEST_CASE("write amplification is exactly 1 for whole-chunk appends, and counted honestly otherwise") {
  harness h(uri_for("wa.bin", "write_batch=4"));
  for (seq_id s = 1; s <= 3; ++s)
    for (uint32_t l = 0; l < kLayers; ++l) REQUIRE(h.append(s, l, 16 * 10).ok());
  REQUIRE(h.b->flush().ok());
  auto st = h.b->stats();
  CHECK(st.kv_bytes_appended == 3ull * kLayers * 160 * h.row_bytes() * 2);
  CHECK(st.device_bytes_written == st.kv_bytes_appended);
  CHECK(st.write_amplification() == 1.0);
  CHECK(h.b->buffered_chunks() == 0);
  // A partial tail flushed, then completed: its chunk is written twice, and that shows.
  REQUIRE(h.append(9, 0, 8).ok());
  REQUIRE(h.b->flush().ok());
  REQUIRE(h.append(9, 0, 8).ok());
  REQUIRE(h.b->flush().ok());
  st = h.b->stats();
  CHECK(st.write_amplification() > 1.0);
  CHECK(st.device_bytes_written == st.kv_bytes_appended + h.cfg.layout().chunk_bytes());
  REQUIRE(h.attend_and_check(0, {1, 9}).ok());
}

TEST_CASE("chunks of one layer of a sequence are contiguous on the device") {
  harness h(uri_for("contig.bin"));
  // Interleave two sequences and two layers, token by token chunk by chunk.
  for (int round = 0; round < 20; ++round)
    for (seq_id s = 1; s <= 2; ++s)
      for (uint32_t l = 0; l < kLayers; ++l) REQUIRE(h.append(s, l, 16).ok());
  for (const auto& [key, t] : h.tables) {
    uint32_t breaks = 0;
    for (size_t i = 1; i < t.chunks.size(); ++i) breaks += t.chunks[i] != t.chunks[i - 1] + 1;
    CHECK(breaks == 0);
  }
}

TEST_CASE("fork and truncation: copies of stored and buffered partial chunks") {
  harness h(uri_for("fork.bin"));
  REQUIRE(h.append(1, 0, 40).ok());  // 2 sealed chunks + a buffered tail of 8
  REQUIRE(h.b->flush().ok());
  // Fork: share the sealed chunks, copy the buffered tail.
  auto& src = h.tables[{1, 0}];
  auto& dst = h.tables[{2, 0}];
  dst = src;
  auto id = h.b->allocate_chunk({2, 0, 2});
  REQUIRE(id.ok());
  REQUIRE(h.b->copy_tokens(id.value(), {2, 0, 2}, src.chunks.back(), 8).ok());
  dst.chunks.back() = id.value();
  REQUIRE(h.append(2, 0, 30).ok());
  REQUIRE(h.append(1, 0, 3).ok());
  REQUIRE(h.attend_and_check(0, {1, 2}).ok());
  // Truncate sequence 2 to 20 tokens: its second chunk is sealed and stored, so the manager copies
  // the first 4 tokens out of it before appending (read from the device).
  REQUIRE(h.b->flush().ok());
  auto& t2 = h.tables[{2, 0}];
  while (t2.chunks.size() > 2) {
    h.b->release_chunk(t2.chunks.back());
    t2.chunks.pop_back();
  }
  auto copy = h.b->allocate_chunk({2, 0, 1});
  REQUIRE(copy.ok());
  REQUIRE(h.b->copy_tokens(copy.value(), {2, 0, 1}, t2.chunks[1], 4).ok());
  t2.chunks[1] = copy.value();  // the old chunk is still sequence 1's (shared): not released
  t2.n = 20;
  t2.k.resize(20 * h.row_bytes());
  t2.v.resize(20 * h.row_bytes());
  REQUIRE(h.attend_and_check(0, {2, 1}).ok());
  REQUIRE(h.append(2, 0, 50).ok());
  REQUIRE(h.attend_and_check(0, {1, 2}).ok());
  // read_chunk gives back what was written (buffered and stored chunks).
  std::vector<std::byte> buf(h.cfg.layout().chunk_bytes());
  for (size_t c = 0; c < t2.chunks.size(); ++c) {
    REQUIRE(h.b->read_chunk(t2.chunks[c], 16, buf.data()).ok());
    const uint32_t tok = static_cast<uint32_t>(c) * 16;
    const size_t hrow = size_t{kDim} * 2;
    CHECK(std::memcmp(buf.data() + h.cfg.layout().offset(kv_kind::kValue, 1, 0, 0),
                      t2.v.data() + tok * h.row_bytes() + hrow, hrow) == 0);
  }
}

TEST_CASE("a backend reopened on the same path starts clean and decodes correctly") {
  const std::string uri = uri_for("reopen.bin");
  for (int round = 0; round < 3; ++round) {
    harness h(uri);
    REQUIRE(h.append(1, 0, 100 + 37 * static_cast<uint32_t>(round)).ok());
    REQUIRE(h.b->flush().ok());
    REQUIRE(h.attend_and_check(0, {1}).ok());
  }
}

TEST_CASE("fault injection at every I/O call site leaves every sequence readable") {
  harness h(uri_for("faults.bin", "write_batch=2&staging=128K&request=32K&queue_depth=4"));
  for (seq_id s = 1; s <= 3; ++s) REQUIRE(h.append(s, 0, 200).ok());
  REQUIRE(h.b->flush().ok());
  const std::vector<seq_id> all = {1, 2, 3};
  const uint32_t open_tails = h.b->buffered_chunks();  // the three partial tails stay in host memory
  CHECK(open_tails == 3);

  for (int err : {EIO, 0}) {
    CAPTURE(err);
    const ssd_fault read_fault{ssd_fault::op::kRead, 1, err, 512};
    SUBCASE("attend: first read of the batch") {
      h.b->inject_fault(read_fault);
      CHECK(h.attend_and_check(0, all).code() == errc::kIoError);
    }
    SUBCASE("attend: a read in the middle of the stream") {
      h.b->inject_fault({ssd_fault::op::kRead, 7, err, 512});
      CHECK(h.attend_and_check(0, all).code() == errc::kIoError);
    }
    SUBCASE("prefetch read, consumed by attend") {
      h.b->inject_fault(read_fault);
      CHECK(h.attend_and_check(0, all, 2e-6, true).code() == errc::kIoError);
    }
    SUBCASE("read_chunk") {
      std::vector<std::byte> buf(h.cfg.layout().chunk_bytes());
      h.b->inject_fault(read_fault);
      CHECK(h.b->read_chunk(h.tables[{1, 0}].chunks[0], 16, buf.data()).code() == errc::kIoError);
    }
    SUBCASE("copy_tokens from a stored chunk") {
      auto id = h.b->allocate_chunk({5, 0, 0});
      REQUIRE(id.ok());
      h.b->inject_fault(read_fault);
      CHECK(h.b->copy_tokens(id.value(), {5, 0, 0}, h.tables[{1, 0}].chunks[0], 5).code() == errc::kIoError);
      CHECK(h.b->buffered_chunks() == open_tails);  // nothing half-made
      h.b->release_chunk(id.value());
    }
    SUBCASE("batched write of sealed chunks") {
      // write_batch=2: the third sealing triggers the batch; its write fails, nothing changes.
      h.b->inject_fault({ssd_fault::op::kWrite, 2, err ? ENOSPC : 0, 512});
      status s;
      uint32_t appended = 0;
      for (int i = 0; i < 6 && s.ok(); ++i) {
        s = h.append(4, 0, 16);
        if (s.ok()) appended += 16;
      }
      CHECK((s.code() == errc::kNoSpace || s.code() == errc::kIoError));
      CHECK(appended >= 32);
      REQUIRE(h.attend_and_check(0, {4, 1}).ok());  // the unwritten chunks are served from memory
      REQUIRE(h.append(4, 0, 16).ok());             // and retried
      REQUIRE(h.b->flush().ok());
      CHECK(h.b->buffered_chunks() == open_tails);
      REQUIRE(h.attend_and_check(0, {4}).ok());
    }
    SUBCASE("flush: partial tail write") {
      REQUIRE(h.append(1, 0, 5).ok());
      h.b->inject_fault({ssd_fault::op::kWrite, 1, err, 512});
      CHECK(!h.b->flush().ok());
      REQUIRE(h.b->flush().ok());
    }
    SUBCASE("flush: fsync") {
      if (err == 0) return;  // fsync moves no bytes: no short form
      h.b->inject_fault({ssd_fault::op::kFsync, 1, EIO, 0});
      CHECK(h.b->flush().code() == errc::kIoError);
      REQUIRE(h.b->flush().ok());
    }
    // Whatever failed, every sequence still decodes exactly.
    REQUIRE(h.attend_and_check(0, all).ok());
    REQUIRE(h.attend_and_check(0, all, 2e-6, true).ok());
  }
}

TEST_CASE("a full device mid-append is a clean error with nothing lost") {
  SUBCASE("capacity: out of chunks") {
    // 8 chunks of 16 KiB.
    harness h(uri_for("full.bin", "capacity=128K"));
    REQUIRE(h.append(1, 0, 100).ok());  // 7 chunks
    const status s = h.append(2, 0, 40);
    CHECK(s.code() == errc::kOutOfPages);
    CHECK(h.b->free_chunks() == 0);
    REQUIRE(h.attend_and_check(0, {1, 2}).ok());
    h.b->release_chunk(h.tables[{2, 0}].chunks.back());
    CHECK(h.b->free_chunks() == 1);
  }
  SUBCASE("ENOSPC from the device during the batched write") {
    harness h(uri_for("enospc.bin", "write_batch=1"));
    REQUIRE(h.append(1, 0, 64).ok());
    h.b->inject_fault({ssd_fault::op::kWrite, 1, ENOSPC, 0});
    const status s = h.append(1, 0, 16);
    CHECK(s.code() == errc::kNoSpace);
    CHECK(s.message().find("kept in host memory") != std::string::npos);
    REQUIRE(h.attend_and_check(0, {1}).ok());
    REQUIRE(h.append(1, 0, 16).ok());
    REQUIRE(h.b->flush().ok());
    REQUIRE(h.attend_and_check(0, {1}).ok());
    CHECK(h.b->stats().write_amplification() == 1.0);
  }
}

TEST_CASE("host memory is bounded by staging + group buffers + tables, not context length") {
  auto run = [](uint32_t tokens) {
    harness h(uri_for("mem" + std::to_string(tokens) + ".bin", "staging=1M&capacity=256M"));
    for (seq_id s = 1; s <= 2; ++s)
      for (uint32_t l = 0; l < kLayers; ++l) REQUIRE(h.append(s, l, tokens + 5).ok());
    for (uint32_t l = 0; l < kLayers; ++l) REQUIRE(h.attend_and_check(l, {1, 2}, 2e-6, true).ok());
    return h.b->host_memory_bytes();
  };
  const uint64_t small = run(1024), large = run(16 * 1024);
  MESSAGE("host memory " << small << " B at 1k tokens, " << large << " B at 16k tokens");
  CHECK(large <= small + small / 10);
}

TEST_CASE("bad inputs") {
  harness h(uri_for("bad.bin"));
  std::vector<std::byte> row(h.row_bytes() * 20);
  auto id = h.b->allocate_chunk({1, 0, 0});
  REQUIRE(id.ok());
  CHECK(h.b->write_tokens(12345678, {}, 0, 1, row.data(), row.data()).code() == errc::kInvalidArgument);
  CHECK(h.b->write_tokens(id.value(), {}, 0, 1, nullptr, row.data()).code() == errc::kInvalidArgument);
  CHECK(h.b->write_tokens(id.value(), {}, 0, 17, row.data(), row.data()).code() == errc::kInvalidArgument);
  CHECK(h.b->write_tokens(id.value(), {}, 3, 1, row.data(), row.data()).code() == errc::kInvalidArgument);
  REQUIRE(h.b->write_tokens(id.value(), {}, 0, 16, row.data(), row.data()).ok());
  // Sealed: never written again.
  CHECK(h.b->write_tokens(id.value(), {}, 16, 0, row.data(), row.data()).ok());
  CHECK(h.b->write_tokens(id.value(), {}, 0, 1, row.data(), row.data()).code() == errc::kInvalidArgument);
  CHECK(h.b->copy_tokens(id.value(), {}, id.value(), 3).code() == errc::kInvalidArgument);
  auto id2 = h.b->allocate_chunk({1, 0, 1});
  REQUIRE(id2.ok());
  CHECK(h.b->copy_tokens(id2.value(), {}, id.value(), 0).code() == errc::kInvalidArgument);
  CHECK(h.b->copy_tokens(id2.value(), {}, id.value(), 17).code() == errc::kInvalidArgument);
  CHECK(h.b->read_chunk(id.value(), 16, nullptr).code() == errc::kInvalidArgument);
  CHECK(h.b->read_chunk(id.value(), 17, row.data()).code() == errc::kInvalidArgument);
  std::vector<float> q(kQHeads * kDim, 0.1f), out(kQHeads * kDim);
  const chunk_id ids[1] = {id.value()};
  attend_item wrong_count{1, std::span<const chunk_id>(ids), 40, q.data(), out.data(), nullptr};
  CHECK(h.b->attend(0, test_support::batch_of({&wrong_count, 1}, h.cfg.layout().tokens(), kQHeads, kDim)).code() ==
        errc::kInvalidArgument);
  attend_item null_q{1, std::span<const chunk_id>(ids), 16, nullptr, out.data(), nullptr};
  CHECK(h.b->attend(0, test_support::batch_of({&null_q, 1}, h.cfg.layout().tokens(), kQHeads, kDim)).code() ==
        errc::kInvalidArgument);
  attend_item ok_item{1, std::span<const chunk_id>(ids), 16, q.data(), out.data(), nullptr};
  CHECK(h.b->attend(kLayers, test_support::batch_of({&ok_item, 1}, h.cfg.layout().tokens(), kQHeads, kDim)).code() ==
        errc::kLayerOutOfRange);
  CHECK(h.b->attend(0, test_support::batch_of({&ok_item, 1}, h.cfg.layout().tokens(), kQHeads, kDim)).ok());
  h.b->release_chunk(id.value());
  CHECK(h.b->attend(0, test_support::batch_of({&ok_item, 1}, h.cfg.layout().tokens(), kQHeads, kDim)).code() ==
        errc::kInvalidArgument);
  h.b->release_chunk(id.value());  // double release is ignored
}

TEST_CASE("engine options through the URI: sqpoll, iopoll fallback, no registration, another thread") {
  for (const char* opts : {"sqpoll=1", "iopoll=1", "register=0&single_issuer=0", "queue_depth=1&staging=64K"}) {
    CAPTURE(opts);
    harness h(uri_for("opts.bin", opts));
    MESSAGE(h.b->describe());
    REQUIRE(h.append(1, 0, 300).ok());
    REQUIRE(h.b->flush().ok());
    REQUIRE(h.attend_and_check(0, {1}, 2e-6, true).ok());
    std::thread t([&] { CHECK(h.attend_and_check(0, {1}).ok()); });
    t.join();
    REQUIRE(h.attend_and_check(0, {1}).ok());
  }
}

TEST_CASE("single issuer: another thread is refused while this thread's prefetch is in flight") {
  harness h(uri_for("threads.bin", "staging=128K&request=32K&queue_depth=4"));
  REQUIRE(h.append(1, 0, 400).ok());
  REQUIRE(h.b->flush().ok());
  auto& t = h.tables[{1, 0}];
  std::vector<float> q(kQHeads * kDim, 0.3f), out(kQHeads * kDim);
  attend_item item{1, t.chunks, t.n, q.data(), out.data(), nullptr};
  h.b->prefetch(0, test_support::batch_of({&item, 1}, h.cfg.layout().tokens(), kQHeads, kDim));
  std::thread other([&] {
    CHECK(h.b->attend(0, test_support::batch_of({&item, 1}, h.cfg.layout().tokens(), kQHeads, kDim)).code() ==
          errc::kBusy);
    CHECK(h.b->flush().code() == errc::kBusy);
  });
  other.join();
  REQUIRE(h.attend_and_check(0, {1}).ok());  // the owner goes on; the ring is idle again
  std::thread later([&] { CHECK(h.attend_and_check(0, {1}).ok()); });
  later.join();
}

int main(int argc, char** argv) {
  return ssd_test::run_tests(argc, argv);
}
