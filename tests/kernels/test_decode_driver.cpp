// The decode driver over two chunk sources: the in-memory one (the host backend's) and a staging
// one that copies each window into per-worker double buffers holding only the item's kv heads, at
// most W chunks at a time (the shape of the drive's page reader). Both must match the float64
// reference, and each other.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "decode_test_util.hpp"
#include "instinfer/attention/decode_driver.hpp"

using namespace instinfer;

namespace {

// INSTINFER_TEST_REDUCED (scripts/test-aarch64 sets it: emulated threads are slow under qemu-user,
// and the full sweep took 14 minutes there) keeps each axis's extremes: f16, 1 and 5 threads,
// whole-sequence and one-head items. The full sweep runs natively.
bool reduced_sweep() {
  static const bool reduced = std::getenv("INSTINFER_TEST_REDUCED") != nullptr;
  return reduced;
}
std::vector<dtype> sweep_dtypes() {
  return reduced_sweep() ? std::vector<dtype>{dtype::kF16} : std::vector<dtype>{dtype::kF16, dtype::kF32};
}
std::vector<uint32_t> sweep_threads() {
  return reduced_sweep() ? std::vector<uint32_t>{1, 5} : std::vector<uint32_t>{1, 2, 5};
}
std::vector<uint32_t> sweep_heads_per_item() {
  return reduced_sweep() ? std::vector<uint32_t>{0, 1} : std::vector<uint32_t>{0, 1, 2};
}

constexpr double kTolerance = 1e-5;

struct aligned_delete {
  void operator()(std::byte* p) const noexcept { ::operator delete[](p, std::align_val_t{64}); }
};
using aligned_buffer = std::unique_ptr<std::byte[], aligned_delete>;

// Stages windows of at most `window` chunks into per-worker double buffers, each staged chunk
// holding the item's kv heads only (layout(): `staged_heads` kv heads), and checks how the driver
// uses it: one window per worker at a time, windows of an item in token order, release after acquire.
class staging_source {
 public:
  staging_source(const test::paged_batch& b, uint32_t staged_heads, uint32_t window)
      : batch_(b), staged_(chunk_layout::make(b.params.layout.page, staged_heads)), window_(window) {}

  chunk_layout layout() const noexcept { return staged_; }
  uint32_t max_window_chunks() const noexcept { return window_; }

  status prepare(const decode_plan& plan, uint32_t n_workers) noexcept {
    try {
      workers_.resize(n_workers);
      for (worker& w : workers_) {
        for (aligned_buffer& buf : w.buffers)
          if (!buf) buf.reset(new (std::align_val_t{64}) std::byte[window_ * staged_.chunk_bytes()]);
        w.ptrs.resize(window_);
      }
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory, "staging buffers"};
    }
    (void)plan;  // a real source would turn plan.items() into its read order here
    return {};
  }

  result<chunk_window> acquire(uint32_t worker_index, const decode_work_item& item, uint32_t first,
                               uint32_t n) noexcept {
    if (fail_at_ > 0 && acquired_.fetch_add(1) + 1 == fail_at_) return status{errc::kIoError, "injected read failure"};
    worker& w = workers_.at(worker_index);
    const bool new_item =
        w.item_first != item.chunk_begin || w.item_seq != item.seq || w.item_head != item.kv_head_begin;
    ok_ = ok_ && !w.holding && n >= 1 && n <= window_ && first >= item.chunk_begin && first + n <= item.chunk_end();
    ok_ = ok_ && (new_item ? first == item.chunk_begin : first == w.next_chunk);
    w.holding = true;
    w.item_seq = item.seq;
    w.item_head = item.kv_head_begin;
    w.item_first = item.chunk_begin;
    w.next_chunk = first + n;
    std::byte* buf = w.buffers[w.flip ^= 1].get();  // double buffering: the other half may still be in flight
    const chunk_layout& full = batch_.params.layout;
    const uint64_t page = full.page.page_bytes;
    for (uint32_t j = 0; j < n; ++j) {
      const std::byte* src = batch_.chunks[item.seq][first + j];
      std::byte* dst = buf + j * staged_.chunk_bytes();
      for (uint32_t h = 0; h < item.n_kv_heads(); ++h) {
        std::memcpy(dst + staged_.page_offset(kv_kind::kKey, h),
                    src + full.page_offset(kv_kind::kKey, item.kv_head_begin + h), page);
        std::memcpy(dst + staged_.page_offset(kv_kind::kValue, h),
                    src + full.page_offset(kv_kind::kValue, item.kv_head_begin + h), page);
      }
      w.ptrs[j] = dst;
    }
    return chunk_window{w.ptrs.data(), 0};
  }

