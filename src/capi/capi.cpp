// The C API over kv_cache: validates raw pointers, converts statuses, never lets an exception out.
#include <cstddef>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <vector>

#include "instinfer/attention/state.hpp"
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

namespace {

using instinfer::errc;
using instinfer::status;

thread_local std::string g_last_error;

constexpr size_t kMaxBatch = size_t{1} << 20;

instinfer_status fail(errc code, const std::string& message) noexcept {
  if (message.empty()) return fail(code, instinfer::errc_name(code));
  try {
    g_last_error = message;  // the code's name is instinfer_status_name(code)
  } catch (...) {
    // Out of memory while reporting: keep the code, drop the message.
  }
  return static_cast<instinfer_status>(code);
}

instinfer_status report(const status& s) noexcept {
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
int raw_dtype(const instinfer_dtype& t) noexcept {
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
bool is_dtype(int v) noexcept {
  return v >= 0 && v <= INSTINFER_DTYPE_Q4_0 && instinfer::is_valid_dtype(static_cast<instinfer::dtype>(v));
}

#define CHECK_CACHE(cache) \
  if (!(cache) || !(cache)->cache) return fail(errc::kInvalidArgument, "cache is NULL")

instinfer_status check_chunk_args(size_t n_seq, const instinfer_seq* seqs, const uint32_t* positions,
                                  const uint32_t* n_rows, const float* q, const float* out) noexcept {
  if (n_seq == 0) return fail(errc::kInvalidArgument, "n_seq must be > 0");
  if (n_seq > kMaxBatch)
    return fail(errc::kInvalidArgument, "n_seq " + std::to_string(n_seq) + " exceeds " + std::to_string(kMaxBatch));
  if (!seqs || !positions || !n_rows)
    return fail(errc::kInvalidArgument, "seqs, positions and n_rows must not be NULL");
  if (!q || !out) return fail(errc::kInvalidArgument, "q and out must not be NULL");
  return INSTINFER_OK;
}

}  // namespace

extern "C" {

int instinfer_version(void) {
  return INSTINFER_VERSION_MAJOR * 10000 + INSTINFER_VERSION_MINOR * 100 + INSTINFER_VERSION_PATCH;
}

const char* instinfer_status_name(instinfer_status s) {
  if (s > 0 || s < static_cast<instinfer_status>(errc::kInternal)) return "unknown status";
  return instinfer::errc_name(static_cast<errc>(s));
}

const char* instinfer_last_error(void) {
  return g_last_error.c_str();
}

void instinfer_config_init(instinfer_config* config) {
  if (!config) return;
  std::memset(config, 0, sizeof *config);
  config->struct_size = sizeof *config;
  config->kv_dtype = INSTINFER_DTYPE_F16;
  config->backend = "host";
}

instinfer_status instinfer_cache_create(const instinfer_config* config, instinfer_cache** out_cache) {
  return guarded(__func__, [&]() -> instinfer_status {
    if (!out_cache) return fail(errc::kInvalidArgument, "out_cache is NULL");
    *out_cache = nullptr;
    if (!config) return fail(errc::kInvalidArgument, "config is NULL");
    // 0.1 callers pass the shorter struct (no SparF fields): accepted, SparF off; 0.2 callers
    // pass it without caller_threads: accepted, the internal pool.
    const size_t v01 = offsetof(instinfer_config, sparf);
    const size_t v02 = offsetof(instinfer_config, caller_threads);
    const size_t v04 = offsetof(instinfer_config, page_summaries);  // 0.3 / 0.4: no page summaries
    const size_t v05 = offsetof(instinfer_config, int8_query_dot);  // 0.5: no int8 Q.K option
    if (config->struct_size != sizeof(instinfer_config) && config->struct_size != v01 && config->struct_size != v02 &&
        config->struct_size != v04 && config->struct_size != v05)
      return fail(errc::kInvalidArgument, "config->struct_size is " + std::to_string(config->struct_size) +
                                              ", expected " + std::to_string(sizeof(instinfer_config)) +
                                              " (initialise it with instinfer_config_init)");
    const bool has_sparf = config->struct_size >= v02;
    const bool has_threads = config->struct_size >= v04;
    const bool has_pages = config->struct_size >= v05;
    const bool has_int8 = config->struct_size >= sizeof(instinfer_config);
    if (has_int8 && config->int8_query_dot > 1)
      return fail(errc::kInvalidArgument, "config->int8_query_dot must be 0 or 1");
    if (has_pages && config->page_summaries > 1)
      return fail(errc::kInvalidArgument, "config->page_summaries must be 0 or 1");
    if (has_threads && config->caller_threads > 1)
      return fail(errc::kInvalidArgument, "config->caller_threads must be 0 or 1");
    if (has_sparf && config->sparf > 1) return fail(errc::kInvalidArgument, "config->sparf must be 0 or 1");
    const int dt = raw_dtype(config->kv_dtype);
    if (!is_dtype(dt)) return fail(errc::kInvalidArgument, "kv_dtype " + std::to_string(dt) + " is not a dtype");
    instinfer::cache_options o;
    o.shape = {config->n_layers, config->n_q_heads, config->n_kv_heads, config->head_dim,
               static_cast<instinfer::dtype>(dt)};
    o.page_bytes = config->page_bytes;
    o.capacity_bytes = config->capacity_bytes;
    o.n_threads = config->n_threads;
    o.scale = config->scale;
    o.softcap = config->logit_softcap;
    o.backend_uri = config->backend ? config->backend : "host";
    if (has_sparf) {
      o.sparf = config->sparf == 1;
      o.sparf_channels_per_page = config->sparf_channels_per_page;
    }
    if (has_threads) o.caller_threads = config->caller_threads == 1;
    if (has_pages) o.page_summaries = config->page_summaries == 1;
    if (has_int8) o.int8_query_dot = config->int8_query_dot == 1;
    auto created = instinfer::kv_cache::create(o);
    if (!created.ok()) return report(created.error());
    auto handle = std::make_unique<instinfer_cache>();
    handle->cache = std::move(created).value();
    instinfer_config_init(&handle->config);
    std::memcpy(&handle->config, config, config->struct_size);
    handle->config.struct_size = sizeof(instinfer_config);
    handle->backend = o.backend_uri;
    handle->config.backend = handle->backend.c_str();
    *out_cache = handle.release();
    return INSTINFER_OK;
  });
}

void instinfer_cache_destroy(instinfer_cache* cache) {
  try {
    delete cache;
  } catch (...) {
  }
}

instinfer_status instinfer_cache_stats(instinfer_cache* cache, instinfer_stats* out) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out) return fail(errc::kInvalidArgument, "out_stats is NULL");
    const size_t v01 = offsetof(instinfer_stats, sparf_pages_read);         // 0.1 callers: no SparF fields
    const size_t v04 = offsetof(instinfer_stats, page_summary_bytes);       // 0.2-0.4: no page summaries
    const size_t v06 = offsetof(instinfer_stats, sparf_reused_selections);  // 0.5 / 0.6: no reuse count
    if (out->struct_size != sizeof(instinfer_stats) && out->struct_size != v01 && out->struct_size != v04 &&
        out->struct_size != v06)
      return fail(errc::kInvalidArgument, "out_stats->struct_size must be sizeof(instinfer_stats)");
    const instinfer::cache_stats s = cache->cache->stats();
    out->n_sequences = s.n_sequences;
    out->chunk_bytes = s.chunk_bytes;
    out->capacity_chunks = s.backend.capacity_chunks;
    out->used_chunks = s.backend.used_chunks;
    out->shared_chunks = s.shared_chunks;
    out->kv_bytes_appended = s.backend.kv_bytes_appended;
    out->device_bytes_written = s.backend.device_bytes_written;
    out->device_bytes_read = s.backend.device_bytes_read;
    out->link_bytes_host_to_device = s.backend.link_bytes_host_to_device;
    out->link_bytes_device_to_host = s.backend.link_bytes_device_to_host;
    out->flash_pages_read = s.backend.flash_pages_read;
    out->flash_pages_programmed = s.backend.flash_pages_programmed;
    out->flash_pages_erased = s.backend.flash_pages_erased;
    out->write_amplification = s.backend.write_amplification();
    out->modelled_device_seconds = s.backend.modelled_device_seconds;
    if (out->struct_size >= v06) out->page_summary_bytes = s.page_summary_bytes;
    if (out->struct_size >= sizeof(instinfer_stats)) out->sparf_reused_selections = s.sparf_reused_selections;
    if (out->struct_size >= v04) {
      out->sparf_pages_read = s.sparf.pages_read();
      out->sparf_dense_pages = s.sparf.dense_pages;
      out->sparf_column_bytes = s.sparf_column_bytes;
    }
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_cache_config(instinfer_cache* cache, instinfer_config* out) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out) return fail(errc::kInvalidArgument, "out_config is NULL");
    const size_t size = out->struct_size;
    if (size != sizeof(instinfer_config) && size != offsetof(instinfer_config, sparf) &&
        size != offsetof(instinfer_config, caller_threads) && size != offsetof(instinfer_config, page_summaries) &&
        size != offsetof(instinfer_config, int8_query_dot))
      return fail(errc::kInvalidArgument, "out_config->struct_size is " + std::to_string(size) +
                                              ", expected sizeof(instinfer_config) or an older size");
    instinfer_config c = cache->config;
    c.struct_size = static_cast<uint32_t>(size);
    c.page_bytes = cache->cache->page().page_bytes;
    const instinfer::cache_stats s = cache->cache->stats();
    c.capacity_bytes = s.backend.capacity_chunks * s.chunk_bytes;
    std::memcpy(out, &c, size);
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_cache_flush(instinfer_cache* cache) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    return report(cache->cache->flush());
  });
}

