// The csd: backend against real instinfer-csd processes: decode through the drives matches the host
// backend and the float64 reference (1 and several drives, page/block crossings, fork, truncation,
// reclaim and reuse), link bytes per decode step are context-independent, a killed or stopped drive
// gives an error in bounded time, and attached drives keep namespaces apart.
#include <doctest/doctest.h>

#include <limits.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "csd_test_util.hpp"
#include "instinfer/backend/csd_backend.hpp"
#include "instinfer/backend/host_backend.hpp"
#include "instinfer/csd/client.hpp"
#include "instinfer/csd/protocol.hpp"
#include "instinfer/kv/kv_cache.hpp"

using namespace instinfer;
using csd_test::kv_model;

extern char** environ;

namespace {

// Small flash so block boundaries are crossed often: 4 channels x 2 dies x 16 blocks x 6 pages.
const char* kSmallFlash = "channels=4&dies=2&blocks_per_die=64&pages_per_block=6&cores=3";

bool drive_available() {
  if (!csd_backend::available()) {
    MESSAGE("instinfer-csd not found: skipping");
    return false;
  }
  return true;
}

std::unique_ptr<kv_cache> make_cache(const kv_shape& shape, const std::string& uri, uint64_t capacity_chunks = 4096) {
  cache_options o;
  o.shape = shape;
  o.page_bytes = 4096;
  o.capacity_bytes = capacity_chunks * 2ull * shape.n_kv_heads * 4096;
  o.n_threads = 2;
  o.backend_uri = uri;
  auto c = kv_cache::create(o);
  REQUIRE_MESSAGE(c.ok(), uri << ": " << c.error().to_string());
  return std::move(c).value();
}

csd_backend& csd_of(kv_cache& c) {
  return dynamic_cast<csd_backend&>(c.storage());
}

// Append the same random tokens to a sequence of both caches and the model.
void append_both(kv_cache& a, kv_cache& b, seq_id sa, seq_id sb, uint32_t layer, uint32_t n, kv_model& m,
                 std::mt19937& rng) {
  const kv_shape& s = a.shape();
  const auto k = csd_test::random_rows(rng, n, s.n_kv_heads, s.head_dim, s.kv_dtype);
  const auto v = csd_test::random_rows(rng, n, s.n_kv_heads, s.head_dim, s.kv_dtype);
  status st = a.append(sa, layer, n, k.data(), v.data(), s.kv_dtype);
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  st = b.append(sb, layer, n, k.data(), v.data(), s.kv_dtype);
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  m.append(k.data(), v.data(), n);
}

// Attend both caches on fresh queries; compare with each other and with the reference.
void compare(kv_cache& csd, kv_cache& host, const std::vector<seq_id>& cs, const std::vector<seq_id>& hs,
             uint32_t layer, const std::vector<const kv_model*>& models, std::mt19937& rng) {
  const kv_shape& s = csd.shape();
  const uint64_t per = uint64_t{s.n_q_heads} * s.head_dim;
  const auto q = csd_test::random_q(rng, cs.size() * per);
  std::vector<float> o1(cs.size() * per), o2(cs.size() * per), l1(cs.size() * s.n_q_heads), l2(l1.size());
  status st = csd.attend(layer, cs, q.data(), o1.data(), l1.data());
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  st = host.attend(layer, hs, q.data(), o2.data(), l2.data());
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  for (size_t i = 0; i < cs.size(); ++i) {
    std::vector<double> want, want_lse;
    models[i]->attend(q.data() + i * per, s.group_size(), models[i]->n_tokens(), 1.0 / std::sqrt(double(s.head_dim)),
                      want, want_lse);
    std::vector<double> host_d(o2.begin() + static_cast<ptrdiff_t>(i * per),
                               o2.begin() + static_cast<ptrdiff_t>((i + 1) * per));
    const std::span<const float> got(o1.data() + i * per, per);
    CHECK_MESSAGE(reference::relative_error(got, want) < 1e-5, "vs reference, item " << i);
    CHECK_MESSAGE(reference::relative_error(got, host_d) < 1e-5, "vs host backend, item " << i);
    CHECK(csd_test::lse_error(std::span<const float>(l1.data() + i * s.n_q_heads, s.n_q_heads), want_lse) < 1e-5);
  }
}

void decode_matches_host(const std::string& uri, const kv_shape& shape) {
  auto csd = make_cache(shape, uri);
  auto host = make_cache(shape, "host:?hugepages=0");
  const uint32_t tpp = csd->page().tokens_per_page;
  std::mt19937 rng(2024);
  std::vector<seq_id> cs, hs;
  std::vector<kv_model> models(3, kv_model{shape.n_kv_heads, shape.head_dim, shape.kv_dtype, {}, {}});
  const uint32_t lens[3] = {3, 4 * tpp + 1, 11 * tpp - 2};
  for (int i = 0; i < 3; ++i) {
    cs.push_back(csd->create_sequence().value());
    hs.push_back(host->create_sequence().value());
    append_both(*csd, *host, cs[i], hs[i], 1, lens[i], models[i], rng);  // prefill
  }
  compare(*csd, *host, cs, hs, 1, {&models[0], &models[1], &models[2]}, rng);
  // Decode steps crossing a page boundary for every sequence.
  for (uint32_t step = 0; step < tpp + 2; ++step)
    for (int i = 0; i < 3; ++i) append_both(*csd, *host, cs[i], hs[i], 1, 1, models[i], rng);
  compare(*csd, *host, cs, hs, 1, {&models[0], &models[1], &models[2]}, rng);

  SUBCASE("fork and truncation re-map the drive's page tables") {
    auto fc = csd->fork_sequence(cs[2]);
    auto fh = host->fork_sequence(hs[2]);
    REQUIRE(fc.ok());
    REQUIRE(fh.ok());
    kv_model fm = models[2];
    append_both(*csd, *host, *fc, *fh, 1, 5, fm, rng);
    REQUIRE(csd->remove_range(cs[1], 2 * tpp + 3, UINT64_MAX).ok());
    REQUIRE(host->remove_range(hs[1], 2 * tpp + 3, UINT64_MAX).ok());
    models[1].truncate(2 * tpp + 3);
    append_both(*csd, *host, cs[1], hs[1], 1, tpp, models[1], rng);
    compare(*csd, *host, {cs[2], *fc, cs[1]}, {hs[2], *fh, hs[1]}, 1, {&models[2], &fm, &models[1]}, rng);
  }
  SUBCASE("freed chunks are reclaimed and reused") {
    auto valid_pages = [&] {
      uint64_t v = 0;
      for (uint32_t d = 0; d < csd_of(*csd).n_drives(); ++d) {
        csd::device_stats ds{};
        REQUIRE(csd_of(*csd).drive_stats(d, ds).ok());
        v += ds.valid_pages;
      }
      return v;
    };
    const backend_stats before = csd->stats().backend;
    const uint64_t valid_before = valid_pages();
    REQUIRE(csd->free_sequence(cs[2]).ok());
    REQUIRE(host->free_sequence(hs[2]).ok());
    REQUIRE(csd_of(*csd).reclaim().ok());
    const backend_stats mid = csd->stats().backend;
    CHECK(mid.used_chunks < before.used_chunks);
    CHECK(valid_pages() < valid_before);  // invalidated; blocks shared with live sequences stay
    const seq_id nc = csd->create_sequence().value();
    const seq_id nh = host->create_sequence().value();
    kv_model nm{shape.n_kv_heads, shape.head_dim, shape.kv_dtype, {}, {}};
    append_both(*csd, *host, nc, nh, 1, 12 * tpp + 7, nm, rng);
    compare(*csd, *host, {nc, cs[0], cs[1]}, {nh, hs[0], hs[1]}, 1, {&nm, &models[0], &models[1]}, rng);
    // Free everything: every programmed block is dead and erased whole, nothing was copied.
    for (seq_id s : {nc, cs[0], cs[1]}) REQUIRE(csd->free_sequence(s).ok());
    REQUIRE(csd_of(*csd).reclaim().ok());
    const backend_stats end = csd->stats().backend;
    CHECK(valid_pages() == 0);
    CHECK(end.flash_pages_erased > before.flash_pages_erased);
    CHECK(end.used_chunks == 0);
  }
}

}  // namespace

