// The C API: the prefix cache over a cache's sequences.
#include <cstddef>
#include <cstring>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "capi_internal.hpp"

using namespace instinfer::capi;
using instinfer::errc;
using instinfer::status;

extern "C" {

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

}  // extern "C"