instinfer_status instinfer_seq_create(instinfer_cache* cache, instinfer_seq* out_seq) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_seq) return fail(errc::kInvalidArgument, "out_seq is NULL");
    auto r = cache->cache->create_sequence();
    if (!r.ok()) return report(r.error());
    *out_seq = r.value();
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_seq_fork(instinfer_cache* cache, instinfer_seq src, instinfer_seq* out_seq) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_seq) return fail(errc::kInvalidArgument, "out_seq is NULL");
    auto r = cache->cache->fork_sequence(src);
    if (!r.ok()) return report(r.error());
    *out_seq = r.value();
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_seq_free(instinfer_cache* cache, instinfer_seq seq) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    return report(cache->cache->free_sequence(seq));
  });
}

instinfer_status instinfer_seq_remove_range(instinfer_cache* cache, instinfer_seq seq, uint64_t p0, uint64_t p1) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    return report(cache->cache->remove_range(seq, p0, p1));
  });
}

instinfer_status instinfer_seq_length(instinfer_cache* cache, instinfer_seq seq, uint32_t layer,
                                      uint64_t* out_n_tokens) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_n_tokens) return fail(errc::kInvalidArgument, "out_n_tokens is NULL");
    auto r = cache->cache->length(seq, layer);
    if (!r.ok()) return report(r.error());
    *out_n_tokens = r.value();
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_append(instinfer_cache* cache, instinfer_seq seq, uint32_t layer, uint32_t n_tokens,
                                  const void* k, const void* v, instinfer_dtype src_dtype) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    const int dt = raw_dtype(src_dtype);
    if (!is_dtype(dt)) return fail(errc::kInvalidArgument, "src_dtype " + std::to_string(dt) + " is not a dtype");
    return report(cache->cache->append(seq, layer, n_tokens, k, v, static_cast<instinfer::dtype>(dt)));
  });
}

