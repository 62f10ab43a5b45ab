// The emulated drive's firmware in-process (no shared memory, deterministic RAM flash): models,
// block manager, FTL, attention engine vs the float64 reference, reclaim, write amplification,
// and validation of malformed commands. These are the tests that also run on aarch64 under qemu.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <linux/io_uring.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "block_manager.hpp"
#include "csd_test_util.hpp"
#include "drive.hpp"
#include "instinfer/csd/models.hpp"
#include "instinfer/csd/protocol.hpp"
#include "instinfer/csd/queue_pair.hpp"

using namespace instinfer;
using namespace instinfer::csd;
using csd_test::kv_model;

namespace {

// One namespace on an in-process drive, driven through execute() with a private data area.
struct harness {
  std::unique_ptr<drive> dev;
  std::vector<uint64_t> storage = std::vector<uint64_t>((8u << 20) / 8);
  uint32_t qp = 0;
  namespace_info ns{};
  namespace_config cfg{};
  std::map<std::pair<uint64_t, uint32_t>, std::vector<uint32_t>> tables;  // the test's own page tables
  uint64_t next_chunk = 0;

  std::byte* area() { return reinterpret_cast<std::byte*>(storage.data()); }
  uint64_t area_bytes() const { return storage.size() * 8; }

  command_outcome raw(sq_entry e) { return dev->execute(qp, e, area(), area_bytes()); }
  status run(sq_entry e) {
    const command_outcome r = raw(e);
    if (r.cqe.status != 0) return {static_cast<errc>(r.cqe.status), r.error};
    return {};
  }

  status configure(uint32_t heads, uint32_t g, uint32_t dim, dtype t, uint32_t layers = 2, bool sparf = false,
                   bool persist = false, bool page_summaries = false) {
    cfg = namespace_config{};
    cfg.sparf = sparf ? 1 : 0;
    cfg.page_summaries = page_summaries ? 1 : 0;
    cfg.persist = persist ? 1 : 0;
    cfg.n_layers = layers;
    cfg.n_kv_heads = heads;
    cfg.group_size = g;
    cfg.head_dim = dim;
    cfg.page_bytes = 4096;
    cfg.kv_dtype = static_cast<uint8_t>(t);
    std::memcpy(area(), &cfg, sizeof cfg);
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kConfig);
    e.data_bytes = sizeof cfg;
    e.result_offset = 4096;
    e.result_bytes = sizeof(namespace_info);
    INSTINFER_TRY(run(e));
    std::memcpy(&ns, area() + 4096, sizeof ns);
    next_chunk = ns.chunk_base;
    return {};
  }

  uint64_t row() const { return uint64_t{cfg.head_dim} * dtype_size(static_cast<dtype>(cfg.kv_dtype)); }

  // Append n tokens to (seq, layer) as the host would: fill the tail chunk, then fresh chunks,
  // in commands of at most `per_command` tokens.
  status append(uint64_t seq, uint32_t layer, uint64_t have, const std::byte* k, const std::byte* v, uint32_t n,
                uint32_t per_command) {
    auto& tab = tables[{seq, layer}];
    const uint32_t tpp = ns.tokens_per_page;
    uint32_t done = 0;
    while (done < n) {
      const uint32_t take = std::min(per_command, n - done);
      const uint64_t pos = have + done;
      const uint32_t first_index = static_cast<uint32_t>(pos / tpp);
      const uint32_t first_token = static_cast<uint32_t>(pos % tpp);
      const uint32_t n_chunks = static_cast<uint32_t>((uint64_t{first_token} + take + tpp - 1) / tpp);
      std::vector<uint32_t> ids;
      for (uint32_t i = 0; i < n_chunks; ++i) {
        const uint32_t idx = first_index + i;
        if (tab.size() <= idx) tab.push_back(static_cast<uint32_t>(next_chunk++));
        ids.push_back(tab[idx]);
      }
      const uint64_t kv = uint64_t{take} * cfg.n_kv_heads * row();
      std::memcpy(area(), ids.data(), ids.size() * 4);
      std::memcpy(area() + ids.size() * 4, k + uint64_t{done} * cfg.n_kv_heads * row(), kv);
      std::memcpy(area() + ids.size() * 4 + kv, v + uint64_t{done} * cfg.n_kv_heads * row(), kv);
      sq_entry e{};
      e.opcode = static_cast<uint8_t>(opcode::kWriteKv);
      e.nsid = ns.nsid;
      e.data_bytes = static_cast<uint32_t>(ids.size() * 4 + 2 * kv);
      set_args(e, write_kv_args{seq, layer, first_index, first_token, take, n_chunks, 0});
      INSTINFER_TRY(run(e));
      done += take;
    }
    return {};
  }

  status attend(uint32_t layer, const std::vector<attend_entry>& items, const float* q, std::vector<float>& out,
                std::vector<float>& lse) {
    const uint32_t hq = cfg.n_kv_heads * cfg.group_size;
    const uint64_t qb = items.size() * uint64_t{hq} * cfg.head_dim * 4;
    std::memcpy(area(), items.data(), items.size() * sizeof(attend_entry));
    std::memcpy(area() + items.size() * sizeof(attend_entry), q, qb);
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kAttend);
    e.nsid = ns.nsid;
    e.data_bytes = static_cast<uint32_t>(items.size() * sizeof(attend_entry) + qb);
    e.result_offset = 4u << 20;
    e.result_bytes = static_cast<uint32_t>(qb + items.size() * hq * 4);
    set_args(e, attend_args{layer, static_cast<uint32_t>(items.size())});
    INSTINFER_TRY(run(e));
    out.resize(qb / 4);
    lse.resize(items.size() * hq);
    std::memcpy(out.data(), area() + (4u << 20), qb);
    std::memcpy(lse.data(), area() + (4u << 20) + qb, lse.size() * 4);
    return {};
  }

  // attend-sparse: wire params in front of the entries, counters after out and lse.
  // Without ext: a protocol-5 command (attend_args, sparf_wire_params alone); with it: protocol 6
  // (attend_sparse_args, kSparfParamsBytesV6), and with ext2 too: protocol 7 (kSparfParamsBytes);
  // args_params_bytes, unless 0, is the size the arguments claim.
  status attend_sparse(uint32_t layer, const std::vector<attend_entry>& items, const float* q,
                       const sparf_wire_params& p, std::vector<float>& out, std::vector<float>& lse,
                       sparf_wire_counters& counters, const sparf_wire_ext* ext = nullptr,
                       uint32_t args_params_bytes = 0, const sparf_wire_ext2* ext2 = nullptr) {
    const uint32_t hq = cfg.n_kv_heads * cfg.group_size;
    const uint64_t qb = items.size() * uint64_t{hq} * cfg.head_dim * 4;
    const uint32_t pb = ext2 ? kSparfParamsBytes : ext ? kSparfParamsBytesV6 : uint32_t{sizeof p};
    std::memcpy(area(), &p, sizeof p);
    if (ext) std::memcpy(area() + sizeof p, ext, sizeof *ext);
    if (ext && ext2) std::memcpy(area() + kSparfParamsBytesV6, ext2, sizeof *ext2);
    std::memcpy(area() + pb, items.data(), items.size() * sizeof(attend_entry));
    std::memcpy(area() + pb + items.size() * sizeof(attend_entry), q, qb);
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kAttendSparse);
    e.nsid = ns.nsid;
    e.data_bytes = static_cast<uint32_t>(pb + items.size() * sizeof(attend_entry) + qb);
    e.result_offset = 4u << 20;
    e.result_bytes = static_cast<uint32_t>(qb + items.size() * hq * 4 + sizeof counters);
    if (ext)
      set_args(e, attend_sparse_args{layer, static_cast<uint32_t>(items.size()),
                                     args_params_bytes ? args_params_bytes : pb, 0});
    else
      set_args(e, attend_args{layer, static_cast<uint32_t>(items.size())});
    INSTINFER_TRY(run(e));
    out.resize(qb / 4);
    lse.resize(items.size() * hq);
    std::memcpy(out.data(), area() + (4u << 20), qb);
    std::memcpy(lse.data(), area() + (4u << 20) + qb, lse.size() * 4);
    std::memcpy(&counters, area() + (4u << 20) + qb + lse.size() * 4, sizeof counters);
    return {};
  }

  // attend-chunk: entries, then every item's query rows; out rows, then lse rows back.
  sq_entry chunk_entry_of(uint32_t layer, const std::vector<attend_chunk_entry>& items, const float* q,
                          uint32_t n_rows) {
    const uint32_t hq = cfg.n_kv_heads * cfg.group_size;
    const uint64_t qb = uint64_t{n_rows} * hq * cfg.head_dim * 4;
    std::memcpy(area(), items.data(), items.size() * sizeof(attend_chunk_entry));
    std::memcpy(area() + items.size() * sizeof(attend_chunk_entry), q, qb);
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kAttendChunk);
    e.nsid = ns.nsid;
    e.data_bytes = static_cast<uint32_t>(items.size() * sizeof(attend_chunk_entry) + qb);
    e.result_offset = 4u << 20;
    e.result_bytes = static_cast<uint32_t>(qb + uint64_t{n_rows} * hq * 4);
    set_args(e, attend_chunk_args{layer, static_cast<uint32_t>(items.size()), n_rows});
    return e;
  }
  status attend_chunk(uint32_t layer, const std::vector<attend_chunk_entry>& items, const float* q,
                      std::vector<float>& out, std::vector<float>& lse) {
    uint32_t n_rows = 0;
    for (const attend_chunk_entry& x : items) n_rows += x.n_rows;
    const uint32_t hq = cfg.n_kv_heads * cfg.group_size;
    INSTINFER_TRY(run(chunk_entry_of(layer, items, q, n_rows)));
    const uint64_t qb = uint64_t{n_rows} * hq * cfg.head_dim * 4;
    out.resize(qb / 4);
    lse.resize(uint64_t{n_rows} * hq);
    std::memcpy(out.data(), area() + (4u << 20), qb);
    std::memcpy(lse.data(), area() + (4u << 20) + qb, lse.size() * 4);
    return {};
  }

  status reclaim_chunks(const std::vector<uint32_t>& ids) {
    std::memcpy(area(), ids.data(), ids.size() * 4);
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kReclaim);
    e.nsid = ns.nsid;
    e.data_bytes = static_cast<uint32_t>(ids.size() * 4);
    reclaim_args a{};
    a.mode = static_cast<uint8_t>(reclaim_mode::kChunks);
    a.n_chunks = static_cast<uint32_t>(ids.size());
    set_args(e, a);
    return run(e);
  }

  device_stats stats() { return dev->stats(); }
};

