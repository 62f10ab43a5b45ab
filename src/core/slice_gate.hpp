// The slices of one attention call (kv_cache::attend_slice / attend_chunk_slice, an engine's
// ith/nth) run as one shared run on the callers' threads: the first slice to arrive locks the
// cache and plans the whole call for nth workers, the others join and take work items from the
// same plan (so one sequence's tokens spread over every thread), and the last one out ends the
// run and unlocks the cache. Nobody waits for a slice that has not arrived.
//
// A slice that comes after its call's run ended (a thread descheduled past the whole run, or
// slices called one after another) returns at once only if its outputs are provably as the run
// left them: same arguments (layer, q, out, lse, nth, batch size, kind, a checksum of the
// sequence / position / row arrays), nobody took the cache's lock since the run released it, and
// the checksums of its query and output rows equal the ones taken as the run ended. Otherwise (the
// caller refilled its buffers, the cache changed) it runs the call again, so calling only some
// slices, in any order, still writes every output. The one case this cannot tell apart: a caller
// that calls only some slices of an in-place call (q is out), then some of the next in-place call
// with nothing else changed, gets the first call's output again; call every slice of a call.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "instinfer/core/handoff_mutex.hpp"
#include "instinfer/core/status.hpp"

namespace instinfer {

struct slice_call {
  uint32_t layer = 0;
  const void* q = nullptr;
  const void* out = nullptr;
  const void* lse = nullptr;
  uint32_t nth = 0;
  size_t n_seq = 0;
  bool causal = false;
  uint32_t args_crc = 0;  // of the seqs / positions / n_rows arrays
  bool operator==(const slice_call&) const = default;
};

class slice_gate {
 public:
  explicit slice_gate(handoff_mutex& cache_lock) noexcept : lock_(cache_lock) {}

  // Slice ith of `call`. begin(): with the cache's lock held, check the arguments and plan the
  // shared run (a failure is returned to this slice and to late slices of the same call while the
  // cache is unchanged); work(ith): take items until none are left; end(): the run's outcome,
  // before the lock is released; query_crc() / output_crc(): checksums of this call's query and
  // output rows (called only for arguments a run accepted). The slice that ends the run returns
  // its outcome; others return success for their share (a run that began cannot fail on the host).
  template <class Begin, class Work, class End, class QueryCrc, class OutputCrc>
  status enter(const slice_call& call, uint32_t ith, Begin&& begin, Work&& work, End&& end, QueryCrc&& query_crc,
               OutputCrc&& output_crc) {
    std::unique_lock l(m_);
    for (;;) {
      const bool mine = phase_ != phase::kIdle && call_ == call && !seen_[ith];
      if (mine && phase_ == phase::kRunning) {
        mark(ith);
        ++inside_;
        l.unlock();
        work(ith);
        l.lock();
        return leave(end, query_crc, output_crc);
      }
      if (mine && phase_ == phase::kDone && lock_.acquisitions() == generation_ &&
          (!outcome_.ok() || (query_crc() == q_crc_ && output_crc() == out_crc_))) {
        mark(ith);
        status s = outcome_;
        forget_if_complete();
        return s;
      }
      if (phase_ == phase::kStarting || phase_ == phase::kRunning) {  // another call, or not begun yet
        cv_.wait(l);
        continue;
      }
      // Idle, or a finished call this slice cannot count as done: it starts a new one.
      phase_ = phase::kStarting;
      call_ = call;
      try {
        seen_.assign(call.nth, 0);
      } catch (...) {
        phase_ = phase::kIdle;
        cv_.notify_all();
        return {errc::kOutOfMemory, "attention slices"};
      }
      n_seen_ = 0;
      mark(ith);
      l.unlock();
      lock_.lock();
      status s = begin();
      if (!s.ok()) {
        generation_ = lock_.acquisitions();
        lock_.unlock();
      }
      l.lock();
      if (!s.ok()) {
        phase_ = phase::kDone;
        outcome_ = s;
        forget_if_complete();
        cv_.notify_all();
        return s;
      }
      phase_ = phase::kRunning;
      inside_ = 1;
      cv_.notify_all();
      l.unlock();
      work(ith);
      l.lock();
      return leave(end, query_crc, output_crc);
    }
  }

 private:
  enum class phase : uint8_t { kIdle, kStarting, kRunning, kDone };

  void mark(uint32_t ith) noexcept {
    seen_[ith] = 1;
    ++n_seen_;
  }
  // Every slice of the remembered call has come: nothing can join it any more.
  void forget_if_complete() noexcept {
    if (n_seen_ == call_.nth) phase_ = phase::kIdle;
  }
  template <class End, class QueryCrc, class OutputCrc>
  status leave(End& end, QueryCrc& query_crc, OutputCrc& output_crc) {
    if (--inside_ != 0) return {};
    outcome_ = end();
    q_crc_ = outcome_.ok() ? query_crc() : 0;  // after the run: q may be out (in-place attention)
    out_crc_ = outcome_.ok() ? output_crc() : 0;
    generation_ = lock_.acquisitions();
    lock_.unlock();
    phase_ = phase::kDone;
    status s = outcome_;
    forget_if_complete();
    cv_.notify_all();
    return s;
  }

  handoff_mutex& lock_;  // the cache's
  std::mutex m_;
  std::condition_variable cv_;
  phase phase_ = phase::kIdle;
  slice_call call_{};
  std::vector<uint8_t> seen_;  // [nth]: slices of call_ that arrived
  uint32_t n_seen_ = 0;
  uint32_t inside_ = 0;      // slices working in the run now
  uint64_t generation_ = 0;  // the cache lock's acquisitions when the last run released it
  uint32_t q_crc_ = 0;       // the last run's query rows, as it left them
  uint32_t out_crc_ = 0;     // its output rows (and lse), as it left them
  status outcome_;
};

}  // namespace instinfer
