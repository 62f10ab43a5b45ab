// The optional persistence half of a kv_store (issue 13): a store that keeps its chunks across
// processes (ssd:PATH?persist=1) also keeps the manager's page tables, so that a later cache on
// the same path gets its named sequences back. docs/persistence.md has the format and the
// guarantees.
//
// The manager (kv_cache) owns sequences and page tables, the store owns slots and checksums: at
// every flush the manager hands the store the page tables of its named sequences (commit); at
// configure the store reads back the last committed tables (recovered), adopts exactly the chunks
// they reference, and the manager rebuilds its sequences and refcounts from them.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "instinfer/backend/attend_batch.hpp"
#include "instinfer/core/status.hpp"

namespace instinfer {

// One named sequence as committed: per layer, its token count and the chunks holding them.
struct persisted_sequence {
  uint64_t name = 0;
  std::vector<uint32_t> n_tokens;             // per layer
  std::vector<std::vector<chunk_id>> chunks;  // per layer, ceil(n_tokens / tokens_per_page) each
};

// What a persistent store found when it was opened.
struct recovered_state {
  std::vector<persisted_sequence> sequences;  // intact records, chunks adopted by the store
  std::vector<uint64_t> damaged;              // names whose record failed its checksum or checks
  uint64_t generation = 0;                    // of the metadata read (0: a new store)
};

class persistent_store {
 public:
  // Make every chunk durable, then atomically replace the committed page tables with `sequences`
  // (their chunks must be allocated). On success the chunks only the previous commit referenced
  // become free; on failure the previous commit stays the one a reopen sees.
  virtual status commit(std::span<const persisted_sequence> sequences) noexcept = 0;
  // The state found at configure (empty for a new store).
  virtual const recovered_state& recovered() const noexcept = 0;
  // The manager has taken the recovered state over: its memory can go.
  virtual void forget_recovered() noexcept = 0;

 protected:
  ~persistent_store() = default;
};

}  // namespace instinfer
