// A small persistent fork-join pool for the host kernels.
//
// `run(fn)` calls fn(0) on the calling thread and fn(i) on each worker i that wakes up before the
// caller's own fn(0) returns, then waits only for the workers that joined. Work must therefore be
// shared dynamically (e.g. an atomic item counter), never assigned to a fixed index: on a busy
// machine a sleeping worker then costs nothing, instead of a scheduler time slice per run.
// Workers sleep on an atomic (futex) between runs; a run allocates nothing. One run at a time:
// callers serialise (host_decoder holds a mutex).
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace instinfer {

class thread_pool {
 public:
  // n_threads >= 1 threads in total, n_threads - 1 of them started here. Throws std::system_error
  // when a thread cannot be started (callers convert that into a status).
  explicit thread_pool(uint32_t n_threads) {
    if (n_threads == 0) n_threads = 1;
    workers_.reserve(n_threads - 1);
    try {
      for (uint32_t i = 1; i < n_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
    } catch (...) {
      shutdown();
      throw;
    }
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() { shutdown(); }

  uint32_t size() const noexcept { return static_cast<uint32_t>(workers_.size()) + 1; }

  template <class F>
  void run(F& fn) noexcept {
    if (workers_.empty()) {
      fn(0u);
      return;
    }
    call_ = [](void* ctx, uint32_t index) noexcept { (*static_cast<F*>(ctx))(index); };
    ctx_ = &fn;
    closed_.store(false);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    fn(0u);
    // Close the run, then wait for the workers that joined it. seq_cst on closed_/active_: either
    // a late worker sees the run closed, or this thread sees it active.
    closed_.store(true);
    for (uint32_t a = active_.load(); a != 0; a = active_.load()) active_.wait(a);
  }

 private:
  void worker_loop(uint32_t index) noexcept {
    uint64_t seen = 0;
    for (;;) {
      generation_.wait(seen, std::memory_order_acquire);
      seen = generation_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      active_.fetch_add(1);
      if (!closed_.load()) call_(ctx_, index);
      if (active_.fetch_sub(1) == 1) active_.notify_all();
    }
  }

  void shutdown() noexcept {
    stop_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    for (auto& t : workers_)
      if (t.joinable()) t.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint32_t> active_{0};  // workers inside the current run
  std::atomic<bool> closed_{true};
  std::atomic<bool> stop_{false};
  void (*call_)(void*, uint32_t) noexcept = nullptr;
  void* ctx_ = nullptr;
};

}  // namespace instinfer
