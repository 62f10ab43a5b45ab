// SparF's approximate scores, portable one-lane instantiation (baseline flags).
#include "sparf_isa.hpp"
#include "sparf_score_kernel.hpp"

namespace instinfer::kernels {

sparf_score_fn sparf_score_kernel_scalar(dtype column_dtype) noexcept {
  return lookup_sparf_score_kernel<simd::scalar_arch>(column_dtype);
}

}  // namespace instinfer::kernels
