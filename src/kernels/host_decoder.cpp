// host_decoder: plans a decode batch into work items and runs them on a persistent thread pool.
//
// A work item is (sequence, kv-head range, chunk range); the kernel sweeps each chunk of the range
// once for all kv heads of the item (K pages of every head, then V pages: sequential memory), and
// fuses the query heads of each kv head (GQA). A sequence whose chunks are split over several
// items writes unnormalised partials to the workspace; the thread that finishes the sequence's
// last item merges them in chunk order with state.hpp's merge_state, normalises, and writes out
// and lse. Unsplit sequences write straight into the caller's output.
// status.hpp's result(T value) shadows result::value() when T is a function pointer (gcc -Wshadow);
// remove this once the parameter is renamed there.
#pragma GCC diagnostic ignored "-Wshadow"

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "decode_isa.hpp"
#include "instinfer/attention/decode.hpp"
#include "instinfer/core/thread_pool.hpp"

namespace instinfer {

namespace {

// Split only when it helps load balance, and never below this many tokens per item, so that the
// merge stays negligible next to the item's work.
constexpr uint32_t kItemsPerThread = 4;
constexpr uint32_t kMinItemTokens = 512;
constexpr uint32_t kMaxThreads = 1024;

struct work_item {
  uint32_t seq;
  uint32_t chunk_begin;
  uint32_t n_chunks;
  uint32_t last_tokens;
  uint32_t group;    // index into groups_
  uint32_t partial;  // partial slot (split groups only)
};

struct head_group {  // one sequence: all its kv heads
  uint32_t seq;
  uint32_t first_item;
  uint32_t n_items;
};

class host_decoder_impl final : public host_decoder {
 public:
  host_decoder_impl(const decode_params& params, uint32_t n_threads, cpu_isa isa, kernels::decode_heads_fn fn)
      : params_(params), isa_(isa), fn_(fn), pool_(n_threads) {}

  status run(std::span<const decode_work> batch) noexcept override {
    std::lock_guard<std::mutex> lock(mu_);
    INSTINFER_TRY(check_batch(batch));
    INSTINFER_TRY(plan(batch));
    batch_ = batch;
    next_item_.store(0, std::memory_order_relaxed);
    auto body = [this](uint32_t) noexcept { work(); };
    pool_.run(body);
    return {};
  }

  const decode_params& params() const noexcept override { return params_; }
  uint32_t n_threads() const noexcept override { return pool_.size(); }
  cpu_isa isa() const noexcept override { return isa_; }

 private:
  // Output floats of one sequence: [n_q_heads][head_dim].
  uint32_t group_floats() const noexcept { return params_.n_q_heads() * params_.layout.page.head_dim; }

  status check_batch(std::span<const decode_work> batch) const {
    const uint32_t tpp = params_.layout.tokens();
    for (size_t i = 0; i < batch.size(); ++i) {
      const decode_work& w = batch[i];
      // Messages are built only on failure: a valid batch allocates nothing.
      const auto where = [i] { return "decode batch entry " + std::to_string(i) + ": "; };
      if (w.q == nullptr || w.out == nullptr) return {errc::kInvalidArgument, where() + "q and out must not be null"};
      if (w.n_chunks > 0 && w.chunks == nullptr)
        return {errc::kInvalidArgument, where() + "chunks is null but n_chunks is " + std::to_string(w.n_chunks)};
      const uint64_t lo = w.n_chunks == 0 ? 0 : uint64_t{w.n_chunks - 1} * tpp + 1;
      const uint64_t hi = uint64_t{w.n_chunks} * tpp;
      if (w.n_tokens < lo || w.n_tokens > hi)
        return {errc::kInvalidArgument, where() + std::to_string(w.n_tokens) + " tokens do not fit " +
                                            std::to_string(w.n_chunks) + " chunks of " + std::to_string(tpp) +
                                            " tokens (every chunk but the last must be full)"};
      for (uint32_t c = 0; c < w.n_chunks; ++c)
        if (w.chunks[c] == nullptr)
          return {errc::kInvalidArgument, where() + "chunk pointer " + std::to_string(c) + " is null"};
    }
    return {};
  }

