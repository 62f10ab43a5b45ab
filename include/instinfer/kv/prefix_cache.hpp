// An in-process, content-addressed prefix cache over one kv_cache (issue 13, item 2).
//
// The unit is a page group: `tokens_per_page` consecutive tokens, the token range of one chunk in
// every layer. Group g of a token sequence is keyed by a chained hash,
//   key_g = H(key_{g-1}, token ids of group g),  key_{-1} = the model fingerprint,
// where the fingerprint covers the cache shape (layers, heads, head_dim, dtype), the page size and
// a caller-chosen model id, so caches of different models or layouts never match. A key names the
// whole prefix up to its group; the token ids are kept beside it and compared on lookup, so a
// hash collision is a miss, never a wrong prefix.
//
// insert(seq, tokens) records seq's full page groups: the cache keeps a fork of seq at the last
// new group boundary (a hidden sequence; forks share full chunks by refcount, so nothing is copied).
// lookup(tokens) finds the longest cached prefix of whole groups and returns it as a new sequence
// forked from a hidden one (shares its chunks, like fork_sequence); the caller appends the rest.
//
// Eviction: least recently used first, under `capacity_groups` (at most that many groups are
// indexed; each holds n_layers chunks of the kv_cache, shared with whatever else uses them). Only
// leaves are evicted (a prefix whose longer prefixes are gone); a hidden sequence is truncated to
// what its remaining groups need and freed when none is left. Host memory of the index (keys,
// token ids, bookkeeping) is bounded by the capacity and reported in stats().
//
// Across restarts (a persistent store, docs/persistence.md): with `index_path` set, save() names
// the hidden sequences (names >= kPrefixNameBase are the prefix cache's), commits the store
// (kv_cache::flush) and then writes the index (fingerprint, each hidden sequence's name and token
// ids, the LRU order) to index_path, checksummed, through a temporary file and a rename. create()
// loads it when the file exists: hidden sequences the store no longer has are dropped with the
// groups that need them, named sequences of the reserved range the index does not list (a crash
// between the commit and the index write) are freed, and the LRU tail is evicted down to
// `capacity_groups`, so the cap holds across restarts. A damaged or foreign index is
// kCorruptData / kInvalidArgument from create(), and the cache is left as it was.
//
// Threads: calls are serialised by a mutex. The prefix cache must be destroyed before its
// kv_cache (it frees its hidden sequences).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "instinfer/core/status.hpp"
#include "instinfer/kv/kv_cache.hpp"

namespace instinfer {

struct prefix_cache_options {
  std::string model_id;          // the caller's model identity (weights, tokenizer): part of the key
  uint64_t capacity_groups = 0;  // page groups indexed at most; >= 1
  std::string index_path;        // where save() writes the index and create() reads it; empty: none
};

// Sequence names from here up belong to a prefix cache's hidden sequences.
inline constexpr uint64_t kPrefixNameBase = 1ull << 63;

struct prefix_cache_stats {
  uint64_t groups = 0;            // page groups indexed now
  uint64_t capacity_groups = 0;   // the cap
  uint64_t tokens_per_group = 0;  // tokens_per_page of the cache
  uint64_t held_sequences = 0;    // hidden sequences keeping the groups' chunks
  uint64_t lookups = 0, hits = 0, hit_tokens = 0;
  uint64_t inserted_groups = 0, evicted_groups = 0;
  uint64_t host_bytes = 0;  // memory of the index (keys, token ids, bookkeeping)
};

struct prefix_match {
  seq_id seq = 0;         // a new sequence holding the matched prefix; 0 when n_tokens == 0
  uint64_t n_tokens = 0;  // tokens matched: a multiple of tokens_per_group (0: a miss)
};

class prefix_cache {
 public:
  static result<std::unique_ptr<prefix_cache>> create(kv_cache& cache, const prefix_cache_options& options);
  ~prefix_cache();
  prefix_cache(const prefix_cache&) = delete;
  prefix_cache& operator=(const prefix_cache&) = delete;

  // Index seq's full page groups of `tokens` (the ids whose K/V seq holds at positions 0..; groups
  // beyond what every layer of seq holds are ignored). Groups already indexed are only touched.
  // kUnknownSequence for a seq the cache does not have; on failure nothing is indexed.
  status insert(seq_id seq, std::span<const int32_t> tokens);
  // The longest indexed prefix of `tokens`, as a new sequence (see prefix_match).
  result<prefix_match> lookup(std::span<const int32_t> tokens);
  // Commit the store and write the index to options.index_path (see above). kInvalidArgument
  // without an index_path; I/O failures are kIoError and leave the previous index in place.
  status save();

  // Drop everything (hidden sequences freed).
  void clear() noexcept;

  prefix_cache_stats stats() const;
  uint64_t fingerprint() const noexcept;

 private:
  struct impl;
  explicit prefix_cache(std::unique_ptr<impl> m);
  std::unique_ptr<impl> impl_;
};

}  // namespace instinfer
