#include "bench_common.hpp"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cinttypes>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <thread>

#include <sys/mman.h>

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace instinfer::bench {

std::map<std::string, command_info>& command_table() {
  static std::map<std::string, command_info> table;
  return table;
}

flags::flags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (a.substr(0, 2) != "--") {
      error_ = "unexpected argument '" + std::string(a) + "'";
      return;
    }
    a.remove_prefix(2);
    const size_t eq = a.find('=');
    if (eq != std::string_view::npos) {
      values_[std::string(a.substr(0, eq))] = std::string(a.substr(eq + 1));
    } else if (i + 1 < argc && std::string_view(argv[i + 1]).substr(0, 2) != "--") {
      values_[std::string(a)] = argv[++i];
    } else {
      values_[std::string(a)].assign(1, '1');  // not `= "1"`: gcc 12 -Wrestrict false positive (PR105329)
    }
  }
}

bool flags::has(std::string_view key) const {
  used_[std::string(key)] = true;
  return values_.find(key) != values_.end();
}

std::string flags::str(std::string_view key, std::string_view fallback) const {
  used_[std::string(key)] = true;
  auto it = values_.find(key);
  return it == values_.end() ? std::string(fallback) : it->second;
}

uint64_t flags::u64(std::string_view key, uint64_t fallback) const {
  const std::string s = str(key, "");
  if (s.empty()) return fallback;
  char* end = nullptr;
  uint64_t v = std::strtoull(s.c_str(), &end, 10);
  if (end && (*end == 'k' || *end == 'K')) v <<= 10;
  if (end && (*end == 'm' || *end == 'M')) v <<= 20;
  if (end && (*end == 'g' || *end == 'G')) v <<= 30;
  return v;
}

double flags::f64(std::string_view key, double fallback) const {
  const std::string s = str(key, "");
  return s.empty() ? fallback : std::strtod(s.c_str(), nullptr);
}

std::vector<uint64_t> flags::u64_list(std::string_view key, std::vector<uint64_t> fallback) const {
  const std::string s = str(key, "");
  if (s.empty()) return fallback;
  std::vector<uint64_t> out;
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t comma = std::min(s.find(',', pos), s.size());
    const std::string item = s.substr(pos, comma - pos);  // must outlive `end`
    char* end = nullptr;
    uint64_t v = std::strtoull(item.c_str(), &end, 10);
    if (end && (*end == 'k' || *end == 'K')) v <<= 10;
    out.push_back(v);
    pos = comma + 1;
  }
  return out;
}

bool flags::finish() const {
  for (const auto& [k, v] : values_) {
    if (!used_.count(k)) {
      std::fprintf(stderr, "unknown flag --%s\n", k.c_str());
      return false;
    }
  }
  return ok();
}

void json_line::key(std::string_view k) {
  if (!body_.empty()) body_ += ", ";
  body_ += '"';
  body_ += k;
  body_ += "\": ";
}

json_line& json_line::add(std::string_view k, std::string_view value) {
  key(k);
  body_ += '"';
  for (char c : value) {
    if (c == '"' || c == '\\') body_ += '\\';
    body_ += c;
  }
  body_ += '"';
  return *this;
}

json_line& json_line::add(std::string_view k, double value) {
  key(k);
  char buf[64];
  if (std::isfinite(value))
    std::snprintf(buf, sizeof buf, "%.6g", value);
  else
    std::snprintf(buf, sizeof buf, "null");
  body_ += buf;
  return *this;
}

json_line& json_line::add(std::string_view k, uint64_t value) {
  key(k);
  body_ += std::to_string(value);
  return *this;
}

json_line& json_line::add(std::string_view k, int64_t value) {
  key(k);
  body_ += std::to_string(value);
  return *this;
}

json_line& json_line::add(std::string_view k, bool value) {
  key(k);
  body_ += value ? "true" : "false";
  return *this;
}

