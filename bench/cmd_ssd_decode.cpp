// instinfer-bench ssd-decode: decode attention over an ssd: cache against a plain io_uring read of
// the same file (same request size and depth), measured in the same run.
//
// One JSON line per context length: achieved_gbps counts the KV bytes one decode step reads
// (batch x ctx x layers x K+V bytes per token); raw_read_gbps reads as many bytes of the same file
// sequentially with the backend's request size and queue depth. The two alternate in `pairs`
// short pairs (decode then raw, then raw then decode, ...), so both see the same disk and the same
// neighbours; each pair gives one ratio = achieved / raw, and the line reports the median ratio
// with its spread (interquartile range, min, max) next to the medians of both bandwidths.
// Several dtypes (--dtype f16,q8_0) run interleaved, each on its own file: every pair round runs
// each dtype's pair in turn, and step_speedup_vs_first compares step times within a round.
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

// One dtype's cache at one context length, prefilled, and what its passes measured.
struct dtype_run {
  dtype type = dtype::kF16;
  std::string path;
  std::unique_ptr<kv_cache> cache;
  ssd_backend* ssd = nullptr;
  std::vector<seq_id> seqs;
  uint64_t kv_bytes = 0, req = 0, read_before = 0;
  std::vector<float> q, out, lse;  // one decode step's queries and results
  std::vector<double> achieved, raw, cpu, ratios, step_seconds;
};

struct run_config {
  std::string path;
  uint32_t batch = 1, layers = 2, q_heads = 32, kv_heads = 8, head_dim = 128, page_bytes = 0, depth = 32;
  uint64_t staging = 8ull << 20, request = 256ull << 10;
  std::string extra;
};

// A fresh cache of `t` on its own file (`path`.<dtype> when several dtypes run), prefilled with
// `ctx` random tokens per sequence and layer, flushed.
bool prepare(const run_config& c, uint64_t ctx, dtype t, bool own_file, dtype_run& r) {
  r.type = t;
  r.path = own_file ? c.path + "." + std::string(dtype_name(t)) : c.path;
  cache_options o;
  o.shape = kv_shape{c.layers, c.q_heads, c.kv_heads, c.head_dim, t};
  o.page_bytes = c.page_bytes;
  o.n_threads = 1;
  const uint64_t token_bytes = o.shape.token_bytes_per_layer();
  o.capacity_bytes = (ctx + 1024) * token_bytes * c.layers * c.batch * 11 / 10 + (64ull << 20);
  o.backend_uri = "ssd:" + r.path + "?queue_depth=" + std::to_string(c.depth) +
                  "&staging=" + std::to_string(c.staging) + "&request=" + std::to_string(c.request) +
                  (c.extra.empty() ? "" : "&" + c.extra);
  auto made = kv_cache::create(o);
  if (!made.ok()) {
    std::fprintf(stderr, "ssd-decode: %s\n", made.error().to_string().c_str());
    return false;
  }
  r.cache = std::move(made.value());
  kv_cache& cache = *r.cache;
  r.ssd = dynamic_cast<ssd_backend*>(&cache.storage());
  // Prefill: random rows in the cache dtype, appended in blocks (host memory stays small).
  const uint32_t block = 1024;
  std::vector<std::byte> k(uint64_t{block} * token_bytes / 2), v(k.size());
  std::mt19937_64 rng(42);
  // Small finite patterns of every dtype (a q8_0 / q4_0 block's f16 scale included).
  for (auto& x : k) x = static_cast<std::byte>(rng() & 0x3f);
  for (auto& x : v) x = static_cast<std::byte>(rng() & 0x3f);
  for (uint32_t b = 0; b < c.batch; ++b) {
    auto s = cache.create_sequence();
    if (!s.ok()) return false;
    r.seqs.push_back(s.value());
    for (uint32_t l = 0; l < c.layers; ++l)
      for (uint64_t pos = 0; pos < ctx; pos += block) {
        const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(block, ctx - pos));
        if (status st = cache.append(s.value(), l, n, k.data(), v.data(), t); !st.ok()) {
          std::fprintf(stderr, "ssd-decode: append: %s\n", st.to_string().c_str());
          return false;
        }
      }
  }
  if (status st = cache.flush(); !st.ok()) {
    std::fprintf(stderr, "ssd-decode: flush: %s\n", st.to_string().c_str());
    return false;
  }
  r.q.assign(size_t{c.batch} * c.q_heads * c.head_dim, 0.01f);
  r.out.resize(r.q.size());
  r.lse.resize(size_t{c.batch} * c.q_heads);
  r.kv_bytes = uint64_t{c.batch} * ctx * token_bytes * c.layers;
  r.req = r.ssd ? r.ssd->request_bytes() : c.request;
  r.read_before = cache.stats().backend.device_bytes_read;
  return true;
}

