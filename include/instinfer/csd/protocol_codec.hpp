// The payload codec both ends of the CSD protocol use: where each part of an attend command lies
// in the data area, and the SparF parameters and counters to and from their wire structs. The host
// backend (src/backend/csd) encodes with these and the drive (device/csd) decodes with them, so the two
// ends cannot drift apart.
#pragma once

#include <cstdint>

#include "instinfer/attention/sparf.hpp"
#include "instinfer/csd/protocol.hpp"

namespace instinfer::csd {

// Items one attend or attend-sparse command may carry.
inline constexpr uint32_t kMaxAttendItems = 65536;
// Query rows one attend-chunk command may carry.
inline constexpr uint32_t kMaxAttendChunkRows = 1u << 20;
// The host places an attend result at the payload's end rounded up to this (cache-line aligned).
inline constexpr uint64_t kAttendResultAlign = 64;

// Byte layout of one attend (dense) or attend-sparse command of n_items items, each with n_q_heads
// query heads of head_dim (this drive's query heads):
//   data   = [parameters, sparse only: params_bytes] [attend_entry n_items] [q f32 [n_items][n_q_heads][head_dim]]
//   result = [out f32 [n_items][n_q_heads][head_dim]] [lse f32 [n_items][n_q_heads]]
//            [sparf_wire_counters, sparse only]
// Data offsets count from the payload's start, result offsets from the result's start; the host
// puts the result at result_offset of its data area.
struct attend_wire_layout {
  uint64_t entries_offset = 0;
  uint64_t q_offset = 0;
  uint64_t data_bytes = 0;
  uint64_t result_offset = 0;
  uint64_t lse_offset = 0;
  uint64_t counters_offset = 0;
  uint64_t result_bytes = 0;

