// The paged KV manager: sequences and their page tables over a pluggable backend.
//
// Per sequence and layer the cache keeps a page table: the ordered chunk ids holding its tokens
// (a chunk = tokens_per_page tokens of one layer, all kv heads, K and V; see chunk_layout.hpp)
// and the token count. Forks share full chunks by refcount and copy the partial tail; a chunk
// that is shared or sealed (was ever full) is copied before it is appended to, so stored pages
// are never rewritten. Every operation validates its inputs first and either completes or
// leaves the cache as it was.
//
// Thread safety: calls on one kv_cache are serialised by an internal mutex.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "instinfer/attention/sparf/params.hpp"  // sparf_params, sparf_counters: plain values, no algorithm
#include "instinfer/backend/backend.hpp"
#include "instinfer/core/handoff_mutex.hpp"
#include "instinfer/kv/page_table.hpp"

namespace instinfer {

class sparse_attender;  // src/sparf: the sparse policy beside the page tables
class slice_gate;       // src/core: the slices of one attention call as one shared run
struct slice_call;

struct cache_options {
  kv_shape shape{};
  uint32_t page_bytes = 0;      // 0: the backend's preferred size
  uint64_t capacity_bytes = 0;  // 0: the backend's default
  uint32_t n_threads = 0;       // 0: hardware concurrency
  float scale = 0.0f;           // 0: 1/sqrt(head_dim)
  float softcap = 0.0f;         // <= 0: off
  std::string backend_uri = "host";
  // SparF (attend_sparse): keep a channel-indexed K copy and a V running mean per (sequence, layer).
  bool sparf = false;
  uint32_t sparf_channels_per_page = 0;  // 0: channel_layout's default for the page size
  // Page summaries (attend_sparse with sparf_params::policy = kPageSummary): per page group and kv
  // head the per-channel min and max of K (no column copy): in host memory on host, ssd, cuda; in
  // the drive's DRAM on csd, which runs the policy itself. Either or both of sparf /
  // page_summaries; the policy is chosen per call.
  bool page_summaries = false;
  // The caller's threads: no internal pool, attention runs on the calling thread (n_threads is
  // ignored). Spread a call over your threads with attend_slice / attend_chunk_slice.
  bool caller_threads = false;
  // Opt-in, q8_0 caches on host and ssd: decode attention scores Q.K with integer dot products of
  // the query quantized to q8_0 (decode_params::int8_query_dot: faster, logits within the bound
  // documented there), in decode and causal chunk attention; SparF and page summaries stay f32.
  // Other dtypes, csd and cuda: kUnsupported.
  bool int8_query_dot = false;
};

struct cache_stats {
  uint64_t n_sequences = 0;
  uint64_t chunk_bytes = 0;
  uint64_t shared_chunks = 0;  // chunks referenced by more than one sequence
  backend_stats backend{};
  sparf_counters sparf{};                // pages and bytes read by attend_sparse, beside the dense equivalent
  uint64_t sparf_column_bytes = 0;       // channel-indexed K copy held in host memory: all of it on the
                                         // host backend; tail blocks only where sealed blocks are on the
                                         // device (ssd); 0 where the backend runs SparF (csd: drive stats)
  uint64_t page_summary_bytes = 0;       // page summaries held in host memory (shared groups once); 0 on
                                         // csd (in the drive: device_stats::summary_bytes)
  uint64_t sparf_reused_selections = 0;  // SparF calls per (sequence, layer) that reused a kept
                                         // selection (sparf_params::reuse_min_cosine)
};

class kv_cache {
 public:
  static result<std::unique_ptr<kv_cache>> create(const cache_options& options);
  // Use an already constructed backend (tests, custom backends).
  static result<std::unique_ptr<kv_cache>> create(const cache_options& options, std::unique_ptr<backend> b);
  ~kv_cache();
  kv_cache(const kv_cache&) = delete;
  kv_cache& operator=(const kv_cache&) = delete;

  const kv_shape& shape() const noexcept { return config_.shape; }
  const page_geometry& page() const noexcept { return config_.page; }
  chunk_layout layout() const noexcept { return config_.layout(); }
  backend& storage() noexcept { return *backend_; }

