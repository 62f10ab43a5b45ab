// Host-side entry points of the CUDA kernels over the VRAM page pool (device/cuda/*.cu).
//
// Plan, then run: `plan_decode` sizes the split over token ranges and the workspace for a batch;
// `launch_decode` only enqueues kernels on the given stream (no allocation, no synchronisation).
// All pointers in `decode_launch` and `paged_kv_desc` are device pointers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "instinfer/core/dtype.hpp"
#include "instinfer/core/status.hpp"
#include "instinfer/cuda/decode_math.hpp"
#include "instinfer/kv/page_table.hpp"

namespace instinfer::cuda {

// The page pool: chunks of chunk_bytes at pool + id * chunk_bytes, each laid out as chunk_layout
// says ([K|V][n_kv_heads][tokens_per_page][head_dim] of kv_dtype). pool is 16-byte aligned.
struct paged_kv_desc {
  const std::byte* pool = nullptr;
  uint64_t chunk_bytes = 0;
  uint32_t page_bytes = 0;
  uint32_t n_kv_heads = 0;
  uint32_t head_dim = 0;  // 64, 128 or 256
  dtype kv_dtype = dtype::kF16;
  uint32_t tokens_per_page = 0;  // a power of two for f32 / f16 / bf16; floor(page / row) for q8_0 / q4_0
};

struct decode_launch {
  paged_kv_desc kv{};
  page_table_view table{};   // device arrays; table.tokens_per_page == kv.tokens_per_page
  uint32_t group_size = 1;   // query heads per kv head (query head h uses kv head h / group_size)
  float scale = 0.0f;        // logit scale (already resolved: not 0)
  float softcap = 0.0f;      // <= 0: off
  const float* q = nullptr;  // [batch][n_kv_heads * group_size][head_dim]
  float* out = nullptr;      // [batch][n_kv_heads * group_size][head_dim], normalised
  float* lse = nullptr;      // [batch][n_kv_heads * group_size] natural-log sum-exp, or null
};

struct decode_plan {
  decode_split_plan split{};
  uint32_t group_tile = 1;     // query heads per block (group_tile_for(group_size))
  uint32_t tile_tokens = 0;    // the kernel's tile (split_tokens is a multiple of it)
  size_t workspace_bytes = 0;  // partial states when split.max_splits > 1; 0 otherwise
};

// kUnsupported for a head_dim / dtype the kernels are not instantiated for; kInvalidArgument for
// malformed shapes. `max_tokens` is the longest sequence of the batch; `device` the CUDA ordinal.
result<decode_plan> plan_decode(const paged_kv_desc& kv, uint32_t group_size, uint32_t batch, uint32_t max_tokens,
                                int device);

// Enqueue decode attention for the batch. `workspace` (device, 256-byte aligned) holds at least
// plan.workspace_bytes. Errors are launch errors; kernel faults surface at the next synchronisation.
status launch_decode(const decode_launch& args, const decode_plan& plan, void* workspace, cudaStream_t stream) noexcept;

// Store n token rows into chunk `chunk` at token `first`: k, v are device rows
// [n][n_kv_heads][head_dim] of kv_dtype (quantized: whole blocks), 16-byte aligned. Precondition:
// first + n <= tokens_per_page.
status launch_write_rows(const paged_kv_desc& kv, uint32_t chunk, uint32_t first, uint32_t n, const void* k,
                         const void* v, cudaStream_t stream) noexcept;

// "cudaErrorXxx: description" as an instinfer status (allocation failures map to kOutOfMemory,
// sticky device faults to kDeviceLost, a missing device or driver to kUnsupported).
status cuda_status(cudaError_t err, const char* what);

}  // namespace instinfer::cuda
