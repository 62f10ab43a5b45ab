// Decode attention over paged KV: the public contract of the host kernels.
//
// One algorithm, written once (attention/decode_kernel.hpp) over an xsimd arch tag and
// instantiated per ISA in its own translation unit (src/kernels/decode_<isa>.cpp); one runtime
// dispatch picks the best available. The same kernel runs on host SIMD, on the emulated CSD's
// (ARM) cores and on staged SSD pages: callers only hand it chunk pointers.
//
// GQA head-group fusion: the kernel computes all `group_size` query heads of a kv head from one
// read of each of its K and V pages, so every KV page is read once per step.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string_view>

#include "instinfer/attention/state.hpp"
#include "instinfer/core/status.hpp"
#include "instinfer/layout/chunk_layout.hpp"

namespace instinfer {

class thread_pool;  // core/thread_pool.hpp

struct decode_params {
  chunk_layout layout{};    // page geometry (head_dim, dtype, tokens per page) and n_kv_heads
  uint32_t group_size = 1;  // query heads per kv head
  float scale = 0.0f;       // logit scale; 0 means 1/sqrt(head_dim)
  float softcap = 0.0f;     // logit soft-cap; <= 0 disables it
  // Opt-in, q8_0 K only: Q.K as integer dot products of the query quantized to q8_0 (int8, one
  // f32 scale per 32 values: quantize_query_q8) against K's int8 (~ggml's q8_0 x q8_0 dot). Each
  // query value moves by at most half its block's step (amax / 254), so logits move by up to
  // scale * sum_blocks amax_b / 254 * |k|_1,b; softmax x V stays f32. Off: exact f32 accumulation.
  // Other dtypes, or group_size * head_dim > kQ8QueryCap, are kUnsupported.
  bool int8_query_dot = false;
  static constexpr uint32_t kQ8QueryCap = 32768;  // quantized query values one kv head's group may hold