drive_options small_flash(uint32_t ppb = 6) {
  drive_options o;
  o.flash.channels = 4;
  o.flash.dies_per_channel = 2;
  o.flash.blocks_per_die = 16;
  o.flash.pages_per_block = ppb;  // 6 pages: a 4-page chunk (2 heads) straddles blocks
  o.n_cores = 3;
  o.pages_per_batch = 3;  // several double-buffered batches per task
  return o;
}

harness make(const drive_options& o) {
  harness h;
  auto d = drive::create(o);
  REQUIRE_MESSAGE(d.ok(), d.error().to_string());
  h.dev = std::move(*d);
  return h;
}

// Attend a batch and compare every item with the float64 reference.
void check_attend(harness& h, uint32_t layer, const std::vector<uint64_t>& seqs, const std::vector<kv_model*>& models,
                  std::mt19937& rng) {
  const uint32_t g = h.cfg.group_size, dim = h.cfg.head_dim, hq = h.cfg.n_kv_heads * g;
  std::vector<attend_entry> items;
  for (size_t i = 0; i < seqs.size(); ++i) items.push_back({seqs[i], static_cast<uint32_t>(models[i]->n_tokens()), 0});
  const std::vector<float> q = csd_test::random_q(rng, seqs.size() * uint64_t{hq} * dim);
  std::vector<float> out, lse;
  const status s = h.attend(layer, items, q.data(), out, lse);
  REQUIRE_MESSAGE(s.ok(), s.to_string());
  for (size_t i = 0; i < seqs.size(); ++i) {
    std::vector<double> want, want_lse;
    models[i]->attend(q.data() + i * hq * dim, g, models[i]->n_tokens(), 1.0 / std::sqrt(double(dim)), want, want_lse);
    const double err =
        reference::relative_error(std::span<const float>(out.data() + i * hq * dim, uint64_t{hq} * dim), want);
    CHECK_MESSAGE(err < 1e-5, "item " << i << " tokens " << models[i]->n_tokens() << " rel err " << err);
    CHECK(csd_test::lse_error(std::span<const float>(lse.data() + i * hq, hq), want_lse) < 1e-5);
  }
}

// Attend-sparse parameters that keep every token (compression 1): the policy must equal dense.
sparf_wire_params keep_all_params() {
  sparf_wire_params p{};
  p.compression = 1.0;
  p.page_spread = 2.0;
  return p;
}

// One item's output and lse against the float64 model of its first n tokens (group g, d 64).
void check_dense(const kv_model& model, const std::vector<float>& q, uint32_t g, uint32_t n,
                 const std::vector<float>& out, const std::vector<float>& lse) {
  std::vector<double> want, want_lse;
  model.attend(q.data(), g, n, 1.0 / std::sqrt(64.0), want, want_lse);
  CHECK(reference::relative_error(std::span<const float>(out), want) < 1e-5);
  CHECK(csd_test::lse_error(std::span<const float>(lse), want_lse) < 1e-5);
}

}  // namespace

TEST_CASE("protocol entries have their fixed layout") {
  CHECK(sizeof(sq_entry) == 64);
  CHECK(sizeof(cq_entry) == 16);
  sq_entry e{};
  set_args(e, write_kv_args{7, 3, 9, 1, 2, 1, 0});
  const auto a = get_args<write_kv_args>(e);
  CHECK(a.seq == 7);
  CHECK(a.first_index == 9);
  const region_layout l{2, 64, 1 << 20};
  CHECK(l.valid());
  CHECK(l.total_bytes() == kHeaderBytes + 2 * l.qp_stride());
  CHECK_FALSE(region_layout{1, 63, 1 << 20}.valid());
  CHECK_FALSE(region_layout{0, 64, 1 << 20}.valid());
}

TEST_CASE("flash model: reads spread over channels run at the internal bandwidth") {
  flash_params p;  // paper defaults: 8 x 1.4 GB/s, 4 KiB pages
  flash_timeline t(p);
  const uint32_t pages_per_lane = p.blocks_per_die * p.pages_per_block;
  double end = 0.0;
  const uint32_t n = 8 * 1024;
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t lane = i % p.lanes();
    end = std::max(end, t.read(lane * pages_per_lane + i / p.lanes(), 0.0));
  }
  const double gbps = n * double(p.page_bytes) / end;  // bytes per ns == GB/s
  CHECK(gbps > 0.95 * p.internal_gbps());
  CHECK(gbps <= p.internal_gbps() * 1.0001);
  // One channel only: an eighth of that.
  flash_timeline one(p);
  double end1 = 0.0;
  for (uint32_t i = 0; i < 1024; ++i) end1 = std::max(end1, one.read(i % p.pages_per_block, 0.0));
  CHECK(1024 * double(p.page_bytes) / end1 < 1.0001 * p.channel_gbps);
  // A batch shaped like an attend (K and V page of a chunk on the same die, chunks striped over
  // lanes) also reaches the internal bandwidth: the bus serves whichever die is ready first.
  flash_timeline tb(p);
  std::vector<uint32_t> batch;
  for (uint32_t c = 0; c < 2048; ++c)
    for (uint32_t k = 0; k < 4; ++k) batch.push_back((c % p.lanes()) * pages_per_lane + (c / p.lanes()) * 4 + k);
  const double tend = tb.read_batch(batch.data(), batch.size(), 0.0);
  CHECK(batch.size() * double(p.page_bytes) / tend > 0.95 * p.internal_gbps());
  CHECK(tb.read_batch(batch.data(), 0, 5.0) == 5.0);
  // The link: 7 GB/s plus a per-command latency.
  link_params lp;
  CHECK(lp.command_ns(7000, 0) == doctest::Approx(2000.0 + 1000.0));
  CHECK_FALSE(flash_params{0}.validate().ok());
  flash_params bad;
  bad.page_bytes = 3000;
  CHECK(bad.validate().code() == errc::kInvalidArgument);
  CHECK_FALSE(link_params{0.0, 1.0}.validate().ok());
}

