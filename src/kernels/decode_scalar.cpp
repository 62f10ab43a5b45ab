// The portable kernel: one lane, scalar f16/bf16 conversions. Compiled with the baseline flags.
#include "decode_isa.hpp"
#include "instinfer/attention/decode_kernel.hpp"

namespace instinfer::kernels {

// Scalar kernels are small (one-lane tiles only): dense and quantized share this unit.
decode_kernel_pair decode_kernel_scalar(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept {
  if (is_quantized(kv_type))
    return lookup_decode_kernel<simd::scalar_arch, dtype_family::kQuantized>(head_dim, kv_type, softcap, int8_dot);
  return lookup_decode_kernel<simd::scalar_arch, dtype_family::kDense>(head_dim, kv_type, softcap, int8_dot);
}

}  // namespace instinfer::kernels
