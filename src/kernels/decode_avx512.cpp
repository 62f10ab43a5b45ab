// AVX-512 (F, BW, DQ, VL) + F16C instantiation (per-file flags in CMakeLists.txt).
// gcc 12 reports the self-initialised `__Y` of _mm512_undefined_*() inside its own intrinsic
// headers as maybe-uninitialized; the warning is a known false positive.
#if !defined(__clang__)  // clang has no such warning group
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "decode_isa.hpp"
#include "instinfer/attention/decode_kernel.hpp"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__F16C__)
#error "decode_avx512.cpp must be compiled with -mavx512f -mavx512bw -mf16c"
#endif

namespace instinfer::kernels {

decode_kernel_pair decode_kernel_avx512(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept {
  return lookup_decode_kernel<xsimd::avx512bw, dtype_family::kDense>(head_dim, kv_type, softcap, int8_dot);
}

}  // namespace instinfer::kernels
