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
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "instinfer/attention/sparf/params.hpp"  // sparf_params, sparf_counters: plain values, no algorithm
#include "instinfer/backend/backend.hpp"
#include "instinfer/kv/page_table.hpp"

namespace instinfer {

class sparse_attender;  // src/sparf: the sparse policy beside the page tables

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
};

struct cache_stats {
  uint64_t n_sequences = 0;
  uint64_t chunk_bytes = 0;
  uint64_t shared_chunks = 0;  // chunks referenced by more than one sequence
  backend_stats backend{};
  sparf_counters sparf{};           // pages and bytes read by attend_sparse, beside the dense equivalent
  uint64_t sparf_column_bytes = 0;  // channel-indexed K copy held in host memory: all of it on the
                                    // host backend; tail blocks only where sealed blocks are on the
                                    // device (ssd); 0 where the backend runs SparF (csd: drive stats)
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
  status attend(uint32_t layer, std::span<const seq_id> seqs, const float* q, float* out, float* lse);

  // SparF sparse decode attention (attention/sparf.hpp) of one layer; shapes as in attend. Needs
  // cache_options::sparf. Runs in the sparse attender (src/sparf): dual-step loading reads only
  // the K and V pages holding selected tokens: in place where the backend's chunks are
  // host-addressable (host), as single pages through read_pages (ssd) or whole chunks through
  // read_chunk otherwise; a backend that runs SparF itself (csd: next to its flash, from its own
  // channel-indexed K copy) gets the call instead.
  status attend_sparse(uint32_t layer, std::span<const seq_id> seqs, const float* q, float* out, float* lse,
                       const sparf_params& params = {});

  // Hint that `layer` of these sequences is attended next (storage backends start reads early).
  void prefetch(uint32_t layer, std::span<const seq_id> seqs);

  // The page tables of one layer for a batch, in CSR form (FlashInfer's paged_kv indptr/indices/last_page_len).
  status page_table(uint32_t layer, std::span<const seq_id> seqs, csr_page_table& out) const;
  // Copy out the stored (cache dtype) K and V of one layer: [n_tokens][n_kv_heads][head_dim] each.
  status read_tokens(seq_id seq, uint32_t layer, std::vector<std::byte>& k, std::vector<std::byte>& v);

  status flush();
  cache_stats stats() const;

 private:
  struct layer_table {
    std::vector<chunk_id> chunks;
    uint32_t n_tokens = 0;
  };
  struct sequence {
    std::vector<layer_table> layers;
  };

  kv_cache(backend_config config, std::unique_ptr<backend> b);
  status check_layer(uint32_t layer) const;
  result<sequence*> find(seq_id seq);
  result<const sequence*> find(seq_id seq) const;
  status track(chunk_id id);  // make room for a chunk id handed out by the backend
  void retain(chunk_id id) noexcept;
  void release(chunk_id id) noexcept;
  bool writable(chunk_id id) const noexcept;
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
  status read_layer(const layer_table& t, uint32_t begin, uint32_t end, std::vector<std::byte>& k,
                    std::vector<std::byte>& v);
  status rebuild_layer(seq_id seq, uint32_t layer, const layer_table& t, uint32_t begin, uint32_t end,
                       layer_table& rebuilt);

  backend_config config_;
  std::unique_ptr<backend> backend_;
  // With cache_options::sparf; declared after backend_ so it is destroyed first (it releases the
  // column chunks it stored on the backend).
  std::unique_ptr<sparse_attender> attender_;
  mutable std::mutex mutex_;
  std::unordered_map<seq_id, sequence> sequences_;
  seq_id next_seq_ = 1;
  std::vector<uint32_t> refcount_;  // per chunk id
  std::vector<uint8_t> sealed_;     // per chunk id: was ever full
  std::vector<std::byte> convert_buffer_;
  attend_batch_builder batch_;  // the CSR workspace of attend calls, grow-only
  sparf_counters sparf_totals_{};
};

}  // namespace instinfer