instinfer_status instinfer_attend(instinfer_cache* cache, uint32_t layer, size_t n_seq, const instinfer_seq* seqs,
                                  const float* q, float* out, float* lse) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (n_seq == 0) return fail(errc::kInvalidArgument, "n_seq must be > 0");
    if (n_seq > kMaxBatch)
      return fail(errc::kInvalidArgument, "n_seq " + std::to_string(n_seq) + " exceeds " + std::to_string(kMaxBatch));
    if (!seqs || !q || !out) return fail(errc::kInvalidArgument, "seqs, q and out must not be NULL");
    return report(cache->cache->attend(layer, std::span<const instinfer::seq_id>(seqs, n_seq), q, out, lse));
  });
}

void instinfer_sparf_params_init(instinfer_sparf_params* params) {
  if (!params) return;
  std::memset(params, 0, sizeof *params);
  params->struct_size = sizeof *params;
  params->compression = instinfer::sparf_params::kDefaultCompression;
  params->whole_pages = 1;
  params->page_spread = instinfer::sparf_params{}.page_spread;
  params->sink_tokens = instinfer::sparf_params::kDefaultSinkTokens;
  params->window_tokens = instinfer::sparf_params::kDefaultWindowTokens;
  params->reuse_max_steps = instinfer::sparf_params{}.reuse_max_steps;
  params->reuse_min_cosine = 0.0f;  // off
}

