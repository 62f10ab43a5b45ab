#include "sparf/sparse_attender.hpp"

#include <new>
#include <string>
#include <system_error>
#include <utility>

#include "sparf/page_summary_attender.hpp"
#include "sparf/sparf_attender.hpp"

namespace instinfer {

namespace {

// Sparse attention next to the data: the backend keeps the policy's data itself (SparF's
// channel-indexed copy, page summaries: built from the rows it is written) and runs the algorithm,
// so the observer calls have nothing to do. Either policy is forwarded; the backend refuses one it
// does not keep.
class backend_sparf_attender final : public sparse_attender {
 public:
  backend_sparf_attender(backend& b, const backend_config& config) : backend_(b), config_(config) {}

  status on_append(seq_id, uint32_t, uint32_t, uint32_t, const std::byte*, const std::byte*) noexcept override {
    return {};
  }
  status on_fork(seq_id, seq_id) noexcept override { return {}; }
  status on_truncate(seq_id, uint32_t, uint32_t, const stored_rows_reader&, uint32_t, const std::byte*,
                     const std::byte*) noexcept override {
    return {};
  }
  void on_truncate_end(seq_id, bool) noexcept override {}
  void on_free(seq_id) noexcept override {}

  status attend_sparse(uint32_t layer, const attend_batch& batch, const sparf_params& params,
                       sparf_counters* counters) noexcept override {
    if (params.reuses())
      return {errc::kUnsupported, "backend '" + std::string(backend_.name()) +
                                      "' runs SparF itself and does not reuse selections (reuse_min_cosine must be 0)"};
    try {
      for (const attend_item& it : batch) {  // k > tokens is refused here, before the drive sees it
        status plan;
        if (params.policy == sparse_policy::kPageSummary) {
          auto r = page_summary_resolve(params, config_.shape.head_dim, config_.page.tokens_per_page, it.n_tokens);
          if (!r.ok()) plan = r.error();
        } else if (auto r = sparf_resolve(params, config_.shape.head_dim, it.n_tokens); !r.ok()) {
          plan = r.error();
        }
        if (!plan.ok()) return {plan.code(), "sequence " + std::to_string(it.seq) + ": " + plan.message()};
      }
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory, "attend_sparse"};
    }
    return backend_.attend_sparse(layer, batch, params, counters);
  }

  uint64_t resident_bytes() const noexcept override { return 0; }

 private:
  backend& backend_;
  backend_config config_;
};

// Both policies, chosen per call. Changes go to the page summaries first (they can take an
// append back), then to SparF; a fork or truncation that fails in either is dropped from both
// (kv_cache ends a failed truncation with on_truncate_end(seq, false), which reaches both).
class policy_router final : public sparse_attender {
 public:
  policy_router(std::unique_ptr<sparse_attender> sparf, std::unique_ptr<page_summary_attender> pages)
      : sparf_(std::move(sparf)), pages_(std::move(pages)) {}

  status on_append(seq_id seq, uint32_t layer, uint32_t first, uint32_t n, const std::byte* k,
                   const std::byte* v) noexcept override {
    INSTINFER_TRY(pages_->on_append(seq, layer, first, n, k, v));
    status s = sparf_->on_append(seq, layer, first, n, k, v);
    if (!s.ok()) pages_->undo_last_append();
    return s;
  }
  status on_fork(seq_id src, seq_id dst) noexcept override {
    INSTINFER_TRY(pages_->on_fork(src, dst));
    status s = sparf_->on_fork(src, dst);
    if (!s.ok()) pages_->on_free(dst);
    return s;
  }
  status on_truncate(seq_id seq, uint32_t layer, uint32_t keep, const stored_rows_reader& old_rows, uint32_t n_suffix,
                     const std::byte* suffix_k, const std::byte* suffix_v) noexcept override {
    INSTINFER_TRY(pages_->on_truncate(seq, layer, keep, old_rows, n_suffix, suffix_k, suffix_v));
    return sparf_->on_truncate(seq, layer, keep, old_rows, n_suffix, suffix_k, suffix_v);
  }
  void on_truncate_end(seq_id seq, bool commit) noexcept override {
    pages_->on_truncate_end(seq, commit);
    sparf_->on_truncate_end(seq, commit);
  }
  void on_free(seq_id seq) noexcept override {
    pages_->on_free(seq);
    sparf_->on_free(seq);
  }
  status attend_sparse(uint32_t layer, const attend_batch& batch, const sparf_params& params,
                       sparf_counters* counters) noexcept override {
    if (params.policy == sparse_policy::kPageSummary) return pages_->attend_sparse(layer, batch, params, counters);
    return sparf_->attend_sparse(layer, batch, params, counters);
  }
  uint64_t resident_bytes() const noexcept override { return sparf_->resident_bytes(); }
  uint64_t page_summary_bytes() const noexcept override { return pages_->resident_bytes(); }
  uint64_t reused_selections() const noexcept override { return sparf_->reused_selections(); }

 private:
  std::unique_ptr<sparse_attender> sparf_;
  std::unique_ptr<page_summary_attender> pages_;
};

// One policy kept: the other policy's calls are refused with what to set instead.
class single_policy final : public sparse_attender {
 public:
  single_policy(std::unique_ptr<sparse_attender> inner, sparse_policy kept) : inner_(std::move(inner)), kept_(kept) {}

