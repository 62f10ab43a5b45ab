// SparF inside the emulated drive: the drive keeps the channel-indexed K copy under its own L2P
// table, and an attend-sparse command reads only the chosen column pages and the token pages
// holding selected tokens. Checked against the host backend on the same values, with the drive's
// own flash counters (not the algorithm's) for the page saving, across drives, forks, truncation
// and reclaim. Without the drive binary the whole binary is skipped (exit 77, test_main.cpp).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "instinfer/attention/sparf/page_summary.hpp"
#include "instinfer/backend/csd_backend.hpp"
#include "instinfer/csd/protocol.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "sparf/sparf_test_util.hpp"
#include "support/kv_test_util.hpp"

using namespace instinfer;

namespace {

// Host and drive SparF: the same selection over the same stored values, but the exact pass sums in
// another order on each side (the host gathers rows into 64-token kernel blocks, the drive attends
// its own pages, with NEON when it is the aarch64 build), so the kernels' own bound against
// float64 applies. A different selection would differ by the SparF error itself (~0.4).
constexpr double kHostDriveTol = 1e-5;
constexpr const char* kFlash = "csd:?channels=4&dies=2&blocks_per_die=256&pages_per_block=16&cores=2";

std::unique_ptr<kv_cache> make(const std::string& uri, const kv_shape& shape, bool sparf = true) {
  cache_options o = test_support::sparf_cache_options(shape, uri, 48ull << 20);
  o.sparf = sparf;
  auto c = kv_cache::create(o);
  REQUIRE_MESSAGE(c.ok(), c.error().message());
  return std::move(c).value();
}

csd::device_stats drive_stats(kv_cache& c, uint32_t drive = 0) {
  csd::device_stats s{};
  REQUIRE(dynamic_cast<csd_backend&>(c.storage()).drive_stats(drive, s).ok());
  return s;
}

const auto rel = sparf_test::max_rel_diff;

using test_support::workload;

}  // namespace

