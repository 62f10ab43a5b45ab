// The one error regime of instinfer: an error code plus a readable message.
//
// Hot paths are noexcept and return `status` (or `result<T>`); nothing in the library throws
// for an expected failure. The C API maps `errc` one to one onto its negative status codes.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <variant>

namespace instinfer {

enum class errc : int32_t {
  kOk = 0,
  kInvalidArgument = -1,  // a malformed or out-of-range argument
  kOutOfMemory = -2,      // host or device memory allocation failed
  kOutOfPages = -3,       // the KV page pool is exhausted
  kUnknownSequence = -4,  // a sequence id that does not exist (or was freed)
  kLayerOutOfRange = -5,  // a layer index >= n_layers
  kUnsupported = -6,      // valid but not supported (head_dim, dtype, backend, feature)
  kIoError = -7,          // a read or write failed (EIO, short transfer, ...)
  kNoSpace = -8,          // the storage device is full (ENOSPC)
  kDeviceLost = -9,       // a device (CSD process, GPU) stopped answering
  kTimeout = -10,         // an operation did not finish in its time budget
  kCorruptData = -11,     // stored or loaded data failed validation
  kBusy = -12,            // the resource is in use; retry later
  kInternal = -13,        // a bug in instinfer: please report it
};

// Stable, human-readable name of a code ("invalid argument", ...).
constexpr const char* errc_name(errc code) noexcept {
  switch (code) {
    case errc::kOk: return "ok";
    case errc::kInvalidArgument: return "invalid argument";
    case errc::kOutOfMemory: return "out of memory";
    case errc::kOutOfPages: return "out of KV pages";
    case errc::kUnknownSequence: return "unknown sequence";
    case errc::kLayerOutOfRange: return "layer out of range";
    case errc::kUnsupported: return "unsupported";
    case errc::kIoError: return "I/O error";
    case errc::kNoSpace: return "no space left on device";
    case errc::kDeviceLost: return "device lost";
    case errc::kTimeout: return "timed out";
    case errc::kCorruptData: return "corrupt data";
    case errc::kBusy: return "busy";
    case errc::kInternal: return "internal error";
  }
  return "unknown error";
}

// A code plus a message. Success carries no message and allocates nothing.
class [[nodiscard]] status {
 public:
  status() noexcept = default;
  status(errc code, std::string message) : code_(code), message_(std::move(message)) {}

  static status ok_status() noexcept { return {}; }

  bool ok() const noexcept { return code_ == errc::kOk; }
  errc code() const noexcept { return code_; }
  const std::string& message() const noexcept { return message_; }

  // "out of KV pages: pool of 128 pages is exhausted"
  std::string to_string() const {
    if (ok()) return "ok";
    return std::string(errc_name(code_)) + ": " + message_;
  }

 private:
  errc code_ = errc::kOk;
  std::string message_;
};

// Either a value or a failed status (std::expected is C++23; this is the small subset we need).
template <class T>
class [[nodiscard]] result {
 public:
  result(T v) : storage_(std::in_place_index<0>, std::move(v)) {}                   // NOLINT: implicit
  result(status failure) : storage_(std::in_place_index<1>, std::move(failure)) {}  // NOLINT: implicit

  bool ok() const noexcept { return storage_.index() == 0; }
  T& value() & { return std::get<0>(storage_); }
  const T& value() const& { return std::get<0>(storage_); }
  T&& value() && { return std::get<0>(std::move(storage_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

  // The failure; a default (ok) status when a value is held.
  status error() const { return ok() ? status{} : std::get<1>(storage_); }

 private:
  std::variant<T, status> storage_;
};

}  // namespace instinfer

// Propagate a failed status out of the enclosing function.
#define INSTINFER_TRY(expr)                              \
  do {                                                   \
    ::instinfer::status instinfer_try_s_ = (expr);       \
    if (!instinfer_try_s_.ok()) return instinfer_try_s_; \
  } while (0)
