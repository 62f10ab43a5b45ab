// What the C API's units share (src/capi/capi_*.cpp): the opaque handles' definitions and the
// conversions of statuses and raw arguments. Private to src/capi.
#pragma once

#include <cstddef>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <string>

#include "instinfer/core/status.hpp"
#include "instinfer/instinfer.h"
#include "instinfer/kv/kv_cache.hpp"
#include "instinfer/kv/prefix_cache.hpp"

struct instinfer_prefix_cache;

struct instinfer_cache {
  std::unique_ptr<instinfer::kv_cache> cache;
  instinfer_config config{};  // as created, every field (older callers' missing ones at defaults)
  std::string backend;        // config.backend points here
  // Prefix caches open on it: destroyed before the cache (declared after it), since they free
  // their hidden sequences in it.
  std::mutex prefixes_mutex;
  std::list<std::unique_ptr<instinfer_prefix_cache>> prefixes;
};

struct instinfer_prefix_cache {
  instinfer_cache* owner = nullptr;
  std::unique_ptr<instinfer::prefix_cache> prefix;
};

namespace instinfer::capi {

using instinfer::errc;
using instinfer::status;

inline thread_local std::string g_last_error;  // instinfer_last_error

inline constexpr size_t kMaxBatch = size_t{1} << 20;

inline instinfer_status fail(errc code, const std::string& message) noexcept {
  if (message.empty()) return fail(code, instinfer::errc_name(code));
  try {
    g_last_error = message;  // the code's name is instinfer_status_name(code)
  } catch (...) {
    // Out of memory while reporting: keep the code, drop the message.
  }
  return static_cast<instinfer_status>(code);
}

inline instinfer_status report(const status& s) noexcept {
  if (s.ok()) return INSTINFER_OK;
  return fail(s.code(), s.message());
}

// Runs `body`, turning any escaping exception into a status: nothing crosses the C boundary.
template <class Body>
instinfer_status guarded(const char* fn, Body&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return fail(errc::kOutOfMemory, std::string(fn) + ": allocation failed");
  } catch (const std::exception& e) {
    return fail(errc::kInternal, std::string(fn) + ": " + e.what());
  } catch (...) {
    return fail(errc::kInternal, std::string(fn) + ": unknown exception");
  }
}

// A C caller may pass any int as an instinfer_dtype; in C++ loading an out-of-range enum value is
// undefined, so read the raw bits.
inline int raw_dtype(const instinfer_dtype& t) noexcept {
  static_assert(sizeof(instinfer_dtype) == sizeof(int));
  int v;
  std::memcpy(&v, &t, sizeof v);
  return v;
}

// The C enum mirrors instinfer::dtype value for value (new dtypes are appended to both).
static_assert(INSTINFER_DTYPE_F32 == static_cast<int>(instinfer::dtype::kF32) &&
              INSTINFER_DTYPE_F16 == static_cast<int>(instinfer::dtype::kF16) &&
              INSTINFER_DTYPE_BF16 == static_cast<int>(instinfer::dtype::kBF16) &&
              INSTINFER_DTYPE_Q8_0 == static_cast<int>(instinfer::dtype::kQ8_0) &&
              INSTINFER_DTYPE_Q4_0 == static_cast<int>(instinfer::dtype::kQ4_0));
inline bool is_dtype(int v) noexcept {
  return v >= 0 && v <= INSTINFER_DTYPE_Q4_0 && instinfer::is_valid_dtype(static_cast<instinfer::dtype>(v));
}

#define CHECK_CACHE(cache) \
  if (!(cache) || !(cache)->cache) return fail(errc::kInvalidArgument, "cache is NULL")

// A call's value to *out (the caller has checked out), or its failure reported.
template <class T, class Out>
instinfer_status deliver(const instinfer::result<T>& r, Out* out) noexcept {
  if (!r.ok()) return report(r.error());
  *out = r.value();
  return INSTINFER_OK;
}

// The batch arguments of instinfer_attend and instinfer_attend_sparse.
inline instinfer_status check_attend_args(size_t n_seq, const instinfer_seq* seqs, const float* q,
                                          const float* out) noexcept {
  if (n_seq == 0) return fail(errc::kInvalidArgument, "n_seq must be > 0");
  if (n_seq > kMaxBatch)
    return fail(errc::kInvalidArgument, "n_seq " + std::to_string(n_seq) + " exceeds " + std::to_string(kMaxBatch));
  if (!seqs || !q || !out) return fail(errc::kInvalidArgument, "seqs, q and out must not be NULL");
  return INSTINFER_OK;
}

inline instinfer_status check_chunk_args(size_t n_seq, const instinfer_seq* seqs, const uint32_t* positions,
                                         const uint32_t* n_rows, const float* q, const float* out) noexcept {
  if (n_seq == 0) return fail(errc::kInvalidArgument, "n_seq must be > 0");
  if (n_seq > kMaxBatch)
    return fail(errc::kInvalidArgument, "n_seq " + std::to_string(n_seq) + " exceeds " + std::to_string(kMaxBatch));
  if (!seqs || !positions || !n_rows)
    return fail(errc::kInvalidArgument, "seqs, positions and n_rows must not be NULL");
  if (!q || !out) return fail(errc::kInvalidArgument, "q and out must not be NULL");
  return INSTINFER_OK;
}

// instinfer_sparf_params as the library's (capi_sparse.cpp); INSTINFER_OK or a failure reported.
instinfer_status to_sparf_params(const instinfer_sparf_params* params, instinfer::sparf_params& p);

}  // namespace instinfer::capi