TEST_CASE("csd runs SparF in the drive: same output as the host, <= 1/4 of the dense flash pages") {
  const kv_shape shape{1, 8, 2, 128, dtype::kF16};
  const uint32_t n = 8192;
  const auto work = workload(shape, n, 7);
  const size_t nq = size_t{shape.n_q_heads} * shape.head_dim;
  auto host = make("host", shape);
  auto csd = make(kFlash, shape);
  CHECK(csd->storage().runs_sparf());
  CHECK_FALSE(host->storage().runs_sparf());
  seq_id hs = host->create_sequence().value(), cs = csd->create_sequence().value();
  // Prefill in pieces that do not line up with column blocks (512 tokens), then decode appends.
  const size_t row = size_t{shape.n_kv_heads} * shape.head_dim;
  for (uint32_t at = 0; at < n;) {
    const uint32_t m = at < 7000 ? 700 : 1;
    REQUIRE(host->append(hs, 0, m, work.k.data() + at * row, work.v.data() + at * row, dtype::kF32).ok());
    REQUIRE(csd->append(cs, 0, m, work.k.data() + at * row, work.v.data() + at * row, dtype::kF32).ok());
    at += m;
    if (at >= 8000) break;
  }
  const csd::device_stats written = drive_stats(*csd);
  // 8000 tokens: 15 column blocks of 512 tokens programmed, 2 heads x 32 column pages each.
  CHECK(written.column_blocks == 15);
  CHECK(written.column_pages_programmed == 15 * 2 * 32);
  CHECK(written.column_rebuild_pages_read == 0);

  std::vector<float> dense(nq), h_sparse(nq), c_sparse(nq), h_lse(shape.n_q_heads), c_lse(shape.n_q_heads);
  const auto seqs_h = std::span<const seq_id>(&hs, 1), seqs_c = std::span<const seq_id>(&cs, 1);
  REQUIRE(csd->attend(0, seqs_c, work.q.data(), dense.data(), nullptr).ok());
  const csd::device_stats after_dense = drive_stats(*csd);
  const uint64_t dense_flash = after_dense.flash_pages_read - written.flash_pages_read;
  // Plain SparF (no dense ends): the error bound below was measured so.
  sparf_params plain = sparf_params::with_compression(0.125);
  plain.sink_tokens = plain.window_tokens = 0;
  REQUIRE(csd->attend_sparse(0, seqs_c, work.q.data(), c_sparse.data(), c_lse.data(), plain).ok());
  const csd::device_stats after_sparse = drive_stats(*csd);
  const uint64_t sparse_flash = after_sparse.flash_pages_read - after_dense.flash_pages_read;
  REQUIRE(host->attend_sparse(0, seqs_h, work.q.data(), h_sparse.data(), h_lse.data(), plain).ok());
  MESSAGE("drive flash pages: dense " << dense_flash << ", SparF 1/8 " << sparse_flash << " ("
                                      << double(sparse_flash) / double(dense_flash) << "), column "
                                      << after_sparse.column_pages_read - after_dense.column_pages_read << ", token "
                                      << after_sparse.sparse_token_pages_read - after_dense.sparse_token_pages_read);
  CHECK(dense_flash > 0);
  CHECK(sparse_flash * 4 <= dense_flash);  // the bar: at most 1/4 of the dense flash pages
  CHECK(after_sparse.sparse_attends == 1);
  CHECK(after_sparse.sparse_token_pages_read > 0);
  CHECK(after_sparse.column_pages_read > 0);
  CHECK(rel(c_sparse, h_sparse) <= kHostDriveTol);
  CHECK(rel(c_lse, h_lse) <= kHostDriveTol);
  const double err = rel(c_sparse, dense);
  MESSAGE("SparF 1/8 vs dense relative error " << err);
  // Measured 0.419 (seeded inputs, identical on the host: same code, same values); bound: that
  // plus a margin of 0.05 for other ISAs' rounding.
  CHECK(err < 0.419 + 0.05);
  // The algorithm's counters come back from the drive: same as the host's.
  const cache_stats hst = host->stats(), cst = csd->stats();
  CHECK(cst.sparf.channel_pages_read == hst.sparf.channel_pages_read);
  CHECK(cst.sparf.token_pages_read == hst.sparf.token_pages_read);
  CHECK(cst.sparf.dense_pages == hst.sparf.dense_pages);
  // Nothing crossed the link but the parameters, one entry and q in (and out + lse + counters back);
  // the second entry is the stats command that read after_dense (counted after its reply).
  CHECK(after_sparse.link_bytes_host_to_device - after_dense.link_bytes_host_to_device ==
        2 * sizeof(csd::sq_entry) + csd::kSparfParamsBytes + sizeof(csd::attend_entry) + nq * 4);

  // Compression 1 is dense attention, in the drive too.
  REQUIRE(
      csd->attend_sparse(0, seqs_c, work.q.data(), c_sparse.data(), nullptr, sparf_params::with_compression(1.0)).ok());
  CHECK(rel(c_sparse, dense) <= 1e-5);

  // p on the host and in the drive: the outputs agree; what each read, host first.
  const auto on_both = [&](const sparf_params& p) {
    const cache_stats h0 = host->stats(), c0 = csd->stats();
    REQUIRE(host->attend_sparse(0, seqs_h, work.q.data(), h_sparse.data(), h_lse.data(), p).ok());
    REQUIRE(csd->attend_sparse(0, seqs_c, work.q.data(), c_sparse.data(), c_lse.data(), p).ok());
    CHECK(rel(c_sparse, h_sparse) <= kHostDriveTol);
    CHECK(rel(c_lse, h_lse) <= kHostDriveTol);
    return std::make_pair(host->stats().sparf.since(h0.sparf), csd->stats().sparf.since(c0.sparf));
  };
  // Sinks and a recent window go to the drive with the command (protocol 6): the drive keeps the
  // same tokens as the host, also when the ends are wider than k (1/8 of 8000: k = 500).
  for (const uint32_t ends : {0u, 16u, 512u}) {
    CAPTURE(ends);
    sparf_params p = sparf_params::with_compression(0.125);
    p.sink_tokens = ends;
    p.window_tokens = 4 * ends;
    const auto [hd, cd] = on_both(p);
    CHECK(cd.selected_tokens == hd.selected_tokens);
    CHECK(cd.token_pages_read == hd.token_pages_read);
    CHECK(cd.selected_tokens == uint64_t{shape.n_kv_heads} * std::max(500u, 5 * ends));
  }
  // The channel share goes with the command too (protocol 7): the drive splits the budget as the
  // host does (1/8 of 8000 tokens, head_dim 128: S = 0.25 gives k = 750, r = 8; S = 0.75 gives
  // k = 250, r = 24).
  for (const double share : {0.25, 0.75}) {
    CAPTURE(share);
    sparf_params p = sparf_params::with_compression(0.125);
    p.channel_share = share;
    const auto [hd, cd] = on_both(p);
    const uint64_t k = static_cast<uint64_t>(std::ceil((1.0 - share) * 0.125 * 8000));
    CHECK(hd.selected_tokens == uint64_t{shape.n_kv_heads} * k);
    CHECK(cd.selected_tokens == hd.selected_tokens);
    CHECK(cd.token_pages_read == hd.token_pages_read);
    CHECK(cd.channels_used == hd.channels_used);
    CHECK(cd.channel_pages_read == hd.channel_pages_read);
  }
}

