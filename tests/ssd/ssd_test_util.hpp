// Shared helpers of the SSD tests: scratch files on the real disk, random data, skips.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <memory>

#include "instinfer/backend/ssd_backend.hpp"
#include "instinfer/core/dtype.hpp"
#include "support/scratch.hpp"

namespace ssd_test {

// A directory on the real disk ($TMPDIR or /tmp) for this test process.
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    std::string d = test_support::make_scratch_dir("instinfer-ssd-test");
    if (d.empty()) {
      const char* t = std::getenv("TMPDIR");
      d = (t && *t) ? t : "/tmp";
    }
    return d;
  }();
  return dir;
}

inline std::string scratch_file(const std::string& name) {
  return scratch_dir() + "/" + name;
}

// Whether the scratch directory's filesystem accepts O_DIRECT (otherwise: skip, exit 77).
inline bool direct_io_works() {
  return test_support::direct_io_works(scratch_dir());
}

inline void remove_scratch() {
  const std::string cmd = "rm -rf '" + scratch_dir() + "'";
  if (std::system(cmd.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", scratch_dir().c_str());
}

// Fresh random values, never zero, in [-1, -0.05] U [0.05, 1].
inline std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> mag(0.05f, 1.0f);
  std::bernoulli_distribution sign(0.5);
  std::vector<float> v(n);
  for (auto& x : v) x = sign(rng) ? mag(rng) : -mag(rng);
  return v;
}

// The same values stored as `t` (what the cache keeps).
inline std::vector<std::byte> to_dtype(const std::vector<float>& f, instinfer::dtype t) {
  std::vector<std::byte> out(f.size() * instinfer::dtype_size(t));
  instinfer::convert_elements(f.data(), instinfer::dtype::kF32, out.data(), t, f.size());
  return out;
}

// An ssd backend for `uri` ("ssd:PATH?options"), configured; REQUIREs on failure.
inline std::unique_ptr<instinfer::ssd_backend> open_backend(const std::string& uri,
                                                            const instinfer::backend_config& cfg) {
  auto parsed = instinfer::backend_uri::parse(uri);
  REQUIRE(parsed.ok());
  auto o = instinfer::ssd_backend_options::from_uri(parsed.value());
  REQUIRE_MESSAGE(o.ok(), o.error().to_string());
  auto b = std::make_unique<instinfer::ssd_backend>(o.value());
  const instinfer::status s = b->configure(cfg);
  REQUIRE_MESSAGE(s.ok(), s.to_string());
  return b;
}

// main() of an SSD test binary: exit 77 (skipped) where the scratch directory refuses O_DIRECT.
inline int run_tests(int argc, char** argv) {
  if (!direct_io_works()) {
    std::fprintf(stderr, "skipped: %s does not support O_DIRECT\n", scratch_dir().c_str());
    return 77;
  }
  doctest::Context ctx(argc, argv);
  const int rc = ctx.run();
  remove_scratch();
  return rc;
}

}  // namespace ssd_test