namespace {

// instinfer_sparf_params as 0.5 / 0.6 laid it out (before the reuse fields): its size, on this ABI.
struct sparf_params_v06 {
  uint32_t struct_size, r, k, whole_pages;
  double compression, page_spread;
  uint32_t sink_tokens, window_tokens, policy;
};

// The C parameters as the library's, the fields an older caller's struct_size carries only; the
// rest keep the library's defaults. INSTINFER_OK or a failure already reported.
instinfer_status to_sparf_params(const instinfer_sparf_params* params, instinfer::sparf_params& p) {
  if (!params) return INSTINFER_OK;                                  // the defaults
  const size_t v03 = offsetof(instinfer_sparf_params, sink_tokens);  // 0.2 / 0.3: no sinks, no window
  const size_t v04 = offsetof(instinfer_sparf_params, policy);       // 0.4: SparF only
  const size_t v06 = sizeof(sparf_params_v06);                       // 0.5 / 0.6: no reuse
  const size_t size = params->struct_size;
  if (size != sizeof(instinfer_sparf_params) && size != v03 && size != v04 && size != v06)
    return fail(errc::kInvalidArgument,
                "params->struct_size must be sizeof(instinfer_sparf_params)"
                " (initialise it with instinfer_sparf_params_init)");
  if (params->whole_pages > 1) return fail(errc::kInvalidArgument, "params->whole_pages must be 0 or 1");
  if ((params->r == 0) != (params->k == 0))
    return fail(errc::kInvalidArgument, "params->r and params->k are given together (or both 0)");
  p = params->r ? instinfer::sparf_params::with_rk(params->r, params->k)
                : instinfer::sparf_params::with_compression(params->compression);
  p.whole_pages = params->whole_pages == 1;
  p.page_spread = params->page_spread;
  if (size >= v04) {
    p.sink_tokens = params->sink_tokens;
    p.window_tokens = params->window_tokens;
  }
  if (size >= v06) {
    if (params->policy > INSTINFER_SPARSE_PAGE_SUMMARY)
      return fail(errc::kInvalidArgument, "params->policy " + std::to_string(params->policy) +
                                              " is not an instinfer_sparse_policy (0: SparF, 1: page summary)");
    p.policy = static_cast<instinfer::sparse_policy>(params->policy);
  }
  if (size >= sizeof(instinfer_sparf_params)) {
    p.reuse_min_cosine = params->reuse_min_cosine;
    p.reuse_max_steps = params->reuse_max_steps;
  }
  return INSTINFER_OK;
}

}  // namespace

instinfer_status instinfer_attend_sparse(instinfer_cache* cache, uint32_t layer, size_t n_seq,
                                         const instinfer_seq* seqs, const float* q, float* out, float* lse,
                                         const instinfer_sparf_params* params) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (n_seq == 0) return fail(errc::kInvalidArgument, "n_seq must be > 0");
    if (n_seq > kMaxBatch)
      return fail(errc::kInvalidArgument, "n_seq " + std::to_string(n_seq) + " exceeds " + std::to_string(kMaxBatch));
    if (!seqs || !q || !out) return fail(errc::kInvalidArgument, "seqs, q and out must not be NULL");
    instinfer::sparf_params p;
    if (const instinfer_status st = to_sparf_params(params, p); st != INSTINFER_OK) return st;
    return report(cache->cache->attend_sparse(layer, std::span<const instinfer::seq_id>(seqs, n_seq), q, out, lse, p));
  });
}

instinfer_status instinfer_sparf_params_check(const instinfer_sparf_params* params, uint32_t head_dim) {
  return guarded(__func__, [&]() -> instinfer_status {
    if (!params) return fail(errc::kInvalidArgument, "params is NULL");
    if (!instinfer::kv_shape::is_supported_head_dim(head_dim))
      return fail(errc::kInvalidArgument, "head_dim " + std::to_string(head_dim) + " is not 64, 128 or 256");
    instinfer::sparf_params p;
    if (const instinfer_status st = to_sparf_params(params, p); st != INSTINFER_OK) return st;
    return report(p.validate(head_dim));
  });
}