  void release(uint32_t worker_index, const decode_work_item&, const chunk_window& window) noexcept {
    worker& w = workers_.at(worker_index);
    ok_ = ok_ && w.holding && window.chunks == w.ptrs.data();
    w.holding = false;
    released_.fetch_add(1);
  }

  bool used_correctly() const noexcept { return ok_; }
  void fail_at(uint32_t k) noexcept { fail_at_ = k; }

 private:
  struct worker {
    aligned_buffer buffers[2];
    std::vector<const std::byte*> ptrs;
    unsigned flip = 0;
    bool holding = false;
    uint32_t item_seq = UINT32_MAX, item_head = UINT32_MAX, item_first = UINT32_MAX, next_chunk = 0;
  };
  const test::paged_batch& batch_;
  chunk_layout staged_;
  uint32_t window_;
  std::vector<worker> workers_;
  std::atomic<bool> ok_{true};
  std::atomic<uint32_t> acquired_{0}, released_{0};
  uint32_t fail_at_ = 0;
};
static_assert(chunk_source<staging_source>);

std::unique_ptr<decode_driver> make_driver(const decode_params& p, uint32_t threads, uint32_t heads_per_item) {
  auto kernel = select_decode_heads_kernel(best_cpu_isa(), p);
  REQUIRE_MESSAGE(kernel.ok(), kernel.error().to_string());
  decode_driver_options o;
  o.n_threads = threads;
  o.kv_heads_per_item = heads_per_item;
  o.min_item_tokens = 64;  // small, so that short test sequences split too
  auto d = decode_driver::create(p, *kernel, o);
  REQUIRE_MESSAGE(d.ok(), d.error().to_string());
  return std::move(d).value();
}

std::vector<decode_sequence> sequences_of(const test::paged_batch& b) {
  std::vector<decode_sequence> s;
  for (const decode_work& w : b.work) s.push_back({w.n_chunks, w.n_tokens, w.q, w.out, w.lse});
  return s;
}

}  // namespace

