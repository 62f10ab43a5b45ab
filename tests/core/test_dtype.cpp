#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "instinfer/core/dtype.hpp"

using namespace instinfer;

namespace {
// Nearest value of a 16-bit format to x, ties to even, found by brute force over the two
// neighbours that truncation brackets: an oracle independent of the bit tricks under test.
template <class Decode>
uint16_t nearest_even(float x, uint16_t lo, Decode decode) {
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double dl = std::fabs(static_cast<double>(decode(lo)) - x);
  const double dh = std::fabs(static_cast<double>(decode(hi)) - x);
  if (dl < dh) return lo;
  if (dh < dl) return hi;
  return (lo & 1) ? hi : lo;
}
}  // namespace

TEST_CASE("f16: every finite half round-trips through float exactly") {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const f16_t h{static_cast<uint16_t>(bits)};
    const float f = f16_to_float(h);
    if (std::isnan(f)) {
      CHECK(std::isnan(f16_to_float(float_to_f16(f))));
      continue;
    }
    CHECK(float_to_f16(f).bits == bits);
  }
}

#if defined(__FLT16_MAX__)
TEST_CASE("f16: float -> half rounds like the compiler's _Float16 (RNE), on random floats") {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = any(rng);
    // Bias towards the half range, including subnormals and overflow.
    if (i % 2) u = (u & 0x807fffffu) | ((100u + (u >> 24) % 45u) << 23);
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    REQUIRE_MESSAGE(float_to_f16(f).bits == ref_bits, "x=" << f);
  }
}
#endif

TEST_CASE("bf16: float -> bf16 is round-to-nearest-even, bf16 -> float exact") {
  std::mt19937 rng(99);
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 1000000; ++i) {
    uint32_t u = any(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (!std::isfinite(f) || std::fabs(f) > 3.0e38f) continue;
    const uint16_t lo = static_cast<uint16_t>(u >> 16);
    const uint16_t expected = nearest_even(f, lo, [](uint16_t b) { return bf16_to_float(bf16_t{b}); });
    REQUIRE(float_to_bf16(f).bits == expected);
  }
  CHECK(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  CHECK(bf16_to_float(float_to_bf16(1.0f)) == 1.0f);
}

TEST_CASE("convert_elements between every pair of dtypes") {
  std::mt19937 rng(5);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> src(257);
  for (auto& x : src) x = dist(rng);
  for (dtype t : {dtype::kF32, dtype::kF16, dtype::kBF16}) {
    std::vector<std::byte> stored(src.size() * dtype_size(t));
    convert_elements(src.data(), dtype::kF32, stored.data(), t, src.size());
    const double tol = t == dtype::kF32 ? 0.0 : (t == dtype::kF16 ? 1.0 / 1024 : 1.0 / 128);
    for (size_t i = 0; i < src.size(); ++i) {
      const float back = load_as_float(stored.data(), t, static_cast<uint32_t>(i));
      CHECK(std::fabs(back - src[i]) <= tol * std::fabs(src[i]) + 1e-30);
    }
  }
  CHECK(parse_dtype("f16") == dtype::kF16);
  CHECK(parse_dtype("bfloat16") == dtype::kBF16);
  CHECK_FALSE(parse_dtype("int4").has_value());
}

TEST_CASE("q8_0 / q4_0: sizes, names, error bounds and what cannot be quantized") {
  CHECK(dtype_row_bytes(dtype::kQ8_0, 64) == 68);
  CHECK(dtype_row_bytes(dtype::kQ4_0, 256) == 144);
  CHECK(dtype_size(dtype::kQ8_0) == 0);
  CHECK(parse_dtype("q8_0") == dtype::kQ8_0);
  CHECK(parse_dtype("q4_0") == dtype::kQ4_0);
  CHECK(dtype_name(dtype::kQ4_0) == "q4_0");
  CHECK(is_convertible(dtype::kBF16, dtype::kQ4_0));
  CHECK_FALSE(is_convertible(dtype::kQ8_0, dtype::kQ4_0));
  CHECK_FALSE(is_convertible(dtype::kBF16, dtype::kF16));
  CHECK_FALSE(is_valid_dtype(static_cast<dtype>(5)));

  std::mt19937 rng(9);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<float> x(256);
  for (auto& v : x) v = dist(rng);
  for (dtype t : {dtype::kQ8_0, dtype::kQ4_0}) {
    CAPTURE(dtype_name(t));
    std::vector<std::byte> q(dtype_row_bytes(t, x.size()));
    REQUIRE(convert_elements(x.data(), dtype::kF32, q.data(), t, x.size()));
    // Error at most half a step (plus the f16 rounding of the scale) of its block's amax / 127
    // (q8_0) or amax / 8 (q4_0; the positive end is one step short).
    for (size_t b = 0; b < x.size() / 32; ++b) {
      float amax = 0.0f;
      for (size_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
      const float step = t == dtype::kQ8_0 ? amax / 127 : amax / 8;
      for (size_t j = 0; j < 32; ++j) {
        const size_t i = b * 32 + j;
        const float back = load_as_float(q.data(), t, static_cast<uint32_t>(i));
        CHECK(std::fabs(back - x[i]) <= (t == dtype::kQ8_0 ? 0.52f : 1.02f) * step);
      }
    }
    // Non-finite values and values whose scale overflows f16 are refused (the bytes are written).
    std::vector<float> bad = x;
    bad[40] = std::numeric_limits<float>::infinity();
    CHECK_FALSE(convert_elements(bad.data(), dtype::kF32, q.data(), t, bad.size()));
    bad[40] = std::nanf("");
    CHECK_FALSE(convert_elements(bad.data(), dtype::kF32, q.data(), t, bad.size()));
    bad[40] = 1e7f;  // q8_0: 1e7 / 127 > 65504; q4_0: 1e7 / 8 > 65504
    CHECK_FALSE(convert_elements(bad.data(), dtype::kF32, q.data(), t, bad.size()));
    bad[40] = 65504.0f;  // the largest f16 quantizes fine
    CHECK(convert_elements(bad.data(), dtype::kF32, q.data(), t, bad.size()));
  }
}