instinfer_status instinfer_prefetch(instinfer_cache* cache, uint32_t layer, size_t n_seq, const instinfer_seq* seqs) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (n_seq == 0 || n_seq > kMaxBatch || !seqs) return fail(errc::kInvalidArgument, "bad sequence list");
    if (layer >= cache->cache->shape().n_layers)
      return fail(errc::kLayerOutOfRange, "layer " + std::to_string(layer) + " out of range");
    cache->cache->prefetch(layer, std::span<const instinfer::seq_id>(seqs, n_seq));
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_merge_partials(size_t n_rows, uint32_t head_dim, const float* out_a, const float* lse_a,
                                          const float* out_b, const float* lse_b, float* out, float* out_lse) {
  return guarded(__func__, [&]() -> instinfer_status {
    if (n_rows == 0 || head_dim == 0) return fail(errc::kInvalidArgument, "n_rows and head_dim must be > 0");
    if (head_dim > 65536 || n_rows > (SIZE_MAX / sizeof(float)) / head_dim)
      return fail(errc::kInvalidArgument, "n_rows * head_dim overflows");
    if (!out_a || !lse_a || !out_b || !lse_b || !out || !out_lse)
      return fail(errc::kInvalidArgument, "no pointer may be NULL");
    for (size_t r = 0; r < n_rows; ++r) {
      const size_t off = r * head_dim;
      instinfer::merge_normalized(out_a + off, lse_a[r], out_b + off, lse_b[r], out + off, out_lse + r, head_dim);
    }
    return INSTINFER_OK;
  });
}

// ---- since 0.3 ---------------------------------------------------------------------------------

instinfer_status instinfer_append_at(instinfer_cache* cache, instinfer_seq seq, uint32_t layer, uint64_t pos,
                                     uint32_t n_tokens, const void* k, const void* v, instinfer_dtype src_dtype) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    const int dt = raw_dtype(src_dtype);
    if (!is_dtype(dt)) return fail(errc::kInvalidArgument, "src_dtype " + std::to_string(dt) + " is not a dtype");
    return report(cache->cache->append_at(seq, layer, pos, n_tokens, k, v, static_cast<instinfer::dtype>(dt)));
  });
}

instinfer_status instinfer_seq_fork_at(instinfer_cache* cache, instinfer_seq src, uint64_t pos,
                                       instinfer_seq* out_seq) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_seq) return fail(errc::kInvalidArgument, "out_seq is NULL");
    auto r = cache->cache->fork_sequence_at(src, pos);
    if (!r.ok()) return report(r.error());
    *out_seq = r.value();
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_attend_chunk(instinfer_cache* cache, uint32_t layer, size_t n_seq, const instinfer_seq* seqs,
                                        const uint32_t* positions, const uint32_t* n_rows, const float* q, float* out,
                                        float* lse) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (instinfer_status s = check_chunk_args(n_seq, seqs, positions, n_rows, q, out); s != INSTINFER_OK) return s;
    return report(cache->cache->attend_chunk(layer, std::span<const instinfer::seq_id>(seqs, n_seq),
                                             std::span<const uint32_t>(positions, n_seq),
                                             std::span<const uint32_t>(n_rows, n_seq), q, out, lse));
  });
}

instinfer_status instinfer_attend_slice(instinfer_cache* cache, uint32_t layer, size_t n_seq, const instinfer_seq* seqs,
                                        const float* q, float* out, float* lse, uint32_t ith, uint32_t nth) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (n_seq == 0) return fail(errc::kInvalidArgument, "n_seq must be > 0");
    if (n_seq > kMaxBatch)
      return fail(errc::kInvalidArgument, "n_seq " + std::to_string(n_seq) + " exceeds " + std::to_string(kMaxBatch));
    if (!seqs || !q || !out) return fail(errc::kInvalidArgument, "seqs, q and out must not be NULL");
    return report(
        cache->cache->attend_slice(layer, std::span<const instinfer::seq_id>(seqs, n_seq), q, out, lse, ith, nth));
  });
}

