// Mat-mul kernels on ggml blocks (scalar and AVX2) against a float64 reference built from the
// block format specification (synthetic_model.hpp), for every supported type.
#include <doctest/doctest.h>

#include <random>

#include "quant.hpp"
#include "synthetic_model.hpp"

using namespace instinfer::model;

TEST_CASE("quant: dequantize_row and every kernel match the float64 reference") {
  std::mt19937_64 rng(5);
  const uint32_t types[] = {synth::kTF32, synth::kTF16, synth::kTBF16, synth::kTQ4_0, synth::kTQ4_1, synth::kTQ8_0};
  for (uint32_t tid : types) {
    const auto t = to_ggml_type(tid);
    REQUIRE(t);
    for (uint32_t cols : {32u, 96u, 576u}) {
      const uint32_t rows = 37;
      const synth::tensor w = synth::make_tensor(rng, "w", {cols, rows}, tid, 0.5);
      const uint64_t rb = ggml_row_bytes(*t, cols);
      REQUIRE(w.data.size() == rb * rows);
      // dequantize_row reproduces the spec values exactly (f32 rounding of exact products).
      std::vector<float> deq(cols);
      for (uint32_t r = 0; r < rows; r += 7) {
        dequantize_row(*t, w.data.data() + r * rb, deq.data(), cols);
        for (uint32_t c = 0; c < cols; ++c) REQUIRE(deq[c] == doctest::Approx(w.values[r * cols + c]).epsilon(1e-6));
      }
      for (uint32_t n_vec : {1u, 3u, 4u, 9u}) {
        std::vector<float> x(size_t{n_vec} * cols);
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        for (auto& e : x) e = u(rng);
        std::vector<double> ref(size_t{n_vec} * rows, 0.0);
        std::vector<double> mag(size_t{n_vec} * rows, 0.0);
        for (uint32_t v = 0; v < n_vec; ++v)
          for (uint32_t r = 0; r < rows; ++r)
            for (uint32_t c = 0; c < cols; ++c) {
              ref[v * rows + r] += w.values[r * cols + c] * x[v * cols + c];
              mag[v * rows + r] += std::fabs(w.values[r * cols + c] * x[v * cols + c]);
            }
        for (kernel_isa isa : {kernel_isa::kScalar, kernel_isa::kAvx2}) {
          const matmul_fn fn = matmul_kernel(*t, isa);
          if (!fn) {
            MESSAGE("kernel ISA " << kernel_isa_name(isa) << " not available here: skipped");
            continue;
          }
          std::vector<float> y(size_t{n_vec} * rows, -12345.0f);
          // Two row ranges, as the thread pool splits them.
          fn(w.data.data(), rb, cols, 0, 20, x.data(), cols, n_vec, y.data(), rows);
          fn(w.data.data(), rb, cols, 20, rows, x.data(), cols, n_vec, y.data(), rows);
          for (size_t i = 0; i < y.size(); ++i) {
            const double tol = 1e-6 * mag[i] + 1e-7;  // f32 accumulation error bound, scaled by Σ|w·x|
            if (std::fabs(y[i] - ref[i]) > tol)
              FAIL("type " << ggml_type_name(tid) << " isa " << kernel_isa_name(isa) << " cols " << cols << " n_vec "
                           << n_vec << " i " << i << ": " << y[i] << " vs " << ref[i]);
          }
        }
      }
    }
  }
}

TEST_CASE("quant: type names and the supported set") {
  CHECK(ggml_type_name(14) == "q6_K");
  CHECK(ggml_type_name(3) == "q4_1");
  CHECK(ggml_type_name(999) == "unknown");
  CHECK(!to_ggml_type(14));
  CHECK(!to_ggml_type(6));
  CHECK(ggml_row_bytes(ggml_type::kQ4_1, 576) == 18 * 20);
  CHECK(ggml_row_bytes(ggml_type::kQ8_0, 576) == 18 * 34);
  CHECK(ggml_row_bytes(ggml_type::kQ4_0, 64) == 36);
}

namespace {

std::vector<act_block> quantize_all(quantize_act_fn q, const std::vector<float>& x, uint32_t n_vec, uint32_t cols) {
  std::vector<act_block> out(size_t{n_vec} * cols / 32);
  for (uint32_t v = 0; v < n_vec; ++v) q(x.data() + size_t{v} * cols, cols, out.data() + size_t{v} * cols / 32);
  return out;
}

}  // namespace