TEST_CASE("flash model: a program holds its die for tPROG; reads behind it wait, other dies do not") {
  flash_params p;
  flash_timeline t(p);
  const uint32_t per_lane = p.blocks_per_die * p.pages_per_block;
  const double prog_end = t.program(0, 0.0);
  CHECK(prog_end == doctest::Approx(p.transfer_ns() + p.program_us * 1e3));
  CHECK(t.program_busy_ns() == doctest::Approx(p.transfer_ns() + p.program_us * 1e3));
  // Same die (lane 0): the read starts after the program.
  CHECK(t.read(1, 0.0) == doctest::Approx(prog_end + p.read_us * 1e3 + p.transfer_ns()));
  // Another channel's die: unaffected.
  CHECK(t.read(1 * per_lane, 0.0) == doctest::Approx(p.read_us * 1e3 + p.transfer_ns()));
  // A batch of reads behind programs of every die ends no earlier than tPROG later.
  flash_timeline a(p), b(p);
  std::vector<uint32_t> pages;
  for (uint32_t i = 0; i < 4 * p.lanes(); ++i) pages.push_back((i % p.lanes()) * per_lane + i / p.lanes());
  for (uint32_t l = 0; l < p.lanes(); ++l) b.program(l * per_lane + 100, 0.0);
  CHECK(b.read_batch(pages.data(), pages.size(), 0.0) >=
        a.read_batch(pages.data(), pages.size(), 0.0) + p.program_us * 1e3);
  // SparF's two phases: the token pages start after the last column page.
  flash_timeline c(p);
  const uint32_t col[1] = {0}, tok[1] = {1 * per_lane};
  CHECK(sparse_reads(c, col, 1, tok, 1, 0.0) == doctest::Approx(2 * (p.read_us * 1e3 + p.transfer_ns())));
}

TEST_CASE("compute model: stated cores, work counted per element and token, overlapped command time") {
  compute_params cp;  // 4 x 1.5 GHz x 8 flop/cycle
  CHECK(cp.gflops() == doctest::Approx(48.0));
  CHECK(cp.ns(48.0) == doctest::Approx(1.0));
  CHECK(cp.validate().ok());
  CHECK_FALSE(compute_params{0}.validate().ok());
  attend_work w;
  w.group = 4;
  w.kv_dtype = dtype::kF16;
  w.kv_elements = 1000;
  w.scored_tokens = 10;
  CHECK(w.flops() == doctest::Approx((2.0 * 4 + 1) * 1000 + 8.0 * 4 * 10));
  w.kv_dtype = dtype::kF32;  // f32: nothing to widen
  CHECK(w.flops() == doctest::Approx(2.0 * 4 * 1000 + 8.0 * 4 * 10));
  w.kv_dtype = dtype::kQ8_0;  // convert and scale
  CHECK(w.flops() == doctest::Approx((2.0 * 4 + 2) * 1000 + 8.0 * 4 * 10));
  w.kv_dtype = dtype::kQ4_0;  // unpack, convert and scale
  CHECK(w.flops() == doctest::Approx((2.0 * 4 + 3) * 1000 + 8.0 * 4 * 10));
  w.approx_elements = 500;  // a quantized cache's K columns are f16
  CHECK(w.flops() == doctest::Approx((2.0 * 4 + 3) * 1000 + (2.0 * 4 + 1) * 500 + 8.0 * 4 * 10));
  command_time ct{3.0, 7.0, 5.0};
  CHECK(ct.total_ns() == 7.0);
}

TEST_CASE("block manager: append-only runs, validity, LRU erase of dead blocks only") {
  flash_params p;
  p.channels = 2;
  p.dies_per_channel = 1;
  p.blocks_per_die = 3;
  p.pages_per_block = 4;
  block_manager bm(p);
  CHECK(bm.free_blocks() == 6);
  auto r1 = bm.allocate(0, 3, 1);
  REQUIRE(r1.ok());
  CHECK(r1->n_pages == 3);
  auto r2 = bm.allocate(0, 3, 2);  // only one page left in the open block
  REQUIRE(r2.ok());
  CHECK(r2->n_pages == 1);
  CHECK(r2->first_ppn == r1->first_ppn + 3);
  auto r3 = bm.allocate(0, 2, 3);  // a new block of lane 0
  REQUIRE(r3.ok());
  CHECK(bm.valid_pages() == 6);
  // Kill the first block except one page: not erasable.
  for (uint32_t i = 0; i < 3; ++i) bm.invalidate(r1->first_ppn + i);
  std::vector<uint32_t> erased;
  auto on = [&](uint32_t gb) {
    erased.push_back(gb);
    return status{};
  };
  CHECK(bm.erase_dead(0, on) == 0);
  bm.invalidate(r2->first_ppn);
  CHECK(bm.erase_dead(0, on) == 1);
  CHECK(erased.at(0) == r1->first_ppn / 4);
  CHECK(bm.valid_pages() == 2);
  // Exhaust, then fail with kNoSpace (no copying GC to fall back on).
  uint32_t got = 0;
  for (;;) {
    auto r = bm.allocate(1, 4, 10);
    if (!r.ok()) {
      CHECK(r.error().code() == errc::kNoSpace);
      break;
    }
    got += r->n_pages;
  }
  CHECK(got > 0);
}

TEST_CASE("drive attention matches the float64 reference across page and block boundaries") {
  for (dtype t : {dtype::kF16, dtype::kF32, dtype::kBF16}) {
    CAPTURE(dtype_name(t));
    harness h = make(small_flash());
    REQUIRE(h.configure(2, 3, 64, t).ok());
    const uint32_t tpp = h.ns.tokens_per_page;
    CHECK(tpp == 4096 / (64 * dtype_size(t)));
    std::mt19937 rng(1234 + static_cast<int>(t));
    std::vector<kv_model> models(4, kv_model{2, 64, t, {}, {}});
    const uint32_t lens[4] = {1, tpp, 5 * tpp + 3, 17 * tpp - 1};
    for (uint64_t s = 0; s < 4; ++s) {
      const auto k = csd_test::random_rows(rng, lens[s], 2, 64, t);
      const auto v = csd_test::random_rows(rng, lens[s], 2, 64, t);
      // Prefill in odd-sized commands (ranges crossing chunks), then decode one token at a time.
      const uint32_t pre = lens[s] / 2;
      REQUIRE(h.append(100 + s, 1, 0, k.data(), v.data(), pre, tpp + 5).ok());
      for (uint32_t i = pre; i < lens[s]; ++i)
        REQUIRE(
            h.append(100 + s, 1, i, k.data() + uint64_t{i} * 2 * h.row(), v.data() + uint64_t{i} * 2 * h.row(), 1, 1)
                .ok());
      models[s].append(k.data(), v.data(), lens[s]);
    }
    check_attend(h, 1, {100, 101, 102, 103}, {&models[0], &models[1], &models[2], &models[3]}, rng);
    const device_stats st = h.stats();
    CHECK(st.flash_pages_programmed > 0);
    CHECK(st.flash_pages_read > 0);
    CHECK(st.modelled_ns > 0);
    // The model charges programs (die time) and the cores' compute; each command costs the
    // overlapped maximum, so the total is at least each component and at most their sum.
    CHECK(st.modelled_program_ns ==
          doctest::Approx(st.flash_pages_programmed * (h.dev->identify().page_bytes / 1.4 + 200e3)).epsilon(0.01));
    CHECK(st.modelled_compute_ns > 0);
    CHECK(st.attend_flops > 0);
    CHECK(st.modelled_ns + 2 * st.commands >=
          std::max({st.modelled_flash_ns, st.modelled_link_ns, st.modelled_compute_ns}));
    CHECK(st.modelled_ns <= st.modelled_flash_ns + st.modelled_link_ns + st.modelled_compute_ns + st.commands);
  }
}

