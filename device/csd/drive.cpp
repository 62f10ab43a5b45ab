#include "drive.hpp"

#include <time.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "block_manager.hpp"
#include "flash_store.hpp"
#include "instinfer/attention/decode.hpp"
#include "instinfer/attention/state.hpp"
#include "instinfer/layout/kv_shape.hpp"
#include "instinfer/layout/page_geometry.hpp"

namespace instinfer::csd {

status drive_options::validate() const {
  INSTINFER_TRY(flash.validate());
  INSTINFER_TRY(link.validate());
  if (n_cores == 0 || n_cores > 256) return {errc::kInvalidArgument, "drive cores must be in [1, 256]"};
  if (max_namespaces == 0 || max_namespaces > 1024)
    return {errc::kInvalidArgument, "max namespaces must be in [1, 1024]"};
  if (pages_per_batch == 0 || pages_per_batch > 1024)
    return {errc::kInvalidArgument, "pages per batch must be in [1, 1024]"};
  if (buffer_bytes < flash.page_bytes) return {errc::kInvalidArgument, "group buffer smaller than one page"};
  return {};
}

namespace {

constexpr uint32_t kNoSlot = UINT32_MAX;
constexpr uint32_t kNoChunk = UINT32_MAX;

struct free_deleter {
  void operator()(std::byte* p) const noexcept { std::free(p); }
};
using aligned_bytes = std::unique_ptr<std::byte[], free_deleter>;

aligned_bytes alloc_aligned(uint64_t bytes) {
  return aligned_bytes(static_cast<std::byte*>(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096)));
}

int64_t thread_cpu_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}
int64_t wall_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct chunk_entry {
  uint32_t n_tokens = 0;    // tokens written
  uint32_t slot = kNoSlot;  // DRAM group buffer slot (authoritative when set)
  bool on_flash = false;    // the chunk's pages are programmed (l2p holds them)
};

struct table_key {
  uint64_t seq;
  uint32_t layer;
  bool operator==(const table_key&) const = default;
};
struct table_key_hash {
  size_t operator()(const table_key& k) const noexcept {
    return std::hash<uint64_t>{}(k.seq * 0x9e3779b97f4a7c15ull ^ (uint64_t{k.layer} << 1));
  }
};

struct name_space {
  uint32_t nsid = 0;
  uint32_t owner_qp = 0;
  namespace_config cfg{};
  page_geometry geo{};
  uint32_t pages_per_chunk = 0;  // 2 * n_kv_heads
  uint64_t chunk_bytes = 0;
  uint64_t base = 0;
  uint64_t count = 0;
  decode_params params{};
  decode_chunks_fn kernel = nullptr;
  std::vector<chunk_entry> chunks;
  std::vector<uint32_t> l2p;  // token-indexed L2P: [chunk][K|V][head] -> physical page
  std::unordered_map<table_key, std::vector<uint32_t>, table_key_hash> tables;  // mirrored page tables
  // DRAM group buffer
  std::vector<aligned_bytes> slot_mem;
  std::vector<uint32_t> slot_chunk;
  std::vector<uint64_t> slot_use;
  std::vector<uint32_t> free_slots;
  uint64_t max_slots = 0;

  uint32_t q_heads() const noexcept { return cfg.n_kv_heads * cfg.group_size; }
  bool owns(uint64_t chunk) const noexcept { return chunk >= base && chunk - base < count; }
  chunk_entry& entry(uint64_t chunk) noexcept { return chunks[chunk - base]; }
  uint32_t* pages(uint64_t chunk) noexcept { return l2p.data() + (chunk - base) * pages_per_chunk; }
};