TEST_CASE("csd decode matches the host backend and the reference (1 drive)") {
  if (!drive_available()) return;
  decode_matches_host(std::string("csd:?") + kSmallFlash, kv_shape{2, 8, 4, 64, dtype::kF16});
}

TEST_CASE("csd decode matches the host backend and the reference (3 drives, GQA)") {
  if (!drive_available()) return;
  decode_matches_host(std::string("csd:?drives=3&") + kSmallFlash, kv_shape{2, 12, 6, 128, dtype::kBF16});
}

TEST_CASE("csd decode with file-backed flash (io_uring)") {
  if (!drive_available()) return;
  char tmpl[] = "/tmp/instinfer-csd-test-XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  const std::string path = std::string(tmpl) + "/flash.img";
  decode_matches_host("csd:" + path + "?buffered=1&drives=2&" + kSmallFlash, kv_shape{2, 4, 2, 64, dtype::kF32});
  std::remove(path.c_str());
  std::remove((path + ".0").c_str());
  std::remove((path + ".1").c_str());
  rmdir(tmpl);
}

// Causal chunk attention inside the drives (attend-chunk): the same rows as the host backend and
// the float64 reference, for several sequences at positions not at 0, a fork, and a chunk whose
// rows do not fit one command (data_mb=1: split over commands); only q rows and out rows cross
// the link; bad rows are refused.
TEST_CASE("csd chunk attention matches the host backend and the reference (2 drives, fork, split rows)") {
  if (!drive_available()) return;
  const kv_shape shape{2, 8, 4, 64, dtype::kF16};
  auto csd = make_cache(shape, std::string("csd:?drives=2&data_mb=1&") + kSmallFlash);
  auto host = make_cache(shape, "host:?hugepages=0");
  REQUIRE(csd->supports_attend_chunk());
  const uint32_t tpp = csd->page().tokens_per_page;
  std::mt19937 rng(77);
  const uint32_t prefix[3] = {0, tpp + 3, 5 * tpp - 1};
  const uint32_t rows[4] = {7, 2 * tpp + 5, 600, 9};  // 600 rows: ~1.2 MB of q + out per drive
  std::vector<seq_id> cs, hs;
  std::vector<kv_model> models(3, kv_model{shape.n_kv_heads, shape.head_dim, shape.kv_dtype, {}, {}});
  for (int i = 0; i < 3; ++i) {
    cs.push_back(csd->create_sequence().value());
    hs.push_back(host->create_sequence().value());
    if (prefix[i]) append_both(*csd, *host, cs[i], hs[i], 1, prefix[i], models[i], rng);
  }
  // A fork of sequence 2 after its prefix: its chunk shares the sealed chunks.
  cs.push_back(csd->fork_sequence(cs[2]).value());
  hs.push_back(host->fork_sequence(hs[2]).value());
  models.push_back(models[2]);
  std::vector<uint32_t> pos, n_rows;
  for (size_t i = 0; i < cs.size(); ++i) {
    pos.push_back(static_cast<uint32_t>(models[i].n_tokens()));
    n_rows.push_back(rows[i]);
    append_both(*csd, *host, cs[i], hs[i], 1, rows[i], models[i], rng);  // the chunk's own K/V first
  }
  uint64_t total = 0;
  for (uint32_t n : n_rows) total += n;
  const uint64_t per = uint64_t{shape.n_q_heads} * shape.head_dim;
  const auto q = csd_test::random_q(rng, total * per);
  std::vector<float> o1(total * per, 1e30f), o2(o1.size()), l1(total * shape.n_q_heads, 1e30f), l2(l1.size());
  const backend_stats before = csd->stats().backend;
  status st = csd->attend_chunk(1, cs, pos, n_rows, q.data(), o1.data(), l1.data());
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  const backend_stats after = csd->stats().backend;
  st = host->attend_chunk(1, hs, pos, n_rows, q.data(), o2.data(), l2.data());
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  const double scale = 1.0 / std::sqrt(double(shape.head_dim));
  uint64_t row = 0;
  double worst = 0.0;
  for (size_t i = 0; i < cs.size(); ++i) {
    CAPTURE(i);
    for (uint32_t r = 0; r < n_rows[i]; ++r, ++row) {
      std::vector<double> want, want_lse;
      models[i].attend(q.data() + row * per, shape.group_size(), pos[i] + r + 1, scale, want, want_lse);
      const std::span<const float> got(o1.data() + row * per, per);
      const std::vector<double> host_d(o2.begin() + static_cast<ptrdiff_t>(row * per),
                                       o2.begin() + static_cast<ptrdiff_t>((row + 1) * per));
      const double err = reference::relative_error(got, want);
      worst = std::max(worst, err);
      CHECK(err < 1e-5);
      CHECK(reference::relative_error(got, host_d) < 1e-5);
      CHECK(csd_test::lse_error(std::span<const float>(l1.data() + row * shape.n_q_heads, shape.n_q_heads), want_lse) <
            1e-5);
    }
  }
  MESSAGE("csd attend_chunk vs float64: worst relative error " << worst);
  // The link carries q rows in and out + lse rows back (plus entries), never the KV.
  const uint64_t q_bytes = total * per * 4, back_bytes = total * (per + shape.n_q_heads) * 4;
  const uint64_t in = after.link_bytes_host_to_device - before.link_bytes_host_to_device;
  const uint64_t out = after.link_bytes_device_to_host - before.link_bytes_device_to_host;
  CHECK(in >= q_bytes);
  CHECK(in < q_bytes + 64 * 1024);  // command and map entries, one attend_chunk_entry per piece
  CHECK(out >= back_bytes);
  CHECK(out < back_bytes + 4096);

  // Bad rows: past the tokens, through the cache and straight at the backend.
  const uint32_t bad_pos = pos[0] + 1;
  CHECK(csd->attend_chunk(1, {&cs[0], 1}, {&bad_pos, 1}, {&n_rows[0], 1}, q.data(), o1.data(), nullptr).code() ==
        errc::kInvalidArgument);
  attend_batch_builder b;
  b.clear(tpp);
  const std::vector<chunk_id> none;
  b.add(cs[0], none, 0);
  attend_batch batch = b.view(q.data(), o1.data(), nullptr, shape.n_q_heads, shape.head_dim);
  const uint32_t indptr[2] = {0, 3}, first[1] = {0};
  batch.row_indptr = indptr;
  batch.row_pos = first;
  CHECK(csd_of(*csd).attend_causal(1, batch).code() == errc::kInvalidArgument);  // 3 rows over 0 tokens
}

