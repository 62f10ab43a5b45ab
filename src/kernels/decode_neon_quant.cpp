// AArch64 NEON instantiation of the quantized KV dtypes (q8_0, q4_0) for the emulated CSD's ARM
// cores; the dense dtypes are decode_neon.cpp (two units, so that neither takes the time of both).
#include "decode_isa.hpp"
#include "instinfer/attention/decode_kernel.hpp"

#if !defined(__aarch64__)
#error "decode_neon_quant.cpp is for aarch64 only"
#endif

namespace instinfer::kernels {

decode_kernel_pair decode_kernel_neon_quant(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept {
  return lookup_decode_kernel<xsimd::neon64, dtype_family::kQuantized>(head_dim, kv_type, softcap, int8_dot);
}

}  // namespace instinfer::kernels