TEST_CASE("attend-chunk in the firmware: causal rows match the float64 reference, pages read once; bad entries") {
  harness h = make(small_flash());
  REQUIRE(h.configure(2, 3, 64, dtype::kF16).ok());
  const uint32_t tpp = h.ns.tokens_per_page, g = 3, dim = 64, hq = 6;
  std::mt19937 rng(4321);
  std::vector<kv_model> models(3, kv_model{2, 64, dtype::kF16, {}, {}});
  const uint32_t lens[3] = {5, 3 * tpp + 7, 9 * tpp - 1};
  // (first position, rows) per sequence: a chunk from 0, one crossing pages, one ending the sequence.
  const uint32_t first[3] = {0, tpp - 2, 4 * tpp};
  const uint32_t rows[3] = {5, tpp + 4, 5 * tpp - 1};
  for (uint64_t s = 0; s < 3; ++s) {
    const auto k = csd_test::random_rows(rng, lens[s], 2, 64, dtype::kF16);
    const auto v = csd_test::random_rows(rng, lens[s], 2, 64, dtype::kF16);
    REQUIRE(h.append(200 + s, 1, 0, k.data(), v.data(), lens[s], tpp + 5).ok());
    models[s].append(k.data(), v.data(), lens[s]);
  }
  std::vector<attend_chunk_entry> items;
  uint32_t total = 0;
  for (uint64_t s = 0; s < 3; ++s) {
    items.push_back({200 + s, lens[s], rows[s], first[s], 0});
    total += rows[s];
  }
  const std::vector<float> q = csd_test::random_q(rng, uint64_t{total} * hq * dim);
  std::vector<float> out, lse;
  const uint64_t read_before = h.stats().flash_pages_read;
  const status st = h.attend_chunk(1, items, q.data(), out, lse);
  REQUIRE_MESSAGE(st.ok(), st.to_string());
  // Every flash page of every item at most once: no more than the pages the items hold.
  uint64_t pages = 0;
  for (uint32_t n : lens) pages += 2ull * 2 * ((n + tpp - 1) / tpp);
  CHECK(h.stats().flash_pages_read - read_before <= pages);
  uint64_t row = 0;
  double worst = 0.0;
  for (uint64_t s = 0; s < 3; ++s)
    for (uint32_t r = 0; r < rows[s]; ++r, ++row) {
      std::vector<double> want, want_lse;
      models[s].attend(q.data() + row * hq * dim, g, first[s] + r + 1, 1.0 / std::sqrt(double(dim)), want, want_lse);
      const double err = reference::relative_error(std::span<const float>(out.data() + row * hq * dim, hq * dim), want);
      worst = std::max(worst, err);
      CHECK_MESSAGE(err < 1e-5, "sequence " << s << " row " << r);
      CHECK(csd_test::lse_error(std::span<const float>(lse.data() + row * hq, hq), want_lse) < 1e-5);
    }
  MESSAGE("drive attend-chunk vs float64: worst relative error " << worst);

  // Malformed: each refused with a message, the drive keeps serving.
  const auto refused = [&](sq_entry e, errc code) {
    const command_outcome r = h.raw(e);
    CHECK(r.cqe.status == static_cast<int16_t>(code));
    CHECK(!r.error.empty());
  };
  std::vector<attend_chunk_entry> bad = {{200, lens[0], lens[0] + 1, 0, 0}};  // rows past the tokens
  refused(h.chunk_entry_of(1, bad, q.data(), lens[0] + 1), errc::kInvalidArgument);
  bad = {{200, lens[0], 0, 0, 0}};  // no rows
  refused(h.chunk_entry_of(1, bad, q.data(), 1), errc::kInvalidArgument);
  bad = {{200, lens[0], 2, 1, 0}};  // the row total disagrees with the command's
  refused(h.chunk_entry_of(1, bad, q.data(), 3), errc::kInvalidArgument);
  bad = {{201, lens[1] + 1, 1, 0, 0}};  // more tokens than the sequence holds
  refused(h.chunk_entry_of(1, bad, q.data(), 1), errc::kInvalidArgument);
  bad = {{999, 4, 1, 0, 0}};  // unknown sequence
  refused(h.chunk_entry_of(1, bad, q.data(), 1), errc::kUnknownSequence);
  bad = {{200, lens[0], 1, 0, 0}};
  sq_entry e = h.chunk_entry_of(1, bad, q.data(), 1);
  e.data_bytes -= 4;  // payload size mismatch
  refused(e, errc::kInvalidArgument);
  e = h.chunk_entry_of(1, bad, q.data(), 1);
  e.result_bytes = 8;  // result too small
  refused(e, errc::kInvalidArgument);
  e = h.chunk_entry_of(7, bad, q.data(), 1);  // layer out of range
  CHECK(h.raw(e).cqe.status != 0);
  // Still serving: the same command again gives the same rows.
  std::vector<float> again, again_lse;
  REQUIRE(h.attend_chunk(1, items, q.data(), again, again_lse).ok());
  CHECK(again == out);
}

TEST_CASE("attend-sparse in the firmware: compression 1 is exact, 1/8 reads <= 1/4 of the dense flash pages") {
  drive_options o = small_flash(16);
  o.flash.blocks_per_die = 32;
  harness h = make(o);
  REQUIRE(h.configure(2, 2, 64, dtype::kF16, 1, true).ok());
  const uint32_t n = 1500;  // 2 column blocks of 512 tokens on flash + a 476-token tail in DRAM
  std::mt19937 rng(99);
  kv_model model{2, 64, dtype::kF16, {}, {}};
  const auto k = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  const auto v = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  REQUIRE(h.append(7, 0, 0, k.data(), v.data(), 1000, 333).ok());
  for (uint32_t i = 1000; i < n; ++i)
    REQUIRE(h.append(7, 0, i, k.data() + uint64_t{i} * 2 * h.row(), v.data() + uint64_t{i} * 2 * h.row(), 1, 1).ok());
  model.append(k.data(), v.data(), n);
  const device_stats written = h.stats();
  CHECK(written.column_blocks == 2);
  CHECK(written.column_pages_programmed == 2 * 2 * 16);  // blocks x heads x channel groups
  const std::vector<float> q = csd_test::random_q(rng, 4 * 64);
  const std::vector<attend_entry> items{{7, n, 0}};
  std::vector<float> out, lse;
  sparf_wire_counters c{};
  const sparf_wire_params dense_params = keep_all_params();
  REQUIRE(h.attend_sparse(0, items, q.data(), dense_params, out, lse, c).ok());
  check_dense(model, q, 2, n, out, lse);
  CHECK(c.items == 2);
  CHECK(c.selected_tokens == 2 * n);

  const device_stats before_dense = h.stats();
  std::vector<float> dense_out, dense_lse;
  REQUIRE(h.attend(0, items, q.data(), dense_out, dense_lse).ok());
  const device_stats after_dense = h.stats();
  sparf_wire_params eighth = dense_params;
  eighth.compression = 0.125;
  REQUIRE(h.attend_sparse(0, items, q.data(), eighth, out, lse, c).ok());
  const device_stats after_sparse = h.stats();
  const uint64_t dense_pages = after_dense.flash_pages_read - before_dense.flash_pages_read;
  const uint64_t sparse_pages = after_sparse.flash_pages_read - after_dense.flash_pages_read;
  MESSAGE("flash pages: dense " << dense_pages << ", SparF 1/8 " << sparse_pages);
  CHECK(dense_pages > 0);
  CHECK(sparse_pages * 4 <= dense_pages);
  CHECK(after_sparse.column_pages_read > before_dense.column_pages_read);
  for (float x : out) CHECK(std::isfinite(x));

  // Malformed SparF commands are refused; the namespace keeps serving.
  sparf_wire_params bad = eighth;
  bad.mode = 9;
  CHECK(h.attend_sparse(0, items, q.data(), bad, out, lse, c).code() == errc::kInvalidArgument);
  bad = eighth;
  bad.compression = 0.0;
  CHECK(h.attend_sparse(0, items, q.data(), bad, out, lse, c).code() == errc::kInvalidArgument);
  bad = eighth;
  bad.mode = 1;  // explicit r, k
  bad.r = 8;
  bad.k = n + 1;
  CHECK(h.attend_sparse(0, items, q.data(), bad, out, lse, c).code() == errc::kInvalidArgument);
  CHECK(h.attend_sparse(0, items, q.data(), eighth, out, lse, c).ok());
  // Protocol 6's extension: sinks and window reach the selection; bad sizes, reserved bytes and
  // an unknown policy are refused.
  sparf_wire_ext ext{};
  ext.sink_tokens = 16;
  ext.window_tokens = 64;
  sparf_wire_counters ends{};
  REQUIRE(h.attend_sparse(0, items, q.data(), eighth, out, lse, ends, &ext).ok());
  CHECK(ends.selected_tokens == c.selected_tokens);  // k = 94 per head >= 16 + 64: the same k, other tokens
  ext.window_tokens = 400;
  REQUIRE(h.attend_sparse(0, items, q.data(), eighth, out, lse, ends, &ext).ok());
  CHECK(ends.selected_tokens == 2 * 416);  // k raised to hold the ends
  std::string msg;
  const auto refused = [&](const sparf_wire_ext& x, uint32_t args_bytes) {
    const status st = h.attend_sparse(0, items, q.data(), eighth, out, lse, ends, &x, args_bytes);
    msg = st.message();
    return st.code() == errc::kInvalidArgument;
  };
  CHECK(refused(ext, 40));
  CHECK(msg.find("64 bytes") != std::string::npos);
  sparf_wire_ext x = ext;
  x.reserved[3] = 1;
  CHECK(refused(x, 0));
  x = ext;
  x.policy = 7;
  CHECK(refused(x, 0));
  CHECK(msg.find("policy") != std::string::npos);
  x = ext;
  x.policy = 1;  // page summaries: this namespace keeps none
  const status no_pages = h.attend_sparse(0, items, q.data(), eighth, out, lse, ends, &x);
  CHECK(no_pages.code() == errc::kUnsupported);
  CHECK(no_pages.message().find("without page summaries") != std::string::npos);
  CHECK(h.attend_sparse(0, items, q.data(), eighth, out, lse, c).ok());
  // Protocol 7's extension: the channel share moves the budget from columns to tokens (r = 2 S c d
  // channels, k = (1 - S) c n tokens); bad values and reserved bytes are refused.
  sparf_wire_ext2 share{};
  share.channel_share = 0.5;
  sparf_wire_counters even{}, quarter{};
  REQUIRE(h.attend_sparse(0, items, q.data(), eighth, out, lse, even, &ext, 0, &share).ok());
  CHECK(even.selected_tokens == 2 * 416);  // ext still holds the 400-token window
  ext.window_tokens = 64;
  REQUIRE(h.attend_sparse(0, items, q.data(), eighth, out, lse, even, &ext, 0, &share).ok());
  CHECK(even.selected_tokens == 2 * 94);
  CHECK(even.channels_used == 2 * 8);
  share.channel_share = 0.25;
  REQUIRE(h.attend_sparse(0, items, q.data(), eighth, out, lse, quarter, &ext, 0, &share).ok());
  CHECK(quarter.selected_tokens == 2 * 141);  // ceil(0.75 * 0.125 * 1500)
  CHECK(quarter.channels_used == 2 * 4);      // ceil(2 * 0.25 * 0.125 * 64): one column page
  CHECK(quarter.channel_pages_read < even.channel_pages_read);
  sparf_wire_ext2 bad_share = share;
  bad_share.channel_share = 1.0;
  CHECK(h.attend_sparse(0, items, q.data(), eighth, out, lse, quarter, &ext, 0, &bad_share).code() ==
        errc::kInvalidArgument);
  bad_share = share;
  bad_share.reserved[7] = 2;
  CHECK(h.attend_sparse(0, items, q.data(), eighth, out, lse, quarter, &ext, 0, &bad_share).code() ==
        errc::kInvalidArgument);
  CHECK(h.attend_sparse(0, items, q.data(), eighth, out, lse, quarter, &ext, 56, &share).code() ==
        errc::kInvalidArgument);  // a size no protocol has

  // A namespace without SparF has no column copy: attend-sparse is unsupported there.
  harness plain = make(small_flash());
  REQUIRE(plain.configure(2, 2, 64, dtype::kF16, 1, false).ok());
  REQUIRE(plain.append(1, 0, 0, k.data(), v.data(), 100, 100).ok());
  CHECK(plain.attend_sparse(0, {{1, 100, 0}}, q.data(), eighth, out, lse, c).code() == errc::kUnsupported);
  CHECK(plain.stats().column_pages_programmed == 0);
}