namespace {

// Forks, truncation and reclaim on two drives for one KV dtype. For q8_0 / q4_0 a chunk holds 60 /
// 113 tokens (head_dim 64, 4 KiB pages), so column blocks (512 tokens) start and end inside chunks
// and neighbouring blocks share their boundary chunks.
void check_sparf_forks_truncation(dtype kv) {
  CAPTURE(dtype_name(kv));
  const kv_shape shape{2, 8, 4, 64, kv};  // 4 kv heads: 2 per drive
  const uint32_t n = 3000;
  const auto work = workload(shape, n, 11);
  const size_t nq = size_t{shape.n_q_heads} * shape.head_dim, row = size_t{shape.n_kv_heads} * shape.head_dim;
  auto host = make("host", shape);
  auto csd = make(std::string(kFlash) + "&drives=2", shape);
  seq_id hs = host->create_sequence().value(), cs = csd->create_sequence().value();
  REQUIRE(host->append(hs, 1, n, work.k.data(), work.v.data(), dtype::kF32).ok());
  REQUIRE(csd->append(cs, 1, n, work.k.data(), work.v.data(), dtype::kF32).ok());

  auto compare = [&](seq_id h, seq_id c, double compression) {
    std::vector<float> ho(nq), co(nq), hl(shape.n_q_heads), cl(shape.n_q_heads);
    REQUIRE(host->attend_sparse(1, std::span<const seq_id>(&h, 1), work.q.data(), ho.data(), hl.data(),
                                sparf_params::with_compression(compression))
                .ok());
    REQUIRE(csd->attend_sparse(1, std::span<const seq_id>(&c, 1), work.q.data(), co.data(), cl.data(),
                               sparf_params::with_compression(compression))
                .ok());
    CHECK(rel(co, ho) <= kHostDriveTol);
    CHECK(rel(cl, hl) <= kHostDriveTol);
  };
  compare(hs, cs, 0.125);
  compare(hs, cs, 0.5);

  // Fork: the child shares the full column blocks (no rebuild of them), its tail is rebuilt once.
  const seq_id hf = host->fork_sequence(hs).value(), cf = csd->fork_sequence(cs).value();
  const csd::device_stats before_fork = drive_stats(*csd);
  compare(hf, cf, 0.125);
  const csd::device_stats after_fork = drive_stats(*csd);
  CHECK(after_fork.column_blocks == before_fork.column_blocks);  // shared, not copied
  const uint64_t rebuilt = after_fork.column_rebuild_pages_read - before_fork.column_rebuild_pages_read;
  // The tail: 3000 - 5 * 512 = 440 tokens (28 chunks of f16, 27 on flash; one more when the tail
  // starts inside a chunk) x 2 heads x K and V at most.
  const uint32_t tpp = csd->layout().page.tokens_per_page;
  CHECK(rebuilt <= ((440 + tpp - 1) / tpp + 1) * 2 * 2);
  CHECK(rebuilt > 0);
  // Diverge: different tokens after the fork point on each side, through a column-block boundary.
  const uint32_t extra = 700;
  REQUIRE(host->append(hf, 1, extra, work.k.data(), work.v.data(), dtype::kF32).ok());
  REQUIRE(csd->append(cf, 1, extra, work.k.data(), work.v.data(), dtype::kF32).ok());
  REQUIRE(host->append(hs, 1, extra, work.k.data() + row * 5, work.v.data() + row * 5, dtype::kF32).ok());
  REQUIRE(csd->append(cs, 1, extra, work.k.data() + row * 5, work.v.data() + row * 5, dtype::kF32).ok());
  compare(hs, cs, 0.125);
  compare(hf, cf, 0.125);

  // Truncation (end and interior), then re-append: stale columns are rebuilt, never reused.
  REQUIRE(host->remove_range(hf, 1500, UINT64_MAX).ok());
  REQUIRE(csd->remove_range(cf, 1500, UINT64_MAX).ok());
  compare(hf, cf, 0.25);
  REQUIRE(host->append(hf, 1, 600, work.k.data() + row * 9, work.v.data() + row * 9, dtype::kF32).ok());
  REQUIRE(csd->append(cf, 1, 600, work.k.data() + row * 9, work.v.data() + row * 9, dtype::kF32).ok());
  REQUIRE(host->remove_range(hf, 100, 612).ok());
  REQUIRE(csd->remove_range(cf, 100, 612).ok());
  compare(hf, cf, 0.125);
  compare(hs, cs, 0.125);

  // Freeing everything releases the column pages too (after the drives reclaim).
  REQUIRE(host->free_sequence(hf).ok());
  REQUIRE(csd->free_sequence(cf).ok());
  REQUIRE(csd->free_sequence(cs).ok());
  REQUIRE(dynamic_cast<csd_backend&>(csd->storage()).reclaim().ok());
  for (uint32_t d = 0; d < 2; ++d) {
    const csd::device_stats s = drive_stats(*csd, d);
    CHECK(s.column_blocks == 0);
    CHECK(s.valid_pages == 0);
  }
}

}  // namespace

