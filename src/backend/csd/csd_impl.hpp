// The csd backend's private state, shared by its files: csd_backend.cpp (the backend calls),
// csd_attend.cpp (the attention commands) and csd_create.cpp (URI options, drive start-up).
// Internal to src/backend/csd.
#pragma once

#include <algorithm>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "instinfer/backend/csd_backend.hpp"
#include "instinfer/backend/persistence.hpp"
#include "instinfer/csd/client.hpp"
#include "instinfer/csd/protocol.hpp"
#include "instinfer/csd/seq_layer_key.hpp"
#include "instinfer/io/storage_file.hpp"

namespace instinfer {

struct csd_drive_slot {
  std::unique_ptr<csd::connection> conn;
  uint32_t nsid = 0;
  uint64_t chunk_base = 0;
  uint32_t head_begin = 0;
  uint32_t n_heads = 0;
};

// persist=1: the drive keeps the chunks' mapping and checksums and, in the same atomic commit,
// these page tables as opaque bytes (table_codec in csd_backend.cpp).
struct csd_backend::impl final : persistent_store {
  // Destroyed after the drives (declared first): the drives exit, then files this backend created
  // are removed while its descriptors still hold their locks (~impl).
  std::vector<io::storage_file> flash_files;
  bool keep_flash = false;
  bool persist = false;
  recovered_state found;  // persist: what configure recovered
  std::vector<csd_drive_slot> drives;
  uint32_t page_bytes = 4096;
  backend_config config{};
  chunk_layout layout{};
  bool configured = false;
  uint64_t capacity = 0;
  std::vector<chunk_id> free_list;
  std::vector<chunk_id> pending_release;
  std::unordered_map<csd::seq_layer_key, std::vector<chunk_id>, csd::seq_layer_hash> mirror;  // what the drives hold
  uint64_t kv_bytes_appended = 0;
  double modelled_ns = 0.0;
  mutable std::mutex stats_mutex;

  impl() = default;
  impl(const impl&) = delete;
  impl& operator=(const impl&) = delete;

  status commit(std::span<const persisted_sequence> sequences) noexcept override;
  const recovered_state& recovered() const noexcept override { return found; }
  void forget_recovered() noexcept override { found = recovered_state{}; }
  status recover_tables();

  ~impl() {
    drives.clear();  // each connection shuts its drive down and waits for it (or kills it)
    if (!keep_flash)
      for (io::storage_file& f : flash_files) f.remove_if_created();
  }

  status lost_guard() const {
    for (const csd_drive_slot& d : drives)
      if (d.conn->lost()) return {errc::kDeviceLost, "a drive of this csd backend was lost; the backend is closed"};
    return {};
  }

  // Post one command per drive (built by `fill`), then wait for all of them. The call's modelled
  // time is the slowest drive's (the drives work in parallel).
  template <class Fill>
  status run_all(Fill&& fill) {
    INSTINFER_TRY(lost_guard());
    status first;
    std::vector<bool> posted(drives.size(), false);
    for (uint32_t d = 0; d < drives.size(); ++d) {
      csd::sq_entry e{};
      e.nsid = drives[d].nsid;
      status s = fill(d, e);
      if (s.ok()) s = drives[d].conn->post(e);
      if (!s.ok()) {
        if (first.ok()) first = std::move(s);
        break;
      }
      posted[d] = true;
    }
    double slowest = 0.0;
    for (uint32_t d = 0; d < drives.size(); ++d) {
      if (!posted[d]) continue;
      status s = drives[d].conn->wait();
      if (!s.ok() && first.ok()) first = std::move(s);
      slowest = std::max(slowest, static_cast<double>(drives[d].conn->last().modelled_ns));
    }
    modelled_ns += slowest;
    return first;
  }

  status flush_releases() {
    if (pending_release.empty()) return {};
    // Chunk ids go back on the free list only once every drive has freed them.
    uint64_t max_ids = drives.front().conn->area_bytes() / 4;
    for (const auto& d : drives) max_ids = std::min(max_ids, d.conn->area_bytes() / 4);
    size_t done = 0;
    while (done < pending_release.size()) {
      const size_t n = std::min<size_t>(pending_release.size() - done, max_ids);
      INSTINFER_TRY(run_all([&](uint32_t d, csd::sq_entry& e) -> status {
        auto* ids = reinterpret_cast<uint32_t*>(drives[d].conn->area());
        for (size_t i = 0; i < n; ++i) ids[i] = static_cast<uint32_t>(drives[d].chunk_base + pending_release[done + i]);
        e.opcode = static_cast<uint8_t>(csd::opcode::kReclaim);
        e.data_bytes = static_cast<uint32_t>(n * 4);
        csd::reclaim_args a{};
        a.mode = static_cast<uint8_t>(csd::reclaim_mode::kChunks);
        a.n_chunks = static_cast<uint32_t>(n);
        csd::set_args(e, a);
        return {};
      }));
      free_list.insert(free_list.end(), pending_release.begin() + static_cast<ptrdiff_t>(done),
                       pending_release.begin() + static_cast<ptrdiff_t>(done + n));
      done += n;
    }
    pending_release.clear();
    return {};
  }

  // What every attention command checks first.
  status check_attend_call(uint32_t layer) const {
    if (!configured) return {errc::kInvalidArgument, "csd backend is not configured"};
    if (layer >= config.shape.n_layers) return {errc::kLayerOutOfRange, "layer out of range"};
    return {};
  }

  // One batch item's page table, checked to cover its tokens and sent to the drives (an empty
  // item has none to send).
  status sync_item(uint32_t layer, const attend_item& it) {
    const uint64_t need = (uint64_t{it.n_tokens} + layout.tokens() - 1) / layout.tokens();
    if (it.chunks.size() < need) return {errc::kInvalidArgument, "attend item has fewer chunks than its tokens need"};
    return it.n_tokens ? sync_table(it.seq, layer, it.chunks) : status{};
  }

  // Make the drives' copy of a (seq, layer) page table equal the manager's.
  status sync_table(seq_id seq, uint32_t layer, std::span<const chunk_id> chunks) {
    auto& m = mirror[csd::seq_layer_key{seq, layer}];
    if (m.size() == chunks.size() && std::equal(m.begin(), m.end(), chunks.begin())) return {};
    for (const auto& d : drives)
      if (chunks.size() * 4 > d.conn->area_bytes())
        return {errc::kInvalidArgument, "page table too large for the data area"};
    INSTINFER_TRY(run_all([&](uint32_t d, csd::sq_entry& e) -> status {
      auto* ids = reinterpret_cast<uint32_t*>(drives[d].conn->area());
      for (size_t i = 0; i < chunks.size(); ++i) ids[i] = static_cast<uint32_t>(drives[d].chunk_base + chunks[i]);
      e.opcode = static_cast<uint8_t>(csd::opcode::kMap);
      e.data_bytes = static_cast<uint32_t>(chunks.size() * 4);
      csd::set_args(e, csd::map_args{seq, layer, static_cast<uint32_t>(chunks.size())});
      return {};
    }));
    m.assign(chunks.begin(), chunks.end());
    return {};
  }

  void note_position(seq_id seq, uint32_t layer, uint32_t index, chunk_id id) {
    auto& m = mirror[csd::seq_layer_key{seq, layer}];
    if (m.size() <= index) m.resize(uint64_t{index} + 1, kInvalidChunk);
    m[index] = id;
  }
};

}  // namespace instinfer
