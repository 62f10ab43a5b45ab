#include "sparf/sparse_attender.hpp"

#include <new>
#include <string>
#include <system_error>
#include <utility>

#include "sparf/sparf_attender.hpp"

namespace instinfer {

namespace {

// SparF next to the data: the backend keeps its own channel-indexed copy (built from the rows it
// is written) and runs the algorithm itself, so the observer calls have nothing to do.
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
    try {
      if (params.sink_tokens != 0 || params.window_tokens != 0)  // not in the drive's protocol yet
        return {errc::kUnsupported, "SparF sinks and recent window are not supported by backend '" +
                                        std::string(backend_.name()) + "' yet"};
      for (const attend_item& it : batch)  // k > tokens is refused here, before the drive sees it
        if (auto plan = sparf_resolve(params, config_.shape.head_dim, it.n_tokens); !plan.ok())
          return {plan.error().code(), "sequence " + std::to_string(it.seq) + ": " + plan.error().message()};
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

}  // namespace

result<std::unique_ptr<sparse_attender>> make_sparf_attender(backend& b, const backend_config& config,
                                                             const sparf_config& sparf) {
  INSTINFER_TRY(sparf.validate());
  // A storage backend keeps sealed column blocks as chunks written as token rows; a quantized
  // page's rows leave its last page_bytes % row bytes unwritten, where the column pages need them.
  if (is_quantized(config.shape.kv_dtype) && !b.runs_sparf() && !b.host_view())
    return status{errc::kUnsupported, "SparF on a " + std::string(dtype_name(config.shape.kv_dtype)) +
                                          " cache needs the host backend (backend '" + std::string(b.name()) +
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