void json_line::print(FILE* f) const {
  std::fprintf(f, "%s\n", str().c_str());
  std::fflush(f);
}

namespace {
// Sums of 64-bit words read with the widest loads of an ISA (the kernels' dispatch: the same
// cpu_isa value selects the same vector width): a read the compiler cannot drop. Four independent
// accumulators keep several loads in flight.
uint64_t sum_words_scalar(const uint64_t* p, size_t n) {
  uint64_t a = 0, b = 0, c = 0, d = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a += p[i];
    b += p[i + 1];
    c += p[i + 2];
    d += p[i + 3];
  }
  for (; i < n; ++i) a += p[i];
  return a + b + c + d;
}
#if defined(__x86_64__)
__attribute__((target("avx2"))) uint64_t sum_words_avx2(const uint64_t* p, size_t n) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a = _mm256_add_epi64(a, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_add_epi64(b, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
    c = _mm256_add_epi64(c, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
    d = _mm256_add_epi64(d, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 12)));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + sum_words_scalar(p + i, n - i);
}
__attribute__((target("avx512f"))) uint64_t sum_words_avx512(const uint64_t* p, size_t n) {
  __m512i a = _mm512_set1_epi64(0), b = a, c = a, d = a;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a = _mm512_add_epi64(a, _mm512_load_si512(p + i));
    b = _mm512_add_epi64(b, _mm512_load_si512(p + i + 8));
    c = _mm512_add_epi64(c, _mm512_load_si512(p + i + 16));
    d = _mm512_add_epi64(d, _mm512_load_si512(p + i + 24));
  }
  alignas(64) uint64_t lanes[8];  // not _mm512_reduce_add_epi64: GCC 12 warns inside it (-Wuninitialized)
  _mm512_store_si512(lanes, _mm512_add_epi64(_mm512_add_epi64(a, b), _mm512_add_epi64(c, d)));
  return sum_words_scalar(lanes, 8) + sum_words_scalar(p + i, n - i);
}
#endif
#if defined(__aarch64__)
uint64_t sum_words_neon(const uint64_t* p, size_t n) {
  uint64x2_t a = vdupq_n_u64(0), b = a, c = a, d = a;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    a = vaddq_u64(a, vld1q_u64(p + i));
    b = vaddq_u64(b, vld1q_u64(p + i + 2));
    c = vaddq_u64(c, vld1q_u64(p + i + 4));
    d = vaddq_u64(d, vld1q_u64(p + i + 6));
  }
  return vaddvq_u64(vaddq_u64(vaddq_u64(a, b), vaddq_u64(c, d))) + sum_words_scalar(p + i, n - i);
}
#endif
uint64_t sum_words(cpu_isa isa, const uint64_t* p, size_t n) {
  switch (isa) {
#if defined(__x86_64__)
    case cpu_isa::kAvx512: return sum_words_avx512(p, n);
    case cpu_isa::kAvx2: return sum_words_avx2(p, n);
#endif
#if defined(__aarch64__)
    case cpu_isa::kNeon: return sum_words_neon(p, n);
#endif
    default: return sum_words_scalar(p, n);
  }
}
}  // namespace

namespace {
// Runs `work(t)` on `threads` threads `reps` + 1 times and returns the best pass's seconds (pass 0
// warms up: TLB, caches, thread wake-up). Threads start before the timed region and wait at a
// barrier; a pass is timed from the release of the start barrier to the last thread's arrival at
// the end barrier.
template <typename Work>
double best_pass_seconds(uint32_t threads, int reps, Work&& work) {
  threads = std::max<uint32_t>(threads, 1);
  std::barrier start(threads + 1), end(threads + 1);
  std::atomic<bool> quit{false};
  std::vector<std::thread> pool;
  for (uint32_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (;;) {
        start.arrive_and_wait();
        if (quit.load(std::memory_order_acquire)) return;
        work(t);
        end.arrive_and_wait();
      }
    });
  double best = 1e30;
  for (int r = 0; r < std::max(reps, 1) + 1; ++r) {
    const double t0 = now_seconds();
    start.arrive_and_wait();
    end.arrive_and_wait();
    const double dt = now_seconds() - t0;
    if (r > 0) best = std::min(best, dt);
  }
  quit.store(true, std::memory_order_release);
  start.arrive_and_wait();
  for (auto& th : pool) th.join();
  return best;
}

