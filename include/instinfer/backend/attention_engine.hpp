// The compute half of a backend: where decode attention runs.
//
// An attention_engine answers attention for a batch of sequences of one layer, handed over as an
// attend_batch (a CSR page-table view plus q / out / lse rows). Host and SSD run the library's one
// decode driver (attention/decode_driver.hpp) on host threads over chunks in memory or streamed
// from storage; the CSD sends the batch to its drives, which run the same driver on their cores;
// CUDA uploads the view and runs its kernel.
#pragma once

#include <cstdint>

#include "instinfer/backend/attend_batch.hpp"
#include "instinfer/core/status.hpp"

namespace instinfer {

struct sparf_params;
struct sparf_counters;

class attention_engine {
 public:
  virtual ~attention_engine() = default;

  // Decode attention of one layer. For every sequence b: out[b] = softmax(q[b] K^T * scale) V over
  // its tokens, lse[b] (if non-null) the natural-log sum of exponentials; no tokens: zeros, -inf.
  virtual status attend(uint32_t layer, const attend_batch& batch) noexcept = 0;

  // Causal chunk attention of one layer (prefill; optional): `batch` carries row_indptr / row_pos,
  // so batch[b] has n_rows query rows at positions first_pos .. first_pos + n_rows - 1, each
  // seeing tokens [0, its position]. Checked by the caller: first_pos + n_rows <= n_tokens.
  // Engines that run the decode driver (host, ssd on host threads; csd in the drive) answer it.
  virtual status attend_causal(uint32_t /*layer*/, const attend_batch& /*batch*/) noexcept {
    return {errc::kUnsupported, "this backend does not run causal chunk attention (supported: host, ssd, csd)"};
  }
  // Whether attend_causal is answered (engines tell callers up front, before they append a chunk).
  virtual bool runs_causal() const noexcept { return false; }

  // Attention on the caller's threads (optional; kv_cache's attend_slice / attend_chunk_slice):
  // shared_begin plans a dense or causal batch for n_workers (its arrays stay alive until the run
  // ends), then up to n_workers threads call shared_work with distinct indices, taking work items
  // dynamically; once every thread that joined has returned the outputs are complete and
  // shared_end gives the outcome. The caller runs nothing else on the engine meanwhile. Engines
  // that cannot (one I/O thread, a drive) return false and the caller splits by sequence instead.
  virtual bool runs_shared() const noexcept { return false; }
  virtual status shared_begin(uint32_t /*layer*/, const attend_batch& /*batch*/, uint32_t /*n_workers*/) noexcept {
    return {errc::kUnsupported, "this backend does not run attention on the caller's threads"};
  }
  virtual void shared_work(uint32_t /*worker*/) noexcept {}
  virtual status shared_end() noexcept { return {}; }

  // Sparse attention next to the data (optional). An engine that returns true keeps the
  // channel-indexed K copy and the V running means itself (from write_tokens, through forks and
  // truncations) and answers attend_sparse; otherwise the manager's host-side sparse attender
  // (src/sparf) runs the policy, reading pages through the kv_store.
  virtual bool runs_sparf() const noexcept { return false; }
  // The same for the page-summary policy (sparf_params::policy = kPageSummary): the engine keeps
  // the page summaries itself.
  virtual bool runs_page_summaries() const noexcept { return false; }
  // Sparse decode attention of one layer with params.policy (attention/sparf/; same inputs and
  // outputs as attend). params are validated by the caller; counters (optional) receive what the
  // algorithm read.
  virtual status attend_sparse(uint32_t /*layer*/, const attend_batch& /*batch*/, const sparf_params& /*params*/,
                               sparf_counters* /*counters*/) noexcept {
    return {errc::kUnsupported, "this backend does not run SparF itself"};
  }
};

}  // namespace instinfer
