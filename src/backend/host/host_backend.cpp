#include "instinfer/backend/host_backend.hpp"

#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <new>

namespace instinfer {

namespace {
constexpr size_t kHugePage = 2u << 20;

size_t round_up(size_t v, size_t a) {
  return (v + a - 1) / a * a;
}
}  // namespace

uint64_t default_host_capacity_bytes() noexcept {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page_size <= 0) return 1ull << 30;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size) / 2;
}

// RAM plus swap: the most a pool could ever be backed with (0 when unknown). Container limits
// (cgroups) are not consulted.
uint64_t host_memory_limit_bytes() noexcept {
  struct sysinfo si {};
  if (sysinfo(&si) != 0) return 0;
  return (static_cast<uint64_t>(si.totalram) + si.totalswap) * si.mem_unit;
}

host_backend::~host_backend() {
  if (pool_) munmap(pool_, pool_bytes_);
}

status host_backend::configure(const backend_config& config) {
  if (pool_) return {errc::kInvalidArgument, "host backend is already configured"};
  INSTINFER_TRY(config.shape.validate());
  config_ = config;
  layout_ = config.layout();
  const uint64_t capacity = config.capacity_bytes ? config.capacity_bytes : default_host_capacity_bytes();
  capacity_chunks_ = std::min<uint64_t>(capacity / layout_.chunk_bytes(), kInvalidChunk - 1);
  if (capacity_chunks_ == 0)
    return {errc::kInvalidArgument, "host: capacity_bytes " + std::to_string(capacity) + " holds no chunk of " +
                                        std::to_string(layout_.chunk_bytes()) + " bytes (2 x n_kv_heads pages)"};

  // The pool is reserved lazily (below), so a capacity beyond the machine would be accepted and
  // the OOM killer would end the process as it filled: refuse it up front, with a clear error.
  if (const uint64_t limit = host_memory_limit_bytes(); limit != 0 && capacity > limit)
    return {errc::kOutOfMemory, "host KV capacity of " + std::to_string(capacity) +
                                    " bytes exceeds this machine's memory (" + std::to_string(limit) +
                                    " bytes of RAM and swap)"};

  // Reserve the pool; MAP_NORESERVE + lazy commit keeps an unused capacity free.
  const size_t bytes = round_up(capacity_chunks_ * layout_.chunk_bytes(), kHugePage);
  void* mem = MAP_FAILED;
  if (options_.try_hugetlb) {
    // No MAP_NORESERVE here: hugetlb pages must be reserved up front, or touching one raises SIGBUS.
    mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
    if (mem != MAP_FAILED) memory_kind_ = host_memory_kind::kHugeTlb;
  }
  if (mem == MAP_FAILED) {
    // Over-reserve by one huge page so the pool can start on a 2 MiB boundary (THP-eligible).
    void* raw =
        mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED)
      return {errc::kOutOfMemory, "cannot reserve " + std::to_string(bytes) + " bytes for the host KV pool"};
    auto* base = static_cast<std::byte*>(raw);
    auto* aligned = reinterpret_cast<std::byte*>(round_up(reinterpret_cast<uintptr_t>(base), kHugePage));
    if (aligned > base) munmap(base, static_cast<size_t>(aligned - base));
    const size_t tail = static_cast<size_t>((base + bytes + kHugePage) - (aligned + bytes));
    if (tail) munmap(aligned + bytes, tail);
    mem = aligned;
    memory_kind_ =
        madvise(mem, bytes, MADV_HUGEPAGE) == 0 ? host_memory_kind::kTransparentHuge : host_memory_kind::kAligned4k;
  }
  pool_ = static_cast<std::byte*>(mem);
  pool_bytes_ = bytes;

  decode_params params;
  params.layout = layout_;
  params.group_size = config.shape.group_size();
  params.scale = config.scale;
  params.softcap = config.softcap;
  params.int8_query_dot = config.int8_query_dot;
  auto decoder = host_decoder::create(params, config.n_threads, best_cpu_isa(), config.pool);
  if (!decoder.ok()) return decoder.error();
  decoder_ = std::move(decoder).value();
  return {};
}

result<chunk_id> host_backend::allocate_chunk(const chunk_hint&) noexcept {
  // Reuse released chunks first, then hand out never-touched ones in order (compact RSS).
  if (!free_list_.empty()) {
    const chunk_id id = free_list_.back();
    free_list_.pop_back();
    return id;
  }
  if (next_fresh_ < capacity_chunks_) return static_cast<chunk_id>(next_fresh_++);
  return status{errc::kOutOfPages, "host KV pool of " + std::to_string(capacity_chunks_) + " chunks is exhausted"};
}