instinfer_status instinfer_attend_chunk_slice(instinfer_cache* cache, uint32_t layer, size_t n_seq,
                                              const instinfer_seq* seqs, const uint32_t* positions,
                                              const uint32_t* n_rows, const float* q, float* out, float* lse,
                                              uint32_t ith, uint32_t nth) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (instinfer_status s = check_chunk_args(n_seq, seqs, positions, n_rows, q, out); s != INSTINFER_OK) return s;
    return report(cache->cache->attend_chunk_slice(layer, std::span<const instinfer::seq_id>(seqs, n_seq),
                                                   std::span<const uint32_t>(positions, n_seq),
                                                   std::span<const uint32_t>(n_rows, n_seq), q, out, lse, ith, nth));
  });
}

instinfer_status instinfer_seq_state_size(instinfer_cache* cache, instinfer_seq seq, size_t* out_size) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_size) return fail(errc::kInvalidArgument, "out_size is NULL");
    auto r = cache->cache->sequence_state_size(seq);
    if (!r.ok()) return report(r.error());
    if (r.value() > SIZE_MAX) return fail(errc::kOutOfMemory, "the sequence state does not fit a size_t");
    *out_size = static_cast<size_t>(r.value());
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_seq_state_save(instinfer_cache* cache, instinfer_seq seq, void* buf, size_t buf_size,
                                          size_t* out_written) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (out_written) *out_written = 0;
    if (!buf) return fail(errc::kInvalidArgument, "buf is NULL (instinfer_seq_state_size gives the size)");
    std::vector<std::byte> bytes;
    if (status s = cache->cache->save_sequence(seq, bytes); !s.ok()) return report(s);
    if (bytes.size() > buf_size)
      return fail(errc::kInvalidArgument, "buf_size " + std::to_string(buf_size) + " is smaller than the state's " +
                                              std::to_string(bytes.size()) + " bytes");
    std::memcpy(buf, bytes.data(), bytes.size());
    if (out_written) *out_written = bytes.size();
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_seq_state_load(instinfer_cache* cache, const void* buf, size_t size,
                                          instinfer_seq* out_seq) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_seq) return fail(errc::kInvalidArgument, "out_seq is NULL");
    if (!buf && size > 0) return fail(errc::kInvalidArgument, "buf is NULL");
    auto r =
        cache->cache->load_sequence(std::span<const std::byte>(static_cast<const std::byte*>(buf), buf ? size : 0));
    if (!r.ok()) return report(r.error());
    *out_seq = r.value();
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_seq_state_save_file(instinfer_cache* cache, instinfer_seq seq, const char* path) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!path) return fail(errc::kInvalidArgument, "path is NULL");
    return report(cache->cache->save_sequence_file(seq, path));
  });
}

instinfer_status instinfer_seq_state_load_file(instinfer_cache* cache, const char* path, instinfer_seq* out_seq) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!path) return fail(errc::kInvalidArgument, "path is NULL");
    if (!out_seq) return fail(errc::kInvalidArgument, "out_seq is NULL");
    auto r = cache->cache->load_sequence_file(path);
    if (!r.ok()) return report(r.error());
    *out_seq = r.value();
    return INSTINFER_OK;
  });
}

// ---- 0.4: the prefix cache ----------------------------------------------------------------------

instinfer_status instinfer_prefix_cache_create(instinfer_cache* cache, const char* model_id, uint64_t capacity_groups,
                                               instinfer_prefix_cache** out_prefix) {
  if (out_prefix) *out_prefix = nullptr;
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!model_id) return fail(errc::kInvalidArgument, "model_id is NULL");
    if (!out_prefix) return fail(errc::kInvalidArgument, "out_prefix is NULL");
    auto p =
        instinfer::prefix_cache::create(*cache->cache, instinfer::prefix_cache_options{model_id, capacity_groups, {}});
    if (!p.ok()) return report(p.error());
    auto handle = std::make_unique<instinfer_prefix_cache>();
    handle->owner = cache;
    handle->prefix = std::move(p.value());
    std::lock_guard lock(cache->prefixes_mutex);
    cache->prefixes.push_back(std::move(handle));
    *out_prefix = cache->prefixes.back().get();
    return INSTINFER_OK;
  });
}