TEST_CASE("page summaries in the firmware: budget 1 is exact, the policy reads fewer pages; summaries freed") {
  harness h = make(small_flash(16));
  REQUIRE(h.configure(2, 2, 64, dtype::kF16, 1, false, false, true).ok());
  const uint32_t n = 1000;  // 31 full groups of 32 tokens + a tail of 8 in DRAM
  std::mt19937 rng(7);
  kv_model model{2, 64, dtype::kF16, {}, {}};
  const auto k = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  const auto v = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  REQUIRE(h.append(3, 0, 0, k.data(), v.data(), n, 300).ok());
  model.append(k.data(), v.data(), n);
  const uint64_t block = 2 * 2 * 64 * sizeof(float);
  CHECK(h.stats().summary_bytes == 32 * block);
  const std::vector<float> q = csd_test::random_q(rng, 4 * 64);
  const std::vector<attend_entry> items{{3, n, 0}};
  std::vector<float> out, lse;
  sparf_wire_counters c{};
  const sparf_wire_params all = keep_all_params();
  sparf_wire_ext pages{};
  pages.policy = 1;
  REQUIRE(h.attend_sparse(0, items, q.data(), all, out, lse, c, &pages).ok());
  check_dense(model, q, 2, n, out, lse);
  CHECK(c.items == 2);
  CHECK(c.selected_tokens == 2 * n);
  CHECK(c.token_pages_read == 2 * 2 * 32);
  const device_stats before = h.stats();
  sparf_wire_params eighth = all;
  eighth.compression = 0.125;
  REQUIRE(h.attend_sparse(0, items, q.data(), eighth, out, lse, c, &pages).ok());
  const device_stats after = h.stats();
  CHECK(c.token_pages_read == 2 * 2 * 4);  // ceil(32 / 8) groups per kv head, K and V
  CHECK(after.page_summary_attends == before.page_summary_attends + 1);
  CHECK(after.page_summary_pages_read - before.page_summary_pages_read <= 2 * 2 * 4);
  CHECK(after.flash_pages_read - before.flash_pages_read ==
        after.page_summary_pages_read - before.page_summary_pages_read);
  for (float x : out) CHECK(std::isfinite(x));
  // SparF on a namespace without its column copy: refused; the chunks' reclaim frees the summaries.
  sparf_wire_ext sparf_policy{};
  CHECK(h.attend_sparse(0, items, q.data(), eighth, out, lse, c, &sparf_policy).code() == errc::kUnsupported);
  const auto& tab = h.tables[{3, 0}];
  std::memcpy(h.area(), tab.data(), tab.size() * 4);
  sq_entry e{};
  e.opcode = static_cast<uint8_t>(opcode::kReclaim);
  e.nsid = h.ns.nsid;
  e.data_bytes = static_cast<uint32_t>(tab.size() * 4);
  reclaim_args ra{};
  ra.mode = static_cast<uint8_t>(reclaim_mode::kChunks);
  ra.n_chunks = static_cast<uint32_t>(tab.size());
  set_args(e, ra);
  REQUIRE(h.run(e).ok());
  CHECK(h.stats().summary_bytes == 0);
}

TEST_CASE("reclaim frees and erases whole blocks; reused chunks hold the new data") {
  harness h = make(small_flash(4));  // 4-page blocks: one 2-head chunk per block
  REQUIRE(h.configure(2, 2, 64, dtype::kF16).ok());
  const uint32_t tpp = h.ns.tokens_per_page;
  std::mt19937 rng(7);
  kv_model a{2, 64, dtype::kF16, {}, {}};
  const uint32_t n = 9 * tpp + 2;
  auto k = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  auto v = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  REQUIRE(h.append(1, 0, 0, k.data(), v.data(), n, 7).ok());
  a.append(k.data(), v.data(), n);
  check_attend(h, 0, {1}, {&a}, rng);
  const device_stats before = h.stats();
  // Free the sequence's chunks: 9 full chunks = 9 dead blocks erased, no valid page copied.
  std::vector<uint32_t> ids = h.tables[{1, 0}];
  REQUIRE(h.reclaim_chunks(ids).ok());
  const device_stats after = h.stats();
  CHECK(after.blocks_erased - before.blocks_erased == 9);
  CHECK(after.valid_pages == 0);
  CHECK(after.flash_pages_programmed == before.flash_pages_programmed);  // nothing rewritten
  // Reuse the same chunk ids for a new sequence.
  h.next_chunk = h.ns.chunk_base;
  h.tables.erase({1, 0});
  kv_model b{2, 64, dtype::kF16, {}, {}};
  k = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  v = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  REQUIRE(h.append(2, 0, 0, k.data(), v.data(), n, 3).ok());
  b.append(k.data(), v.data(), n);
  CHECK(h.tables[{2, 0}] == ids);
  check_attend(h, 0, {2}, {&b}, rng);
  // The freed sequence's table still names the chunks, which now hold other tokens: attend over
  // more tokens than they hold is refused rather than computed over garbage.
  std::vector<float> out, lse;
  const auto q = csd_test::random_q(rng, 4 * 64);
  REQUIRE(h.reclaim_chunks({ids.back()}).ok());
  const status s = h.attend(0, {attend_entry{2, n, 0}}, q.data(), out, lse);
  CHECK(s.code() == errc::kInvalidArgument);
}

