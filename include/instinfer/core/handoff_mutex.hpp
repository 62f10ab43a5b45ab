// handoff_mutex: a lock that one thread may take and another release.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace instinfer {

// A mutex that one thread may lock and another unlock: the cache's lock passes from the slice
// that starts a shared run to the slice that ends it (std::mutex forbids that).
class handoff_mutex {
 public:
  void lock() {
    std::unique_lock l(m_);
    cv_.wait(l, [&] { return !held_; });
    held_ = true;
    acquisitions_.fetch_add(1, std::memory_order_relaxed);
  }
  bool try_lock() {
    std::lock_guard l(m_);
    if (held_) return false;
    held_ = true;
    acquisitions_.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  void unlock() {
    {
      std::lock_guard l(m_);
      held_ = false;
    }
    cv_.notify_one();
  }
  // How many times it was taken: equal readings mean nobody held it in between.
  uint64_t acquisitions() const noexcept { return acquisitions_.load(std::memory_order_relaxed); }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool held_ = false;
  std::atomic<uint64_t> acquisitions_{0};
};

}  // namespace instinfer
