// Runtime dispatch of the decode kernels: which ISAs this build has and this CPU runs, and the
// validation of decode_params shared by every backend.

#include <cmath>
#include <string>

#include "decode_isa.hpp"
#include "instinfer/attention/decode.hpp"
#include "instinfer/attention/sparf/score.hpp"
#include "instinfer/layout/kv_shape.hpp"
#include "sparf_isa.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace instinfer {

namespace {

#if defined(INSTINFER_HAVE_X86_KERNELS) && (defined(__x86_64__) || defined(__i386__))
struct x86_features {
  bool avx2_fma_f16c = false;
  bool avx512 = false;  // F + BW + DQ + VL, with the OS saving the zmm state
};

uint64_t read_xcr0() noexcept {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t{hi} << 32) | lo;
}

x86_features probe_x86() noexcept {
  x86_features f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1u, avx = (c >> 28) & 1u, fma = (c >> 12) & 1u, f16c = (c >> 29) & 1u;
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool ymm_state = (xcr0 & 0x6u) == 0x6u;
  const bool zmm_state = (xcr0 & 0xe6u) == 0xe6u;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = (b >> 5) & 1u;
  const bool avx512 = ((b >> 16) & 1u) && ((b >> 17) & 1u) && ((b >> 30) & 1u) && ((b >> 31) & 1u);
  f.avx2_fma_f16c = ymm_state && avx2 && fma && f16c;
  f.avx512 = f.avx2_fma_f16c && zmm_state && avx512;
  return f;
}

const x86_features& x86() noexcept {
  static const x86_features f = probe_x86();
  return f;
}
#endif

}  // namespace

namespace kernels {
decode_kernel_pair lookup_kernels(cpu_isa isa, uint32_t head_dim, dtype t, bool softcap, bool int8_dot) noexcept {
  const bool q = is_quantized(t);
  switch (isa) {
    case cpu_isa::kScalar: return kernels::decode_kernel_scalar(head_dim, t, softcap, int8_dot);
#if defined(INSTINFER_HAVE_X86_KERNELS)
    case cpu_isa::kAvx2:
      return q ? kernels::decode_kernel_avx2_quant(head_dim, t, softcap, int8_dot)
               : kernels::decode_kernel_avx2(head_dim, t, softcap, int8_dot);
    case cpu_isa::kAvx512:
      return q ? kernels::decode_kernel_avx512_quant(head_dim, t, softcap, int8_dot)
               : kernels::decode_kernel_avx512(head_dim, t, softcap, int8_dot);
#endif
#if defined(INSTINFER_HAVE_NEON_KERNELS)
    case cpu_isa::kNeon:
      return q ? kernels::decode_kernel_neon_quant(head_dim, t, softcap, int8_dot)
               : kernels::decode_kernel_neon(head_dim, t, softcap, int8_dot);
#endif
    default: return {};
  }
}
}  // namespace kernels

std::string_view cpu_isa_name(cpu_isa isa) noexcept {
  switch (isa) {
    case cpu_isa::kScalar: return "scalar";
    case cpu_isa::kAvx2: return "avx2";
    case cpu_isa::kAvx512: return "avx512";
    case cpu_isa::kNeon: return "neon";
  }
  return "unknown";
}

bool cpu_isa_available(cpu_isa isa) noexcept {
  switch (isa) {
    case cpu_isa::kScalar: return true;
#if defined(INSTINFER_HAVE_X86_KERNELS) && (defined(__x86_64__) || defined(__i386__))
    case cpu_isa::kAvx2: return x86().avx2_fma_f16c;
    case cpu_isa::kAvx512: return x86().avx512;
#endif
#if defined(INSTINFER_HAVE_NEON_KERNELS) && defined(__aarch64__)
    case cpu_isa::kNeon: return true;  // Advanced SIMD is part of the aarch64 baseline
#endif
    default: return false;
  }
}

cpu_isa best_cpu_isa() noexcept {
  for (cpu_isa isa : {cpu_isa::kAvx512, cpu_isa::kAvx2, cpu_isa::kNeon})
    if (cpu_isa_available(isa)) return isa;
  return cpu_isa::kScalar;
}

float decode_params::effective_scale() const noexcept {
  return scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(layout.page.head_dim));
}