// One decode step (all layers): seconds and CPU seconds.
bool decode_pass(const run_config& c, dtype_run& r, double& seconds, double& cpu_s) {
  const double t0 = now_seconds(), c0 = cpu_seconds();
  r.cache->prefetch(0, r.seqs);
  for (uint32_t l = 0; l < c.layers; ++l) {
    if (status st = r.cache->attend(l, r.seqs, r.q.data(), r.out.data(), r.lse.data()); !st.ok()) {
      std::fprintf(stderr, "ssd-decode: attend: %s\n", st.to_string().c_str());
      return false;
    }
    if (l + 1 < c.layers) r.cache->prefetch(l + 1, r.seqs);
  }
  seconds = now_seconds() - t0;
  cpu_s = cpu_seconds() - c0;
  return true;
}

// A decode step and a raw read of as many bytes of its file, the order alternating with `rep`.
bool measure_pair(const run_config& c, dtype_run& r, int rep) {
  double sec = 0.0, cpu_s = 0.0, raw_g = 0.0;
  const uint64_t raw_bytes = r.kv_bytes / r.req * r.req;
  if (rep % 2 == 1) raw_g = raw_read_gbps(r.path, raw_bytes, r.req, c.depth, 1);
  if (!decode_pass(c, r, sec, cpu_s)) return false;
  if (rep % 2 == 0) raw_g = raw_read_gbps(r.path, raw_bytes, r.req, c.depth, 1);
  const double ach = static_cast<double>(r.kv_bytes) / sec / 1e9;
  r.achieved.push_back(ach);
  r.raw.push_back(raw_g);
  r.cpu.push_back(cpu_s);
  r.step_seconds.push_back(sec);
  if (raw_g > 0) r.ratios.push_back(ach / raw_g);
  return true;
}

double quantile(std::vector<double> xs, double at) {
  if (xs.empty()) return 0.0;
  std::sort(xs.begin(), xs.end());
  const double pos = at * static_cast<double>(xs.size() - 1);
  const size_t i = static_cast<size_t>(pos);
  const double f = pos - static_cast<double>(i);
  return i + 1 < xs.size() ? xs[i] * (1.0 - f) + xs[i + 1] * f : xs[i];
}

