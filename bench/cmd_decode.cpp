// instinfer-bench decode: host decode attention bandwidth against the machine's read bandwidth.
//
// KV lives in one page-aligned pool (huge pages where allowed) filled with random values; each
// sequence's chunks are consecutive chunks of the pool. The host_decoder runs the batch `reps`
// times after a warm-up; the best run is reported next to a streaming read of a buffer of the
// same size with the same thread count and the decoder's ISA (its widest loads), measured in the
// same process right before: threads started outside the timed region, best of 7 passes. A
// kernel/reference ratio above 1.02 is flagged ("weak_reference": true). Several dtypes
// (--dtype f16,q8_0) get a pool each and are timed interleaved, repetition by repetition;
// `vs_first_dtype` is each one's achieved bandwidth (stored bytes per second) over the first's.
// The compute side of the roofline is the FMA peak measured in the same run with the same ISA and
// threads (measure_fma_gflops): roofline_gbps = min(read, peak / multiply-adds per stored byte),
// roofline_ratio = achieved / roofline_gbps, and `bound` says which side sets it. bf16_dot_gmacs and
// vnni_gmacs are the reduced-precision dot-product peaks (measure_reduced_peaks), "absent" where the
// CPU lacks the instructions. --int8-dot runs q8_0 with decode_params::int8_query_dot (integer
// Q.K; "both": each q8_0 dtype twice, f32 and int8 scores, interleaved like dtypes; any other
// dtype with it is an error); `score` names the path, and `max_rel_error` is the measured error
// of the run's output against the float64 reference over the stored K/V with the f32 query (the
// roofline still counts the f32 kernel's multiply-adds).

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "instinfer/attention/decode.hpp"
#include "instinfer/testing/reference.hpp"

namespace instinfer::bench {
namespace {

struct mapped_pool {
  void* base = MAP_FAILED;
  size_t bytes = 0;
  explicit mapped_pool(size_t n) : bytes(n) {
    base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) madvise(base, bytes, MADV_HUGEPAGE);
  }
  ~mapped_pool() {
    if (base != MAP_FAILED) munmap(base, bytes);
  }
  mapped_pool(const mapped_pool&) = delete;
  mapped_pool& operator=(const mapped_pool&) = delete;
  bool ok() const { return base != MAP_FAILED; }
  std::byte* data() const { return static_cast<std::byte*>(base); }
};

// Random finite values of magnitude ~[2^-4, 2) in the storage type, written fast.
void fill_random(std::byte* p, size_t bytes, dtype t, uint64_t seed) {
  uint64_t x = seed | 1;
  auto next = [&x] {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
  };
  if (t == dtype::kF32) {
    auto* f = reinterpret_cast<uint32_t*>(p);
    for (size_t i = 0; i < bytes / 4; ++i) {
      const uint64_t r = next();
      f[i] = static_cast<uint32_t>((r & 0x80000000u) | ((123u + (r >> 40) % 5) << 23) | ((r >> 8) & 0x7fffffu));
    }
  } else {
    auto* h = reinterpret_cast<uint16_t*>(p);
    for (size_t i = 0; i < bytes / 8; ++i) {
      const uint64_t r = next();
      for (int k = 0; k < 4; ++k) {
        const uint32_t v = static_cast<uint32_t>(r >> (16 * k));
        const uint32_t sign = v & 0x8000u;
        h[4 * i + k] = t == dtype::kF16 ? static_cast<uint16_t>(sign | ((11u + (v >> 10) % 5) << 10) | (v & 0x3ffu))
                                        : static_cast<uint16_t>(sign | ((123u + (v >> 7) % 5) << 7) | (v & 0x7fu));
      }
    }
  }
}

// Quantized chunks: random integer bytes, then a finite f16 scale (~[2^-8, 2^-6)) at the start of
// every block of every row (rows start at multiples of the row bytes in each page).
void fill_random_quantized(std::byte* p, size_t n_chunks, const chunk_layout& cl, uint64_t seed) {
  fill_random(p, n_chunks * cl.chunk_bytes(), dtype::kF16, seed);
  const uint32_t blocks = cl.page.head_dim / kQuantBlock, bb = dtype_block_bytes(cl.page.kv_dtype);
  uint64_t x = seed | 1;
  for (size_t page = 0; page < n_chunks * cl.pages_per_chunk(); ++page)
    for (uint32_t t = 0; t < cl.tokens(); ++t)
      for (uint32_t b = 0; b < blocks; ++b) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        const uint16_t d = static_cast<uint16_t>(((7u + (x >> 60) % 2) << 10) | ((x >> 40) & 0x3ffu));
        std::memcpy(p + page * cl.page.page_bytes + cl.page.offset(t) + b * bb, &d, 2);
      }
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  size_t from = 0;
  while (from <= s.size()) {
    const size_t comma = std::min(s.find(',', from), s.size());
    out.push_back(s.substr(from, comma - from));
    from = comma + 1;
  }
  return out;
}

