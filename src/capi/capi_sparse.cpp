// The C API: sparse attention (SparF and the page policy) and its parameters.
#include <cstddef>
#include <cstring>
#include <span>
#include <string>

#include "capi_internal.hpp"

using namespace instinfer::capi;
using instinfer::errc;
using instinfer::status;

extern "C" {

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
  params->channel_share = instinfer::sparf_params::kDefaultChannelShare;
}

}  // extern "C"

namespace instinfer::capi {

// instinfer_sparf_params as 0.5 / 0.6 laid it out (before the reuse fields): its size, on this ABI.
struct sparf_params_v06 {
  uint32_t struct_size, r, k, whole_pages;
  double compression, page_spread;
  uint32_t sink_tokens, window_tokens, policy;
};
// ... and as 0.7 laid it out (before channel_share).
struct sparf_params_v07 {
  sparf_params_v06 v06;
  uint32_t reuse_max_steps;
  float reuse_min_cosine;
};
static_assert(sizeof(sparf_params_v07) == offsetof(instinfer_sparf_params, channel_share));

// The C parameters as the library's, the fields an older caller's struct_size carries only; the
// rest keep the library's defaults. INSTINFER_OK or a failure already reported.
instinfer_status to_sparf_params(const instinfer_sparf_params* params, instinfer::sparf_params& p) {
  if (!params) return INSTINFER_OK;                                  // the defaults
  const size_t v03 = offsetof(instinfer_sparf_params, sink_tokens);  // 0.2 / 0.3: no sinks, no window
  const size_t v04 = offsetof(instinfer_sparf_params, policy);       // 0.4: SparF only
  const size_t v06 = sizeof(sparf_params_v06);                       // 0.5 / 0.6: no reuse
  const size_t v07 = sizeof(sparf_params_v07);                       // 0.7: no channel share
  const size_t size = params->struct_size;
  if (size != sizeof(instinfer_sparf_params) && size != v03 && size != v04 && size != v06 && size != v07)
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
  if (size >= v07) {
    p.reuse_min_cosine = params->reuse_min_cosine;
    p.reuse_max_steps = params->reuse_max_steps;
  }
  if (size >= sizeof(instinfer_sparf_params) && params->channel_share != 0.0)  // 0: the default
    p.channel_share = params->channel_share;
  return INSTINFER_OK;
}

// to_sparf_params for the calls without a cache: params must be given and head_dim supported.
static instinfer_status to_checked_sparf_params(const instinfer_sparf_params* params, uint32_t head_dim,
                                                instinfer::sparf_params& p) {
  if (!params) return fail(errc::kInvalidArgument, "params is NULL");
  if (!instinfer::kv_shape::is_supported_head_dim(head_dim))
    return fail(errc::kInvalidArgument, "head_dim " + std::to_string(head_dim) + " is not 64, 128 or 256");
  return to_sparf_params(params, p);
}

}  // namespace instinfer::capi

extern "C" {

instinfer_status instinfer_attend_sparse(instinfer_cache* cache, uint32_t layer, size_t n_seq,
                                         const instinfer_seq* seqs, const float* q, float* out, float* lse,
                                         const instinfer_sparf_params* params) {
  return guarded(__func__, [&]() -> instinfer_status {
    CHECK_CACHE(cache);
    if (const instinfer_status st = check_attend_args(n_seq, seqs, q, out); st != INSTINFER_OK) return st;
    instinfer::sparf_params p;
    if (const instinfer_status st = to_sparf_params(params, p); st != INSTINFER_OK) return st;
    return report(cache->cache->attend_sparse(layer, std::span<const instinfer::seq_id>(seqs, n_seq), q, out, lse, p));
  });
}

instinfer_status instinfer_sparf_params_check(const instinfer_sparf_params* params, uint32_t head_dim) {
  return guarded(__func__, [&]() -> instinfer_status {
    instinfer::sparf_params p;
    if (const instinfer_status st = to_checked_sparf_params(params, head_dim, p); st != INSTINFER_OK) return st;
    return report(p.validate(head_dim));
  });
}

instinfer_status instinfer_sparf_plan(const instinfer_sparf_params* params, uint32_t head_dim, uint32_t n_tokens,
                                      uint32_t* channels, uint32_t* tokens) {
  return guarded(__func__, [&]() -> instinfer_status {
    if (!channels || !tokens) return fail(errc::kInvalidArgument, "channels and tokens must not be NULL");
    instinfer::sparf_params p;
    if (const instinfer_status st = to_checked_sparf_params(params, head_dim, p); st != INSTINFER_OK) return st;
    if (p.policy != instinfer::sparse_policy::kSparf)
      return fail(errc::kUnsupported,
                  "the page-summary policy's plan depends on the cache's pages (instinfer_sparf_plan is SparF's)");
    auto plan = instinfer::sparf_resolve(p, head_dim, n_tokens);
    if (!plan.ok()) return report(plan.error());
    *channels = plan.value().r;
    *tokens = plan.value().k;
    return INSTINFER_OK;
  });
}

}  // extern "C"
