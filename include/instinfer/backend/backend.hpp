// A backend: a kv_store (where chunks live, kv_store.hpp) and an attention_engine (where decode
// attention runs, attention_engine.hpp) configured together for one cache.
//
// The KV manager (kv/kv_cache.hpp) is the control plane: sequences, page tables, refcounts,
// fork and truncation. A backend is the data plane. Models: host (RAM + host SIMD), ssd (io_uring
// + O_DIRECT, staged decode), csd (commands to an emulated drive that computes attention next to
// its flash), cuda (VRAM + CUDA kernels); registry.hpp maps URIs to them.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "instinfer/backend/attend_batch.hpp"
#include "instinfer/backend/attention_engine.hpp"
#include "instinfer/backend/kv_store.hpp"
#include "instinfer/backend/uri.hpp"
#include "instinfer/core/status.hpp"
#include "instinfer/layout/chunk_layout.hpp"
#include "instinfer/layout/kv_shape.hpp"

namespace instinfer {

class thread_pool;  // core/thread_pool.hpp

// Everything a backend needs to know, fixed at cache creation.
struct backend_config {
  kv_shape shape{};
  page_geometry page{};
  uint64_t capacity_bytes = 0;  // 0: the backend's default
  uint32_t n_threads = 0;       // host-side compute threads; 0: hardware concurrency
  float scale = 0.0f;           // logit scale; 0: 1/sqrt(head_dim)
  float softcap = 0.0f;         // logit soft-cap; <= 0: off
  // SparF is enabled (cache_options::sparf): a backend that runs SparF itself (runs_sparf())
  // keeps the channel-indexed K copy, with column pages of this many channels (resolved, > 0).
  bool sparf = false;
  uint32_t sparf_channels_per_page = 0;
  // Page summaries are kept (cache_options::page_summaries): a backend that runs the policy itself
  // (runs_page_summaries()) keeps them.
  bool page_summaries = false;
  // cache_options::int8_query_dot: decode scores q8_0 K with integer dot products
  // (decode_params::int8_query_dot). Backends that cannot refuse it with kUnsupported.
  bool int8_query_dot = false;
  // The cache's compute pool (n_threads threads, kv_cache::create makes it): host-side compute of
  // the backend (dense decode) and of the sparse attenders runs on it, so the workers woken for
  // one call are still spinning for the next instead of a second pool's sleeping ones. Null (a
  // backend configured outside a cache): each component starts its own.
  std::shared_ptr<thread_pool> pool;

  chunk_layout layout() const noexcept { return chunk_layout::make(page, shape.n_kv_heads); }
};

// Counters; fields a backend has no notion of stay zero.
struct backend_stats {
  uint64_t capacity_chunks = 0;
  uint64_t used_chunks = 0;
  uint64_t kv_bytes_appended = 0;     // K+V bytes handed to write_tokens
  uint64_t device_bytes_written = 0;  // bytes that reached storage (write amplification numerator)
  uint64_t device_bytes_read = 0;
  uint64_t device_read_requests = 0;       // storage (ssd): read requests issued to the device
  uint64_t device_reads_prefetched = 0;    // of those, issued ahead by prefetch() and used by attend
  uint64_t link_bytes_host_to_device = 0;  // CSD / GPU: bytes over the host link
  uint64_t link_bytes_device_to_host = 0;
  uint64_t flash_pages_read = 0;
  uint64_t flash_pages_programmed = 0;
  uint64_t flash_pages_erased = 0;
  double modelled_device_seconds = 0.0;  // CSD: from the flash, link and compute models, not wall-clock
  // CSD: the busiest drive's modelled components (each command costs max(link, flash, compute),
  // so these need not add up to modelled_device_seconds); program: die time of page programs.
  double modelled_flash_seconds = 0.0;
  double modelled_link_seconds = 0.0;
  double modelled_compute_seconds = 0.0;
  double modelled_program_seconds = 0.0;

  double write_amplification() const noexcept {
    return kv_bytes_appended ? static_cast<double>(device_bytes_written) / static_cast<double>(kv_bytes_appended) : 0.0;
  }
};

class backend : public kv_store, public attention_engine {
 public:
  ~backend() override = default;

  virtual std::string_view name() const noexcept = 0;
  // Page bytes this backend prefers (device write granularity); used when the user passes 0.
  virtual uint32_t preferred_page_bytes() const noexcept { return page_geometry::kDefaultPageBytes; }
  // Called once, before anything else; the configuration is final.
  virtual status configure(const backend_config& config) = 0;
  // The manager forgot a sequence (backends that mirror page tables drop theirs).
  virtual void on_sequence_freed(seq_id /*seq*/) noexcept {}

  virtual backend_stats stats() const noexcept = 0;
};

// A backend model: derives from `backend` and says, at compile time and at run time, whether it
// can be used (xsimd-style compiled_in / available).
template <class B>
concept kv_backend = std::derived_from<B, backend> && requires {
  { B::kScheme } -> std::convertible_to<std::string_view>;
  { B::compiled_in() } -> std::same_as<bool>;
  { B::available() } -> std::same_as<bool>;
};

// Build a backend from a URI ("host", "ssd:/path?queue_depth=32", "csd:/path", "cuda:0").
result<std::unique_ptr<backend>> make_backend(std::string_view uri);

// Schemes compiled into this build and usable on this machine, for diagnostics.
std::string describe_backends();

}  // namespace instinfer