TEST_CASE("file-backed flash (io_uring, O_DIRECT where the filesystem allows it)") {
  char tmpl[] = "/tmp/instinfer-csd-drive-XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  drive_options o = small_flash();
  o.flash_path = std::string(tmpl) + "/flash.img";
  o.allow_buffered = true;
  auto d = drive::create(o);
  // main() runs this case only where io_uring works (else the ctest entry exits 77: skipped).
  REQUIRE_MESSAGE(d.ok(), d.error().to_string());
  harness h;
  h.dev = std::move(*d);
  MESSAGE("file flash, O_DIRECT: " << int(h.dev->identify().direct_io));
  REQUIRE(h.configure(2, 2, 128, dtype::kF16).ok());
  std::mt19937 rng(31);
  kv_model m{2, 128, dtype::kF16, {}, {}};
  const uint32_t n = 23 * h.ns.tokens_per_page + 5;
  const auto k = csd_test::random_rows(rng, n, 2, 128, dtype::kF16);
  const auto v = csd_test::random_rows(rng, n, 2, 128, dtype::kF16);
  REQUIRE(h.append(9, 1, 0, k.data(), v.data(), n, 40).ok());
  m.append(k.data(), v.data(), n);
  check_attend(h, 1, {9}, {&m}, rng);
  CHECK(h.stats().flash_pages_read >= 23 * 4);
  // The drive opened the flash itself: created 0600, locked (a second drive on it is kBusy).
  struct stat st {};
  REQUIRE(::stat(o.flash_path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0077) == 0);
  auto second = drive::create(o);
  REQUIRE(!second.ok());
  CHECK(second.error().code() == errc::kBusy);
  // A drive removes the flash file it created when it goes; --keep-flash keeps it; a file that was
  // there before stays.
  h.dev.reset();
  CHECK(::stat(o.flash_path.c_str(), &st) != 0);
  o.keep_flash = true;
  REQUIRE(drive::create(o).ok());
  CHECK(::stat(o.flash_path.c_str(), &st) == 0);
  o.keep_flash = false;
  REQUIRE(drive::create(o).ok());
  CHECK(::stat(o.flash_path.c_str(), &st) == 0);
  std::remove(o.flash_path.c_str());
  rmdir(tmpl);
}

TEST_CASE("write amplification of append-only decode of 10k tokens stays about 1") {
  drive_options o;
  o.flash.blocks_per_die = 8;
  o.n_cores = 2;
  harness h = make(o);
  REQUIRE(h.configure(2, 1, 64, dtype::kF16, 1).ok());
  std::mt19937 rng(99);
  const uint32_t n = 10000;
  const auto k = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  const auto v = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  for (uint32_t i = 0; i < n; ++i)
    REQUIRE(h.append(5, 0, i, k.data() + uint64_t{i} * 2 * h.row(), v.data() + uint64_t{i} * 2 * h.row(), 1, 1).ok());
  const device_stats st = h.stats();
  const double wa = double(st.flash_pages_programmed * st.page_bytes) / double(st.kv_bytes_appended);
  MESSAGE("write amplification after 10k decode tokens: " << wa << " (" << st.flash_pages_programmed << " pages)");
  CHECK(wa <= 1.05);
  CHECK(wa >= 0.95);
  CHECK(st.buffer_evictions == 0);
  CHECK(st.flash_pages_erased == 0);
  kv_model m{2, 64, dtype::kF16, {}, {}};
  m.append(k.data(), v.data(), n);
  check_attend(h, 0, {5}, {&m}, rng);
}

TEST_CASE("a full group buffer evicts partial groups and reads them back; results stay exact") {
  drive_options o = small_flash(8);
  o.buffer_bytes = 2 * 4 * 4096;  // two 4-page chunk slots
  harness h = make(o);
  REQUIRE(h.configure(2, 1, 64, dtype::kF16).ok());
  const uint32_t tpp = h.ns.tokens_per_page;
  std::mt19937 rng(3);
  std::vector<kv_model> m(3, kv_model{2, 64, dtype::kF16, {}, {}});
  const uint32_t n = tpp + tpp / 2;
  for (uint32_t i = 0; i < n; ++i)
    for (uint64_t s = 0; s < 3; ++s) {  // three sequences decoding in lock-step, two slots
      const auto k = csd_test::random_rows(rng, 1, 2, 64, dtype::kF16);
      const auto v = csd_test::random_rows(rng, 1, 2, 64, dtype::kF16);
      REQUIRE(h.append(s, 0, i, k.data(), v.data(), 1, 1).ok());
      m[s].append(k.data(), v.data(), 1);
    }
  const device_stats st = h.stats();
  CHECK(st.buffer_evictions > 0);
  CHECK(st.buffer_reloads > 0);
  check_attend(h, 0, {0, 1, 2}, {&m[0], &m[1], &m[2]}, rng);
}

TEST_CASE("malformed commands and foreign namespaces are rejected; the drive keeps serving") {
  harness h = make(small_flash());
  REQUIRE(h.configure(2, 1, 64, dtype::kF16).ok());
  std::mt19937 rng(5);
  const uint32_t n = 40;
  const auto k = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  const auto v = csd_test::random_rows(rng, n, 2, 64, dtype::kF16);
  REQUIRE(h.append(1, 0, 0, k.data(), v.data(), n, 16).ok());
  kv_model m{2, 64, dtype::kF16, {}, {}};
  m.append(k.data(), v.data(), n);

  // A second client (queue pair 1) with its own namespace.
  harness other;
  other.dev.reset();  // shares h's drive through a raw pointer below
  drive& dev = *h.dev;
  auto on_qp1 = [&](sq_entry e) { return dev.execute(1, e, h.area(), h.area_bytes()); };
  namespace_config c = h.cfg;
  std::memcpy(h.area(), &c, sizeof c);
  sq_entry cfg{};
  cfg.opcode = static_cast<uint8_t>(opcode::kConfig);
  cfg.data_bytes = sizeof c;
  cfg.result_offset = 4096;
  cfg.result_bytes = sizeof(namespace_info);
  REQUIRE(on_qp1(cfg).cqe.status == 0);
  namespace_info ns1;
  std::memcpy(&ns1, h.area() + 4096, sizeof ns1);
  CHECK(ns1.nsid != h.ns.nsid);
  CHECK(ns1.chunk_base >= h.ns.chunk_base + h.ns.chunk_count);

  auto expect_reject = [&](const command_outcome& r, errc code, const char* what) {
    CHECK_MESSAGE(r.cqe.status == static_cast<int16_t>(code), what << ": " << r.error);
    CHECK_MESSAGE(!r.error.empty(), what);
    CHECK(r.result_bytes == 0);
  };
  sq_entry e{};
  e.opcode = 0x55;
  e.nsid = h.ns.nsid;
  expect_reject(h.raw(e), errc::kInvalidArgument, "unknown opcode");

  e = sq_entry{};
  e.opcode = static_cast<uint8_t>(opcode::kStats);
  e.result_offset = h.area_bytes() - 8;
  e.result_bytes = sizeof(device_stats);
  expect_reject(h.raw(e), errc::kInvalidArgument, "result outside the data area");

  e.result_offset = 4;
  e.result_bytes = sizeof(device_stats);
  expect_reject(h.raw(e), errc::kInvalidArgument, "misaligned result");

  e = sq_entry{};
  e.opcode = static_cast<uint8_t>(opcode::kWriteKv);
  e.nsid = h.ns.nsid;
  e.data_offset = UINT64_MAX - 4;
  e.data_bytes = 100;
  expect_reject(h.raw(e), errc::kInvalidArgument, "data offset overflow");

  // Write with a payload size that does not match its arguments.
  const uint32_t id0 = h.tables[{1, 0}].back();
  std::memcpy(h.area(), &id0, 4);
  e = sq_entry{};
  e.opcode = static_cast<uint8_t>(opcode::kWriteKv);
  e.nsid = h.ns.nsid;
  e.data_bytes = 4 + 10;
  set_args(e, write_kv_args{1, 0, 2, n % h.ns.tokens_per_page, 1, 1, 0});
  expect_reject(h.raw(e), errc::kInvalidArgument, "payload size");
  // Not append-only (first token behind what the chunk holds).
  e.data_bytes = static_cast<uint32_t>(4 + 2 * 2 * h.row());
  set_args(e, write_kv_args{1, 0, 2, 0, 1, 1, 0});
  expect_reject(h.raw(e), errc::kInvalidArgument, "rewrite");
  // Layer out of range.
  set_args(e, write_kv_args{1, 9, 2, 0, 1, 1, 0});
  expect_reject(h.raw(e), errc::kLayerOutOfRange, "layer");

  // Queue pair 1 uses namespace 0's nsid: not its namespace.
  e = sq_entry{};
  e.opcode = static_cast<uint8_t>(opcode::kStats);
  e.opcode = static_cast<uint8_t>(opcode::kAttend);
  e.nsid = h.ns.nsid;
  expect_reject(on_qp1(e), errc::kInvalidArgument, "foreign nsid");
  // Queue pair 1 names a chunk of namespace 0 inside its own namespace: rejected.
  const uint32_t foreign = static_cast<uint32_t>(h.ns.chunk_base);
  std::memcpy(h.area(), &foreign, 4);
  e = sq_entry{};
  e.opcode = static_cast<uint8_t>(opcode::kWriteKv);
  e.nsid = ns1.nsid;
  e.data_bytes = static_cast<uint32_t>(4 + 2 * 2 * h.row());
  set_args(e, write_kv_args{1, 0, 0, 0, 1, 1, 0});
  expect_reject(on_qp1(e), errc::kInvalidArgument, "foreign chunk write");
  set_args(e, map_args{1, 0, 1});
  e.opcode = static_cast<uint8_t>(opcode::kMap);
  e.data_bytes = 4;
  expect_reject(on_qp1(e), errc::kInvalidArgument, "foreign chunk map");
  e = sq_entry{};
  e.opcode = static_cast<uint8_t>(opcode::kRead);
  e.nsid = ns1.nsid;
  e.result_bytes = 1 << 20;
  set_args(e, read_args{foreign, 1});
  expect_reject(on_qp1(e), errc::kInvalidArgument, "foreign chunk read");
  // Namespace 1 does not know namespace 0's sequence.
  const auto q = csd_test::random_q(rng, 2 * 64);
  std::memcpy(h.area(), std::vector<attend_entry>{{1, n, 0}}.data(), sizeof(attend_entry));
  std::memcpy(h.area() + sizeof(attend_entry), q.data(), q.size() * 4);
  e = sq_entry{};
  e.opcode = static_cast<uint8_t>(opcode::kAttend);
  e.nsid = ns1.nsid;
  e.data_bytes = static_cast<uint32_t>(sizeof(attend_entry) + q.size() * 4);
  e.result_offset = 1 << 20;
  e.result_bytes = static_cast<uint32_t>(q.size() * 4 + 8);
  set_args(e, attend_args{0, 1});
  expect_reject(on_qp1(e), errc::kUnknownSequence, "foreign sequence");
  // Attend over more tokens than stored; a zero-item batch; a too-small result buffer.
  std::vector<float> out, lse;
  CHECK(h.attend(0, {attend_entry{1, n + 1, 0}}, q.data(), out, lse).code() == errc::kInvalidArgument);
  e.nsid = h.ns.nsid;
  set_args(e, attend_args{0, 0});
  expect_reject(h.raw(e), errc::kInvalidArgument, "empty batch");
  set_args(e, attend_args{0, 1});
  e.result_bytes = 8;
  expect_reject(h.raw(e), errc::kInvalidArgument, "small result");
  // Bad config: page size different from the flash page; unsupported head dim.
  namespace_config bad = h.cfg;
  bad.page_bytes = 8192;
  std::memcpy(h.area(), &bad, sizeof bad);
  expect_reject(h.raw(cfg), errc::kInvalidArgument, "config page");
  bad = h.cfg;
  bad.head_dim = 48;
  std::memcpy(h.area(), &bad, sizeof bad);
  expect_reject(h.raw(cfg), errc::kUnsupported, "config head dim");

  // Still serving: the original namespace attends correctly, and stats counted the failures.
  check_attend(h, 0, {1}, {&m}, rng);
  CHECK(h.stats().commands_failed >= 15);
  // Dropping queue pair 1 deletes its namespace.
  dev.drop_queue_pair(1);
  e = sq_entry{};
  e.opcode = static_cast<uint8_t>(opcode::kReclaim);
  e.nsid = ns1.nsid;
  expect_reject(on_qp1(e), errc::kInvalidArgument, "deleted namespace");
}