TEST_CASE("csd SparF across two drives, forks (shared column blocks), truncation and reclaim") {
  for (const dtype kv : {dtype::kF16, dtype::kQ8_0, dtype::kQ4_0}) check_sparf_forks_truncation(kv);
}

TEST_CASE("csd SparF: bad parameters and a cache without SparF") {
  const kv_shape shape{1, 4, 4, 64, dtype::kF16};
  const auto work = workload(shape, 600, 3);
  auto csd = make(kFlash, shape);
  seq_id s = csd->create_sequence().value();
  REQUIRE(csd->append(s, 0, 600, work.k.data(), work.v.data(), dtype::kF32).ok());
  std::vector<float> out(size_t{shape.n_q_heads} * shape.head_dim);
  const auto seqs = std::span<const seq_id>(&s, 1);
  CHECK(csd->attend_sparse(0, seqs, work.q.data(), out.data(), nullptr, sparf_params::with_compression(0.0)).code() ==
        errc::kInvalidArgument);
  CHECK(csd->attend_sparse(0, seqs, work.q.data(), out.data(), nullptr, sparf_params::with_rk(0, 4)).code() ==
        errc::kInvalidArgument);
  CHECK(csd->attend_sparse(0, seqs, work.q.data(), out.data(), nullptr, sparf_params::with_rk(8, 601)).code() ==
        errc::kInvalidArgument);
  seq_id unknown = 999;
  CHECK(csd->attend_sparse(0, std::span<const seq_id>(&unknown, 1), work.q.data(), out.data(), nullptr).code() ==
        errc::kUnknownSequence);
  // Selection reuse is the host's (sparf_params::reuse_min_cosine): the drive says so.
  sparf_params reuse = sparf_params::with_compression(0.125);
  reuse.reuse_min_cosine = 0.9f;
  const status refused = csd->attend_sparse(0, seqs, work.q.data(), out.data(), nullptr, reuse);
  CHECK(refused.code() == errc::kUnsupported);
  CHECK(refused.message().find("reuse") != std::string::npos);
  // The cache still works after the refusals.
  CHECK(csd->attend_sparse(0, seqs, work.q.data(), out.data(), nullptr).ok());

  // Without cache_options::sparf the drive keeps no column copy and refuses nothing else.
  auto plain = make(kFlash, shape, false);
  CHECK_FALSE(plain->storage().runs_sparf());
  seq_id p = plain->create_sequence().value();
  REQUIRE(plain->append(p, 0, 600, work.k.data(), work.v.data(), dtype::kF32).ok());
  CHECK(plain->attend_sparse(0, std::span<const seq_id>(&p, 1), work.q.data(), out.data(), nullptr).code() ==
        errc::kUnsupported);
  CHECK(drive_stats(*plain).column_pages_programmed == 0);
}

