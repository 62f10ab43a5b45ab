// The host backend: KV chunks in one aligned host-memory pool, attention on host SIMD threads.
//
// The pool is reserved once (2 MiB huge pages where the system allows, transparent huge pages
// or 4 KiB-aligned memory otherwise) and committed lazily by the OS as chunks are touched.
// URI: "host" or "host:?capacity=4G&hugepages=0".
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "instinfer/attention/decode.hpp"
#include "instinfer/backend/backend.hpp"

namespace instinfer {

// How the pool's memory was obtained (reported in stats and by `name()`).
enum class host_memory_kind : uint8_t { kHugeTlb = 0, kTransparentHuge = 1, kAligned4k = 2 };

struct host_backend_options {
  bool try_hugetlb = true;  // MAP_HUGETLB first; falls back silently when the system has none
};

class host_backend final : public backend {
 public:
  static constexpr std::string_view kScheme = "host";
  static constexpr bool compiled_in() noexcept { return true; }
  static bool available() noexcept { return true; }

  explicit host_backend(host_backend_options options = {}) : options_(options) {}
  ~host_backend() override;

  std::string_view name() const noexcept override { return kScheme; }
  status configure(const backend_config& config) override;

  uint64_t capacity_chunks() const noexcept override { return capacity_chunks_; }
  uint64_t free_chunks() const noexcept override { return capacity_chunks_ - next_fresh_ + free_list_.size(); }
  result<chunk_id> allocate_chunk(const chunk_hint& hint) noexcept override;
  void release_chunk(chunk_id id) noexcept override;
  status write_tokens(chunk_id id, const chunk_hint& hint, uint32_t first, uint32_t n, const std::byte* k,
                      const std::byte* v) noexcept override;
  bool writes_whole_chunks() const noexcept override { return true; }
  status write_chunk(chunk_id id, const chunk_hint& hint, const std::byte* chunk) noexcept override;
  status copy_tokens(chunk_id dst, const chunk_hint& dst_hint, chunk_id src, uint32_t n) noexcept override;
  status read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept override;
  status attend(uint32_t layer, const attend_batch& batch) noexcept override;
  status attend_causal(uint32_t layer, const attend_batch& batch) noexcept override { return attend(layer, batch); }
  bool runs_causal() const noexcept override { return true; }
  bool runs_shared() const noexcept override { return true; }
  status shared_begin(uint32_t layer, const attend_batch& batch, uint32_t n_workers) noexcept override;
  void shared_work(uint32_t worker) noexcept override { decoder_->work_shared(worker); }
  status shared_end() noexcept override { return decoder_->shared_status(); }
  host_chunk_view host_view() const noexcept override { return {pool_, layout_.chunk_bytes()}; }
  backend_stats stats() const noexcept override;

  host_memory_kind memory_kind() const noexcept { return memory_kind_; }
  // Base address of a chunk (for in-process consumers such as tests and the SSD staging path).
  const std::byte* chunk_data(chunk_id id) const noexcept { return pool_ + uint64_t{id} * layout_.chunk_bytes(); }

 private:
  std::byte* chunk_ptr(chunk_id id) noexcept { return pool_ + uint64_t{id} * layout_.chunk_bytes(); }
  bool valid_id(chunk_id id) const noexcept { return id < capacity_chunks_; }
  // The decoder's view of a batch in work_ (chunk pointers in chunk_ptrs_).
  status load_work(const attend_batch& batch) noexcept;

  host_backend_options options_;
  backend_config config_{};
  chunk_layout layout_{};
  std::byte* pool_ = nullptr;
  size_t pool_bytes_ = 0;
  host_memory_kind memory_kind_ = host_memory_kind::kAligned4k;
  uint64_t capacity_chunks_ = 0;
  uint64_t next_fresh_ = 0;          // ids below this have been handed out at least once
  std::vector<chunk_id> free_list_;  // released ids, reused first
  std::unique_ptr<host_decoder> decoder_;
  std::vector<const std::byte*> chunk_ptrs_;  // attend workspace: grows, never shrinks
  std::vector<decode_work> work_;
  uint64_t kv_bytes_appended_ = 0;
};

// Default host capacity when the user gives none: half of physical memory.
uint64_t default_host_capacity_bytes() noexcept;

}  // namespace instinfer
