// The generator's task pool: run(n_tasks, fn) calls fn(i) for every i in [0, n_tasks) on the
// library's fork-join pool (include/instinfer/core/thread_pool.hpp) and the caller, and returns
// when all are done. Tasks are claimed from a counter, so a worker that wakes late finds nothing
// left and the caller never waits for it (the machines are shared).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>

#include "instinfer/core/thread_pool.hpp"

namespace instinfer::model {

class thread_pool {
 public:
  // n_threads == 0: hardware concurrency.
  explicit thread_pool(uint32_t n_threads)
      : pool_(n_threads ? n_threads : std::max(1u, std::thread::hardware_concurrency())) {}

  uint32_t size() const noexcept { return pool_.size(); }

  void run(uint32_t n_tasks, const std::function<void(uint32_t)>& fn) {
    if (n_tasks == 0) return;
    if (size() == 1 || n_tasks == 1) {
      for (uint32_t i = 0; i < n_tasks; ++i) fn(i);
      return;
    }
    std::atomic<uint32_t> next{0};
    auto body = [&](uint32_t) noexcept {
      for (uint32_t i = next.fetch_add(1, std::memory_order_relaxed); i < n_tasks;
           i = next.fetch_add(1, std::memory_order_relaxed))
        fn(i);
    };
    pool_.run(body);
  }

 private:
  instinfer::thread_pool pool_;
};

}  // namespace instinfer::model
