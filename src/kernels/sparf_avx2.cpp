// SparF's approximate scores, AVX2 + FMA + F16C (the flags of decode_avx2.cpp).
#if !defined(__clang__)  // clang has no such warning group
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "page_summary_score_kernel.hpp"
#include "sparf_isa.hpp"
#include "sparf_score_kernel.hpp"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "sparf_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif

namespace instinfer::kernels {

sparf_score_fn sparf_score_kernel_avx2(dtype column_dtype) noexcept {
  return lookup_sparf_score_kernel<xsimd::fma3<xsimd::avx2>>(column_dtype);
}

page_summary_score_fn page_summary_score_kernel_avx2() noexcept {
  return &page_summary_scores<xsimd::fma3<xsimd::avx2>>;
}

}  // namespace instinfer::kernels