TEST_CASE("csd SparF: column tails over the drive's DRAM budget are dropped and rebuilt, results unchanged") {
  const kv_shape shape{1, 4, 2, 128, dtype::kF16};  // a column tail block: 2 heads x 32 pages = 256 KiB
  const uint32_t n_seq = 8, n = 700;                // 8 tails: 2 MiB over a 1 MiB budget
  const auto work = workload(shape, n, 21);
  const size_t nq = size_t{shape.n_q_heads} * shape.head_dim, row = size_t{shape.n_kv_heads} * shape.head_dim;
  auto host = make("host", shape);
  auto csd = make(std::string(kFlash) + "&buffer_mb=1", shape);
  std::vector<seq_id> hs, cs;
  for (uint32_t i = 0; i < n_seq; ++i) {
    hs.push_back(host->create_sequence().value());
    cs.push_back(csd->create_sequence().value());
    const uint32_t shift = 7 * i;  // different values per sequence
    REQUIRE(host->append(hs.back(), 0, n - shift, work.k.data() + shift * row, work.v.data() + shift * row, dtype::kF32)
                .ok());
    REQUIRE(csd->append(cs.back(), 0, n - shift, work.k.data() + shift * row, work.v.data() + shift * row, dtype::kF32)
                .ok());
  }
  std::vector<float> q(n_seq * nq);
  for (uint32_t i = 0; i < n_seq; ++i) std::copy(work.q.begin(), work.q.end(), q.begin() + i * nq);
  std::vector<float> ho(n_seq * nq), co(n_seq * nq);
  for (int round = 0; round < 2; ++round) {  // twice: the second attend finds rebuilt tails
    REQUIRE(host->attend_sparse(0, hs, q.data(), ho.data(), nullptr, sparf_params::with_compression(0.125)).ok());
    REQUIRE(csd->attend_sparse(0, cs, q.data(), co.data(), nullptr, sparf_params::with_compression(0.125)).ok());
    CHECK(rel(co, ho) <= kHostDriveTol);
  }
  const csd::device_stats st = drive_stats(*csd);
  MESSAGE("tail evictions " << st.column_tail_evictions << ", rebuild pages " << st.column_rebuild_pages_read);
  CHECK(st.column_tail_evictions > 0);
  CHECK(st.column_rebuild_pages_read > 0);
  // Appends keep working for evicted tails (they continue once rebuilt).
  for (uint32_t i = 0; i < n_seq; ++i) {
    REQUIRE(host->append(hs[i], 0, 1, work.k.data(), work.v.data(), dtype::kF32).ok());
    REQUIRE(csd->append(cs[i], 0, 1, work.k.data(), work.v.data(), dtype::kF32).ok());
  }
  REQUIRE(host->attend_sparse(0, hs, q.data(), ho.data(), nullptr, sparf_params::with_compression(0.25)).ok());
  REQUIRE(csd->attend_sparse(0, cs, q.data(), co.data(), nullptr, sparf_params::with_compression(0.25)).ok());
  CHECK(rel(co, ho) <= kHostDriveTol);
}

// ---- the page-summary policy in the drive ---------------------------------------------------------

namespace {
std::unique_ptr<kv_cache> make_pages(const std::string& uri, const kv_shape& shape, bool sparf) {
  cache_options o = test_support::sparf_cache_options(shape, uri, 48ull << 20);
  o.sparf = sparf;
  o.page_summaries = true;
  auto c = kv_cache::create(o);
  REQUIRE_MESSAGE(c.ok(), c.error().message());
  return std::move(c).value();
}
uint64_t summary_bytes(kv_cache& c) {
  uint64_t b = 0;
  auto& d = dynamic_cast<csd_backend&>(c.storage());
  for (uint32_t i = 0; i < d.n_drives(); ++i) b += drive_stats(c, i).summary_bytes;
  return b;
}
sparf_params pages_at(double budget) {
  sparf_params p = sparf_params::with_compression(budget);
  p.policy = sparse_policy::kPageSummary;
  return p;
}
}  // namespace

