// The metadata file of a persistent namespace (FLASH.meta beside the flash file; format and
// guarantees in docs/persistence.md): the committed chunks' token counts, physical pages and page
// checksums, and the host's page tables as opaque bytes, in one checksummed, generation-numbered
// file replaced atomically (written to FLASH.meta.new, fdatasync'd, renamed, directory fsync'd).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "instinfer/core/status.hpp"
#include "instinfer/csd/models.hpp"
#include "instinfer/csd/protocol.hpp"

namespace instinfer::csd {

inline constexpr uint32_t kNamespaceMetaVersion = 1;

// One commit, as written and as read back. Chunk ids are namespace-relative.
struct namespace_meta {
  uint64_t generation = 0;
  uint64_t count = 0;  // the namespace's capacity in chunks
  uint32_t pages_per_chunk = 0;
  std::vector<uint32_t> ids;      // committed chunks
  std::vector<uint32_t> tokens;   // [chunk] tokens stored (the checksums cover them)
  std::vector<uint32_t> pages;    // [chunk][page] physical pages
  std::vector<uint32_t> sums;     // [chunk][page] CRC32C (kv_namespace::page_sum)
  std::vector<std::byte> tables;  // the host's bytes
};

inline std::string namespace_meta_path(const std::string& flash_path) {
  return flash_path + ".meta";
}

// Atomically replace the metadata of the flash file `flash_path` with `m` (cfg and flash describe
// the namespace and the drive; a reader checks them).
status write_namespace_meta(const std::string& flash_path, const namespace_config& cfg, const flash_params& flash,
                            const namespace_meta& m);

// The last commit for `flash_path`. found = false when there is none (a new store). A file that
// fails its checksum or its consistency checks is kCorruptData; one made for another namespace
// shape or flash geometry is kInvalidArgument naming both; a newer format is kUnsupported.
struct namespace_meta_read {
  bool found = false;
  namespace_meta meta;
};
result<namespace_meta_read> read_namespace_meta(const std::string& flash_path, const namespace_config& cfg,
                                                const flash_params& flash, uint32_t tokens_per_page);

}  // namespace instinfer::csd
