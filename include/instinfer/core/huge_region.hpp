// A growable anonymous memory region on 2 MiB boundaries, advised for transparent huge pages.
//
// Why: SparF's approximate scores read a few scattered 4 KiB column pages of every column block
// (kv/channel_index.hpp); on small pages each one costs a TLB miss and a page walk, and the CPU's
// prefetchers stop at every 4 KiB boundary. Growth moves the existing pages into a larger
// aligned reservation with mremap (no copy, huge pages stay whole), so the region's address may
// change on grow and on nothing else. Untouched memory is never committed: capacity is reserved
// address space until it is written.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <utility>

namespace instinfer {

class huge_region {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;

  huge_region() = default;
  huge_region(const huge_region&) = delete;
  huge_region& operator=(const huge_region&) = delete;
  huge_region(huge_region&& o) noexcept
      : base_(std::exchange(o.base_, nullptr)), capacity_(std::exchange(o.capacity_, 0)) {}
  huge_region& operator=(huge_region&& o) noexcept {
    if (this != &o) {
      release();
      base_ = std::exchange(o.base_, nullptr);
      capacity_ = std::exchange(o.capacity_, 0);
    }
    return *this;
  }
  ~huge_region() { release(); }

  std::byte* data() const noexcept { return base_; }
  size_t capacity() const noexcept { return capacity_; }

  // Makes room for at least `bytes` (rounded up to whole huge pages), keeping the contents; false
  // (region unchanged) when the address space cannot be had. May move the region.
  bool reserve(size_t bytes) noexcept {
    if (bytes <= capacity_) return true;
    size_t want = capacity_ ? capacity_ : kHugePage;
    while (want < bytes) {
      if (want > (SIZE_MAX >> 2)) return false;
      want *= 2;  // geometric: appends one token at a time grow it log(n) times
    }
    std::byte* fresh = map_aligned(want);
    if (fresh == nullptr) return false;
    if (base_ != nullptr && ::mremap(base_, capacity_, capacity_, MREMAP_MAYMOVE | MREMAP_FIXED, fresh) == MAP_FAILED) {
      ::munmap(fresh, want);
      return false;
    }
    base_ = fresh;  // the old range was unmapped by the move
    capacity_ = want;
    return true;
  }

  // Returns [offset, offset + bytes)'s whole OS pages to the system; they read as zeros after.
  void discard(size_t offset, size_t bytes) noexcept {
    if (base_ == nullptr || offset >= capacity_) return;
    if (bytes > capacity_ - offset) bytes = capacity_ - offset;
    const auto page = static_cast<size_t>(os_page());
    const size_t first = (offset + page - 1) / page * page;
    const size_t end = (offset + bytes) / page * page;
    if (end > first) ::madvise(base_ + first, end - first, MADV_DONTNEED);
  }

 private:
  static long os_page() noexcept {
    static const long page = [] {
      const long p = ::sysconf(_SC_PAGESIZE);
      return p > 0 ? p : 4096L;
    }();
    return page;
  }

  // `bytes` (a multiple of kHugePage) of fresh zero memory starting on a kHugePage boundary.
  static std::byte* map_aligned(size_t bytes) noexcept {
    void* raw =
        ::mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    auto* start = static_cast<std::byte*>(raw);
    const uintptr_t at = reinterpret_cast<uintptr_t>(start);
    auto* aligned = start + ((kHugePage - at % kHugePage) % kHugePage);
    if (aligned > start) ::munmap(start, static_cast<size_t>(aligned - start));
    const size_t tail = static_cast<size_t>((start + bytes + kHugePage) - (aligned + bytes));
    if (tail) ::munmap(aligned + bytes, tail);
    ::madvise(aligned, bytes, MADV_HUGEPAGE);  // advice only: small pages still work without it
    return aligned;
  }

  void release() noexcept {
    if (base_ != nullptr) ::munmap(base_, capacity_);
    base_ = nullptr;
    capacity_ = 0;
  }

  std::byte* base_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace instinfer