TEST_CASE("link bytes per decode step are q + k + v + out + fixed overhead, at 1k and 64k context") {
  if (!drive_available()) return;
  const kv_shape shape{1, 4, 2, 64, dtype::kF16};
  auto c = make_cache(shape, "csd:?blocks_per_die=8", 16384);
  std::mt19937 rng(11);
  const uint64_t per_token_kv = shape.token_bytes_per_layer();  // k + v
  const uint64_t q_bytes = uint64_t{shape.n_q_heads} * shape.head_dim * 4;
  const uint64_t out_bytes = q_bytes + uint64_t{shape.n_q_heads} * 4;  // output + lse
  // Fixed: two commands (write, attend) of 64 + 16 bytes, the chunk id of the write, one attend entry.
  const uint64_t fixed_in = 2 * sizeof(csd::sq_entry) + 4 + sizeof(csd::attend_entry);
  const uint64_t fixed_out = 2 * sizeof(csd::cq_entry);
  const seq_id s = c->create_sequence().value();
  uint64_t have = 0;
  std::vector<uint64_t> pages_read;
  for (uint64_t ctx : {1024ull, 65536ull}) {
    const uint64_t n = ctx - have;
    const auto k = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
    const auto v = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
    REQUIRE(c->append(s, 0, static_cast<uint32_t>(n), k.data(), v.data(), dtype::kF16).ok());
    have = ctx;
    const auto q = csd_test::random_q(rng, shape.n_q_heads * shape.head_dim);
    std::vector<float> out(q.size()), lse(shape.n_q_heads);
    REQUIRE(c->attend(0, std::vector<seq_id>{s}, q.data(), out.data(), lse.data()).ok());  // syncs tables
    const backend_stats b0 = c->stats().backend;
    // One decode step of one layer: append one token, attend.
    const auto k1 = csd_test::random_rows(rng, 1, 2, 64, dtype::kF16);
    const auto v1 = csd_test::random_rows(rng, 1, 2, 64, dtype::kF16);
    REQUIRE(c->append(s, 0, 1, k1.data(), v1.data(), dtype::kF16).ok());
    ++have;
    REQUIRE(c->attend(0, std::vector<seq_id>{s}, q.data(), out.data(), lse.data()).ok());
    const backend_stats b1 = c->stats().backend;
    const uint64_t in = b1.link_bytes_host_to_device - b0.link_bytes_host_to_device;
    const uint64_t back = b1.link_bytes_device_to_host - b0.link_bytes_device_to_host;
    MESSAGE("ctx " << have << ": link bytes in " << in << " out " << back << ", flash pages read "
                   << b1.flash_pages_read - b0.flash_pages_read << ", modelled "
                   << (b1.modelled_device_seconds - b0.modelled_device_seconds) * 1e6 << " us");
    CHECK(in == q_bytes + per_token_kv + fixed_in);
    CHECK(back == out_bytes + fixed_out);
    pages_read.push_back(b1.flash_pages_read - b0.flash_pages_read);
  }
  REQUIRE(pages_read.size() == 2);
  CHECK(pages_read[1] > 32 * pages_read[0]);  // 64x the context: about 64x the pages
}

