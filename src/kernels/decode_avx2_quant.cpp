// AVX2 + FMA + F16C instantiation of the quantized KV dtypes (q8_0, q4_0), with the same flags
// as decode_avx2.cpp (the dense dtypes): two units, so that neither takes the time of both.
// gcc 12 reports the self-initialised `__Y` of _mm512_undefined_*() inside its own intrinsic
// headers as maybe-uninitialized; the warning is a known false positive.
#if !defined(__clang__)  // clang has no such warning group
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "decode_isa.hpp"
#include "instinfer/attention/decode_kernel.hpp"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "decode_avx2_quant.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif

namespace instinfer::kernels {

decode_kernel_pair decode_kernel_avx2_quant(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept {
  return lookup_decode_kernel<xsimd::fma3<xsimd::avx2>, dtype_family::kQuantized>(head_dim, kv_type, softcap, int8_dot);
}

}  // namespace instinfer::kernels