  // params_bytes: the sparse parameters' size (sizeof(sparf_wire_params) from a protocol-5 host).
  static constexpr attend_wire_layout make(uint32_t n_items, uint32_t n_q_heads, uint32_t head_dim, bool sparse,
                                           uint32_t params_bytes = kSparfParamsBytes) noexcept {
    const uint64_t q_bytes = uint64_t{n_items} * n_q_heads * head_dim * sizeof(float);
    attend_wire_layout l;
    l.entries_offset = sparse ? params_bytes : 0;
    l.q_offset = l.entries_offset + uint64_t{n_items} * sizeof(attend_entry);
    l.data_bytes = l.q_offset + q_bytes;
    l.result_offset = (l.data_bytes + kAttendResultAlign - 1) / kAttendResultAlign * kAttendResultAlign;
    l.lse_offset = q_bytes;
    l.counters_offset = l.lse_offset + uint64_t{n_items} * n_q_heads * sizeof(float);
    l.result_bytes = l.counters_offset + (sparse ? sizeof(sparf_wire_counters) : 0);
    return l;
  }
  // Attend-chunk (protocol.hpp): n_items entries, then n_rows query rows in; n_rows out and lse rows
  // back (lse_offset as for attend; no counters).
  static constexpr attend_wire_layout make_chunk(uint32_t n_items, uint32_t n_rows, uint32_t n_q_heads,
                                                 uint32_t head_dim) noexcept {
    const uint64_t q_bytes = uint64_t{n_rows} * n_q_heads * head_dim * sizeof(float);
    attend_wire_layout l;
    l.entries_offset = 0;
    l.q_offset = uint64_t{n_items} * sizeof(attend_chunk_entry);
    l.data_bytes = l.q_offset + q_bytes;
    l.result_offset = (l.data_bytes + kAttendResultAlign - 1) / kAttendResultAlign * kAttendResultAlign;
    l.lse_offset = q_bytes;
    l.counters_offset = l.lse_offset + uint64_t{n_rows} * n_q_heads * sizeof(float);
    l.result_bytes = l.counters_offset;
    return l;
  }
  // Data area the whole command occupies (payload, alignment gap, result).
  constexpr uint64_t area_bytes() const noexcept { return result_offset + result_bytes; }
};

// The most items one command can carry in a data area of area_bytes (0: not even one).
constexpr uint32_t attend_max_items(uint64_t area_bytes, uint32_t n_q_heads, uint32_t head_dim, bool sparse) noexcept {
  const attend_wire_layout none = attend_wire_layout::make(0, n_q_heads, head_dim, sparse);
  const attend_wire_layout one = attend_wire_layout::make(1, n_q_heads, head_dim, sparse);
  const uint64_t fixed = none.data_bytes + none.result_bytes + kAttendResultAlign;  // worst alignment gap
  const uint64_t per_item = one.data_bytes + one.result_bytes - none.data_bytes - none.result_bytes;
  if (area_bytes < fixed + per_item) return 0;
  const uint64_t n = (area_bytes - fixed) / per_item;
  return static_cast<uint32_t>(n < kMaxAttendItems ? n : kMaxAttendItems);
}

// Whether an attend-chunk command of n_items items and n_rows rows fits a data area of area_bytes.
constexpr bool attend_chunk_fits(uint64_t area_bytes, uint32_t n_items, uint32_t n_rows, uint32_t n_q_heads,
                                 uint32_t head_dim) noexcept {
  return attend_wire_layout::make_chunk(n_items, n_rows, n_q_heads, head_dim).area_bytes() <= area_bytes;
}

namespace detail {
constexpr attend_wire_layout kExampleChunk = attend_wire_layout::make_chunk(2, 5, 4, 64);
static_assert(kExampleChunk.q_offset == 48 && kExampleChunk.data_bytes == 48 + 5 * 4 * 64 * 4);
static_assert(kExampleChunk.result_offset == 5184 && kExampleChunk.lse_offset == 5 * 4 * 64 * 4);
static_assert(kExampleChunk.result_bytes == 5 * 4 * 65 * 4 && !attend_chunk_fits(4096, 2, 5, 4, 64));
constexpr attend_wire_layout kExampleDense = attend_wire_layout::make(3, 4, 128, false);
static_assert(kExampleDense.entries_offset == 0 && kExampleDense.q_offset == 3 * sizeof(attend_entry));
static_assert(kExampleDense.data_bytes == 48 + 3 * 4 * 128 * 4 && kExampleDense.result_offset == 6208);
static_assert(kExampleDense.lse_offset == 3 * 4 * 128 * 4 && kExampleDense.result_bytes == 3 * 4 * 129 * 4);
constexpr attend_wire_layout kExampleSparse = attend_wire_layout::make(3, 4, 128, true);
static_assert(kExampleSparse.entries_offset == kSparfParamsBytes && kExampleSparse.data_bytes == 6256);
static_assert(kExampleSparse.result_offset % kAttendResultAlign == 0 && kExampleSparse.result_offset >= 6240);
static_assert(attend_wire_layout::make(3, 4, 128, true, sizeof(sparf_wire_params)).data_bytes == 6224);
static_assert(kExampleSparse.result_bytes == kExampleDense.result_bytes + sizeof(sparf_wire_counters));
static_assert(attend_wire_layout::make(3, 2, 64, true).area_bytes() <= 4096);
static_assert(attend_max_items(4096, 2, 64, true) == 3 && attend_max_items(100, 2, 64, false) == 0);
}  // namespace detail

// ---- SparF parameters ---------------------------------------------------------------------------
// The protocol-5 part (sparf_wire_params), the protocol-6 extension (sparf_wire_ext) and the
// protocol-7 one (sparf_wire_ext2); a command carries all three (kSparfParamsBytes), or the first
// parts only (kSparfParamsBytesV6, sizeof(sparf_wire_params)): the missing fields keep
// sparf_params' defaults.
constexpr sparf_wire_ext encode_sparf_ext(const sparf_params& p) noexcept {
  sparf_wire_ext w{};
  w.sink_tokens = p.sink_tokens;
  w.window_tokens = p.window_tokens;
  w.policy = static_cast<uint8_t>(p.policy);
  return w;
}
// False when a reserved byte is set; sparf_params::validate checks the policy's value.
constexpr bool decode_sparf_ext(const sparf_wire_ext& w, sparf_params& p) noexcept {
  for (uint8_t b : w.reserved)
    if (b != 0) return false;
  p.sink_tokens = w.sink_tokens;
  p.window_tokens = w.window_tokens;
  p.policy = static_cast<sparse_policy>(w.policy);
  return true;
}
constexpr sparf_wire_ext2 encode_sparf_ext2(const sparf_params& p) noexcept {
  sparf_wire_ext2 w{};
  w.channel_share = p.channel_share;
  return w;
}
// False when a reserved byte is set; sparf_params::validate checks the share's value.
constexpr bool decode_sparf_ext2(const sparf_wire_ext2& w, sparf_params& p) noexcept {
  for (uint8_t b : w.reserved)
    if (b != 0) return false;
  p.channel_share = w.channel_share;
  return true;
}
constexpr sparf_wire_params encode_sparf_params(const sparf_params& p) noexcept {
  sparf_wire_params w{};
  w.compression = p.compression;
  w.page_spread = p.page_spread;
  w.r = p.r;
  w.k = p.k;
  w.mode = static_cast<uint8_t>(p.mode);
  w.whole_pages = p.whole_pages ? 1 : 0;
  return w;
}
// False when the wire holds a mode or flag this protocol does not know; sparf_params::validate
// checks the values.
constexpr bool decode_sparf_params(const sparf_wire_params& w, sparf_params& p) noexcept {
  if (w.mode > static_cast<uint8_t>(sparf_mode::kExplicit) || w.whole_pages > 1) return false;
  p.mode = static_cast<sparf_mode>(w.mode);
  p.compression = w.compression;
  p.page_spread = w.page_spread;
  p.r = w.r;
  p.k = w.k;
  p.whole_pages = w.whole_pages != 0;
  return true;
}

// ---- SparF counters -----------------------------------------------------------------------------
// A counter added to sparf_counters must be added to the wire struct (and the protocol version).
static_assert(sizeof(sparf_counters) == sizeof(sparf_wire_counters));

constexpr sparf_wire_counters encode_sparf_counters(const sparf_counters& c) noexcept {
  return sparf_wire_counters{
      c.token_pages_read, c.channel_pages_read, c.token_bytes_used, c.channel_bytes_used, c.buffered_channel_bytes,
      c.dense_pages,      c.dense_bytes,        c.selected_tokens,  c.channels_used,      c.items};
}
constexpr sparf_counters decode_sparf_counters(const sparf_wire_counters& w) noexcept {
  return sparf_counters{
      w.token_pages_read, w.channel_pages_read, w.token_bytes_used, w.channel_bytes_used, w.buffered_channel_bytes,
      w.dense_pages,      w.dense_bytes,        w.selected_tokens,  w.channels_used,      w.items};
}

namespace detail {
constexpr bool sparf_round_trip() noexcept {
  sparf_params p;
  p.mode = sparf_mode::kExplicit;
  p.r = 12;
  p.k = 345;
  p.whole_pages = false;
  p.page_spread = 3.0;
  p.sink_tokens = 16;
  p.window_tokens = 64;
  p.policy = sparse_policy::kPageSummary;
  sparf_params back;
  if (!decode_sparf_params(encode_sparf_params(p), back) || !decode_sparf_ext(encode_sparf_ext(p), back)) return false;
  sparf_wire_ext bad_ext = encode_sparf_ext(p);
  bad_ext.reserved[6] = 1;
  sparf_params ignored;
  if (decode_sparf_ext(bad_ext, ignored) || back.sink_tokens != 16 || back.window_tokens != 64 ||
      back.policy != sparse_policy::kPageSummary)
    return false;
  sparf_wire_params bad = encode_sparf_params(p);
  bad.mode = 7;
  const sparf_counters c{1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  const sparf_counters cb = decode_sparf_counters(encode_sparf_counters(c));
  return back.mode == p.mode && back.r == 12 && back.k == 345 && !back.whole_pages && back.page_spread == 3.0 &&
         !decode_sparf_params(bad, back) && cb.token_pages_read == 1 && cb.buffered_channel_bytes == 5 &&
         cb.items == 10;
}
static_assert(sparf_round_trip());
}  // namespace detail

}  // namespace instinfer::csd