TEST_CASE("csd page summaries in the drive: same output and counters as the host, flash pages read, both policies") {
  const kv_shape shape{1, 8, 4, 128, dtype::kF16};  // 4 kv heads: 2 per drive
  const uint32_t n = 4000;
  const auto work = workload(shape, n, 31);
  const size_t nq = size_t{shape.n_q_heads} * shape.head_dim, row = size_t{shape.n_kv_heads} * shape.head_dim;
  auto host = make_pages("host", shape, true);
  auto csd = make_pages(std::string(kFlash) + "&drives=2", shape, true);
  CHECK(csd->storage().runs_page_summaries());
  seq_id hs = host->create_sequence().value(), cs = csd->create_sequence().value();
  for (uint32_t at = 0; at < n;) {  // prefill pieces across groups, then decode appends
    const uint32_t m = at < 3900 ? 650 : 1;
    REQUIRE(host->append(hs, 0, m, work.k.data() + at * row, work.v.data() + at * row, dtype::kF32).ok());
    REQUIRE(csd->append(cs, 0, m, work.k.data() + at * row, work.v.data() + at * row, dtype::kF32).ok());
    at += m;
  }
  const uint32_t tpp = csd->page().tokens_per_page, groups = (n + tpp - 1) / tpp;
  CHECK(summary_bytes(*csd) == uint64_t{groups} * page_summary_floats(shape.n_kv_heads, 128) * sizeof(float));
  CHECK(csd->stats().page_summary_bytes == 0);  // nothing in host memory
  const auto seqs_h = std::span<const seq_id>(&hs, 1), seqs_c = std::span<const seq_id>(&cs, 1);
  std::vector<float> dense(nq), ho(nq), co(nq), hl(shape.n_q_heads), cl(shape.n_q_heads);
  REQUIRE(csd->attend(0, seqs_c, work.q.data(), dense.data(), nullptr).ok());
  // Budget 1 is dense attention.
  REQUIRE(csd->attend_sparse(0, seqs_c, work.q.data(), co.data(), cl.data(), pages_at(1.0)).ok());
  CHECK(rel(co, dense) <= 1e-5);
  uint64_t dense_flash = 0;
  {
    const csd::device_stats a = drive_stats(*csd);
    REQUIRE(csd->attend(0, seqs_c, work.q.data(), dense.data(), nullptr).ok());
    dense_flash = drive_stats(*csd).flash_pages_read - a.flash_pages_read;
  }
  for (const uint32_t ends : {0u, 16u}) {
    CAPTURE(ends);
    sparf_params p = pages_at(0.125);
    p.sink_tokens = ends;
    p.window_tokens = 4 * ends;
    const cache_stats h0 = host->stats(), c0 = csd->stats();
    const csd::device_stats d0 = drive_stats(*csd);
    REQUIRE(host->attend_sparse(0, seqs_h, work.q.data(), ho.data(), hl.data(), p).ok());
    REQUIRE(csd->attend_sparse(0, seqs_c, work.q.data(), co.data(), cl.data(), p).ok());
    const csd::device_stats d1 = drive_stats(*csd);
    CHECK(rel(co, ho) <= kHostDriveTol);
    CHECK(rel(cl, hl) <= kHostDriveTol);
    CHECK(rel(co, dense) > 1e-3);  // a real selection
    const sparf_counters hd = host->stats().sparf.since(h0.sparf), cd = csd->stats().sparf.since(c0.sparf);
    CHECK(cd.selected_tokens == hd.selected_tokens);
    CHECK(cd.token_pages_read == hd.token_pages_read);
    CHECK(cd.dense_pages == hd.dense_pages);
    CHECK(cd.channel_pages_read == 0);
    // The drive's own flash reads (drive 0: its 2 heads): the chosen groups' pages, not the buffered tail.
    const uint64_t flash = d1.flash_pages_read - d0.flash_pages_read;
    MESSAGE("drive 0 flash pages: dense " << dense_flash << ", page summaries 1/8 " << flash);
    CHECK(d1.page_summary_attends == d0.page_summary_attends + 1);
    CHECK(d1.page_summary_pages_read - d0.page_summary_pages_read == flash);
    CHECK(flash > 0);
    CHECK(flash * 6 <= dense_flash);
    CHECK(d1.summary_rebuild_pages_read == 0);
  }
  // SparF runs beside it, chosen per call, with the same counters as the host's.
  REQUIRE(
      host->attend_sparse(0, seqs_h, work.q.data(), ho.data(), nullptr, sparf_params::with_compression(0.125)).ok());
  REQUIRE(csd->attend_sparse(0, seqs_c, work.q.data(), co.data(), nullptr, sparf_params::with_compression(0.125)).ok());
  CHECK(rel(co, ho) <= kHostDriveTol);
}