TEST_CASE("killing the drive during attend returns kDeviceLost in bounded time; other caches keep working") {
  if (!drive_available()) return;
  const kv_shape shape{1, 2, 2, 64, dtype::kF16};
  auto victim = make_cache(shape, "csd:?debug_attend_delay_ms=30000&timeout_ms=60000&blocks_per_die=4", 256);
  auto other = make_cache(shape, "csd:?blocks_per_die=4", 256);
  auto host = make_cache(shape, "host:?hugepages=0", 256);
  std::mt19937 rng(8);
  const seq_id a = victim->create_sequence().value();
  const seq_id b = other->create_sequence().value();
  const seq_id h = host->create_sequence().value();
  kv_model m{2, 64, dtype::kF16, {}, {}};
  kv_model unused = m;
  append_both(*victim, *victim, a, victim->create_sequence().value(), 0, 40, unused, rng);
  append_both(*other, *host, b, h, 0, 40, m, rng);
  const int pid = csd_of(*victim).device_pid(0);
  REQUIRE(pid > 0);
  std::thread killer([pid] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ::kill(pid, SIGKILL);
  });
  const auto q = csd_test::random_q(rng, 2 * 64);
  std::vector<float> out(q.size()), lse(2);
  const auto t0 = std::chrono::steady_clock::now();
  const status s = victim->attend(0, std::vector<seq_id>{a}, q.data(), out.data(), lse.data());
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  killer.join();
  CHECK(s.code() == errc::kDeviceLost);
  CHECK(secs < 5.0);
  MESSAGE("attend on a killed drive returned '" << s.to_string() << "' after " << secs << " s");
  // The dead backend fails fast from now on.
  CHECK(victim->append(a, 0, 1, q.data(), q.data(), dtype::kF32).code() == errc::kDeviceLost);
  // Another csd cache and a host cache in this process are unaffected.
  compare(*other, *host, {b}, {h}, 0, {&m}, rng);
}