// Found by fuzz/drive_fuzzer.cpp (docs/reliability.md).
TEST_CASE("fuzzer findings: an empty map, and namespace tables beyond the flash within the DRAM budget") {
  drive_options o = small_flash();
  o.buffer_bytes = 1 << 20;
  harness h = make(o);
  REQUIRE(h.configure(2, 1, 64, dtype::kF16).ok());
  std::mt19937 rng(8);
  const auto k = csd_test::random_rows(rng, 20, 2, 64, dtype::kF16);
  const auto v = csd_test::random_rows(rng, 20, 2, 64, dtype::kF16);
  REQUIRE(h.append(1, 0, 0, k.data(), v.data(), 20, 20).ok());

  // A map of no chunks forgets a (sequence, layer)'s table: a valid command, with no payload
  // (it copied zero bytes to a null vector: undefined behaviour, reported by UBSan).
  sq_entry e{};
  e.opcode = static_cast<uint8_t>(opcode::kMap);
  e.nsid = h.ns.nsid;
  set_args(e, map_args{1, 0, 0});
  CHECK(h.run(e).ok());
  std::vector<float> out, lse;
  const auto q = csd_test::random_q(rng, 2 * 64);
  CHECK(h.attend(0, {attend_entry{1, 20, 0}}, q.data(), out, lse).code() == errc::kUnknownSequence);
  e = sq_entry{};  // likewise: a reclaim of no chunks
  e.opcode = static_cast<uint8_t>(opcode::kReclaim);
  e.nsid = h.ns.nsid;
  set_args(e, reclaim_args{});
  CHECK(h.run(e).ok());

  // A namespace of 2^26 chunks made the drive allocate and fill ~1.3 GB of tables for a flash of a
  // few thousand pages. Beyond what the flash holds, the tables must fit the DRAM budget.
  const auto config = [&](uint64_t chunks) {
    namespace_config c = h.cfg;
    c.capacity_chunks = chunks;
    std::memcpy(h.area(), &c, sizeof c);
    sq_entry cfg{};
    cfg.opcode = static_cast<uint8_t>(opcode::kConfig);
    cfg.data_bytes = sizeof c;
    cfg.result_offset = 4096;
    cfg.result_bytes = sizeof(namespace_info);
    return h.raw(cfg);
  };
  const uint64_t fit = o.flash.total_pages() / 4;  // 4 pages per 2-head chunk
  command_outcome r = config(uint64_t{1} << 26);
  CHECK(r.cqe.status == static_cast<int16_t>(errc::kNoSpace));
  CHECK(r.error.find("DRAM budget") != std::string::npos);
  CHECK(config(fit).cqe.status == 0);      // what the flash holds: always
  CHECK(config(4 * fit).cqe.status == 0);  // overcommitted, tables well within 1 MiB
}

// Found by fuzz/drive_fuzzer.cpp: a chunk read back returned whatever its DRAM slot held past the
// rows written. Here a slot freed by one chunk is reused by the next; in the fuzzer, heap memory
// that had held another namespace's KV (the drive's allocator reuses it) came back to the host.
TEST_CASE("fuzzer findings: the rows of a chunk past those written read back as zeros") {
  harness h = make(small_flash());
  REQUIRE(h.configure(2, 1, 64, dtype::kF16).ok());
  std::mt19937 rng(9);
  const auto k = csd_test::random_rows(rng, 20, 2, 64, dtype::kF16);
  const auto v = csd_test::random_rows(rng, 20, 2, 64, dtype::kF16);
  REQUIRE(h.append(1, 0, 0, k.data(), v.data(), 20, 20).ok());  // a partial chunk: stays in its slot
  const uint32_t first = h.tables[{1, 0}].front();
  REQUIRE(h.reclaim_chunks({first}).ok());                    // its slot is free again
  REQUIRE(h.append(2, 0, 0, k.data(), v.data(), 1, 1).ok());  // a fresh chunk takes it
  const uint32_t second = h.tables[{2, 0}].front();
  REQUIRE(second != first);

  sq_entry e{};
  e.opcode = static_cast<uint8_t>(opcode::kRead);
  e.nsid = h.ns.nsid;
  e.result_bytes = 1 << 20;
  set_args(e, read_args{second, 1});
  const command_outcome r = h.raw(e);
  REQUIRE(r.cqe.status == 0);
  const uint64_t page = 4096, row = h.row();
  uint64_t stale = 0;
  for (uint64_t p = 0; p < 4; ++p)  // [K|V][head 0, 1]: row 0 written, the rest never
    for (uint64_t i = row; i < page; ++i) stale += h.area()[p * page + i] != std::byte{0};
  CHECK(stale == 0);
  for (uint64_t p = 0; p < 4; ++p) {
    const std::byte* want = (p < 2 ? k.data() : v.data()) + (p % 2) * row;
    CHECK(std::memcmp(h.area() + p * page, want, row) == 0);
  }
}