status decode_params::validate() const {
  const page_geometry& g = layout.page;
  if (!is_valid_dtype(g.kv_dtype))
    return {errc::kInvalidArgument, "unknown KV dtype (code " + std::to_string(static_cast<int>(g.kv_dtype)) + ")"};
  if (!kv_shape::is_supported_head_dim(g.head_dim))
    return {errc::kUnsupported, "decode kernels support head_dim 64, 128 or 256, got " + std::to_string(g.head_dim)};
  if (const errc e = page_geometry::check(g.page_bytes, g.head_dim, g.kv_dtype); e != errc::kOk)
    return page_geometry::make(g.page_bytes, g.head_dim, g.kv_dtype).error();
  if (g.tokens_per_page != g.page_bytes / g.row_bytes())
    return {errc::kInvalidArgument, "tokens_per_page (" + std::to_string(g.tokens_per_page) +
                                        ") does not match page_bytes / row bytes (" +
                                        std::to_string(g.page_bytes / g.row_bytes()) + ")"};
  if (layout.n_kv_heads == 0 || layout.n_kv_heads > kv_shape::kMaxHeads)
    return {errc::kInvalidArgument, "n_kv_heads must be in [1, " + std::to_string(kv_shape::kMaxHeads) + "], got " +
                                        std::to_string(layout.n_kv_heads)};
  if (group_size == 0 || uint64_t{group_size} * layout.n_kv_heads > kv_shape::kMaxHeads)
    return {errc::kInvalidArgument,
            "group_size must be >= 1 with group_size * n_kv_heads <= " + std::to_string(kv_shape::kMaxHeads) +
                ", got group_size " + std::to_string(group_size) + " for " + std::to_string(layout.n_kv_heads) +
                " kv heads"};
  if (!std::isfinite(scale) || scale < 0.0f)
    return {errc::kInvalidArgument,
            "scale must be finite and >= 0 (0: 1/sqrt(head_dim)), got " + std::to_string(scale)};
  if (!std::isfinite(softcap))
    return {errc::kInvalidArgument, "softcap must be finite (<= 0 disables it), got " + std::to_string(softcap)};
  if (int8_query_dot && g.kv_dtype != dtype::kQ8_0)
    return {errc::kUnsupported, "int8_query_dot needs q8_0 K, got " + std::string(dtype_name(g.kv_dtype)) +
                                    " (the other dtypes score in f32 only)"};
  if (int8_query_dot && uint64_t{group_size} * g.head_dim > kQ8QueryCap)
    return {errc::kUnsupported, "int8_query_dot holds group_size * head_dim <= " + std::to_string(kQ8QueryCap) +
                                    " quantized query values, got " + std::to_string(group_size) + " x " +
                                    std::to_string(g.head_dim)};
  return {};
}

namespace {

// The kernels for (isa, params) after validating both; a kernel may still be null.
result<kernels::decode_kernel_pair> checked_kernels(cpu_isa isa, const decode_params& params) {
  INSTINFER_TRY(params.validate());
  if (!cpu_isa_available(isa))
    return status{errc::kUnsupported, "decode ISA '" + std::string(cpu_isa_name(isa)) +
                                          "' is not built into this library or not supported by this CPU"};
  const kernels::decode_kernel_pair k = kernels::lookup_kernels(
      isa, params.layout.page.head_dim, params.layout.page.kv_dtype, params.softcap > 0.0f, params.int8_query_dot);
  if (k.one_head == nullptr || k.head_range == nullptr)
    return status{errc::kUnsupported, "no decode kernel for head_dim " + std::to_string(params.layout.page.head_dim) +
                                          ", dtype " + std::string(dtype_name(params.layout.page.kv_dtype)) + " on " +
                                          std::string(cpu_isa_name(isa))};
  return k;
}

}  // namespace

result<decode_chunks_fn> select_decode_kernel(cpu_isa isa, const decode_params& params) {
  auto k = checked_kernels(isa, params);
  if (!k.ok()) return k.error();
  return k->one_head;
}

result<decode_heads_fn> select_decode_heads_kernel(cpu_isa isa, const decode_params& params) {
  auto k = checked_kernels(isa, params);
  if (!k.ok()) return k.error();
  return k->head_range;
}

result<decode_rows_fn> select_decode_rows_kernel(cpu_isa isa, const decode_params& params) {
  auto k = checked_kernels(isa, params);
  if (!k.ok()) return k.error();
  if (k->rows == nullptr)
    return status{errc::kUnsupported, "no causal-rows kernel for head_dim " +
                                          std::to_string(params.layout.page.head_dim) + " on " +
                                          std::string(cpu_isa_name(isa))};
  return k->rows;
}

result<sparf_score_fn> select_sparf_score_kernel(cpu_isa isa, dtype column_dtype) {
  if (!cpu_isa_available(isa))
    return status{errc::kUnsupported, "SparF score ISA '" + std::string(cpu_isa_name(isa)) +
                                          "' is not built into this library or not supported by this CPU"};
  sparf_score_fn fn = nullptr;
  switch (isa) {
    case cpu_isa::kScalar: fn = kernels::sparf_score_kernel_scalar(column_dtype); break;
#if defined(INSTINFER_HAVE_X86_KERNELS)
    case cpu_isa::kAvx2: fn = kernels::sparf_score_kernel_avx2(column_dtype); break;
    case cpu_isa::kAvx512: fn = kernels::sparf_score_kernel_avx512(column_dtype); break;
#endif
#if defined(INSTINFER_HAVE_NEON_KERNELS)
    case cpu_isa::kNeon: fn = kernels::sparf_score_kernel_neon(column_dtype); break;
#endif
    default: break;
  }
  if (fn == nullptr)
    return status{errc::kUnsupported, "no SparF score kernel for column dtype " +
                                          std::string(dtype_name(column_dtype)) + " on " +
                                          std::string(cpu_isa_name(isa))};
  return fn;
}

result<page_summary_score_fn> select_page_summary_score_kernel(cpu_isa isa) {
  if (!cpu_isa_available(isa))
    return status{errc::kUnsupported, "page summary score ISA '" + std::string(cpu_isa_name(isa)) +
                                          "' is not built into this library or not supported by this CPU"};
  switch (isa) {
    case cpu_isa::kScalar: return kernels::page_summary_score_kernel_scalar();
#if defined(INSTINFER_HAVE_X86_KERNELS)
    case cpu_isa::kAvx2: return kernels::page_summary_score_kernel_avx2();
    case cpu_isa::kAvx512: return kernels::page_summary_score_kernel_avx512();
#endif
#if defined(INSTINFER_HAVE_NEON_KERNELS)
    case cpu_isa::kNeon: return kernels::page_summary_score_kernel_neon();
#endif
    default: break;
  }
  return status{errc::kUnsupported, "no page summary score kernel on " + std::string(cpu_isa_name(isa))};
}

}  // namespace instinfer