  uint32_t n_q_heads() const noexcept { return group_size * layout.n_kv_heads; }
  float effective_scale() const noexcept;
  status validate() const;
};

// q8_0 of a query row of n (a multiple of 32) floats, as the int8 Q.K path uses it: per block
// d = amax / 127 (kept in f32, not rounded to f16 as K's scales are) and qs = x / d rounded to
// nearest, |qs| <= 127. A block with a non-finite value gets d = NaN, so its scores are NaN as
// on the f32 path.
inline void quantize_query_q8(const float* x, uint32_t n, int8_t* qs, float* d) noexcept {
  for (uint32_t b = 0; b < n / kQuantBlock; ++b) {
    const float* xb = x + b * kQuantBlock;
    float amax = 0.0f;
    bool finite = true;
    for (uint32_t i = 0; i < kQuantBlock; ++i) {
      const float a = std::fabs(xb[i]);
      finite = finite && a <= std::numeric_limits<float>::max();
      amax = a > amax ? a : amax;
    }
    const float inv = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
    d[b] = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
    for (uint32_t i = 0; i < kQuantBlock; ++i) {
      const float r = finite ? std::nearbyint(xb[i] * inv) : 0.0f;
      qs[b * kQuantBlock + i] = static_cast<int8_t>(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
    }
  }
}

enum class cpu_isa : uint8_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };
std::string_view cpu_isa_name(cpu_isa isa) noexcept;
// Instantiated in this build and supported by this CPU (probed at runtime).
bool cpu_isa_available(cpu_isa isa) noexcept;
cpu_isa best_cpu_isa() noexcept;

// Partial attention of the `group_size` query heads of `kv_head` over `n_chunks` chunks, every
// chunk full except the last, which holds `last_chunk_tokens` (1..tokens_per_page) tokens.
//   chunks[i] -> chunk base, laid out as chunk_layout says; q: [group_size][head_dim] f32
//   o: [group_size][head_dim] unnormalised output (written, not accumulated); stats: [group_size]
// n_chunks == 0 yields empty states.
using decode_chunks_fn = void (*)(const decode_params& params, const std::byte* const* chunks, uint32_t n_chunks,
                                  uint32_t last_chunk_tokens, uint32_t kv_head, const float* q, float* o,
                                  softmax_stats* stats) noexcept;

// The same over the query heads of kv heads [kv_begin, kv_begin + n_kv) at once: each chunk is swept
// once for all of them (K pages of every head, then V pages).
//   q, o: [n_kv][group_size][head_dim] (kv_begin's heads first); stats: [n_kv][group_size]
using decode_heads_fn = void (*)(const decode_params& params, const std::byte* const* chunks, uint32_t n_chunks,
                                 uint32_t last_chunk_tokens, uint32_t kv_begin, uint32_t n_kv, const float* q, float* o,
                                 softmax_stats* stats) noexcept;

// Causal query rows (prefill chunks) for decode_rows_fn: the rows of one sequence share every K/V
// block, as more query heads of the kv head (the GQA group widened by rows). Row r sees the first
// visible[r] tokens of the sequence (a causal mask is a prefix); the call's first chunk starts at
// token first_token of the sequence. Strides are in floats (q, o) and states (stats) between rows.
struct decode_rows {
  uint32_t n_rows = 1;
  const uint32_t* visible = nullptr;  // [n_rows]
  uint32_t first_token = 0;
  uint64_t q_stride = 0;
  uint64_t o_stride = 0;
  uint64_t stats_stride = 0;
};

// decode_heads_fn for causal rows: row r, kv head kh (of the call), group head g is at
//   q[r * q_stride + (kh * group_size + g) * head_dim], o likewise with o_stride, and
//   stats[r * stats_stride + kh * group_size + g].
// A row's part of a block is clipped to its visible prefix: fully visible blocks run the unmasked
// tiles, blocks past every row's limit are skipped, and a row that sees nothing of the call gets
// an empty state and zeros.
using decode_rows_fn = void (*)(const decode_params& params, const std::byte* const* chunks, uint32_t n_chunks,
                                uint32_t last_chunk_tokens, uint32_t kv_begin, uint32_t n_kv, const decode_rows& rows,
                                const float* q, float* o, softmax_stats* stats) noexcept;

// The kernel for (isa, head_dim, dtype); kUnsupported if that combination is not instantiated.
result<decode_chunks_fn> select_decode_kernel(cpu_isa isa, const decode_params& params);
// The head-range kernel (what decode_driver runs), with the same validation.
result<decode_heads_fn> select_decode_heads_kernel(cpu_isa isa, const decode_params& params);
// The causal-rows kernel (what decode_driver runs for sequences with query rows), same validation.
result<decode_rows_fn> select_decode_rows_kernel(cpu_isa isa, const decode_params& params);

// One sequence of a decode batch.
struct decode_work {
  const std::byte* const* chunks = nullptr;  // n_chunks chunk base pointers, in token order
  uint32_t n_chunks = 0;
  uint32_t n_tokens = 0;     // tokens in the sequence: (n_chunks - 1) * tokens_per_page < n <= n_chunks * tpp
  const float* q = nullptr;  // [n_q_heads][head_dim]
  float* out = nullptr;      // [n_q_heads][head_dim], normalised
  float* lse = nullptr;      // [n_q_heads] natural-log sum-exp, or null
  // Causal chunk (prefill): 0 = one decode row that sees every token; n > 0 = q, out
  // [n_rows][n_q_heads][head_dim] and lse [n_rows][n_q_heads], row r at position first_pos + r
  // seeing tokens [0, first_pos + r] (first_pos + n_rows <= n_tokens).
  uint32_t n_rows = 0;
  uint32_t first_pos = 0;
};

// Batched decode over chunks in host memory, on host threads: attention/decode_driver.hpp with the
// in-memory chunk source. Work is split over (sequence, chunk range) items covering every kv head
// of those chunks (one sequential pass per chunk keeps the hardware prefetchers streaming; walking
// one head's pages 64 KiB apart halved DRAM bandwidth), split finely enough that all threads stay
// busy even for one long sequence; partials merge exactly by lse, in token order.
// The hot path allocates nothing once the workspace has grown to the largest batch seen.
class host_decoder {
 public:
  // n_threads == 0: hardware concurrency. pool: workers to share instead of starting own ones
  // (a cache's compute pool, backend_config::pool); its size() is then the thread count.
  static result<std::unique_ptr<host_decoder>> create(const decode_params& params, uint32_t n_threads = 0,
                                                      cpu_isa isa = best_cpu_isa(),
                                                      std::shared_ptr<thread_pool> pool = nullptr);
  virtual ~host_decoder() = default;

  virtual status run(std::span<const decode_work> batch) noexcept = 0;
  // The same attention with the caller's threads as workers (decode_driver::begin_shared): one
  // thread begins (the batch must stay alive until the run ends), up to n_workers threads then
  // call work_shared with distinct indices; after the last returns, shared_status() holds the
  // outcome. Nothing else may run on this decoder meanwhile.
  virtual status begin_shared(std::span<const decode_work> batch, uint32_t n_workers) noexcept = 0;
  virtual void work_shared(uint32_t worker) noexcept = 0;
  virtual status shared_status() noexcept = 0;
  virtual const decode_params& params() const noexcept = 0;
  virtual uint32_t n_threads() const noexcept = 0;
  virtual cpu_isa isa() const noexcept = 0;
};

}  // namespace instinfer
