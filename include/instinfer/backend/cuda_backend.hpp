// The CUDA backend: KV chunks in one VRAM page pool, decode attention in CUDA kernels.
//
// The pool is one cudaMalloc (never managed memory) carved into chunks laid out exactly as on the
// host (chunk_layout.hpp), so chunk bytes read back with read_chunk are the host backend's bytes.
// attend() uploads the batch's CSR page tables and queries in one copy, runs the paged decode
// kernel (device/cuda/decode.cu: one block per (sequence, kv head) with its whole GQA group,
// split over token ranges when the batch is too small to fill the GPU, merged exactly by lse with
// state.hpp) and copies out [n_q_heads][head_dim] outputs and lse.
//
// URI: "cuda" or "cuda:N" (device ordinal N), options: capacity=BYTES (K/M/G suffixes; default:
// half of the device's free memory when the cache gives none).
//
// No CUDA types in this header; the class is declared in every build and defined only when the
// library is built with CUDA (INSTINFER_WITH_CUDA): compiled_in() says which. Calls on one
// backend are not thread-safe (kv_cache serialises them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "instinfer/backend/backend.hpp"
#include "instinfer/backend/uri.hpp"

namespace instinfer {

struct cuda_backend_options {
  int device = 0;               // CUDA device ordinal
  uint64_t capacity_bytes = 0;  // pool size when the cache configuration gives none; 0: half of free VRAM
};

// CUDA devices visible to this process; 0 when built without CUDA, without a driver or a device.
#if defined(INSTINFER_WITH_CUDA) && INSTINFER_WITH_CUDA
int cuda_device_count() noexcept;
#else
inline int cuda_device_count() noexcept {
  return 0;
}
#endif

class cuda_backend final : public backend {
 public:
  static constexpr std::string_view kScheme = "cuda";
  static constexpr bool compiled_in() noexcept {
#if defined(INSTINFER_WITH_CUDA) && INSTINFER_WITH_CUDA
    return true;
#else
    return false;
#endif
  }
  // Probed at run time: a driver and at least one device.
  static bool available() noexcept {
    return compiled_in() && cuda_device_count() > 0;
  }

  explicit cuda_backend(cuda_backend_options options = {});
  ~cuda_backend() override;
  cuda_backend(const cuda_backend&) = delete;
  cuda_backend& operator=(const cuda_backend&) = delete;

  std::string_view name() const noexcept override {
    return kScheme;
  }
  status configure(const backend_config& config) override;

  uint64_t capacity_chunks() const noexcept override;
  uint64_t free_chunks() const noexcept override;
  result<chunk_id> allocate_chunk(const chunk_hint& hint) noexcept override;
  void release_chunk(chunk_id id) noexcept override;
  // k, v: host rows [n][n_kv_heads][head_dim] of the cache dtype.
  status write_tokens(chunk_id id, const chunk_hint& hint, uint32_t first, uint32_t n, const std::byte* k,
                      const std::byte* v) noexcept override;
  // A fresh chunk's bytes whole (SparF's column pages of a quantized cache; kv_store.hpp).
  bool writes_whole_chunks() const noexcept override {
    return true;
  }
  status write_chunk(chunk_id id, const chunk_hint& hint, const std::byte* chunk) noexcept override;
  status copy_tokens(chunk_id dst, const chunk_hint& dst_hint, chunk_id src, uint32_t n) noexcept override;
  // Copies the first n_tokens rows of every page of the chunk; rows beyond stay as they were in dst.
  // n_tokens == tokens per page copies the chunk whole, page tails included (write_chunk's bytes).
  status read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept override;
  status attend(uint32_t layer, const attend_batch& batch) noexcept override;
  backend_stats stats() const noexcept override;

  // Same contract as write_tokens, with k and v in device memory of this backend's device
  // (16-byte aligned), e.g. rows straight from the model's k/v projections: no host round trip.
  status write_tokens_device(chunk_id id, uint32_t first, uint32_t n, const void* k_device,
                             const void* v_device) noexcept;

  // Storage to GPU, one path for every source backend (ssd, csd, host): chunk src_ids[i] of `src`
  // (n_tokens[i] tokens) lands in the fresh chunk dst_ids[i] of this backend. Groups of 8 chunks
  // are read into pinned bounce buffers, as one batch of page reads where the source has
  // read_pages (ssd: one io_uring submission), else with read_chunk; each group's upload overlaps
  // the next group's reads. On a failure, the groups before the failing one are imported and the
  // rest stay fresh (unwritten).
  // (GPUDirect Storage via cuFile would replace the bounce for sealed SSD chunks; not built yet.)
  status import_chunks(backend& src, std::span<const chunk_id> src_ids, std::span<const uint32_t> n_tokens,
                       std::span<const chunk_id> dst_ids) noexcept;

  int device() const noexcept;
  // Device address of a chunk (for in-process consumers such as a storage-to-GPU path); null when
  // not configured or the id is out of range.
  std::byte* chunk_device_ptr(chunk_id id) const noexcept;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

static_assert(kv_backend<cuda_backend>);

// Build a cuda backend from a parsed URI (scheme "cuda"). kUnsupported when this build has no CUDA
// or the machine has no usable device; kInvalidArgument for a malformed device or option.
#if defined(INSTINFER_WITH_CUDA) && INSTINFER_WITH_CUDA
result<std::unique_ptr<backend>> make_cuda_backend(const backend_uri& uri);
#else
inline result<std::unique_ptr<backend>> make_cuda_backend(const backend_uri& /*uri*/) {
  return status{errc::kUnsupported, "the cuda backend is not available: instinfer was built without CUDA"};
}
#endif

}  // namespace instinfer
