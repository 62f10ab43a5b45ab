// instinfer-bench kv-access: storage access patterns of KV decode over io_uring + O_DIRECT.
//
// The file is laid out as the ssd backend lays it out: chunks of 2 * kv_heads pages, a sequence's
// layer contiguous. Patterns (one JSON line each):
//   layer-seq     a layer's chunks of one sequence, in order, `request` bytes per read (dense decode)
//   head-strided  one kv head's K page of every chunk: page-sized reads at a chunk stride
//   random-pages  random single pages, as sparse attention (top-k pages) reads them
//   many-seqs     `seqs` sequences' layers read at once, requests interleaved across them
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "instinfer/io/uring_engine.hpp"

namespace instinfer::bench {
namespace {

struct read_req {
  uint64_t offset;
  uint32_t len;
};

// Run `reqs` with `depth` in flight; returns seconds (negative on an I/O error).
double run_requests(io::uring_engine& eng, uint32_t file, const std::vector<read_req>& reqs, uint32_t depth,
                    uint64_t slot_bytes) {
  std::vector<uint32_t> free_slots;
  for (uint32_t i = 0; i < depth; ++i) free_slots.push_back(i);
  std::vector<io::completion> done(depth);
  size_t issued = 0, completed = 0;
  const double t0 = now_seconds();
  while (completed < reqs.size()) {
    while (issued < reqs.size() && !free_slots.empty()) {
      const uint32_t s = free_slots.back();
      free_slots.pop_back();
      if (!eng.queue(io::io_op::kRead, file, eng.staging().data() + s * slot_bytes, reqs[issued].len,
                     reqs[issued].offset, s)
               .ok())
        return -1.0;
      ++issued;
    }
    auto got = eng.wait(done, 1);
    if (!got.ok()) return -1.0;
    for (uint32_t i = 0; i < got.value(); ++i) {
      if (!io::check_completion(done[i], "kv-access read").ok()) return -1.0;
      free_slots.push_back(static_cast<uint32_t>(done[i].user_data));
      ++completed;
    }
  }
  return now_seconds() - t0;
}

int run(int argc, char** argv) {
  flags fl(argc, argv);
  const char* tmp = std::getenv("TMPDIR");
  const std::string path = fl.str("path", std::string(tmp && *tmp ? tmp : "/tmp") + "/instinfer-kv-access.bin");
  const uint64_t bytes = fl.u64("bytes", 256ull << 20);
  const uint32_t page = static_cast<uint32_t>(fl.u64("page-bytes", 4096));
  const uint32_t kv_heads = static_cast<uint32_t>(fl.u64("kv-heads", 8));
  const uint32_t depth = static_cast<uint32_t>(fl.u64("queue-depth", 32));
  const uint64_t request_arg = fl.u64("request", 256ull << 10);
  const uint32_t seqs = static_cast<uint32_t>(fl.u64("seqs", 8));
  const uint64_t n_random = fl.u64("random-reads", 16384);
  const bool keep = fl.has("keep");
  if (!fl.finish() || page < 4096 || kv_heads == 0 || depth == 0 || seqs == 0) {
    std::fprintf(stderr,
                 "usage: instinfer-bench kv-access [--path FILE] [--bytes 256M] [--page-bytes 4096] [--kv-heads 8]\n"
                 "  [--queue-depth 32] [--request 256K] [--seqs 8] [--random-reads 16384] [--keep]\n");
    return 2;
  }
  const uint64_t chunk = uint64_t{page} * 2 * kv_heads;
  const uint64_t request = std::max<uint64_t>(chunk, request_arg / chunk * chunk);
  const uint64_t n_chunks = bytes / chunk;
  if (n_chunks < seqs) {
    std::fprintf(stderr, "kv-access: --bytes too small for %u sequences\n", seqs);
    return 2;
  }
  auto f = io::open_storage_file(path, true, false);
  if (!f.ok()) {
    std::fprintf(stderr, "kv-access: %s\n", f.error().to_string().c_str());
    return 1;
  }
  io::engine_options o;
  o.queue_depth = depth;
  o.staging_bytes = request * depth;
  auto e = io::uring_engine::create(o);
  if (!e.ok()) return 1;
  auto& eng = *e.value();
  const uint32_t file = eng.add_file(f->fd).value();
  // Fill the region once (large sequential writes).
  std::vector<read_req> fill;
  for (uint64_t off = 0; off + request <= n_chunks * chunk; off += request)
    fill.push_back({off, static_cast<uint32_t>(request)});
  std::fill(eng.staging().begin(), eng.staging().end(), std::byte{0x5a});
  {
    std::vector<uint32_t> free_slots;
    std::vector<io::completion> done(depth);
    for (uint32_t i = 0; i < depth; ++i) free_slots.push_back(i);
    size_t issued = 0, completed = 0;
    while (completed < fill.size()) {
      while (issued < fill.size() && !free_slots.empty()) {
        const uint32_t s = free_slots.back();
        free_slots.pop_back();
        if (!eng.queue(io::io_op::kWrite, file, eng.staging().data() + s * request, fill[issued].len,
                       fill[issued].offset, s)
                 .ok())
          return 1;
        ++issued;
      }
      auto got = eng.wait(done, 1);
      if (!got.ok()) return 1;
      for (uint32_t i = 0; i < got.value(); ++i) {
        if (!io::check_completion(done[i], "fill").ok()) return 1;
        free_slots.push_back(static_cast<uint32_t>(done[i].user_data));
        ++completed;
      }
    }
  }
  const uint64_t region = n_chunks * chunk;
  std::mt19937_64 rng(7);
  struct pattern {
    const char* name;
    std::vector<read_req> reqs;
  };
  std::vector<pattern> patterns;
  {
    pattern p{"layer-seq", {}};
    for (uint64_t off = 0; off + request <= region; off += request)
      p.reqs.push_back({off, static_cast<uint32_t>(request)});
    patterns.push_back(std::move(p));
  }
  {
    pattern p{"head-strided", {}};
    for (uint64_t c = 0; c < n_chunks; ++c) p.reqs.push_back({c * chunk, page});
    patterns.push_back(std::move(p));
  }
  {
    pattern p{"random-pages", {}};
    const uint64_t pages = region / page;
    for (uint64_t i = 0; i < n_random; ++i) p.reqs.push_back({(rng() % pages) * page, page});
    patterns.push_back(std::move(p));
  }
  {
    pattern p{"many-seqs", {}};
    const uint64_t per_seq = region / seqs / request * request;
    for (uint64_t off = 0; off + request <= per_seq; off += request)
      for (uint32_t s = 0; s < seqs; ++s) p.reqs.push_back({s * per_seq + off, static_cast<uint32_t>(request)});
    patterns.push_back(std::move(p));
  }
  for (const auto& p : patterns) {
    const double secs = run_requests(eng, file, p.reqs, depth, request);
    uint64_t moved = 0;
    for (const auto& r : p.reqs) moved += r.len;
    json_line()
        .add("bench", "kv-access")
        .add("pattern", p.name)
        .add("page_bytes", page)
        .add("chunk_bytes", chunk)
        .add("request_bytes", p.reqs.empty() ? 0u : p.reqs.front().len)
        .add("queue_depth", depth)
        .add("requests", static_cast<uint64_t>(p.reqs.size()))
        .add("bytes", moved)
        .add("seconds", secs)
        .add("gbps", secs > 0 ? static_cast<double>(moved) / secs / 1e9 : 0.0)
        .add("iops", secs > 0 ? static_cast<double>(p.reqs.size()) / secs : 0.0)
        .add("io", eng.features().describe())
        .print();
  }
  if (!keep && f->created) std::remove(path.c_str());
  return 0;
}

const command_registrar kRegister("kv-access",
                                  "KV storage access patterns (sequential, strided, random, many sequences)", run);

}  // namespace
}  // namespace instinfer::bench