// Independent f32 multiply-add chains in the widest registers of an ISA: enough chains to cover
// the FMA latency times the number of FMA pipes of current cores (4-5 cycles x 2 pipes on x86,
// 4 cycles x up to 4 pipes on Arm), so the loop runs at the core's FMA throughput. a * m + c with
// m just below 1 stays finite and normal forever. Each chain starts from its own value (chains
// that provably hold the same values are merged by the compiler, which once made this measure one
// chain and report 12). Returns a value the compiler cannot drop.
constexpr uint64_t kFmaIterations = uint64_t{1} << 21;

float fma_chains_scalar(uint64_t iters) {
  float a[8];
  for (int i = 0; i < 8; ++i) a[i] = 1.0f + static_cast<float>(i);
  const float m = 0.9999999f, c = 1e-7f;
  for (uint64_t n = 0; n < iters; ++n)
    for (float& x : a) x = std::fma(x, m, c);
  float s = 0;
  for (float x : a) s += x;
  return s;
}
#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float fma_chains_avx2(uint64_t iters) {
  const __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
  // Distinct starting values: identical chains would be merged into one by the compiler.
  __m256 a0 = _mm256_set1_ps(1.0f), a1 = _mm256_set1_ps(1.1f), a2 = _mm256_set1_ps(1.2f), a3 = _mm256_set1_ps(1.3f),
         a4 = _mm256_set1_ps(1.4f), a5 = _mm256_set1_ps(1.5f), a6 = _mm256_set1_ps(1.6f), a7 = _mm256_set1_ps(1.7f),
         a8 = _mm256_set1_ps(1.8f), a9 = _mm256_set1_ps(1.9f), a10 = _mm256_set1_ps(2.0f), a11 = _mm256_set1_ps(2.1f);
  for (uint64_t n = 0; n < iters; ++n) {
    a0 = _mm256_fmadd_ps(a0, m, c), a1 = _mm256_fmadd_ps(a1, m, c), a2 = _mm256_fmadd_ps(a2, m, c);
    a3 = _mm256_fmadd_ps(a3, m, c), a4 = _mm256_fmadd_ps(a4, m, c), a5 = _mm256_fmadd_ps(a5, m, c);
    a6 = _mm256_fmadd_ps(a6, m, c), a7 = _mm256_fmadd_ps(a7, m, c), a8 = _mm256_fmadd_ps(a8, m, c);
    a9 = _mm256_fmadd_ps(a9, m, c), a10 = _mm256_fmadd_ps(a10, m, c), a11 = _mm256_fmadd_ps(a11, m, c);
  }
  const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                 _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)),
                                               _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11))));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  return lanes[0] + lanes[7];
}
__attribute__((target("avx512f"))) float fma_chains_avx512(uint64_t iters) {
  const __m512 m = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
  __m512 a0 = _mm512_set1_ps(1.0f), a1 = _mm512_set1_ps(1.1f), a2 = _mm512_set1_ps(1.2f), a3 = _mm512_set1_ps(1.3f),
         a4 = _mm512_set1_ps(1.4f), a5 = _mm512_set1_ps(1.5f), a6 = _mm512_set1_ps(1.6f), a7 = _mm512_set1_ps(1.7f),
         a8 = _mm512_set1_ps(1.8f), a9 = _mm512_set1_ps(1.9f), a10 = _mm512_set1_ps(2.0f), a11 = _mm512_set1_ps(2.1f);
  for (uint64_t n = 0; n < iters; ++n) {
    a0 = _mm512_fmadd_ps(a0, m, c), a1 = _mm512_fmadd_ps(a1, m, c), a2 = _mm512_fmadd_ps(a2, m, c);
    a3 = _mm512_fmadd_ps(a3, m, c), a4 = _mm512_fmadd_ps(a4, m, c), a5 = _mm512_fmadd_ps(a5, m, c);
    a6 = _mm512_fmadd_ps(a6, m, c), a7 = _mm512_fmadd_ps(a7, m, c), a8 = _mm512_fmadd_ps(a8, m, c);
    a9 = _mm512_fmadd_ps(a9, m, c), a10 = _mm512_fmadd_ps(a10, m, c), a11 = _mm512_fmadd_ps(a11, m, c);
  }
  const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                 _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)),
                                               _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11))));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  return lanes[0] + lanes[15];
}
#endif
#if defined(__aarch64__)
float fma_chains_neon(uint64_t iters) {
  const float32x4_t m = vdupq_n_f32(0.9999999f), c = vdupq_n_f32(1e-7f);
  float32x4_t a[16];
  for (int i = 0; i < 16; ++i) a[i] = vdupq_n_f32(1.0f + 0.1f * static_cast<float>(i));  // distinct chains
  for (uint64_t n = 0; n < iters; ++n)
    for (auto& x : a) x = vfmaq_f32(c, x, m);
  float32x4_t s = a[0];
  for (int i = 1; i < 16; ++i) s = vaddq_f32(s, a[i]);
  return vaddvq_f32(s);
}
#endif
// Lanes x chains: the multiply-adds one call of fma_chains(isa, iters) performs per iteration.
uint64_t fma_per_iteration(cpu_isa isa) {
  switch (isa) {
#if defined(__x86_64__)
    case cpu_isa::kAvx512: return 16 * 12;
    case cpu_isa::kAvx2: return 8 * 12;
#endif
#if defined(__aarch64__)
    case cpu_isa::kNeon: return 4 * 16;
#endif
    default: return 8;
  }
}
float fma_chains(cpu_isa isa, uint64_t iters) {
  switch (isa) {
#if defined(__x86_64__)
    case cpu_isa::kAvx512: return fma_chains_avx512(iters);
    case cpu_isa::kAvx2: return fma_chains_avx2(iters);
#endif
#if defined(__aarch64__)
    case cpu_isa::kNeon: return fma_chains_neon(iters);
#endif
    default: return fma_chains_scalar(iters);
  }
}
}  // namespace

