// Google Benchmark: host decode attention (host_decoder over paged KV) by context, dtype, threads.
// Every result is a bandwidth (bytes of K and V read per second). Shape: 8 query heads over
// 2 KV heads (GQA group 4), head_dim 128, 4 KiB pages; the KV pool is page-aligned and random.
//   build/bin/instinfer-gbench-decode --benchmark_filter='f16'

#include <sys/mman.h>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "instinfer/attention/decode.hpp"

namespace {

using namespace instinfer;

constexpr uint32_t kQHeads = 8;
constexpr uint32_t kKvHeads = 2;
constexpr uint32_t kHeadDim = 128;
constexpr uint32_t kPageBytes = 4096;

void bm_host_decode(benchmark::State& state) {
  const auto ctx = static_cast<uint32_t>(state.range(0));
  const auto kv_type = static_cast<dtype>(state.range(1));
  const auto threads = static_cast<uint32_t>(state.range(2));

  decode_params params;
  params.layout = chunk_layout::make(page_geometry::unchecked(kPageBytes, kHeadDim, kv_type), kKvHeads);
  params.group_size = kQHeads / kKvHeads;
  const uint32_t tpp = params.layout.tokens();
  const uint32_t n_chunks = (ctx + tpp - 1) / tpp;
  const size_t bytes = size_t{n_chunks} * params.layout.chunk_bytes();
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    state.SkipWithError("cannot map the KV pool");
    return;
  }
  madvise(mem, bytes, MADV_HUGEPAGE);
  auto* base = static_cast<std::byte*>(mem);
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const size_t n_elems = bytes / dtype_size(kv_type);
  for (size_t i = 0; i < n_elems; ++i) store_from_float(base, kv_type, static_cast<uint32_t>(i), u(rng));

  std::vector<const std::byte*> chunks(n_chunks);
  for (uint32_t c = 0; c < n_chunks; ++c) chunks[c] = base + size_t{c} * params.layout.chunk_bytes();
  std::vector<float> q(kQHeads * kHeadDim), out(q.size()), lse(kQHeads);
  for (float& x : q) x = u(rng);
  const decode_work work{chunks.data(), n_chunks, ctx, q.data(), out.data(), lse.data()};

  auto dec = host_decoder::create(params, threads);
  if (!dec.ok()) {
    munmap(mem, bytes);
    state.SkipWithError(dec.error().to_string().c_str());
    return;
  }
  for (auto _ : state) {
    const status s = (*dec)->run({&work, 1});
    if (!s.ok()) {
      state.SkipWithError(s.to_string().c_str());
      break;
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const uint64_t kv_bytes = uint64_t{ctx} * kKvHeads * 2 * params.layout.page.row_bytes();
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kv_bytes));
  state.SetLabel(std::string(dtype_name(kv_type)) + " " + std::string(cpu_isa_name((*dec)->isa())));
  state.counters["ctx"] = ctx;
  state.counters["threads"] = threads;
  munmap(mem, bytes);
}

void decode_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"ctx", "dtype", "threads"});
  for (int64_t t :
       {static_cast<int64_t>(dtype::kF32), static_cast<int64_t>(dtype::kF16), static_cast<int64_t>(dtype::kBF16)})
    for (int64_t ctx : {1024, 4096, 16384, 32768, 131072})
      for (int64_t threads : {1, 2}) b->Args({ctx, t, threads});
}

BENCHMARK(bm_host_decode)->Apply(decode_args)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace
