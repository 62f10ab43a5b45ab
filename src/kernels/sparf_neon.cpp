// SparF's approximate scores, AArch64 NEON (baseline on aarch64).
#include "page_summary_score_kernel.hpp"
#include "sparf_isa.hpp"
#include "sparf_score_kernel.hpp"

#if !defined(__aarch64__)
#error "sparf_neon.cpp is for aarch64 only"
#endif

namespace instinfer::kernels {

sparf_score_fn sparf_score_kernel_neon(dtype column_dtype) noexcept {
  return lookup_sparf_score_kernel<xsimd::neon64>(column_dtype);
}

page_summary_score_fn page_summary_score_kernel_neon() noexcept {
  return &page_summary_scores<xsimd::neon64>;
}

}  // namespace instinfer::kernels
