// A test backend that forwards every call to a real backend, and can
//  * fail calls: the nth call of some kinds from now on (fail_nth), or any call a hook refuses;
//  * count calls per kind;
//  * forward persistence() (a wrapped persistent store still commits and recovers);
//  * hide capabilities (host_view, read_pages, runs_sparf), so a
//    host-memory backend looks like an opaque storage backend to the manager.
// Used by the failure-atomicity tests of kv_cache and by the conformance suite (tests/backend/).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "instinfer/attention/sparf.hpp"
#include "instinfer/backend/backend.hpp"

namespace test_support {

using namespace instinfer;

// The backend calls that can fail or be counted.
enum class call : uint8_t {
  kAllocate = 0,
  kWrite = 1,
  kCopy = 2,
  kReadChunk = 3,
  kReadPages = 4,
  kAttend = 5,
  kAttendSparse = 6,
  kFlush = 7,
};
inline constexpr size_t kCallKinds = 8;

constexpr uint32_t call_bit(call c) noexcept {
  return 1u << static_cast<uint32_t>(c);
}
// A set of call kinds: call_mask(call::kWrite, call::kCopy).
template <class... C>
constexpr uint32_t call_mask(C... c) noexcept {
  return (call_bit(c) | ... | 0u);
}

constexpr const char* call_name(call c) noexcept {
  switch (c) {
    case call::kAllocate: return "allocate_chunk";
    case call::kWrite: return "write_tokens";
    case call::kCopy: return "copy_tokens";
    case call::kReadChunk: return "read_chunk";
    case call::kReadPages: return "read_pages";
    case call::kAttend: return "attend";
    case call::kAttendSparse: return "attend_sparse";
    case call::kFlush: return "flush";
  }
  return "?";
}

// Capabilities of the wrapped backend that the wrapper does not show.
struct hidden_capabilities {
  bool host_view = false;   // host_view() -> empty: chunks are not host-resident
  bool read_pages = false;  // read_pages() -> kUnsupported (the manager falls back to read_chunk)
  bool runs_sparf = false;  // runs_sparf() -> false (the manager runs SparF on the host)
};

class forwarding_backend final : public backend {
 public:
  // Called before a call is forwarded (hint: the chunk hint of writes, copies and allocations,
  // else null); a failed status is returned instead of forwarding.
  using hook = std::function<status(call, const chunk_hint*)>;

  explicit forwarding_backend(std::unique_ptr<backend> inner, hidden_capabilities hidden = {},
                              std::string name = "forwarding")
      : inner_(std::move(inner)), hidden_(hidden), name_(std::move(name)) {}

  backend& inner() noexcept { return *inner_; }
  const backend& inner() const noexcept { return *inner_; }

  // The nth call (1-based, counted from now) whose kind is in `kinds` (a call_mask) fails with
  // `code`; later calls pass again. nth = 0 disarms.
  void fail_nth(uint32_t kinds, uint64_t nth, errc code = errc::kIoError) noexcept {
    fail_kinds_ = kinds;
    fail_left_ = nth;
    fail_code_ = code;
  }
  void disarm() noexcept { fail_left_ = 0; }
  // Every call is also offered to `h` (replaces any earlier hook; empty: none).
  void set_hook(hook h) { hook_ = std::move(h); }
  void hide(hidden_capabilities hidden) noexcept { hidden_ = hidden; }

  uint64_t calls(call c) const noexcept { return calls_[static_cast<size_t>(c)]; }
  uint64_t failures() const noexcept { return failures_; }  // calls failed by fail_nth or the hook

  std::string_view name() const noexcept override { return name_; }
  uint32_t preferred_page_bytes() const noexcept override { return inner_->preferred_page_bytes(); }
  status configure(const backend_config& config) override { return inner_->configure(config); }
  uint64_t capacity_chunks() const noexcept override { return inner_->capacity_chunks(); }
  uint64_t free_chunks() const noexcept override { return inner_->free_chunks(); }

