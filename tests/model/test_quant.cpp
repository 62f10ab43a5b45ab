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
