// The slices of one attention call (kv_cache::attend_slice / attend_chunk_slice, an engine's
// ith/nth) run as one shared run on the callers' threads: the first slice to arrive locks the
// cache and plans the whole call for nth workers, the others join and take work items from the
// same plan (so one sequence's tokens spread over every thread), and the last one out ends the
// run and unlocks the cache. Nobody waits for a slice that has not arrived. A slice that comes
// after its call's run ended cannot know whether the outputs are still as the run left them, so
// it runs the call again (alone, or with later arrivals): correct whatever the caller did in
// between, at the price of repeated work for a thread that was descheduled past a whole run.
// Calling the slices one after another from one thread, or only some of them, therefore writes
// every output too.
//
// A call is known by its arguments (layer, q, out, lse, nth, batch size, kind, and a checksum of
// the sequence, position and row arrays); a slice joins only a running call with its arguments
// whose slice ith has not come yet.
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
  // shared run (a failure is this slice's result; slices waiting to join retry and get their
  // own); work(ith): take items until none are left; end(): the run's outcome, before the lock is
  // released. The slice that ends the run returns that outcome; others return success for their
  // share (a run that began cannot fail on the host).
  template <class Begin, class Work, class End>
  status enter(const slice_call& call, uint32_t ith, Begin&& begin, Work&& work, End&& end) {
    std::unique_lock l(m_);
    for (;;) {
      if (phase_ == phase::kRunning && call_ == call && !seen_[ith]) {
        seen_[ith] = 1;
        ++inside_;
        l.unlock();
        work(ith);
        l.lock();
        return leave(end);
      }
      if (phase_ != phase::kIdle) {  // another call, or this one not begun yet
        cv_.wait(l);
        continue;
      }
      phase_ = phase::kStarting;
      call_ = call;
      try {
        seen_.assign(call.nth, 0);
      } catch (...) {
        phase_ = phase::kIdle;
        cv_.notify_all();
        return {errc::kOutOfMemory, "attention slices"};
      }
      seen_[ith] = 1;
      l.unlock();
      lock_.lock();
      status s = begin();
      if (!s.ok()) lock_.unlock();
      l.lock();
      if (!s.ok()) {
        phase_ = phase::kIdle;
        cv_.notify_all();
        return s;
      }
      phase_ = phase::kRunning;
      inside_ = 1;
      cv_.notify_all();
      l.unlock();
      work(ith);
      l.lock();
      return leave(end);
    }
  }

 private:
  enum class phase : uint8_t { kIdle, kStarting, kRunning };

  template <class End>
  status leave(End& end) {
    if (--inside_ != 0) return {};
    status s = end();
    lock_.unlock();
    phase_ = phase::kIdle;
    cv_.notify_all();
    return s;
  }

  handoff_mutex& lock_;  // the cache's
  std::mutex m_;
  std::condition_variable cv_;
  phase phase_ = phase::kIdle;
  slice_call call_{};
  std::vector<uint8_t> seen_;  // [nth]: slices of the running call that joined
  uint32_t inside_ = 0;        // slices working in the run now
};

}  // namespace instinfer
