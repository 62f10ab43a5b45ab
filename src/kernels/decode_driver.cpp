// host_decoder: the decode driver (attention/decode_driver.hpp) over chunks in host memory.
//
// The host's policy: items of (sequence, chunk range) covering every kv head of their chunks, so
// the head-range kernel sweeps each chunk once (K pages of every head, then V pages: sequential
// memory); about kItemsPerThread items per thread, never below kMinItemTokens tokens per item.

#include <algorithm>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "instinfer/attention/decode.hpp"
#include "instinfer/attention/decode_driver.hpp"

namespace instinfer {

namespace {

// Split only when it helps load balance, and never below this many tokens per item, so that the
// merge stays negligible next to the item's work.
constexpr uint32_t kItemsPerThread = 4;
constexpr uint32_t kMinItemTokens = 512;

class host_decoder_impl final : public host_decoder {
 public:
  host_decoder_impl(std::unique_ptr<decode_driver> driver, cpu_isa isa) : driver_(std::move(driver)), isa_(isa) {}

  status run(std::span<const decode_work> batch) noexcept override {
    std::lock_guard<std::mutex> lock(mu_);
    INSTINFER_TRY(load(batch));
    memory_chunk_source source(driver_->params().layout, batch);
    return driver_->run(std::span<const decode_sequence>(sequences_.data(), batch.size()), source);
  }

  status begin_shared(std::span<const decode_work> batch, uint32_t n_workers) noexcept override {
    std::lock_guard<std::mutex> lock(mu_);
    INSTINFER_TRY(load(batch));
    shared_batch_ = batch;
    shared_source_.emplace(driver_->params().layout, batch);
    return driver_->begin_shared(shared_sequences(), *shared_source_, n_workers);
  }
  void work_shared(uint32_t worker) noexcept override {
    driver_->work_shared(worker, shared_sequences(), *shared_source_);
  }
  status shared_status() noexcept override { return driver_->shared_status(); }

  const decode_params& params() const noexcept override { return driver_->params(); }
  uint32_t n_threads() const noexcept override { return driver_->n_threads(); }
  cpu_isa isa() const noexcept override { return isa_; }

 private:
  status load(std::span<const decode_work> batch) noexcept {
    INSTINFER_TRY(check_chunks(batch));
    try {
      if (sequences_.size() < batch.size()) sequences_.resize(batch.size());
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory, "host_decoder: cannot grow the batch of " + std::to_string(batch.size())};
    }
    for (size_t i = 0; i < batch.size(); ++i) {
      const decode_work& w = batch[i];
      sequences_[i] = {w.n_chunks, w.n_tokens, w.q, w.out, w.lse, w.n_rows, w.first_pos};
    }
    return {};
  }
  std::span<const decode_sequence> shared_sequences() const noexcept {
    return {sequences_.data(), shared_batch_.size()};
  }

  // What only an in-memory batch can get wrong: its chunk pointers (the driver checks the rest).
  static status check_chunks(std::span<const decode_work> batch) {
    for (size_t i = 0; i < batch.size(); ++i) {
      const decode_work& w = batch[i];
      const auto where = [i] { return "decode batch entry " + std::to_string(i) + ": "; };
      if (w.n_chunks > 0 && w.chunks == nullptr)
        return {errc::kInvalidArgument, where() + "chunks is null but n_chunks is " + std::to_string(w.n_chunks)};
      for (uint32_t c = 0; c < w.n_chunks; ++c)
        if (w.chunks[c] == nullptr)
          return {errc::kInvalidArgument, where() + "chunk pointer " + std::to_string(c) + " is null"};
    }
    return {};
  }

  std::unique_ptr<decode_driver> driver_;
  cpu_isa isa_;
  std::mutex mu_;
  std::vector<decode_sequence> sequences_;     // grows to the largest batch seen
  std::span<const decode_work> shared_batch_;  // the shared run's batch (the caller keeps it alive)
  std::optional<memory_chunk_source> shared_source_;
};

}  // namespace

result<std::unique_ptr<host_decoder>> host_decoder::create(const decode_params& params, uint32_t n_threads, cpu_isa isa,
                                                           std::shared_ptr<thread_pool> pool) {
  auto kernel = select_decode_heads_kernel(isa, params);  // validates params and the ISA
  if (!kernel.ok()) return kernel.error();
  if (pool) n_threads = pool->size();
  if (n_threads == 0) n_threads = std::max(1u, std::thread::hardware_concurrency());
  if (n_threads > decode_driver_options::kMaxThreads)
    return status{errc::kInvalidArgument,
                  "host_decoder: n_threads must be <= " + std::to_string(decode_driver_options::kMaxThreads) +
                      ", got " + std::to_string(n_threads)};
  decode_driver_options options;
  options.n_threads = n_threads;
  options.items_per_worker = kItemsPerThread;
  options.min_item_tokens = kMinItemTokens;
  options.kv_heads_per_item = 0;  // every kv head: one sequential sweep per chunk
  options.pool = std::move(pool);
  auto driver = decode_driver::create(params, *kernel, options);
  if (!driver.ok()) return driver.error();
  auto rows = select_decode_rows_kernel(isa, params);
  if (rows.ok()) driver.value()->set_rows_kernel(rows.value());
  try {
    return std::unique_ptr<host_decoder>(std::make_unique<host_decoder_impl>(std::move(driver).value(), isa));
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "host_decoder: out of memory"};
  }
}

}  // namespace instinfer