// One dtype's KV, batch and decoder for one (ctx, threads) point.
struct dtype_run {
  dtype t = dtype::kF16;
  decode_params params;  // int8_query_dot: the int8 score path
  std::unique_ptr<mapped_pool> pool;
  std::vector<const std::byte*> chunk_ptrs;
  std::vector<decode_work> work;
  std::unique_ptr<host_decoder> dec;
  uint64_t kv_bytes = 0;
  double best = 1e30;
};

int run_decode(int argc, char** argv) {
  flags f(argc, argv);
  if (!f.ok()) {
    std::fprintf(stderr, "decode: %s\n", f.error().c_str());
    return 2;
  }
  const auto ctxs = f.u64_list("ctx", {32768});
  const auto thread_list = f.u64_list("threads", {1, 2});
  const uint32_t q_heads = static_cast<uint32_t>(f.u64("q-heads", 32));
  const uint32_t kv_heads = static_cast<uint32_t>(f.u64("kv-heads", 8));
  const uint32_t head_dim = static_cast<uint32_t>(f.u64("head-dim", 128));
  const std::string dtype_str = f.str("dtype", "f16");
  const uint32_t page_bytes = static_cast<uint32_t>(f.u64("page-bytes", 4096));
  const uint32_t batch = static_cast<uint32_t>(f.u64("batch", 1));
  const int reps = static_cast<int>(f.u64("reps", 10));
  const std::string isa_str = f.str("isa", "best");
  const double softcap = f.f64("softcap", 0.0);
  const std::string int8_str = f.str("int8-dot", "off");
  if (f.has("help")) {
    std::printf(
        "usage: instinfer-bench decode [--ctx 32768,...] [--q-heads 32] [--kv-heads 8] [--head-dim 128]\n"
        "       [--dtype f16|bf16|f32|q8_0|q4_0[,...]] [--threads 1,2] [--page-bytes 4096] [--batch 1]\n"
        "       [--reps 10] [--isa best|scalar|avx2|avx512|neon] [--softcap 0] [--int8-dot [on|off|both]]\n"
        "  several dtypes (--dtype f16,q8_0) are measured interleaved: each repetition runs every\n"
        "  dtype once, so a noisy machine disturbs them alike; bandwidth counts stored bytes.\n");
    return 0;
  }
  if (!f.finish()) return 2;
  const bool int8_on = int8_str == "1" || int8_str == "on", int8_both = int8_str == "both";
  if (!int8_on && !int8_both && int8_str != "off" && int8_str != "0") {
    std::fprintf(stderr, "decode: --int8-dot takes on, off or both, got '%s'\n", int8_str.c_str());
    return 2;
  }

  std::vector<dtype> kv_types;
  for (const std::string& name : split_list(dtype_str)) {
    const auto t = parse_dtype(name);
    if (!t) {
      std::fprintf(stderr, "decode: unknown --dtype '%s' (f32, f16, bf16, q8_0, q4_0)\n", name.c_str());
      return 2;
    }
    kv_types.push_back(*t);
  }
  if (kv_heads == 0 || q_heads % kv_heads != 0 || batch == 0 || reps <= 0) {
    std::fprintf(stderr, "decode: need kv-heads >= 1 dividing q-heads, batch >= 1, reps >= 1\n");
    return 2;
  }
  cpu_isa isa = best_cpu_isa();
  if (isa_str != "best") {
    bool found = false;
    for (cpu_isa c : {cpu_isa::kScalar, cpu_isa::kAvx2, cpu_isa::kAvx512, cpu_isa::kNeon})
      if (cpu_isa_name(c) == isa_str) isa = c, found = true;
    if (!found) {
      std::fprintf(stderr, "decode: unknown --isa '%s'\n", isa_str.c_str());
      return 2;
    }
  }
  std::vector<decode_params> params_of;
  for (dtype t : kv_types) {
    auto geo = page_geometry::make(page_bytes, head_dim, t);
    if (!geo.ok()) {
      std::fprintf(stderr, "decode: %s\n", geo.error().to_string().c_str());
      return 2;
    }
    decode_params params;
    params.layout = chunk_layout::make(geo.value(), kv_heads);
    params.group_size = q_heads / kv_heads;
    params.softcap = static_cast<float>(softcap);
    if (!int8_both) {
      params.int8_query_dot = int8_on;  // q8_0 only: create() rejects the other dtypes
      params_of.push_back(params);
    } else {
      params_of.push_back(params);
      if (t == dtype::kQ8_0) {
        params.int8_query_dot = true;
        params_of.push_back(params);
      }
    }
  }

  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> q(size_t{batch} * q_heads * head_dim), out(q.size()), lse(size_t{batch} * q_heads);
  for (float& x : q) x = u(rng);
  for (uint64_t ctx : ctxs) {
    if (ctx == 0) {
      std::fprintf(stderr, "decode: --ctx must be >= 1\n");
      return 2;
    }
    std::vector<dtype_run> runs(params_of.size());
    for (size_t i = 0; i < params_of.size(); ++i) {
      dtype_run& r = runs[i];
      r.params = params_of[i];
      r.t = r.params.layout.page.kv_dtype;
      const chunk_layout& cl = r.params.layout;
      const uint32_t tpp = cl.tokens();
      const uint32_t n_chunks = static_cast<uint32_t>((ctx + tpp - 1) / tpp);
      const size_t seq_bytes = size_t{n_chunks} * cl.chunk_bytes();
      r.pool = std::make_unique<mapped_pool>(seq_bytes * batch);
      if (!r.pool->ok()) {
        std::fprintf(stderr, "decode: cannot map %zu bytes of KV\n", seq_bytes * batch);
        return 1;
      }
      const uint64_t seed = 0x9e3779b97f4a7c15ull ^ ctx;  // same KV for both paths of a dtype
      if (is_quantized(r.t))
        fill_random_quantized(r.pool->data(), size_t{n_chunks} * batch, cl, seed);
      else
        fill_random(r.pool->data(), r.pool->bytes, r.t, seed);
      r.chunk_ptrs.resize(size_t{n_chunks} * batch);
      for (size_t c = 0; c < r.chunk_ptrs.size(); ++c) r.chunk_ptrs[c] = r.pool->data() + c * cl.chunk_bytes();
      r.work.resize(batch);
      for (uint32_t s = 0; s < batch; ++s)
        r.work[s] = {r.chunk_ptrs.data() + size_t{s} * n_chunks,
                     n_chunks,
                     static_cast<uint32_t>(ctx),
                     q.data() + size_t{s} * q_heads * head_dim,
                     out.data() + size_t{s} * q_heads * head_dim,
                     lse.data() + size_t{s} * q_heads};
      // Bytes the kernel must read: K and V rows of every valid token as stored (a page's padding
      // and the last page's unused rows excluded).
      r.kv_bytes = uint64_t{batch} * ctx * kv_heads * 2 * cl.page.row_bytes();
    }

    for (uint64_t threads : thread_list) {
      uint64_t largest = 0;
      for (dtype_run& r : runs) {
        auto dec = host_decoder::create(r.params, static_cast<uint32_t>(threads), isa);
        if (!dec.ok()) {
          std::fprintf(stderr, "decode: %s\n", dec.error().to_string().c_str());
          return 1;
        }
        r.dec = std::move(dec).value();
        r.best = 1e30;
        largest = std::max(largest, r.kv_bytes);
        const status s = r.dec->run(r.work);  // warm-up: workspace, page faults, caches
        if (!s.ok()) {
          std::fprintf(stderr, "decode: %s\n", s.to_string().c_str());
          return 1;
        }
      }
      const double machine = measure_memory_read_gbps(largest, static_cast<uint32_t>(threads), runs[0].dec->isa());
      const double fma_peak = measure_fma_gflops(static_cast<uint32_t>(threads), runs[0].dec->isa());
      const reduced_peaks reduced = measure_reduced_peaks(static_cast<uint32_t>(threads));
      for (int rep = 0; rep < reps; ++rep)
        for (dtype_run& r : runs) {  // interleaved: every dtype once per repetition
          const double t0 = now_seconds();
          const status s = r.dec->run(r.work);
          if (!s.ok()) {
            std::fprintf(stderr, "decode: %s\n", s.to_string().c_str());
            return 1;
          }
          r.best = std::min(r.best, now_seconds() - t0);
        }
      for (dtype_run& r : runs) {
        // The error of the output the timed runs produced (each run recomputes it from scratch).
        const status s = r.dec->run(r.work);
        if (!s.ok()) {
          std::fprintf(stderr, "decode: %s\n", s.to_string().c_str());
          return 1;
        }
        double max_rel_error = 0.0;
        for (uint32_t b = 0; b < batch; ++b) {
          const decode_work& w = r.work[b];
          std::vector<double> ref(size_t{q_heads} * head_dim), ref_lse(q_heads);
          reference::attend_chunks(r.params, w.chunks, w.n_tokens, w.q, ref.data(), ref_lse.data());
          max_rel_error =
              std::max(max_rel_error, reference::relative_error(std::span<const float>(w.out, ref.size()), ref));
        }
        const double achieved = static_cast<double>(r.kv_bytes) / r.best / 1e9;
        const double first = static_cast<double>(runs[0].kv_bytes) / runs[0].best / 1e9;
        // Per token and kv head: group x head_dim multiply-adds for the scores and as many for the
        // V sum, over 2 stored rows (K and V).
        const double fma_per_byte =
            static_cast<double>(r.params.group_size) * head_dim / r.params.layout.page.row_bytes();
        const roofline roof = roofline_of(machine, fma_peak, fma_per_byte, achieved);
        json_line line;
        line.add("backend", "host")
            .add("ctx", ctx)
            .add("dtype", dtype_name(r.t))
            .add("score", r.params.int8_query_dot ? "int8" : "f32")
            .add("max_rel_error", max_rel_error)
            .add("q_heads", q_heads)
            .add("kv_heads", kv_heads)
            .add("head_dim", head_dim)
            .add("threads", threads)
            .add("kv_bytes", r.kv_bytes)
            .add("seconds", r.best)
            .add("achieved_gbps", achieved)
            .add("machine_read_gbps", machine)
            .add("ratio", machine > 0 ? achieved / machine : 0.0)
            // A kernel faster than its reference means the reference did not reach the machine's
            // read bandwidth: the ratio is then no measure of the kernel.
            .add("weak_reference", machine > 0 && achieved / machine > 1.02)
            .add("fma_gflops", fma_peak)
            .add("fma_per_byte", fma_per_byte)
            .add("compute_gbps", roof.compute_gbps)
            .add("roofline_gbps", roof.gbps)
            .add("roofline_ratio", roof.ratio)
            .add("bound", roof.compute_bound ? "compute" : "memory")
            .add("vs_first_dtype", achieved / first)
            .add("isa", cpu_isa_name(r.dec->isa()))
            .add("page_bytes", page_bytes)
            .add("tokens_per_page", r.params.layout.tokens())
            .add("batch", batch)
            .add("reps", reps)
            .add("softcap", softcap);
        add_reduced_peaks(line, reduced);
        line.print();
      }
    }
  }
  return 0;
}

const command_registrar registrar("decode", "host decode attention bandwidth vs the machine's read bandwidth",
                                  run_decode);

}  // namespace
}  // namespace instinfer::bench
