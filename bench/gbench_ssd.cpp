// Google Benchmark microbenchmarks of the SSD path: appends (group buffer + batched sealed writes),
// decode attention over stored chunks, and the raw io_uring read underneath. Every result is a
// bandwidth (SetBytesProcessed). Files go to $TMPDIR (or /tmp).
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "instinfer/backend/ssd_backend.hpp"
#include "instinfer/io/uring_engine.hpp"

using namespace instinfer;

namespace {

constexpr uint32_t kQHeads = 32, kKvHeads = 8, kDim = 128;

std::string scratch(const char* name) {
  const char* t = std::getenv("TMPDIR");
  return std::string(t && *t ? t : "/tmp") + "/" + name;
}

std::unique_ptr<ssd_backend> open_backend(uint32_t page_bytes, const char* name, const std::string& extra = "") {
  backend_config c;
  c.shape = kv_shape{1, kQHeads, kKvHeads, kDim, dtype::kF16};
  c.page = page_geometry::make(page_bytes, kDim, dtype::kF16).value();
  c.capacity_bytes = 1ull << 30;
  auto o = ssd_backend_options::from_uri(backend_uri::parse("ssd:" + scratch(name) + extra).value());
  if (!o.ok()) return nullptr;
  auto b = std::make_unique<ssd_backend>(o.value());
  if (!b->configure(c).ok()) return nullptr;
  return b;
}

std::vector<std::byte> random_rows(size_t bytes) {
  std::vector<std::byte> v(bytes);
  std::mt19937 rng(3);
  for (auto& x : v) x = static_cast<std::byte>(rng() & 0x3b);  // finite f16 values
  return v;
}

// Append whole chunks (tokens_per_page tokens per call), flushing and recycling every 512 chunks.
void BM_ssd_append(benchmark::State& state) {
  const uint32_t page = static_cast<uint32_t>(state.range(0));
  auto b = open_backend(page, "gbench-ssd-append.bin");
  if (!b) {
    state.SkipWithError("cannot open the ssd backend");
    return;
  }
  const uint32_t tpp = page / (kDim * 2);
  const auto rows = random_rows(size_t{tpp} * kKvHeads * kDim * 2);
  std::vector<chunk_id> live;
  uint64_t bytes = 0;
  for (auto _ : state) {
    auto id = b->allocate_chunk({1, 0, static_cast<uint32_t>(live.size())});
    if (!id.ok() || !b->write_tokens(id.value(), {}, 0, tpp, rows.data(), rows.data()).ok()) {
      state.SkipWithError("append failed");
      return;
    }
    live.push_back(id.value());
    bytes += rows.size() * 2;
    if (live.size() == 512) {
      state.PauseTiming();
      (void)b->flush();
      for (chunk_id c : live) b->release_chunk(c);
      live.clear();
      b->on_sequence_freed(1);
      state.ResumeTiming();
    }
  }
  (void)b->flush();
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  state.counters["write_amplification"] = b->stats().write_amplification();
}
BENCHMARK(BM_ssd_append)->Arg(4096)->Arg(16384)->UseRealTime();

// Decode attention of one sequence of `ctx` tokens whose chunks are all on the device.
void BM_ssd_attend(benchmark::State& state) {
  const uint32_t ctx = static_cast<uint32_t>(state.range(0));
  auto b = open_backend(4096, "gbench-ssd-attend.bin");
  if (!b) {
    state.SkipWithError("cannot open the ssd backend");
    return;
  }
  const uint32_t tpp = 16;
  const auto rows = random_rows(size_t{tpp} * kKvHeads * kDim * 2);
  std::vector<chunk_id> chunks;
  for (uint32_t t = 0; t < ctx; t += tpp) {
    auto id = b->allocate_chunk({1, 0, static_cast<uint32_t>(chunks.size())});
    if (!id.ok() || !b->write_tokens(id.value(), {}, 0, tpp, rows.data(), rows.data()).ok()) {
      state.SkipWithError("prefill failed");
      return;
    }
    chunks.push_back(id.value());
  }
  if (!b->flush().ok()) {
    state.SkipWithError("flush failed");
    return;
  }
  std::vector<float> q(kQHeads * kDim, 0.01f), out(q.size());
  attend_batch_builder batch;
  batch.clear(tpp);
  batch.add(1, chunks, static_cast<uint32_t>(chunks.size() * tpp));
  for (auto _ : state) {
    if (!b->attend(0, batch.view(q.data(), out.data(), nullptr, kQHeads, kDim)).ok()) {
      state.SkipWithError("attend failed");
      return;
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(chunks.size()) *
                          static_cast<int64_t>(tpp) * kKvHeads * kDim * 2 * 2);
}
BENCHMARK(BM_ssd_attend)->Arg(4096)->Arg(16384)->Arg(65536)->UseRealTime()->Unit(benchmark::kMillisecond);

// Raw sequential io_uring reads: request size x queue depth.
void BM_uring_read(benchmark::State& state) {
  const uint32_t request = static_cast<uint32_t>(state.range(0));
  const uint32_t depth = static_cast<uint32_t>(state.range(1));
  const uint64_t region = 64ull << 20;
  auto f = io::open_storage_file(scratch("gbench-uring-read.bin"), true, false);
  io::engine_options o;
  o.queue_depth = depth;
  o.staging_bytes = uint64_t{request} * depth;
  auto e = io::uring_engine::create(o);
  if (!f.ok() || !e.ok()) {
    state.SkipWithError("cannot open the file or the ring");
    return;
  }
  auto& eng = *e.value();
  const uint32_t h = eng.add_file(f->fd).value();
  for (uint64_t off = 0; off < region; off += request)
    if (!eng.sync_io(io::io_op::kWrite, h, eng.staging().data(), request, off).ok()) {
      state.SkipWithError("fill failed");
      return;
    }
  std::vector<io::completion> done(depth);
  uint64_t next = 0;
  for (auto _ : state) {
    // One batch of `depth` requests per iteration.
    for (uint32_t i = 0; i < depth; ++i) {
      (void)eng.queue(io::io_op::kRead, h, eng.staging().data() + uint64_t{i} * request, request, next, i);
      next = (next + request) % region;
    }
    uint32_t got = 0;
    while (got < depth) got += eng.wait(std::span(done).subspan(got), depth - got).value();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * request * depth);
  ::unlink(scratch("gbench-uring-read.bin").c_str());
}
BENCHMARK(BM_uring_read)->Args({65536, 32})->Args({262144, 32})->Args({1 << 20, 8})->UseRealTime();

}  // namespace
