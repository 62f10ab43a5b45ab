// What the cuda:N backend's units share (cuda_backend.cpp: configuration, chunks, writes and
// reads; cuda_attend.cpp: attention and imports): the backend's state and its grow-only CUDA
// buffers. Private to src/backend/cuda.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "instinfer/backend/cuda_backend.hpp"
#include "instinfer/cuda/decode.cuh"

namespace instinfer {
namespace cuda_backend_detail {

using cuda::cuda_status;

inline constexpr size_t align_up(size_t x, size_t a) noexcept {
  return (x + a - 1) / a * a;
}

// Grow-only CUDA allocation (device memory or pinned host memory, by the allocator pair): the
// hot path reuses it once it has reached the largest batch seen; pinned host buffers make uploads
// and downloads single DMA transfers.
struct device_memory {
  static cudaError_t allocate(void** p, size_t bytes) noexcept { return cudaMalloc(p, bytes); }
  static void release(void* p) noexcept { (void)cudaFree(p); }
  static constexpr const char* kWhat = "cudaMalloc";
};
struct pinned_memory {
  static cudaError_t allocate(void** p, size_t bytes) noexcept { return cudaMallocHost(p, bytes); }
  static void release(void* p) noexcept { (void)cudaFreeHost(p); }
  static constexpr const char* kWhat = "cudaMallocHost";
};

template <class Memory>
class grow_buffer {
 public:
  grow_buffer() = default;
  grow_buffer(const grow_buffer&) = delete;
  grow_buffer& operator=(const grow_buffer&) = delete;
  ~grow_buffer() { reset(); }

  status reserve(size_t bytes) noexcept {
    if (bytes <= size_) return {};
    reset();
    void* p = nullptr;
    if (const cudaError_t e = Memory::allocate(&p, bytes); e != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda_status(e, (std::string(Memory::kWhat) + "(" + std::to_string(bytes) + " bytes)").c_str());
    }
    data_ = static_cast<std::byte*>(p);
    size_ = bytes;
    return {};
  }
  void reset() noexcept {
    if (data_ != nullptr) Memory::release(data_);
    data_ = nullptr;
    size_ = 0;
  }
  std::byte* data() const noexcept { return data_; }

 private:
  std::byte* data_ = nullptr;
  size_t size_ = 0;
};
using device_buffer = grow_buffer<device_memory>;
using pinned_buffer = grow_buffer<pinned_memory>;

}  // namespace cuda_backend_detail

struct cuda_backend::impl {
  using device_buffer = cuda_backend_detail::device_buffer;
  using pinned_buffer = cuda_backend_detail::pinned_buffer;
  cuda_backend_options options;
  bool configured = false;
  backend_config config{};
  chunk_layout layout{};
  cuda::paged_kv_desc desc{};
  cudaStream_t stream = nullptr;
  std::byte* pool = nullptr;
  uint64_t capacity = 0;
  std::vector<chunk_id> free_list;
  std::vector<uint32_t> filled;  // tokens written per chunk
  std::vector<uint8_t> in_use;
  device_buffer rows;       // write_tokens staging: K rows, then V rows
  device_buffer in;         // attend: CSR tables, then queries
  device_buffer out;        // attend: outputs, then lse
  device_buffer workspace;  // attend: split partials
  pinned_buffer host_in;
  pinned_buffer host_out;
  backend_stats counters{};

  ~impl() {
    if (!configured) return;
    (void)cudaSetDevice(options.device);
    if (stream != nullptr) (void)cudaStreamSynchronize(stream);
    rows.reset();
    in.reset();
    out.reset();
    workspace.reset();
    host_in.reset();
    host_out.reset();
    if (pool != nullptr) (void)cudaFree(pool);
    if (stream != nullptr) (void)cudaStreamDestroy(stream);
  }

  status ready() const {
    if (!configured) return {errc::kInvalidArgument, "cuda backend: configure() was not called"};
    if (const cudaError_t e = cudaSetDevice(options.device); e != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda::cuda_status(e, "cudaSetDevice");
    }
    return {};
  }
  status check_chunk(chunk_id id, const char* what) const {
    if (id >= capacity || !in_use[id])
      return {errc::kInvalidArgument,
              std::string("cuda backend: ") + what + ": chunk " + std::to_string(id) + " is not an allocated chunk"};
    return {};
  }
  // Wait for the stream; a kernel fault surfaces here.
  status sync(const char* what) const {
    if (const cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda::cuda_status(e, what);
    }
    return {};
  }
  uint64_t page_rows_bytes(uint32_t n_tokens) const noexcept {
    return uint64_t{n_tokens} * layout.page.row_bytes() * layout.pages_per_chunk();
  }
  status append_checks(chunk_id id, uint32_t first, uint32_t n, const void* k, const void* v) const {
    INSTINFER_TRY(check_chunk(id, "write_tokens"));
    if (first != filled[id])
      return {errc::kInvalidArgument, "cuda backend: chunks are append-only: write at token " + std::to_string(first) +
                                          " but chunk " + std::to_string(id) + " holds " + std::to_string(filled[id]) +
                                          " tokens"};
    if (n > layout.tokens() - first)
      return {errc::kInvalidArgument, "cuda backend: writing " + std::to_string(n) + " tokens at " +
                                          std::to_string(first) + " overflows a chunk of " +
                                          std::to_string(layout.tokens()) + " tokens"};
    if (n > 0 && (k == nullptr || v == nullptr)) return {errc::kInvalidArgument, "cuda backend: null k or v rows"};
    return {};
  }
  void count_append(uint32_t n) noexcept {
    const uint64_t bytes = page_rows_bytes(n);
    counters.kv_bytes_appended += bytes;
    counters.device_bytes_written += bytes;
  }
};

}  // namespace instinfer
