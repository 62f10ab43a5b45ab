// Entry points of the per-ISA translation units (private to src/kernels).
//
// Each decode_<isa>.cpp is compiled with its own flags and instantiates the one kernel template
// (attention/decode_kernel.hpp) for its arch; decode_dispatch.cpp picks among them at run time.
#pragma once

#include <cstdint>

#include "instinfer/attention/decode.hpp"
#include "instinfer/attention/decode_kernel.hpp"

namespace instinfer::kernels {

// Null kernels when (head_dim, dtype) is not instantiated. Only the ISAs of the target are defined.
decode_kernel_pair decode_kernel_scalar(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept;
decode_kernel_pair decode_kernel_avx2(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept;
decode_kernel_pair decode_kernel_avx512(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept;
decode_kernel_pair decode_kernel_neon(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept;
// The quantized dtypes (q8_0, q4_0) of the SIMD ISAs, each in its own unit (decode_<isa>_quant.cpp).
decode_kernel_pair decode_kernel_avx2_quant(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept;
decode_kernel_pair decode_kernel_avx512_quant(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept;
decode_kernel_pair decode_kernel_neon_quant(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept;

// The kernels of `isa` (null when not built in). No availability check: callers validate first.
decode_kernel_pair lookup_kernels(cpu_isa isa, uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept;

}  // namespace instinfer::kernels
