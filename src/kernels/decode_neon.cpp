// AArch64 NEON instantiation (Advanced SIMD is baseline on aarch64: no extra flags). This is the
// kernel the emulated CSD's ARM cores run.
#include "decode_isa.hpp"
#include "instinfer/attention/decode_kernel.hpp"

#if !defined(__aarch64__)
#error "decode_neon.cpp is for aarch64 only"
#endif

namespace instinfer::kernels {

decode_kernel_pair decode_kernel_neon(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept {
  return lookup_decode_kernel<xsimd::neon64, dtype_family::kDense>(head_dim, kv_type, softcap, int8_dot);
}

}  // namespace instinfer::kernels