TEST_CASE("csd page summaries: a fork shares them, a truncation rebuilds the tail's, freeing returns them") {
  const kv_shape shape{1, 4, 2, 64, dtype::kQ8_0};  // quantized: summaries of the dequantized K
  const auto a = workload(shape, 910, 41), b = workload(shape, 300, 42);
  const size_t nq = size_t{shape.n_q_heads} * shape.head_dim, row = size_t{shape.n_kv_heads} * shape.head_dim;
  auto csd = make_pages(kFlash, shape, false);
  auto fresh = make_pages("host", shape, false);
  const uint64_t block = page_summary_floats(shape.n_kv_heads, shape.head_dim) * sizeof(float);
  const uint32_t tpp = csd->page().tokens_per_page;
  REQUIRE(610 % tpp != 0);  // a partial tail group, copied by the fork
  const seq_id s = csd->create_sequence().value();
  REQUIRE(csd->append(s, 0, 610, a.k.data(), a.v.data(), dtype::kF32).ok());
  const uint64_t before_fork = summary_bytes(*csd);
  CHECK(before_fork == uint64_t{(610 + tpp - 1) / tpp} * block);
  const seq_id f = csd->fork_sequence(s).value();
  CHECK(summary_bytes(*csd) == before_fork + block);  // full groups shared; the copied tail has its own
  REQUIRE(csd->append(s, 0, 300, a.k.data() + 610 * row, a.v.data() + 610 * row, dtype::kF32).ok());
  REQUIRE(csd->append(f, 0, 300, b.k.data(), b.v.data(), dtype::kF32).ok());
  REQUIRE(csd->remove_range(s, 250, 500).ok());  // 250: inside a group
  const seq_id g = csd->fork_sequence(f).value();
  REQUIRE(700 % tpp != 0);
  REQUIRE(csd->remove_range(g, 700, UINT64_MAX).ok());  // keeps part of a shared chunk: rebuilt when attended
  // The same contents built fresh on the host.
  const seq_id fs = fresh->create_sequence().value(), ff = fresh->create_sequence().value(),
               fg = fresh->create_sequence().value();
  REQUIRE(fresh->append(fs, 0, 250, a.k.data(), a.v.data(), dtype::kF32).ok());
  REQUIRE(fresh->append(fs, 0, 410, a.k.data() + 500 * row, a.v.data() + 500 * row, dtype::kF32).ok());
  REQUIRE(fresh->append(ff, 0, 610, a.k.data(), a.v.data(), dtype::kF32).ok());
  REQUIRE(fresh->append(ff, 0, 300, b.k.data(), b.v.data(), dtype::kF32).ok());
  REQUIRE(fresh->append(fg, 0, 610, a.k.data(), a.v.data(), dtype::kF32).ok());
  REQUIRE(fresh->append(fg, 0, 90, b.k.data(), b.v.data(), dtype::kF32).ok());
  const csd::device_stats d0 = drive_stats(*csd);
  const seq_id mine[] = {s, f, g}, theirs[] = {fs, ff, fg};
  std::vector<float> q(3 * nq), got(q.size()), want(q.size());
  for (size_t i = 0; i < 3; ++i) std::copy(a.q.begin(), a.q.end(), q.begin() + i * nq);
  for (double budget : {0.2, 1.0}) {
    CAPTURE(budget);
    sparf_params p = pages_at(budget);
    REQUIRE(csd->attend_sparse(0, mine, q.data(), got.data(), nullptr, p).ok());
    REQUIRE(fresh->attend_sparse(0, theirs, q.data(), want.data(), nullptr, p).ok());
    CHECK(rel(got, want) <= kHostDriveTol);
  }
  const csd::device_stats d1 = drive_stats(*csd);
  MESSAGE("summary rebuild pages read: " << d1.summary_rebuild_pages_read - d0.summary_rebuild_pages_read);
  for (seq_id x : mine) REQUIRE(csd->free_sequence(x).ok());
  REQUIRE(dynamic_cast<csd_backend&>(csd->storage()).reclaim().ok());
  CHECK(summary_bytes(*csd) == 0);
}