  result<seq_id> create_sequence();
  // New sequence sharing src's tokens (all layers).
  result<seq_id> fork_sequence(seq_id src);
  status free_sequence(seq_id seq);
  // Remove positions [begin, end) of every layer; end = UINT64_MAX means "to the end".
  status remove_range(seq_id seq, uint64_t begin, uint64_t end);

  result<uint32_t> length(seq_id seq, uint32_t layer) const;
  bool contains(seq_id seq) const;

  // Append n tokens of one layer. k, v: [n][n_kv_heads][head_dim] of `src_dtype` (f32 is converted
  // to the cache dtype, and so are f16 / bf16 into a quantized cache (q8_0, q4_0: quantized
  // block by block as ggml does); rows already in the cache dtype are copied). Quantizing refuses
  // non-finite values with kInvalidArgument.
  status append(seq_id seq, uint32_t layer, uint32_t n_tokens, const void* k, const void* v, dtype src_dtype);

  // Decode attention of one layer. q: [n_seq][n_q_heads][head_dim]; out: same shape; lse:
  // [n_seq][n_q_heads] or null. A sequence with no tokens in the layer yields zeros and lse -inf.
  // out (or lse) may overlap q, e.g. out == q for in-place attention: q is then copied first, so
  // every backend sees separate buffers. out and lse must not overlap each other.
  status attend(uint32_t layer, std::span<const seq_id> seqs, const float* q, float* out, float* lse);

  // Sparse decode attention of one layer; shapes as in attend. params.policy chooses SparF
  // (attention/sparf.hpp; needs cache_options::sparf) or page summaries
  // (attention/sparf/page_summary.hpp; needs cache_options::page_summaries). SparF: q may overlap out or lse as in
  // attend. Runs in the sparse attender (src/sparf): dual-step loading reads only the K and V pages holding selected
  // tokens: in place where the backend's chunks are host-addressable (host), as single pages through read_pages (ssd)
  // or whole chunks through read_chunk otherwise; a backend that runs a policy itself (csd: next to its flash, from
  // its own channel-indexed K copy or page summaries) gets the call instead.
  status attend_sparse(uint32_t layer, std::span<const seq_id> seqs, const float* q, float* out, float* lse,
                       const sparf_params& params = {});

  // ---- since C API 0.3 (kv_cache_attend.cpp: chunks and slices; kv_cache_state.cpp: positions, state) ----

  // Append at an explicit position: `pos` must equal the layer's current length (a gap or an
  // overlap is kInvalidArgument); otherwise as append.
  status append_at(seq_id seq, uint32_t layer, uint64_t pos, uint32_t n_tokens, const void* k, const void* v,
                   dtype src_dtype);
  // New sequence sharing positions [0, pos) of src in every layer (pos <= every layer's length).
  result<seq_id> fork_sequence_at(seq_id src, uint64_t pos);

  // Causal chunk attention of one layer (prefill). Sequence b has n_rows[b] >= 1 query rows at
  // positions[b] .. positions[b] + n_rows[b] - 1, whose K/V rows are already appended
  // (positions[b] + n_rows[b] <= its length); row i attends tokens [0, positions[b] + i].
  // q, out: [sum n_rows][n_q_heads][head_dim], sequences in batch order; lse: [sum n_rows][n_q_heads]
  // or null. Each K/V page is read once per call and kv head, for all rows. Host and ssd run it
  // (the one decode driver); other backends return kUnsupported.
  status attend_chunk(uint32_t layer, std::span<const seq_id> seqs, std::span<const uint32_t> positions,
                      std::span<const uint32_t> n_rows, const float* q, float* out, float* lse);
  // Whether this cache's backend runs attend_chunk (ask before appending a chunk's K/V).
  bool supports_attend_chunk() const noexcept { return backend_->runs_causal(); }