double measure_memory_read_gbps(uint64_t bytes, uint32_t threads, cpu_isa isa, int reps) {
  threads = std::max<uint32_t>(threads, 1);
  const size_t words = bytes / 64 * 8;  // whole 64-byte lines: the widest load's alignment
  if (words == 0) return 0.0;
  void* mem = mmap(nullptr, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return 0.0;
  madvise(mem, words * 8, MADV_HUGEPAGE);
  auto* p = static_cast<uint64_t*>(mem);
  for (size_t i = 0; i < words; ++i) p[i] = i * 0x9e3779b97f4a7c15ull;
  std::vector<uint64_t> partial(threads);
  const size_t lines = words / 8;
  const double best = best_pass_seconds(threads, reps, [&](uint32_t t) {
    const size_t begin = lines * t / threads * 8, stop = lines * (t + 1) / threads * 8;  // 64-byte aligned
    partial[t] += sum_words(isa, p + begin, stop - begin);
  });
  volatile uint64_t sink = 0;
  for (auto v : partial) sink = sink + v;
  munmap(mem, words * 8);
  return static_cast<double>(words * 8) / best / 1e9;
}

double measure_fma_gflops(uint32_t threads, cpu_isa isa, int reps) {
  threads = std::max<uint32_t>(threads, 1);
  const uint64_t iters = isa == cpu_isa::kScalar ? kFmaIterations / 4 : kFmaIterations;
  std::vector<float> partial(threads);
  const double best = best_pass_seconds(threads, reps, [&](uint32_t t) { partial[t] += fma_chains(isa, iters); });
  volatile float sink = 0;
  for (float v : partial) sink = sink + v;
  return static_cast<double>(iters * fma_per_iteration(isa)) * threads / best / 1e9;
}

#if defined(__x86_64__)
namespace {
// Independent vdpbf16ps / vpdpbusd chains (12 zmm accumulators, as for the f32 FMA peak). Compiled
// for the instruction sets by attribute and called only where the CPU reports them.
__attribute__((target("avx512f,avx512bf16"))) float bf16_dot_chains(uint64_t iters) {
  const __m512bh m = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16 1.0, pairs
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1.0f + 0.1f * static_cast<float>(i));
  __m512bh x = (__m512bh)_mm512_set1_epi16(0x3380);  // bf16 ~6e-8: the sums stay finite
  for (uint64_t n = 0; n < iters; ++n)
#pragma GCC unroll 12
    for (auto& v : a) v = _mm512_dpbf16_ps(v, x, m);
  __m512 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  return lanes[0] + lanes[15];
}
__attribute__((target("avx512f,avx512vnni"))) float vnni_dot_chains(uint64_t iters) {
  const __m512i u = _mm512_set1_epi8(1), w = _mm512_set1_epi8(-1);
  __m512i a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_epi32(i);
  for (uint64_t n = 0; n < iters; ++n)
#pragma GCC unroll 12
    for (auto& v : a) v = _mm512_dpbusd_epi32(v, u, w);
  __m512i s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_epi32(s, a[i]);
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, s);
  return static_cast<float>(lanes[0] + lanes[15]);
}
}  // namespace
#endif