  result<chunk_id> allocate_chunk(const chunk_hint& hint) noexcept override {
    if (status s = enter(call::kAllocate, &hint); !s.ok()) return s;
    return inner_->allocate_chunk(hint);
  }
  void release_chunk(chunk_id id) noexcept override { inner_->release_chunk(id); }
  status write_tokens(chunk_id id, const chunk_hint& hint, uint32_t first, uint32_t n, const std::byte* k,
                      const std::byte* v) noexcept override {
    INSTINFER_TRY(enter(call::kWrite, &hint));
    return inner_->write_tokens(id, hint, first, n, k, v);
  }
  bool writes_whole_chunks() const noexcept override { return inner_->writes_whole_chunks(); }
  status write_chunk(chunk_id id, const chunk_hint& hint, const std::byte* chunk) noexcept override {
    INSTINFER_TRY(enter(call::kWrite, &hint));
    return inner_->write_chunk(id, hint, chunk);
  }
  status copy_tokens(chunk_id dst, const chunk_hint& dst_hint, chunk_id src, uint32_t n) noexcept override {
    INSTINFER_TRY(enter(call::kCopy, &dst_hint));
    return inner_->copy_tokens(dst, dst_hint, src, n);
  }
  status read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept override {
    INSTINFER_TRY(enter(call::kReadChunk, nullptr));
    return inner_->read_chunk(id, n_tokens, dst);
  }
  status read_pages(std::span<const page_read> reads) noexcept override {
    if (hidden_.read_pages) return backend::read_pages(reads);
    INSTINFER_TRY(enter(call::kReadPages, nullptr));
    return inner_->read_pages(reads);
  }
  host_chunk_view host_view() const noexcept override {
    return hidden_.host_view ? host_chunk_view{} : inner_->host_view();
  }
  status attend(uint32_t layer, const attend_batch& batch) noexcept override {
    INSTINFER_TRY(enter(call::kAttend, nullptr));
    return inner_->attend(layer, batch);
  }
  bool runs_sparf() const noexcept override { return !hidden_.runs_sparf && inner_->runs_sparf(); }
  status attend_sparse(uint32_t layer, const attend_batch& batch, const sparf_params& params,
                       sparf_counters* counters) noexcept override {
    if (!runs_sparf()) return backend::attend_sparse(layer, batch, params, counters);
    INSTINFER_TRY(enter(call::kAttendSparse, nullptr));
    return inner_->attend_sparse(layer, batch, params, counters);
  }
  status flush() noexcept override {
    INSTINFER_TRY(enter(call::kFlush, nullptr));
    return inner_->flush();
  }
  void prefetch(uint32_t layer, const attend_batch& batch) noexcept override { inner_->prefetch(layer, batch); }
  // Forwarded so that a wrapped persistent store still commits and recovers (kv_cache::flush and
  // create ask the outermost backend).
  persistent_store* persistence() noexcept override { return inner_->persistence(); }
  void on_sequence_freed(seq_id seq) noexcept override { inner_->on_sequence_freed(seq); }
  backend_stats stats() const noexcept override { return inner_->stats(); }

 private:
  status enter(call c, const chunk_hint* hint) noexcept {
    ++calls_[static_cast<size_t>(c)];
    if (fail_left_ != 0 && (fail_kinds_ & call_bit(c)) != 0 && --fail_left_ == 0) {
      ++failures_;
      return {fail_code_, std::string("injected ") + call_name(c) + " failure"};
    }
    if (hook_) {
      status s = hook_(c, hint);
      if (!s.ok()) {
        ++failures_;
        return s;
      }
    }
    return {};
  }

  std::unique_ptr<backend> inner_;
  hidden_capabilities hidden_;
  std::string name_;
  hook hook_;
  uint32_t fail_kinds_ = 0;
  uint64_t fail_left_ = 0;
  errc fail_code_ = errc::kIoError;
  uint64_t failures_ = 0;
  std::array<uint64_t, kCallKinds> calls_{};
};

}  // namespace test_support
