// handoff_mutex: a lock that one thread may take and another release.
#pragma once

#include <condition_variable>
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
  }
  bool try_lock() {
    std::lock_guard l(m_);
    if (held_) return false;
    held_ = true;
    return true;
  }
  void unlock() {
    {
      std::lock_guard l(m_);
      held_ = false;
    }
    cv_.notify_one();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool held_ = false;
};

}  // namespace instinfer