void host_backend::release_chunk(chunk_id id) noexcept {
  if (!valid_id(id)) return;
  try {
    free_list_.push_back(id);
  } catch (...) {
    // Cannot happen in practice (the list never exceeds the ids handed out); leaking one chunk
    // is the safe outcome if it does.
  }
}

status host_backend::write_tokens(chunk_id id, const chunk_hint&, uint32_t first, uint32_t n, const std::byte* k,
                                  const std::byte* v) noexcept {
  if (!valid_id(id)) return {errc::kInvalidArgument, "chunk id out of range"};
  if (!k || !v) return {errc::kInvalidArgument, "null K or V rows"};
  if (!layout_.fits(first, n)) return {errc::kInvalidArgument, "token range does not fit in a chunk"};
  layout_.scatter_rows(chunk_ptr(id), first, n, k, v);
  kv_bytes_appended_ += 2ull * n * layout_.n_kv_heads * layout_.page.row_bytes();
  return {};
}

status host_backend::write_chunk(chunk_id id, const chunk_hint&, const std::byte* chunk) noexcept {
  if (!valid_id(id)) return {errc::kInvalidArgument, "chunk id out of range"};
  if (!chunk) return {errc::kInvalidArgument, "null chunk bytes"};
  std::memcpy(chunk_ptr(id), chunk, layout_.chunk_bytes());
  return {};
}

status host_backend::copy_tokens(chunk_id dst, const chunk_hint&, chunk_id src, uint32_t n) noexcept {
  if (!valid_id(dst) || !valid_id(src)) return {errc::kInvalidArgument, "chunk id out of range"};
  if (n > layout_.tokens()) return {errc::kInvalidArgument, "token count exceeds a chunk"};
  layout_.copy_prefix(chunk_ptr(dst), chunk_ptr(src), n);
  return {};
}

status host_backend::read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept {
  if (!valid_id(id)) return {errc::kInvalidArgument, "chunk id out of range"};
  if (!dst) return {errc::kInvalidArgument, "null destination"};
  if (n_tokens > layout_.tokens()) return {errc::kInvalidArgument, "token count exceeds a chunk"};
  if (n_tokens == layout_.tokens()) {  // whole, page tails included (a chunk from write_chunk)
    std::memcpy(dst, chunk_ptr(id), layout_.chunk_bytes());
    return {};
  }
  layout_.copy_prefix(dst, chunk_ptr(id), n_tokens);
  return {};
}

status host_backend::attend(uint32_t, const attend_batch& batch) noexcept {
  INSTINFER_TRY(load_work(batch));
  return decoder_->run(std::span<const decode_work>(work_.data(), batch.size()));
}

status host_backend::shared_begin(uint32_t, const attend_batch& batch, uint32_t n_workers) noexcept {
  INSTINFER_TRY(load_work(batch));
  return decoder_->begin_shared(std::span<const decode_work>(work_.data(), batch.size()), n_workers);
}

status host_backend::load_work(const attend_batch& batch) noexcept {
  size_t total = 0;
  for (const auto& item : batch) total += item.chunks.size();
  try {
    if (chunk_ptrs_.size() < total) chunk_ptrs_.resize(total);
    if (work_.size() < batch.size()) work_.resize(batch.size());
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "attend workspace"};
  }
  size_t next = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    const attend_item& item = batch[i];
    const std::byte** ptrs = chunk_ptrs_.data() + next;
    for (size_t c = 0; c < item.chunks.size(); ++c) {
      if (!valid_id(item.chunks[c])) return {errc::kInternal, "page table holds an invalid chunk id"};
      ptrs[c] = chunk_ptr(item.chunks[c]);
    }
    work_[i] = decode_work{ptrs,          static_cast<uint32_t>(item.chunks.size()),
                           item.n_tokens, item.q,
                           item.out,      item.lse,
                           item.n_rows,   item.first_pos};
    next += item.chunks.size();
  }
  return {};
}

backend_stats host_backend::stats() const noexcept {
  backend_stats s;
  s.capacity_chunks = capacity_chunks_;
  s.used_chunks = next_fresh_ - free_list_.size();
  s.kv_bytes_appended = kv_bytes_appended_;
  return s;
}

static_assert(kv_backend<host_backend>);

}  // namespace instinfer