void instinfer_prefix_cache_destroy(instinfer_prefix_cache* prefix) {
  if (!prefix) return;
  try {
    instinfer_cache* owner = prefix->owner;
    std::lock_guard lock(owner->prefixes_mutex);
    owner->prefixes.remove_if([&](const auto& p) { return p.get() == prefix; });
  } catch (...) {
  }
}

#define CHECK_PREFIX(prefix) \
  if (!(prefix) || !(prefix)->prefix) return fail(errc::kInvalidArgument, "prefix is NULL")

instinfer_status instinfer_prefix_insert(instinfer_prefix_cache* prefix, instinfer_seq seq, const int32_t* tokens,
                                         uint64_t n_tokens) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_PREFIX(prefix);
    if (!tokens && n_tokens > 0) return fail(errc::kInvalidArgument, "tokens is NULL");
    return report(prefix->prefix->insert(seq, std::span<const int32_t>(tokens, tokens ? n_tokens : 0)));
  });
}

instinfer_status instinfer_prefix_lookup(instinfer_prefix_cache* prefix, const int32_t* tokens, uint64_t n_tokens,
                                         instinfer_seq* out_seq, uint64_t* out_n_tokens) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_PREFIX(prefix);
    if (!tokens && n_tokens > 0) return fail(errc::kInvalidArgument, "tokens is NULL");
    if (!out_seq || !out_n_tokens) return fail(errc::kInvalidArgument, "out_seq and out_n_tokens must not be NULL");
    auto m = prefix->prefix->lookup(std::span<const int32_t>(tokens, tokens ? n_tokens : 0));
    if (!m.ok()) return report(m.error());
    *out_seq = m->seq;
    *out_n_tokens = m->n_tokens;
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_prefix_cache_stats(instinfer_prefix_cache* prefix, instinfer_prefix_stats* out_stats) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_PREFIX(prefix);
    if (!out_stats) return fail(errc::kInvalidArgument, "out_stats is NULL");
    if (out_stats->struct_size != sizeof(instinfer_prefix_stats))
      return fail(errc::kInvalidArgument,
                  "out_stats->struct_size is " + std::to_string(out_stats->struct_size) +
                      ", expected sizeof(instinfer_prefix_stats) = " + std::to_string(sizeof(instinfer_prefix_stats)));
    const instinfer::prefix_cache_stats s = prefix->prefix->stats();
    out_stats->groups = s.groups;
    out_stats->capacity_groups = s.capacity_groups;
    out_stats->tokens_per_group = s.tokens_per_group;
    out_stats->held_sequences = s.held_sequences;
    out_stats->lookups = s.lookups;
    out_stats->hits = s.hits;
    out_stats->hit_tokens = s.hit_tokens;
    out_stats->inserted_groups = s.inserted_groups;
    out_stats->evicted_groups = s.evicted_groups;
    out_stats->host_bytes = s.host_bytes;
    return INSTINFER_OK;
  });
}

// ---- 0.5: named sequences, persistent stores -----------------------------------------------------

instinfer_status instinfer_seq_set_name(instinfer_cache* cache, instinfer_seq seq, uint64_t name) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    return report(cache->cache->set_sequence_name(seq, name));
  });
}

instinfer_status instinfer_seq_find(instinfer_cache* cache, uint64_t name, instinfer_seq* out_seq) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_seq) return fail(errc::kInvalidArgument, "out_seq is NULL");
    auto r = cache->cache->find_sequence(name);
    if (!r.ok()) return report(r.error());
    *out_seq = r.value();
    return INSTINFER_OK;
  });
}

instinfer_status instinfer_seq_names(instinfer_cache* cache, uint64_t* names, instinfer_seq* seqs, size_t capacity,
                                     size_t* out_count) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_count) return fail(errc::kInvalidArgument, "out_count is NULL");
    if (capacity > 0 && (!names || !seqs))
      return fail(errc::kInvalidArgument, "names and seqs must not be NULL when capacity > 0");
    const auto named = cache->cache->named_sequences();
    for (size_t i = 0; i < named.size() && i < capacity; ++i) {
      names[i] = named[i].first;
      seqs[i] = named[i].second;
    }
    *out_count = named.size();
    return INSTINFER_OK;
  });
}

}  // extern "C"
