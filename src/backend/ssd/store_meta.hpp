// The persistent SSD store's checksums and metadata file (ssd:PATH?persist=1; format and
// guarantees in docs/persistence.md). Internal to src/backend/ssd.
//
//   chunk_sums   per stored chunk: the tokens it held when last written and a CRC32C per page over
//                exactly those rows (seeded with the slot, page and token count, so data written
//                at another slot or for another length never matches). A rewrite of a flushed
//                partial tail only appends rows, so the rows an older commit covers keep their
//                bytes and their checksum stays valid.
//   meta file    PATH.meta: header + record table (one CRC32C over both) + one record per named
//                sequence (its own CRC32C). Replaced atomically: written to PATH.meta.new,
//                fdatasync, rename, fsync of the directory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "instinfer/backend/persistence.hpp"
#include "instinfer/layout/chunk_layout.hpp"

namespace instinfer::ssd {

class chunk_sums {
 public:
  void configure(const chunk_layout& layout) noexcept { layout_ = layout; }
  uint32_t pages() const noexcept { return layout_.pages_per_chunk(); }

  // The page checksums of the first n_tokens rows of a chunk laid out as chunk_layout says.
  void compute(chunk_id id, const std::byte* chunk, uint32_t n_tokens, uint32_t* out) const noexcept;
  uint32_t page_sum(chunk_id id, uint32_t page, const std::byte* page_data, uint32_t n_tokens) const noexcept;

  // After a successful write of the chunk's first n_tokens rows.
  status record(chunk_id id, const std::byte* chunk, uint32_t n_tokens) noexcept;
  // As recovered from the metadata: entry = {n_tokens, page sums...}.
  status adopt(chunk_id id, std::span<const uint32_t> entry) noexcept;
  // {n_tokens, page sums...}, or empty when the chunk was never written.
  std::span<const uint32_t> find(chunk_id id) const noexcept;
  void erase(chunk_id id) noexcept { sums_.erase(id); }

  // kCorruptData unless the bytes read from the device match the recorded sums (a chunk without
  // a record was never written and is not checked). `where`: the file, for the message.
  status verify_chunk(chunk_id id, const std::byte* chunk, const std::string& where) const noexcept;
  status verify_page(chunk_id id, uint32_t page, const std::byte* page_data, const std::string& where) const noexcept;
  uint64_t memory_bytes() const noexcept { return sums_.size() * (48 + 4 * (1 + uint64_t{pages()})); }

 private:
  chunk_layout layout_{};
  std::unordered_map<chunk_id, std::vector<uint32_t>> sums_;
};

// What must match between the store and the cache that reopens it.
struct meta_geometry {
  uint64_t capacity_chunks = 0;
  uint64_t chunk_bytes = 0;
  uint32_t page_bytes = 0;
  uint32_t tokens_per_page = 0;
  uint32_t n_layers = 0;
  uint32_t n_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t dtype = 0;
};

// The metadata file's bytes for one commit; each sequence's chunks must have sums.
status encode_meta(uint64_t generation, const meta_geometry& g, std::span<const persisted_sequence> sequences,
                   const chunk_sums& sums, std::vector<std::byte>& out) noexcept;

// A metadata file's header, checked: kCorruptData for a damaged or foreign file, kUnsupported
// for a newer format version. The geometry is returned as stored (the caller compares).
struct meta_header {
  uint64_t generation = 0;
  meta_geometry geometry{};
  uint32_t n_records = 0;
};
result<meta_header> decode_meta_header(std::span<const std::byte> file) noexcept;
// Every record of a checked file: intact ones into `out.sequences` with their chunks' sums into
// `sums`, the names of damaged ones (checksum, truncation, a chunk past capacity or disagreeing
// with another record, token counts the chunks cannot hold) into `out.damaged`.
status decode_meta_records(std::span<const std::byte> file, const meta_header& header, chunk_sums& sums,
                           recovered_state& out) noexcept;

// PATH.meta: read whole (kNotFound-like: `exists` false when there is none), write atomically.
status read_meta_file(const std::string& meta_path, std::vector<std::byte>& bytes, bool& exists) noexcept;
status write_meta_file(const std::string& meta_path, std::span<const std::byte> bytes) noexcept;
status remove_meta_file(const std::string& meta_path) noexcept;

}  // namespace instinfer::ssd