  // Slice ith of nth of attend / attend_chunk on the caller's threads (llama.cpp's per-op ith/nth;
  // q, out, lse are the whole batch's). Together the nth slices write every output exactly once,
  // identical to one call. Where the backend runs attention on the caller's threads (host), the
  // slices of one call are one shared run: the first to arrive plans the whole call for nth workers
  // and the others take work items from it as they arrive, so one long sequence spreads over every
  // thread. No slice waits for another to arrive. One that comes after its call's run ended
  // returns at once if nothing changed since (same arguments, query and output checksums, no
  // other call on the cache), else runs the call again: slices called one by one from a single
  // thread, or only some of them, still write every output.
  // The slice that ends the run returns its outcome. Elsewhere (ssd, csd, cuda) the batch's
  // sequences are cut into nth ranges [b * ith / nth, b * (ith + 1) / nth) and the slices run one
  // at a time under the cache's lock.
  status attend_slice(uint32_t layer, std::span<const seq_id> seqs, const float* q, float* out, float* lse,
                      uint32_t ith, uint32_t nth);
  status attend_chunk_slice(uint32_t layer, std::span<const seq_id> seqs, std::span<const uint32_t> positions,
                            std::span<const uint32_t> n_rows, const float* q, float* out, float* lse, uint32_t ith,
                            uint32_t nth);

  // Sequence state: every layer's K/V of one sequence as a self-checking byte stream (magic,
  // format version, shape, per-layer lengths, the stored rows, CRC32C). Load into a cache of the
  // same shape on any backend: a new sequence is created; truncated or corrupt input is
  // kCorruptData, a different shape kInvalidArgument, and on failure the cache is unchanged.
  result<uint64_t> sequence_state_size(seq_id seq) const;
  status save_sequence(seq_id seq, std::vector<std::byte>& out);
  result<seq_id> load_sequence(std::span<const std::byte> state);
  status save_sequence_file(seq_id seq, const std::string& path);
  result<seq_id> load_sequence_file(const std::string& path);

  // Hint that `layer` of these sequences is attended next (storage backends start reads early).
  void prefetch(uint32_t layer, std::span<const seq_id> seqs);

  // The page tables of one layer for a batch, in CSR form (FlashInfer's paged_kv indptr/indices/last_page_len).
  status page_table(uint32_t layer, std::span<const seq_id> seqs, csr_page_table& out) const;
  // Copy out the stored (cache dtype) K and V of one layer: [n_tokens][n_kv_heads][head_dim] each.
  status read_tokens(seq_id seq, uint32_t layer, std::vector<std::byte>& k, std::vector<std::byte>& v);

  // Make every sequence's tokens so far durable (storage backends). On a persistent store
  // (ssd:PATH?persist=1, docs/persistence.md) this is also the commit point: when it returns, every
  // named sequence as it is now survives a crash or SIGKILL and comes back on the next open of the
  // path; a failed flush leaves the previous commit in place.
  status flush();
  cache_stats stats() const;

  // ---- since C API 0.5: named sequences and persistent stores (kv_cache_persist.cpp) ----

  // Give a sequence a caller-chosen name (nonzero, unique in this cache; 0 removes its name).
  // A persistent store keeps the named sequences (and only them) across processes; forks are not
  // named. kInvalidArgument when another sequence has the name.
  status set_sequence_name(seq_id seq, uint64_t name);
  // 0 when unnamed.
  result<uint64_t> sequence_name(seq_id seq) const;
  // The sequence with this name: kUnknownSequence when there is none, kCorruptData when the
  // store's record of it failed its checks at open (its tokens are not served).
  result<seq_id> find_sequence(uint64_t name) const;
  // Every named sequence as (name, id), by name.
  std::vector<std::pair<uint64_t, seq_id>> named_sequences() const;
  // Names whose record the open found damaged (until the name is reused or the next flush drops them).
  std::vector<uint64_t> damaged_sequences() const;
  // The backend keeps this cache's named sequences across processes.
  bool persistent() const noexcept { return store_ != nullptr; }

 private:
  struct layer_table {
    std::vector<chunk_id> chunks;
    uint32_t n_tokens = 0;
  };
  struct sequence {
    std::vector<layer_table> layers;
    uint64_t name = 0;  // 0: unnamed
  };

