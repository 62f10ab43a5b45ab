// Appending token rows to VRAM chunks: llama.cpp-style rows [n][n_kv_heads][head_dim] are
// scattered into the chunk's head-major pages ([K|V][n_kv_heads][tokens_per_page][head_dim]).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "instinfer/cuda/decode.cuh"

namespace instinfer::cuda {
namespace {

// One thread per unit (16 bytes, or 4 for quantized rows that are no multiple of 16) of the
// n * n_kv_heads rows of K, then of V.
template <class Unit>
__global__ void write_rows_kernel(std::byte* chunk, uint32_t page_bytes, uint32_t n_kv_heads, uint32_t row_units,
                                  uint32_t first, uint32_t n, const Unit* k, const Unit* v) {
  const uint64_t per_kind = uint64_t{n} * n_kv_heads * row_units;
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < 2 * per_kind;
       i += uint64_t{gridDim.x} * blockDim.x) {
    const uint32_t kind = i >= per_kind ? 1u : 0u;
    const uint64_t u = i - kind * per_kind;  // unit index in [n][n_kv_heads][row_units]
    const uint32_t unit = static_cast<uint32_t>(u % row_units);
    const uint64_t row = u / row_units;
    const uint32_t head = static_cast<uint32_t>(row % n_kv_heads);
    const uint32_t token = static_cast<uint32_t>(row / n_kv_heads);
    Unit* dst = reinterpret_cast<Unit*>(chunk + uint64_t{kind * n_kv_heads + head} * page_bytes) +
                uint64_t{first + token} * row_units + unit;
    *dst = (kind ? v : k)[u];
  }
}

}  // namespace

status launch_write_rows(const paged_kv_desc& kv, uint32_t chunk, uint32_t first, uint32_t n, const void* k,
                         const void* v, cudaStream_t stream) noexcept {
  if (n == 0) return {};
  const uint32_t row_bytes = static_cast<uint32_t>(dtype_row_bytes(kv.kv_dtype, kv.head_dim));
  const uint32_t unit = row_bytes % 16 == 0 ? 16 : 4;  // quantized rows: 4-byte units
  if (row_bytes % unit != 0 || kv.page_bytes % 16 != 0)
    return {errc::kUnsupported, "CUDA write_rows: rows must be a multiple of 4 bytes"};
  if ((reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v)) % 16 != 0)
    return {errc::kInvalidArgument, "CUDA write_rows: device rows must be 16-byte aligned"};
  const uint64_t units = 2ull * n * kv.n_kv_heads * (row_bytes / unit);
  const uint32_t threads = 256;
  const uint64_t want = (units + threads - 1) / threads;
  const uint32_t blocks = static_cast<uint32_t>(want < 4096 ? want : 4096);
  std::byte* base = const_cast<std::byte*>(kv.pool) + uint64_t{chunk} * kv.chunk_bytes;
  if (unit == 16)
    write_rows_kernel<<<blocks, threads, 0, stream>>>(base, kv.page_bytes, kv.n_kv_heads, row_bytes / 16, first, n,
                                                      static_cast<const uint4*>(k), static_cast<const uint4*>(v));
  else
    write_rows_kernel<<<blocks, threads, 0, stream>>>(base, kv.page_bytes, kv.n_kv_heads, row_bytes / 4, first, n,
                                                      static_cast<const uint32_t*>(k), static_cast<const uint32_t*>(v));
  return cuda_status(cudaGetLastError(), "write_rows_kernel launch");
}

}  // namespace instinfer::cuda
