// SparF's approximate scores, AVX-512 (F, BW, DQ, VL; the flags of decode_avx512.cpp).
#if !defined(__clang__)  // clang has no such warning group
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "page_summary_score_kernel.hpp"
#include "sparf_isa.hpp"
#include "sparf_score_kernel.hpp"

#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "sparf_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl"
#endif

namespace instinfer::kernels {

sparf_score_fn sparf_score_kernel_avx512(dtype column_dtype) noexcept {
  return lookup_sparf_score_kernel<xsimd::avx512bw>(column_dtype);
}

page_summary_score_fn page_summary_score_kernel_avx512() noexcept {
  return &page_summary_scores<xsimd::avx512bw>;
}

}  // namespace instinfer::kernels
