// instinfer-bench ssd-decode: decode attention over an ssd: cache against a plain io_uring read of
// the same file (same request size and depth), measured in the same run.
//
// One JSON line per context length: achieved_gbps counts the KV bytes one decode step reads
// (batch x ctx x layers x K+V bytes per token); raw_read_gbps reads as many bytes of the same file
// sequentially with the backend's request size and queue depth. The two alternate in `pairs`
// short pairs (decode then raw, then raw then decode, ...), so both see the same disk and the same
// neighbours; each pair gives one ratio = achieved / raw, and the line reports the median ratio
// with its spread (interquartile range, min, max) next to the medians of both bandwidths.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <sys/resource.h>

#include "bench_common.hpp"
#include "instinfer/backend/ssd_backend.hpp"
#include "instinfer/io/uring_engine.hpp"
#include "instinfer/kv/kv_cache.hpp"

namespace instinfer::bench {
namespace {

std::string default_path(const char* name) {
  const char* t = std::getenv("TMPDIR");
  return std::string(t && *t ? t : "/tmp") + "/" + name;
}

double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

// VmHWM restarts from the current RSS (Linux >= 4.0), so each configuration reports its own peak.
void reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
}

// Sequential io_uring read of [0, bytes) of `path` with `request` bytes per request and `depth`
// requests in flight: the disk's reference bandwidth for this access pattern (GB/s, 1e9).
double raw_read_gbps(const std::string& path, uint64_t bytes, uint64_t request, uint32_t depth, int reps) {
  auto f = io::open_storage_file(path, false, false);
  if (!f.ok()) return 0.0;
  io::engine_options o;
  o.queue_depth = depth;
  o.staging_bytes = request * depth;
  auto e = io::uring_engine::create(o);
  if (!e.ok()) return 0.0;
  auto& eng = *e.value();
  auto h = eng.add_file(f->fd);
  if (!h.ok()) return 0.0;
  const uint64_t n_req = bytes / request;
  double best = 0.0;
  std::vector<io::completion> done(depth);
  for (int r = 0; r < reps; ++r) {
    uint64_t issued = 0, completed = 0;
    std::vector<uint32_t> free_slots;
    for (uint32_t i = 0; i < depth; ++i) free_slots.push_back(i);
    const double t0 = now_seconds();
    while (completed < n_req) {
      while (issued < n_req && !free_slots.empty()) {
        const uint32_t s = free_slots.back();
        free_slots.pop_back();
        if (!eng.queue(io::io_op::kRead, h.value(), eng.staging().data() + s * request, static_cast<uint32_t>(request),
                       issued * request, s)
                 .ok())
          return 0.0;
        ++issued;
      }
      auto got = eng.wait(done, 1);
      if (!got.ok()) return 0.0;
      for (uint32_t i = 0; i < got.value(); ++i) {
        if (!io::check_completion(done[i], "raw read").ok()) return 0.0;
        free_slots.push_back(static_cast<uint32_t>(done[i].user_data));
        ++completed;
      }
    }
    best = std::max(best, static_cast<double>(n_req * request) / (now_seconds() - t0) / 1e9);
  }
  return best;
}

int run(int argc, char** argv) {
  flags fl(argc, argv);
  const std::string path = fl.str("path", default_path("instinfer-ssd-decode.bin"));
  const auto ctxs = fl.u64_list("ctx", {16384});
  const uint32_t batch = static_cast<uint32_t>(fl.u64("batch", 1));
  const uint32_t layers = static_cast<uint32_t>(fl.u64("layers", 2));
  const uint32_t q_heads = static_cast<uint32_t>(fl.u64("q-heads", 32));
  const uint32_t kv_heads = static_cast<uint32_t>(fl.u64("kv-heads", 8));
  const uint32_t head_dim = static_cast<uint32_t>(fl.u64("head-dim", 128));
  const uint32_t page_bytes = static_cast<uint32_t>(fl.u64("page-bytes", 0));
  const uint32_t depth = static_cast<uint32_t>(fl.u64("queue-depth", 32));
  const uint64_t staging = fl.u64("staging", 8ull << 20);
  const uint64_t request = fl.u64("request", 256ull << 10);
  const int reps = static_cast<int>(fl.u64("pairs", fl.u64("reps", 21)));  // --reps: the old name
  const std::string extra = fl.str("options", "");
  const auto dt = parse_dtype(fl.str("dtype", "f16"));
  if (!fl.finish() || !dt || batch == 0 || layers == 0 || reps <= 0) {
    std::fprintf(stderr,
                 "usage: instinfer-bench ssd-decode [--path FILE] [--ctx 65536,524288] [--batch 1] [--layers 2]\n"
                 "  [--q-heads 32] [--kv-heads 8] [--head-dim 128] [--dtype f16|q8_0|...] [--page-bytes 0 (probe)]\n"
                 "  [--queue-depth 32] [--staging 8M] [--request 256K] [--pairs 21] [--options 'k=v&k=v']\n");
    return 2;
  }
  for (uint64_t ctx : ctxs) {
    reset_peak_rss();
    cache_options o;
    o.shape = kv_shape{layers, q_heads, kv_heads, head_dim, *dt};
    o.page_bytes = page_bytes;
    o.n_threads = 1;
    const uint64_t token_bytes = o.shape.token_bytes_per_layer();
    o.capacity_bytes = (ctx + 1024) * token_bytes * layers * batch * 11 / 10 + (64ull << 20);
    o.backend_uri = "ssd:" + path + "?queue_depth=" + std::to_string(depth) + "&staging=" + std::to_string(staging) +
                    "&request=" + std::to_string(request) + (extra.empty() ? "" : "&" + extra);
    auto made = kv_cache::create(o);
    if (!made.ok()) {
      std::fprintf(stderr, "ssd-decode: %s\n", made.error().to_string().c_str());
      return 1;
    }
    auto& cache = *made.value();
    auto* ssd = dynamic_cast<ssd_backend*>(&cache.storage());
    // Prefill: random rows in the cache dtype, appended in blocks (host memory stays small).
    std::vector<seq_id> seqs;
    const uint32_t block = 1024;
    std::vector<std::byte> k(uint64_t{block} * token_bytes / 2), v(k.size());
    std::mt19937_64 rng(42);
    // Small finite patterns of every dtype (a q8_0 / q4_0 block's f16 scale included).
    for (auto& x : k) x = static_cast<std::byte>(rng() & 0x3f);
    for (auto& x : v) x = static_cast<std::byte>(rng() & 0x3f);
    for (uint32_t b = 0; b < batch; ++b) {
      auto s = cache.create_sequence();
      if (!s.ok()) return 1;
      seqs.push_back(s.value());
      for (uint32_t l = 0; l < layers; ++l) {
        for (uint64_t t = 0; t < ctx; t += block) {
          const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(block, ctx - t));
          if (status st = cache.append(s.value(), l, n, k.data(), v.data(), *dt); !st.ok()) {
            std::fprintf(stderr, "ssd-decode: append: %s\n", st.to_string().c_str());
            return 1;
          }
        }
      }
    }
    if (status st = cache.flush(); !st.ok()) {
      std::fprintf(stderr, "ssd-decode: flush: %s\n", st.to_string().c_str());
      return 1;
    }
    std::vector<float> q(size_t{batch} * q_heads * head_dim, 0.01f), out(q.size()), lse(size_t{batch} * q_heads);
    const uint64_t kv_bytes = uint64_t{batch} * ctx * token_bytes * layers;
    const uint64_t req = ssd ? ssd->request_bytes() : request;
    const uint64_t read_before = cache.stats().backend.device_bytes_read;
    // One decode step (all layers): seconds and CPU seconds.
    auto decode_pass = [&](double& seconds, double& cpu_s) -> bool {
      const double t0 = now_seconds(), c0 = cpu_seconds();
      cache.prefetch(0, seqs);
      for (uint32_t l = 0; l < layers; ++l) {
        if (status st = cache.attend(l, seqs, q.data(), out.data(), lse.data()); !st.ok()) {
          std::fprintf(stderr, "ssd-decode: attend: %s\n", st.to_string().c_str());
          return false;
        }
        if (l + 1 < layers) cache.prefetch(l + 1, seqs);
      }
      seconds = now_seconds() - t0;
      cpu_s = cpu_seconds() - c0;
      return true;
    };
    double warm_s = 0.0, warm_cpu = 0.0;
    if (!decode_pass(warm_s, warm_cpu)) return 1;  // warm-up: not counted
    std::vector<double> ratios, achieved_v, raw_v, cpu_v;
    for (int r = 0; r < reps; ++r) {
      // Alternate the order inside the pair, so a drift favours neither side.
      double sec = 0.0, cpu_s = 0.0, raw_g = 0.0;
      if (r % 2 == 1) raw_g = raw_read_gbps(path, kv_bytes / req * req, req, depth, 1);
      if (!decode_pass(sec, cpu_s)) return 1;
      if (r % 2 == 0) raw_g = raw_read_gbps(path, kv_bytes / req * req, req, depth, 1);
      const double ach = static_cast<double>(kv_bytes) / sec / 1e9;
      achieved_v.push_back(ach);
      raw_v.push_back(raw_g);
      cpu_v.push_back(cpu_s);
      if (raw_g > 0) ratios.push_back(ach / raw_g);
    }
    auto quantile = [](std::vector<double> xs, double at) {
      if (xs.empty()) return 0.0;
      std::sort(xs.begin(), xs.end());
      const double pos = at * static_cast<double>(xs.size() - 1);
      const size_t i = static_cast<size_t>(pos);
      const double f = pos - static_cast<double>(i);
      return i + 1 < xs.size() ? xs[i] * (1.0 - f) + xs[i + 1] * f : xs[i];
    };
    const double achieved = quantile(achieved_v, 0.5), raw = quantile(raw_v, 0.5), cpu = quantile(cpu_v, 0.5);
    const double best = static_cast<double>(kv_bytes) / achieved / 1e9;
    const auto st = cache.stats().backend;
    const uint64_t read_per_step = (st.device_bytes_read - read_before) / static_cast<uint64_t>(reps + 1);
    const double ratio_med = quantile(ratios, 0.5);
    json_line()
        .add("bench", "ssd-decode")
        .add("ctx", ctx)
        .add("batch", batch)
        .add("layers", layers)
        .add("page_bytes", cache.page().page_bytes)
        .add("chunk_bytes", cache.layout().chunk_bytes())
        .add("queue_depth", depth)
        .add("request_bytes", req)
        .add("staging_bytes", staging)
        .add("kv_bytes", kv_bytes)
        .add("device_bytes_read_per_step", read_per_step)
        .add("seconds", best)
        .add("cpu_seconds", cpu)
        .add("achieved_gbps", achieved)
        .add("raw_read_gbps", raw)
        .add("pairs", static_cast<uint64_t>(ratios.size()))
        .add("ratio", ratio_med)  // median over the pairs
        .add("ratio_p25", quantile(ratios, 0.25))
        .add("ratio_p75", quantile(ratios, 0.75))
        .add("ratio_min", ratios.empty() ? 0.0 : *std::min_element(ratios.begin(), ratios.end()))
        .add("ratio_max", ratios.empty() ? 0.0 : *std::max_element(ratios.begin(), ratios.end()))
        .add("write_amplification", st.write_amplification())
        .add("host_memory_bytes", ssd ? ssd->host_memory_bytes() : 0)
        .add("peak_rss_bytes", peak_rss_bytes())
        .add("io", ssd ? ssd->describe() : std::string("?"))
        .print();
  }
  return 0;
}

const command_registrar kRegister("ssd-decode", "decode attention over ssd: vs a raw io_uring read of the same file",
                                  run);

}  // namespace
}  // namespace instinfer::bench
