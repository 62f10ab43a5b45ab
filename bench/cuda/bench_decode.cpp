// instinfer-cuda-bench: achieved KV bandwidth of the paged decode kernel over the device's
// device-to-device copy bandwidth, both measured in this run on the same GPU.
//
//   instinfer-cuda-bench [--contexts 4096,32768,131072] [--batches 1,16,64] [--dtype f16]
//                        [--head-dim 128] [--kv-heads 8] [--group 4] [--page-bytes 16384]
//                        [--iters 20] [--json]
//
// Copy bandwidth counts bytes read plus bytes written (2 x size / time, as CUDA's bandwidthTest
// does); KV bandwidth counts the K and V bytes the kernel must read (batch x context x kv heads x
// row bytes x 2) over the kernel time (CUDA events; tables and queries already on the device).
// Exits 77 when no CUDA device is visible.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "instinfer/backend/cuda_backend.hpp"
#include "instinfer/cuda/decode.cuh"
#include "instinfer/layout/chunk_layout.hpp"

using namespace instinfer;

namespace {

struct options {
  std::vector<uint32_t> contexts{4096, 32768, 131072};
  std::vector<uint32_t> batches{1, 16, 64};
  dtype t = dtype::kF16;
  uint32_t head_dim = 128;
  uint32_t kv_heads = 8;
  uint32_t group = 4;
  uint32_t page_bytes = 16384;
  int iters = 20;
  bool json = false;
};

bool parse_list(const char* s, std::vector<uint32_t>& out) {
  out.clear();
  std::string str(s);
  size_t pos = 0;
  while (pos <= str.size()) {
    const size_t comma = str.find(',', pos);
    const std::string item = str.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    char* end = nullptr;
    const unsigned long v = std::strtoul(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v == 0 || v > UINT32_MAX) return false;
    out.push_back(static_cast<uint32_t>(v));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return !out.empty();
}

bool parse_args(int argc, char** argv, options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    const auto u32 = [&](uint32_t& dst) {
      if (v == nullptr) return false;
      char* end = nullptr;
      const unsigned long x = std::strtoul(v, &end, 10);
      if (*end != '\0' || x == 0 || x > UINT32_MAX) return false;
      dst = static_cast<uint32_t>(x);
      ++i;
      return true;
    };
    bool ok = true;
    if (a == "--json") {
      o.json = true;
    } else if (a == "--contexts") {
      ok = v != nullptr && parse_list(v, o.contexts);
      ++i;
    } else if (a == "--batches") {
      ok = v != nullptr && parse_list(v, o.batches);
      ++i;
    } else if (a == "--dtype") {
      const auto d = v ? parse_dtype(v) : std::nullopt;
      ok = d.has_value();
      if (ok) o.t = *d;
      ++i;
    } else if (a == "--head-dim") {
      ok = u32(o.head_dim);
    } else if (a == "--kv-heads") {
      ok = u32(o.kv_heads);
    } else if (a == "--group") {
      ok = u32(o.group);
    } else if (a == "--page-bytes") {
      ok = u32(o.page_bytes);
    } else if (a == "--iters") {
      uint32_t n = 0;
      ok = u32(n);
      o.iters = static_cast<int>(n);
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "instinfer-cuda-bench: bad argument '%s'\n", a.c_str());
      return false;
    }
  }
  return true;
}