TEST_CASE("a stopped drive times out instead of hanging") {
  if (!drive_available()) return;
  const kv_shape shape{1, 2, 2, 64, dtype::kF16};
  auto c = make_cache(shape, "csd:?timeout_ms=400&blocks_per_die=4", 64);
  const int pid = csd_of(*c).device_pid(0);
  REQUIRE(::kill(pid, SIGSTOP) == 0);
  const auto t0 = std::chrono::steady_clock::now();
  const seq_id s = c->create_sequence().value();
  std::mt19937 rng(1);
  const auto k = csd_test::random_rows(rng, 1, 2, 64, dtype::kF16);
  const status st = c->append(s, 0, 1, k.data(), k.data(), dtype::kF16);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(st.code() == errc::kTimeout);
  CHECK(secs < 2.0);
  ::kill(pid, SIGCONT);  // the connection already killed it; harmless
}

TEST_CASE("flush after the drive is lost returns kDeviceLost, as every other call (issue 17.5)") {
  if (!drive_available()) return;
  const kv_shape shape{1, 2, 2, 64, dtype::kF16};
  auto c = make_cache(shape, "csd:?blocks_per_die=4", 64);
  const seq_id s = c->create_sequence().value();
  std::mt19937 rng(5);
  const auto k = csd_test::random_rows(rng, 3, 2, 64, dtype::kF16);
  REQUIRE(c->append(s, 0, 3, k.data(), k.data(), dtype::kF16).ok());
  CHECK(c->flush().ok());
  const int pid = csd_of(*c).device_pid(0);
  REQUIRE(pid > 0);
  REQUIRE(::kill(pid, SIGKILL) == 0);
  // Wait until it is a zombie (our child, not reaped yet): dead for sure before flush runs.
  for (int i = 0; i < 2000; ++i) {
    std::FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
    char state = 0;
    if (f) {
      (void)std::fscanf(f, "%*d (%*[^)]) %c", &state);
      std::fclose(f);
    }
    if (state == 'Z' || !f) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const status st = c->flush();
  CHECK_MESSAGE(st.code() == errc::kDeviceLost, st.to_string());
  CHECK(c->flush().code() == errc::kDeviceLost);  // and stays so
  CHECK(c->append(s, 0, 1, k.data(), k.data(), dtype::kF16).code() == errc::kDeviceLost);
}

TEST_CASE("a drive that never becomes ready fails after timeout_ms, naming the binary (issue 17.3)") {
  if (!drive_available()) return;
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = std::string(tmp && *tmp ? tmp : "/tmp") + "/instinfer-csd-test-XXXXXX";
  REQUIRE(::mkdtemp(dir.data()) != nullptr);
  const std::string script = dir + "/never-ready-drive";
  {
    std::FILE* f = std::fopen(script.c_str(), "w");
    REQUIRE(f != nullptr);
    std::fputs("#!/bin/sh\nexec sleep 30\n", f);
    std::fclose(f);
    REQUIRE(::chmod(script.c_str(), 0755) == 0);
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto b = make_backend("csd:?device=" + script + "&timeout_ms=500");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE_FALSE(b.ok());
  MESSAGE("never-ready drive: '" << b.error().to_string() << "' after " << secs << " s");
  CHECK(b.error().code() == errc::kTimeout);
  CHECK(b.error().message().find(script) != std::string::npos);
  CHECK(b.error().message().find("500 ms") != std::string::npos);
  CHECK(secs >= 0.45);
  CHECK(secs < 3.0);
  ::unlink(script.c_str());
  ::rmdir(dir.c_str());
}

TEST_CASE(
    "drive binary lookup: the library's folder, libexec, the executable's; a miss lists what was tried "
    "(issue 17.4)") {
  if (!drive_available()) return;
  const char* env = std::getenv("INSTINFER_CSD_DEVICE");
  const std::string saved = env ? env : "";
  ::unsetenv("INSTINFER_CSD_DEVICE");
  const std::vector<std::string> all = csd::device_binary_candidates(csd::connection_options{});
  char exe[PATH_MAX];
  REQUIRE(::realpath("/proc/self/exe", exe) != nullptr);
  const std::string exe_dir = std::string(exe).substr(0, std::string(exe).rfind('/'));
  std::string listed;
  for (const auto& p : all) listed += p + "\n";
  INFO("candidates:\n", listed);
  const auto has = [&](const std::string& p) { return std::find(all.begin(), all.end(), p) != all.end(); };
  CHECK(has(exe_dir + "/instinfer-csd"));  // this test links the library code statically
  CHECK(std::any_of(all.begin(), all.end(), [](const std::string& p) {
    return p.size() > 22 && p.compare(p.size() - 22, 22, "/libexec/instinfer-csd") == 0;
  }));
  for (size_t i = 0; i < all.size(); ++i)
    for (size_t j = i + 1; j < all.size(); ++j) CHECK(all[i] != all[j]);

  // An override is the only path tried, and a miss names it.
  csd::connection_options o;
  o.device_path = "/nonexistent/dir/instinfer-csd";
  CHECK(csd::device_binary_candidates(o) == std::vector<std::string>{o.device_path});
  auto r = csd::connection::open(o);
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().code() == errc::kUnsupported);
  CHECK(r.error().message().find("tried: /nonexistent/dir/instinfer-csd") != std::string::npos);

  ::setenv("INSTINFER_CSD_DEVICE", "/nonexistent/env/instinfer-csd", 1);
  CHECK(csd::device_binary_candidates(csd::connection_options{}) ==
        std::vector<std::string>{"/nonexistent/env/instinfer-csd"});
  CHECK(csd::find_device_binary(csd::connection_options{}).empty());
  auto e = csd::connection::open(csd::connection_options{});
  REQUIRE_FALSE(e.ok());
  CHECK(e.error().message().find("/nonexistent/env/instinfer-csd") != std::string::npos);
  if (env)
    ::setenv("INSTINFER_CSD_DEVICE", saved.c_str(), 1);
  else
    ::unsetenv("INSTINFER_CSD_DEVICE");
}

TEST_CASE("attached drive: two clients get separate namespaces; foreign pages are rejected") {
  if (!drive_available()) return;
  const std::string bin = csd::find_device_binary(csd::connection_options{});
  REQUIRE(!bin.empty());
  const std::string name = "test-" + std::to_string(::getpid());
  std::vector<std::string> args = {bin, "--name", name, "--queue-pairs", "2", "--blocks-per-die", "4", "--cores", "2"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  REQUIRE(posix_spawn(&pid, bin.c_str(), nullptr, nullptr, argv.data(), environ) == 0);
  struct reaper {
    pid_t pid;
    ~reaper() {
      ::kill(pid, SIGTERM);
      ::waitpid(pid, nullptr, 0);
    }
  } guard{pid};
  const kv_shape shape{1, 2, 2, 64, dtype::kF16};
  std::unique_ptr<kv_cache> a, b;
  for (int i = 0; i < 500 && !a; ++i) {  // wait for the drive to publish its shared memory
    cache_options o;
    o.shape = shape;
    o.page_bytes = 4096;
    o.capacity_bytes = 64 * 4 * 4096;
    o.backend_uri = "csd:?attach=" + name;
    auto c = kv_cache::create(o);
    if (c.ok())
      a = std::move(c).value();
    else
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  REQUIRE(a);
  b = make_cache(shape, "csd:?attach=" + name, 64);
  // A third client finds no free queue pair.
  cache_options o3;
  o3.shape = shape;
  o3.page_bytes = 4096;
  o3.backend_uri = "csd:?attach=" + name;
  CHECK(kv_cache::create(o3).error().code() == errc::kBusy);
  auto host = make_cache(shape, "host:?hugepages=0", 64);
  std::mt19937 rng(4);
  kv_model ma{2, 64, dtype::kF16, {}, {}}, mb = ma;
  const seq_id sa = a->create_sequence().value(), sb = b->create_sequence().value();
  const seq_id ha = host->create_sequence().value(), hb = host->create_sequence().value();
  append_both(*a, *host, sa, ha, 0, 70, ma, rng);
  append_both(*b, *host, sb, hb, 0, 33, mb, rng);
  compare(*a, *host, {sa}, {ha}, 0, {&ma}, rng);
  compare(*b, *host, {sb}, {hb}, 0, {&mb}, rng);

  // A raw client cannot claim a queue pair (both in use) ... free b, then speak the protocol raw.
  b.reset();
  csd::connection_options co;
  co.attach = name;
  auto raw = csd::connection::open(co);
  REQUIRE_MESSAGE(raw.ok(), raw.error().to_string());
  csd::connection& r = **raw;
  // Namespace 1 is client a's: commands naming it from this queue pair are rejected.
  csd::sq_entry e{};
  e.opcode = static_cast<uint8_t>(csd::opcode::kReclaim);
  e.nsid = 1;
  csd::reclaim_args ra{};
  ra.mode = static_cast<uint8_t>(csd::reclaim_mode::kSequence);
  ra.seq = sa;
  csd::set_args(e, ra);
  status st = r.execute(e);
  CHECK(st.code() == errc::kInvalidArgument);
  CHECK(st.message().find("another queue pair") != std::string::npos);
  // Malformed: garbage opcode, data range outside the area.
  e = csd::sq_entry{};
  e.opcode = 0xee;
  CHECK(r.execute(e).code() == errc::kInvalidArgument);
  e.opcode = static_cast<uint8_t>(csd::opcode::kStats);
  e.result_offset = r.area_bytes();
  e.result_bytes = 4096;
  CHECK(r.execute(e).code() == errc::kInvalidArgument);
  // Client a still works.
  compare(*a, *host, {sa}, {ha}, 0, {&ma}, rng);
}

TEST_CASE("csd drive identifies itself") {
  if (!drive_available()) return;
  auto c = csd::connection::open(csd::connection_options{});
  REQUIRE_MESSAGE(c.ok(), c.error().to_string());
  const csd::identify_data& id = (*c)->identity();
  CHECK(id.version == csd::kProtocolVersion);
  CHECK(id.channels == 8);
  CHECK(id.page_bytes == 4096);
  CHECK(id.n_cores == 4);
  const std::string arch(id.arch, strnlen(id.arch, sizeof id.arch));
  MESSAGE("drive architecture: " << arch << ", kernel isa " << int(id.isa));
  if (const char* want = std::getenv("INSTINFER_CSD_EXPECT_ARCH")) CHECK(arch == want);
  CHECK((*c)->started());
}

TEST_CASE("csd URI errors") {
  if (!drive_available()) return;
  for (const char* uri : {"csd:?bogus=1", "csd:?drives=0", "csd:?channels=0", "csd:?page=3000", "csd:?link_gbps=-1",
                          "csd:?drives=2&attach=x", "csd:?timeout_ms=abc"}) {
    auto b = make_backend(uri);
    CHECK_MESSAGE(!b.ok(), uri);
    if (!b.ok()) CHECK(b.error().code() == errc::kInvalidArgument);
  }
  // More drives than kv heads.
  cache_options o;
  o.shape = kv_shape{1, 2, 2, 64, dtype::kF16};
  o.page_bytes = 4096;
  o.backend_uri = "csd:?drives=3&blocks_per_die=2";
  auto c = kv_cache::create(o);
  CHECK(c.error().code() == errc::kInvalidArgument);
  // A page size the drive does not have.
  o.backend_uri = "csd:?blocks_per_die=2";
  o.page_bytes = 16384;
  CHECK(kv_cache::create(o).error().code() == errc::kInvalidArgument);
  // A device binary that does not exist.
  CHECK(make_backend("csd:?device=/nonexistent/instinfer-csd").error().code() == errc::kUnsupported);
}
