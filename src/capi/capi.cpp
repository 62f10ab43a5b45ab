// The C API over kv_cache (instinfer.h): validates raw pointers, converts statuses, never lets an
// exception out. This unit: versions, errors, the cache and its sequences, append and attend.
// The others: capi_sparse.cpp, capi_state.cpp (state and names), capi_prefix.cpp.
#include <cstddef>
#include <cstring>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <vector>

#include "instinfer/attention/state.hpp"

#include "capi_internal.hpp"

using namespace instinfer::capi;
using instinfer::errc;
using instinfer::status;

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
    return deliver(cache->cache->create_sequence(), out_seq);
  });
}

instinfer_status instinfer_seq_fork(instinfer_cache* cache, instinfer_seq src, instinfer_seq* out_seq) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (!out_seq) return fail(errc::kInvalidArgument, "out_seq is NULL");
    return deliver(cache->cache->fork_sequence(src), out_seq);
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
    return deliver(cache->cache->length(seq, layer), out_n_tokens);
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
    if (const instinfer_status st = check_attend_args(n_seq, seqs, q, out); st != INSTINFER_OK) return st;
    return report(cache->cache->attend(layer, std::span<const instinfer::seq_id>(seqs, n_seq), q, out, lse));
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
    return deliver(cache->cache->fork_sequence_at(src, pos), out_seq);
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
    if (const instinfer_status st = check_attend_args(n_seq, seqs, q, out); st != INSTINFER_OK) return st;
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

}  // extern "C"