TEST_CASE("quant: activation blocks are the same on every ISA and within d/2 of the input") {
  std::mt19937_64 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const uint32_t cols = 32 * 40;
  std::vector<float> x(cols);
  for (auto& e : x) e = nd(rng);
  for (int j = 0; j < 32; ++j) x[32 + j] = 0.0f;  // an all-zero block: d = 0, q = 0
  x[64 + 3] = 1e-30f;                             // a tiny one
  const auto ref = quantize_all(quantize_act_kernel(kernel_isa::kScalar), x, 1, cols);
  for (uint32_t b = 0; b < cols / 32; ++b) {
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      const float xj = x[b * 32 + j];
      REQUIRE(std::fabs(xj - ref[b].d * ref[b].qs[j]) <= 0.5001 * ref[b].d + 1e-37);
      REQUIRE(std::abs(ref[b].qs[j]) <= 127);
      sum += ref[b].qs[j];
    }
    REQUIRE(ref[b].s == ref[b].d * static_cast<float>(sum));
  }
  CHECK(ref[1].d == 0.0f);
  if (const auto avx2 = quantize_act_kernel(kernel_isa::kAvx2)) {
    const auto got = quantize_all(avx2, x, 1, cols);
    for (uint32_t b = 0; b < cols / 32; ++b) {
      REQUIRE(got[b].d == ref[b].d);
      REQUIRE(got[b].s == ref[b].s);
      for (int j = 0; j < 32; ++j) REQUIRE(got[b].qs[j] == ref[b].qs[j]);
    }
  } else {
    MESSAGE("avx2 quantizer not available here: skipped");
  }
}

TEST_CASE(
    "quant: integer-dot kernels match float64 on the quantized activations, and the exact product within the "
    "quantization bound") {
  std::mt19937_64 rng(7);
  double worst_rel = 0.0;
  for (uint32_t tid : {synth::kTQ4_0, synth::kTQ4_1, synth::kTQ8_0}) {
    const auto t = to_ggml_type(tid);
    REQUIRE(t);
    for (uint32_t cols : {32u, 96u, 576u, 1536u}) {
      const uint32_t rows = 37;
      const synth::tensor w = synth::make_tensor(rng, "w", {cols, rows}, tid, 0.5);
      const uint64_t rb = ggml_row_bytes(*t, cols);
      for (uint32_t n_vec : {1u, 2u, 3u, 4u, 5u, 9u}) {
        std::vector<float> x(size_t{n_vec} * cols);
        std::normal_distribution<float> nd(0.0f, 1.0f);
        for (auto& e : x) e = nd(rng);
        const auto xq = quantize_all(quantize_act_kernel(kernel_isa::kScalar), x, n_vec, cols);
        // Three float64 references per output: the same math (dequantized weights times d·q),
        // the exact product with the f32 activations, and the bound between them: each
        // activation moved by at most d_b/2, so |Δ| ≤ Σ_b d_b/2 · Σ_j |w_j|.
        const size_t n_out = size_t{n_vec} * rows;
        std::vector<double> same(n_out, 0.0), exact(n_out, 0.0), mag(n_out, 0.0), bound(n_out, 0.0);
        for (uint32_t v = 0; v < n_vec; ++v)
          for (uint32_t r = 0; r < rows; ++r)
            for (uint32_t c = 0; c < cols; ++c) {
              const act_block& b = xq[size_t{v} * cols / 32 + c / 32];
              const double wv = w.values[size_t{r} * cols + c], xv = double{b.d} * b.qs[c % 32];
              same[v * rows + r] += wv * xv;
              exact[v * rows + r] += wv * x[size_t{v} * cols + c];
              mag[v * rows + r] += std::fabs(wv * xv);
              bound[v * rows + r] += 0.5 * b.d * std::fabs(wv);
            }
        const matmul_fn f32 = matmul_kernel(*t, best_kernel_isa());
        std::vector<float> y32(n_out);
        f32(w.data.data(), rb, cols, 0, rows, x.data(), cols, n_vec, y32.data(), rows);
        for (kernel_isa isa : {kernel_isa::kScalar, kernel_isa::kAvx2}) {
          const matmul_q8_fn fn = matmul_q8_kernel(*t, isa);
          if (!fn) {
            MESSAGE("kernel ISA " << kernel_isa_name(isa) << " not available here: skipped");
            continue;
          }
          std::vector<float> y(n_out, -12345.0f);
          fn(w.data.data(), rb, cols, 0, 20, xq.data(), cols / 32, n_vec, y.data(), rows);
          fn(w.data.data(), rb, cols, 20, rows, xq.data(), cols / 32, n_vec, y.data(), rows);
          for (size_t i = 0; i < n_out; ++i) {
            // Integer dots are exact; what is left is f32 scaling and accumulation.
            const double tol = 1e-6 * mag[i] + 1e-7;
            if (std::fabs(y[i] - same[i]) > tol)
              FAIL("type " << ggml_type_name(tid) << " isa " << kernel_isa_name(isa) << " cols " << cols << " n_vec "
                           << n_vec << " i " << i << ": " << y[i] << " vs " << same[i]);
            REQUIRE(std::fabs(y[i] - exact[i]) <= bound[i] + tol);
            REQUIRE(std::fabs(y[i] - y32[i]) <= bound[i] + 2 * tol);  // the f32-unpacking kernel
            worst_rel = std::max(worst_rel, std::fabs(y[i] - exact[i]) / (mag[i] + 1e-30));
          }
        }
      }
    }
  }
  // Rounding errors of ±d/2 are independent, so they mostly cancel: the typical error is far
  // below the worst-case bound. A kernel that dropped a block or misplaced a nibble would not be.
  MESSAGE("integer-dot kernels: worst |y - exact| / Σ|w·x| = " << worst_rel);
  CHECK(worst_rel < 1e-2);
}
