// Paged decode attention over the VRAM page pool.
//
// One block per (sequence, kv head, query-head tile, split): it walks the split's tokens through
// the CSR page table in tiles, stages each tile's K and V rows in shared memory with 16-byte
// cp.async copies (kDecodeStages deep), scores all the tile's query heads against each K row once
// (GQA head-group fusion: every KV byte is read once per step), and folds the tile into per-row-
// group online-softmax states with decode_math.hpp's fold_tile (state.hpp's merge_state). Row
// groups merge at the end; splits merge exactly in a second kernel. Shapes: decode_math.hpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <string>

#include "instinfer/attention/state.hpp"
#include "instinfer/cuda/decode.cuh"
#include "instinfer/cuda/decode_math.hpp"

namespace instinfer::cuda {
namespace {

// ---- one wrapper per PTX instruction ----------------------------------------------------------

// 16-byte global -> shared copy that bypasses L1; `full` false zero-fills the destination
// (src-size 0: nothing is read), which keeps out-of-range V rows at 0 instead of stale bytes.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool full) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = full ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}
// 4-byte copy through L1 (.cg takes 16 bytes only): quantized rows that are no multiple of 16 bytes.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool full) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = full ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}
template <uint32_t Bytes>
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool full) {
  static_assert(Bytes == 16 || Bytes == 4);
  if constexpr (Bytes == 16)
    cp_async_16(smem, gmem, full);
  else
    cp_async_4(smem, gmem, full);
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

// ---- 16 bytes of KV elements -> floats (quantized rows: decode_math.hpp's dequantize8) ----------

template <dtype DT>
struct kv_elem;
template <>
struct kv_elem<dtype::kF32> {
  static constexpr uint32_t kBytes = 4;
  __device__ static __forceinline__ void to_float(const uint4& w, float* f) {
    f[0] = __uint_as_float(w.x);
    f[1] = __uint_as_float(w.y);
    f[2] = __uint_as_float(w.z);
    f[3] = __uint_as_float(w.w);
  }
};
template <>
struct kv_elem<dtype::kF16> {
  static constexpr uint32_t kBytes = 2;
  __device__ static __forceinline__ void to_float(const uint4& w, float* f) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      static_assert(sizeof h == sizeof words[i]);
      memcpy(&h, &words[i], sizeof h);
      const float2 x = __half22float2(h);  // exact: every f16 is a float
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
};
template <>
struct kv_elem<dtype::kBF16> {
  static constexpr uint32_t kBytes = 2;
  __device__ static __forceinline__ void to_float(const uint4& w, float* f) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(words[i] << 16);  // low half = element 2i (little endian)
      f[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

struct kernel_params {
  const std::byte* pool;
  uint64_t chunk_bytes;
  uint32_t page_bytes;
  uint32_t n_kv_heads;
  uint32_t tokens_per_page;
  uint32_t log2_tpp;
  const uint32_t* indptr;
  const uint32_t* indices;
  const uint32_t* last_page_len;
  uint32_t group_size;
  uint32_t q_tiles;  // group_size / GroupTile
  float scale;
  float softcap;
  const float* q;
  float* out;
  float* lse;
  float* ws_o;              // [batch][n_q_heads][max_splits][head_dim]
  softmax_stats* ws_stats;  // [batch][n_q_heads][max_splits]
  decode_split_plan split;
};

__device__ __forceinline__ uint32_t sequence_tokens(const kernel_params& p, uint32_t b, uint32_t* chunk_begin) {
  const uint32_t begin = p.indptr[b];
  const uint32_t n_chunks = p.indptr[b + 1] - begin;
  *chunk_begin = begin;
  return seq_tokens(n_chunks, n_chunks ? p.last_page_len[b] : 0u, p.tokens_per_page);
}

// One function of about 160 lines, on purpose: its phases (load q, stream tiles, fold, merge row
// groups, write) share registers and shared memory that a split into __device__ calls would hide,
// and it can only be re-timed where a GPU is lent (none in this task); its math is decode_math.hpp,
// tested on the CPU.
template <uint32_t HeadDim, dtype DT, uint32_t G>
__global__ void __launch_bounds__(kDecodeThreads) paged_decode_kernel(const kernel_params p) {
  using tr = traits_for<HeadDim, DT, G>;
  constexpr uint32_t T = tr::kTileTokens;
  constexpr uint32_t E = tr::kElemsPerLane;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ softmax_stats group_stats[tr::kRowGroups][G];

  const uint32_t split = blockIdx.x;
  const uint32_t kv_head = blockIdx.y / p.q_tiles;
  const uint32_t q_tile = blockIdx.y % p.q_tiles;
  const uint32_t b = blockIdx.z;
  uint32_t chunk_begin = 0;
  const uint32_t n_tokens = sequence_tokens(p, b, &chunk_begin);
  const uint32_t n_splits = p.split.splits_for(n_tokens);
  if (split >= n_splits) return;  // uniform over the block
  const uint32_t tok_begin = split * p.split.split_tokens;
  const uint32_t tok_end = min(n_tokens, tok_begin + p.split.split_tokens);

  const uint32_t tid = threadIdx.x;
  const uint32_t lane = tid % tr::kLanesPerRow;
  const uint32_t ty = tid / tr::kLanesPerRow;
  const uint32_t n_q_heads = p.n_kv_heads * p.group_size;
  const uint32_t q_head0 = kv_head * p.group_size + q_tile * G;

  float q[G][E];
  INSTINFER_UNROLL
  for (uint32_t g = 0; g < G; ++g) {
    const float* qrow = p.q + (size_t{b} * n_q_heads + q_head0 + g) * HeadDim;
    INSTINFER_UNROLL
    for (uint32_t v = 0; v < tr::kVecsPerLane; ++v) {
      INSTINFER_UNROLL
      for (uint32_t e = 0; e < tr::kVecElems; ++e) q[g][v * tr::kVecElems + e] = qrow[tr::lane_elem(lane, v) + e];
    }
  }
  softmax_stats st[G];
  float o[G][E];
  INSTINFER_UNROLL
  for (uint32_t g = 0; g < G; ++g) {
    INSTINFER_UNROLL
    for (uint32_t e = 0; e < E; ++e) o[g][e] = 0.0f;
  }

  const uint32_t n_tiles = (tok_end - tok_begin + T - 1) / T;
  const auto load_tile = [&](uint32_t tile, uint32_t stage) {
    unsigned char* base = smem + stage * tr::kStageBytes;
    const uint32_t t0 = tok_begin + tile * T;
    constexpr uint32_t kHalf = tr::kCopiesPerStage / 2;
    const auto copy = [&](uint32_t c) {
      const uint32_t kind = c / kHalf;  // 0: K, 1: V
      const uint32_t cc = c % kHalf;
      const uint32_t r = cc / tr::kCopiesPerRow;
      const uint32_t col = cc % tr::kCopiesPerRow;
      const uint32_t token = t0 + r;
      const bool valid = token < tok_end;
      const std::byte* src = p.pool;
      if (valid) {
        // Dense pages hold a power of two of tokens; quantized ones floor(page / row).
        uint32_t in_seq, row;
        if constexpr (is_quantized(DT)) {
          in_seq = token / p.tokens_per_page;
          row = token - in_seq * p.tokens_per_page;
        } else {
          in_seq = token >> p.log2_tpp;
          row = token & ((1u << p.log2_tpp) - 1u);
        }
        const uint32_t chunk = p.indices[chunk_begin + in_seq];
        src = p.pool +
              kv_page_row_offset(chunk, p.chunk_bytes, p.page_bytes, p.n_kv_heads, kind, kv_head, row, tr::kRowBytes) +
              col * tr::kCopyBytes;
      }
      cp_async<tr::kCopyBytes>(base + kind * (T * tr::kRowBytes) + r * tr::kRowBytes + col * tr::kCopyBytes, src,
                               valid);
    };
    if constexpr (tr::kCopyBytes == 16 && tr::kCopiesPerStage % tr::kThreads == 0) {
      INSTINFER_UNROLL
      for (uint32_t i = 0; i < tr::kCopyRounds; ++i) copy(i * tr::kThreads + tid);
    } else {
      // Quantized rows (4-byte copies: ~30 per thread and stage, or counts the threads do not
      // share evenly): a loop, not unrolled (compile time: 24 such kernels x 3 architectures).
      for (uint32_t c = tid; c < tr::kCopiesPerStage; c += tr::kThreads) copy(c);
    }
  };

  INSTINFER_UNROLL
  for (uint32_t s = 0; s + 1 < tr::kStages; ++s) {
    if (s < n_tiles) load_tile(s, s);
    cp_async_commit();
  }
  for (uint32_t tile = 0; tile < n_tiles; ++tile) {
    const uint32_t next = tile + tr::kStages - 1;
    if (next < n_tiles) load_tile(next, next % tr::kStages);
    cp_async_commit();  // possibly empty: keeps the group count uniform for wait_group
    cp_async_wait<tr::kStages - 1>();
    __syncthreads();

    const unsigned char* kt = smem + (tile % tr::kStages) * tr::kStageBytes;
    const unsigned char* vt = kt + T * tr::kRowBytes;
    const uint32_t t0 = tok_begin + tile * T;
    float s[tr::kTokensPerGroup][G];
    float vv[tr::kTokensPerGroup][E];
    INSTINFER_UNROLL
    for (uint32_t j = 0; j < tr::kTokensPerGroup; ++j) {
      const uint32_t r = ty + j * tr::kRowGroups;
      const bool valid = t0 + r < tok_end;
      float k[E];
      INSTINFER_UNROLL
      for (uint32_t v = 0; v < tr::kVecsPerLane; ++v) {
        if constexpr (is_quantized(DT)) {  // dequantized in registers from the staged blocks
          dequantize8<DT>(kt + r * tr::kRowBytes, tr::lane_elem(lane, v), &k[v * tr::kVecElems]);
          dequantize8<DT>(vt + r * tr::kRowBytes, tr::lane_elem(lane, v), &vv[j][v * tr::kVecElems]);
        } else {
          const uint32_t byte = r * tr::kRowBytes + tr::lane_elem(lane, v) * kv_elem<DT>::kBytes;
          kv_elem<DT>::to_float(*reinterpret_cast<const uint4*>(kt + byte), &k[v * tr::kVecElems]);
          kv_elem<DT>::to_float(*reinterpret_cast<const uint4*>(vt + byte), &vv[j][v * tr::kVecElems]);
        }
      }
      INSTINFER_UNROLL
      for (uint32_t g = 0; g < G; ++g) {
        float dot = 0.0f;
        INSTINFER_UNROLL
        for (uint32_t e = 0; e < E; ++e) dot = fmaf(q[g][e], k[e], dot);
        INSTINFER_UNROLL
        for (uint32_t off = tr::kLanesPerRow / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        s[j][g] = valid ? decode_logit(dot, p.scale, p.softcap) : -INFINITY;
      }
    }
    fold_tile(s, vv, st, o);
    __syncthreads();  // the stage is refilled next iteration
  }
  cp_async_wait<0>();
  __syncthreads();

  // Merge the row groups: group 0 folds in groups 1.. in order (staging memory is reused).
  float* merge_o = reinterpret_cast<float*>(smem);
  if (ty > 0) {
    INSTINFER_UNROLL
    for (uint32_t g = 0; g < G; ++g) {
      INSTINFER_UNROLL
      for (uint32_t v = 0; v < tr::kVecsPerLane; ++v) {
        INSTINFER_UNROLL
        for (uint32_t e = 0; e < tr::kVecElems; ++e)
          merge_o[(ty * G + g) * HeadDim + tr::lane_elem(lane, v) + e] = o[g][v * tr::kVecElems + e];
      }
      if (lane == 0) group_stats[ty][g] = st[g];
    }
  }
  __syncthreads();
  if (ty != 0) return;
  for (uint32_t r = 1; r < tr::kRowGroups; ++r) {
    INSTINFER_UNROLL
    for (uint32_t g = 0; g < G; ++g) {
      float other[E];
      INSTINFER_UNROLL
      for (uint32_t v = 0; v < tr::kVecsPerLane; ++v) {
        INSTINFER_UNROLL
        for (uint32_t e = 0; e < tr::kVecElems; ++e)
          other[v * tr::kVecElems + e] = merge_o[(r * G + g) * HeadDim + tr::lane_elem(lane, v) + e];
      }
      merge_state(st[g], o[g], group_stats[r][g], other, E);
    }
  }
  INSTINFER_UNROLL
  for (uint32_t g = 0; g < G; ++g) {
    const size_t row = size_t{b} * n_q_heads + q_head0 + g;
    float* dst;
    if (n_splits == 1) {
      normalize_state(st[g], o[g], E);
      dst = p.out + row * HeadDim;
      if (lane == 0 && p.lse != nullptr) p.lse[row] = state_lse(st[g]);
    } else {
      const size_t slot = row * p.split.max_splits + split;
      dst = p.ws_o + slot * HeadDim;
      if (lane == 0) p.ws_stats[slot] = st[g];
    }
    INSTINFER_UNROLL
    for (uint32_t v = 0; v < tr::kVecsPerLane; ++v) {
      INSTINFER_UNROLL
      for (uint32_t e = 0; e < tr::kVecElems; ++e) dst[tr::lane_elem(lane, v) + e] = o[g][v * tr::kVecElems + e];
    }
  }
}

// Merge the splits of each (sequence, query head) in split order; one thread per element.
__global__ void merge_splits_kernel(const kernel_params p, uint32_t head_dim) {
  const uint32_t qh = blockIdx.x;
  const uint32_t b = blockIdx.y;
  uint32_t chunk_begin = 0;
  const uint32_t n_splits = p.split.splits_for(sequence_tokens(p, b, &chunk_begin));
  if (n_splits == 1) return;  // the decode kernel wrote this row itself
  const uint32_t n_q_heads = p.n_kv_heads * p.group_size;
  const size_t row = size_t{b} * n_q_heads + qh;
  const size_t slot0 = row * p.split.max_splits;
  for (uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    softmax_stats acc = p.ws_stats[slot0];
    float o = p.ws_o[slot0 * head_dim + d];
    for (uint32_t s = 1; s < n_splits; ++s)
      merge_state(acc, &o, p.ws_stats[slot0 + s], &p.ws_o[(slot0 + s) * head_dim + d], 1);
    normalize_state(acc, &o, 1);
    p.out[row * head_dim + d] = o;
    if (d == 0 && p.lse != nullptr) p.lse[row] = state_lse(acc);
  }
}

// ---- the one place where runtime head_dim / dtype / group tile become compile-time ------------

template <class F>
status dispatch_decode(uint32_t head_dim, dtype t, uint32_t group_tile, F&& f) {
  const auto by_group = [&]<uint32_t D, dtype DT>() -> status {
    switch (group_tile) {
      case 1: return f.template operator()<D, DT, 1>();
      case 2: return f.template operator()<D, DT, 2>();
      case 4: return f.template operator()<D, DT, 4>();
      case 8: return f.template operator()<D, DT, 8>();
      default: return {errc::kInternal, "no kernel for query-head tile " + std::to_string(group_tile)};
    }
  };
  const auto by_dtype = [&]<uint32_t D>() -> status {
    switch (t) {
      case dtype::kF32: return by_group.template operator()<D, dtype::kF32>();
      case dtype::kF16: return by_group.template operator()<D, dtype::kF16>();
      case dtype::kBF16: return by_group.template operator()<D, dtype::kBF16>();
      case dtype::kQ8_0: return by_group.template operator()<D, dtype::kQ8_0>();
      case dtype::kQ4_0: return by_group.template operator()<D, dtype::kQ4_0>();
    }
    return {errc::kUnsupported, "CUDA decode: no kernel for KV dtype " + std::string(dtype_name(t))};
  };
  switch (head_dim) {
    case 64: return by_dtype.template operator()<64>();
    case 128: return by_dtype.template operator()<128>();
    case 256: return by_dtype.template operator()<256>();
    default:
      return {errc::kUnsupported,
              "CUDA decode: head_dim " + std::to_string(head_dim) + " is not supported (64, 128 or 256)"};
  }
}

// Dynamic shared memory above 48 KiB needs a per-kernel opt-in on the current device. Asked once
// per instantiation and device (a process rarely uses more than a few devices).
template <uint32_t D, dtype DT, uint32_t G>
status opt_in_shared_memory() {
  static std::atomic<uint64_t> done_mask{0};
  int dev = 0;
  if (const cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return cuda_status(e, "cudaGetDevice");
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (bit != 0 && (done_mask.load(std::memory_order_relaxed) & bit) != 0) return {};
  using tr = traits_for<D, DT, G>;
  if (const cudaError_t e = cudaFuncSetAttribute(paged_decode_kernel<D, DT, G>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, tr::kSmemBytes);
      e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_status(e, "cudaFuncSetAttribute(max dynamic shared memory)");
  }
  done_mask.fetch_or(bit, std::memory_order_relaxed);
  return {};
}

// Resident blocks per SM of one instantiation, asked once (the same for every device of a build's
// architectures, which is all a split plan needs).
template <uint32_t D, dtype DT, uint32_t G>
int resident_blocks_per_sm() {
  static std::atomic<int> cached{0};
  int n = cached.load(std::memory_order_relaxed);
  if (n > 0) return n;
  using tr = traits_for<D, DT, G>;
  if constexpr (tr::kSmemBytes > kSmemOptInBytes) {
    if (!opt_in_shared_memory<D, DT, G>().ok()) return 2;
  }
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, paged_decode_kernel<D, DT, G>, tr::kThreads, tr::kSmemBytes) !=
          cudaSuccess ||
      n <= 0) {
    (void)cudaGetLastError();
    n = 4;  // a safe guess; only the split granularity depends on it
  }
  cached.store(n, std::memory_order_relaxed);
  return n;
}

uint32_t log2_exact(uint32_t x) {
  uint32_t r = 0;
  while ((1u << r) < x) ++r;
  return r;
}

}  // namespace

status cuda_status(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return {};
  std::string msg = std::string(what) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
  switch (err) {
    case cudaErrorMemoryAllocation: return {errc::kOutOfMemory, std::move(msg)};
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorUnsupportedPtxVersion: return {errc::kUnsupported, std::move(msg)};
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorLaunchTimeout:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorECCUncorrectable:
    case cudaErrorDevicesUnavailable: return {errc::kDeviceLost, std::move(msg)};
    case cudaErrorInvalidValue: return {errc::kInvalidArgument, std::move(msg)};
    default: return {errc::kInternal, std::move(msg)};
  }
}

result<decode_plan> plan_decode(const paged_kv_desc& kv, uint32_t group_size, uint32_t batch, uint32_t max_tokens,
                                int device) {
  if (kv.n_kv_heads == 0 || group_size == 0)
    return status{errc::kInvalidArgument, "CUDA decode: n_kv_heads and group_size must be positive"};
  if (kv.tokens_per_page == 0 || (!is_quantized(kv.kv_dtype) && (kv.tokens_per_page & (kv.tokens_per_page - 1)) != 0))
    return status{errc::kInvalidArgument, "CUDA decode: tokens_per_page must be a power of two (dense dtypes), got " +
                                              std::to_string(kv.tokens_per_page)};
  if (batch > 65535) return status{errc::kInvalidArgument, "CUDA decode: batch is limited to 65535 sequences"};
  const uint32_t group_tile = group_tile_for(group_size);
  if (uint64_t{kv.n_kv_heads} * (group_size / group_tile) > 65535)
    return status{errc::kInvalidArgument, "CUDA decode: too many (kv head, query-head tile) pairs"};
  int sms = 0;
  if (const cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device); e != cudaSuccess)
    return cuda_status(e, "cudaDeviceGetAttribute(multiprocessor count)");
  decode_plan plan;
  plan.group_tile = group_tile;
  const status s = dispatch_decode(kv.head_dim, kv.kv_dtype, group_tile, [&]<uint32_t D, dtype DT, uint32_t G>() {
    using tr = traits_for<D, DT, G>;
    plan.tile_tokens = tr::kTileTokens;
    const uint64_t base = uint64_t{batch} * kv.n_kv_heads * (group_size / G);
    const uint64_t target = uint64_t(sms) * uint64_t(resident_blocks_per_sm<D, DT, G>());
    plan.split = plan_decode_splits(max_tokens, base, target, tr::kTileTokens);
    return status{};
  });
  if (!s.ok()) return s;
  if (plan.split.max_splits > 65535) return status{errc::kInvalidArgument, "CUDA decode: sequence too long to split"};
  if (plan.split.max_splits > 1) {
    const size_t slots = size_t{batch} * kv.n_kv_heads * group_size * plan.split.max_splits;
    const size_t o_bytes = (slots * kv.head_dim * sizeof(float) + 255) / 256 * 256;
    plan.workspace_bytes = o_bytes + slots * sizeof(softmax_stats);
  }
  return plan;
}

status launch_decode(const decode_launch& a, const decode_plan& plan, void* workspace, cudaStream_t stream) noexcept {
  if (a.table.batch == 0) return {};
  if (plan.split.max_splits > 1 && workspace == nullptr)
    return {errc::kInvalidArgument, "CUDA decode: the plan needs a workspace"};
  kernel_params p{};
  p.pool = a.kv.pool;
  p.chunk_bytes = a.kv.chunk_bytes;
  p.page_bytes = a.kv.page_bytes;
  p.n_kv_heads = a.kv.n_kv_heads;
  p.tokens_per_page = a.kv.tokens_per_page;
  p.log2_tpp = log2_exact(a.kv.tokens_per_page);
  p.indptr = a.table.indptr;
  p.indices = a.table.indices;
  p.last_page_len = a.table.last_page_len;
  p.group_size = a.group_size;
  p.q_tiles = a.group_size / plan.group_tile;
  p.scale = a.scale;
  p.softcap = a.softcap;
  p.q = a.q;
  p.out = a.out;
  p.lse = a.lse;
  p.split = plan.split;
  if (plan.split.max_splits > 1) {
    const size_t slots = size_t{a.table.batch} * a.kv.n_kv_heads * a.group_size * plan.split.max_splits;
    const size_t o_bytes = (slots * a.kv.head_dim * sizeof(float) + 255) / 256 * 256;
    p.ws_o = static_cast<float*>(workspace);
    p.ws_stats = reinterpret_cast<softmax_stats*>(static_cast<unsigned char*>(workspace) + o_bytes);
  }
  const dim3 grid(plan.split.max_splits, a.kv.n_kv_heads * p.q_tiles, a.table.batch);
  status s = dispatch_decode(a.kv.head_dim, a.kv.kv_dtype, plan.group_tile, [&]<uint32_t D, dtype DT, uint32_t G>() {
    using tr = traits_for<D, DT, G>;
    if constexpr (tr::kSmemBytes > kSmemOptInBytes) {
      const status opt = opt_in_shared_memory<D, DT, G>();
      if (!opt.ok()) return opt;
    }
    paged_decode_kernel<D, DT, G><<<grid, tr::kThreads, tr::kSmemBytes, stream>>>(p);
    return cuda_status(cudaGetLastError(), "paged_decode_kernel launch");
  });
  if (!s.ok() || plan.split.max_splits == 1) return s;
  const uint32_t n_q_heads = a.kv.n_kv_heads * a.group_size;
  merge_splits_kernel<<<dim3(n_q_heads, a.table.batch), a.kv.head_dim, 0, stream>>>(p, a.kv.head_dim);
  return cuda_status(cudaGetLastError(), "merge_splits_kernel launch");
}

}  // namespace instinfer::cuda