int run(int argc, char** argv) {
  flags fl(argc, argv);
  run_config c;
  c.path = fl.str("path", default_path("instinfer-ssd-decode.bin"));
  const auto ctxs = fl.u64_list("ctx", {16384});
  c.batch = static_cast<uint32_t>(fl.u64("batch", 1));
  c.layers = static_cast<uint32_t>(fl.u64("layers", 2));
  c.q_heads = static_cast<uint32_t>(fl.u64("q-heads", 32));
  c.kv_heads = static_cast<uint32_t>(fl.u64("kv-heads", 8));
  c.head_dim = static_cast<uint32_t>(fl.u64("head-dim", 128));
  c.page_bytes = static_cast<uint32_t>(fl.u64("page-bytes", 0));
  c.depth = static_cast<uint32_t>(fl.u64("queue-depth", 32));
  c.staging = fl.u64("staging", 8ull << 20);
  c.request = fl.u64("request", 256ull << 10);
  const int reps = static_cast<int>(fl.u64("pairs", fl.u64("reps", 21)));  // --reps: the old name
  c.extra = fl.str("options", "");
  const std::string dtype_list = fl.str("dtype", "f16");
  std::vector<dtype> dtypes;
  bool dtypes_ok = true;
  for (size_t at = 0; at <= dtype_list.size();) {
    const size_t comma = std::min(dtype_list.find(',', at), dtype_list.size());
    const auto t = parse_dtype(dtype_list.substr(at, comma - at));
    if (!t)
      dtypes_ok = false;
    else
      dtypes.push_back(*t);
    at = comma + 1;
  }
  if (!fl.finish() || !dtypes_ok || dtypes.empty() || c.batch == 0 || c.layers == 0 || reps <= 0) {
    std::fprintf(
        stderr,
        "usage: instinfer-bench ssd-decode [--path FILE] [--ctx 65536,524288] [--batch 1] [--layers 2]\n"
        "  [--q-heads 32] [--kv-heads 8] [--head-dim 128] [--dtype f16|q8_0|...[,...]] [--page-bytes 0 (probe)]\n"
        "  [--queue-depth 32] [--staging 8M] [--request 256K] [--pairs 21] [--options 'k=v&k=v']\n"
        "  several dtypes (--dtype f16,q8_0): one file each (FILE.<dtype>), measured interleaved: each pair\n"
        "  runs every dtype in turn (the order rotating), step_speedup_vs_first = median of the pairs'\n"
        "  first-dtype step time / this dtype's\n");
    return 2;
  }
  for (uint64_t ctx : ctxs) {
    reset_peak_rss();
    std::vector<dtype_run> runs(dtypes.size());
    for (size_t i = 0; i < dtypes.size(); ++i) {
      if (!prepare(c, ctx, dtypes[i], dtypes.size() > 1, runs[i])) return 1;
      double warm_s = 0.0, warm_cpu = 0.0;
      if (!decode_pass(c, runs[i], warm_s, warm_cpu)) return 1;  // warm-up: not counted
    }
    for (int r = 0; r < reps; ++r)
      for (size_t j = 0; j < runs.size(); ++j)  // rotate which dtype goes first, so a drift favours none
        if (!measure_pair(c, runs[(j + static_cast<size_t>(r)) % runs.size()], r)) return 1;
    for (dtype_run& d : runs) {
      std::vector<double> vs_first;
      for (size_t i = 0; i < d.step_seconds.size(); ++i)
        vs_first.push_back(runs[0].step_seconds[i] / d.step_seconds[i]);
      const double achieved = quantile(d.achieved, 0.5), raw = quantile(d.raw, 0.5), cpu = quantile(d.cpu, 0.5);
      const double best = static_cast<double>(d.kv_bytes) / achieved / 1e9;
      const auto st = d.cache->stats().backend;
      const uint64_t read_per_step = (st.device_bytes_read - d.read_before) / static_cast<uint64_t>(reps + 1);
      json_line()
          .add("bench", "ssd-decode")
          .add("dtype", std::string(dtype_name(d.type)))
          .add("ctx", ctx)
          .add("batch", c.batch)
          .add("layers", c.layers)
          .add("page_bytes", d.cache->page().page_bytes)
          .add("chunk_bytes", d.cache->layout().chunk_bytes())
          .add("queue_depth", c.depth)
          .add("request_bytes", d.req)
          .add("staging_bytes", c.staging)
          .add("kv_bytes", d.kv_bytes)
          .add("device_bytes_read_per_step", read_per_step)
          .add("seconds", best)
          .add("cpu_seconds", cpu)
          .add("achieved_gbps", achieved)
          .add("raw_read_gbps", raw)
          .add("pairs", static_cast<uint64_t>(d.ratios.size()))
          .add("ratio", quantile(d.ratios, 0.5))  // median over the pairs
          .add("ratio_p25", quantile(d.ratios, 0.25))
          .add("ratio_p75", quantile(d.ratios, 0.75))
          .add("ratio_min", d.ratios.empty() ? 0.0 : *std::min_element(d.ratios.begin(), d.ratios.end()))
          .add("ratio_max", d.ratios.empty() ? 0.0 : *std::max_element(d.ratios.begin(), d.ratios.end()))
          .add("step_speedup_vs_first", quantile(vs_first, 0.5))
          .add("step_speedup_p25", quantile(vs_first, 0.25))
          .add("step_speedup_p75", quantile(vs_first, 0.75))
          .add("write_amplification", st.write_amplification())
          .add("host_memory_bytes", d.ssd ? d.ssd->host_memory_bytes() : 0)
          .add("peak_rss_bytes", peak_rss_bytes())
          .add("io", d.ssd ? d.ssd->describe() : std::string("?"))
          .print();
    }
  }
  return 0;
}

const command_registrar kRegister("ssd-decode", "decode attention over ssd: vs a raw io_uring read of the same file",
                                  run);

}  // namespace
}  // namespace instinfer::bench