  status on_append(seq_id seq, uint32_t layer, uint32_t first, uint32_t n, const std::byte* k,
                   const std::byte* v) noexcept override {
    return inner_->on_append(seq, layer, first, n, k, v);
  }
  status on_fork(seq_id src, seq_id dst) noexcept override { return inner_->on_fork(src, dst); }
  status on_truncate(seq_id seq, uint32_t layer, uint32_t keep, const stored_rows_reader& old_rows, uint32_t n_suffix,
                     const std::byte* suffix_k, const std::byte* suffix_v) noexcept override {
    return inner_->on_truncate(seq, layer, keep, old_rows, n_suffix, suffix_k, suffix_v);
  }
  void on_truncate_end(seq_id seq, bool commit) noexcept override { inner_->on_truncate_end(seq, commit); }
  void on_free(seq_id seq) noexcept override { inner_->on_free(seq); }
  status attend_sparse(uint32_t layer, const attend_batch& batch, const sparf_params& params,
                       sparf_counters* counters) noexcept override {
    if (params.policy != kept_)
      return {errc::kUnsupported,
              std::string("attend_sparse with policy '") + sparse_policy_name(params.policy) +
                  "' needs a cache created with " +
                  (params.policy == sparse_policy::kSparf ? "cache_options::sparf" : "cache_options::page_summaries") +
                  " = true"};
    return inner_->attend_sparse(layer, batch, params, counters);
  }
  uint64_t resident_bytes() const noexcept override {
    return kept_ == sparse_policy::kSparf ? inner_->resident_bytes() : 0;
  }
  uint64_t page_summary_bytes() const noexcept override {
    return kept_ == sparse_policy::kPageSummary ? inner_->resident_bytes() : 0;
  }
  uint64_t reused_selections() const noexcept override { return inner_->reused_selections(); }

 private:
  std::unique_ptr<sparse_attender> inner_;
  sparse_policy kept_;
};

}  // namespace

result<std::unique_ptr<sparse_attender>> make_sparse_attender(backend& b, const backend_config& config,
                                                              const sparf_config& cfg, bool sparf,
                                                              bool page_summaries) {
  if (!sparf && !page_summaries) return status{errc::kInvalidArgument, "no sparse policy asked for"};
  const bool pages_inside = page_summaries && b.runs_page_summaries();  // csd: in the drive
  if (page_summaries && !pages_inside && b.runs_sparf())
    return status{errc::kUnsupported, "page summaries (cache_options::page_summaries) are not supported by backend '" +
                                          std::string(b.name()) +
                                          "' yet: it runs sparse attention inside the drive, where only SparF is "
                                          "implemented"};
  std::unique_ptr<sparse_attender> sparf_part;
  if (sparf) {
    auto made = make_sparf_attender(b, config, cfg);
    if (!made.ok()) return made.error();
    sparf_part = std::move(made).value();
  }
  try {
    if (!page_summaries)
      return std::unique_ptr<sparse_attender>(
          std::make_unique<single_policy>(std::move(sparf_part), sparse_policy::kSparf));
    if (pages_inside) {
      if (!sparf)
        return std::unique_ptr<sparse_attender>(std::make_unique<single_policy>(
            std::make_unique<backend_sparf_attender>(b, config), sparse_policy::kPageSummary));
      if (b.runs_sparf()) return std::unique_ptr<sparse_attender>(std::make_unique<backend_sparf_attender>(b, config));
      return status{errc::kUnsupported, "backend '" + std::string(b.name()) +
                                            "' runs page summaries itself but not SparF: keep one policy"};
    }
    auto pages = std::make_unique<page_summary_attender>(b, config, cfg);
    if (!sparf)
      return std::unique_ptr<sparse_attender>(
          std::make_unique<single_policy>(std::move(pages), sparse_policy::kPageSummary));
    return std::unique_ptr<sparse_attender>(std::make_unique<policy_router>(std::move(sparf_part), std::move(pages)));
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "sparse attender"};
  } catch (const std::system_error& e) {
    return status{errc::kOutOfMemory, std::string("page summary attender: cannot start its threads: ") + e.what()};
  }
}

result<std::unique_ptr<sparse_attender>> make_sparf_attender(backend& b, const backend_config& config,
                                                             const sparf_config& sparf) {
  INSTINFER_TRY(sparf.validate());
  // A storage backend keeps sealed column blocks as chunks: whole (write_chunk) where it can, else
  // as token rows, and a quantized page's rows leave its last page_bytes % row bytes unwritten,
  // where the column pages need them.
  if (is_quantized(config.shape.kv_dtype) && !b.runs_sparf() && !b.host_view() && !b.writes_whole_chunks())
    return status{errc::kUnsupported, "SparF on a " + std::string(dtype_name(config.shape.kv_dtype)) +
                                          " cache needs a backend that stores whole chunks (backend '" +
                                          std::string(b.name()) +
                                          "' stores column pages as token rows, which quantized pages do not fill)"};
  try {
    if (b.runs_sparf()) return std::unique_ptr<sparse_attender>(std::make_unique<backend_sparf_attender>(b, config));
    return std::unique_ptr<sparse_attender>(std::make_unique<sparf_attender>(b, config, sparf));
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "SparF attender"};
  } catch (const std::system_error& e) {
    return status{errc::kOutOfMemory, std::string("SparF attender: cannot start its threads: ") + e.what()};
  }
}

}  // namespace instinfer
