// A small fixed pool: run(n_tasks, fn) calls fn(i) for every i in [0, n_tasks) on the pool's
// threads and the caller, and returns when all are done. Workers sleep on a condition variable
// between calls (the machines are shared: no spinning).
//
// The caller never waits for a worker that has not started: tasks are claimed from a counter
// tagged with the call's generation, so on a loaded machine a late worker simply finds nothing
// left, and the caller waits only for tasks that are actually running.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace instinfer::model {

class thread_pool {
 public:
  explicit thread_pool(uint32_t n_threads) {
    if (n_threads == 0) n_threads = std::max(1u, std::thread::hardware_concurrency());
    for (uint32_t i = 1; i < n_threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~thread_pool() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  uint32_t size() const noexcept { return static_cast<uint32_t>(workers_.size()) + 1; }

  void run(uint32_t n_tasks, const std::function<void(uint32_t)>& fn) {
    if (n_tasks == 0) return;
    if (workers_.empty() || n_tasks == 1) {
      for (uint32_t i = 0; i < n_tasks; ++i) fn(i);
      return;
    }
    uint32_t gen;
    {
      std::lock_guard lock(mutex_);
      gen = ++generation_;
      fn_ = &fn;
      n_tasks_ = n_tasks;
      finished_ = 0;
      next_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_release);
    }
    wake_.notify_all();
    work(gen, fn, n_tasks);
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return finished_ == n_tasks; });
    fn_ = nullptr;
  }

 private:
  // Claim the next task of generation `gen`; false once that generation has none left.
  bool claim(uint32_t gen, uint32_t n, uint32_t& index) noexcept {
    uint64_t v = next_.load(std::memory_order_acquire);
    for (;;) {
      if (static_cast<uint32_t>(v >> 32) != gen || static_cast<uint32_t>(v) >= n) return false;
      if (next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) {
        index = static_cast<uint32_t>(v);
        return true;
      }
    }
  }
  void work(uint32_t gen, const std::function<void(uint32_t)>& fn, uint32_t n) {
    uint32_t done = 0;
    for (uint32_t i; claim(gen, n, i);) {
      fn(i);
      ++done;
    }
    if (done) {
      std::lock_guard lock(mutex_);
      finished_ += done;
      if (finished_ == n) done_.notify_one();
    }
  }
  void loop() {
    uint32_t seen = 0;
    for (;;) {
      const std::function<void(uint32_t)>* fn = nullptr;
      uint32_t n = 0, gen = 0;
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || (generation_ != seen && fn_ != nullptr); });
        if (stop_) return;
        seen = gen = generation_;
        fn = fn_;
        n = n_tasks_;
      }
      work(gen, *fn, n);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(uint32_t)>* fn_ = nullptr;
  uint32_t n_tasks_ = 0;
  uint32_t finished_ = 0;
  uint32_t generation_ = 0;
  bool stop_ = false;
  std::atomic<uint64_t> next_{0};
};

}  // namespace instinfer::model