#define BENCH_CHECK(expr)                                                                          \
  do {                                                                                             \
    const cudaError_t bench_e_ = (expr);                                                           \
    if (bench_e_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "instinfer-cuda-bench: %s: %s\n", #expr, cudaGetErrorString(bench_e_)); \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

template <class T>
T* device_alloc(size_t n) {
  void* p = nullptr;
  BENCH_CHECK(cudaMalloc(&p, n * sizeof(T)));
  return static_cast<T*>(p);
}

// Device-to-device copy bandwidth (read + written bytes per second), best of several runs.
double copy_gbps(size_t bytes) {
  void* a = nullptr;
  void* b = nullptr;
  BENCH_CHECK(cudaMalloc(&a, bytes));
  BENCH_CHECK(cudaMalloc(&b, bytes));
  BENCH_CHECK(cudaMemset(a, 1, bytes));
  BENCH_CHECK(cudaMemset(b, 2, bytes));
  cudaEvent_t e0, e1;
  BENCH_CHECK(cudaEventCreate(&e0));
  BENCH_CHECK(cudaEventCreate(&e1));
  BENCH_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));  // warm-up
  float best_ms = 1e30f;
  for (int r = 0; r < 10; ++r) {
    BENCH_CHECK(cudaEventRecord(e0));
    BENCH_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    BENCH_CHECK(cudaEventRecord(e1));
    BENCH_CHECK(cudaEventSynchronize(e1));
    float ms = 0.0f;
    BENCH_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    best_ms = std::min(best_ms, ms);
  }
  (void)cudaEventDestroy(e0);
  (void)cudaEventDestroy(e1);
  (void)cudaFree(a);
  (void)cudaFree(b);
  return 2.0 * static_cast<double>(bytes) / (best_ms * 1e-3) / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  if (!parse_args(argc, argv, o)) return 2;
  if (cuda_device_count() == 0) {
    std::printf("instinfer-cuda-bench: no CUDA device visible: SKIPPED (exit 77)\n");
    return 77;
  }
  auto page = page_geometry::make(o.page_bytes, o.head_dim, o.t);
  if (!page.ok()) {
    std::fprintf(stderr, "instinfer-cuda-bench: %s\n", page.error().to_string().c_str());
    return 2;
  }
  if (!kv_shape::is_supported_head_dim(o.head_dim)) {
    std::fprintf(stderr, "instinfer-cuda-bench: head_dim %u is not supported (64, 128 or 256)\n", o.head_dim);
    return 2;
  }
  cudaDeviceProp prop{};
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  BENCH_CHECK(cudaSetDevice(0));
  const double copy = copy_gbps(size_t{1} << 30);
  std::printf("# device: %s (sm_%d%d, %d SMs, %.1f GiB)\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
              static_cast<double>(prop.totalGlobalMem) / (1 << 30));
  std::printf("# device-to-device copy: %.1f GB/s (read + write)\n", copy);
  std::printf("%-6s %4s %4s %3s %8s %6s %7s %10s %10s %7s\n", "dtype", "hd", "kvh", "g", "context", "batch", "splits",
              "time_us", "KV_GB/s", "ratio");

  const chunk_layout cl = chunk_layout::make(*page, o.kv_heads);
  const uint32_t tpp = cl.tokens();
  std::mt19937 rng(1);
  for (uint32_t ctx : o.contexts)
    for (uint32_t batch : o.batches) {
      const uint64_t chunks_per_seq = (uint64_t{ctx} + tpp - 1) / tpp;
      const uint64_t n_chunks = chunks_per_seq * batch;
      const uint64_t pool_bytes = n_chunks * cl.chunk_bytes();
      size_t free_b = 0, total_b = 0;
      BENCH_CHECK(cudaMemGetInfo(&free_b, &total_b));
      if (pool_bytes > free_b / 10 * 7 || n_chunks > UINT32_MAX) {
        std::printf("%-6s %4u %4u %3u %8u %6u   (skipped: %.1f GiB of KV does not fit)\n",
                    std::string(dtype_name(o.t)).c_str(), o.head_dim, o.kv_heads, o.group, ctx, batch,
                    static_cast<double>(pool_bytes) / (1 << 30));
        continue;
      }
      void* pool = nullptr;
      BENCH_CHECK(cudaMalloc(&pool, pool_bytes));
      BENCH_CHECK(cudaMemset(pool, 0x3c, pool_bytes));  // f16 0x3c3c ~ 1.06, bf16 ~ 0.011, f32 ~ 0.011
      // Shuffled page tables: sequences do not sit in contiguous memory.
      std::vector<uint32_t> ids(n_chunks);
      std::iota(ids.begin(), ids.end(), 0u);
      std::shuffle(ids.begin(), ids.end(), rng);
      std::vector<uint32_t> indptr(batch + 1), last(batch, ctx - static_cast<uint32_t>(chunks_per_seq - 1) * tpp);
      for (uint32_t b = 0; b <= batch; ++b) indptr[b] = static_cast<uint32_t>(b * chunks_per_seq);
      const uint32_t n_q = o.kv_heads * o.group;
      std::vector<float> q(size_t{batch} * n_q * o.head_dim);
      std::normal_distribution<float> dist(0.0f, 1.0f);
      for (float& x : q) x = dist(rng);
      uint32_t *d_indptr = nullptr, *d_ids = nullptr, *d_last = nullptr;
      float *d_q = nullptr, *d_out = nullptr, *d_lse = nullptr;
      d_indptr = device_alloc<uint32_t>(indptr.size());
      d_ids = device_alloc<uint32_t>(ids.size());
      d_last = device_alloc<uint32_t>(last.size());
      d_q = device_alloc<float>(q.size());
      d_out = device_alloc<float>(q.size());
      d_lse = device_alloc<float>(size_t{batch} * n_q);
      BENCH_CHECK(cudaMemcpy(d_indptr, indptr.data(), indptr.size() * 4, cudaMemcpyHostToDevice));
      BENCH_CHECK(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
      BENCH_CHECK(cudaMemcpy(d_last, last.data(), last.size() * 4, cudaMemcpyHostToDevice));
      BENCH_CHECK(cudaMemcpy(d_q, q.data(), q.size() * 4, cudaMemcpyHostToDevice));

      cuda::decode_launch args;
      args.kv = cuda::paged_kv_desc{
          static_cast<const std::byte*>(pool), cl.chunk_bytes(), cl.page.page_bytes, o.kv_heads, o.head_dim, o.t, tpp};
      args.table = page_table_view{d_indptr, d_ids, d_last, batch, tpp};
      args.group_size = o.group;
      args.scale = 1.0f / std::sqrt(static_cast<float>(o.head_dim));
      args.q = d_q;
      args.out = d_out;
      args.lse = d_lse;
      auto plan = cuda::plan_decode(args.kv, o.group, batch, ctx, 0);
      if (!plan.ok()) {
        std::fprintf(stderr, "instinfer-cuda-bench: %s\n", plan.error().to_string().c_str());
        return 1;
      }
      void* ws = nullptr;
      if (plan->workspace_bytes) BENCH_CHECK(cudaMalloc(&ws, plan->workspace_bytes));
      cudaEvent_t e0, e1;
      BENCH_CHECK(cudaEventCreate(&e0));
      BENCH_CHECK(cudaEventCreate(&e1));
      for (int w = 0; w < 3; ++w) {
        const status s = cuda::launch_decode(args, *plan, ws, nullptr);
        if (!s.ok()) {
          std::fprintf(stderr, "instinfer-cuda-bench: %s\n", s.to_string().c_str());
          return 1;
        }
      }
      BENCH_CHECK(cudaDeviceSynchronize());
      std::vector<float> times;
      for (int it = 0; it < o.iters; ++it) {
        BENCH_CHECK(cudaEventRecord(e0));
        (void)cuda::launch_decode(args, *plan, ws, nullptr);
        BENCH_CHECK(cudaEventRecord(e1));
        BENCH_CHECK(cudaEventSynchronize(e1));
        float ms = 0.0f;
        BENCH_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        times.push_back(ms);
      }
      BENCH_CHECK(cudaGetLastError());
      std::sort(times.begin(), times.end());
      const double median_s = times[times.size() / 2] * 1e-3;
      const double kv_bytes = double(batch) * ctx * o.kv_heads * cl.page.row_bytes() * 2.0;
      const double kv_gbps = kv_bytes / median_s / 1e9;
      std::printf("%-6s %4u %4u %3u %8u %6u %7u %10.1f %10.1f %7.3f\n", std::string(dtype_name(o.t)).c_str(),
                  o.head_dim, o.kv_heads, o.group, ctx, batch, plan->split.max_splits, median_s * 1e6, kv_gbps,
                  kv_gbps / copy);
      if (o.json)
        std::printf(
            "{\"bench\":\"cuda_decode\",\"device\":\"%s\",\"dtype\":\"%s\",\"head_dim\":%u,\"kv_heads\":%u,"
            "\"group\":%u,\"context\":%u,\"batch\":%u,\"splits\":%u,\"time_us\":%.2f,\"kv_gbps\":%.2f,"
            "\"copy_gbps\":%.2f,\"ratio\":%.4f}\n",
            prop.name, std::string(dtype_name(o.t)).c_str(), o.head_dim, o.kv_heads, o.group, ctx, batch,
            plan->split.max_splits, median_s * 1e6, kv_gbps, copy, kv_gbps / copy);
      (void)cudaEventDestroy(e0);
      (void)cudaEventDestroy(e1);
      (void)cudaFree(ws);
      (void)cudaFree(d_indptr);
      (void)cudaFree(d_ids);
      (void)cudaFree(d_last);
      (void)cudaFree(d_q);
      (void)cudaFree(d_out);
      (void)cudaFree(d_lse);
      (void)cudaFree(pool);
    }
  return 0;
}
