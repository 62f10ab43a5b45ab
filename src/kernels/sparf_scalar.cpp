// SparF's approximate scores, portable one-lane instantiation (baseline flags).
#include "page_summary_score_kernel.hpp"
#include "sparf_isa.hpp"
#include "sparf_score_kernel.hpp"

namespace instinfer::kernels {

sparf_score_fn sparf_score_kernel_scalar(dtype column_dtype) noexcept {
  return lookup_sparf_score_kernel<simd::scalar_arch>(column_dtype);
}

page_summary_score_fn page_summary_score_kernel_scalar() noexcept {
  return &page_summary_scores<simd::scalar_arch>;
}

}  // namespace instinfer::kernels
