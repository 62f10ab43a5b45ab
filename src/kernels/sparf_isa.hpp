// Entry points of the per-ISA score units (src/kernels/sparf_<isa>.cpp: SparF's approximate
// scores and the page policy's group scores), private to src/kernels. Null for a column dtype
// that is not instantiated. Only the target's ISAs exist.
#pragma once

#include "instinfer/attention/sparf/score.hpp"

namespace instinfer::kernels {

sparf_score_fn sparf_score_kernel_scalar(dtype column_dtype) noexcept;
sparf_score_fn sparf_score_kernel_avx2(dtype column_dtype) noexcept;
sparf_score_fn sparf_score_kernel_avx512(dtype column_dtype) noexcept;
sparf_score_fn sparf_score_kernel_neon(dtype column_dtype) noexcept;

page_summary_score_fn page_summary_score_kernel_scalar() noexcept;
page_summary_score_fn page_summary_score_kernel_avx2() noexcept;
page_summary_score_fn page_summary_score_kernel_avx512() noexcept;
page_summary_score_fn page_summary_score_kernel_neon() noexcept;

}  // namespace instinfer::kernels