// Persistent worker threads: the drive's cores.
class worker_pool {
 public:
  explicit worker_pool(uint32_t n) {
    for (uint32_t i = 0; i < n; ++i) threads_.emplace_back([this, i] { loop(i); });
  }
  ~worker_pool() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  uint32_t size() const noexcept { return static_cast<uint32_t>(threads_.size()); }
  // Run fn(worker) once on every worker and wait for all.
  void run(const std::function<void(uint32_t)>& fn) {
    std::unique_lock lock(mutex_);
    job_ = &fn;
    pending_ = size();
    ++generation_;
    cv_.notify_all();
    done_cv_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(uint32_t id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(uint32_t)>* job;
      {
        std::unique_lock lock(mutex_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      (*job)(id);
      std::lock_guard lock(mutex_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(uint32_t)>* job_ = nullptr;
  uint64_t generation_ = 0;
  uint32_t pending_ = 0;
  bool stop_ = false;
};

struct attend_task {
  uint32_t item;
  uint32_t head;
  uint32_t c_begin;
  uint32_t c_end;
};

class drive_impl final : public drive {
 public:
  drive_impl(const drive_options& o, std::unique_ptr<flash_store> store)
      : o_(o), store_(std::move(store)), blocks_(o.flash), timeline_(o.flash), pool_(o.n_cores), workers_(o.n_cores) {}

  identify_data identify() const noexcept override {
    identify_data d{};
    d.page_bytes = o_.flash.page_bytes;
    d.channels = o_.flash.channels;
    d.dies_per_channel = o_.flash.dies_per_channel;
    d.pages_per_block = o_.flash.pages_per_block;
    d.blocks_per_channel = o_.flash.blocks_per_die * o_.flash.dies_per_channel;
    d.n_cores = o_.n_cores;
    d.max_namespaces = o_.max_namespaces;
    d.capacity_bytes = o_.flash.capacity_bytes();
    d.buffer_bytes = o_.buffer_bytes;
    d.direct_io = store_->direct_io() ? 1 : 0;
    d.ram_flash = store_->ram() ? 1 : 0;
    d.isa = static_cast<uint8_t>(best_cpu_isa());
#if defined(__aarch64__)
    std::strncpy(d.arch, "aarch64", sizeof d.arch - 1);
#elif defined(__x86_64__)
    std::strncpy(d.arch, "x86_64", sizeof d.arch - 1);
#else
    std::strncpy(d.arch, "unknown", sizeof d.arch - 1);
#endif
    return d;
  }

  device_stats stats() const noexcept override {
    device_stats s = stats_;
    s.free_blocks = blocks_.free_blocks();
    s.total_blocks = blocks_.total_blocks();
    s.valid_pages = blocks_.valid_pages();
    s.page_bytes = o_.flash.page_bytes;
    return s;
  }

  void drop_queue_pair(uint32_t qp) noexcept override {
    for (auto it = spaces_.begin(); it != spaces_.end();) {
      if (it->second->owner_qp == qp) {
        free_namespace(*it->second);
        it = spaces_.erase(it);
      } else {
        ++it;
      }
    }
  }

  command_outcome execute(uint32_t qp, const sq_entry& e, std::byte* area, uint64_t area_bytes) noexcept override {
    command_outcome out;
    out.cqe.cid = e.cid;
    const double t_start = now_ns_;
    flash_end_ = 0.0;
    status s;
    try {
      s = dispatch(qp, e, area, area_bytes, out);
    } catch (const std::bad_alloc&) {
      s = {errc::kOutOfMemory, "drive out of memory"};
    } catch (...) {
      s = {errc::kInternal, "unexpected exception in the drive"};
    }
    if (!s.ok()) {
      out.cqe.status = static_cast<int16_t>(s.code());
      out.error = std::string(opcode_name(static_cast<opcode>(e.opcode))) + ": " + s.message();
      out.result_bytes = 0;
      ++stats_.commands_failed;
    }
    ++stats_.commands;
    // Link and flash model: the payload crosses the link, flash work starts, the result returns.
    const uint64_t in = link_bytes_in(e.data_bytes);
    const uint64_t back = link_bytes_out(out.result_bytes);
    stats_.link_bytes_host_to_device += in;
    stats_.link_bytes_device_to_host += back;
    const double link_ns = o_.link.command_ns(in, back);
    const double flash_ns = flash_end_ > t_start ? flash_end_ - t_start : 0.0;
    const double total = link_ns + flash_ns;
    now_ns_ = t_start + total;
    stats_.modelled_link_ns += static_cast<uint64_t>(link_ns);
    stats_.modelled_flash_ns += static_cast<uint64_t>(flash_ns);
    stats_.modelled_ns += static_cast<uint64_t>(total);
    out.cqe.result = out.result_bytes;
    out.cqe.modelled_ns = total >= 4294967295.0 ? UINT32_MAX : static_cast<uint32_t>(total);
    return out;
  }

 private:
  // ---- dispatch & shared validation -------------------------------------------------------------
  status dispatch(uint32_t qp, const sq_entry& e, std::byte* area, uint64_t area_bytes, command_outcome& out) {
    if (e.data_offset > area_bytes || e.data_bytes > area_bytes - e.data_offset)
      return {errc::kInvalidArgument, "data range [" + std::to_string(e.data_offset) + ", +" +
                                          std::to_string(e.data_bytes) + ") is outside the queue pair's data area"};
    if (e.result_offset > area_bytes || e.result_bytes > area_bytes - e.result_offset)
      return {errc::kInvalidArgument, "result range is outside the queue pair's data area"};
    if (e.data_offset % 8 != 0 || e.result_offset % 8 != 0)  // like NVMe PRPs: aligned buffers only
      return {errc::kInvalidArgument, "data and result offsets must be 8-byte aligned"};
    const std::byte* data = area + e.data_offset;
    std::byte* res = area + e.result_offset;
    const auto op = static_cast<opcode>(e.opcode);
    switch (op) {
      case opcode::kIdentify: {
        if (e.result_bytes < sizeof(identify_data)) return {errc::kInvalidArgument, "result buffer too small"};
        const identify_data d = identify();
        std::memcpy(res, &d, sizeof d);
        out.result_bytes = sizeof d;
        return {};
      }
      case opcode::kStats: {
        if (e.result_bytes < sizeof(device_stats)) return {errc::kInvalidArgument, "result buffer too small"};
        const device_stats d = stats();
        std::memcpy(res, &d, sizeof d);
        out.result_bytes = sizeof d;
        return {};
      }
      case opcode::kConfig: return do_config(qp, e, data, res, out);
      case opcode::kShutdown: out.shutdown = true; return {};
      default: break;
    }
    auto it = spaces_.find(e.nsid);
    if (it == spaces_.end()) return {errc::kInvalidArgument, "namespace " + std::to_string(e.nsid) + " does not exist"};
    name_space& ns = *it->second;
    if (ns.owner_qp != qp)
      return {errc::kInvalidArgument, "namespace " + std::to_string(e.nsid) + " belongs to another queue pair"};
    switch (op) {
      case opcode::kDeleteNamespace:
        free_namespace(ns);
        spaces_.erase(it);
        return {};
      case opcode::kWriteKv: return do_write(ns, e, data);
      case opcode::kAttend: return do_attend(ns, e, data, res, out);
      case opcode::kReclaim: return do_reclaim(ns, e, data);
      case opcode::kMap: return do_map(ns, e, data);
      case opcode::kCopy: return do_copy(ns, e);
      case opcode::kRead: return do_read(ns, e, res, out);
      default: return {errc::kInvalidArgument, "unknown opcode " + std::to_string(e.opcode)};
    }
  }

  status check_chunk(const name_space& ns, uint64_t chunk) const {
    if (!ns.owns(chunk))
      return {errc::kInvalidArgument, "chunk " + std::to_string(chunk) + " is not in namespace " +
                                          std::to_string(ns.nsid) + " (chunks " + std::to_string(ns.base) + ".." +
                                          std::to_string(ns.base + ns.count - 1) + ")"};
    return {};
  }
  status check_layer(const name_space& ns, uint32_t layer) const {
    if (layer >= ns.cfg.n_layers)
      return {errc::kLayerOutOfRange,
              "layer " + std::to_string(layer) + " >= n_layers " + std::to_string(ns.cfg.n_layers)};
    return {};
  }

  // ---- config -----------------------------------------------------------------------------------
  status do_config(uint32_t qp, const sq_entry& e, const std::byte* data, std::byte* res, command_outcome& out) {
    if (e.data_bytes != sizeof(namespace_config))
      return {errc::kInvalidArgument, "config payload must be " + std::to_string(sizeof(namespace_config)) + " bytes"};
    if (e.result_bytes < sizeof(namespace_info)) return {errc::kInvalidArgument, "result buffer too small"};
    if (spaces_.size() >= o_.max_namespaces) return {errc::kNoSpace, "the drive has no free namespace"};
    namespace_config c;
    std::memcpy(&c, data, sizeof c);
    kv_shape shape{c.n_layers, c.n_kv_heads * c.group_size, c.n_kv_heads, c.head_dim, static_cast<dtype>(c.kv_dtype)};
    if (c.group_size == 0 || c.group_size > kv_shape::kMaxHeads) return {errc::kInvalidArgument, "bad group size"};
    if (c.kv_dtype > 2) return {errc::kInvalidArgument, "unknown KV dtype " + std::to_string(c.kv_dtype)};
    INSTINFER_TRY(shape.validate());
    if (c.page_bytes != o_.flash.page_bytes)
      return {errc::kInvalidArgument, "page size " + std::to_string(c.page_bytes) + " differs from the flash page (" +
                                          std::to_string(o_.flash.page_bytes) + ")"};
    auto geo = page_geometry::make(c.page_bytes, c.head_dim, shape.kv_dtype);
    if (!geo.ok()) return geo.error();
    if (!std::isfinite(c.scale) || !std::isfinite(c.softcap) || c.scale < 0.0f)
      return {errc::kInvalidArgument, "scale and softcap must be finite (scale >= 0)"};
    auto ns = std::make_unique<name_space>();
    ns->cfg = c;
    ns->geo = *geo;
    ns->pages_per_chunk = 2 * c.n_kv_heads;
    ns->chunk_bytes = uint64_t{c.page_bytes} * ns->pages_per_chunk;
    const uint64_t fit = o_.flash.total_pages() / ns->pages_per_chunk;
    ns->count = c.capacity_chunks == 0 ? fit : c.capacity_chunks;
    if (ns->count == 0 || ns->count > (uint64_t{1} << 26))
      return {errc::kInvalidArgument,
              "namespace capacity must be in [1, 2^26] chunks, got " + std::to_string(ns->count)};
    if (next_base_ + ns->count >= kNoChunk) return {errc::kNoSpace, "chunk id space exhausted"};
    ns->params.layout = chunk_layout::make(*geo, 1);  // the engine stages [K][V] of one head per chunk
    ns->params.group_size = c.group_size;
    ns->params.scale = c.scale;
    ns->params.softcap = c.softcap;
    auto kernel = select_decode_kernel(best_cpu_isa(), ns->params);
    if (!kernel.ok()) return kernel.error();
    ns->kernel = *kernel;
    ns->chunks.assign(ns->count, chunk_entry{});
    ns->l2p.assign(ns->count * ns->pages_per_chunk, kNoPage);
    ns->max_slots = std::max<uint64_t>(1, o_.buffer_bytes / ns->chunk_bytes);
    ns->base = next_base_;
    next_base_ += ns->count;
    ns->nsid = next_nsid_++;
    ns->owner_qp = qp;
    const namespace_info info{ns->nsid, geo->tokens_per_page, ns->base, ns->count};
    std::memcpy(res, &info, sizeof info);
    out.result_bytes = sizeof info;
    spaces_.emplace(ns->nsid, std::move(ns));
    return {};
  }

  void free_namespace(name_space& ns) noexcept {
    for (uint64_t c = ns.base; c < ns.base + ns.count; ++c) reset_chunk(ns, c);
    (void)erase_dead(0);
  }

  // ---- group buffer -----------------------------------------------------------------------------
  result<uint32_t> acquire_slot(name_space& ns, uint64_t chunk) {
    uint32_t slot;
    if (!ns.free_slots.empty()) {
      slot = ns.free_slots.back();
      ns.free_slots.pop_back();
    } else if (ns.slot_mem.size() < ns.max_slots) {
      aligned_bytes mem = alloc_aligned(ns.chunk_bytes);
      if (!mem) return status{errc::kOutOfMemory, "cannot allocate a group-buffer slot"};
      slot = static_cast<uint32_t>(ns.slot_mem.size());
      ns.slot_mem.push_back(std::move(mem));
      ns.slot_chunk.push_back(kNoChunk);
      ns.slot_use.push_back(0);
    } else {
      // Buffer full: program the least recently used partial chunk as it is (it is read back when
      // appended to again). This is the only path that rewrites data: counted as evictions.
      uint32_t victim = 0;
      for (uint32_t s = 1; s < ns.slot_chunk.size(); ++s)
        if (ns.slot_use[s] < ns.slot_use[victim]) victim = s;
      const uint64_t vc = ns.slot_chunk[victim];
      INSTINFER_TRY(program_chunk(ns, vc, vc));
      ++stats_.buffer_evictions;
      slot = ns.entry(vc).slot;
      ns.entry(vc).slot = kNoSlot;
    }
    ns.slot_chunk[slot] = static_cast<uint32_t>(chunk);
    ns.slot_use[slot] = ++use_clock_;
    ns.entry(chunk).slot = slot;
    return slot;
  }
  void release_slot(name_space& ns, uint64_t chunk) noexcept {
    chunk_entry& ce = ns.entry(chunk);
    if (ce.slot == kNoSlot) return;
    ns.slot_chunk[ce.slot] = kNoChunk;
    ns.free_slots.push_back(ce.slot);
    ce.slot = kNoSlot;
  }
  std::byte* slot_ptr(name_space& ns, uint32_t slot) noexcept {
    return ns.slot_mem[slot].get();
  }

  // Program the chunk's buffered pages to flash (whole chunk: its K and V pages of every head go
  // into the same erase block of one lane when they fit). The chunk keeps its slot.
  // position_hint: the chunk's page-table position plus a per-(seq, layer) offset (stripe()).
  status program_chunk(name_space& ns, uint64_t chunk, uint64_t position_hint) {
    chunk_entry& ce = ns.entry(chunk);
    uint32_t* pages = ns.pages(chunk);
    for (uint32_t p = 0; p < ns.pages_per_chunk; ++p) blocks_.invalidate(pages[p]), pages[p] = kNoPage;
    ce.on_flash = false;
    const std::byte* src = slot_ptr(ns, ce.slot);
    // Stripe a page table's chunks over lanes along the token axis: consecutive chunks of a head go
    // to consecutive lanes, i.e. to different channels first, then to different dies.
    const uint32_t lane = position_hint % o_.flash.lanes();
    uint32_t done = 0;
    while (done < ns.pages_per_chunk) {
      auto r = blocks_.allocate(lane, ns.pages_per_chunk - done, ++program_stamp_);
      if (!r.ok()) {
        // No free block: erase dead blocks (no copying) and retry once.
        if (erase_dead(1) == 0) return r.error();
        r = blocks_.allocate(lane, ns.pages_per_chunk - done, ++program_stamp_);
        if (!r.ok()) return r.error();
      }
      INSTINFER_TRY(store_->program(r->first_ppn, r->n_pages, src + uint64_t{done} * ns.geo.page_bytes));
      for (uint32_t i = 0; i < r->n_pages; ++i) {
        pages[done + i] = r->first_ppn + i;
        timeline_.program(r->first_ppn + i, cmd_start());  // background: delays later reads only
      }
      stats_.flash_pages_programmed += r->n_pages;
      done += r->n_pages;
    }
    ce.on_flash = true;
    return {};
  }

  // Bring a chunk into a buffer slot (for appends and copies).
  result<std::byte*> buffered(name_space& ns, uint64_t chunk) {
    chunk_entry& ce = ns.entry(chunk);
    if (ce.slot != kNoSlot) {
      ns.slot_use[ce.slot] = ++use_clock_;
      return slot_ptr(ns, ce.slot);
    }
    auto slot = acquire_slot(ns, chunk);
    if (!slot.ok()) return slot.error();
    std::byte* dst = slot_ptr(ns, *slot);
    if (ce.on_flash) {
      uint32_t* pages = ns.pages(chunk);
      for (uint32_t p = 0; p < ns.pages_per_chunk; ++p) {
        INSTINFER_TRY(store_->read(pages[p], dst + uint64_t{p} * ns.geo.page_bytes));
        note_read(pages[p]);
        blocks_.invalidate(pages[p]);
        pages[p] = kNoPage;
      }
      ce.on_flash = false;
      ++stats_.buffer_reloads;
    }
    return dst;
  }

  void reset_chunk(name_space& ns, uint64_t chunk) noexcept {
    chunk_entry& ce = ns.entry(chunk);
    uint32_t* pages = ns.pages(chunk);
    for (uint32_t p = 0; p < ns.pages_per_chunk; ++p) blocks_.invalidate(pages[p]), pages[p] = kNoPage;
    release_slot(ns, chunk);
    ce = chunk_entry{};
  }

  uint32_t erase_dead(uint64_t target) {
    return blocks_.erase_dead(target, [&](uint32_t gb) -> status {
      INSTINFER_TRY(store_->erase_block(gb * o_.flash.pages_per_block));
      flash_end_ = std::max(flash_end_, timeline_.erase(gb / o_.flash.blocks_per_die, cmd_start()));
      stats_.flash_pages_erased += o_.flash.pages_per_block;
      ++stats_.blocks_erased;
      return {};
    });
  }

  // Where a (seq, layer)'s stripe starts, so different sequences and layers start on different lanes.
  static uint64_t stripe(uint64_t seq, uint32_t layer) noexcept {
    uint64_t x = seq * 0x9e3779b97f4a7c15ull + layer * 0xc2b2ae3d27d4eb4full;
    return (x ^ (x >> 29)) & 0xffffffffull;
  }

  double cmd_start() const noexcept {
    return now_ns_;
  }
  void note_read(uint32_t ppn) noexcept {
    ++stats_.flash_pages_read;
    flash_end_ = std::max(flash_end_, timeline_.read(ppn, now_ns_));
  }

  std::vector<uint32_t>& table(name_space& ns, uint64_t seq, uint32_t layer) {
    return ns.tables[table_key{seq, layer}];
  }
  void set_position(name_space& ns, uint64_t seq, uint32_t layer, uint32_t index, uint32_t chunk) {
    auto& t = table(ns, seq, layer);
    if (t.size() <= index) t.resize(uint64_t{index} + 1, kNoChunk);
    t[index] = chunk;
  }

  // ---- write KV ---------------------------------------------------------------------------------
  status do_write(name_space& ns, const sq_entry& e, const std::byte* data) {
    const auto a = get_args<write_kv_args>(e);
    INSTINFER_TRY(check_layer(ns, a.layer));
    const uint32_t tpp = ns.geo.tokens_per_page;
    if (a.n_tokens == 0) return {errc::kInvalidArgument, "write of zero tokens"};
    if (a.first_token >= tpp)
      return {errc::kInvalidArgument,
              "first token " + std::to_string(a.first_token) + " >= tokens per page " + std::to_string(tpp)};
    const uint64_t need_chunks = (uint64_t{a.first_token} + a.n_tokens + tpp - 1) / tpp;
    if (a.n_chunks != need_chunks)
      return {errc::kInvalidArgument, std::to_string(a.n_tokens) + " tokens from offset " +
                                          std::to_string(a.first_token) + " need " + std::to_string(need_chunks) +
                                          " chunks, command names " + std::to_string(a.n_chunks)};
    if (uint64_t{a.first_index} + a.n_chunks > (1u << 30))
      return {errc::kInvalidArgument, "page-table index too large"};
    const uint64_t row = ns.geo.row_bytes();
    const uint64_t kv_bytes = uint64_t{a.n_tokens} * ns.cfg.n_kv_heads * row;
    const uint64_t expect = uint64_t{a.n_chunks} * 4 + 2 * kv_bytes;
    if (e.data_bytes != expect)
      return {errc::kInvalidArgument,
              "write payload is " + std::to_string(e.data_bytes) + " bytes, expected " + std::to_string(expect)};
    std::vector<uint32_t> ids(a.n_chunks);
    std::memcpy(ids.data(), data, ids.size() * 4);
    for (uint32_t i = 0; i < a.n_chunks; ++i) {
      INSTINFER_TRY(check_chunk(ns, ids[i]));
      for (uint32_t j = 0; j < i; ++j)
        if (ids[j] == ids[i]) return {errc::kInvalidArgument, "chunk " + std::to_string(ids[i]) + " named twice"};
      const uint32_t have = ns.entry(ids[i]).n_tokens;
      const uint32_t want = i == 0 ? a.first_token : 0;
      if (have != want)
        return {errc::kInvalidArgument, "chunk " + std::to_string(ids[i]) + " holds " + std::to_string(have) +
                                            " tokens; appends must start at " + std::to_string(want) +
                                            " (append-only)"};
    }
    const std::byte* k = data + uint64_t{a.n_chunks} * 4;
    const std::byte* v = k + kv_bytes;
    const uint32_t heads = ns.cfg.n_kv_heads;
    uint32_t t = 0;
    for (uint32_t i = 0; i < a.n_chunks; ++i) {
      const uint64_t chunk = ids[i];
      const uint32_t first = i == 0 ? a.first_token : 0;
      const uint32_t n = std::min(tpp - first, a.n_tokens - t);
      auto buf = buffered(ns, chunk);
      if (!buf.ok()) return buf.error();
      for (uint32_t j = 0; j < n; ++j)
        for (uint32_t h = 0; h < heads; ++h) {
          const uint64_t src = (uint64_t{t + j} * heads + h) * row;
          std::memcpy(*buf + uint64_t{h} * ns.geo.page_bytes + uint64_t{first + j} * row, k + src, row);
          std::memcpy(*buf + uint64_t{heads + h} * ns.geo.page_bytes + uint64_t{first + j} * row, v + src, row);
        }
      ns.entry(chunk).n_tokens = first + n;
      set_position(ns, a.seq, a.layer, a.first_index + i, static_cast<uint32_t>(chunk));
      if (first + n == tpp) {  // the group is full: one block-packed append of all its pages
        INSTINFER_TRY(program_chunk(ns, chunk, stripe(a.seq, a.layer) + a.first_index + i));
        release_slot(ns, chunk);
      }
      t += n;
    }
    stats_.kv_bytes_appended += 2 * kv_bytes;
    return {};
  }

  // ---- map / reclaim / copy / read --------------------------------------------------------------
  status do_map(name_space& ns, const sq_entry& e, const std::byte* data) {
    const auto a = get_args<map_args>(e);
    INSTINFER_TRY(check_layer(ns, a.layer));
    if (e.data_bytes != uint64_t{a.n_chunks} * 4) return {errc::kInvalidArgument, "map payload size mismatch"};
    std::vector<uint32_t> ids(a.n_chunks);
    std::memcpy(ids.data(), data, ids.size() * 4);
    for (uint32_t id : ids) INSTINFER_TRY(check_chunk(ns, id));
    if (ids.empty())
      ns.tables.erase(table_key{a.seq, a.layer});
    else
      table(ns, a.seq, a.layer) = std::move(ids);
    return {};
  }

  status do_reclaim(name_space& ns, const sq_entry& e, const std::byte* data) {
    const auto a = get_args<reclaim_args>(e);
    switch (static_cast<reclaim_mode>(a.mode)) {
      case reclaim_mode::kChunks: {
        if (e.data_bytes != uint64_t{a.n_chunks} * 4) return {errc::kInvalidArgument, "reclaim payload size mismatch"};
        std::vector<uint32_t> ids(a.n_chunks);
        std::memcpy(ids.data(), data, ids.size() * 4);
        for (uint32_t id : ids) INSTINFER_TRY(check_chunk(ns, id));
        for (uint32_t id : ids) reset_chunk(ns, id);
        break;
      }
      case reclaim_mode::kSequence:
        for (uint32_t l = 0; l < ns.cfg.n_layers; ++l) ns.tables.erase(table_key{a.seq, l});
        break;
      case reclaim_mode::kRange: {
        INSTINFER_TRY(check_layer(ns, a.layer));
        auto it = ns.tables.find(table_key{a.seq, a.layer});
        if (it == ns.tables.end())
          return {errc::kUnknownSequence, "no page table for sequence " + std::to_string(a.seq)};
        auto& t = it->second;
        if (a.begin > a.end || a.end > t.size())
          return {errc::kInvalidArgument, "reclaim range outside the page table"};
        t.erase(t.begin() + a.begin, t.begin() + a.end);
        break;
      }
      case reclaim_mode::kEraseOnly: break;
      default: return {errc::kInvalidArgument, "unknown reclaim mode " + std::to_string(a.mode)};
    }
    erase_dead(a.erase_target_blocks);
    return {};
  }

  status do_copy(name_space& ns, const sq_entry& e) {
    const auto a = get_args<copy_args>(e);
    INSTINFER_TRY(check_layer(ns, a.layer));
    INSTINFER_TRY(check_chunk(ns, a.dst));
    INSTINFER_TRY(check_chunk(ns, a.src));
    const uint32_t tpp = ns.geo.tokens_per_page;
    if (a.dst == a.src) return {errc::kInvalidArgument, "copy onto itself"};
    if (a.n_tokens == 0 || a.n_tokens > tpp)
      return {errc::kInvalidArgument, "copy of " + std::to_string(a.n_tokens) + " tokens"};
    if (ns.entry(a.dst).n_tokens != 0) return {errc::kInvalidArgument, "copy destination is not empty"};
    if (ns.entry(a.src).n_tokens < a.n_tokens) return {errc::kInvalidArgument, "copy source holds fewer tokens"};
    auto src = buffered(ns, a.src);
    if (!src.ok()) return src.error();
    const std::byte* s = *src;
    auto dst = buffered(ns, a.dst);
    if (!dst.ok()) return dst.error();
    // acquire may have evicted src's slot: re-fetch it (it is then read back from flash)
    if (ns.entry(a.src).slot == kNoSlot) {
      auto again = buffered(ns, a.src);
      if (!again.ok()) return again.error();
      s = *again;
    }
    std::memcpy(*dst, s, ns.chunk_bytes);
    ns.entry(a.dst).n_tokens = a.n_tokens;
    set_position(ns, a.seq, a.layer, a.index, a.dst);
    if (a.n_tokens == tpp) {
      INSTINFER_TRY(program_chunk(ns, a.dst, stripe(a.seq, a.layer) + a.index));
      release_slot(ns, a.dst);
    }
    return {};
  }

  status do_read(name_space& ns, const sq_entry& e, std::byte* res, command_outcome& out) {
    const auto a = get_args<read_args>(e);
    INSTINFER_TRY(check_chunk(ns, a.chunk));
    if (a.n_tokens > ns.entry(a.chunk).n_tokens) return {errc::kInvalidArgument, "read beyond the tokens written"};
    if (e.result_bytes < ns.chunk_bytes) return {errc::kInvalidArgument, "result buffer smaller than a chunk"};
    const chunk_entry& ce = ns.entry(a.chunk);
    if (ce.slot != kNoSlot) {
      std::memcpy(res, slot_ptr(ns, ce.slot), ns.chunk_bytes);
    } else if (ce.on_flash) {
      aligned_bytes tmp = alloc_aligned(ns.geo.page_bytes);
      if (!tmp) return {errc::kOutOfMemory, "read buffer"};
      const uint32_t* pages = ns.pages(a.chunk);
      for (uint32_t p = 0; p < ns.pages_per_chunk; ++p) {
        INSTINFER_TRY(store_->read(pages[p], tmp.get()));
        note_read(pages[p]);
        std::memcpy(res + uint64_t{p} * ns.geo.page_bytes, tmp.get(), ns.geo.page_bytes);
      }
    } else {
      std::memset(res, 0, ns.chunk_bytes);
    }
    out.result_bytes = ns.chunk_bytes;
    return {};
  }

  // ---- attend -----------------------------------------------------------------------------------
  struct worker_state {
    std::unique_ptr<page_reader> reader;
    aligned_bytes staging;
    uint64_t staging_bytes = 0;
    std::vector<const std::byte*> ptrs;
    std::vector<float> o;
    std::vector<softmax_stats> st;
  };

  status do_attend(name_space& ns, const sq_entry& e, const std::byte* data, std::byte* res, command_outcome& out) {
    const int64_t wall0 = wall_ns();
    const auto a = get_args<attend_args>(e);
    INSTINFER_TRY(check_layer(ns, a.layer));
    const uint32_t hq = ns.q_heads();
    const uint32_t d = ns.cfg.head_dim;
    const uint32_t g = ns.cfg.group_size;
    const uint32_t tpp = ns.geo.tokens_per_page;
    if (a.n_items == 0 || a.n_items > 65536) return {errc::kInvalidArgument, "attend batch must hold 1..65536 items"};
    const uint64_t q_bytes = uint64_t{a.n_items} * hq * d * 4;
    if (e.data_bytes != uint64_t{a.n_items} * sizeof(attend_entry) + q_bytes)
      return {errc::kInvalidArgument, "attend payload size mismatch"};
    const uint64_t out_bytes = q_bytes + uint64_t{a.n_items} * hq * 4;
    if (e.result_bytes < out_bytes) return {errc::kInvalidArgument, "attend result buffer too small"};
    std::vector<attend_entry> items(a.n_items);
    std::memcpy(items.data(), data, a.n_items * sizeof(attend_entry));
    // Validate every item against the drive's own page tables before any work.
    std::vector<const std::vector<uint32_t>*> tabs(a.n_items, nullptr);
    for (uint32_t i = 0; i < a.n_items; ++i) {
      if (items[i].n_tokens == 0) continue;
      auto it = ns.tables.find(table_key{items[i].seq, a.layer});
      if (it == ns.tables.end())
        return {errc::kUnknownSequence, "sequence " + std::to_string(items[i].seq) + " has no pages in layer " +
                                            std::to_string(a.layer) + " of namespace " + std::to_string(ns.nsid)};
      const uint64_t n_chunks = (uint64_t{items[i].n_tokens} + tpp - 1) / tpp;
      if (it->second.size() < n_chunks)
        return {errc::kInvalidArgument, "sequence " + std::to_string(items[i].seq) + " holds " +
                                            std::to_string(it->second.size()) + " chunks, attend asks for " +
                                            std::to_string(items[i].n_tokens) + " tokens"};
      for (uint64_t c = 0; c < n_chunks; ++c) {
        const uint32_t id = it->second[c];
        if (!ns.owns(id))
          return {errc::kInvalidArgument, "page table of sequence " + std::to_string(items[i].seq) + " has a hole"};
        const uint32_t need = c + 1 < n_chunks ? tpp : items[i].n_tokens - static_cast<uint32_t>(c) * tpp;
        if (ns.entry(id).n_tokens < need)
          return {errc::kInvalidArgument,
                  "chunk " + std::to_string(id) + " of sequence " + std::to_string(items[i].seq) + " holds " +
                      std::to_string(ns.entry(id).n_tokens) + " tokens, attend needs " + std::to_string(need)};
      }
      tabs[i] = &it->second;
    }
    if (o_.debug_attend_delay_ms) std::this_thread::sleep_for(std::chrono::milliseconds(o_.debug_attend_delay_ms));

    // Plan: (item, kv head, chunk range) tasks, enough to keep every core busy.
    const uint32_t heads = ns.cfg.n_kv_heads;
    uint64_t total_chunks = 0;
    for (uint32_t i = 0; i < a.n_items; ++i) total_chunks += (uint64_t{items[i].n_tokens} + tpp - 1) / tpp;
    const uint64_t target_tasks = uint64_t{pool_.size()} * 4;
    std::vector<attend_task> tasks;
    std::vector<uint32_t> first_task(uint64_t{a.n_items} * heads + 1, 0);
    for (uint32_t i = 0; i < a.n_items; ++i) {
      const uint32_t n_chunks = (items[i].n_tokens + tpp - 1) / tpp;
      const uint64_t pairs = uint64_t{a.n_items} * heads;
      uint32_t per = n_chunks;
      if (pairs < target_tasks && n_chunks > 0) {
        const uint64_t splits = std::min<uint64_t>(n_chunks, (target_tasks + pairs - 1) / pairs);
        per = static_cast<uint32_t>((n_chunks + splits - 1) / splits);
      }
      for (uint32_t h = 0; h < heads; ++h) {
        first_task[uint64_t{i} * heads + h] = static_cast<uint32_t>(tasks.size());
        for (uint32_t c = 0; c < n_chunks; c += per) tasks.push_back({i, h, c, std::min(n_chunks, c + per)});
      }
    }
    first_task.back() = static_cast<uint32_t>(tasks.size());
    // Modelled flash time: every page the engine will read from flash, queued at command start.
    read_ppns_.clear();
    for (const attend_task& t : tasks)
      for (uint32_t c = t.c_begin; c < t.c_end; ++c) {
        const uint32_t id = (*tabs[t.item])[c];
        if (ns.entry(id).slot != kNoSlot) continue;  // still in the DRAM group buffer
        const uint32_t* pages = ns.pages(id);
        read_ppns_.push_back(pages[t.head]);
        read_ppns_.push_back(pages[heads + t.head]);
      }
    stats_.flash_pages_read += read_ppns_.size();
    flash_end_ = std::max(flash_end_, timeline_.read_batch(read_ppns_.data(), read_ppns_.size(), now_ns_));
    (void)total_chunks;

    std::vector<float> part_o(tasks.size() * g * d);
    std::vector<softmax_stats> part_s(tasks.size() * g);
    const auto* q = reinterpret_cast<const float*>(data + uint64_t{a.n_items} * sizeof(attend_entry));
    std::atomic<uint32_t> next{0};
    std::atomic<int64_t> cpu{0};
    std::mutex err_mutex;
    status first_error;
    const uint32_t batch = o_.pages_per_batch;
    const uint64_t page = ns.geo.page_bytes;
    const uint64_t stage_bytes = 2 * uint64_t{batch} * 2 * page;  // two buffers of `batch` chunks x [K][V]

    pool_.run([&](uint32_t w) {
      const int64_t cpu0 = thread_cpu_ns();
      worker_state& ws = workers_[w];
      auto fail = [&](status s) {
        std::lock_guard lock(err_mutex);
        if (first_error.ok()) first_error = std::move(s);
      };
      if (!ws.reader) {
        auto r = store_->make_reader(2 * batch * 2);
        if (!r.ok()) return fail(r.error());
        ws.reader = std::move(*r);
      }
      if (ws.staging_bytes < stage_bytes) {
        ws.staging = alloc_aligned(stage_bytes);
        if (!ws.staging) return fail({errc::kOutOfMemory, "staging buffer"});
        ws.staging_bytes = stage_bytes;
      }
      ws.ptrs.resize(batch);
      ws.o.resize(uint64_t{g} * d);
      ws.st.resize(g);
      for (;;) {
        const uint32_t ti = next.fetch_add(1, std::memory_order_relaxed);
        if (ti >= tasks.size()) break;
        const attend_task& t = tasks[ti];
        const std::vector<uint32_t>& tab = *tabs[t.item];
        const uint32_t n_tok = items[t.item].n_tokens;
        const uint32_t n_chunks = (n_tok + tpp - 1) / tpp;
        float* acc_o = part_o.data() + uint64_t{ti} * g * d;
        softmax_stats* acc_s = part_s.data() + uint64_t{ti} * g;
        std::fill(acc_o, acc_o + uint64_t{g} * d, 0.0f);
        std::fill(acc_s, acc_s + g, softmax_stats{});
        const float* qh = q + (uint64_t{t.item} * hq + uint64_t{t.head} * g) * d;
        // Double-buffered streaming: reads of batch j+1 are in flight while batch j is computed.
        auto load = [&](uint32_t c0, uint32_t c1, std::byte* buf) -> status {
          for (uint32_t c = c0; c < c1; ++c) {
            const uint32_t id = tab[c];
            const chunk_entry& ce = ns.entry(id);
            std::byte* dst = buf + uint64_t{c - c0} * 2 * page;
            if (ce.slot != kNoSlot) {
              const std::byte* s = ns.slot_mem[ce.slot].get();
              std::memcpy(dst, s + uint64_t{t.head} * page, page);
              std::memcpy(dst + page, s + uint64_t{heads + t.head} * page, page);
            } else {
              const uint32_t* pages = ns.pages(id);
              INSTINFER_TRY(ws.reader->queue(pages[t.head], dst));
              INSTINFER_TRY(ws.reader->queue(pages[heads + t.head], dst + page));
            }
          }
          return ws.reader->submit();
        };
        std::byte* bufs[2] = {ws.staging.get(), ws.staging.get() + uint64_t{batch} * 2 * page};
        status s = load(t.c_begin, std::min(t.c_end, t.c_begin + batch), bufs[0]);
        uint32_t j = 0;
        for (uint32_t c0 = t.c_begin; s.ok() && c0 < t.c_end; c0 += batch, ++j) {
          const uint32_t c1 = std::min(t.c_end, c0 + batch);
          s = ws.reader->wait_all();
          if (!s.ok()) break;
          if (c1 < t.c_end) {
            s = load(c1, std::min(t.c_end, c1 + batch), bufs[(j + 1) % 2]);
            if (!s.ok()) break;
          }
          std::byte* buf = bufs[j % 2];
          for (uint32_t c = c0; c < c1; ++c) ws.ptrs[c - c0] = buf + uint64_t{c - c0} * 2 * page;
          const uint32_t last = c1 == n_chunks ? n_tok - (n_chunks - 1) * tpp : tpp;
          ns.kernel(ns.params, ws.ptrs.data(), c1 - c0, last, 0, qh, ws.o.data(), ws.st.data());
          for (uint32_t k = 0; k < g; ++k)
            merge_state(acc_s[k], acc_o + uint64_t{k} * d, ws.st[k], ws.o.data() + uint64_t{k} * d, d);
        }
        if (!s.ok()) {
          (void)ws.reader->wait_all();
          fail(std::move(s));
          break;
        }
      }
      cpu.fetch_add(thread_cpu_ns() - cpu0, std::memory_order_relaxed);
    });
    stats_.cpu_ns += static_cast<uint64_t>(cpu.load());
    if (!first_error.ok()) return first_error;

    // Merge each (item, head)'s partials in token order, normalise, write out and lse.
    auto* out_o = reinterpret_cast<float*>(res);
    auto* out_lse = reinterpret_cast<float*>(res + q_bytes);
    std::vector<float> o_acc(uint64_t{g} * d);
    for (uint32_t i = 0; i < a.n_items; ++i)
      for (uint32_t h = 0; h < heads; ++h) {
        std::vector<softmax_stats> s_acc(g);
        std::fill(o_acc.begin(), o_acc.end(), 0.0f);
        for (uint32_t ti = first_task[uint64_t{i} * heads + h]; ti < first_task[uint64_t{i} * heads + h + 1]; ++ti)
          for (uint32_t k = 0; k < g; ++k)
            merge_state(s_acc[k], o_acc.data() + uint64_t{k} * d, part_s[uint64_t{ti} * g + k],
                        part_o.data() + (uint64_t{ti} * g + k) * d, d);
        for (uint32_t k = 0; k < g; ++k) {
          normalize_state(s_acc[k], o_acc.data() + uint64_t{k} * d, d);
          const uint64_t qh = uint64_t{i} * hq + uint64_t{h} * g + k;
          std::memcpy(out_o + qh * d, o_acc.data() + uint64_t{k} * d, uint64_t{d} * 4);
          out_lse[qh] = state_lse(s_acc[k]);
        }
      }
    out.result_bytes = out_bytes;
    stats_.attend_wall_ns += static_cast<uint64_t>(wall_ns() - wall0);
    return {};
  }

  drive_options o_;
  std::unique_ptr<flash_store> store_;
  block_manager blocks_;
  flash_timeline timeline_;
  worker_pool pool_;
  std::vector<worker_state> workers_;
  std::unordered_map<uint32_t, std::unique_ptr<name_space>> spaces_;
  device_stats stats_{};
  uint32_t next_nsid_ = 1;
  uint64_t next_base_ = 0;
  uint64_t use_clock_ = 0;
  uint64_t program_stamp_ = 0;
  std::vector<uint32_t> read_ppns_;
  double now_ns_ = 0.0;     // modelled drive clock
  double flash_end_ = 0.0;  // latest flash completion of the current command
};

}  // namespace

result<std::unique_ptr<drive>> drive::create(const drive_options& options) {
  INSTINFER_TRY(options.validate());
  std::unique_ptr<flash_store> store;
  if (options.flash_path.empty()) {
    store = make_ram_flash(options.flash);
  } else {
    auto f = make_file_flash(options.flash, options.flash_path, options.allow_buffered);
    if (!f.ok()) return f.error();
    store = std::move(*f);
  }
  return std::unique_ptr<drive>(new drive_impl(options, std::move(store)));
}

}  // namespace instinfer::csd
