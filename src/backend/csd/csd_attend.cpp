// The csd: backend's attention commands: dense decode and causal chunks (attend, attend-chunk)
// and sparse decode inside the drive (SparF, the page policy), each split over the drives by
// sequence and sent as one command per drive.
#include "instinfer/backend/csd_backend.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "csd_impl.hpp"
#include "instinfer/attention/sparf.hpp"
#include "instinfer/csd/client.hpp"
#include "instinfer/csd/models.hpp"
#include "instinfer/csd/protocol.hpp"
#include "instinfer/csd/protocol_codec.hpp"
#include "instinfer/csd/seq_layer_key.hpp"

namespace instinfer {

using namespace csd;

status csd_backend::attend(uint32_t layer, const attend_batch& batch) noexcept {
  return send_attend(layer, batch, nullptr, nullptr);
}

status csd_backend::attend_causal(uint32_t layer, const attend_batch& batch) noexcept {
  if (batch.row_indptr == nullptr || batch.row_pos == nullptr) return attend(layer, batch);
  return send_attend_chunk(layer, batch);
}

// One piece of an attend-chunk command: rows [row0, row0 + n_rows) of sequence b of the batch.
namespace {
struct chunk_piece {
  uint32_t b = 0;
  uint32_t row0 = 0;
  uint32_t n_rows = 0;
};
}  // namespace

status csd_backend::send_attend_chunk(uint32_t layer, const attend_batch& batch) noexcept {
  impl& m = *impl_;
  INSTINFER_TRY(m.check_attend_call(layer));
  if (batch.empty()) return {};
  try {
    const uint32_t dim = m.config.shape.head_dim;
    const uint32_t g = m.config.shape.group_size();
    for (const attend_item& it : batch) {
      if (!it.q || !it.out) return {errc::kInvalidArgument, "attend-chunk item without q or out"};
      if (it.n_rows == 0 || uint64_t{it.first_pos} + it.n_rows > it.n_tokens)
        return {errc::kInvalidArgument, "attend-chunk item of sequence " + std::to_string(it.seq) + ": " +
                                            std::to_string(it.n_rows) + " rows at position " +
                                            std::to_string(it.first_pos) + " over " + std::to_string(it.n_tokens) +
                                            " tokens"};
      INSTINFER_TRY(m.sync_item(layer, it));
    }
    // Commands sized to the smallest data area: whole items while they fit, a long item's rows
    // split into pieces (a piece of rows at position p is itself a causal chunk at p).
    uint64_t area = UINT64_MAX;
    uint32_t hq_max = 0;
    for (const csd_drive_slot& ds : m.drives) {
      area = std::min(area, ds.conn->area_bytes());
      hq_max = std::max(hq_max, ds.n_heads * g);
    }
    if (!attend_chunk_fits(area, 1, 1, hq_max, dim))
      return {errc::kInvalidArgument, "data area too small for one attend-chunk row"};
    std::vector<chunk_piece> pieces;
    uint32_t n_rows = 0;
    const auto send = [&]() -> status {
      const uint32_t np = static_cast<uint32_t>(pieces.size());
      INSTINFER_TRY(m.run_all([&](uint32_t d, sq_entry& e) -> status {
        const csd_drive_slot& ds = m.drives[d];
        const uint32_t hq = ds.n_heads * g;
        const attend_wire_layout wire = attend_wire_layout::make_chunk(np, n_rows, hq, dim);
        std::byte* p = ds.conn->area();
        auto* ent = reinterpret_cast<attend_chunk_entry*>(p + wire.entries_offset);
        auto* q = reinterpret_cast<float*>(p + wire.q_offset);
        uint64_t row = 0;
        for (const chunk_piece& pc : pieces) {
          const attend_item it = batch[pc.b];
          ent[&pc - pieces.data()] = attend_chunk_entry{it.seq, it.n_tokens, pc.n_rows, it.first_pos + pc.row0, 0};
          for (uint32_t r = 0; r < pc.n_rows; ++r, ++row)
            std::memcpy(q + row * hq * dim,
                        it.q + (uint64_t{pc.row0} + r) * batch.n_q_heads * dim + uint64_t{ds.head_begin} * g * dim,
                        uint64_t{hq} * dim * 4);
        }
        e.opcode = static_cast<uint8_t>(opcode::kAttendChunk);
        e.data_bytes = static_cast<uint32_t>(wire.data_bytes);
        e.result_offset = wire.result_offset;
        e.result_bytes = static_cast<uint32_t>(wire.result_bytes);
        set_args(e, attend_chunk_args{layer, np, n_rows});
        return {};
      }));
      for (const csd_drive_slot& ds : m.drives) {
        const uint32_t hq = ds.n_heads * g;
        const attend_wire_layout wire = attend_wire_layout::make_chunk(np, n_rows, hq, dim);
        const std::byte* r = ds.conn->area() + wire.result_offset;
        const auto* o = reinterpret_cast<const float*>(r);
        const auto* lse = reinterpret_cast<const float*>(r + wire.lse_offset);
        uint64_t row = 0;
        for (const chunk_piece& pc : pieces) {
          const attend_item it = batch[pc.b];
          for (uint32_t k = 0; k < pc.n_rows; ++k, ++row) {
            const uint64_t dst = uint64_t{pc.row0} + k;
            std::memcpy(it.out + dst * batch.n_q_heads * dim + uint64_t{ds.head_begin} * g * dim, o + row * hq * dim,
                        uint64_t{hq} * dim * 4);
            if (it.lse)
              std::memcpy(it.lse + dst * batch.n_q_heads + uint64_t{ds.head_begin} * g, lse + row * hq,
                          uint64_t{hq} * 4);
          }
        }
      }
      pieces.clear();
      n_rows = 0;
      return {};
    };
    for (uint32_t b = 0; b < batch.size(); ++b) {
      const uint32_t rows = batch[b].n_rows;
      for (uint32_t r0 = 0; r0 < rows;) {
        // The most rows of this item that fit beside what the command already holds.
        const uint32_t items = static_cast<uint32_t>(pieces.size()) + 1;
        uint32_t lo = 0, hi = std::min(rows - r0, kMaxAttendChunkRows - n_rows);
        while (lo < hi) {
          const uint32_t mid = lo + (hi - lo + 1) / 2;
          if (attend_chunk_fits(area, items, n_rows + mid, hq_max, dim))
            lo = mid;
          else
            hi = mid - 1;
        }
        if (lo == 0 || items > kMaxAttendItems) {  // full: send what it holds, start a new command
          INSTINFER_TRY(send());
          continue;
        }
        pieces.push_back(chunk_piece{b, r0, lo});
        n_rows += lo;
        r0 += lo;
      }
    }
    if (!pieces.empty()) INSTINFER_TRY(send());
    return {};
  } catch (...) {
    return {errc::kOutOfMemory, "attend-chunk"};
  }
}

bool csd_backend::runs_sparf() const noexcept {
  return impl_->configured && impl_->config.sparf;
}

bool csd_backend::runs_page_summaries() const noexcept {
  return impl_->configured && impl_->config.page_summaries;
}

status csd_backend::attend_sparse(uint32_t layer, const attend_batch& batch, const sparf_params& params,
                                  sparf_counters* counters) noexcept {
  if (params.policy == sparse_policy::kPageSummary ? !runs_page_summaries() : !runs_sparf())
    return {errc::kUnsupported, std::string("csd backend configured without ") +
                                    (params.policy == sparse_policy::kPageSummary ? "page summaries" : "SparF")};
  return send_attend(layer, batch, &params, counters);
}

// Dense (sparse == null) or SparF attend: the same command layout, SparF adds its parameters in
// front of the entries and its counters after the results.
status csd_backend::send_attend(uint32_t layer, const attend_batch& batch, const sparf_params* sparse,
                                sparf_counters* counters) noexcept {
  impl& m = *impl_;
  INSTINFER_TRY(m.check_attend_call(layer));
  if (batch.empty()) return {};
  try {
    const uint32_t dim = m.config.shape.head_dim;
    const uint32_t g = m.config.shape.group_size();
    for (const attend_item& it : batch) {
      if (!it.q || !it.out) return {errc::kInvalidArgument, "attend item without q or out"};
      INSTINFER_TRY(m.sync_item(layer, it));
    }
    const bool is_sparse = sparse != nullptr;
    const sparf_wire_params wp = is_sparse ? encode_sparf_params(*sparse) : sparf_wire_params{};
    const sparf_wire_ext wx = is_sparse ? encode_sparf_ext(*sparse) : sparf_wire_ext{};
    const sparf_wire_ext2 wx2 = is_sparse ? encode_sparf_ext2(*sparse) : sparf_wire_ext2{};
    // Items per command: what fits in the smallest data area.
    uint32_t max_items = kMaxAttendItems;
    for (const csd_drive_slot& ds : m.drives)
      max_items = std::min(max_items, attend_max_items(ds.conn->area_bytes(), ds.n_heads * g, dim, is_sparse));
    if (max_items == 0) return {errc::kInvalidArgument, "data area too small for one attend item"};
    for (size_t b0 = 0; b0 < batch.size(); b0 += max_items) {
      const uint32_t nb = static_cast<uint32_t>(std::min<size_t>(max_items, batch.size() - b0));
      INSTINFER_TRY(m.run_all([&](uint32_t d, sq_entry& e) -> status {
        const csd_drive_slot& ds = m.drives[d];
        const uint32_t hq = ds.n_heads * g;
        const attend_wire_layout wire = attend_wire_layout::make(nb, hq, dim, is_sparse);
        std::byte* p = ds.conn->area();
        if (is_sparse) {
          std::memcpy(p, &wp, sizeof wp);
          std::memcpy(p + sizeof wp, &wx, sizeof wx);
          std::memcpy(p + kSparfParamsBytesV6, &wx2, sizeof wx2);
        }
        auto* ent = reinterpret_cast<attend_entry*>(p + wire.entries_offset);
        auto* q = reinterpret_cast<float*>(p + wire.q_offset);
        for (size_t i = 0; i < nb; ++i) {
          const attend_item& it = batch[b0 + i];
          ent[i] = attend_entry{it.seq, it.n_tokens, 0};
          std::memcpy(q + i * hq * dim, it.q + uint64_t{ds.head_begin} * g * dim, uint64_t{hq} * dim * 4);
        }
        e.opcode = static_cast<uint8_t>(is_sparse ? opcode::kAttendSparse : opcode::kAttend);
        e.data_bytes = static_cast<uint32_t>(wire.data_bytes);
        e.result_offset = wire.result_offset;
        e.result_bytes = static_cast<uint32_t>(wire.result_bytes);
        if (is_sparse)
          set_args(e, attend_sparse_args{layer, nb, kSparfParamsBytes, 0});
        else
          set_args(e, attend_args{layer, nb});
        return {};
      }));
      for (const csd_drive_slot& ds : m.drives) {
        const uint32_t hq = ds.n_heads * g;
        const attend_wire_layout wire = attend_wire_layout::make(nb, hq, dim, is_sparse);
        const std::byte* r = ds.conn->area() + wire.result_offset;
        const auto* o = reinterpret_cast<const float*>(r);
        const auto* lse = reinterpret_cast<const float*>(r + wire.lse_offset);
        for (size_t i = 0; i < nb; ++i) {
          const attend_item& it = batch[b0 + i];
          std::memcpy(it.out + uint64_t{ds.head_begin} * g * dim, o + i * hq * dim, uint64_t{hq} * dim * 4);
          if (it.lse) std::memcpy(it.lse + uint64_t{ds.head_begin} * g, lse + i * hq, uint64_t{hq} * 4);
        }
        if (is_sparse && counters) {
          sparf_wire_counters wc;
          std::memcpy(&wc, r + wire.counters_offset, sizeof wc);
          counters->add(decode_sparf_counters(wc));
        }
      }
    }
    return {};
  } catch (...) {
    return {errc::kOutOfMemory, "attend"};
  }
}

}  // namespace instinfer
