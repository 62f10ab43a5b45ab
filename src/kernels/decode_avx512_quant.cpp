// AVX-512 (F, BW, DQ, VL) + F16C instantiation of the quantized KV dtypes (q8_0, q4_0), with the
// same flags as decode_avx512.cpp (the dense dtypes): two units, so that neither takes the time of both.
// gcc 12 reports the self-initialised `__Y` of _mm512_undefined_*() inside its own intrinsic
// headers as maybe-uninitialized; the warning is a known false positive.
#if !defined(__clang__)  // clang has no such warning group
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "decode_isa.hpp"
#include "instinfer/attention/decode_kernel.hpp"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__F16C__)
#error "decode_avx512_quant.cpp must be compiled with -mavx512f -mavx512bw -mf16c"
#endif

namespace instinfer::kernels {

decode_kernel_pair decode_kernel_avx512_quant(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept {
  return lookup_decode_kernel<xsimd::avx512bw, dtype_family::kQuantized>(head_dim, kv_type, softcap, int8_dot);
}

}  // namespace instinfer::kernels