  kv_cache(backend_config config, std::unique_ptr<backend> b);
  // Rebuild the sequences a persistent store recovered (create, before any other call).
  status restore();
  status commit_locked();
  status check_layer(uint32_t layer) const;
  result<sequence*> find(seq_id seq);
  result<const sequence*> find(seq_id seq) const;
  status track(chunk_id id);  // make room for a chunk id handed out by the backend
  void retain(chunk_id id) noexcept;
  void release(chunk_id id) noexcept;
  bool writable(chunk_id id) const noexcept;
  // Fresh chunks appending n tokens to t takes (the tail's room first, plus one for a copy-on-write
  // of a shared or sealed tail), and the check that the backend has them: out of pages otherwise.
  uint32_t fresh_chunks_needed(const layer_table& t, uint32_t n) const noexcept;
  status check_free_chunks(const layer_table& t, uint32_t n) const;
  // Append rows already in the cache dtype to one table; on failure the table is unchanged.
  // notify: tell the sparse attender (not for a table remove_range is rebuilding: it gets
  // on_truncate with the same rows instead).
  status append_to_table(seq_id seq, uint32_t layer, layer_table& t, uint32_t n_tokens, const std::byte* k,
                         const std::byte* v, bool notify = true);
  status convert_rows(uint32_t n_tokens, const void* k, const void* v, dtype src_dtype, const std::byte*& kb,
                      const std::byte*& vb);
  void release_table(layer_table& t) noexcept;
  status fill_batch(uint32_t layer, std::span<const seq_id> seqs);
  attend_batch batch_view(const float* q, float* out, float* lse) const noexcept;
  // q itself, or a copy of it in q_copy_ when out or lse overlap it (in-place attention).
  // q itself, or a copy of it when out or lse overlap its n_rows query rows.
  result<const float*> separate_query(size_t n_rows, const float* q, const float* out, const float* lse);
  status append_locked(seq_id seq, uint32_t layer, uint32_t n_tokens, const void* k, const void* v, dtype src_dtype);
  status read_layer(const layer_table& t, uint32_t begin, uint32_t end, std::vector<std::byte>& k,
                    std::vector<std::byte>& v);
  status rebuild_layer(seq_id seq, uint32_t layer, const layer_table& t, uint32_t begin, uint32_t end,
                       layer_table& rebuilt);

  backend_config config_;
  std::unique_ptr<backend> backend_;
  // With cache_options::sparf; declared after backend_ so it is destroyed first (it releases the
  // column chunks it stored on the backend).
  std::unique_ptr<sparse_attender> attender_;
  // Held by every call; a shared slice run (slice_gate) holds it from the slice that starts the
  // run to the one that ends it, which may be another thread.
  mutable handoff_mutex mutex_;
  std::unique_ptr<slice_gate> slices_;
  std::unordered_map<seq_id, sequence> sequences_;
  seq_id next_seq_ = 1;
  std::vector<uint32_t> refcount_;  // per chunk id
  std::vector<uint8_t> sealed_;     // per chunk id: was ever full
  std::vector<std::byte> convert_buffer_;
  std::vector<float> q_copy_;         // attend's q when the caller's out or lse overlap it, grow-only
  attend_batch_builder batch_;        // the CSR workspace of attend calls, grow-only
  std::vector<uint32_t> row_indptr_;  // attend_chunk: query rows per sequence, CSR
  std::vector<uint32_t> row_pos_;     // attend_chunk: first position per sequence
  status attend_chunk_locked(uint32_t layer, std::span<const seq_id> seqs, std::span<const uint32_t> positions,
                             std::span<const uint32_t> n_rows, const float* q, float* out, float* lse);
  result<uint64_t> check_chunk_call_locked(uint32_t layer, std::span<const seq_id> seqs,
                                           std::span<const uint32_t> positions, std::span<const uint32_t> n_rows);
  status check_attend_call_locked(uint32_t layer, std::span<const seq_id> seqs);
  result<attend_batch> chunk_batch_locked(uint32_t layer, std::span<const seq_id> seqs,
                                          std::span<const uint32_t> positions, std::span<const uint32_t> n_rows,
                                          const float* q, float* out, float* lse);
  // n_rows: the query (and output) rows of the whole call, read for checksums once validated.
  status shared_slice(const slice_call& call, uint32_t ith, const std::function<status()>& begin_locked,
                      uint64_t n_rows, const float* q, const float* out, const float* lse);
  sparf_counters sparf_totals_{};
  persistent_store* store_ = nullptr;           // the backend's persistence, when it persists
  std::unordered_map<uint64_t, seq_id> names_;  // name -> sequence
  std::vector<uint64_t> damaged_names_;         // records the open found damaged
};

}  // namespace instinfer