// Found by fuzz/drive_fuzzer.cpp: a write at page-table position ~2^29 (under the old 2^30 limit)
// made the drive resize that (sequence, layer)'s mirrored table to 3 GB; a copy's position was not
// checked at all. A table cannot hold more chunks than the namespace has: positions are bounded by it.
TEST_CASE("fuzzer findings: page-table positions beyond the namespace's chunks are refused") {
  harness h = make(small_flash());
  REQUIRE(h.configure(2, 1, 64, dtype::kF16).ok());
  const uint32_t count = static_cast<uint32_t>(h.ns.chunk_count), base = static_cast<uint32_t>(h.ns.chunk_base);
  std::mt19937 rng(10);
  const auto k = csd_test::random_rows(rng, 1, 2, 64, dtype::kF16);
  const auto write_at = [&](uint32_t chunk, uint32_t position) {
    std::memcpy(h.area(), &chunk, 4);
    std::memcpy(h.area() + 4, k.data(), k.size());
    std::memcpy(h.area() + 4 + k.size(), k.data(), k.size());
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kWriteKv);
    e.nsid = h.ns.nsid;
    e.data_bytes = static_cast<uint32_t>(4 + 2 * k.size());
    set_args(e, write_kv_args{1, 0, position, 0, 1, 1, 0});
    return h.raw(e);
  };
  for (uint32_t position : {count, 1u << 29, UINT32_MAX - 1}) {
    const command_outcome r = write_at(base, position);
    CHECK(r.cqe.status == static_cast<int16_t>(errc::kInvalidArgument));
  }
  CHECK(write_at(base, count - 1).cqe.status == 0);  // the last position is fine

  sq_entry e{};
  e.opcode = static_cast<uint8_t>(opcode::kCopy);
  e.nsid = h.ns.nsid;
  set_args(e, copy_args{2, 0, count, base + 1, base, 1});
  CHECK(h.raw(e).cqe.status == static_cast<int16_t>(errc::kInvalidArgument));
  set_args(e, copy_args{2, 0, 0, base + 1, base, 1});
  CHECK(h.raw(e).cqe.status == 0);
}
TEST_CASE("file-backed flash: a persistent namespace commits, recovers, and refuses bad commands") {
  char tmpl[] = "/tmp/instinfer-csd-drive-XXXXXX";
  REQUIRE(mkdtemp(tmpl) != nullptr);
  drive_options o = small_flash();
  o.flash_path = std::string(tmpl) + "/flash.img";
  o.allow_buffered = true;
  o.keep_flash = true;
  {
    harness ram = make(small_flash());
    CHECK(ram.configure(2, 2, 128, dtype::kF16, 2, false, true).code() == errc::kUnsupported);
  }
  std::mt19937 rng(7);
  const uint32_t n = 100;
  const auto k = csd_test::random_rows(rng, n, 2, 128, dtype::kF16);
  const auto v = csd_test::random_rows(rng, n, 2, 128, dtype::kF16);
  std::vector<uint32_t> ids;
  std::vector<std::byte> stored;
  const auto commit = [](harness& h, const std::vector<uint32_t>& chunks, const std::string& tables,
                         int64_t size_delta = 0) {
    std::memcpy(h.area(), chunks.data(), chunks.size() * 4);
    std::memcpy(h.area() + chunks.size() * 4, tables.data(), tables.size());
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kCommit);
    e.nsid = h.ns.nsid;
    e.data_bytes = static_cast<uint32_t>(static_cast<int64_t>(chunks.size() * 4 + tables.size()) + size_delta);
    set_args(e, commit_args{static_cast<uint32_t>(chunks.size()), static_cast<uint32_t>(tables.size())});
    return h.run(e);
  };
  const auto read_chunk = [](harness& h, uint32_t chunk, uint32_t tokens) {
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kRead);
    e.nsid = h.ns.nsid;
    e.result_offset = 1 << 20;
    e.result_bytes = 1 << 20;
    set_args(e, read_args{chunk, tokens});
    REQUIRE(h.run(e).ok());
    return std::vector<std::byte>(h.area() + (1 << 20), h.area() + (1 << 20) + 4 * 4096);
  };
  {
    auto d = drive::create(o);
    REQUIRE_MESSAGE(d.ok(), d.error().to_string());
    harness h;
    h.dev = std::move(*d);
    CHECK(h.configure(2, 2, 128, dtype::kF16, 2, true, true).code() == errc::kUnsupported);  // with SparF
    REQUIRE(h.configure(2, 2, 128, dtype::kF16, 2, false, true).ok());
    REQUIRE(h.append(9, 0, 0, k.data(), v.data(), n, 40).ok());
    ids = h.tables[{9, 0}];
    REQUIRE(ids.size() == (n + h.ns.tokens_per_page - 1) / h.ns.tokens_per_page);
    // Bad commits: a wrong payload size, a chunk twice, an empty chunk, a chunk outside.
    CHECK(commit(h, ids, "tables", 1).code() == errc::kInvalidArgument);
    CHECK(commit(h, {ids[0], ids[0]}, "t").code() == errc::kInvalidArgument);
    CHECK(commit(h, {static_cast<uint32_t>(h.next_chunk)}, "t").code() == errc::kInvalidArgument);
    CHECK(commit(h, {static_cast<uint32_t>(h.ns.chunk_base + h.ns.chunk_count)}, "t").code() == errc::kInvalidArgument);
    REQUIRE(commit(h, ids, "the host's tables").ok());
    stored = read_chunk(h, ids.back(), n % h.ns.tokens_per_page);
    // After the commit: more tokens in the tail (in DRAM), not committed.
    REQUIRE(h.append(9, 0, n, k.data(), v.data(), 3, 40).ok());
  }
  {
    auto d = drive::create(o);
    REQUIRE_MESSAGE(d.ok(), d.error().to_string());
    harness h;
    h.dev = std::move(*d);
    REQUIRE(h.configure(2, 2, 128, dtype::kF16, 2, false, true).ok());
    // The host's tables come back, in pieces as small as the result room asks.
    std::string got;
    uint64_t total = 0;
    do {
      sq_entry e{};
      e.opcode = static_cast<uint8_t>(opcode::kRecover);
      e.nsid = h.ns.nsid;
      e.result_bytes = 8 + 5;
      set_args(e, recover_args{got.size()});
      const command_outcome r = h.raw(e);
      REQUIRE(r.cqe.status == 0);
      std::memcpy(&total, h.area(), 8);
      got.append(reinterpret_cast<const char*>(h.area()) + 8, r.cqe.result - 8);
    } while (got.size() < total);
    CHECK(got == "the host's tables");
    sq_entry bad{};
    bad.opcode = static_cast<uint8_t>(opcode::kRecover);
    bad.nsid = h.ns.nsid;
    bad.result_bytes = 64;
    set_args(bad, recover_args{total + 1});
    CHECK(h.run(bad).code() == errc::kInvalidArgument);
    bad.result_bytes = 7;
    set_args(bad, recover_args{0});
    CHECK(h.run(bad).code() == errc::kInvalidArgument);
    // The committed tail, exactly (the 3 tokens after the commit are gone).
    CHECK(read_chunk(h, ids.back(), n % h.ns.tokens_per_page) == stored);
    sq_entry more{};
    more.opcode = static_cast<uint8_t>(opcode::kRead);
    more.nsid = h.ns.nsid;
    more.result_bytes = 1 << 20;
    set_args(more, read_args{ids.back(), n % h.ns.tokens_per_page + 1});
    CHECK(h.run(more).code() == errc::kInvalidArgument);
    // One persistent namespace a drive.
    CHECK(h.configure(2, 2, 128, dtype::kF16, 2, false, true).code() == errc::kBusy);
  }
  std::remove((o.flash_path + ".meta").c_str());
  std::remove(o.flash_path.c_str());
  rmdir(tmpl);
}

// Two ctest entries from this binary: the default run (everything but file flash), and
// "file-flash": only the file-backed flash case, skipped (exit 77) where the kernel or emulator
// has no io_uring (qemu-user), so it is never counted as passed without running.
int main(int argc, char** argv) {
  const bool file_flash = argc > 1 && std::string_view(argv[1]) == "file-flash";
  doctest::Context ctx;
  if (file_flash) {
    io_uring_params params{};
    const long fd = syscall(__NR_io_uring_setup, 1, &params);
    if (fd < 0) {
      std::printf("skipped: io_uring is unavailable here (%s)\n", std::strerror(errno));
      return 77;
    }
    close(static_cast<int>(fd));
    ctx.addFilter("test-case", "file-backed flash*");
    --argc, ++argv;
  } else {
    ctx.addFilter("test-case-exclude", "file-backed flash*");
  }
  ctx.applyCommandLine(argc, argv);
  return ctx.run();
}
