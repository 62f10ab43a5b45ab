// 01: decode attention over a 32k-token KV cache of a Llama-shaped synthetic model.
//
//   build/bin/instinfer-example-01_synthetic_decode [--ctx N] [--layers N] [--steps N] [--threads N] [--kv URI]
//
// Fills every layer of one sequence with random K/V (Llama-3-8B shape: 32 layers, 32 query heads,
// 8 KV heads, head_dim 128, f16), then runs decode steps (one attend per layer per step, appending
// one token per layer as a real decoder would) and prints throughput and KV bandwidth.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "instinfer/kv/kv_cache.hpp"

namespace {

struct args {
  uint32_t ctx = 32768;
  uint32_t layers = 32;
  uint32_t steps = 8;
  uint32_t threads = 0;
  std::string kv = "host";
};

bool parse(int argc, char** argv, args& a) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) return false;
    const char* value = argv[++i];
    if (flag == "--ctx")
      a.ctx = static_cast<uint32_t>(std::strtoul(value, nullptr, 10));
    else if (flag == "--layers")
      a.layers = static_cast<uint32_t>(std::strtoul(value, nullptr, 10));
    else if (flag == "--steps")
      a.steps = static_cast<uint32_t>(std::strtoul(value, nullptr, 10));
    else if (flag == "--threads")
      a.threads = static_cast<uint32_t>(std::strtoul(value, nullptr, 10));
    else if (flag == "--kv")
      a.kv = value;
    else
      return false;
  }
  return a.ctx > 0 && a.layers > 0 && a.steps > 0;
}

// Cheap random f16 values in (-1, 1): the demo measures attention, not the RNG.
void fill_random_f16(std::vector<instinfer::f16_t>& out, uint64_t& state) {
  for (auto& h : out) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    const float x = static_cast<float>(static_cast<int32_t>(state >> 32)) * (1.0f / 2147483648.0f);
    h = instinfer::float_to_f16(x);
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  args a;
  if (!parse(argc, argv, a)) {
    std::fprintf(stderr, "usage: %s [--ctx N] [--layers N] [--steps N] [--threads N] [--kv URI]\n", argv[0]);
    return 2;
  }
  using namespace instinfer;
  cache_options o;
  o.shape = kv_shape{a.layers, 32, 8, 128, dtype::kF16};
  o.n_threads = a.threads;
  o.backend_uri = a.kv;
  const uint64_t kv_bytes_per_layer = uint64_t{a.ctx + a.steps} * o.shape.token_bytes_per_layer();
  o.capacity_bytes = kv_bytes_per_layer * a.layers + (64ull << 20);
  auto created = kv_cache::create(o);
  if (!created.ok()) {
    std::fprintf(stderr, "cannot create the cache: %s\n", created.error().to_string().c_str());
    return 1;
  }
  kv_cache& cache = *created.value();
  std::printf("instinfer demo: Llama-3-8B-shaped KV cache (%u layers, 32 q heads, 8 kv heads, head_dim 128, f16)\n",
              a.layers);
  std::printf("backend %s, page %u bytes (%u tokens per page), context %u tokens, %.2f GiB of KV\n", a.kv.c_str(),
              cache.page().page_bytes, cache.page().tokens_per_page, a.ctx,
              static_cast<double>(kv_bytes_per_layer) * a.layers / (1ull << 30));

  const seq_id seq = cache.create_sequence().value();
  const uint32_t block = 4096;
  std::vector<f16_t> k(size_t{block} * 8 * 128), v(k.size());
  uint64_t rng = 0x9e3779b97f4a7c15ull;
  auto t0 = std::chrono::steady_clock::now();
  for (uint32_t l = 0; l < a.layers; ++l) {
    for (uint32_t done = 0; done < a.ctx; done += block) {
      const uint32_t n = std::min(block, a.ctx - done);
      fill_random_f16(k, rng);
      fill_random_f16(v, rng);
      if (status s = cache.append(seq, l, n, k.data(), v.data(), dtype::kF16); !s.ok()) {
        std::fprintf(stderr, "append failed: %s\n", s.to_string().c_str());
        return 1;
      }
    }
  }
  std::printf("prefill (random K/V appended): %.2f s\n", seconds_since(t0));

  std::vector<float> q(32 * 128), out(32 * 128), lse(32);
  std::vector<f16_t> k1(8 * 128), v1(8 * 128);
  double attend_seconds = 0.0;
  uint64_t kv_bytes_read = 0;
  for (uint32_t step = 0; step < a.steps; ++step) {
    for (uint32_t l = 0; l < a.layers; ++l) {
      for (auto& x : q)
        x = static_cast<float>(static_cast<int32_t>((rng = rng * 6364136223846793005ull + 1) >> 32)) * 1e-9f;
      fill_random_f16(k1, rng);
      fill_random_f16(v1, rng);
      if (status s = cache.append(seq, l, 1, k1.data(), v1.data(), dtype::kF16); !s.ok()) {
        std::fprintf(stderr, "append failed: %s\n", s.to_string().c_str());
        return 1;
      }
      const auto ta = std::chrono::steady_clock::now();
      if (status s = cache.attend(l, std::span<const seq_id>(&seq, 1), q.data(), out.data(), lse.data()); !s.ok()) {
        std::fprintf(stderr, "attend failed: %s\n", s.to_string().c_str());
        return 1;
      }
      attend_seconds += seconds_since(ta);
      kv_bytes_read += uint64_t{cache.length(seq, l).value()} * o.shape.token_bytes_per_layer();
    }
  }
  double checksum = 0.0;
  for (float x : out) checksum += x;
  const double gbps = static_cast<double>(kv_bytes_read) / attend_seconds / 1e9;
  std::printf("decode attention: %u steps x %u layers, %.1f ms per step (attention only), %.2f steps/s\n", a.steps,
              a.layers, attend_seconds / a.steps * 1e3, a.steps / attend_seconds);
  std::printf("KV bandwidth: %.2f GB/s read by the decode kernel (output checksum %.6f)\n", gbps, checksum);
  std::printf(
      "for the kernel's bandwidth as a ratio of this machine's memory bandwidth, run:\n"
      "  build/bin/instinfer-bench decode --ctx 32768 --q-heads 32 --kv-heads 8 --head-dim 128 --dtype f16\n");
  return 0;
}
