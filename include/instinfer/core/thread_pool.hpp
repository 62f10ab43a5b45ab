// A small persistent fork-join pool for the host kernels.
//
// `run(fn)` calls fn(0) on the calling thread and fn(i) on each worker i that wakes up before the
// caller's own fn(0) returns, then waits only for the workers that joined. Work must therefore be
// shared dynamically (e.g. an atomic item counter), never assigned to a fixed index: on a busy
// machine a sleeping worker then costs nothing, instead of a scheduler time slice per run.
// Between runs workers spin for a short while (kSpin) and then sleep on an atomic (futex): a model
// forward issues ~150 runs per token a few microseconds apart, and a futex wake-up per run costs
// more than the work of a small one; the bounded spin keeps an idle pool off a shared machine's
// cores. The caller spins the same way before sleeping on the workers. A run allocates nothing.
// One run at a time: concurrent callers queue on a mutex, so one pool can serve several
// components (a cache's dense decode and its sparse attenders share one: a worker woken for one
// call is still spinning when the next comes; on a VM a futex wake-up took about 1 ms). A run's
// body must not start another run of the same pool.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
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
    std::lock_guard<std::mutex> lock(run_mutex_);  // lock() does not throw on a valid mutex in practice
    call_ = [](void* ctx, uint32_t index) noexcept { (*static_cast<F*>(ctx))(index); };
    ctx_ = &fn;
    const uint64_t run_id = generation_.load(std::memory_order_relaxed) + 1;  // only this thread writes it
    state_.store(run_id << 32, std::memory_order_release);  // open, nobody inside; publishes call_, ctx_
    generation_.store(run_id, std::memory_order_release);
    generation_.notify_all();
    fn(0u);
    // Close the run and learn, in the same atomic step, how many workers joined it; wait for them.
    uint64_t st = state_.fetch_or(kClosed, std::memory_order_acq_rel) | kClosed;
    if ((st & kCount) != 0) spin_while([&] { return (state_.load(std::memory_order_acquire) & kCount) != 0; });
    st = state_.load(std::memory_order_acquire);
    while ((st & kCount) != 0) {
      state_.wait(st, std::memory_order_acquire);
      st = state_.load(std::memory_order_acquire);
    }
  }

 private:
  // state_ = [run id : 32][closed : 1][workers inside : 31]. One word, so joining checks the run
  // and its openness and counts in one compare-exchange, and closing reads the count in the same
  // step: no ordering between separate flags is relied on (such a pair raced under qemu-user), and
  // a worker joins each run at most once (it joins only the run whose generation woke it).
  static constexpr uint64_t kClosed = uint64_t{1} << 31;
  static constexpr uint64_t kCount = kClosed - 1;
  // How long a thread polls before it sleeps; a few runs' gap in a model forward.
  static constexpr std::chrono::nanoseconds kSpin{50'000};

  static void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
  // Poll busy() for at most kSpin; the clock is read every 64 polls only.
  template <class Busy>
  static void spin_while(Busy busy) noexcept {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (uint32_t i = 1; busy(); ++i) {
      cpu_relax();
      if (i % 64 == 0 && std::chrono::steady_clock::now() >= until) return;
    }
  }

  void worker_loop(uint32_t index) noexcept {
    uint64_t seen = 0;
    for (;;) {
      spin_while([&] { return generation_.load(std::memory_order_acquire) == seen; });
      generation_.wait(seen, std::memory_order_acquire);
      seen = generation_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      uint64_t st = state_.load(std::memory_order_relaxed);
      const auto joinable = [&](uint64_t v) { return (v >> 32) == (seen & 0xffffffffu) && (v & kClosed) == 0; };
      while (joinable(st) &&
             !state_.compare_exchange_weak(st, st + 1, std::memory_order_acquire, std::memory_order_relaxed)) {
      }
      if (!joinable(st)) continue;  // too late for that run
      call_(ctx_, index);
      if ((state_.fetch_sub(1, std::memory_order_release) & (kClosed | kCount)) == (kClosed | 1)) state_.notify_all();
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
  std::atomic<uint64_t> state_{kClosed};
  std::atomic<bool> stop_{false};
  std::mutex run_mutex_;  // one run at a time across callers
  void (*call_)(void*, uint32_t) noexcept = nullptr;
  void* ctx_ = nullptr;
};

}  // namespace instinfer