TEST_CASE("decode_driver: staging windows and the in-memory source both match the float64 reference") {
  std::printf("seed %llu (set INSTINFER_TEST_SEED to reproduce)\n", static_cast<unsigned long long>(test::test_seed()));
  for (dtype t : sweep_dtypes()) {
    for (uint32_t group : {1u, 4u, 7u}) {
      for (uint32_t kv_heads : {1u, 3u}) {
        const auto p = test::make_params(64, t, group, kv_heads, 1024);
        const uint32_t tpp = p.layout.tokens();
        const std::vector<uint32_t> lengths = {1, 0, tpp, 3 * tpp + 5, 2000, tpp - 1, 0, 40 * tpp + 3};
        test::paged_batch b(p, lengths);
        const auto seqs = sequences_of(b);
        for (uint32_t threads : sweep_threads()) {
          for (uint32_t heads_per_item : sweep_heads_per_item()) {
            INFO(dtype_name(t) << " group " << group << " kv heads " << kv_heads << " threads " << threads
                               << " heads/item " << heads_per_item);
            auto driver = make_driver(p, threads, heads_per_item);
            memory_chunk_source memory(p.layout, b.work);
            REQUIRE(driver->run(seqs, memory).ok());
            const auto e_mem = b.check();
            CHECK(e_mem.out <= kTolerance);
            CHECK(e_mem.lse <= kTolerance);
            const auto mem_out = b.out;
            const auto mem_lse = b.lse;
            for (uint32_t window : {1u, 3u, 1024u}) {
              INFO("window " << window);
              for (auto& o : b.out) std::fill(o.begin(), o.end(), std::numeric_limits<float>::quiet_NaN());
              const uint32_t staged_heads = heads_per_item == 0 ? kv_heads : std::min(heads_per_item, kv_heads);
              staging_source staging(b, staged_heads, window);
              const status s = driver->run(seqs, staging);
              REQUIRE_MESSAGE(s.ok(), s.to_string());
              CHECK(staging.used_correctly());
              const auto e_staged = b.check();
              CHECK(e_staged.out <= kTolerance);
              CHECK(e_staged.lse <= kTolerance);
              for (size_t i = 0; i < lengths.size(); ++i) {
                const std::vector<double> mem(mem_out[i].begin(), mem_out[i].end());
                CHECK(reference::relative_error(b.out[i], mem) <= kTolerance);
              }
              // Windows that hold whole items change nothing: the same kernel calls, bit for bit.
              if (window == 1024)
                for (size_t i = 0; i < lengths.size(); ++i) {
                  CHECK(b.out[i] == mem_out[i]);
                  CHECK(std::memcmp(b.lse[i].data(), mem_lse[i].data(), b.lse[i].size() * sizeof(float)) == 0);
                }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("host_decoder is the driver over the in-memory source, bit for bit") {
  const auto p = test::make_params(128, dtype::kBF16, 4, 2, 4096);
  const std::vector<uint32_t> lengths = {70, 0, 9000, 1, 20000};
  test::paged_batch b(p, lengths);
  auto host = host_decoder::create(p, 3, best_cpu_isa());
  REQUIRE(host.ok());
  REQUIRE((*host)->run(b.work).ok());
  const auto host_out = b.out;
  const auto host_lse = b.lse;
  auto kernel = select_decode_heads_kernel(best_cpu_isa(), p);
  REQUIRE(kernel.ok());
  decode_driver_options o;
  o.n_threads = 3;
  auto driver = decode_driver::create(p, *kernel, o);
  REQUIRE(driver.ok());
  memory_chunk_source memory(p.layout, b.work);
  REQUIRE((*driver)->run(sequences_of(b), memory).ok());
  CHECK((*driver)->plan().items().size() > lengths.size());  // the long sequences were split
  for (size_t i = 0; i < lengths.size(); ++i) {
    CHECK(b.out[i] == host_out[i]);
    CHECK(std::memcmp(b.lse[i].data(), host_lse[i].data(), b.lse[i].size() * sizeof(float)) == 0);
  }
}

TEST_CASE("decode_driver: a source failure is returned, and the next run is right again") {
  const auto p = test::make_params(64, dtype::kF16, 2, 2, 1024);
  const std::vector<uint32_t> lengths = {3000, 17, 5000};
  test::paged_batch b(p, lengths);
  const auto seqs = sequences_of(b);
  for (uint32_t threads : {1u, 3u}) {
    auto driver = make_driver(p, threads, 1);
    staging_source failing(b, 1, 2);
    failing.fail_at(5);
    const status s = driver->run(seqs, failing);
    CHECK(s.code() == errc::kIoError);
    CHECK(s.message() == "injected read failure");
    staging_source fine(b, 1, 2);
    REQUIRE(driver->run(seqs, fine).ok());
    CHECK(fine.used_correctly());
    const auto e = b.check();
    CHECK(e.out <= kTolerance);
    CHECK(e.lse <= kTolerance);
  }
}

TEST_CASE("decode_driver: bad batches and sources that cannot serve an item are rejected before any work") {
  const auto p = test::make_params(64, dtype::kF32, 2, 4, 1024);
  const std::vector<uint32_t> lengths = {100};
  test::paged_batch b(p, lengths);
  auto driver = make_driver(p, 2, 2);
  auto seqs = sequences_of(b);
  staging_source too_narrow(b, 1, 4);  // items cover 2 kv heads, the source stages 1
  CHECK(driver->run(seqs, too_narrow).code() == errc::kInvalidArgument);
  auto other = test::make_params(64, dtype::kF16, 2, 4, 1024);
  memory_chunk_source wrong_pages(other.layout, b.work);
  CHECK(driver->run(seqs, wrong_pages).code() == errc::kInvalidArgument);
  seqs[0].n_tokens = 100000;
  memory_chunk_source memory(p.layout, b.work);
  CHECK(driver->run(seqs, memory).code() == errc::kInvalidArgument);
  CHECK(std::isnan(b.out[0][0]));  // nothing written
  CHECK(decode_driver::create(p, nullptr, {}).error().code() == errc::kInvalidArgument);
  decode_driver_options none;
  none.n_threads = 0;
  auto scalar = select_decode_heads_kernel(cpu_isa::kScalar, p);
  REQUIRE(scalar.ok());
  CHECK(decode_driver::create(p, *scalar, none).error().code() == errc::kInvalidArgument);
}

// Causal chunk rows (decode_sequence::n_rows): every row against the float64 reference over its
// visible prefix, through split items (partials merged), windows of 1 and 3 chunks and the
// in-memory source. The page padding holds NaN: a row reading past its prefix would show it.
TEST_CASE("decode_driver: causal rows match the float64 reference over each row's prefix") {
  for (dtype t : sweep_dtypes()) {
    for (uint32_t group : {1u, 4u, 3u}) {
      for (uint32_t kv_heads : {1u, 3u}) {
        const auto p = test::make_params(64, t, group, kv_heads, 1024);
        const uint32_t tpp = p.layout.tokens();
        const std::vector<uint32_t> lengths = {1, tpp, 3 * tpp + 5, 40 * tpp + 3, 2000};
        const std::vector<uint32_t> n_rows = {1, tpp - 3, 2 * tpp + 2, 3 * tpp + 1, 17};
        test::paged_batch b(p, lengths);
        const uint32_t hq = p.n_q_heads(), hd = p.layout.page.head_dim;
        std::vector<std::vector<float>> q(lengths.size()), out(lengths.size()), lse(lengths.size());
        std::vector<decode_sequence> seqs(lengths.size());
        for (size_t s = 0; s < lengths.size(); ++s) {
          q[s].resize(size_t{n_rows[s]} * hq * hd);
          for (float& x : q[s]) x = test::nonzero_uniform(2.0f);
          out[s].assign(q[s].size(), 0.0f);
          lse[s].assign(size_t{n_rows[s]} * hq, 0.0f);
          seqs[s] = decode_sequence{};
          seqs[s].n_chunks = b.work[s].n_chunks;
          seqs[s].n_tokens = lengths[s];
          seqs[s].q = q[s].data();
          seqs[s].out = out[s].data();
          seqs[s].lse = lse[s].data();
          seqs[s].n_rows = n_rows[s];
          seqs[s].first_pos = lengths[s] - n_rows[s];
        }
        // The reference, row by row.
        std::vector<std::vector<double>> want(lengths.size()), want_lse(lengths.size());
        for (size_t s = 0; s < lengths.size(); ++s) {
          want[s].resize(out[s].size());
          want_lse[s].resize(lse[s].size());
          for (uint32_t r = 0; r < n_rows[s]; ++r)
            reference::attend_chunks(p, b.chunks[s].data(), seqs[s].first_pos + r + 1,
                                     q[s].data() + size_t{r} * hq * hd, want[s].data() + size_t{r} * hq * hd,
                                     want_lse[s].data() + size_t{r} * hq);
        }
        const auto check = [&](const char* what) {
          INFO(what);
          for (size_t s = 0; s < lengths.size(); ++s) {
            CAPTURE(s);
            CHECK(reference::relative_error(out[s], want[s]) <= kTolerance);
            double le = 0.0;
            for (size_t i = 0; i < lse[s].size(); ++i)
              le = std::max(le, std::fabs(lse[s][i] - want_lse[s][i]) / std::max(1.0, std::fabs(want_lse[s][i])));
            CHECK(le <= kTolerance);
          }
        };
        for (uint32_t threads : sweep_threads()) {
          for (uint32_t heads_per_item : sweep_heads_per_item()) {
            INFO(dtype_name(t) << " group " << group << " kv heads " << kv_heads << " threads " << threads
                               << " heads/item " << heads_per_item);
            auto driver = make_driver(p, threads, heads_per_item);
            // Without a rows kernel, causal rows are refused.
            memory_chunk_source plain(p.layout, b.work);
            CHECK(driver->run(seqs, plain).code() == errc::kUnsupported);
            auto rows = select_decode_rows_kernel(best_cpu_isa(), p);
            REQUIRE(rows.ok());
            driver->set_rows_kernel(*rows);
            memory_chunk_source memory(p.layout, b.work);
            REQUIRE(driver->run(seqs, memory).ok());
            check("memory");
            for (uint32_t window : {1u, 3u}) {
              INFO("window " << window);
              for (auto& o : out) std::fill(o.begin(), o.end(), std::numeric_limits<float>::quiet_NaN());
              const uint32_t staged_heads = heads_per_item == 0 ? kv_heads : std::min(heads_per_item, kv_heads);
              staging_source staging(b, staged_heads, window);
              const status s = driver->run(seqs, staging);
              REQUIRE_MESSAGE(s.ok(), s.to_string());
              CHECK(staging.used_correctly());
              check("staged");
            }
            // A decode batch through the same driver still works (rows and plain rows mixed).
            std::vector<decode_sequence> mixed = seqs;
            mixed[1].n_rows = 0;
            mixed[1].first_pos = 0;
            REQUIRE(driver->run(mixed, memory).ok());
            std::vector<double> dec(size_t{hq} * hd), dec_lse(hq);
            reference::attend_chunks(p, b.chunks[1].data(), lengths[1], q[1].data(), dec.data(), dec_lse.data());
            CHECK(reference::relative_error(std::span<const float>(out[1].data(), dec.size()), dec) <= kTolerance);
            // Rows past the sequence's tokens are refused.
            std::vector<decode_sequence> bad = seqs;
            bad[2].first_pos += 1;
            CHECK(driver->run(bad, memory).code() == errc::kInvalidArgument);
          }
        }
      }
    }
  }
}
