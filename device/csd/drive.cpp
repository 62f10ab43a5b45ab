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
#include "instinfer/attention/sparf.hpp"
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

  // SparF: the channel-indexed K copy under a second L2P table, and V sums for the running mean.
  // Column data is derived from the token chunks: a sealed column block is keyed by the chunks (and
  // their generations) it was built from, so forks share it and a reused chunk id never matches
  // stale data; the block being filled lives in DRAM per (seq, layer). Anything missing or stale
  // (after a fork, a truncation, a failed program) is rebuilt from the token pages when attended.
  struct column_block {
    std::vector<uint32_t> chunks, gens;  // the token chunks it covers (chunks_per_column_block)
    std::vector<uint32_t> pages;         // [n_kv_heads][channel groups] physical pages
    std::vector<double> v_sum;           // [n_kv_heads][head_dim] sum of V over its tokens
    bool live = false;
  };
  struct column_tail {
    bool valid = false;
    uint32_t block = 0;  // column block index in the (seq, layer): tokens from block * tokens_per_page
    uint32_t n = 0;      // tokens held (< tokens per column page)
    std::vector<uint32_t> chunks, gens;
    aligned_bytes k;  // one column block, channel_layout order
    std::vector<double> v_sum;
    uint64_t use = 0;  // LRU stamp: tails beyond the DRAM budget are dropped, least recent first
  };
  bool sparf = false;
  channel_layout columns{};
  sparf_config sparf_one_head{};  // the engine runs per (item, kv head)
  uint32_t chunks_per_column_block = 0;
  std::vector<uint32_t> gen;  // per chunk: bumped when the chunk is reset (ids are reused)
  std::vector<column_block> cblocks;
  std::vector<uint32_t> free_cblocks;
  std::unordered_map<uint32_t, std::vector<uint32_t>> cblocks_of_chunk;
  std::unordered_map<table_key, column_tail, table_key_hash> tails;
  uint64_t tail_bytes = 0;  // DRAM held by column tails (budget: the drive's buffer_bytes)

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
      case opcode::kAttendSparse: return do_attend_sparse(ns, e, data, res, out);
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
    if (c.sparf > 1) return {errc::kInvalidArgument, "sparf flag must be 0 or 1"};
    auto ns = std::make_unique<name_space>();
    ns->cfg = c;
    ns->geo = *geo;
    ns->pages_per_chunk = 2 * c.n_kv_heads;
    ns->chunk_bytes = uint64_t{c.page_bytes} * ns->pages_per_chunk;
    if (c.sparf) {
      auto cols =
          channel_layout::make(c.page_bytes, c.head_dim, shape.kv_dtype, c.sparf_channels_per_page, c.n_kv_heads);
      if (!cols.ok()) return cols.error();
      auto one =
          sparf_config::make(chunk_layout::make(*geo, 1), cols->channels_per_page, c.group_size, c.scale, c.softcap);
      if (!one.ok()) return one.error();
      ns->sparf = true;
      ns->columns = *cols;
      ns->sparf_one_head = *one;
      ns->chunks_per_column_block = cols->tokens_per_page / geo->tokens_per_page;  // d / channels per page
    }
    // With SparF every chunk also costs n_kv_heads column pages (the K copy: 1.5x the KV).
    const uint64_t fit = o_.flash.total_pages() / (ns->pages_per_chunk + (c.sparf ? c.n_kv_heads : 0));
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
    if (ns->sparf) ns->gen.assign(ns->count, 0);
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
    if (ns.sparf) {
      ++ns.gen[chunk - ns.base];
      drop_column_blocks_of(ns, static_cast<uint32_t>(chunk));
    }
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
    if (ns.sparf) {
      try {
        column_append(ns, a.seq, a.layer, a.first_index, a.first_token, ids.data(), k, v, a.n_tokens);
      } catch (const std::bad_alloc&) {
        if (auto it = ns.tails.find(table_key{a.seq, a.layer}); it != ns.tails.end())
          it->second.valid = false;  // rebuilt when attended
      }
    }
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
        for (uint32_t l = 0; l < ns.cfg.n_layers; ++l) {
          ns.tables.erase(table_key{a.seq, l});
          if (auto t = ns.tails.find(table_key{a.seq, l}); t != ns.tails.end()) {
            if (t->second.k) ns.tail_bytes -= ns.columns.block_bytes();
            ns.tails.erase(t);
          }
        }
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

  // ---- SparF: the channel-indexed K copy (second L2P table) ------------------------------------
  uint32_t gen_of(const name_space& ns, uint32_t chunk) const noexcept {
    return ns.gen[chunk - ns.base];
  }

  void drop_column_block(name_space& ns, uint32_t b) noexcept {
    name_space::column_block& cb = ns.cblocks[b];
    if (!cb.live) return;
    for (uint32_t p : cb.pages) blocks_.invalidate(p);
    for (uint32_t c : cb.chunks) {
      auto it = ns.cblocks_of_chunk.find(c);
      if (it == ns.cblocks_of_chunk.end()) continue;
      std::vector<uint32_t>& v = it->second;
      v.erase(std::remove(v.begin(), v.end(), b), v.end());
      if (v.empty()) ns.cblocks_of_chunk.erase(it);
    }
    cb.live = false;
    ns.free_cblocks.push_back(b);  // capacity reserved when the block was created: cannot throw
    --stats_.column_blocks;
  }
  void drop_column_blocks_of(name_space& ns, uint32_t chunk) noexcept {
    for (auto it = ns.cblocks_of_chunk.find(chunk); it != ns.cblocks_of_chunk.end();
         it = ns.cblocks_of_chunk.find(chunk))
      drop_column_block(ns, it->second.back());
  }

  // The live column block built from exactly these chunks (current generations), or UINT32_MAX.
  uint32_t find_column_block(const name_space& ns, const uint32_t* chunks) const noexcept {
    auto it = ns.cblocks_of_chunk.find(chunks[0]);
    if (it == ns.cblocks_of_chunk.end()) return UINT32_MAX;
    const uint32_t C = ns.chunks_per_column_block;
    for (uint32_t b : it->second) {
      const name_space::column_block& cb = ns.cblocks[b];
      bool same = cb.live && cb.chunks.size() == C;
      for (uint32_t j = 0; same && j < C; ++j) same = cb.chunks[j] == chunks[j] && cb.gens[j] == gen_of(ns, chunks[j]);
      if (same) return b;
    }
    return UINT32_MAX;
  }

  // Program n pages, page i on lane (lane0 + i): the column pages of one head for one block land on
  // different channels, so a SparF read of a few of them runs in parallel. All or nothing.
  status program_striped(name_space& ns, const std::byte* src, uint32_t n_pages, uint64_t lane0, uint32_t* ppns) {
    const uint32_t lanes = o_.flash.lanes();
    for (uint32_t i = 0; i < n_pages; ++i) {
      const uint32_t lane = static_cast<uint32_t>((lane0 + i) % lanes);
      auto r = blocks_.allocate(lane, 1, ++program_stamp_);
      if (!r.ok() && erase_dead(1) > 0) r = blocks_.allocate(lane, 1, ++program_stamp_);
      status s = r.ok() ? store_->program(r->first_ppn, 1, src + uint64_t{i} * ns.geo.page_bytes) : r.error();
      if (!s.ok()) {
        if (r.ok()) blocks_.invalidate(r->first_ppn);
        for (uint32_t j = 0; j < i; ++j) blocks_.invalidate(ppns[j]), ppns[j] = kNoPage;
        return s;
      }
      ppns[i] = r->first_ppn;
      timeline_.program(r->first_ppn, cmd_start());
      ++stats_.flash_pages_programmed;
      ++stats_.column_pages_programmed;
    }
    return {};
  }

  // Program one column block (`src`: channel_layout order) built from `chunks` and register it.
  result<uint32_t> add_column_block(name_space& ns, const uint32_t* chunks, const std::byte* src,
                                    const std::vector<double>& v_sum, uint64_t lane0) {
    uint32_t b;
    if (!ns.free_cblocks.empty()) {
      b = ns.free_cblocks.back();
      ns.free_cblocks.pop_back();
    } else {
      b = static_cast<uint32_t>(ns.cblocks.size());
      ns.cblocks.emplace_back();
      ns.free_cblocks.reserve(ns.cblocks.size());
    }
    name_space::column_block& cb = ns.cblocks[b];
    const uint32_t C = ns.chunks_per_column_block;
    try {
      cb.pages.assign(ns.columns.pages_per_block(), kNoPage);
      cb.chunks.assign(chunks, chunks + C);
      cb.gens.resize(C);
      for (uint32_t j = 0; j < C; ++j) cb.gens[j] = gen_of(ns, chunks[j]);
      cb.v_sum = v_sum;
      for (uint32_t j = 0; j < C; ++j) ns.cblocks_of_chunk[chunks[j]].reserve(4);
    } catch (...) {
      ns.free_cblocks.push_back(b);
      throw;
    }
    if (status s = program_striped(ns, src, ns.columns.pages_per_block(), lane0, cb.pages.data()); !s.ok()) {
      ns.free_cblocks.push_back(b);
      return s;
    }
    cb.live = true;
    for (uint32_t j = 0; j < C; ++j) ns.cblocks_of_chunk[chunks[j]].push_back(b);
    ++stats_.column_blocks;
    return b;
  }

  // Column data (channel_layout order) and V sums of the first n tokens of a run of token chunks,
  // read from the group buffer or flash: how a column block or tail is rebuilt.
  status build_columns(name_space& ns, const uint32_t* chunks, uint32_t n, std::byte* dst, std::vector<double>& v_sum) {
    const uint32_t tpp = ns.geo.tokens_per_page, H = ns.cfg.n_kv_heads, d = ns.cfg.head_dim;
    const uint32_t es = dtype_size(ns.geo.kv_dtype);
    const uint64_t page = ns.geo.page_bytes, row = ns.geo.row_bytes();
    const dtype t = ns.geo.kv_dtype;
    std::fill(v_sum.begin(), v_sum.end(), 0.0);
    aligned_bytes tmp;
    for (uint32_t j = 0; uint64_t{j} * tpp < n; ++j) {
      const uint32_t id = chunks[j];
      const chunk_entry& ce = ns.entry(id);
      const uint32_t count = std::min(tpp, n - j * tpp);
      if (ce.n_tokens < count) return {errc::kInvalidArgument, "chunk " + std::to_string(id) + " holds too few tokens"};
      const std::byte* src;
      if (ce.slot != kNoSlot) {
        src = ns.slot_mem[ce.slot].get();
      } else {
        if (!tmp) tmp = alloc_aligned(ns.chunk_bytes);
        if (!tmp) return {errc::kOutOfMemory, "column rebuild buffer"};
        const uint32_t* pages = ns.pages(id);
        for (uint32_t h = 0; h < H; ++h) {  // K and V pages of every head (V for the running mean)
          for (uint32_t p : {h, H + h}) {
            INSTINFER_TRY(store_->read(pages[p], tmp.get() + uint64_t{p} * page));
            note_read(pages[p]);
            ++stats_.column_rebuild_pages_read;
          }
        }
        src = tmp.get();
      }
      for (uint32_t i = 0; i < count; ++i) {
        const uint32_t tok = j * tpp + i;
        for (uint32_t h = 0; h < H; ++h) {
          const std::byte* krow = src + uint64_t{h} * page + uint64_t{i} * row;
          const std::byte* vrow = src + uint64_t{H + h} * page + uint64_t{i} * row;
          for (uint32_t ch = 0; ch < d; ++ch) {
            std::memcpy(dst + ns.columns.offset(h, tok, ch), krow + uint64_t{ch} * es, es);
            v_sum[uint64_t{h} * d + ch] += static_cast<double>(load_as_float(vrow, t, ch));
          }
        }
      }
    }
    return {};
  }

  // DRAM for a column tail. Over the budget (the group buffer's size), the write path first drops
  // the least recently used other tails (they are rebuilt from token pages if attended again); the
  // attend path (may_evict false) never drops a tail another item of the same command holds.
  status ensure_tail_memory(name_space& ns, name_space::column_tail& tl, bool may_evict) {
    tl.use = ++use_clock_;
    if (!tl.k) {
      const uint64_t bytes = ns.columns.block_bytes();
      while (may_evict && ns.tail_bytes + bytes > o_.buffer_bytes) {
        name_space::column_tail* victim = nullptr;
        for (auto& [key, other] : ns.tails)
          if (other.k && &other != &tl && (!victim || other.use < victim->use)) victim = &other;
        if (!victim) break;
        victim->k.reset();
        victim->valid = false;
        ns.tail_bytes -= bytes;
        ++stats_.column_tail_evictions;
      }
      tl.k = alloc_aligned(bytes);
      if (!tl.k) return {errc::kOutOfMemory, "SparF column tail buffer"};
      ns.tail_bytes += bytes;
    }
    tl.v_sum.assign(uint64_t{ns.cfg.n_kv_heads} * ns.cfg.head_dim, 0.0);
    return {};
  }

  // Write path: the tokens just stored at [first_index * tpp + first_token, + n) of (seq, layer)
  // also go into the column tail; a full tail is programmed as a column block. A tail that does not
  // end where these tokens start (fork, truncation) is marked stale and rebuilt when attended. A
  // failure here loses no token data (the column copy is derived), so it is not the write's.
  void column_append(name_space& ns, uint64_t seq, uint32_t layer, uint32_t first_index, uint32_t first_token,
                     const uint32_t* ids, const std::byte* k, const std::byte* v, uint32_t n) {
    const uint32_t tpp = ns.geo.tokens_per_page, ctp = ns.columns.tokens_per_page;
    const uint32_t H = ns.cfg.n_kv_heads, d = ns.cfg.head_dim, es = dtype_size(ns.geo.kv_dtype);
    const uint64_t row = ns.geo.row_bytes();
    const uint64_t p0 = uint64_t{first_index} * tpp + first_token;
    name_space::column_tail& tl = ns.tails[table_key{seq, layer}];
    if (p0 % ctp == 0) {  // a block boundary: start fresh whatever came before
      if (!ensure_tail_memory(ns, tl, true).ok()) return void(tl.valid = false);
      tl.valid = true;
      tl.block = static_cast<uint32_t>(p0 / ctp);
      tl.n = 0;
      tl.chunks.clear();
      tl.gens.clear();
    } else if (!(tl.valid && uint64_t{tl.block} * ctp + tl.n == p0 &&
                 (first_token == 0 ||
                  (!tl.chunks.empty() && tl.chunks.back() == ids[0] && tl.gens.back() == gen_of(ns, ids[0]))))) {
      tl.valid = false;
      return;
    }
    tl.use = ++use_clock_;
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t id = ids[(first_token + i) / tpp];
      if ((p0 + i) % tpp == 0) {
        tl.chunks.push_back(id);
        tl.gens.push_back(gen_of(ns, id));
      }
      for (uint32_t h = 0; h < H; ++h) {
        const std::byte* krow = k + (uint64_t{i} * H + h) * row;
        const std::byte* vrow = v + (uint64_t{i} * H + h) * row;
        for (uint32_t ch = 0; ch < d; ++ch) {
          std::memcpy(tl.k.get() + ns.columns.offset(h, tl.n, ch), krow + uint64_t{ch} * es, es);
          tl.v_sum[uint64_t{h} * d + ch] += static_cast<double>(load_as_float(vrow, ns.geo.kv_dtype, ch));
        }
      }
      if (++tl.n == ctp) {  // sealed: program the block, continue with a fresh tail
        auto b = add_column_block(ns, tl.chunks.data(), tl.k.get(), tl.v_sum, stripe(seq, layer) + tl.block * 7ull);
        if (!b.ok()) return void(tl.valid = false);  // rebuilt from the token pages when attended
        ++tl.block;
        tl.n = 0;
        tl.chunks.clear();
        tl.gens.clear();
        std::fill(tl.v_sum.begin(), tl.v_sum.end(), 0.0);
      }
    }
  }

  // Attend path: the column blocks of (seq, layer)'s first n tokens (table `tab`), rebuilding what
  // is missing or stale, and the tail (nullptr when n is a multiple of the column page's tokens).
  status ensure_columns(name_space& ns, uint64_t seq, uint32_t layer, const std::vector<uint32_t>& tab, uint32_t n,
                        std::vector<uint32_t>& blocks_out, const name_space::column_tail*& tail_out) {
    const uint32_t tpp = ns.geo.tokens_per_page, ctp = ns.columns.tokens_per_page, C = ns.chunks_per_column_block;
    const uint32_t sealed = n / ctp, n_tail = n % ctp;
    blocks_out.clear();
    aligned_bytes tmp;
    std::vector<double> vs;
    for (uint32_t b = 0; b < sealed; ++b) {
      const uint32_t* ids = tab.data() + uint64_t{b} * C;
      uint32_t idx = find_column_block(ns, ids);
      if (idx == UINT32_MAX) {
        if (!tmp) tmp = alloc_aligned(ns.columns.block_bytes());
        if (!tmp) return {errc::kOutOfMemory, "column rebuild buffer"};
        vs.assign(uint64_t{ns.cfg.n_kv_heads} * ns.cfg.head_dim, 0.0);
        INSTINFER_TRY(build_columns(ns, ids, ctp, tmp.get(), vs));
        auto added = add_column_block(ns, ids, tmp.get(), vs, stripe(seq, layer) + b * 7ull);
        if (!added.ok()) return added.error();
        idx = *added;
      }
      blocks_out.push_back(idx);
    }
    tail_out = nullptr;
    if (n_tail == 0) return {};
    name_space::column_tail& tl = ns.tails[table_key{seq, layer}];
    const uint32_t tail_chunks = (n_tail + tpp - 1) / tpp;
    const uint32_t* ids = tab.data() + uint64_t{sealed} * C;
    bool ok = tl.valid && tl.block == sealed && tl.n == n_tail && tl.chunks.size() == tail_chunks;
    for (uint32_t j = 0; ok && j < tail_chunks; ++j) ok = tl.chunks[j] == ids[j] && tl.gens[j] == gen_of(ns, ids[j]);
    if (!ok) {
      tl.valid = false;
      INSTINFER_TRY(ensure_tail_memory(ns, tl, false));
      INSTINFER_TRY(build_columns(ns, ids, n_tail, tl.k.get(), tl.v_sum));
      tl.chunks.assign(ids, ids + tail_chunks);
      tl.gens.resize(tail_chunks);
      for (uint32_t j = 0; j < tail_chunks; ++j) tl.gens[j] = gen_of(ns, ids[j]);
      tl.block = sealed;
      tl.n = n_tail;
      tl.valid = true;
    }
    tl.use = ++use_clock_;
    tail_out = &tl;
    return {};
  }

  // Every item against the drive's own page tables, before any work; tabs[i]: item i's table.
  status check_items(const name_space& ns, uint32_t layer, const std::vector<attend_entry>& items,
                     std::vector<const std::vector<uint32_t>*>& tabs) const {
    const uint32_t tpp = ns.geo.tokens_per_page;
    for (uint32_t i = 0; i < static_cast<uint32_t>(items.size()); ++i) {
      if (items[i].n_tokens == 0) continue;
      auto it = ns.tables.find(table_key{items[i].seq, layer});
      if (it == ns.tables.end())
        return {errc::kUnknownSequence, "sequence " + std::to_string(items[i].seq) + " has no pages in layer " +
                                            std::to_string(layer) + " of namespace " + std::to_string(ns.nsid)};
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
        if (ns.chunks[id - ns.base].n_tokens < need)
          return {errc::kInvalidArgument, "chunk " + std::to_string(id) + " of sequence " +
                                              std::to_string(items[i].seq) + " holds " +
                                              std::to_string(ns.chunks[id - ns.base].n_tokens) +
                                              " tokens, attend needs " + std::to_string(need)};
      }
      tabs[i] = &it->second;
    }
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
    // SparF
    sparf_workspace sparf;
    aligned_bytes col_stage, tok_stage;
    uint64_t col_stage_bytes = 0, tok_stage_bytes = 0;
    std::vector<const std::byte*> col_ptrs, tok_ptrs;
    std::vector<uint32_t> channels, selected;
    std::vector<float> weight, scratch, alpha;
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
    INSTINFER_TRY(check_items(ns, a.layer, items, tabs));
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

  // ---- attend sparse (SparF next to the flash) ----------------------------------------------------
  // Per (item, kv head) task, on the drive's cores: choose the channel groups from q, read only
  // those column pages (the tail's from DRAM), select tokens, read only the K and V pages of this
  // head that hold selected tokens, then the exact attention over them (attention/sparf.hpp, the
  // same code the host runs). Modelled flash time: the column reads, then the token reads.
  status do_attend_sparse(name_space& ns, const sq_entry& e, const std::byte* data, std::byte* res,
                          command_outcome& out) {
    const int64_t wall0 = wall_ns();
    if (!ns.sparf) return {errc::kUnsupported, "namespace " + std::to_string(ns.nsid) + " was created without SparF"};
    const auto a = get_args<attend_args>(e);
    INSTINFER_TRY(check_layer(ns, a.layer));
    const uint32_t hq = ns.q_heads(), d = ns.cfg.head_dim, G = ns.cfg.group_size, H = ns.cfg.n_kv_heads;
    const uint32_t tpp = ns.geo.tokens_per_page;
    if (a.n_items == 0 || a.n_items > 65536) return {errc::kInvalidArgument, "attend batch must hold 1..65536 items"};
    const uint64_t q_bytes = uint64_t{a.n_items} * hq * d * 4;
    if (e.data_bytes != sizeof(sparf_wire_params) + uint64_t{a.n_items} * sizeof(attend_entry) + q_bytes)
      return {errc::kInvalidArgument, "attend-sparse payload size mismatch"};
    const uint64_t out_bytes = q_bytes + uint64_t{a.n_items} * hq * 4;
    if (e.result_bytes < out_bytes + sizeof(sparf_wire_counters))
      return {errc::kInvalidArgument, "attend-sparse result buffer too small"};
    sparf_wire_params wp;
    std::memcpy(&wp, data, sizeof wp);
    sparf_params params;
    params.mode = static_cast<sparf_mode>(wp.mode);
    params.compression = wp.compression;
    params.page_spread = wp.page_spread;
    params.r = wp.r;
    params.k = wp.k;
    params.whole_pages = wp.whole_pages != 0;
    if (wp.mode > 1 || wp.whole_pages > 1) return {errc::kInvalidArgument, "unknown SparF mode"};
    INSTINFER_TRY(params.validate(d));
    std::vector<attend_entry> items(a.n_items);
    std::memcpy(items.data(), data + sizeof wp, a.n_items * sizeof(attend_entry));
    std::vector<const std::vector<uint32_t>*> tabs(a.n_items, nullptr);
    INSTINFER_TRY(check_items(ns, a.layer, items, tabs));
    std::vector<sparf_plan> plans(a.n_items);
    for (uint32_t i = 0; i < a.n_items; ++i) {
      auto plan = sparf_resolve(params, d, items[i].n_tokens);
      if (!plan.ok())
        return {plan.error().code(), "sequence " + std::to_string(items[i].seq) + ": " + plan.error().message()};
      plans[i] = *plan;
    }
    const auto* q = reinterpret_cast<const float*>(data + sizeof wp + uint64_t{a.n_items} * sizeof(attend_entry));
    auto* out_o = reinterpret_cast<float*>(res);
    auto* out_lse = reinterpret_cast<float*>(res + q_bytes);

    // Single-threaded: make every item's column data current (rebuilds program flash) and its V mean.
    std::vector<std::vector<uint32_t>> item_blocks(a.n_items);
    std::vector<const name_space::column_tail*> item_tail(a.n_items, nullptr);
    std::vector<float> v_mean(uint64_t{a.n_items} * H * d, 0.0f);
    std::vector<double> acc(uint64_t{H} * d);
    for (uint32_t i = 0; i < a.n_items; ++i) {
      const uint32_t n = items[i].n_tokens;
      if (n == 0) continue;
      INSTINFER_TRY(ensure_columns(ns, items[i].seq, a.layer, *tabs[i], n, item_blocks[i], item_tail[i]));
      std::fill(acc.begin(), acc.end(), 0.0);  // same order of additions as the host's sparf_index
      for (uint32_t b : item_blocks[i])
        for (size_t x = 0; x < acc.size(); ++x) acc[x] += ns.cblocks[b].v_sum[x];
      const double inv = 1.0 / static_cast<double>(n);
      for (size_t x = 0; x < acc.size(); ++x)
        v_mean[uint64_t{i} * H * d + x] =
            static_cast<float>((acc[x] + (item_tail[i] ? item_tail[i]->v_sum[x] : 0.0)) * inv);
    }
    if (o_.debug_attend_delay_ms) std::this_thread::sleep_for(std::chrono::milliseconds(o_.debug_attend_delay_ms));

    const sparf_config& cfg = ns.sparf_one_head;
    const channel_layout& cl = cfg.columns;
    const uint32_t groups = cl.groups(), ctp = cl.tokens_per_page;
    const uint64_t page = ns.geo.page_bytes;
    std::atomic<uint32_t> next{0};
    std::atomic<int64_t> cpu{0};
    std::mutex mu;  // first error, counters, ppn lists
    status first_error;
    sparf_counters total;
    std::vector<uint32_t> col_ppns, tok_ppns;
    const uint32_t n_tasks = a.n_items * H;
    pool_.run([&](uint32_t wid) {
      const int64_t cpu0 = thread_cpu_ns();
      worker_state& ws = workers_[wid];
      sparf_counters mine;
      std::vector<uint32_t> my_col, my_tok;
      status s;
      if (!ws.reader) {
        auto r = store_->make_reader(4 * o_.pages_per_batch);
        if (r.ok())
          ws.reader = std::move(*r);
        else
          s = r.error();
      }
      auto ensure = [](aligned_bytes& buf, uint64_t& have, uint64_t need) -> bool {
        if (have >= need) return true;
        buf = alloc_aligned(need);
        have = buf ? need : 0;
        return buf != nullptr;
      };
      for (;;) try {
          const uint32_t ti = next.fetch_add(1, std::memory_order_relaxed);
          if (ti >= n_tasks || !s.ok()) break;
          const uint32_t i = ti / H, h = ti % H;
          const uint32_t n = items[i].n_tokens;
          const sparf_plan& plan = plans[i];
          const uint32_t n_chunks = (n + tpp - 1) / tpp, n_cblocks = (n + ctp - 1) / ctp;
          const float* qh = q + (uint64_t{i} * hq + uint64_t{h} * G) * d;
          sparf_work w;
          w.n_tokens = n;
          w.n_chunks = n_chunks;
          w.n_column_blocks = n_cblocks;
          w.v_mean = v_mean.data() + (uint64_t{i} * H + h) * d;
          w.q = qh;
          w.out = out_o + (uint64_t{i} * hq + uint64_t{h} * G) * d;
          w.lse = out_lse + uint64_t{i} * hq + uint64_t{h} * G;
          s = ws.sparf.reserve(std::max(n, 1u), d, G, ctp);
          if (!s.ok()) break;
          if (n == 0) {
            sparf_attend_head(cfg, plan, params.whole_pages, params.page_spread, w, 0, ws.sparf, mine);
            continue;
          }
          ws.channels.resize(d);
          ws.weight.resize(d);
          ws.scratch.resize(d);
          const sparf_channel_choice choice = sparf_choose_channels(
              cfg, plan, params.whole_pages, qh, ws.channels.data(), ws.weight.data(), ws.scratch.data());
          // Dual-step loading, step one: the chosen column pages of every column block (none when
          // every token is kept: sparf_attend_head then skips the approximate scores).
          const bool keep_all = plan.k >= n;
          if (!ensure(ws.col_stage, ws.col_stage_bytes, uint64_t{keep_all ? 1 : n_cblocks} * groups * page)) {
            s = {errc::kOutOfMemory, "SparF column staging"};
            break;
          }
          ws.col_ptrs.resize(n_cblocks);
          const std::vector<uint32_t>& blks = item_blocks[i];
          for (uint32_t b = 0; b < n_cblocks && s.ok(); ++b) {
            std::byte* blk = ws.col_stage.get() + (keep_all ? 0 : uint64_t{b} * groups * page);
            ws.col_ptrs[b] = blk;
            if (keep_all) continue;
            for (uint32_t j = 0; j < choice.n_channels && s.ok(); ++j) {
              const uint32_t gr = cl.group_of(ws.channels[j]);
              if (j > 0 && cl.group_of(ws.channels[j - 1]) == gr) continue;
              if (b < blks.size()) {
                const uint32_t ppn = ns.cblocks[blks[b]].pages[uint64_t{h} * groups + gr];
                s = ws.reader->queue(ppn, blk + uint64_t{gr} * page);
                my_col.push_back(ppn);
              } else {  // the tail: DRAM
                std::memcpy(blk + uint64_t{gr} * page, item_tail[i]->k.get() + (uint64_t{h} * groups + gr) * page,
                            page);
              }
            }
          }
          if (s.ok()) s = ws.reader->submit();
          if (s.ok()) s = ws.reader->wait_all();
          if (!s.ok()) break;
          w.column_blocks = ws.col_ptrs.data();
          ws.tok_ptrs.assign(n_chunks, nullptr);
          w.chunks = ws.tok_ptrs.data();
          ws.selected.resize(std::max(plan.k, 1u));
          uint32_t n_sel = 0;
          w.selected = ws.selected.data();
          w.n_selected = &n_sel;
          ws.alpha.resize(G);  // the group's query heads
          w.alpha = ws.alpha.data();
          sparf_attend_head(cfg, plan, params.whole_pages, params.page_spread, w, 0, ws.sparf, mine, true);
          w.preselected = true;  // the exact pass below reuses this selection and alpha
          // Step two: the K and V pages of this head holding selected tokens.
          uint32_t n_need = 0;
          for (uint32_t j = 0; j < n_sel; ++j)
            if (j == 0 || ws.selected[j] / tpp != ws.selected[j - 1] / tpp) ++n_need;
          if (!ensure(ws.tok_stage, ws.tok_stage_bytes, std::max<uint64_t>(1, n_need) * 2 * page)) {
            s = {errc::kOutOfMemory, "SparF token staging"};
            break;
          }
          uint32_t slot = 0;
          for (uint32_t j = 0; j < n_sel && s.ok(); ++j) {
            const uint32_t c = ws.selected[j] / tpp;
            if (j > 0 && ws.selected[j - 1] / tpp == c) continue;
            std::byte* dst = ws.tok_stage.get() + uint64_t{slot++} * 2 * page;
            ws.tok_ptrs[c] = dst;
            const uint32_t id = (*tabs[i])[c];
            const chunk_entry& ce = ns.entry(id);
            if (ce.slot != kNoSlot) {
              const std::byte* src = ns.slot_mem[ce.slot].get();
              std::memcpy(dst, src + uint64_t{h} * page, page);
              std::memcpy(dst + page, src + uint64_t{H + h} * page, page);
            } else {
              const uint32_t* pages = ns.pages(id);
              s = ws.reader->queue(pages[h], dst);
              if (s.ok()) s = ws.reader->queue(pages[H + h], dst + page);
              my_tok.push_back(pages[h]);
              my_tok.push_back(pages[H + h]);
            }
          }
          if (s.ok()) s = ws.reader->submit();
          if (s.ok()) s = ws.reader->wait_all();
          if (!s.ok()) break;
          sparf_attend_head(cfg, plan, params.whole_pages, params.page_spread, w, 0, ws.sparf, mine);
        } catch (const std::bad_alloc&) {
          s = {errc::kOutOfMemory, "SparF worker"};
          break;
        }
      if (!s.ok() && ws.reader) (void)ws.reader->wait_all();
      cpu.fetch_add(thread_cpu_ns() - cpu0, std::memory_order_relaxed);
      std::lock_guard lock(mu);
      if (!s.ok() && first_error.ok()) first_error = std::move(s);
      total.add(mine);
      col_ppns.insert(col_ppns.end(), my_col.begin(), my_col.end());
      tok_ppns.insert(tok_ppns.end(), my_tok.begin(), my_tok.end());
    });
    stats_.cpu_ns += static_cast<uint64_t>(cpu.load());
    // Flash model: the column reads from command start, the token reads once they are done.
    stats_.flash_pages_read += col_ppns.size() + tok_ppns.size();
    stats_.column_pages_read += col_ppns.size();
    stats_.sparse_token_pages_read += tok_ppns.size();
    const double t_columns = timeline_.read_batch(col_ppns.data(), col_ppns.size(), now_ns_);
    flash_end_ = std::max(
        {flash_end_, t_columns, timeline_.read_batch(tok_ppns.data(), tok_ppns.size(), std::max(now_ns_, t_columns))});
    if (!first_error.ok()) return first_error;
    const sparf_wire_counters wc{total.token_pages_read,
                                 total.channel_pages_read,
                                 total.token_bytes_used,
                                 total.channel_bytes_used,
                                 total.buffered_channel_bytes,
                                 total.dense_pages,
                                 total.dense_bytes,
                                 total.selected_tokens,
                                 total.channels_used,
                                 total.items};
    std::memcpy(res + out_bytes, &wc, sizeof wc);
    out.result_bytes = out_bytes + sizeof wc;
    ++stats_.sparse_attends;
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