reduced_peaks measure_reduced_peaks(uint32_t threads, int reps) {
  reduced_peaks r;
  threads = std::max<uint32_t>(threads, 1);
#if defined(__x86_64__)
  __builtin_cpu_init();
  const auto run = [&](auto chains, double macs_per_iter) {
    std::vector<float> partial(threads);
    const double best = best_pass_seconds(threads, reps, [&](uint32_t t) { partial[t] += chains(kFmaIterations); });
    volatile float sink = 0;
    for (float v : partial) sink = sink + v;
    return static_cast<double>(kFmaIterations) * macs_per_iter * threads / best / 1e9;
  };
  // Products per instruction: vdpbf16ps zmm = 16 lanes x 2 bf16 pairs; vpdpbusd zmm = 16 x 4 bytes.
  if (__builtin_cpu_supports("avx512bf16")) r.bf16_gmacs = run(bf16_dot_chains, 12.0 * 32);
  if (__builtin_cpu_supports("avx512vnni")) r.vnni_gmacs = run(vnni_dot_chains, 12.0 * 64);
#else
  (void)reps;  // Arm's bfdot / sdot: not measured yet
#endif
  return r;
}

void add_reduced_peaks(json_line& line, const reduced_peaks& r) {
  if (r.bf16_gmacs)
    line.add("bf16_dot_gmacs", *r.bf16_gmacs);
  else
    line.add("bf16_dot_gmacs", "absent");
  if (r.vnni_gmacs)
    line.add("vnni_gmacs", *r.vnni_gmacs);
  else
    line.add("vnni_gmacs", "absent");
}

roofline roofline_of(double read_gbps, double fma_gflops, double fma_per_byte, double achieved_gbps) {
  roofline r;
  r.compute_gbps = fma_per_byte > 0 ? fma_gflops / fma_per_byte : 0.0;
  r.compute_bound = fma_per_byte > 0 && r.compute_gbps < read_gbps;
  r.gbps = r.compute_bound ? r.compute_gbps : read_gbps;
  r.ratio = r.gbps > 0 ? achieved_gbps / r.gbps : 0.0;
  return r;
}

uint64_t peak_rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtoull(line.c_str() + 6, nullptr, 10) * 1024;
  }
  return 0;
}

}  // namespace instinfer::bench