// The drive's summary DRAM budget (csd: summary_mb): a drive that may keep none, or only a few,
// answers as the host does, rebuilding the summaries it lacks from flash for each command.
TEST_CASE("csd page summaries over the drive's DRAM budget: none or all kept, same output, rebuilt when missing") {
  const kv_shape shape{1, 4, 2, 64, dtype::kF16};
  const uint32_t n = 1500;
  const auto work = workload(shape, n, 61);
  auto host = make_pages("host", shape, false);
  const seq_id hs = host->create_sequence().value();
  REQUIRE(host->append(hs, 0, n, work.k.data(), work.v.data(), dtype::kF32).ok());
  const size_t nq = size_t{shape.n_q_heads} * shape.head_dim;
  std::vector<float> want(nq), got(nq);
  REQUIRE(host->attend_sparse(0, std::span<const seq_id>(&hs, 1), work.q.data(), want.data(), nullptr, pages_at(0.25))
              .ok());
  auto unlimited = make_pages(kFlash, shape, false);
  const seq_id us = unlimited->create_sequence().value();
  REQUIRE(unlimited->append(us, 0, n, work.k.data(), work.v.data(), dtype::kF32).ok());
  const uint64_t all = summary_bytes(*unlimited);
  REQUIRE(all > 0);
  for (const char* budget : {"&summary_mb=0", "&summary_mb=1"}) {
    CAPTURE(budget);
    auto csd = make_pages(std::string(kFlash) + budget, shape, false);
    const seq_id s = csd->create_sequence().value();
    REQUIRE(csd->append(s, 0, n, work.k.data(), work.v.data(), dtype::kF32).ok());
    REQUIRE(dynamic_cast<csd_backend&>(csd->storage()).flush().ok());  // rows on flash: rebuilds read them
    const uint64_t kept = summary_bytes(*csd);
    CHECK(kept <= (std::string(budget) == "&summary_mb=0" ? 0 : all));
    const csd::device_stats d0 = drive_stats(*csd);
    for (int round = 0; round < 2; ++round) {  // a second command rebuilds again what it could not keep
      REQUIRE(csd->attend_sparse(0, std::span<const seq_id>(&s, 1), work.q.data(), got.data(), nullptr, pages_at(0.25))
                  .ok());
      CHECK(rel(got, want) <= kHostDriveTol);
    }
    const csd::device_stats d1 = drive_stats(*csd);
    if (kept == 0) CHECK(d1.summary_rebuild_pages_read > d0.summary_rebuild_pages_read);
    CHECK(summary_bytes(*csd) == kept);
  }
  CHECK_FALSE(kv_cache::create(test_support::sparf_cache_options(shape, std::string(kFlash) + "&summary_mb=99999999999",
                                                                 48ull << 20))
                  .ok());
}

TEST_CASE("csd page summaries: a cache without them is refused with a message; bad budgets are refused") {
  const kv_shape shape{1, 4, 2, 64, dtype::kF16};
  const auto work = workload(shape, 300, 51);
  auto sparf_only = make(kFlash, shape);
  CHECK_FALSE(sparf_only->storage().runs_page_summaries());
  const seq_id s = sparf_only->create_sequence().value();
  REQUIRE(sparf_only->append(s, 0, 300, work.k.data(), work.v.data(), dtype::kF32).ok());
  std::vector<float> out(size_t{shape.n_q_heads} * shape.head_dim, 7.0f);
  const status st =
      sparf_only->attend_sparse(0, std::span<const seq_id>(&s, 1), work.q.data(), out.data(), nullptr, pages_at(0.5));
  CHECK(st.code() == errc::kUnsupported);
  CHECK(st.message().find("page_summaries") != std::string::npos);
  auto pages = make_pages(kFlash, shape, false);
  const seq_id p = pages->create_sequence().value();
  {
    const status ap = pages->append(p, 0, 300, work.k.data(), work.v.data(), dtype::kF32);
    REQUIRE_MESSAGE(ap.ok(), ap.to_string());
  }
  sparf_params too_many = sparf_params::with_rk(1, 301);
  too_many.policy = sparse_policy::kPageSummary;
  CHECK(pages->attend_sparse(0, std::span<const seq_id>(&p, 1), work.q.data(), out.data(), nullptr, too_many).code() ==
        errc::kInvalidArgument);
  CHECK(pages->attend_sparse(0, std::span<const seq_id>(&p, 1), work.q.data(), out.data(), nullptr, pages_at(0.0))
            .code() == errc::kInvalidArgument);
  CHECK(out[0] == 7.0f);
  // SparF was not asked for: refused by the cache, with what to set.
  const status no_sparf = pages->attend_sparse(0, std::span<const seq_id>(&p, 1), work.q.data(), out.data(), nullptr,
                                               sparf_params::with_compression(0.5));
  CHECK(no_sparf.code() == errc::kUnsupported);
  CHECK(no_sparf.message().find("cache_options::sparf") != std::string::npos);
}