  status plan(std::span<const decode_work> batch) noexcept {
    const uint32_t tpp = params_.layout.tokens();
    uint64_t total_chunks = 0;
    for (const decode_work& w : batch) total_chunks += w.n_chunks;
    uint64_t target = UINT32_MAX;
    if (pool_.size() > 1) {
      const uint64_t min_chunks = (kMinItemTokens + tpp - 1) / tpp;
      const uint64_t want = uint64_t{pool_.size()} * kItemsPerThread;
      target = std::max<uint64_t>(min_chunks, (total_chunks + want - 1) / want);
    }
    try {
      items_.clear();
      groups_.clear();
      uint32_t n_partials = 0;
      for (uint32_t s = 0; s < batch.size(); ++s) {
        const decode_work& w = batch[s];
        const uint32_t parts = w.n_chunks == 0 ? 1u : static_cast<uint32_t>((w.n_chunks + target - 1) / target);
        const uint32_t g = static_cast<uint32_t>(groups_.size());
        groups_.push_back({s, static_cast<uint32_t>(items_.size()), parts});
        for (uint32_t p = 0; p < parts; ++p) {
          const uint32_t begin = static_cast<uint32_t>(uint64_t{w.n_chunks} * p / parts);
          const uint32_t end = static_cast<uint32_t>(uint64_t{w.n_chunks} * (p + 1) / parts);
          const uint32_t last = end == w.n_chunks && end > 0 ? w.n_tokens - (end - 1) * tpp : tpp;
          items_.push_back({s, begin, end - begin, last, g, parts > 1 ? n_partials++ : 0u});
        }
      }
      const size_t gf = group_floats();
      if (partial_o_.size() < size_t{n_partials} * gf) partial_o_.resize(size_t{n_partials} * gf);
      if (stats_.size() < items_.size() * params_.n_q_heads()) stats_.resize(items_.size() * params_.n_q_heads());
      if (remaining_cap_ < groups_.size()) {
        remaining_ = std::make_unique<std::atomic<uint32_t>[]>(groups_.size());
        remaining_cap_ = groups_.size();
      }
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory,
              "host_decoder: cannot grow the workspace for a batch of " + std::to_string(batch.size()) + " sequences"};
    }
    for (size_t g = 0; g < groups_.size(); ++g) remaining_[g].store(groups_[g].n_items, std::memory_order_relaxed);
    return {};
  }

  float* group_out(const head_group& g) const noexcept { return batch_[g.seq].out; }

  void work() noexcept {
    const uint32_t G = params_.n_q_heads();  // states per item
    const uint32_t D = params_.layout.page.head_dim;
    const size_t n_items = items_.size();
    for (;;) {
      const size_t i = next_item_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_items) return;
      const work_item& it = items_[i];
      const head_group& g = groups_[it.group];
      const decode_work& w = batch_[it.seq];
      const bool split = g.n_items > 1;
      float* o = split ? partial_o_.data() + size_t{it.partial} * group_floats() : group_out(g);
      softmax_stats* st = stats_.data() + i * G;
      fn_(params_, w.chunks + it.chunk_begin, it.n_chunks, it.last_tokens, 0, params_.layout.n_kv_heads, w.q, o, st);
      if (!split) {
        finish(w, st, o);
      } else if (remaining_[it.group].fetch_sub(1, std::memory_order_acq_rel) == 1) {
        // Last part of this group: merge all parts in chunk order into the caller's output.
        float* out = group_out(g);
        softmax_stats* acc = stats_.data() + size_t{g.first_item} * G;
        const work_item& first = items_[g.first_item];
        std::copy_n(partial_o_.data() + size_t{first.partial} * group_floats(), group_floats(), out);
        for (uint32_t p = 1; p < g.n_items; ++p) {
          const work_item& part = items_[g.first_item + p];
          const float* po = partial_o_.data() + size_t{part.partial} * group_floats();
          const softmax_stats* ps = stats_.data() + size_t{g.first_item + p} * G;
          for (uint32_t h = 0; h < G; ++h) merge_state(acc[h], out + size_t{h} * D, ps[h], po + size_t{h} * D, D);
        }
        finish(w, acc, out);
      }
    }
  }

  void finish(const decode_work& w, const softmax_stats* st, float* out) const noexcept {
    const uint32_t nq = params_.n_q_heads();
    const uint32_t D = params_.layout.page.head_dim;
    for (uint32_t h = 0; h < nq; ++h) {
      normalize_state(st[h], out + size_t{h} * D, D);
      if (w.lse != nullptr) w.lse[h] = state_lse(st[h]);
    }
  }

  decode_params params_;
  cpu_isa isa_;
  kernels::decode_heads_fn fn_;
  thread_pool pool_;
  std::mutex mu_;

  // Workspace: grows to the largest batch seen, then the hot path allocates nothing.
  std::vector<work_item> items_;
  std::vector<head_group> groups_;
  std::vector<float> partial_o_;      // [n_partials][group_size][head_dim]
  std::vector<softmax_stats> stats_;  // [n_items][group_size]
  std::unique_ptr<std::atomic<uint32_t>[]> remaining_;
  size_t remaining_cap_ = 0;
  std::atomic<size_t> next_item_{0};
  std::span<const decode_work> batch_;
};

}  // namespace

result<std::unique_ptr<host_decoder>> host_decoder::create(const decode_params& params, uint32_t n_threads,
                                                           cpu_isa isa) {
  auto fn = select_decode_kernel(isa, params);  // validates params and the ISA
  if (!fn.ok()) return fn.error();
  const kernels::decode_kernel_pair k =
      kernels::lookup_kernels(isa, params.layout.page.head_dim, params.layout.page.kv_dtype, params.softcap > 0.0f);
  if (n_threads == 0) n_threads = std::max(1u, std::thread::hardware_concurrency());
  if (n_threads > kMaxThreads)
    return status{errc::kInvalidArgument, "host_decoder: n_threads must be <= " + std::to_string(kMaxThreads) +
                                              ", got " + std::to_string(n_threads)};
  try {
    return std::unique_ptr<host_decoder>(std::make_unique<host_decoder_impl>(params, n_threads, isa, k.head_range));
  } catch (const std::system_error& e) {
    return status{errc::kOutOfMemory,
                  "host_decoder: cannot start " + std::to_string(n_threads) + " threads: " + e.what()};
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "host_decoder: out of memory"};
  }
}

}  // namespace instinfer
